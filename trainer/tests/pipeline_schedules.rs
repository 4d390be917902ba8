//! Acceptance tests of the pipeline schedules: a toy pipeline of P stages, each on its own
//! thread and joined to its neighbours by loopback [`PeerLink`]s, must accumulate exactly the
//! parameter gradients that the same layers compute in one process on the whole batch, hold
//! no more activations than its schedule promises, and fail (not hang) when a stage goes away.
//!
//! Each stage is `y = relu(x W + b)` with candle `Var`s; the last stage adds a mean-squared
//! loss against targets, each micro-batch's loss scaled by `1 / M` so that the micro-batch
//! losses sum to the whole batch's mean.

use std::collections::HashMap;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use cohort_collective::{Error, InMemoryStore, LinkFailure, PeerLink, PeerLinkConfig};
use cohort_trainer::pipeline::{
    PipelineLinks, PipelineStage, Schedule, ScheduleStats, StagePosition, run_forward_only,
    run_training_step,
};
use cohort_trainer::{Result, TrainerError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Largest gradient difference allowed, relative to the reference gradient's largest magnitude.
const RELATIVE_TOLERANCE: f32 = 1e-5;
/// Examples per micro-batch.
const MICRO_SIZE: usize = 3;
/// Width of the data (the first stage's input).
const INPUT_WIDTH: usize = 5;
/// Width of the last stage's output (and of the targets).
const OUTPUT_WIDTH: usize = 3;
/// Training steps every run takes; gradients accumulate over them.
const STEPS: usize = 2;

/// Gradients of one layer's weight and bias, flat.
type LayerGradients = (Vec<f32>, Vec<f32>);

/// The toy pipeline's parameters, data and targets.
struct Problem {
    /// Initial `(weight, bias)` of each stage's layer.
    layers: Vec<(Tensor, Tensor)>,
    /// The whole batch, `[M * MICRO_SIZE, INPUT_WIDTH]`.
    inputs: Tensor,
    /// Targets of the whole batch, `[M * MICRO_SIZE, OUTPUT_WIDTH]`.
    targets: Tensor,
    /// Micro-batches per step.
    micro_batches: usize,
}

impl Problem {
    /// A random problem of `stages` layers (widths 5, 6, 7, ..., 3) and `micro_batches`.
    fn new(stages: usize, micro_batches: usize) -> Problem {
        let mut rng = ChaCha8Rng::seed_from_u64(stages as u64 * 1000 + micro_batches as u64);
        let mut uniform = |shape: &[usize], low: f32, high: f32| {
            let count = shape.iter().product();
            let values: Vec<f32> = (0..count).map(|_| rng.random_range(low..high)).collect();
            Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
        };
        let widths: Vec<usize> = std::iter::once(INPUT_WIDTH)
            .chain((1..stages).map(|stage| 5 + stage))
            .chain(std::iter::once(OUTPUT_WIDTH))
            .collect();
        let layers = widths
            .windows(2)
            .map(|pair| {
                (
                    uniform(&[pair[0], pair[1]], -0.7, 0.7),
                    uniform(&[pair[1]], 0.0, 0.3),
                )
            })
            .collect();
        let batch = micro_batches * MICRO_SIZE;
        Problem {
            layers,
            inputs: uniform(&[batch, INPUT_WIDTH], -1.0, 1.0),
            targets: uniform(&[batch, OUTPUT_WIDTH], 0.0, 1.0),
            micro_batches,
        }
    }

    /// Gradients of every layer's weight and bias, and the loss, from one process running the
    /// whole batch through all layers: the reference.
    fn reference(&self) -> (Vec<LayerGradients>, f32) {
        let variables: Vec<(Var, Var)> = self
            .layers
            .iter()
            .map(|(weight, bias)| {
                (
                    Var::from_tensor(weight).unwrap(),
                    Var::from_tensor(bias).unwrap(),
                )
            })
            .collect();
        let mut activation = self.inputs.clone();
        for (weight, bias) in &variables {
            activation = layer(&activation, weight, bias).unwrap();
        }
        let loss = (activation - &self.targets)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let gradients = loss.backward().unwrap();
        let per_layer = variables
            .iter()
            .map(|(weight, bias)| {
                (
                    flat(gradients.get(weight.as_tensor()).unwrap()),
                    flat(gradients.get(bias.as_tensor()).unwrap()),
                )
            })
            .collect();
        (per_layer, loss.to_scalar::<f32>().unwrap())
    }
}

/// `relu(x W + b)`.
fn layer(input: &Tensor, weight: &Var, bias: &Var) -> candle_core::Result<Tensor> {
    input
        .matmul(weight.as_tensor())?
        .broadcast_add(bias.as_tensor())?
        .relu()
}

/// A tensor's values, flat.
fn flat(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

/// What a stage keeps between a micro-batch's forward and its backward.
struct Saved {
    /// The received activation, as a variable so its gradient can be sent back; `None` on
    /// the first stage.
    input: Option<Var>,
    /// The stage's output, or the scaled loss on the last stage.
    output: Tensor,
}

/// One layer of the toy pipeline.
struct ToyStage {
    /// `W`.
    weight: Var,
    /// `b`.
    bias: Var,
    /// The whole batch, on the first stage only.
    inputs: Option<Tensor>,
    /// The whole batch's targets, on the last stage only.
    targets: Option<Tensor>,
    /// Micro-batches per step (the loss scale).
    micro_batches: usize,
    /// Saved state of micro-batches forwarded and not yet backwarded.
    saved: HashMap<usize, Saved>,
    /// Most entries `saved` ever held: the stage's own count of live activations.
    most_saved: usize,
    /// Accumulated gradient of `weight`.
    weight_gradient: Tensor,
    /// Accumulated gradient of `bias`.
    bias_gradient: Tensor,
    /// Sum of the scaled evaluation losses (last stage).
    evaluation_loss: f32,
}

impl ToyStage {
    fn new(problem: &Problem, index: usize) -> ToyStage {
        let (weight, bias) = &problem.layers[index];
        ToyStage {
            weight: Var::from_tensor(weight).unwrap(),
            bias: Var::from_tensor(bias).unwrap(),
            inputs: (index == 0).then(|| problem.inputs.clone()),
            targets: (index + 1 == problem.layers.len()).then(|| problem.targets.clone()),
            micro_batches: problem.micro_batches,
            saved: HashMap::new(),
            most_saved: 0,
            weight_gradient: weight.zeros_like().unwrap(),
            bias_gradient: bias.zeros_like().unwrap(),
            evaluation_loss: 0.0,
        }
    }

    /// Runs the layer on micro-batch `micro`; returns the variable made of the input (if
    /// received) and the output, or the scaled loss on the last stage.
    fn run(&self, micro: usize, input: Option<Tensor>) -> Result<(Option<Var>, Tensor)> {
        let (input, input_variable) = match input {
            None => {
                let inputs = self.inputs.as_ref().expect("the first stage has the data");
                (inputs.narrow(0, micro * MICRO_SIZE, MICRO_SIZE)?, None)
            }
            Some(received) => {
                let variable = Var::from_tensor(&received)?;
                (variable.as_tensor().clone(), Some(variable))
            }
        };
        let output = layer(&input, &self.weight, &self.bias)?;
        let output = match &self.targets {
            None => output,
            Some(targets) => {
                let targets = targets.narrow(0, micro * MICRO_SIZE, MICRO_SIZE)?;
                ((output - targets)?.sqr()?.mean_all()? / self.micro_batches as f64)?
            }
        };
        Ok((input_variable, output))
    }
}

impl PipelineStage for ToyStage {
    fn forward(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>> {
        let (input, output) = self.run(micro, input)?;
        let activation = self.targets.is_none().then(|| output.detach());
        self.saved.insert(micro, Saved { input, output });
        self.most_saved = self.most_saved.max(self.saved.len());
        Ok(activation)
    }

    fn backward(
        &mut self,
        micro: usize,
        output_gradient: Option<Tensor>,
    ) -> Result<Option<Tensor>> {
        let saved = self.saved.remove(&micro).ok_or_else(|| {
            TrainerError::Config(format!(
                "backward of micro-batch {micro}, which has no forward"
            ))
        })?;
        let gradients = match output_gradient {
            None => saved.output.backward()?,
            Some(gradient) => (saved.output * gradient)?.sum_all()?.backward()?,
        };
        let weight = gradients
            .get(self.weight.as_tensor())
            .expect("weight gradient");
        let bias = gradients.get(self.bias.as_tensor()).expect("bias gradient");
        self.weight_gradient = (&self.weight_gradient + weight)?;
        self.bias_gradient = (&self.bias_gradient + bias)?;
        Ok(saved.input.map(|input| {
            gradients
                .get(input.as_tensor())
                .expect("input gradient")
                .detach()
        }))
    }

    fn forward_only(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>> {
        let (_, output) = self.run(micro, input)?;
        if self.targets.is_some() {
            self.evaluation_loss += output.to_scalar::<f32>()?;
            return Ok(None);
        }
        Ok(Some(output))
    }
}

/// Settings of every link in these tests: a hang fails within a minute instead of 300 s.
fn link_config() -> PeerLinkConfig {
    PeerLinkConfig {
        receive_timeout: Duration::from_secs(60),
        ..PeerLinkConfig::default()
    }
}

/// Connects stage `index` of `stages` to its neighbours; stage `i` is rank `i`.
fn connect(store: &InMemoryStore, index: usize, stages: usize) -> PipelineLinks {
    let config = link_config();
    let name = |low: usize| format!("pipe-s{low}");
    PipelineLinks {
        previous: (index > 0).then(|| {
            PeerLink::connect(store, &name(index - 1), index, index - 1, &config).unwrap()
        }),
        next: (index + 1 < stages)
            .then(|| PeerLink::connect(store, &name(index), index, index + 1, &config).unwrap()),
    }
}

/// What a stage thread reports after its run.
struct StageReport {
    weight_gradient: Vec<f32>,
    bias_gradient: Vec<f32>,
    stats: Vec<ScheduleStats>,
    most_saved: usize,
    evaluation_loss: f32,
}

/// Runs `STEPS` training steps and one evaluation pass of `problem` on one thread per stage.
fn run_pipeline(problem: &Problem, schedule: Schedule) -> Vec<StageReport> {
    let stages = problem.layers.len();
    let store = InMemoryStore::new();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..stages)
            .map(|index| {
                let store = &store;
                scope.spawn(move || {
                    let mut links = connect(store, index, stages);
                    let mut stage = ToyStage::new(problem, index);
                    let position = StagePosition {
                        index,
                        count: stages,
                    };
                    let stats = (0..STEPS)
                        .map(|_| {
                            run_training_step(
                                schedule,
                                position,
                                problem.micro_batches,
                                &mut stage,
                                &mut links,
                                &Device::Cpu,
                            )
                            .unwrap()
                        })
                        .collect();
                    run_forward_only(
                        position,
                        problem.micro_batches,
                        &mut stage,
                        &mut links,
                        &Device::Cpu,
                    )
                    .unwrap();
                    assert!(stage.saved.is_empty(), "stage {index} kept saved state");
                    StageReport {
                        weight_gradient: flat(&stage.weight_gradient),
                        bias_gradient: flat(&stage.bias_gradient),
                        stats,
                        most_saved: stage.most_saved,
                        evaluation_loss: stage.evaluation_loss,
                    }
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    })
}

/// Asserts `found` equals `reference` times `scale` within the relative tolerance.
fn assert_close(found: &[f32], reference: &[f32], scale: f32, what: &str) {
    assert_eq!(found.len(), reference.len(), "{what}: length");
    let magnitude = reference
        .iter()
        .fold(0.0_f32, |most, value| most.max((value * scale).abs()));
    assert!(
        magnitude > 0.0,
        "{what}: the reference gradient is all zero"
    );
    let worst = found
        .iter()
        .zip(reference)
        .map(|(found, reference)| (found - reference * scale).abs())
        .fold(0.0_f32, f32::max);
    assert!(
        worst <= RELATIVE_TOLERANCE * magnitude,
        "{what}: differs from the reference by {worst}, expected at most {} ({found:?} vs \
         {reference:?} x {scale})",
        RELATIVE_TOLERANCE * magnitude
    );
}

/// Runs both schedules for `stages` and `micro_batches` and checks gradients, evaluation loss
/// and live activations.
fn check_schedules(stages: usize, micro_batches: usize) {
    let problem = Problem::new(stages, micro_batches);
    let (reference, reference_loss) = problem.reference();
    for schedule in [Schedule::Gpipe, Schedule::OneForwardOneBackward] {
        let reports = run_pipeline(&problem, schedule);
        for (index, report) in reports.iter().enumerate() {
            let what = format!("{schedule:?}, P = {stages}, M = {micro_batches}, stage {index}");
            let (weight, bias) = &reference[index];
            assert_close(
                &report.weight_gradient,
                weight,
                STEPS as f32,
                &format!("{what} W"),
            );
            assert_close(
                &report.bias_gradient,
                bias,
                STEPS as f32,
                &format!("{what} b"),
            );
            let expected_live = match schedule {
                Schedule::Gpipe => micro_batches,
                Schedule::OneForwardOneBackward => (stages - index).min(micro_batches),
            };
            for stats in &report.stats {
                assert_eq!(stats.max_live_activations, expected_live, "{what}");
                if schedule == Schedule::OneForwardOneBackward {
                    assert!(stats.max_live_activations <= stages - index, "{what}");
                }
                assert!(stats.compute + stats.waiting <= stats.total, "{what}");
            }
            // The stage's own count of saved micro-batches agrees with the engine's.
            assert_eq!(report.most_saved, expected_live, "{what}");
        }
        let evaluation_loss = reports.last().unwrap().evaluation_loss;
        assert!(
            (evaluation_loss - reference_loss).abs() <= RELATIVE_TOLERANCE * reference_loss,
            "evaluation loss {evaluation_loss}, expected {reference_loss}"
        );
    }
}

#[test]
fn two_stages_match_the_single_process_gradients() {
    check_schedules(2, 4);
    check_schedules(2, 8);
}

#[test]
fn four_stages_match_the_single_process_gradients() {
    check_schedules(4, 4);
    check_schedules(4, 8);
}

#[test]
fn fewer_micro_batches_than_stages_still_match() {
    check_schedules(4, 2);
}

#[test]
fn a_stage_that_drops_its_links_fails_its_neighbours_naming_it() {
    let stages = 4;
    let dropped = 2;
    let problem = Problem::new(stages, 4);
    let store = InMemoryStore::new();
    let results: Vec<Option<TrainerError>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..stages)
            .map(|index| {
                let (store, problem) = (&store, &problem);
                scope.spawn(move || {
                    let mut links = connect(store, index, stages);
                    if index == dropped {
                        drop(links);
                        return None;
                    }
                    let mut stage = ToyStage::new(problem, index);
                    run_training_step(
                        Schedule::OneForwardOneBackward,
                        StagePosition {
                            index,
                            count: stages,
                        },
                        problem.micro_batches,
                        &mut stage,
                        &mut links,
                        &Device::Cpu,
                    )
                    .err()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    });
    // Stages 1 and 3 lose stage 2 directly; stage 0 then loses stage 1, which gave up.
    for (index, blamed) in [(0, 1), (1, 2), (3, 2)] {
        let error = results[index]
            .as_ref()
            .unwrap_or_else(|| panic!("stage {index} finished without stage {dropped}"));
        match error {
            TrainerError::Collective(Error::Link { peer, failure, .. }) => {
                assert_eq!(*peer, blamed, "stage {index}: {error}");
                assert_eq!(
                    *failure,
                    LinkFailure::Disconnected,
                    "stage {index}: {error}"
                );
            }
            other => panic!("stage {index}: expected a link failure, found {other}"),
        }
        assert_eq!(error.failed_rank(), Some(blamed));
        assert!(
            error.to_string().contains(&format!("peer rank {blamed}")),
            "{error}"
        );
    }
}
