//! `cohort bench mesh`: tokens per second of the transformer under meshes of the same number
//! of ranks, and each pipeline's bubble (the share of a stage's schedule time spent waiting
//! for a neighbour) against the ideal `(P - 1) / (M + P - 1)`. The ranks are threads of this
//! process joined by real TCP rings and links through an in-memory rendezvous store, so the
//! figures isolate the parallel layout from process start-up.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_collective::InMemoryStore;
use cohort_jobspec::train::{DatasetKind, ModelKind, ModelSpec, PipelineSchedule};
use cohort_trainer::language_model::train_language_model;
use cohort_trainer::mesh::{MeshLinks, MeshShape, connect_mesh};
use cohort_trainer::text::TextCorpus;
use cohort_trainer::{EvaluationMetrics, MetricsSink, StepMetrics, TrainConfig};
use serde_json::json;

/// Global batch of every mesh, in sequences.
const BATCH: u32 = 32;
/// Micro-batches per step.
const MICRO_BATCHES: u32 = 8;
/// Steps run before timing.
const WARM_UP_STEPS: u64 = 2;

/// Records how long each step took.
#[derive(Default)]
struct StepTimes(Vec<Duration>);

impl MetricsSink for StepTimes {
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.0.push(Duration::from_secs_f64(
            metrics.global_batch as f64 / metrics.samples_per_second.max(1e-9),
        ));
    }

    fn on_evaluation(&mut self, _metrics: &EvaluationMetrics) {}
}

/// One mesh to measure.
struct Layout {
    data: u32,
    pipeline: u32,
    tensor: u32,
    schedule: PipelineSchedule,
}

/// `cohort bench mesh`.
pub fn run(ranks: u32, steps: u64) -> Result<ExitCode> {
    if ranks != 4 {
        bail!("--ranks {ranks}: the mesh benchmark compares meshes of 4 ranks");
    }
    if !(1..=1000).contains(&steps) {
        bail!("--steps {steps}: expected 1 to 1000");
    }
    let data_spec = cohort_jobspec::train::DataSpec {
        dataset: DatasetKind::Shakespeare,
        ..Default::default()
    };
    let corpus = cohort_trainer::text::load(&data_spec).context("loading the Shakespeare text")?;
    let layouts = [
        (4, 1, 1, PipelineSchedule::OneForwardOneBackward),
        (1, 4, 1, PipelineSchedule::Gpipe),
        (1, 4, 1, PipelineSchedule::OneForwardOneBackward),
        (1, 1, 4, PipelineSchedule::OneForwardOneBackward),
        (2, 2, 1, PipelineSchedule::OneForwardOneBackward),
    ]
    .map(|(data, pipeline, tensor, schedule)| Layout {
        data,
        pipeline,
        tensor,
        schedule,
    });
    let mut rows = Vec::new();
    let mut table = Vec::new();
    for layout in &layouts {
        let config = config(layout, steps);
        let shape = MeshShape::of(&config.parallel);
        eprintln!("{} {}...", shape.name(), layout.schedule.name());
        let measured = measure(&config, &corpus)?;
        let pipeline = f64::from(layout.pipeline);
        let micro = f64::from(MICRO_BATCHES);
        let ideal = (pipeline - 1.0) / (micro + pipeline - 1.0);
        table.push(vec![
            shape.name(),
            layout.schedule.name().to_owned(),
            format!("{:.0}", measured.tokens_per_second),
            format!("{:.3}", measured.bubble_fraction),
            format!("{ideal:.3}"),
            measured.max_live_activations.to_string(),
        ]);
        rows.push(json!({
            "mesh": shape.name(),
            "schedule": layout.schedule.name(),
            "tokens_per_s": measured.tokens_per_second,
            "bubble_fraction": measured.bubble_fraction,
            "ideal_bubble_fraction": ideal,
            "max_live_activations": measured.max_live_activations,
        }));
    }
    let shape = config(&layouts[0], steps).model.transformer();
    println!(
        "transformer {} layers x width {} ({} heads), context {}, batch {BATCH} sequences in \
         {MICRO_BATCHES} micro-batches, {steps} timed steps; ranks are threads of one process",
        shape.layers, shape.width, shape.heads, shape.context
    );
    print!(
        "{}",
        crate::render::table(
            &[
                "MESH",
                "SCHEDULE",
                "TOKENS/S",
                "BUBBLE",
                "IDEAL BUBBLE",
                "MAX LIVE ACTIVATIONS"
            ],
            &table
        )
    );
    println!(
        "{}",
        json!({
            "bench": "mesh",
            "ranks": ranks,
            "batch_sequences": BATCH,
            "micro_batches": MICRO_BATCHES,
            "context": shape.context,
            "results": rows,
        })
    );
    Ok(ExitCode::SUCCESS)
}

fn config(layout: &Layout, steps: u64) -> TrainConfig {
    let spec =
        cohort_jobspec::parse("version = 1\nkind = \"train\"\n").expect("a minimal spec parses");
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.model = ModelSpec {
        kind: ModelKind::Transformer,
        layers: Some(4),
        heads: Some(4),
        width: Some(128),
        context: Some(64),
        ..ModelSpec::default()
    };
    config.data.dataset = DatasetKind::Shakespeare;
    config.schedule.batch_size = BATCH;
    config.schedule.max_steps = Some(WARM_UP_STEPS + steps);
    config.parallel.data = layout.data;
    config.parallel.pipeline = layout.pipeline;
    config.parallel.tensor = layout.tensor;
    config.parallel.micro_batches = Some(MICRO_BATCHES);
    config.parallel.pipeline_schedule = layout.schedule;
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

/// What one mesh achieved.
struct Measured {
    tokens_per_second: f64,
    bubble_fraction: f64,
    max_live_activations: usize,
}

fn measure(config: &TrainConfig, corpus: &TextCorpus) -> Result<Measured> {
    let shape = MeshShape::of(&config.parallel);
    let store = InMemoryStore::new();
    let results: Vec<Result<(StepTimes, f64, usize)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shape.world_size())
            .map(|rank| {
                let store = &store;
                scope.spawn(move || -> Result<(StepTimes, f64, usize)> {
                    let mesh = connect_mesh(store, rank, shape, &MeshLinks::loopback())?;
                    let mut times = StepTimes::default();
                    let outcome = train_language_model(config, corpus, mesh, &mut times)?;
                    let pipeline = outcome.pipeline;
                    let waiting =
                        pipeline.waiting.as_secs_f64() / pipeline.total.as_secs_f64().max(1e-9);
                    Ok((times, waiting, pipeline.max_live_activations))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| bail!("a rank thread panicked"))
            })
            .collect()
    });
    let results = results.into_iter().collect::<Result<Vec<_>>>()?;
    let timed: Duration = results[0].0.0.iter().skip(WARM_UP_STEPS as usize).sum();
    let steps = results[0].0.0.len().saturating_sub(WARM_UP_STEPS as usize);
    let tokens = steps as f64 * f64::from(BATCH) * f64::from(config.model.transformer().context);
    let waiting: f64 =
        results.iter().map(|(_, waiting, _)| waiting).sum::<f64>() / results.len() as f64;
    Ok(Measured {
        tokens_per_second: tokens / timed.as_secs_f64().max(1e-9),
        bubble_fraction: if shape.pipeline > 1 { waiting } else { 0.0 },
        max_live_activations: results.iter().map(|(_, _, live)| *live).max().unwrap_or(0),
    })
}
