//! Mixed precision: fp16 overflow on one rank makes every rank skip the step; bf16 and fp16
//! training of the Fashion-MNIST MLP ends within half a point of fp32.

mod common;

use cohort_collective::InMemoryStore;
use cohort_jobspec::precision::{Precision, TrainSpec};
use cohort_jobspec::train::{DataSpec, LearningRateDecay, OptimizerKind};
use cohort_trainer::data::{TrainTestSplits, synthetic_splits};
use cohort_trainer::{EvaluationMetrics, MetricsSink, StepMetrics, TrainConfig};

/// Keeps every step's metrics.
#[derive(Default)]
struct Steps(Vec<StepMetrics>);

impl MetricsSink for Steps {
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.0.push(metrics.clone());
    }
    fn on_evaluation(&mut self, _metrics: &EvaluationMetrics) {}
}

fn config(world_size: u32, precision: Precision, steps: u64) -> TrainConfig {
    let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap();
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.model.hidden = vec![32];
    config.optimizer.kind = OptimizerKind::Adamw;
    config.optimizer.lr = Some(0.01);
    config.schedule.batch_size = 64;
    config.schedule.max_steps = Some(steps);
    config.parallel.data = world_size;
    config.train = TrainSpec {
        precision,
        ..TrainSpec::default()
    };
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

/// Trains on `parallel.data` ranks; returns every rank's parameters and step metrics.
fn run(config: &TrainConfig, data: &TrainTestSplits) -> Vec<(Vec<f32>, Vec<StepMetrics>)> {
    common::train_on_ring_recording::<Steps>(config, data)
        .into_iter()
        .map(|(outcome, steps)| (common::flat(&outcome.model), steps.0))
        .collect()
}

#[test]
fn an_overflow_on_one_rank_of_four_skips_the_step_on_every_rank() {
    let data = synthetic_splits(16 * 64, 10, 28, 10, 5).unwrap();
    let one_step = run(&config(4, Precision::Fp16, 1), &data);
    let mut poisoned = config(4, Precision::Fp16, 2);
    // Rank 2's gradients of the second step overflow.
    poisoned.inject_overflow = Some((2, 1));
    let two_steps = run(&poisoned, &data);
    for (rank, ((after_one, _), (after_two, steps))) in one_step.iter().zip(&two_steps).enumerate()
    {
        assert_eq!(
            after_one, after_two,
            "rank {rank} changed its parameters on a skipped step"
        );
        assert_eq!(steps[0].loss_scale, 65_536.0, "rank {rank}");
        assert_eq!(steps[0].skipped_steps, 0, "rank {rank}");
        assert_eq!(steps[1].skipped_steps, 1, "rank {rank} did not skip");
        assert_eq!(
            steps[1].loss_scale, 32_768.0,
            "rank {rank}: the scale halves"
        );
        assert_eq!(steps[1].gradient_bytes, 0, "rank {rank}: nothing exchanged");
        assert!(steps[0].gradient_bytes > 0);
    }
    // The first step did train (the comparison above is not between two untouched models).
    let untouched = run(&config(4, Precision::Fp16, 0), &data);
    assert_ne!(untouched[0].0, one_step[0].0);
    // And a third, clean step trains again with the halved scale.
    let mut three = poisoned.clone();
    three.schedule.max_steps = Some(3);
    let three_steps = run(&three, &data);
    assert_ne!(three_steps[0].0, two_steps[0].0);
    assert_eq!(three_steps[0].1[2].loss_scale, 32_768.0);
}

#[test]
fn half_precision_gradients_move_half_the_bytes_and_train_alike() {
    let data = synthetic_splits(16 * 64, 10, 28, 10, 5).unwrap();
    let full = run(&config(2, Precision::Fp32, 8), &data);
    for precision in [Precision::Bf16, Precision::Fp16] {
        let half = run(&config(2, precision, 8), &data);
        assert_eq!(half[0].1[0].gradient_bytes * 2, full[0].1[0].gradient_bytes);
        // Replicas agree exactly, and the half-precision run trains like fp32 (fp16 may skip
        // its first steps while the loss scale backs off from 2^16).
        assert_eq!(half[0].0, half[1].0, "{precision:?}");
        let (half_loss, full_loss) = (half[0].1[7].loss, full[0].1[7].loss);
        let first_loss = full[0].1[0].loss;
        let skipped = half[0].1[7].skipped_steps;
        eprintln!(
            "{precision:?}: loss {first_loss} -> {half_loss} ({skipped} steps skipped; fp32 -> {full_loss})"
        );
        assert!(
            full_loss < 0.1 * first_loss,
            "fp32 did not train: {first_loss} -> {full_loss}"
        );
        assert!(
            half_loss < 0.1 * first_loss,
            "{precision:?} did not train: {half_loss}"
        );
        if precision == Precision::Bf16 {
            assert_eq!(skipped, 0, "bf16 has fp32's range");
        }
    }
}

/// Fashion-MNIST through 2 data-parallel ranks, 1 epoch, in each precision.
#[test]
fn bf16_and_fp16_reach_fp32_accuracy_within_half_a_point() {
    let data = match cohort_trainer::data::load(&DataSpec::default()) {
        Ok(data) => data,
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: Fashion-MNIST not found ({error})");
            return;
        }
        Err(error) => panic!("CI needs Fashion-MNIST: {error}"),
    };
    let accuracy = |precision: Precision| -> f32 {
        let mut config = config(2, precision, u64::MAX);
        config.model.hidden = vec![512, 256];
        config.optimizer.lr = Some(0.002);
        config.schedule.batch_size = 256;
        config.schedule.max_steps = None;
        config.schedule.epochs = 1;
        config.schedule.warmup_steps = 50;
        config.schedule.lr_decay = LearningRateDecay::Cosine;
        config.evaluate = true;
        let outcomes = common::train_on_ring_recording::<Steps>(&config, &data);
        outcomes[0].0.final_evaluation.as_ref().unwrap().accuracy
    };
    let fp32 = accuracy(Precision::Fp32);
    for precision in [Precision::Bf16, Precision::Fp16] {
        let half = accuracy(precision);
        eprintln!(
            "1 epoch, 2 ranks: fp32 {:.2}%, {precision:?} {:.2}%",
            fp32 * 100.0,
            half * 100.0
        );
        assert!(
            (half - fp32).abs() <= 0.005,
            "{precision:?} {half} vs fp32 {fp32}"
        );
    }
}

