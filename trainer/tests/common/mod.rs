//! Helpers the trainer's integration tests share: multi-rank runs on loopback TCP rings (image
//! models) and meshes (the transformer), a synthetic text, parameter comparisons, and the one
//! check GPU tests make before running.

#![allow(dead_code)]

use cohort_collective::{GroupConfig, InMemoryStore, connect_group};
use cohort_jobspec::train::{
    DatasetKind, LearningRateDecay, ModelKind, ModelSpec, OptimizerKind, OptimizerSpec,
};
use cohort_trainer::data::TrainTestSplits;
use cohort_trainer::language_model::{LanguageModelOutcome, train_language_model};
use cohort_trainer::mesh::{MeshLinks, MeshShape, connect_mesh, host_transport};
use cohort_trainer::metrics::DiscardMetrics;
use cohort_trainer::models::Model;
use cohort_trainer::text::TextCorpus;
use cohort_trainer::{ComputeDevice, MetricsSink, TrainConfig, TrainOutcome, TrainerError, train};

/// Returns `model`'s parameters, flat.
pub fn flat(model: &Model) -> Vec<f32> {
    let parameters = model.parameters();
    let mut values = vec![0.0; parameters.element_count()];
    parameters.read_values(&mut values).unwrap();
    values
}

/// Trains `config` on `parallel.data` ranks (threads joined by a TCP ring) and returns every
/// rank's final parameters, flat, after checking that each ran `expected_steps` steps.
pub fn train_on_ring(
    config: &TrainConfig,
    data: &TrainTestSplits,
    expected_steps: u64,
) -> Vec<Vec<f32>> {
    let configs = vec![config.clone(); config.parallel.data as usize];
    train_ranks(&configs, data, expected_steps)
}

/// Trains `configs[r]` as rank `r` of a TCP ring of `configs.len()` threads (the configs may
/// differ in what each rank decides alone, such as its device) and returns every rank's final
/// parameters, flat, after checking that each ran `expected_steps` steps.
pub fn train_ranks(
    configs: &[TrainConfig],
    data: &TrainTestSplits,
    expected_steps: u64,
) -> Vec<Vec<f32>> {
    train_ranks_recording::<DiscardMetrics>(configs, data)
        .into_iter()
        .map(|(outcome, _)| {
            assert_eq!(outcome.steps, expected_steps);
            flat(&outcome.model)
        })
        .collect()
}

/// Trains `config` on `parallel.data` ranks (threads joined by a TCP ring), each reporting to
/// its own `S`; returns every rank's outcome and sink.
pub fn train_on_ring_recording<S: MetricsSink + Default + Send>(
    config: &TrainConfig,
    data: &TrainTestSplits,
) -> Vec<(TrainOutcome, S)> {
    let configs = vec![config.clone(); config.parallel.data as usize];
    train_ranks_recording(&configs, data)
}

/// Like [`try_train_ranks`], failing the test if any rank fails.
pub fn train_ranks_recording<S: MetricsSink + Default + Send>(
    configs: &[TrainConfig],
    data: &TrainTestSplits,
) -> Vec<(TrainOutcome, S)> {
    try_train_ranks(configs, data)
        .into_iter()
        .enumerate()
        .map(|(rank, result)| result.unwrap_or_else(|error| panic!("rank {rank}: {error}")))
        .collect()
}

