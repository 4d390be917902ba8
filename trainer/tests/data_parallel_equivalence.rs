//! Acceptance test of data parallelism: N ranks sharing a global batch must follow exactly the
//! trajectory of one rank training on that whole batch.
//!
//! The reference is an independent single-process run (world size 1, no collective at all);
//! the distributed runs use real TCP rings on loopback with each rank on its own thread. The
//! data are synthetic (the property is about arithmetic, not about Fashion-MNIST) so the test
//! runs anywhere in seconds.

mod common;

use cohort_jobspec::train::{
    LearningRateDecay, ModelKind, ModelSpec, OptimizerKind, OptimizerSpec,
};
use cohort_trainer::TrainConfig;
use cohort_trainer::data::{TrainTestSplits, synthetic_splits};
use cohort_trainer::data_parallel::GradientBuckets;

/// Largest difference allowed, relative to the largest parameter magnitude.
const RELATIVE_TOLERANCE: f32 = 1e-5;
/// Optimizer steps of every run.
const STEPS: u64 = 20;
/// Global batch of every run: 4 x 64, and not a multiple of 3.
const GLOBAL_BATCH: u32 = 256;
/// Gradient bucket size of every run.
const BUCKET_BYTES: u64 = cohort_jobspec::train::MIN_GRADIENT_BUCKET_BYTES;

fn data() -> TrainTestSplits {
    synthetic_splits(8 * 256, 100, 28, 10, 11).unwrap()
}

fn config(world_size: u32, model: ModelSpec, data_seed: u64) -> TrainConfig {
    let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap();
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.model = model;
    config.data.seed = data_seed;
    config.optimizer = OptimizerSpec {
        kind: OptimizerKind::Sgd,
        lr: Some(0.05),
        momentum: Some(0.9),
        weight_decay: Some(1e-4),
        ..OptimizerSpec::default()
    };
    config.schedule.batch_size = GLOBAL_BATCH;
    // 8 steps per epoch: 20 steps cross two epoch boundaries and their reshuffles.
    config.schedule.epochs = 3;
    config.schedule.max_steps = Some(STEPS);
    config.schedule.lr_decay = LearningRateDecay::Constant;
    config.parallel.data = world_size;
    // The smallest buckets the spec allows, so that several all-reduce calls cover the
    // gradient and the overlapped exchange has something to overlap.
    config.parallel.gradient_bucket_bytes = BUCKET_BYTES;
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

fn initial_parameters(config: &TrainConfig, data: &TrainTestSplits) -> Vec<f32> {
    let model = cohort_trainer::models::Model::new(
        &config.model,
        data.train.image_shape(),
        data.train.classes(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let buckets = GradientBuckets::new(model.parameters(), BUCKET_BYTES);
    assert!(buckets.buckets().len() > 2, "{:?}", buckets.buckets());
    let mut flat = vec![0.0; model.parameters().element_count()];
    model.parameters().read_values(&mut flat).unwrap();
    flat
}

/// Checks that `world_size` ranks end where one rank does, and that the comparison is sharp
/// enough to notice a different trajectory.
fn assert_equivalent(world_size: u32, model: ModelSpec, overlap_communication: bool) {
    let data = data();
    let single = config(1, model.clone(), 5);
    let reference = common::train_on_ring(&single, &data, STEPS).pop().unwrap();
    let scale = common::max_abs(&reference);
    let tolerance = RELATIVE_TOLERANCE * scale;

    // The runs move far beyond the tolerance: an error in any step would show.
    let initial = initial_parameters(&single, &data);
    let moved = common::max_difference(&initial, &reference);
    assert!(
        moved > 1000.0 * tolerance,
        "moved {moved}, tolerance {tolerance}"
    );
    // A different data order (another shuffle seed) ends far outside the tolerance too.
    let other_order = common::train_on_ring(&config(1, model.clone(), 6), &data, STEPS)
        .pop()
        .unwrap();
    assert!(common::max_difference(&other_order, &reference) > 100.0 * tolerance);

    let mut distributed_config = config(world_size, model, 5);
    distributed_config.overlap_communication = overlap_communication;
    let distributed = common::train_on_ring(&distributed_config, &data, STEPS);
    for (rank, parameters) in distributed.iter().enumerate() {
        let difference = common::max_difference(parameters, &reference);
        assert!(
            difference <= tolerance,
            "rank {rank} of {world_size}: max |difference| {difference:e} > {tolerance:e} \
             (parameter scale {scale})"
        );
        // All replicas are bit-identical: they apply the same update to the same values.
        assert_eq!(parameters, &distributed[0]);
    }
    eprintln!(
        "{world_size} ranks (overlap {overlap_communication}) vs 1: max |difference| {:e}, \
         tolerance {tolerance:e}",
        common::max_difference(&distributed[0], &reference)
    );
}

fn mlp() -> ModelSpec {
    ModelSpec {
        kind: ModelKind::Mlp,
        hidden: vec![64, 32],
        seed: 3,
        ..ModelSpec::default()
    }
}

#[test]
fn four_ranks_of_64_match_one_rank_of_256() {
    assert_equivalent(4, mlp(), true);
}

#[test]
fn four_ranks_exchanging_after_backward_match_one_rank() {
    assert_equivalent(4, mlp(), false);
}

#[test]
fn three_ranks_with_uneven_shares_match_one_rank() {
    // 256 = 86 + 85 + 85: the first rank's gradient weighs 86/256, the others 85/256.
    assert_equivalent(3, mlp(), true);
}

#[test]
fn cnn_on_two_ranks_matches_one_rank() {
    let cnn = ModelSpec {
        kind: ModelKind::Cnn,
        hidden: vec![16],
        channels: Some(vec![4, 8]),
        seed: 3,
        ..ModelSpec::default()
    };
    assert_equivalent(2, cnn, true);
}
