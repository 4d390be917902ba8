//! GPU ranks: the passes run on a CUDA device while the f32 masters, the gradient exchange and
//! the optimizer stay on the host. A GPU run must follow the CPU run of the same config (an
//! independent reference: candle's CPU kernels), alone and as one rank of a TCP ring whose
//! other ranks train on the CPU; the transformer must follow its CPU run in fp32 and train in
//! bf16 there.
//!
//! Every GPU test first opens CUDA device 0 through `common::usable_gpu` and, when it cannot be
//! used (a build without `candle-cuda`, no driver, no device), prints why and passes: they
//! build and pass in every feature set and test something only where a GPU is. The last test
//! needs no GPU: a rank whose device cannot be opened fails with the typed error.

mod common;

use cohort_jobspec::precision::{Precision, TrainSpec};
use cohort_jobspec::train::{LearningRateDecay, ModelSpec, OptimizerKind, OptimizerSpec};
use cohort_trainer::data::{TrainTestSplits, synthetic_splits};
use cohort_trainer::language_model::LanguageModelOutcome;
use cohort_trainer::metrics::DiscardMetrics;
use cohort_trainer::{
    ComputeDevice, EvaluationMetrics, MetricsSink, StepMetrics, TrainConfig, TrainerError,
};

/// Largest difference allowed between a GPU and a CPU run, relative to the largest parameter
/// magnitude (the kernels sum in other orders; nothing else differs).
const RELATIVE_TOLERANCE: f32 = 1e-4;
/// Optimizer steps of the image-model runs.
const STEPS: u64 = 8;
/// Global batch of the image-model runs: 3 x 32.
const GLOBAL_BATCH: u32 = 96;

fn data() -> TrainTestSplits {
    synthetic_splits(8 * 96, 50, 28, 10, 13).unwrap()
}

/// The MLP on `world_size` ranks with SGD and momentum, with the smallest gradient buckets (so
/// the overlapped exchange has buckets to overlap) and an evaluation at the end (on the device
/// of each rank).
fn mlp_config(world_size: u32) -> TrainConfig {
    let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap();
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.model = ModelSpec {
        hidden: vec![64, 32],
        seed: 3,
        ..ModelSpec::default()
    };
    config.optimizer = OptimizerSpec {
        kind: OptimizerKind::Sgd,
        lr: Some(0.05),
        momentum: Some(0.9),
        ..OptimizerSpec::default()
    };
    config.schedule.batch_size = GLOBAL_BATCH;
    config.schedule.max_steps = Some(STEPS);
    config.schedule.lr_decay = LearningRateDecay::Constant;
    config.parallel.data = world_size;
    config.parallel.gradient_bucket_bytes = cohort_jobspec::train::MIN_GRADIENT_BUCKET_BYTES;
    config.final_checkpoint = false;
    config
}

/// Returns the tolerance of comparisons with `reference`, after checking that training moved
/// the parameters far beyond it (so a wrong trajectory would show).
fn tolerance_against(reference: &[f32], config: &TrainConfig, data: &TrainTestSplits) -> f32 {
    let mut untrained = config.clone();
    untrained.schedule.max_steps = Some(0);
    untrained.evaluate = false;
    let initial = common::train_on_ring(&untrained, data, 0).pop().unwrap();
    let tolerance = RELATIVE_TOLERANCE * common::max_abs(reference);
    let moved = common::max_difference(&initial, reference);
    assert!(
        moved > 100.0 * tolerance,
        "moved {moved}, tolerance {tolerance}"
    );
    tolerance
}

#[test]
fn one_gpu_rank_follows_the_cpu_run() {
    let Some(gpu) = common::usable_gpu() else {
        return;
    };
    let data = data();
    let config = mlp_config(1);
    let reference = common::train_on_ring(&config, &data, STEPS).pop().unwrap();
    let tolerance = tolerance_against(&reference, &config, &data);
    let mut on_gpu = config.clone();
    on_gpu.device = gpu;
    let trained = common::train_on_ring(&on_gpu, &data, STEPS).pop().unwrap();
    let difference = common::max_difference(&trained, &reference);
    eprintln!("max |gpu - cpu| = {difference:e} (tolerance {tolerance:e})");
    assert!(difference <= tolerance, "{difference} > {tolerance}");
}

