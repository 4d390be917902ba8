//! Pipeline parallelism on one stage: the GPipe and 1F1B schedules, and the engine that runs a
//! [`PipelineStage`]'s forwards and backwards in schedule order, exchanging activations and
//! their gradients with the neighbouring stages over [`PeerLink`]s.
//!
//! The schedule is a pure function, [`schedule_order`]; [`run_training_step`] only follows it.
//! Every stage of a pipeline runs the same schedule with its own [`StagePosition`]. Sends never
//! block (a [`PeerLink`] queues them), so a stage blocks only where it needs a neighbour's
//! message, and both schedules complete whatever the number of stages and micro-batches.
//!
//! Messages carry a tag naming what they are, so that stages running different schedules, or
//! a stage that skipped a message, fail with a protocol error naming both tags instead of
//! computing on the wrong tensor: the high 32 bits say the kind (1 training activation, 2
//! activation gradient, 3 evaluation activation), the low 32 bits the micro-batch.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Storage, Tensor};
use cohort_collective::PeerLink;

use crate::error::{Result, TrainerError};

/// One pipeline stage's computation, implemented by the training loop (a transformer stage
/// holding its candle graphs).
pub trait PipelineStage {
    /// Forward of micro-batch `micro`: `input` is the previous stage's activation (`None` on
    /// the first stage, which reads its own data). Keeps what its backward needs. Returns the
    /// activation for the next stage, or `None` on the last stage (which computes and keeps its
    /// loss).
    fn forward(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>>;

    /// Backward of micro-batch `micro`: `output_gradient` is the gradient with respect to this
    /// stage's output (`None` on the last stage, which starts from its loss). Accumulates
    /// parameter gradients, frees the micro-batch's saved state, and returns the gradient with
    /// respect to its input (`None` on the first stage).
    fn backward(&mut self, micro: usize, output_gradient: Option<Tensor>)
    -> Result<Option<Tensor>>;

    /// Forward for evaluation: keeps nothing. Same input and output convention as
    /// [`PipelineStage::forward`].
    fn forward_only(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>>;
}

/// The order in which a stage runs its micro-batches' forwards and backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// GPipe: every micro-batch's forward, then every micro-batch's backward, backwards in
    /// forward (ascending) micro-batch order. Holds the activations of all micro-batches.
    Gpipe,
    /// One forward, one backward (PipeDream-Flush): stage `i` of `P` runs
    /// `min(P - i - 1, M)` warm-up forwards, then alternates one forward and one backward,
    /// then drains the remaining backwards. Holds at most `P - i` micro-batches' activations.
    OneForwardOneBackward,
}

impl From<cohort_jobspec::train::PipelineSchedule> for Schedule {
    fn from(schedule: cohort_jobspec::train::PipelineSchedule) -> Self {
        match schedule {
            cohort_jobspec::train::PipelineSchedule::Gpipe => Schedule::Gpipe,
            cohort_jobspec::train::PipelineSchedule::OneForwardOneBackward => {
                Schedule::OneForwardOneBackward
            }
        }
    }
}

/// Where a stage sits in its pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagePosition {
    /// This stage's index, `0..count`; stage 0 reads the data, stage `count - 1` computes the
    /// loss.
    pub index: usize,
    /// Number of stages in the pipeline.
    pub count: usize,
}

impl StagePosition {
    /// Whether this stage is the first (it has no previous stage).
    pub fn is_first(self) -> bool {
        self.index == 0
    }

    /// Whether this stage is the last (it has no next stage).
    pub fn is_last(self) -> bool {
        self.index + 1 == self.count
    }
}

/// A stage's connections to its neighbours.
#[derive(Debug, Default)]
pub struct PipelineLinks {
    /// Link to stage `index - 1`; `None` on the first stage.
    pub previous: Option<PeerLink>,
    /// Link to stage `index + 1`; `None` on the last stage.
    pub next: Option<PeerLink>,
}

/// What one call of [`run_training_step`] or [`run_forward_only`] did on this stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleStats {
    /// Most micro-batches at once whose forward had run on this stage and whose backward had
    /// not (0 for evaluation).
    pub max_live_activations: usize,
    /// Time spent in the stage's `forward`, `backward` and `forward_only`.
    pub compute: Duration,
    /// Time blocked in receives, waiting for a neighbour's activation or gradient.
    pub waiting: Duration,
    /// Wall time of the whole call; what is neither compute nor waiting went to copying
    /// tensors to and from messages.
    pub total: Duration,
}

