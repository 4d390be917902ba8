//! `cohort bench train`: data-parallel training throughput of the benchmark MLP
//! (784-1024-1024-10, global batch 256, fp32, SGD with momentum) on Fashion-MNIST, one world size
//! after another, each as a real job of rank processes on a local cluster. Reports samples/s,
//! scaling efficiency against N times the 1-rank figure, and the median time of each phase of a
//! step (forward, backward, optimizer, communication not hidden behind the backward pass).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cohort_spec::train::{
    DataSpec, LearningRateDecay, ModelKind, ModelSpec, OptimizerKind, OptimizerSpec, ParallelSpec,
    ScheduleSpec,
};
use cohort_trainer::{TrainConfig, train};
use serde_json::{Value, json};

use super::{publish_result, read_result, run_job, start_cluster};
use crate::client;
use crate::rank::RankLink;

/// Global batch of the benchmark.
const GLOBAL_BATCH: u32 = 256;
/// Steps run before the timed ones (their timings are left out of the medians).
const WARMUP_STEPS: u64 = 3;

/// The benchmark's training config for `world_size` ranks and `steps` timed steps.
fn benchmark_config(world_size: u32, steps: u64) -> TrainConfig {
    let spec = cohort_spec::JobSpec {
        version: cohort_spec::SPEC_VERSION,
        name: "bench-train".to_owned(),
        kind: cohort_spec::JobKind::Train,
        priority: 0,
        resources: cohort_spec::Resources::default(),
        command: None,
        parallel: Some(ParallelSpec {
            data: world_size,
            ..ParallelSpec::default()
        }),
        model: Some(ModelSpec {
            kind: ModelKind::Mlp,
            hidden: vec![1024, 1024],
            ..ModelSpec::default()
        }),
        data: Some(DataSpec::default()),
        optimizer: Some(OptimizerSpec {
            kind: OptimizerKind::Sgd,
            lr: Some(0.01),
            ..OptimizerSpec::default()
        }),
        schedule: Some(ScheduleSpec {
            batch_size: GLOBAL_BATCH,
            max_steps: Some(steps + WARMUP_STEPS),
            lr_decay: LearningRateDecay::Constant,
            ..ScheduleSpec::default()
        }),
        checkpoint: None,
        train: None,
    };
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

/// One rank of the benchmark: trains, publishes its medians, and rank 0 prints every rank's.
pub fn rank(steps: u64) -> Result<ExitCode> {
    let link = RankLink::connect()?;
    let env = link.env.clone();
    let config = benchmark_config(env.world_size as u32, steps);
    let data = cohort_trainer::data::load(&config.data).context("loading Fashion-MNIST")?;
    let mut ring = link.ring("bench-train")?;
    let mut metrics = link.metrics()?;
    train(&config, &data, &mut ring, &mut metrics)?;
    let medians = metrics.medians();
    metrics.finish();
    publish_result(&link, &medians)?;
    Ok(ExitCode::SUCCESS)
}

/// The slowest rank's value of `key` (a step is as slow as its slowest rank).
fn slowest(per_rank: &[Value], key: &str) -> f64 {
    per_rank
        .iter()
        .filter_map(|rank| rank[key].as_f64())
        .fold(0.0, f64::max)
}

/// `cohort bench train`.
pub async fn run(world_sizes: &[u32], steps: u64, device: String) -> Result<ExitCode> {
    if device != "cpu" {
        bail!("--device {device}: this build trains on cpu only");
    }
    if world_sizes.is_empty() || world_sizes.iter().any(|&n| !(1..=16).contains(&n)) {
        bail!("--ranks {world_sizes:?}: expected world sizes of 1 to 16");
    }
    if !(5..=10_000).contains(&steps) {
        bail!("--steps = {steps}, expected 5 to 10000");
    }
    let executable = std::env::current_exe()?;
    let mut rows = Vec::new();
    let mut table = Vec::new();
    for &ranks in world_sizes {
        eprintln!("training with {ranks} rank(s) for {steps} steps...");
        let data_dir = tempfile::Builder::new().prefix("cohort-bench-").tempdir()?;
        let cluster = start_cluster(data_dir.path(), 1, ranks).await?;
        let spec = format!(
            r#"
version = 1
name = "bench-train"
kind = "command"
[resources]
ranks = {ranks}
[command]
program = {program}
args = ["bench", "train-rank", "--steps", "{steps}"]
"#,
            program = json!(executable.display().to_string()),
        );
        let mut client = client::job_control(cluster.address()).await?;
        let result = match run_job(&mut client, spec).await {
            Ok(job) => read_result(&mut client, &job.job_id).await,
            Err(error) => Err(error),
        };
        cluster.shutdown().await;
        let per_rank: Vec<Value> = result?;
        let step_s = slowest(&per_rank, "median_step_s");
        let samples_per_s = f64::from(GLOBAL_BATCH) / step_s.max(f64::MIN_POSITIVE);
        let row = json!({
            "ranks": ranks,
            "samples_per_s": samples_per_s,
            "step_s": step_s,
            "forward_s": slowest(&per_rank, "median_forward_s"),
            "backward_s": slowest(&per_rank, "median_backward_s"),
            "optimizer_s": slowest(&per_rank, "median_optimizer_s"),
            "exposed_comm_s": slowest(&per_rank, "median_exposed_comm_s"),
            "data_s": slowest(&per_rank, "median_data_s"),
        });
        table.push(vec![
            ranks.to_string(),
            format!("{samples_per_s:.0}"),
            String::new(),
            format!("{:.2}", step_s * 1e3),
            format!("{:.2}", row["forward_s"].as_f64().unwrap_or(0.0) * 1e3),
            format!("{:.2}", row["backward_s"].as_f64().unwrap_or(0.0) * 1e3),
            format!("{:.2}", row["optimizer_s"].as_f64().unwrap_or(0.0) * 1e3),
            format!("{:.2}", row["exposed_comm_s"].as_f64().unwrap_or(0.0) * 1e3),
        ]);
        rows.push(row);
    }
    // Scaling efficiency: samples/s against N times the 1-rank figure of this run.
    let one_rank = rows
        .iter()
        .find(|row| row["ranks"] == 1)
        .and_then(|row| row["samples_per_s"].as_f64());
    for (row, cells) in rows.iter_mut().zip(&mut table) {
        let ranks = row["ranks"].as_f64().unwrap_or(1.0);
        let efficiency = one_rank
            .map(|baseline| row["samples_per_s"].as_f64().unwrap_or(0.0) / (baseline * ranks));
        row["efficiency"] = efficiency.map_or(Value::Null, |e| json!(e));
        cells[2] = efficiency.map_or("-".to_owned(), |e| format!("{e:.2}"));
    }
    println!(
        "data-parallel training, MLP 784-1024-1024-10, global batch {GLOBAL_BATCH}, fp32, SGD; \
         {} cores; medians over {steps} steps",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    print!(
        "{}",
        crate::render::table(
            &[
                "RANKS",
                "SAMPLES/S",
                "EFFICIENCY",
                "STEP(MS)",
                "FORWARD(MS)",
                "BACKWARD(MS)",
                "OPTIMIZER(MS)",
                "EXPOSED COMM(MS)",
            ],
            &table
        )
    );
    println!("{}", json!({ "bench": "train", "results": rows }));
    Ok(ExitCode::SUCCESS)
}
