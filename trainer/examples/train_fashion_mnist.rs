//! Trains on Fashion-MNIST in one process, with `--ranks N` threads joined by a loopback TCP ring,
//! and prints per-epoch accuracy, throughput and a final JSON line. Used to choose the demo's
//! hyper-parameters; the real entry point is `cohort`.
//!
//! ```text
//! cargo run --release -p cohort-trainer --example train_fashion_mnist -- \
//!     optimizer=adamw lr=0.001 batch=128 warmup=50 epochs=1 ranks=1 hidden=512,256
//! ```

use std::time::Instant;

use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};
use cohort_jobspec::train::{LearningRateDecay, ModelKind, OptimizerKind};
use cohort_trainer::metrics::{EvaluationMetrics, MetricsSink, StepMetrics};
use cohort_trainer::{TrainConfig, train};

/// Prints evaluations and a progress line every few hundred steps, on rank 0 only.
struct Printer {
    /// Only rank 0 prints.
    rank: usize,
    /// Start of training, for elapsed times.
    started: Instant,
}

impl MetricsSink for Printer {
    fn on_step(&mut self, metrics: &StepMetrics) {
        if self.rank == 0
            && (metrics.step.is_multiple_of(100) || metrics.step == metrics.total_steps)
        {
            println!(
                "step {:>5}/{} epoch {} loss {:.4} lr {:.2e} {:.0} samples/s",
                metrics.step,
                metrics.total_steps,
                metrics.epoch,
                metrics.loss,
                metrics.learning_rate,
                metrics.samples_per_second
            );
        }
    }

    fn on_evaluation(&mut self, metrics: &EvaluationMetrics) {
        if self.rank == 0 {
            println!(
                "eval after epoch {} (step {}): loss {:.4} accuracy {:.4} at {:.1}s",
                metrics.epoch,
                metrics.step,
                metrics.loss,
                metrics.accuracy,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n")?;
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.final_checkpoint = false;
    for argument in std::env::args().skip(1) {
        let Some((key, value)) = argument.split_once('=') else {
            return Err(format!("argument {argument:?}, expected key=value").into());
        };
        match key {
            "optimizer" => {
                config.optimizer.kind = match value {
                    "sgd" => OptimizerKind::Sgd,
                    "adamw" => OptimizerKind::Adamw,
                    _ => return Err(format!("optimizer {value:?}").into()),
                }
            }
            "model" => {
                config.model.kind = match value {
                    "mlp" => ModelKind::Mlp,
                    "cnn" => ModelKind::Cnn,
                    _ => return Err(format!("model {value:?}").into()),
                }
            }
            "lr" => config.optimizer.lr = Some(value.parse()?),
            "weight_decay" => config.optimizer.weight_decay = Some(value.parse()?),
            "clip" => config.optimizer.grad_clip_norm = Some(value.parse()?),
            "batch" => config.schedule.batch_size = value.parse()?,
            "warmup" => config.schedule.warmup_steps = value.parse()?,
            "epochs" => config.schedule.epochs = value.parse()?,
            "max_steps" => config.schedule.max_steps = Some(value.parse()?),
            "decay" => {
                config.schedule.lr_decay = match value {
                    "cosine" => LearningRateDecay::Cosine,
                    "constant" => LearningRateDecay::Constant,
                    _ => return Err(format!("decay {value:?}").into()),
                }
            }
            "ranks" => config.parallel.data = value.parse()?,
            "bucket_bytes" => config.parallel.gradient_bucket_bytes = value.parse()?,
            "hidden" => {
                config.model.hidden = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "seed" => config.data.seed = value.parse()?,
            "overlap" => config.overlap_communication = value.parse()?,
            "evaluate" => config.evaluate = value.parse()?,
            _ => return Err(format!("unknown key {key:?}").into()),
        }
    }
    let loading = Instant::now();
    let data = cohort_trainer::data::load(&config.data)?;
    println!(
        "loaded {} training and {} test examples in {:.2}s",
        data.train.len(),
        data.test.len(),
        loading.elapsed().as_secs_f64()
    );
    let world_size = config.parallel.data as usize;
    let store = InMemoryStore::new();
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let (store, config, data) = (&store, &config, &data);
                scope.spawn(move || -> Result<_, String> {
                    let mut ring = TcpRing::connect(
                        store,
                        "example",
                        rank,
                        world_size,
                        &TcpRingConfig::default(),
                    )
                    .map_err(|e| e.to_string())?;
                    let mut printer = Printer {
                        rank,
                        started: Instant::now(),
                    };
                    train(config, data, &mut ring, &mut printer).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().map_err(|_| "rank panicked".to_owned())?)
            .collect::<Result<Vec<_>, String>>()
    })?;
    let outcome = &outcomes[0];
    let examples = outcome.steps as f64 * f64::from(config.schedule.batch_size);
    let timings = outcome.timings;
    let per_step = |d: std::time::Duration| d.as_secs_f64() / outcome.steps.max(1) as f64;
    println!(
        "{{\"ranks\":{world_size},\"steps\":{},\"samples_per_s\":{:.0},\"accuracy\":{},\
         \"data_s\":{:.5},\"forward_s\":{:.5},\"backward_s\":{:.5},\"exposed_comm_s\":{:.5},\
         \"optimizer_s\":{:.5}}}",
        outcome.steps,
        examples / outcome.training_time.as_secs_f64(),
        outcome
            .final_evaluation
            .as_ref()
            .map_or("null".to_owned(), |evaluation| evaluation
                .accuracy
                .to_string()),
        per_step(timings.data),
        per_step(timings.forward),
        per_step(timings.backward),
        per_step(timings.exposed_communication),
        per_step(timings.optimizer),
    );
    Ok(())
}