/// One step of a stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward of the micro-batch.
    Forward(usize),
    /// Backward of the micro-batch.
    Backward(usize),
}

/// Returns the order in which the stage at `position` runs the forwards and backwards of
/// `micro_batches` micro-batches under `schedule`. Every micro-batch is forwarded once, then
/// backwarded once; forwards and backwards each run in ascending micro-batch order on every
/// stage, which is what lets neighbours exchange messages in order.
pub fn schedule_order(
    schedule: Schedule,
    position: StagePosition,
    micro_batches: usize,
) -> Vec<Action> {
    let mut order = Vec::with_capacity(2 * micro_batches);
    match schedule {
        Schedule::Gpipe => {
            order.extend((0..micro_batches).map(Action::Forward));
            order.extend((0..micro_batches).map(Action::Backward));
        }
        Schedule::OneForwardOneBackward => {
            let stages_after = position.count.saturating_sub(position.index + 1);
            let warm_up = stages_after.min(micro_batches);
            order.extend((0..warm_up).map(Action::Forward));
            for micro in warm_up..micro_batches {
                order.push(Action::Forward(micro));
                order.push(Action::Backward(micro - warm_up));
            }
            order.extend((micro_batches - warm_up..micro_batches).map(Action::Backward));
        }
    }
    order
}

/// Message kind of a training activation (the high 32 bits of its tag).
const ACTIVATION: u64 = 1;
/// Message kind of an activation gradient.
const GRADIENT: u64 = 2;
/// Message kind of an evaluation activation.
const EVALUATION_ACTIVATION: u64 = 3;

/// Returns the tag of the message of kind `kind` for micro-batch `micro`.
fn tag(kind: u64, micro: usize) -> u64 {
    (kind << 32) | (micro as u64 & 0xFFFF_FFFF)
}

/// Runs one training step's forwards and backwards of `micro_batches` micro-batches on this
/// stage, in the order `schedule` prescribes (see [`schedule_order`]), receiving activations
/// from the previous stage and gradients from the next, and sending its own on.
///
/// The stage accumulates parameter gradients; scaling micro-batch losses (by `1 / M` for a
/// mean) is its business. Fails when `links` does not match `position`, when the stage returns
/// a tensor where its position needs none (or none where it needs one), or with the link's
/// error, naming the neighbour, when a neighbour fails. After a failure the links are in an
/// unknown state: drop them, which makes the neighbours fail at once instead of at their
/// receive timeout.
pub fn run_training_step(
    schedule: Schedule,
    position: StagePosition,
    micro_batches: usize,
    stage: &mut dyn PipelineStage,
    links: &mut PipelineLinks,
    device: &Device,
) -> Result<ScheduleStats> {
    let started = Instant::now();
    check_layout(position, micro_batches, links)?;
    let mut engine = Engine::new(position, links, device);
    let mut live = 0_usize;
    for action in schedule_order(schedule, position, micro_batches) {
        match action {
            Action::Forward(micro) => {
                let input = engine.receive_from_previous(tag(ACTIVATION, micro))?;
                let output = engine.compute(|| stage.forward(micro, input))?;
                live += 1;
                engine.stats.max_live_activations = engine.stats.max_live_activations.max(live);
                engine.send_to_next(tag(ACTIVATION, micro), output, "forward", micro)?;
            }
            Action::Backward(micro) => {
                let output_gradient = engine.receive_from_next(tag(GRADIENT, micro))?;
                let input_gradient = engine.compute(|| stage.backward(micro, output_gradient))?;
                live -= 1;
                engine.send_to_previous(tag(GRADIENT, micro), input_gradient, micro)?;
            }
        }
    }
    engine.stats.total = started.elapsed();
    Ok(engine.stats)
}

/// Runs [`PipelineStage::forward_only`] for every micro-batch in order (evaluation), passing
/// activations from the previous stage to the next.
pub fn run_forward_only(
    position: StagePosition,
    micro_batches: usize,
    stage: &mut dyn PipelineStage,
    links: &mut PipelineLinks,
    device: &Device,
) -> Result<ScheduleStats> {
    let started = Instant::now();
    check_layout(position, micro_batches, links)?;
    let mut engine = Engine::new(position, links, device);
    for micro in 0..micro_batches {
        let input = engine.receive_from_previous(tag(EVALUATION_ACTIVATION, micro))?;
        let output = engine.compute(|| stage.forward_only(micro, input))?;
        engine.send_to_next(
            tag(EVALUATION_ACTIVATION, micro),
            output,
            "forward_only",
            micro,
        )?;
    }
    engine.stats.total = started.elapsed();
    Ok(engine.stats)
}