#[test]
fn a_gpu_rank_and_two_cpu_ranks_follow_the_all_cpu_run() {
    let Some(gpu) = common::usable_gpu() else {
        return;
    };
    let data = data();
    let config = mlp_config(3);
    let all_cpu = common::train_on_ring(&config, &data, STEPS);
    let tolerance = tolerance_against(&all_cpu[0], &config, &data);
    let mut configs = vec![config.clone(); 3];
    configs[0].device = gpu;
    let mixed = common::train_ranks(&configs, &data, STEPS);
    // Every rank applies the same all-reduced gradient to its host masters: the replicas
    // agree exactly, whatever device computed their share.
    assert_eq!(mixed[0], mixed[1], "the gpu rank drifted from its replicas");
    assert_eq!(mixed[1], mixed[2]);
    let difference = common::max_difference(&mixed[0], &all_cpu[0]);
    eprintln!("max |gpu+cpu+cpu - cpu+cpu+cpu| = {difference:e} (tolerance {tolerance:e})");
    assert!(difference <= tolerance, "{difference} > {tolerance}");
}

/// Mixed precision on the GPU runs bf16/fp16 kernels where the CPU run emulates them, so the
/// two differ by rounding, not by their trajectory: within 2 % of the largest parameter, while
/// training moves the parameters more than ten times that.
#[test]
fn the_mlp_trains_in_bf16_and_fp16_on_a_gpu_as_on_the_cpu() {
    let Some(gpu) = common::usable_gpu() else {
        return;
    };
    let data = data();
    for precision in [Precision::Bf16, Precision::Fp16] {
        let mut config = mlp_config(1);
        config.train = TrainSpec {
            precision,
            ..TrainSpec::default()
        };
        let reference = common::train_on_ring(&config, &data, STEPS).pop().unwrap();
        let mut untrained = config.clone();
        untrained.schedule.max_steps = Some(0);
        untrained.evaluate = false;
        let initial = common::train_on_ring(&untrained, &data, 0).pop().unwrap();
        let tolerance = 2e-2 * common::max_abs(&reference);
        let moved = common::max_difference(&initial, &reference);
        assert!(
            moved > 10.0 * tolerance,
            "moved {moved}, tolerance {tolerance}"
        );
        let mut on_gpu = config.clone();
        on_gpu.device = gpu;
        let trained = common::train_on_ring(&on_gpu, &data, STEPS).pop().unwrap();
        let difference = common::max_difference(&trained, &reference);
        eprintln!(
            "{}: max |gpu - cpu| = {difference:e} (tolerance {tolerance:e}, moved {moved:e})",
            precision.name()
        );
        assert!(difference <= tolerance, "{difference} > {tolerance}");
    }
}

/// The transformer on one rank, AdamW, on the synthetic text.
fn transformer_config(precision: Precision, steps: u64) -> TrainConfig {
    let mut config = common::transformer_config(2, 32, 16, steps);
    config.train = TrainSpec {
        precision,
        ..TrainSpec::default()
    };
    config
}

/// The final parameters of a one-rank transformer run, flat.
fn transformer_values(outcome: &LanguageModelOutcome) -> Vec<f32> {
    let parameters = outcome.model.parameters();
    let mut values = vec![0.0; parameters.element_count()];
    parameters.read_values(&mut values).unwrap();
    values
}

/// Keeps every step's loss.
#[derive(Default)]
struct Losses(Vec<f32>);

impl MetricsSink for Losses {
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.0.push(metrics.loss);
    }
    fn on_evaluation(&mut self, _metrics: &EvaluationMetrics) {}
}

