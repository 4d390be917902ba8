//! One shard's state and the rules that change it: who may push which step, when a push is
//! applied (sync, async, ssp), when a pull may proceed, and how the optimizer updates the
//! buffers. Synchronous and lock-free by itself: [`crate::server::ShardServer`] holds it behind
//! one lock and runs it on blocking threads.
//!
//! Versions and clocks: the shard's `version` counts the updates applied. Each rank's clock is
//! the step it pushes next (`rank_next_step`). In sync mode, version `t` holds the parameters
//! after steps `0..t` of every rank; in async and ssp modes every push is an update.

pub mod assembly;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use cohort_proto::ps_v1;
use prost::bytes::Bytes;

use crate::config::{PsMode, ServerConfig};
use crate::encoding::{self, DType};
use crate::error::{Error, Result};
use assembly::{Gradient, InitialValues, PullPlan, ShardShape};
use cohort_numerics::optimizer;
use cohort_numerics::{LearningRateSchedule, OptimizerState, UpdateConstants};

/// Most recent pushes kept for inspection.
pub const RECENT_PUSHES: usize = 4096;

/// Dense elements summed and applied at a time (256 KiB of f32: stays in cache).
const APPLY_WINDOW_ELEMENTS: usize = 64 * 1024;

/// One accepted push, as the shard saw it on admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushRecord {
    /// The pushing rank.
    pub rank: u32,
    /// Its step.
    pub step: u64,
    /// Version the gradients were computed from.
    pub computed_from_version: u64,
    /// The shard's version when the push was admitted.
    pub shard_version: u64,
    /// The slowest rank's clock (the step it pushes next) when the push was admitted.
    pub slowest_step: u64,
}

/// Whether a push may be applied now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Yes; `staleness` updates by others happened since its version.
    Ready {
        /// Updates between the push's version and the shard's.
        staleness: u64,
    },
    /// Not yet: it waits for what is named.
    Wait(&'static str),
}

/// The buffers of an initialised shard.
#[derive(Debug)]
pub struct ShardModel {
    /// The shard's immutable shape.
    pub shape: Arc<ShardShape>,
    /// The learning-rate schedule (with the run's planned steps).
    pub schedule: LearningRateSchedule,
    /// Dense parameters.
    pub dense: Vec<f32>,
    /// Optimizer state of the dense parameters.
    pub dense_state: OptimizerState,
    /// Held rows of each table, by position in the shape.
    pub tables: Vec<Vec<f32>>,
    /// Optimizer state of each table part.
    pub table_states: Vec<OptimizerState>,
}

impl ShardModel {
    /// Builds the buffers from initial values, with zeroed optimizer state.
    pub fn new(
        config: &ServerConfig,
        shape: Arc<ShardShape>,
        values: InitialValues,
    ) -> Result<Self> {
        let dense_state = OptimizerState::new(&config.optimizer, values.dense.len())?;
        let table_states = values
            .tables
            .iter()
            .map(|table| OptimizerState::new(&config.optimizer, table.len()))
            .collect::<cohort_numerics::Result<_>>()?;
        Ok(Self {
            schedule: LearningRateSchedule::new(
                config.optimizer.learning_rate,
                config.schedule.warmup_steps,
                config.schedule.decay,
                shape.total_steps,
            ),
            shape,
            dense: values.dense,
            dense_state,
            tables: values.tables,
            table_states,
        })
    }
}

/// Dense parameters of one version, already cut into encoded chunks (shared by every rank that
/// pulls that version).
#[derive(Debug)]
struct PublishedDense {
    /// The version encoded.
    version: u64,
    /// The element type.
    dtype: DType,
    /// Offset and bytes of each chunk.
    chunks: Vec<(u64, Bytes)>,
}

/// Sums row gradients by row, keeping first-appearance order (deterministic).
#[derive(Debug, Default)]
struct RowSums {
    /// Slot of each row.
    slots: HashMap<u64, usize>,
    /// Rows in slot order.
    rows: Vec<u64>,
    /// `rows.len() * width` sums.
    values: Vec<f32>,
}

impl RowSums {
    fn add(&mut self, row: u64, values: &[f32]) {
        let width = values.len();
        let slot = *self.slots.entry(row).or_insert_with(|| {
            self.rows.push(row);
            self.values.resize(self.values.len() + width, 0.0);
            self.rows.len() - 1
        });
        for (sum, value) in self.values[slot * width..(slot + 1) * width]
            .iter_mut()
            .zip(values)
        {
            *sum += value;
        }
    }
}