/// Checks the position, the micro-batch count, and that the links exist exactly where the
/// position needs them.
fn check_layout(
    position: StagePosition,
    micro_batches: usize,
    links: &PipelineLinks,
) -> Result<()> {
    if position.index >= position.count {
        return Err(TrainerError::Config(format!(
            "pipeline stage index {}, expected 0..{}",
            position.index, position.count
        )));
    }
    if micro_batches == 0 || micro_batches > u32::MAX as usize {
        return Err(TrainerError::Config(format!(
            "pipeline micro-batches = {micro_batches}, expected 1 to {}",
            u32::MAX
        )));
    }
    let describe = |present: bool| if present { "a link" } else { "no link" };
    for (which, present, expected) in [
        ("previous", links.previous.is_some(), !position.is_first()),
        ("next", links.next.is_some(), !position.is_last()),
    ] {
        if present != expected {
            return Err(TrainerError::Config(format!(
                "pipeline stage {} of {} has {} to the {which} stage, expected {}",
                position.index,
                position.count,
                describe(present),
                describe(expected)
            )));
        }
    }
    Ok(())
}

/// The message passing and timing shared by both runners.
struct Engine<'a> {
    /// Where the stage sits.
    position: StagePosition,
    /// The neighbours.
    links: &'a mut PipelineLinks,
    /// Where received tensors are created.
    device: &'a Device,
    /// Values of the last message received (reused).
    received: Vec<f32>,
    /// What has been measured so far.
    stats: ScheduleStats,
}

impl<'a> Engine<'a> {
    /// Creates an engine with empty statistics.
    fn new(position: StagePosition, links: &'a mut PipelineLinks, device: &'a Device) -> Self {
        Self {
            position,
            links,
            device,
            received: Vec::new(),
            stats: ScheduleStats::default(),
        }
    }

    /// Runs a stage call, counting its time as compute.
    fn compute<T>(&mut self, call: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let result = call();
        self.stats.compute += started.elapsed();
        result
    }

    /// Receives the activation tagged `tag` from the previous stage; `None` on the first.
    fn receive_from_previous(&mut self, tag: u64) -> Result<Option<Tensor>> {
        match self.links.previous.as_mut() {
            None => Ok(None),
            Some(link) => {
                receive_tensor(link, tag, &mut self.received, self.device, &mut self.stats)
                    .map(Some)
            }
        }
    }

    /// Receives the gradient tagged `tag` from the next stage; `None` on the last.
    fn receive_from_next(&mut self, tag: u64) -> Result<Option<Tensor>> {
        match self.links.next.as_mut() {
            None => Ok(None),
            Some(link) => {
                receive_tensor(link, tag, &mut self.received, self.device, &mut self.stats)
                    .map(Some)
            }
        }
    }

    /// Sends a forward's output to the next stage; fails when the stage returned an
    /// activation on the last stage or none elsewhere.
    fn send_to_next(
        &mut self,
        tag: u64,
        output: Option<Tensor>,
        call: &str,
        micro: usize,
    ) -> Result<()> {
        match (output, self.links.next.as_mut()) {
            (Some(activation), Some(link)) => send_tensor(link, tag, &activation),
            (None, None) => Ok(()),
            (found, _) => Err(self.contract_error(call, micro, found.is_some(), "an activation")),
        }
    }

    /// Sends a backward's input gradient to the previous stage; fails when the stage returned
    /// one on the first stage or none elsewhere.
    fn send_to_previous(&mut self, tag: u64, gradient: Option<Tensor>, micro: usize) -> Result<()> {
        match (gradient, self.links.previous.as_mut()) {
            (Some(gradient), Some(link)) => send_tensor(link, tag, &gradient),
            (None, None) => Ok(()),
            (found, _) => {
                Err(self.contract_error("backward", micro, found.is_some(), "a gradient"))
            }
        }
    }

    /// The error for a stage call that returned a tensor where none belongs, or the reverse.
    fn contract_error(&self, call: &str, micro: usize, returned: bool, what: &str) -> TrainerError {
        let (found, expected) = if returned {
            (what.to_owned(), "none".to_owned())
        } else {
            ("none".to_owned(), what.to_owned())
        };
        TrainerError::Config(format!(
            "pipeline stage {} of {}: {call} of micro-batch {micro} returned {found}, expected \
             {expected}",
            self.position.index, self.position.count
        ))
    }
}