/// The transformer on Shakespeare, on a 1x2x1 pipeline mesh, 120 steps in each precision.
#[test]
fn the_transformer_in_bf16_and_fp16_ends_within_five_hundredths_of_a_nat_of_fp32() {
    use cohort_jobspec::train::{DatasetKind, ModelKind, ModelSpec};
    use cohort_trainer::language_model::train_language_model;
    use cohort_trainer::mesh::{MeshLinks, MeshShape, connect_mesh};

    let data_spec = DataSpec {
        dataset: DatasetKind::Shakespeare,
        ..DataSpec::default()
    };
    let corpus = match cohort_trainer::text::load(&data_spec) {
        Ok(corpus) => corpus,
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: the Shakespeare text was not found ({error})");
            return;
        }
        Err(error) => panic!("CI needs the Shakespeare text: {error}"),
    };
    let validation_loss = |precision: Precision| -> (f32, u64) {
        let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap();
        let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
        config.model = ModelSpec {
            kind: ModelKind::Transformer,
            layers: Some(2),
            heads: Some(4),
            width: Some(64),
            context: Some(32),
            ..ModelSpec::default()
        };
        config.data = data_spec.clone();
        config.optimizer.kind = OptimizerKind::Adamw;
        config.optimizer.lr = Some(0.005);
        config.schedule.batch_size = 16;
        config.schedule.max_steps = Some(120);
        config.schedule.warmup_steps = 10;
        config.parallel.pipeline = 2;
        config.parallel.micro_batches = Some(2);
        config.train = TrainSpec {
            precision,
            ..TrainSpec::default()
        };
        config.final_checkpoint = false;
        let shape = MeshShape::of(&config.parallel);
        let store = InMemoryStore::new();
        let outcomes: Vec<(f32, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..shape.world_size())
                .map(|rank| {
                    let (store, config, corpus) = (&store, &config, &corpus);
                    scope.spawn(move || {
                        let mesh =
                            connect_mesh(store, rank, shape, &MeshLinks::loopback()).unwrap();
                        let mut steps = Steps::default();
                        let outcome =
                            train_language_model(config, corpus, mesh, &mut steps).unwrap();
                        (
                            outcome.final_validation.unwrap().loss,
                            steps.0.last().unwrap().skipped_steps,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        outcomes[0]
    };
    let (fp32, _) = validation_loss(Precision::Fp32);
    for precision in [Precision::Bf16, Precision::Fp16] {
        let (half, skipped) = validation_loss(precision);
        eprintln!(
            "transformer 1x2x1, 120 steps: validation loss fp32 {fp32:.4}, {precision:?} {half:.4} ({skipped} steps skipped)"
        );
        assert!(
            (half - fp32).abs() <= 0.05,
            "{precision:?} {half} vs fp32 {fp32}"
        );
    }
}
