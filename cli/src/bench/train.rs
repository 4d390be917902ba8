//! `cohort bench train`: data-parallel training throughput of the benchmark MLP
//! (784-1024-1024-10, global batch 256, fp32, SGD with momentum) on Fashion-MNIST, one world size
//! after another, each as a real job of rank processes on a local cluster. Reports samples/s,
//! scaling efficiency against N times the 1-rank figure, and the median time of each phase of a
//! step (forward, backward, optimizer, communication not hidden behind the backward pass).
//!
//! Right after Cohort's run of each world size, `--reference pytorch` (the default) trains the
//! same MLP on the same data with the same optimizer and step counts under PyTorch
//! DistributedDataParallel (gloo, one single-threaded process per rank, as Cohort's CPU ranks
//! hold one slot each) and reports its samples/s and phases, and Cohort's samples/s against it
//! (see [`super::reference`]); where torch is not importable, one line says why.
//!
//! `--device gpu` measures one rank in this process on one CUDA device instead: samples/s of
//! the same MLP and tokens/s of a transformer on the Shakespeare text, each in fp32 and bf16,
//! with the median time of the passes and of the host-side update (the f32 masters and the
//! optimizer stay in host memory; see `cohort_trainer::device`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};
use cohort_jobspec::precision::{Precision, TrainSpec};
use cohort_jobspec::train::{
    DataSpec, DatasetKind, LearningRateDecay, ModelKind, ModelSpec, OptimizerKind, OptimizerSpec,
    ParallelSpec, ScheduleSpec,
};
use cohort_trainer::data::TrainTestSplits;
use cohort_trainer::language_model::train_language_model;
use cohort_trainer::mesh::{MeshLinks, MeshShape, connect_mesh, host_transport};
use cohort_trainer::text::TextCorpus;
use cohort_trainer::{
    ComputeDevice, EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics, TrainConfig, train,
};
use serde_json::{Value, json};

use super::reference::{self, PytorchPhases, PytorchReport, PytorchRequest, Reference, Skip};
use super::{publish_result, read_result, run_job, start_cluster};
use crate::args::{BenchTelemetry, TrainReference};
use crate::client;
use crate::rank::RankLink;
use crate::rank::metrics::StepTimings;

/// Global batch of the benchmark.
const GLOBAL_BATCH: u32 = 256;
/// Steps run before the timed ones (their timings are left out of the medians).
const WARMUP_STEPS: u64 = 3;