/// Receives a message tagged `tag` into `values` and makes it a tensor on `device`, counting
/// the wait.
fn receive_tensor(
    link: &mut PeerLink,
    tag: u64,
    values: &mut Vec<f32>,
    device: &Device,
    stats: &mut ScheduleStats,
) -> Result<Tensor> {
    let started = Instant::now();
    let shape = link.receive(tag, values);
    stats.waiting += started.elapsed();
    Ok(Tensor::from_slice(values.as_slice(), shape?, device)?)
}

/// Sends `tensor` as `f32` with its shape. A contiguous `f32` tensor in CPU memory is sent
/// straight from its storage; anything else is converted first.
fn send_tensor(link: &mut PeerLink, tag: u64, tensor: &Tensor) -> Result<()> {
    let dims = tensor.dims();
    if tensor.dtype() == DType::F32 {
        let (storage, layout) = tensor.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            let values = cpu.as_slice::<f32>()?;
            return Ok(link.send(tag, dims, &values[start..end])?);
        }
    }
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(link.send(tag, dims, &values)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn position(index: usize, count: usize) -> StagePosition {
        StagePosition { index, count }
    }

    /// Checks that `order` forwards and backwards each of `micro_batches` exactly once, in
    /// ascending order, each backward after its forward; returns the most live micro-batches.
    fn check_order(order: &[Action], micro_batches: usize) -> usize {
        let mut next_forward = 0;
        let mut next_backward = 0;
        let mut live = 0_usize;
        let mut most_live = 0;
        for action in order {
            match *action {
                Action::Forward(micro) => {
                    assert_eq!(micro, next_forward, "forwards out of order in {order:?}");
                    next_forward += 1;
                    live += 1;
                    most_live = most_live.max(live);
                }
                Action::Backward(micro) => {
                    assert_eq!(micro, next_backward, "backwards out of order in {order:?}");
                    assert!(micro < next_forward, "backward before forward in {order:?}");
                    next_backward += 1;
                    live -= 1;
                }
            }
        }
        assert_eq!(
            (next_forward, next_backward),
            (micro_batches, micro_batches)
        );
        most_live
    }

    /// Returns every stage's order under `schedule`.
    fn all_orders(schedule: Schedule, stages: usize, micro_batches: usize) -> Vec<Vec<Action>> {
        (0..stages)
            .map(|index| schedule_order(schedule, position(index, stages), micro_batches))
            .collect()
    }

    /// Plays every stage's order against the others, with sends that never block: a forward
    /// waits for the previous stage's forward of the same micro-batch, a backward for the next
    /// stage's backward. Returns whether every stage finished.
    fn pipeline_completes(orders: &[Vec<Action>]) -> bool {
        let stages = orders.len();
        let mut done = vec![0_usize; stages];
        let mut forwarded = vec![0_usize; stages];
        let mut backwarded = vec![0_usize; stages];
        loop {
            let mut progressed = false;
            for stage in 0..stages {
                while let Some(&action) = orders[stage].get(done[stage]) {
                    let ready = match action {
                        Action::Forward(micro) => stage == 0 || forwarded[stage - 1] > micro,
                        Action::Backward(micro) => {
                            stage + 1 == stages || backwarded[stage + 1] > micro
                        }
                    };
                    if !ready {
                        break;
                    }
                    match action {
                        Action::Forward(_) => forwarded[stage] += 1,
                        Action::Backward(_) => backwarded[stage] += 1,
                    }
                    done[stage] += 1;
                    progressed = true;
                }
            }
            if !progressed {
                return (0..stages).all(|stage| done[stage] == orders[stage].len());
            }
        }
    }

    #[test]
    fn one_forward_one_backward_follows_pipedream_flush() {
        use Action::{Backward as B, Forward as F};
        assert_eq!(
            schedule_order(Schedule::OneForwardOneBackward, position(0, 4), 6),
            [
                F(0),
                F(1),
                F(2),
                F(3),
                B(0),
                F(4),
                B(1),
                F(5),
                B(2),
                B(3),
                B(4),
                B(5)
            ]
        );
        assert_eq!(
            schedule_order(Schedule::OneForwardOneBackward, position(2, 4), 3),
            [F(0), F(1), B(0), F(2), B(1), B(2)]
        );
        // Fewer micro-batches than the warm-up: all forwards, then all backwards.
        assert_eq!(
            schedule_order(Schedule::OneForwardOneBackward, position(0, 4), 2),
            [F(0), F(1), B(0), B(1)]
        );
        assert_eq!(
            schedule_order(Schedule::OneForwardOneBackward, position(3, 4), 2),
            [F(0), B(0), F(1), B(1)]
        );
    }

    #[test]
    fn gpipe_runs_every_forward_then_every_backward() {
        use Action::{Backward as B, Forward as F};
        for index in 0..3 {
            assert_eq!(
                schedule_order(Schedule::Gpipe, position(index, 3), 3),
                [F(0), F(1), F(2), B(0), B(1), B(2)]
            );
        }
    }

    proptest! {
        #[test]
        fn every_micro_batch_runs_once_within_the_live_bound(
            stages in 1_usize..12,
            micro_batches in 1_usize..40,
        ) {
            for index in 0..stages {
                let at = position(index, stages);
                let gpipe = check_order(&schedule_order(Schedule::Gpipe, at, micro_batches), micro_batches);
                prop_assert_eq!(gpipe, micro_batches);
                let one_f_one_b = check_order(
                    &schedule_order(Schedule::OneForwardOneBackward, at, micro_batches),
                    micro_batches,
                );
                prop_assert_eq!(one_f_one_b, (stages - index).min(micro_batches));
            }
            prop_assert!(pipeline_completes(&all_orders(Schedule::Gpipe, stages, micro_batches)));
            prop_assert!(pipeline_completes(&all_orders(
                Schedule::OneForwardOneBackward,
                stages,
                micro_batches
            )));
        }
    }

    #[test]
    fn the_completion_check_finds_a_deadlock() {
        use Action::{Backward as B, Forward as F};
        // Stage 0 skips its warm-up and waits for gradient 0, while stage 1 (GPipe) waits for
        // activation 1 before any backward: neither can move.
        let orders = [
            vec![F(0), B(0), F(1), B(1)],
            schedule_order(Schedule::Gpipe, position(1, 2), 2),
        ];
        assert!(!pipeline_completes(&orders));
    }

    /// A single-stage pipeline's stage that records its calls.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Action>,
        return_activation: bool,
    }

    impl PipelineStage for Recorder {
        fn forward(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>> {
            assert!(input.is_none());
            self.calls.push(Action::Forward(micro));
            Ok(self
                .return_activation
                .then(|| Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()))
        }

        fn backward(&mut self, micro: usize, gradient: Option<Tensor>) -> Result<Option<Tensor>> {
            assert!(gradient.is_none());
            self.calls.push(Action::Backward(micro));
            Ok(None)
        }

        fn forward_only(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>> {
            self.forward(micro, input)
        }
    }

    #[test]
    fn a_single_stage_runs_its_schedule_and_counts_live_activations() {
        for (schedule, live) in [(Schedule::Gpipe, 5), (Schedule::OneForwardOneBackward, 1)] {
            let mut stage = Recorder::default();
            let stats = run_training_step(
                schedule,
                position(0, 1),
                5,
                &mut stage,
                &mut PipelineLinks::default(),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(stage.calls, schedule_order(schedule, position(0, 1), 5));
            assert_eq!(stats.max_live_activations, live);
            assert!(stats.compute <= stats.total);
        }
    }

    #[test]
    fn links_that_do_not_match_the_position_are_refused() {
        let error = run_training_step(
            Schedule::Gpipe,
            position(1, 3),
            2,
            &mut Recorder::default(),
            &mut PipelineLinks::default(),
            &Device::Cpu,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "training config: pipeline stage 1 of 3 has no link to the previous stage, expected \
             a link"
        );
        let error = run_forward_only(
            position(0, 1),
            0,
            &mut Recorder::default(),
            &mut PipelineLinks::default(),
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(error.to_string().contains("micro-batches = 0"), "{error}");
    }

    #[test]
    fn a_last_stage_that_returns_an_activation_is_refused() {
        let mut stage = Recorder {
            return_activation: true,
            ..Recorder::default()
        };
        let error = run_forward_only(
            position(0, 1),
            1,
            &mut stage,
            &mut PipelineLinks::default(),
            &Device::Cpu,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "training config: pipeline stage 0 of 1: forward_only of micro-batch 0 returned an \
             activation, expected none"
        );
    }

    #[test]
    fn tags_tell_kinds_and_micro_batches_apart() {
        assert_ne!(tag(ACTIVATION, 3), tag(GRADIENT, 3));
        assert_ne!(tag(ACTIVATION, 3), tag(EVALUATION_ACTIVATION, 3));
        assert_ne!(tag(ACTIVATION, 3), tag(ACTIVATION, 4));
    }
}