/// Trains `configs[r]` as rank `r` of a TCP ring of `configs.len()` threads, each reporting to
/// its own `S`; returns what every rank's run returned.
pub fn try_train_ranks<S: MetricsSink + Default + Send>(
    configs: &[TrainConfig],
    data: &TrainTestSplits,
) -> Vec<Result<(TrainOutcome, S), TrainerError>> {
    let world_size = configs.len();
    let store = InMemoryStore::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = configs
            .iter()
            .enumerate()
            .map(|(rank, config)| {
                let store = &store;
                scope.spawn(move || {
                    // One node: the ranks share memory, as a job's ranks on one node do.
                    let group_config = GroupConfig {
                        transport: host_transport(config.parallel.transport),
                        ..GroupConfig::default()
                    };
                    let mut group =
                        connect_group(store, "test-group", rank, world_size, &group_config)
                            .unwrap();
                    let mut sink = S::default();
                    train(config, data, &mut *group, &mut sink).map(|outcome| (outcome, sink))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A small transformer's config: `layers` blocks `width` wide (4 heads), `context` characters,
/// seed 7, AdamW at lr 0.01 with 2 warm-up steps and cosine decay, a global batch of 16, for
/// `steps` steps on the Shakespeare data set, without a final checkpoint.
pub fn transformer_config(layers: u32, width: u32, context: u32, steps: u64) -> TrainConfig {
    let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap();
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.model = ModelSpec {
        kind: ModelKind::Transformer,
        layers: Some(layers),
        heads: Some(4),
        width: Some(width),
        context: Some(context),
        seed: 7,
        ..ModelSpec::default()
    };
    config.data.dataset = DatasetKind::Shakespeare;
    config.optimizer = OptimizerSpec {
        kind: OptimizerKind::Adamw,
        lr: Some(0.01),
        ..OptimizerSpec::default()
    };
    config.schedule.batch_size = 16;
    config.schedule.max_steps = Some(steps);
    config.schedule.warmup_steps = 2;
    config.schedule.lr_decay = LearningRateDecay::Cosine;
    config.final_checkpoint = false;
    config
}

/// A text with structure to learn: words drawn from a small lexicon by a fixed generator.
pub fn synthetic_corpus() -> TextCorpus {
    let words = [
        "to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut text = String::new();
    while text.len() < 40_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push_str(words[(state % words.len() as u64) as usize]);
        text.push(if state.is_multiple_of(11) { '\n' } else { ' ' });
    }
    TextCorpus::from_text(text.as_bytes()).unwrap()
}

/// Runs every rank of `config`'s mesh on its own thread (joined by real TCP rings and links);
/// returns the outcomes by rank.
pub fn train_mesh(config: &TrainConfig, corpus: &TextCorpus) -> Vec<LanguageModelOutcome> {
    train_mesh_recording::<DiscardMetrics>(config, corpus)
        .into_iter()
        .map(|(outcome, _)| outcome)
        .collect()
}

/// Like [`train_mesh`], each rank reporting to its own `S`.
pub fn train_mesh_recording<S: MetricsSink + Default + Send>(
    config: &TrainConfig,
    corpus: &TextCorpus,
) -> Vec<(LanguageModelOutcome, S)> {
    let shape = MeshShape::of(&config.parallel);
    let store = InMemoryStore::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shape.world_size())
            .map(|rank| {
                let store = &store;
                scope.spawn(move || {
                    let mesh = connect_mesh(store, rank, shape, &MeshLinks::loopback()).unwrap();
                    let mut sink = S::default();
                    let outcome = train_language_model(config, corpus, mesh, &mut sink)
                        .unwrap_or_else(|error| panic!("rank {rank}: {error}"));
                    (outcome, sink)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Returns the GPU a test should run on (CUDA device 0), or `None` after printing why GPU tests
/// are skipped: a build without CUDA or without candle's kernels, no driver, or no device. A GPU
/// that is present but cannot be opened fails the test rather than skipping it, so a broken GPU
/// machine never passes silently; `COHORT_REQUIRE_GPU=1` turns every skip into a failure too
/// (for runs on a machine that is meant to have a GPU).
pub fn usable_gpu() -> Option<ComputeDevice> {
    let gpu = ComputeDevice::Cuda { ordinal: 0 };
    let reason = match gpu.open() {
        Ok(_) => return Some(gpu),
        Err(reason @ (TrainerError::NoCuda { .. } | TrainerError::NoCandleCudaKernels { .. })) => {
            reason.to_string()
        }
        Err(reason) => match cohort_collective::cuda::device_count() {
            Ok(0) => format!("no CUDA device ({reason})"),
            _ => panic!("a CUDA device is present but unusable: {reason}"),
        },
    };
    assert!(
        std::env::var("COHORT_REQUIRE_GPU").as_deref() != Ok("1"),
        "COHORT_REQUIRE_GPU=1 but no usable GPU: {reason}"
    );
    eprintln!("skipping: {reason}");
    None
}

/// Largest magnitude in `values`.
pub fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |max, v| max.max(v.abs()))
}

/// Largest element-wise difference of two equally long vectors.
pub fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |max, (x, y)| max.max((x - y).abs()))
}