#[test]
fn the_transformer_on_a_gpu_follows_the_cpu_run() {
    let Some(gpu) = common::usable_gpu() else {
        return;
    };
    let corpus = common::synthetic_corpus();
    let mut config = transformer_config(Precision::Fp32, 6);
    // SGD: the update is linear in the gradient, so the kernels' rounding differences stay as
    // small in the parameters as in the gradients (Adam would turn a near-zero gradient's noise
    // into a full step of either sign).
    config.optimizer = OptimizerSpec {
        kind: OptimizerKind::Sgd,
        lr: Some(0.5),
        momentum: Some(0.9),
        ..OptimizerSpec::default()
    };
    config.evaluate = false;
    let reference = transformer_values(&common::train_mesh(&config, &corpus)[0]);
    let mut untrained = config.clone();
    untrained.schedule.max_steps = Some(0);
    let initial = transformer_values(&common::train_mesh(&untrained, &corpus)[0]);
    let tolerance = RELATIVE_TOLERANCE * common::max_abs(&reference);
    let moved = common::max_difference(&initial, &reference);
    assert!(
        moved > 100.0 * tolerance,
        "moved {moved}, tolerance {tolerance}"
    );
    let mut on_gpu = config.clone();
    on_gpu.device = gpu;
    let trained = transformer_values(&common::train_mesh(&on_gpu, &corpus)[0]);
    let difference = common::max_difference(&trained, &reference);
    eprintln!("transformer: max |gpu - cpu| = {difference:e} (tolerance {tolerance:e})");
    assert!(difference <= tolerance, "{difference} > {tolerance}");
}

#[test]
fn the_transformer_trains_in_bf16_on_a_gpu() {
    let Some(gpu) = common::usable_gpu() else {
        return;
    };
    let corpus = common::synthetic_corpus();
    let steps = 30;
    let mut config = transformer_config(Precision::Bf16, steps);
    config.device = gpu;
    let (outcome, losses) = common::train_mesh_recording::<Losses>(&config, &corpus)
        .pop()
        .unwrap();
    let losses = losses.0;
    assert_eq!(losses.len(), steps as usize);
    assert!(losses.iter().all(|loss| loss.is_finite()), "{losses:?}");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(
        last < 0.8 * first,
        "bf16 on the gpu did not train: {losses:?}"
    );
    // The CPU's bf16 run of the same config, as the reference for where validation ends.
    let mut on_cpu = config.clone();
    on_cpu.device = ComputeDevice::Cpu;
    let reference = common::train_mesh(&on_cpu, &corpus).pop().unwrap();
    let (gpu_loss, cpu_loss) = (
        outcome.final_validation.unwrap().loss,
        reference.final_validation.unwrap().loss,
    );
    eprintln!("bf16, {steps} steps: validation loss gpu {gpu_loss:.4}, cpu {cpu_loss:.4}");
    assert!(
        (gpu_loss - cpu_loss).abs() <= 0.1,
        "gpu {gpu_loss} vs cpu {cpu_loss}"
    );
}

#[test]
fn a_rank_whose_gpu_cannot_be_opened_fails_with_the_typed_error_and_so_do_its_peers() {
    // No machine has a device 4095: this fails in every build, with or without a GPU.
    let mut configs = vec![mlp_config(2); 2];
    configs[0].device = ComputeDevice::Cuda { ordinal: 4095 };
    let results = common::try_train_ranks::<DiscardMetrics>(&configs, &data());
    let errors: Vec<TrainerError> = results
        .into_iter()
        .map(|result| match result {
            Ok(_) => panic!("a rank trained without its gpu"),
            Err(error) => error,
        })
        .collect();
    assert!(
        matches!(
            errors[0],
            TrainerError::NoCuda { ordinal: 4095, .. }
                | TrainerError::NoCandleCudaKernels { ordinal: 4095 }
                | TrainerError::CudaDevice { ordinal: 4095, .. }
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].to_string().starts_with("cuda device 4095: "),
        "{}",
        errors[0]
    );
    // Its peer waits for rank 0's parameters and learns that rank 0 is gone.
    assert_eq!(errors[1].failed_rank(), Some(0), "{}", errors[1]);
}