/// The state of one shard.
#[derive(Debug)]
pub struct ShardCore {
    /// The server's configuration.
    pub config: Arc<ServerConfig>,
    /// Buffers, once initialised.
    pub model: Option<ShardModel>,
    /// Updates applied.
    pub version: u64,
    /// Each rank's clock: the step it pushes next.
    pub rank_next_step: Vec<u64>,
    /// Sync mode: gradients of step `version` received so far, by rank.
    pending: Vec<Option<Gradient>>,
    /// Learning rate of the last update.
    pub last_learning_rate: f64,
    /// The most recent accepted pushes, oldest first.
    recent_pushes: VecDeque<PushRecord>,
    /// Encoded dense parameters of the current version, when some rank pulled them.
    published: Option<Arc<PublishedDense>>,
}

impl ShardCore {
    /// Creates an uninitialised shard.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        let ranks = config.ranks as usize;
        Self {
            config,
            model: None,
            version: 0,
            rank_next_step: vec![0; ranks],
            pending: (0..ranks).map(|_| None).collect(),
            last_learning_rate: 0.0,
            recent_pushes: VecDeque::new(),
            published: None,
        }
    }

    /// Returns the step of the learning-rate schedule: the version in sync mode, updates per
    /// rank otherwise.
    pub fn global_step(&self) -> u64 {
        match self.config.mode {
            PsMode::Sync => self.version,
            PsMode::Async | PsMode::Ssp => self.version / u64::from(self.config.ranks),
        }
    }

    /// Returns the slowest rank's clock.
    pub fn slowest_step(&self) -> u64 {
        self.rank_next_step.iter().copied().min().unwrap_or(0)
    }

    /// Returns the ranks whose sync-mode gradients for the current step have arrived.
    pub fn pending_ranks(&self) -> Vec<u32> {
        (0..self.config.ranks)
            .filter(|rank| self.pending[*rank as usize].is_some())
            .collect()
    }

    /// Returns the recent pushes, oldest first.
    pub fn recent_pushes(&self) -> Vec<PushRecord> {
        self.recent_pushes.iter().copied().collect()
    }

    /// Sets the initial buffers unless some earlier init did; returns whether this one did.
    pub fn initialise(&mut self, model: ShardModel) -> bool {
        if self.model.is_some() {
            return false;
        }
        self.model = Some(model);
        true
    }

    /// Replaces the whole state with a restored one (see [`crate::snapshot`]).
    pub fn restore(
        &mut self,
        model: ShardModel,
        version: u64,
        rank_next_step: Vec<u64>,
        last_learning_rate: f64,
    ) {
        self.model = Some(model);
        self.version = version;
        self.rank_next_step = rank_next_step;
        self.last_learning_rate = last_learning_rate;
        self.pending.iter_mut().for_each(|pending| *pending = None);
        self.published = None;
    }

    /// Decides whether rank `rank`'s push of `step`, computed from `version`, may be applied
    /// now, must wait, or is refused (duplicate, skipped step, stale or future version).
    pub fn admit_push(&self, rank: u32, step: u64, version: u64) -> Result<Admission> {
        if self.model.is_none() {
            return Err(Error::NotInitialised {
                shard_id: self.config.shard_id,
            });
        }
        let next_step = self.rank_next_step[rank as usize];
        if step < next_step {
            return Err(Error::DuplicatePush {
                rank,
                step,
                next_step,
            });
        }
        if step > next_step {
            return Err(Error::invalid(format!(
                "rank {rank} pushed step {step}, expected step {next_step} (steps may not be \
                 skipped)"
            )));
        }
        match self.config.mode {
            PsMode::Sync => {
                // The rank pushed every step before this one; the last may not be complete yet.
                if self.version < step {
                    return Ok(Admission::Wait("the previous step to complete"));
                }
                if version < self.version {
                    return Err(Error::StalePush {
                        rank,
                        step,
                        version,
                        detail: format!(
                            "sync mode needs gradients of version {}, the parameters of step {step}",
                            self.version
                        ),
                    });
                }
                self.check_not_newer(version)?;
                Ok(Admission::Ready { staleness: 0 })
            }
            PsMode::Async | PsMode::Ssp => {
                if self.config.mode == PsMode::Ssp
                    && step - self.slowest_step() > self.config.staleness
                {
                    return Ok(Admission::Wait(
                        "the slowest rank to come within the staleness bound",
                    ));
                }
                self.check_not_newer(version)?;
                let staleness = self.version - version;
                if let Some(bound) = self.config.limits.max_push_staleness
                    && staleness > bound
                {
                    return Err(Error::StalePush {
                        rank,
                        step,
                        version,
                        detail: format!(
                            "the shard is at version {}, {staleness} updates later, expected at \
                             most max_push_staleness = {bound}",
                            self.version
                        ),
                    });
                }
                Ok(Admission::Ready { staleness })
            }
        }
    }

    fn check_not_newer(&self, version: u64) -> Result<()> {
        if version > self.version {
            return Err(Error::invalid(format!(
                "version {version} is newer than the shard's version {}",
                self.version
            )));
        }
        Ok(())
    }

    /// Applies (or, in sync mode, records) an admitted push. Rechecks admission: a push that is
    /// not ready is refused without any change.
    pub fn commit_push(
        &mut self,
        rank: u32,
        step: u64,
        version: u64,
        gradient: Gradient,
    ) -> Result<u64> {
        let Admission::Ready { staleness } = self.admit_push(rank, step, version)? else {
            return Err(Error::Internal(format!(
                "rank {rank} step {step} committed before it was admitted"
            )));
        };
        if self.recent_pushes.len() == RECENT_PUSHES {
            self.recent_pushes.pop_front();
        }
        self.recent_pushes.push_back(PushRecord {
            rank,
            step,
            computed_from_version: version,
            shard_version: self.version,
            slowest_step: self.slowest_step(),
        });
        self.rank_next_step[rank as usize] = step + 1;
        match self.config.mode {
            PsMode::Sync => {
                self.pending[rank as usize] = Some(gradient);
                if self.pending.iter().all(Option::is_some) {
                    let gradients: Vec<Gradient> =
                        self.pending.iter_mut().filter_map(Option::take).collect();
                    self.apply_average(gradients)?;
                }
            }
            PsMode::Async | PsMode::Ssp => self.apply(std::slice::from_ref(&gradient), 1.0)?,
        }
        Ok(staleness)
    }

    /// Sums the ranks' gradients in rank order, divides by the number of ranks and applies the
    /// result once.
    fn apply_average(&mut self, gradients: Vec<Gradient>) -> Result<()> {
        self.apply(&gradients, self.config.ranks as f32)
    }

    /// Applies one optimizer update from the sum of `gradients` (in their order) divided by
    /// `divisor`. Dense gradients are summed and applied window by window, so the sum never
    /// needs a shard-sized buffer and stays in cache between summing and applying.
    fn apply(&mut self, gradients: &[Gradient], divisor: f32) -> Result<()> {
        let shard_id = self.config.shard_id;
        let global_step = self.global_step();
        let Some(model) = self.model.as_mut() else {
            return Err(Error::NotInitialised { shard_id });
        };
        let learning_rate = model.schedule.learning_rate(global_step);
        let constants =
            UpdateConstants::new(&self.config.optimizer, learning_rate, self.version + 1);

        let length = model.dense.len();
        let mut window = vec![0.0f32; APPLY_WINDOW_ELEMENTS.min(length)];
        for start in (0..length).step_by(APPLY_WINDOW_ELEMENTS) {
            let end = (start + APPLY_WINDOW_ELEMENTS).min(length);
            let window = &mut window[..end - start];
            window.fill(0.0);
            for gradient in gradients {
                gradient.dense.add_to(start..end, window);
            }
            if divisor != 1.0 {
                window.iter_mut().for_each(|value| *value /= divisor);
            }
            optimizer::apply(
                &constants,
                &mut model.dense,
                &mut model.dense_state,
                start..end,
                window,
            )?;
        }

        let mut sums: Vec<RowSums> = (0..model.tables.len())
            .map(|_| RowSums::default())
            .collect();
        for row_gradient in gradients.iter().flat_map(|gradient| &gradient.rows) {
            let width = model.shape.tables[row_gradient.table].row_elements as usize;
            for (index, &row) in row_gradient.rows.iter().enumerate() {
                sums[row_gradient.table].add(
                    row,
                    &row_gradient.values[index * width..(index + 1) * width],
                );
            }
        }
        for (table, sums) in sums.iter_mut().enumerate() {
            let width = model.shape.tables[table].row_elements as usize;
            if divisor != 1.0 {
                sums.values.iter_mut().for_each(|value| *value /= divisor);
            }
            for (slot, &row) in sums.rows.iter().enumerate() {
                let start = row as usize * width;
                optimizer::apply(
                    &constants,
                    &mut model.tables[table],
                    &mut model.table_states[table],
                    start..start + width,
                    &sums.values[slot * width..(slot + 1) * width],
                )?;
            }
        }
        self.version += 1;
        self.last_learning_rate = learning_rate;
        self.published = None;
        Ok(())
    }

    /// Returns what rank `rank`'s pull waits for, or `None` when it may proceed: initialisation,
    /// `min_version`, in sync mode its last step's completion, in ssp mode the staleness bound.
    pub fn pull_gate(&self, rank: u32, min_version: u64) -> Option<&'static str> {
        if self.model.is_none() {
            return Some("the shard to be initialised");
        }
        if self.version < min_version {
            return Some("the requested version");
        }
        let next_step = self.rank_next_step[rank as usize];
        match self.config.mode {
            PsMode::Sync if self.version < next_step => {
                Some("every rank's gradients of its last step")
            }
            PsMode::Ssp if next_step - self.slowest_step() > self.config.staleness => {
                Some("the slowest rank to come within the staleness bound")
            }
            _ => None,
        }
    }

    /// Builds the reply of a pull by `rank`: the header, then the dense chunks and rows asked
    /// for, each chunk within the limits.
    pub fn read(
        &mut self,
        rank: u32,
        plan: &PullPlan,
        staleness: u64,
    ) -> Result<Vec<ps_v1::PullChunk>> {
        use ps_v1::pull_chunk::Body;
        let limits = &self.config.limits;
        let max_chunk_bytes = limits.max_chunk_bytes as usize;
        let max_rows = limits.max_rows_per_chunk as usize;
        let Some(model) = &self.model else {
            return Err(Error::NotInitialised {
                shard_id: self.config.shard_id,
            });
        };
        let header = ps_v1::PullHeader {
            version: self.version,
            global_step: self.global_step(),
            next_step: self.rank_next_step[rank as usize],
            slowest_step: self.slowest_step(),
            layout_fingerprint: model.shape.fingerprint,
            dtype: crate::encoding::to_wire(plan.dtype) as i32,
            dense_element_count: model.dense.len() as u64,
            staleness,
            learning_rate: self.last_learning_rate,
        };
        let mut chunks = vec![ps_v1::PullChunk {
            body: Some(Body::Header(header)),
        }];
        if plan.dense {
            let published = match &self.published {
                Some(published)
                    if published.version == self.version && published.dtype == plan.dtype =>
                {
                    published.clone()
                }
                _ => {
                    let published = Arc::new(PublishedDense {
                        version: self.version,
                        dtype: plan.dtype,
                        chunks: encoding::encode_chunks(plan.dtype, &model.dense, max_chunk_bytes),
                    });
                    self.published = Some(published.clone());
                    published
                }
            };
            chunks.extend(
                published
                    .chunks
                    .iter()
                    .map(|(offset, data)| ps_v1::PullChunk {
                        body: Some(Body::Dense(ps_v1::DenseChunk {
                            offset: *offset,
                            data: data.clone(),
                        })),
                    }),
            );
        }
        let all_rows: Vec<(usize, Vec<u64>)> = if plan.all_rows {
            model
                .shape
                .tables
                .iter()
                .enumerate()
                .map(|(table, shape)| (table, (0..shape.row_count()).collect()))
                .collect()
        } else {
            Vec::new()
        };
        for (table, rows) in plan.selections.iter().chain(&all_rows) {
            let shape = &model.shape.tables[*table];
            let width = shape.row_elements as usize;
            let rows_per_chunk =
                (max_chunk_bytes / (width * plan.dtype.size_bytes())).clamp(1, max_rows);
            for rows in rows.chunks(rows_per_chunk) {
                let mut values = Vec::with_capacity(rows.len() * width);
                for &row in rows {
                    let start = row as usize * width;
                    values.extend_from_slice(&model.tables[*table][start..start + width]);
                }
                chunks.push(ps_v1::PullChunk {
                    body: Some(Body::Rows(ps_v1::RowsChunk {
                        tensor_index: shape.tensor_index,
                        rows: rows.iter().map(|row| row + shape.rows.start).collect(),
                        data: encoding::encode(plan.dtype, &values),
                    })),
                });
            }
        }
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, OptimizerConfig, OptimizerKind};
    use crate::shard::assembly::DenseGradient;
    use crate::sharding::TensorDeclaration;

    fn core(mode: PsMode, staleness: u64, limits: Limits) -> ShardCore {
        let config = Arc::new(ServerConfig {
            ranks: 2,
            mode,
            staleness,
            optimizer: OptimizerConfig {
                kind: OptimizerKind::Sgd,
                learning_rate: 1.0,
                momentum: 0.0,
                ..OptimizerConfig::default()
            },
            schedule: crate::config::ScheduleConfig {
                warmup_steps: 0,
                decay: crate::config::LearningRateDecay::Constant,
            },
            limits,
            ..ServerConfig::default()
        });
        let tensors = vec![TensorDeclaration::dense("w", 4)];
        let shape = Arc::new(
            ShardShape::new(tensors, 1, 0, 10, &config.limits, &config.optimizer).unwrap(),
        );
        let values = InitialValues {
            dense: vec![0.0; 4],
            tables: Vec::new(),
        };
        let mut core = ShardCore::new(config.clone());
        assert!(core.admit_push(0, 0, 0).is_err(), "uninitialised");
        core.initialise(ShardModel::new(&config, shape, values).unwrap());
        core
    }

    fn gradient(value: f32) -> Gradient {
        Gradient {
            dense: DenseGradient::from_values(&[value; 4]),
            rows: Vec::new(),
        }
    }

    #[test]
    fn sync_mode_averages_a_complete_step_and_refuses_stale_or_repeated_pushes() {
        let mut core = core(PsMode::Sync, 0, Limits::default());
        assert_eq!(
            core.admit_push(0, 0, 0).unwrap(),
            Admission::Ready { staleness: 0 }
        );
        core.commit_push(0, 0, 0, gradient(1.0)).unwrap();
        assert_eq!(core.version, 0, "waits for rank 1");
        assert_eq!(core.pending_ranks(), vec![0]);
        assert!(core.pull_gate(0, 0).is_some());
        assert!(matches!(
            core.admit_push(0, 1, 0).unwrap(),
            Admission::Wait(_)
        ));
        core.commit_push(1, 0, 0, gradient(3.0)).unwrap();
        assert_eq!(core.version, 1);
        assert_eq!(core.model.as_ref().unwrap().dense, vec![-2.0; 4]);
        assert_eq!(core.pull_gate(0, 0), None);
        assert!(matches!(
            core.admit_push(0, 1, 0),
            Err(Error::StalePush { .. })
        ));
        assert!(matches!(
            core.admit_push(1, 0, 0),
            Err(Error::DuplicatePush { .. })
        ));
        assert!(matches!(
            core.admit_push(1, 3, 1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            core.admit_push(1, 1, 2),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            core.admit_push(1, 1, 1).unwrap(),
            Admission::Ready { staleness: 0 }
        );
        assert_eq!(core.global_step(), 1);
    }

    #[test]
    fn ssp_holds_a_rank_more_than_the_bound_ahead_of_the_slowest() {
        let mut core = core(PsMode::Ssp, 1, Limits::default());
        core.commit_push(0, 0, 0, gradient(1.0)).unwrap();
        assert_eq!(core.pull_gate(0, 0), None, "one step ahead is allowed");
        core.commit_push(0, 1, 1, gradient(1.0)).unwrap();
        assert!(core.pull_gate(0, 0).is_some(), "two steps ahead is not");
        assert!(matches!(
            core.admit_push(0, 2, 2).unwrap(),
            Admission::Wait(_)
        ));
        assert_eq!(core.pull_gate(1, 0), None, "the slowest rank never waits");
        core.commit_push(1, 0, 0, gradient(1.0)).unwrap();
        assert_eq!(core.pull_gate(0, 0), None);
        assert_eq!(core.version, 3, "every push is an update");
        assert_eq!(core.global_step(), 1, "three updates of two ranks");
        let records = core.recent_pushes();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].slowest_step, 0);
        assert_eq!(records[2].shard_version, 2);
    }

    #[test]
    fn async_mode_bounds_staleness_when_configured() {
        let limits = Limits {
            max_push_staleness: Some(1),
            ..Limits::default()
        };
        let mut core = core(PsMode::Async, 0, limits);
        core.commit_push(0, 0, 0, gradient(1.0)).unwrap();
        core.commit_push(0, 1, 1, gradient(1.0)).unwrap();
        assert!(matches!(
            core.admit_push(1, 0, 0),
            Err(Error::StalePush { .. })
        ));
        assert_eq!(
            core.admit_push(1, 0, 1).unwrap(),
            Admission::Ready { staleness: 1 }
        );
        assert!(matches!(
            core.admit_push(1, 0, 3),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(core.model.as_ref().unwrap().dense, vec![-2.0; 4]);
    }
}