/// The benchmark's training config for `world_size` ranks and `steps` timed steps.
fn benchmark_config(world_size: u32, steps: u64) -> TrainConfig {
    let spec = cohort_jobspec::JobSpec {
        version: cohort_jobspec::SPEC_VERSION,
        name: "bench-train".to_owned(),
        kind: cohort_jobspec::JobKind::Train,
        priority: 0,
        preemptible: None,
        queue: None,
        resources: cohort_jobspec::Resources::default(),
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
        fault_tolerance: None,
        early_stopping: None,
    };
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

/// One rank of the benchmark: trains through the group a job's ranks form (shared memory between
/// ranks on one node), publishes its medians, and rank 0 prints every rank's.
/// With `telemetry`, as every job's rank does: reports metrics to the coordinator and records
/// its collectives for hang diagnosis; without, neither.
pub fn rank(steps: u64, telemetry: bool) -> Result<ExitCode> {
    let mut link = RankLink::connect()?;
    let config = benchmark_config(link.launch.place.world_size, steps);
    let data = cohort_trainer::data::load(&config.data).context("loading Fashion-MNIST")?;
    let medians = if telemetry {
        let mut group = link.group("bench-train", host_transport(config.parallel.transport))?;
        let mut metrics = link.metrics()?;
        train(&config, &data, &mut *group, &mut metrics)?;
        let medians = metrics.medians();
        metrics.finish();
        medians
    } else {
        link.progress = cohort_collective::Progress::disabled();
        let mut group = link.group("bench-train", host_transport(config.parallel.transport))?;
        let mut timings = StepTimings::default();
        train(&config, &data, &mut *group, &mut timings)?;
        timings.medians()
    };
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

/// World sizes `cohort bench train` runs on the CPU unless `--ranks` says otherwise.
const DEFAULT_WORLD_SIZES: [u32; 3] = [1, 2, 4];

/// Checks `--steps`.
fn check_steps(steps: u64) -> Result<()> {
    if !(5..=10_000).contains(&steps) {
        bail!("--steps = {steps}, expected 5 to 10000");
    }
    Ok(())
}

/// Whether and with which Python `bench train` runs the PyTorch reference.
#[derive(Debug, Clone)]
pub struct PytorchOptions {
    /// `--reference`.
    pub reference: TrainReference,
    /// `--python`.
    pub python: Option<PathBuf>,
}

/// `cohort bench train` on the CPU.
pub async fn run(
    world_sizes: Option<&[u32]>,
    steps: u64,
    telemetry: BenchTelemetry,
    options: &PytorchOptions,
) -> Result<ExitCode> {
    let world_sizes = world_sizes.unwrap_or(&DEFAULT_WORLD_SIZES);
    if world_sizes.is_empty() || world_sizes.iter().any(|&n| !(1..=16).contains(&n)) {
        bail!("--ranks {world_sizes:?}: expected world sizes of 1 to 16");
    }
    check_steps(steps)?;
    let modes: &[bool] = match telemetry {
        BenchTelemetry::On => &[true],
        BenchTelemetry::Off => &[false],
        // Off first: whatever the order favours, it does not favour telemetry.
        BenchTelemetry::Both => &[false, true],
    };
    let mut pytorch = PytorchMeasured::prepare(options).await;
    let mut rows = Vec::new();
    for &ranks in world_sizes {
        for &telemetry in modes {
            rows.push(measure_cohort(ranks, steps, telemetry).await?);
        }
        // Right after Cohort's run of the same world size, under the same conditions.
        pytorch.measure(ranks, steps).await;
    }
    let table = add_comparisons(&mut rows, &pytorch);
    println!(
        "data-parallel training, MLP 784-1024-1024-10, global batch {GLOBAL_BATCH}, fp32, SGD; \
         {} cores; medians over {steps} steps",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if let Some(report) = &pytorch.report {
        println!(
            "pytorch: torch {} DistributedDataParallel over gloo, one process per rank x {} \
             thread, {}, the same data, model and optimizer; its BACKWARD includes the \
             gradient all-reduce DDP overlaps with it (Cohort's not hidden is EXPOSED COMM)",
            report.torch_version,
            report.threads_per_rank,
            report.blas_summary()
        );
    }
    for skip in &pytorch.skips {
        skip.print();
    }
    print!(
        "{}",
        crate::render::table(
            &[
                "TRAINER",
                "RANKS",
                "TELEMETRY",
                "SAMPLES/S",
                "EFFICIENCY",
                "STEP(MS)",
                "FORWARD(MS)",
                "BACKWARD(MS)",
                "OPTIMIZER(MS)",
                "EXPOSED COMM(MS)",
                "ON/OFF",
                "COHORT/PYTORCH",
            ],
            &table
        )
    );
    println!(
        "{}",
        json!({
            "bench": "train",
            "results": rows,
            "pytorch": pytorch.to_json(),
            "skipped": pytorch.skips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Trains the benchmark MLP as a job of `ranks` rank processes on a local cluster, with or
/// without `telemetry`, and returns the slowest rank's medians as a result row.
async fn measure_cohort(ranks: u32, steps: u64, telemetry: bool) -> Result<Value> {
    let executable = std::env::current_exe()?;
    let (label, flag) = if telemetry {
        ("on", "")
    } else {
        ("off", ", \"--no-telemetry\"")
    };
    eprintln!("training with {ranks} rank(s) for {steps} steps, telemetry {label}...");
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
args = ["bench", "train-rank", "--steps", "{steps}"{flag}]
"#,
        program = json!(executable.display().to_string()),
    );
    let mut client = client::job_control(cluster.target()).await?;
    let result = match run_job(&mut client, spec).await {
        Ok(job) => read_result(&mut client, &job.job_id).await,
        Err(error) => Err(error),
    };
    cluster.shutdown().await;
    let per_rank: Vec<Value> = result?;
    let step_s = slowest(&per_rank, "median_step_s");
    Ok(json!({
        "ranks": ranks,
        "telemetry": label,
        "samples_per_s": f64::from(GLOBAL_BATCH) / step_s.max(f64::MIN_POSITIVE),
        "step_s": step_s,
        "forward_s": slowest(&per_rank, "median_forward_s"),
        "backward_s": slowest(&per_rank, "median_backward_s"),
        "optimizer_s": slowest(&per_rank, "median_optimizer_s"),
        "exposed_comm_s": slowest(&per_rank, "median_exposed_comm_s"),
        "data_s": slowest(&per_rank, "median_data_s"),
    }))
}

/// Adds to Cohort's rows their scaling efficiency (samples/s against N times the 1-rank
/// figure with the same telemetry), with `--telemetry both` telemetry's cost (on against off
/// for each world size), and Cohort's samples/s against PyTorch's at the same world size;
/// returns the table: each world size's Cohort rows, then its PyTorch row.
fn add_comparisons(rows: &mut [Value], pytorch: &PytorchMeasured) -> Vec<Vec<String>> {
    let samples = |rows: &[Value], ranks: &Value, telemetry: &str| {
        rows.iter()
            .find(|row| row["ranks"] == *ranks && row["telemetry"] == telemetry)
            .and_then(|row| row["samples_per_s"].as_f64())
    };
    let figures: Vec<[Option<f64>; 3]> = rows
        .iter()
        .map(|row| {
            let telemetry = row["telemetry"].as_str().unwrap_or("on");
            let ranks = row["ranks"].as_f64().unwrap_or(1.0);
            let own = row["samples_per_s"].as_f64().unwrap_or(0.0);
            let efficiency =
                samples(rows, &json!(1), telemetry).map(|baseline| own / (baseline * ranks));
            let on_over_off = match (
                samples(rows, &row["ranks"], "on"),
                samples(rows, &row["ranks"], "off"),
            ) {
                (Some(on), Some(off)) if telemetry == "on" => Some(on / off),
                _ => None,
            };
            let over_pytorch = row["ranks"]
                .as_u64()
                .and_then(|ranks| pytorch.samples_per_s(ranks))
                .map(|reference| own / reference.max(f64::MIN_POSITIVE));
            [efficiency, on_over_off, over_pytorch]
        })
        .collect();
    let ranks_of: Vec<Option<u64>> = rows.iter().map(|row| row["ranks"].as_u64()).collect();
    let mut table = Vec::new();
    for (index, (row, [efficiency, on_over_off, over_pytorch])) in
        rows.iter_mut().zip(figures).enumerate()
    {
        row["efficiency"] = json!(efficiency);
        row["on_over_off"] = json!(on_over_off);
        row["cohort_over_pytorch"] = json!(over_pytorch);
        table.push(vec![
            "cohort".to_owned(),
            row["ranks"].to_string(),
            row["telemetry"].as_str().unwrap_or("-").to_owned(),
            figure(row["samples_per_s"].as_f64(), 0),
            figure(efficiency, 2),
            ms(row["step_s"].as_f64()),
            ms(row["forward_s"].as_f64()),
            ms(row["backward_s"].as_f64()),
            ms(row["optimizer_s"].as_f64()),
            ms(row["exposed_comm_s"].as_f64()),
            figure(on_over_off, 3),
            figure(over_pytorch, 2),
        ]);
        // A world size's PyTorch row after its last Cohort row.
        let last_of_size = ranks_of.get(index + 1) != Some(&ranks_of[index]);
        if let (true, Some(ranks)) = (last_of_size, ranks_of[index]) {
            table.extend(pytorch.table_row(ranks));
        }
    }
    table
}

/// Formats seconds as milliseconds for the table.
fn ms(seconds: Option<f64>) -> String {
    format!("{:.2}", seconds.unwrap_or(0.0) * 1e3)
}

/// Formats a figure with `digits` decimals, or `-` for none.
fn figure(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".to_owned(), |value| format!("{value:.digits$}"))
}

/// The PyTorch reference of a run: what it runs with, what it measured and why it did not.
#[derive(Debug, Default)]
struct PytorchMeasured {
    /// The Python that imports torch and the data Cohort's ranks read; `None` once skipped.
    setup: Option<(PathBuf, PathBuf)>,
    /// The last report (its torch version and BLAS describe every run).
    report: Option<PytorchReport>,
    /// Per world size measured, the slowest rank's medians.
    results: Vec<(u32, PytorchPhases)>,
    /// Why the reference, or one world size of it, was not measured.
    skips: Vec<Skip>,
}

impl PytorchMeasured {
    /// Finds the Python and the data set unless `options` or the machine rule PyTorch out.
    async fn prepare(options: &PytorchOptions) -> Self {
        let label = Reference::Pytorch.label();
        let skipped = |skip: Skip| Self {
            skips: vec![skip],
            ..Self::default()
        };
        if options.reference == TrainReference::Off {
            return skipped(Skip::because(label, "--reference off"));
        }
        let search_path = std::env::var_os("PATH");
        let python = options.python.as_deref();
        let python = match reference::find_python(
            Reference::Pytorch,
            python,
            search_path.as_deref(),
        )
        .await
        {
            Ok(python) => python,
            Err(skip) => return skipped(skip),
        };
        // The directory Cohort's ranks load (`cohort_trainer::data::load`).
        let cohort_data = std::env::var_os(cohort_trainer::data::DATA_ENVIRONMENT_VARIABLE);
        let data_spec = benchmark_config(1, WARMUP_STEPS).data;
        match cohort_trainer::data::dataset_directory(&data_spec, cohort_data.as_deref()) {
            Ok(directory) => Self {
                setup: Some((python, directory)),
                ..Self::default()
            },
            Err(error) => skipped(Skip::because(label, error.to_string())),
        }
    }

    /// Trains the benchmark MLP with PyTorch DDP on `ranks` processes for `steps` timed steps,
    /// as [`benchmark_config`] trains it, and records the result or why there is none.
    async fn measure(&mut self, ranks: u32, steps: u64) {
        let Some((python, data)) = &self.setup else {
            return;
        };
        let config = benchmark_config(ranks, steps);
        let request = PytorchRequest {
            world_size: ranks,
            steps,
            warmup_steps: WARMUP_STEPS,
            global_batch: config.schedule.batch_size,
            hidden: config.model.hidden.clone(),
            learning_rate: config.optimizer.learning_rate(),
            momentum: config.optimizer.momentum(),
            weight_decay: config.optimizer.weight_decay(),
            seed: config.data.seed,
            data: data.clone(),
        };
        eprintln!("training with PyTorch DDP, {ranks} process(es) for {steps} steps...");
        // Generous: start-up, and a second per step and rank on a machine with fewer cores.
        let timeout = Duration::from_secs(300 + (steps + WARMUP_STEPS) * u64::from(ranks));
        let outcome = reference::run::<PytorchReport>(
            Reference::Pytorch,
            &[],
            python,
            &request.arguments(),
            timeout,
        )
        .await
        .and_then(|report| Ok((report.slowest(ranks)?, report)));
        match outcome {
            Ok((phases, report)) => {
                self.results.push((ranks, phases));
                self.report = Some(report);
            }
            Err(error) => self.skips.push(Skip::because(
                format!("{} with {ranks} ranks", Reference::Pytorch.label()),
                format!("{error:#}"),
            )),
        }
    }

    /// The slowest rank's medians with `ranks` processes, if measured.
    fn phases(&self, ranks: u64) -> Option<&PytorchPhases> {
        self.results
            .iter()
            .find(|(measured, _)| u64::from(*measured) == ranks)
            .map(|(_, phases)| phases)
    }

    /// Samples/s over the median step with `ranks` processes, if measured.
    fn samples_per_s(&self, ranks: u64) -> Option<f64> {
        self.phases(ranks)
            .map(|phases| f64::from(GLOBAL_BATCH) / phases.step_s.max(f64::MIN_POSITIVE))
    }

    /// Samples/s with `ranks` processes against `ranks` times the 1-process figure.
    fn efficiency(&self, ranks: u64) -> Option<f64> {
        Some(self.samples_per_s(ranks)? / (self.samples_per_s(1)? * ranks as f64))
    }

    /// The table row of `ranks` processes, if measured.
    fn table_row(&self, ranks: u64) -> Option<Vec<String>> {
        let phases = self.phases(ranks)?;
        Some(vec![
            "pytorch".to_owned(),
            ranks.to_string(),
            "-".to_owned(),
            figure(self.samples_per_s(ranks), 0),
            figure(self.efficiency(ranks), 2),
            ms(Some(phases.step_s)),
            ms(Some(phases.forward_s)),
            ms(Some(phases.backward_s)),
            ms(Some(phases.optimizer_s)),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
        ])
    }

    /// What the JSON line reports: `null` when nothing was measured.
    fn to_json(&self) -> Value {
        let Some(report) = &self.report else {
            return Value::Null;
        };
        let results: Vec<Value> = self
            .results
            .iter()
            .map(|(ranks, phases)| {
                let ranks = u64::from(*ranks);
                json!({
                    "ranks": ranks,
                    "samples_per_s": self.samples_per_s(ranks),
                    "efficiency": self.efficiency(ranks),
                    "step_s": phases.step_s,
                    "data_s": phases.data_s,
                    "forward_s": phases.forward_s,
                    "backward_s": phases.backward_s,
                    "optimizer_s": phases.optimizer_s,
                    "last_loss": phases.last_loss,
                })
            })
            .collect();
        json!({
            "torch_version": report.torch_version,
            "blas": report.blas,
            "backend": "gloo",
            "threads_per_rank": report.threads_per_rank,
            "results": results,
        })
    }
}

/// Sequences per step of the transformer `--device gpu` measures.
const TRANSFORMER_BATCH: u32 = 64;

/// The transformer `--device gpu` measures (about 13 M parameters, 8192 tokens per step), on
/// one rank: AdamW, `steps` timed steps after the warm-up ones, no evaluation or checkpoint.
fn transformer_config(steps: u64) -> TrainConfig {
    let mut config = benchmark_config(1, steps);
    config.model = ModelSpec {
        kind: ModelKind::Transformer,
        layers: Some(4),
        heads: Some(8),
        width: Some(512),
        context: Some(128),
        ..ModelSpec::default()
    };
    config.data = DataSpec {
        dataset: DatasetKind::Shakespeare,
        ..DataSpec::default()
    };
    config.optimizer = OptimizerSpec {
        kind: OptimizerKind::Adamw,
        lr: Some(3e-4),
        ..OptimizerSpec::default()
    };
    config.schedule.batch_size = TRANSFORMER_BATCH;
    config
}

/// Sets where and in which format `config` computes.
fn on(mut config: TrainConfig, device: ComputeDevice, precision: Precision) -> TrainConfig {
    config.device = device;
    config.train = TrainSpec {
        precision,
        ..TrainSpec::default()
    };
    config
}

/// Every step's wall time and phases, as the training loop reports them.
#[derive(Debug, Default)]
struct StepTimes(Vec<(Duration, PhaseTimings)>);

impl MetricsSink for StepTimes {
    fn on_step(&mut self, metrics: &StepMetrics) {
        let step = metrics.global_batch as f64 / metrics.samples_per_second.max(1e-9);
        self.0
            .push((Duration::from_secs_f64(step), metrics.timings));
    }

    fn on_evaluation(&mut self, _metrics: &EvaluationMetrics) {}
}

/// Medians over the timed steps of one run, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Medians {
    /// A whole step.
    step: f64,
    /// Forward and backward passes, the gradients' copy to the host included.
    passes: f64,
    /// The host-side update and the refresh of the device's working copy.
    optimizer: f64,
}

impl StepTimes {
    /// Medians of the steps after the warm-up ones.
    fn medians(&self) -> Result<Medians> {
        let timed = self.0.get(WARMUP_STEPS as usize..).unwrap_or_default();
        if timed.is_empty() {
            bail!("the run reported no timed step");
        }
        let median = |pick: fn(&(Duration, PhaseTimings)) -> Duration| {
            let mut values: Vec<f64> = timed.iter().map(|step| pick(step).as_secs_f64()).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        Ok(Medians {
            step: median(|(step, _)| *step),
            passes: median(|(_, phases)| phases.forward + phases.backward),
            optimizer: median(|(_, phases)| phases.optimizer),
        })
    }
}

/// Trains the benchmark MLP on `data` as a world of one on `device` in `precision`.
fn measure_mlp(
    config: TrainConfig,
    device: ComputeDevice,
    precision: Precision,
    data: &TrainTestSplits,
) -> Result<Medians> {
    let config = on(config, device, precision);
    let store = InMemoryStore::new();
    let mut ring = TcpRing::connect(&store, "bench-train", 0, 1, &TcpRingConfig::default())?;
    let mut times = StepTimes::default();
    train(&config, data, &mut ring, &mut times)?;
    times.medians()
}

/// Trains the transformer of `config` on `corpus` as a mesh of one rank on `device` in
/// `precision`.
fn measure_transformer(
    config: TrainConfig,
    device: ComputeDevice,
    precision: Precision,
    corpus: &TextCorpus,
) -> Result<Medians> {
    let config = on(config, device, precision);
    let store = InMemoryStore::new();
    let shape = MeshShape::of(&config.parallel);
    let mesh = connect_mesh(&store, 0, shape, &MeshLinks::loopback())?;
    let mut times = StepTimes::default();
    train_language_model(&config, corpus, mesh, &mut times)?;
    times.medians()
}

/// One measured row: the model, its format and its throughput in the unit users compare.
struct Row {
    /// `mlp` or `transformer`.
    model: &'static str,
    /// Format of the passes.
    precision: Precision,
    /// `samples_per_s` or `tokens_per_s`.
    unit: &'static str,
    /// Samples or tokens per second over the median step.
    per_second: f64,
    /// Where a step's time went.
    medians: Medians,
}

impl Row {
    /// The row as the benchmark's JSON line reports it.
    fn to_json(&self) -> Value {
        json!({
            "model": self.model,
            "precision": self.precision.name(),
            self.unit: self.per_second,
            "step_s": self.medians.step,
            "passes_s": self.medians.passes,
            "host_update_s": self.medians.optimizer,
        })
    }
}

/// Measures the MLP (on `images`) and the transformer (on `text`) in fp32 and bf16 on
/// `device`, with the given configs.
fn measure_on(
    device: ComputeDevice,
    (mlp, images): (&TrainConfig, &TrainTestSplits),
    (transformer, text): (&TrainConfig, &TextCorpus),
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for precision in [Precision::Fp32, Precision::Bf16] {
        eprintln!("MLP in {} on {device}...", precision.name());
        let medians = measure_mlp(mlp.clone(), device, precision, images)?;
        rows.push(Row {
            model: "mlp",
            precision,
            unit: "samples_per_s",
            per_second: f64::from(mlp.schedule.batch_size) / medians.step.max(f64::MIN_POSITIVE),
            medians,
        });
    }
    let tokens_per_step = f64::from(transformer.schedule.batch_size)
        * f64::from(transformer.model.transformer().context);
    for precision in [Precision::Fp32, Precision::Bf16] {
        eprintln!("transformer in {} on {device}...", precision.name());
        let medians = measure_transformer(transformer.clone(), device, precision, text)?;
        rows.push(Row {
            model: "transformer",
            precision,
            unit: "tokens_per_s",
            per_second: tokens_per_step / medians.step.max(f64::MIN_POSITIVE),
            medians,
        });
    }
    Ok(rows)
}

/// `cohort bench train --device gpu`: one rank in this process on CUDA device `gpu`.
pub fn run_on_gpu(world_sizes: Option<&[u32]>, steps: u64, gpu: usize) -> Result<ExitCode> {
    if let Some(sizes) = world_sizes.filter(|sizes| *sizes != [1]) {
        bail!("--ranks {sizes:?} with --device gpu, expected 1 (the gpu benchmark runs one rank)");
    }
    check_steps(steps)?;
    let device = ComputeDevice::Cuda { ordinal: gpu };
    // The typed reason a GPU cannot be used (a build without CUDA or candle's kernels, no
    // driver, no such device), before any data is read.
    device.open()?;
    let mlp = benchmark_config(1, steps);
    let images = cohort_trainer::data::load(&mlp.data).context("loading Fashion-MNIST")?;
    let transformer = transformer_config(steps);
    let text =
        cohort_trainer::text::load(&transformer.data).context("loading the Shakespeare text")?;
    let rows = measure_on(device, (&mlp, &images), (&transformer, &text))?;

    let device_name = match device {
        ComputeDevice::Cuda { ordinal } => cohort_collective::cuda::device_name(ordinal)?,
        ComputeDevice::Cpu => "cpu".to_owned(),
    };
    let shape = transformer.model.transformer();
    println!(
        "one rank on {device} ({device_name}): MLP 784-1024-1024-10, batch {GLOBAL_BATCH}, SGD; transformer {} \
         layers x width {} ({} heads), context {}, batch {TRANSFORMER_BATCH} sequences, AdamW; \
         f32 masters and optimizer on the host; medians over {steps} steps",
        shape.layers, shape.width, shape.heads, shape.context
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.model.to_owned(),
                row.precision.name().to_owned(),
                format!("{:.0}", row.per_second),
                row.unit.trim_end_matches("_per_s").to_owned(),
                format!("{:.2}", row.medians.step * 1e3),
                format!("{:.2}", row.medians.passes * 1e3),
                format!("{:.2}", row.medians.optimizer * 1e3),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::render::table(
            &[
                "MODEL",
                "PRECISION",
                "PER SECOND",
                "UNIT",
                "STEP(MS)",
                "PASSES(MS)",
                "HOST UPDATE(MS)",
            ],
            &table
        )
    );
    let results: Vec<Value> = rows.iter().map(Row::to_json).collect();
    println!(
        "{}",
        json!({
            "bench": "train",
            "device": device.to_string(),
            "device_name": device_name,
            "results": results,
        })
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_world_size_is_compared_with_pytorch_at_the_same_size() {
        let row = |ranks: u32, telemetry: &str, samples_per_s: f64| {
            json!({"ranks": ranks, "telemetry": telemetry, "samples_per_s": samples_per_s,
                   "step_s": 256.0 / samples_per_s})
        };
        let mut rows = vec![
            row(1, "off", 1000.0),
            row(1, "on", 900.0),
            row(2, "off", 1800.0),
            row(2, "on", 1600.0),
        ];
        let phases = |step_s: f64| PytorchPhases {
            rank: 0,
            step_s,
            data_s: 0.0,
            forward_s: 0.0,
            backward_s: 0.0,
            optimizer_s: 0.0,
            last_loss: 2.0,
        };
        // PyTorch: 512 samples/s with one rank, 640 with two; measured only at those sizes.
        let pytorch = PytorchMeasured {
            results: vec![(1, phases(0.5)), (2, phases(0.4))],
            ..PytorchMeasured::default()
        };
        let table = add_comparisons(&mut rows, &pytorch);
        let over: Vec<f64> = rows
            .iter()
            .map(|row| row["cohort_over_pytorch"].as_f64().unwrap())
            .collect();
        assert_eq!(
            over,
            [
                1000.0 / 512.0,
                900.0 / 512.0,
                1800.0 / 640.0,
                1600.0 / 640.0
            ]
        );
        assert_eq!(rows[3]["on_over_off"].as_f64(), Some(1600.0 / 1800.0));
        assert_eq!(rows[2]["efficiency"].as_f64(), Some(0.9));
        let order: Vec<(&str, &str, &str)> = table
            .iter()
            .map(|cells| (cells[0].as_str(), cells[1].as_str(), cells[2].as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("cohort", "1", "off"),
                ("cohort", "1", "on"),
                ("pytorch", "1", "-"),
                ("cohort", "2", "off"),
                ("cohort", "2", "on"),
                ("pytorch", "2", "-"),
            ]
        );
        // PyTorch's own scaling: 640 / (2 x 512).
        assert_eq!(table[5][3], "640");
        assert_eq!(table[5][4], "0.62");
        // Without a reference the ratio is absent, not zero.
        let mut rows = vec![row(1, "on", 1000.0)];
        let table = add_comparisons(&mut rows, &PytorchMeasured::default());
        assert_eq!(rows[0]["cohort_over_pytorch"], Value::Null);
        assert_eq!((table.len(), table[0][11].as_str()), (1, "-"));
    }

    #[test]
    fn without_a_usable_gpu_the_gpu_benchmark_fails_with_the_typed_reason() {
        // No machine has a device 4095, whatever the build.
        let error = run_on_gpu(None, 5, 4095).unwrap_err().to_string();
        assert!(error.starts_with("cuda device 4095: "), "{error}");
        let error = run_on_gpu(Some(&[2]), 5, 0).unwrap_err().to_string();
        assert!(error.contains("expected 1"), "{error}");
    }

    #[test]
    fn every_model_and_format_is_measured_in_its_unit() {
        // The GPU benchmark's code path, on the CPU with small models and synthetic data.
        let mut mlp = benchmark_config(1, 2);
        mlp.model.hidden = vec![16];
        mlp.schedule.batch_size = 32;
        let images = cohort_trainer::data::synthetic_splits(320, 10, 8, 4, 1).unwrap();
        let mut transformer = transformer_config(2);
        transformer.model = ModelSpec {
            kind: ModelKind::Transformer,
            layers: Some(1),
            heads: Some(2),
            width: Some(8),
            context: Some(8),
            ..ModelSpec::default()
        };
        transformer.schedule.batch_size = 4;
        let text = TextCorpus::from_text(
            "to be or not to be, that is the question. "
                .repeat(40)
                .as_bytes(),
        )
        .unwrap();
        let rows = measure_on(ComputeDevice::Cpu, (&mlp, &images), (&transformer, &text)).unwrap();
        let described: Vec<_> = rows
            .iter()
            .map(|row| (row.model, row.precision, row.unit))
            .collect();
        assert_eq!(
            described,
            [
                ("mlp", Precision::Fp32, "samples_per_s"),
                ("mlp", Precision::Bf16, "samples_per_s"),
                ("transformer", Precision::Fp32, "tokens_per_s"),
                ("transformer", Precision::Bf16, "tokens_per_s"),
            ]
        );
        for row in &rows {
            assert!(row.per_second > 0.0 && row.per_second.is_finite());
            assert!(row.medians.step >= row.medians.passes);
            let reported = row.to_json();
            assert_eq!(reported[row.unit].as_f64(), Some(row.per_second));
            assert_eq!(reported["precision"], row.precision.name());
        }
    }
}
