//! [`ShardServer`], one shard as a library type (usable in-process); `service` puts it behind
//! the `ParameterServer` gRPC service on a listener.
//!
//! The shard's state ([`ShardCore`]) sits behind one async lock, so pushes are serialised per
//! shard; tensor work (applying the optimizer, encoding replies, snapshots) runs on blocking
//! threads while the lock is held. Requests that must wait (sync step completion, the ssp bound,
//! initialisation) sleep on a change notification, re-checking after every change, for at most
//! the configured wait timeout.

use std::sync::{Arc, Mutex, OnceLock};

use cohort_proto::ps_v1;
use tokio::sync::{OwnedMutexGuard, watch};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::ServerConfig;
use crate::encoding::DType;
use crate::error::{Error, Result};
use crate::shard::assembly::{Gradient, InitialValues, PullPlan, ShardShape};
use crate::shard::{Admission, PushRecord, ShardCore, ShardModel};
use crate::sharding::{MAX_TENSORS, TensorDeclaration};
use crate::snapshot;

/// Returns the rendezvous key under which shard `shard_id`'s server publishes its `host:port`
/// for the job's ranks (the convention the CLI and the rank entry point share).
pub fn shard_address_key(shard_id: u32) -> String {
    format!("ps/shard/{shard_id}/address")
}

/// A shard's progress, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// Whether an init has completed.
    pub initialised: bool,
    /// Updates applied.
    pub version: u64,
    /// Step of the learning-rate schedule.
    pub global_step: u64,
    /// Each rank's clock (the step it pushes next).
    pub rank_next_step: Vec<u64>,
    /// Ranks with a request waiting (for a step to complete, the ssp bound, initialisation),
    /// once per waiting request.
    pub waiting_ranks: Vec<u32>,
    /// Sync mode: ranks whose gradients of the current step have arrived.
    pub pending_ranks: Vec<u32>,
}

/// A shard's parameters, copied out (for tests and inspection).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardParameters {
    /// Updates applied.
    pub version: u64,
    /// Dense parameters.
    pub dense: Vec<f32>,
    /// Held rows of each table: tensor index, first row, values.
    pub tables: Vec<(u32, u64, Vec<f32>)>,
}

/// A push header, checked against the shard.
#[derive(Debug, Clone, PartialEq)]
pub struct PushRequest {
    /// The pushing rank.
    pub rank: u32,
    /// Its step.
    pub step: u64,
    /// The version its gradients were computed from.
    pub version: u64,
    /// Element type of the gradient bytes.
    pub dtype: DType,
    /// What to return afterwards.
    pub pull: PullPlan,
}

/// What an init header leads to.
#[derive(Debug)]
pub enum InitStart {
    /// The shard already holds parameters of the same layout: nothing to do.
    AlreadyInitialised(ps_v1::InitReply),
    /// Values for this shape are needed.
    Needed(ShardShape),
}

/// One parameter shard.
#[derive(Debug)]
pub struct ShardServer {
    /// The configuration it was created with.
    config: Arc<ServerConfig>,
    /// The shape, set once by the first complete init (or a restore).
    shape: OnceLock<Arc<ShardShape>>,
    /// The state, behind the lock that serialises updates.
    core: Arc<tokio::sync::Mutex<ShardCore>>,
    /// Bumped after every change of the state; waiting requests re-check on it.
    changes: watch::Sender<u64>,
    /// Number of waiting requests per rank.
    waiting: Mutex<Vec<u32>>,
}

/// Counts a rank's waiting request while it lives.
struct WaitingRank<'a> {
    server: &'a ShardServer,
    rank: u32,
}

impl<'a> WaitingRank<'a> {
    fn new(server: &'a ShardServer, rank: u32) -> Self {
        if let Ok(mut waiting) = server.waiting.lock() {
            waiting[rank as usize] += 1;
        }
        Self { server, rank }
    }
}

impl Drop for WaitingRank<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.server.waiting.lock() {
            waiting[self.rank as usize] -= 1;
        }
    }
}

/// Runs tensor work on a blocking thread.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| Error::Internal(format!("shard worker thread: {error}")))?
}

impl ShardServer {
    /// Creates an uninitialised shard; the first rank's `Init` gives it its tensors and values.
    pub fn new(config: ServerConfig) -> Result<Self> {
        config.validate()?;
        let config = Arc::new(config);
        Ok(Self {
            core: Arc::new(tokio::sync::Mutex::new(ShardCore::new(config.clone()))),
            shape: OnceLock::new(),
            changes: watch::Sender::new(0),
            waiting: Mutex::new(vec![0; config.ranks as usize]),
            config,
        })
    }

    /// Creates a shard from a snapshot written by [`ShardServer::snapshot`] (a job resuming from
    /// its checkpoint). The snapshot must be of the same shard id, shard count, ranks and
    /// optimizer kind.
    pub fn from_snapshot(config: ServerConfig, snapshot: &[u8]) -> Result<Self> {
        let server = Self::new(config)?;
        let restored = snapshot::read(&server.config, snapshot)?;
        let shape = restored.model.shape.clone();
        let mut core = server
            .core
            .try_lock()
            .map_err(|_| Error::Internal("a new shard is locked".to_owned()))?;
        core.restore(
            restored.model,
            restored.version,
            restored.rank_next_step,
            restored.last_learning_rate,
        );
        drop(core);
        let _ = server.shape.set(shape);
        info!(
            job_id = %server.config.job_id,
            shard_id = server.config.shard_id,
            version = restored.version,
            "shard restored from a snapshot"
        );
        Ok(server)
    }

    /// Returns the configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Returns the shard's shape once initialised.
    pub fn shape(&self) -> Option<&Arc<ShardShape>> {
        self.shape.get()
    }

    fn notify(changes: &watch::Sender<u64>) {
        changes.send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Checks that a request is addressed to this job and shard.
    pub fn check_target(&self, job_id: &str, shard_id: u32) -> Result<()> {
        if job_id != self.config.job_id.as_str() {
            return Err(Error::invalid(format!(
                "job_id = {job_id:?}, this server belongs to job {:?}",
                self.config.job_id.as_str()
            )));
        }
        if shard_id >= self.config.shard_count {
            return Err(Error::invalid(format!(
                "shard_id = {shard_id}, expected 0..{}",
                self.config.shard_count
            )));
        }
        if shard_id != self.config.shard_id {
            return Err(Error::invalid(format!(
                "shard_id = {shard_id}, this server holds shard {}",
                self.config.shard_id
            )));
        }
        Ok(())
    }

    /// Checks a request's sender (job, shard, rank) and returns the rank.
    pub fn check_sender(&self, sender: Option<&ps_v1::Sender>) -> Result<u32> {
        let sender = sender.ok_or_else(|| Error::invalid("sender is missing"))?;
        self.check_target(&sender.job_id, sender.shard_id)?;
        if sender.rank >= self.config.ranks {
            return Err(Error::invalid(format!(
                "rank = {}, expected 0..{}",
                sender.rank, self.config.ranks
            )));
        }
        Ok(sender.rank)
    }

    fn initialised_shape(&self) -> Result<&Arc<ShardShape>> {
        self.shape.get().ok_or(Error::NotInitialised {
            shard_id: self.config.shard_id,
        })
    }

    /// Describes the shard.
    pub async fn describe(&self) -> ps_v1::DescribeReply {
        let core = self.core.lock().await;
        let limits = &self.config.limits;
        ps_v1::DescribeReply {
            job_id: self.config.job_id.to_string(),
            shard_id: self.config.shard_id,
            shard_count: self.config.shard_count,
            ranks: self.config.ranks,
            mode: crate::config::mode_to_wire(self.config.mode) as i32,
            staleness: self.config.staleness,
            initialised: core.model.is_some(),
            layout_fingerprint: self.shape.get().map_or(0, |shape| shape.fingerprint),
            version: core.version,
            global_step: core.global_step(),
            max_chunk_bytes: limits.max_chunk_bytes,
            max_rows_per_chunk: limits.max_rows_per_chunk,
            max_message_bytes: limits.max_message_bytes() as u64,
        }
    }

    /// Checks an init header: the sender, the tensor list and the shard it implies. Returns
    /// the shape to fill, or the reply when the shard already holds the same layout.
    pub fn start_init(&self, header: &ps_v1::InitHeader) -> Result<InitStart> {
        self.check_sender(header.sender.as_ref())?;
        if header.tensors.len() > MAX_TENSORS {
            return Err(Error::invalid(format!(
                "tensors: {} declared, expected 1 to {MAX_TENSORS}",
                header.tensors.len()
            )));
        }
        let tensors = header
            .tensors
            .iter()
            .map(|tensor| TensorDeclaration {
                name: tensor.name.clone(),
                element_count: tensor.element_count,
                row_elements: tensor.row_elements,
                sparse: tensor.sparse,
            })
            .collect();
        let shape = ShardShape::new(
            tensors,
            self.config.shard_count,
            self.config.shard_id,
            header.total_steps,
            &self.config.limits,
            &self.config.optimizer,
        )?;
        match self.shape.get() {
            Some(existing) if existing.fingerprint != shape.fingerprint => {
                Err(Error::LayoutMismatch {
                    shard_id: self.config.shard_id,
                    expected: existing.fingerprint,
                    found: shape.fingerprint,
                })
            }
            Some(existing) => Ok(InitStart::AlreadyInitialised(ps_v1::InitReply {
                initialised_by_this_call: false,
                layout_fingerprint: existing.fingerprint,
                version: 0,
            })),
            None => Ok(InitStart::Needed(shape)),
        }
    }

    /// Sets the shard's parameters unless another init got there first (then checks that it
    /// had the same layout).
    pub async fn initialise(
        &self,
        shape: ShardShape,
        values: InitialValues,
    ) -> Result<ps_v1::InitReply> {
        let mut core = self.core.clone().lock_owned().await;
        if let Some(existing) = self.shape.get() {
            if existing.fingerprint != shape.fingerprint {
                return Err(Error::LayoutMismatch {
                    shard_id: self.config.shard_id,
                    expected: existing.fingerprint,
                    found: shape.fingerprint,
                });
            }
            return Ok(ps_v1::InitReply {
                initialised_by_this_call: false,
                layout_fingerprint: existing.fingerprint,
                version: core.version,
            });
        }
        let shape = Arc::new(shape);
        let config = self.config.clone();
        let model_shape = shape.clone();
        let model = run_blocking(move || ShardModel::new(&config, model_shape, values)).await?;
        core.initialise(model);
        let _ = self.shape.set(shape.clone());
        let version = core.version;
        drop(core);
        Self::notify(&self.changes);
        info!(
            job_id = %self.config.job_id,
            shard_id = self.config.shard_id,
            elements = shape.layout.element_count(),
            dense_elements = shape.dense_element_count(),
            tables = shape.tables.len(),
            "shard initialised"
        );
        Ok(ps_v1::InitReply {
            initialised_by_this_call: true,
            layout_fingerprint: shape.fingerprint,
            version,
        })
    }

    /// Checks a push header: sender, element type, layout fingerprint and what to pull after.
    pub fn push_request(&self, header: &ps_v1::PushHeader) -> Result<PushRequest> {
        let rank = self.check_sender(header.sender.as_ref())?;
        let dtype = crate::encoding::from_wire(header.dtype, "dtype")?;
        let shape = self.initialised_shape()?;
        if header.layout_fingerprint != shape.fingerprint {
            return Err(Error::LayoutMismatch {
                shard_id: self.config.shard_id,
                expected: shape.fingerprint,
                found: header.layout_fingerprint,
            });
        }
        let pull = PullPlan::new(
            shape,
            &self.config.limits,
            &header.pull.clone().unwrap_or_default(),
        )?;
        Ok(PushRequest {
            rank,
            step: header.step,
            version: header.version,
            dtype,
            pull,
        })
    }

    /// Refuses a push early (before its data is read) if it is a duplicate, skips a step or is
    /// stale; a push that would wait passes.
    pub async fn precheck_push(&self, request: &PushRequest) -> Result<()> {
        let core = self.core.lock().await;
        core.admit_push(request.rank, request.step, request.version)
            .map(|_| ())
    }

    /// Returns the limits and the shape a push's chunks are checked against (once initialised).
    pub fn limits_and_shape(&self) -> Result<(&crate::config::Limits, &ShardShape)> {
        Ok((&self.config.limits, self.initialised_shape()?))
    }

    /// Locks the state once `ready` returns `None`, waiting on changes in between (for at most
    /// the wait timeout). `who` names the waiter in errors; `rank` is counted as waiting.
    async fn lock_when(
        &self,
        rank: Option<u32>,
        ready: impl Fn(&ShardCore) -> Result<Option<&'static str>>,
    ) -> Result<OwnedMutexGuard<ShardCore>> {
        let timeout = self.config.limits.wait_timeout();
        let deadline = Instant::now() + timeout;
        let mut changes = self.changes.subscribe();
        let mut waiting = None;
        loop {
            let core = self.core.clone().lock_owned().await;
            let Some(what) = ready(&core)? else {
                return Ok(core);
            };
            drop(core);
            if waiting.is_none()
                && let Some(rank) = rank
            {
                waiting = Some(WaitingRank::new(self, rank));
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(Error::Timeout {
                    shard_id: self.config.shard_id,
                    who: rank.map_or_else(
                        || "a snapshot request".to_owned(),
                        |rank| format!("rank {rank}"),
                    ),
                    what,
                    waited: timeout,
                });
            }
        }
    }

    /// Applies (sync: records) a push once it is admitted, waiting as its mode requires, and
    /// returns its staleness.
    pub async fn push(&self, request: &PushRequest, gradient: Gradient) -> Result<u64> {
        let (rank, step, version) = (request.rank, request.step, request.version);
        let core = self
            .lock_when(Some(rank), |core| {
                Ok(match core.admit_push(rank, step, version)? {
                    Admission::Ready { .. } => None,
                    Admission::Wait(what) => Some(what),
                })
            })
            .await?;
        let changes = self.changes.clone();
        // Committed and announced on the blocking thread, so that a client hanging up now
        // cannot leave the commit unannounced.
        let staleness = run_blocking(move || {
            let mut core = core;
            let result = core.commit_push(rank, step, version, gradient);
            drop(core);
            Self::notify(&changes);
            result
        })
        .await?;
        debug!(
            shard_id = self.config.shard_id,
            rank, step, staleness, "push applied"
        );
        Ok(staleness)
    }

    /// Returns a pull's reply once the rank may proceed: initialised, at least `min_version`,
    /// and its mode's condition (sync: its last step applied; ssp: within the bound).
    pub async fn pull(
        &self,
        rank: u32,
        min_version: u64,
        spec: &ps_v1::PullSpec,
        staleness: u64,
    ) -> Result<Vec<ps_v1::PullChunk>> {
        if let Some(shape) = self.shape.get() {
            PullPlan::new(shape, &self.config.limits, spec)?;
        }
        let core = self
            .lock_when(Some(rank), |core| Ok(core.pull_gate(rank, min_version)))
            .await?;
        let plan = PullPlan::new(self.initialised_shape()?, &self.config.limits, spec)?;
        run_blocking(move || {
            let mut core = core;
            core.read(rank, &plan, staleness)
        })
        .await
    }

    /// Returns a pull's reply for an already-checked plan (the pull half of a push).
    pub async fn pull_planned(
        &self,
        rank: u32,
        plan: PullPlan,
        staleness: u64,
    ) -> Result<Vec<ps_v1::PullChunk>> {
        let core = self
            .lock_when(Some(rank), |core| Ok(core.pull_gate(rank, 0)))
            .await?;
        run_blocking(move || {
            let mut core = core;
            core.read(rank, &plan, staleness)
        })
        .await
    }

    /// Writes a snapshot once the shard is initialised and at `min_version` or later, taken
    /// between two updates.
    pub async fn snapshot(&self, min_version: u64) -> Result<Vec<u8>> {
        let core = self
            .lock_when(None, |core| {
                Ok(if core.model.is_none() {
                    Some("the shard to be initialised")
                } else if core.version < min_version {
                    Some("the requested version")
                } else {
                    None
                })
            })
            .await?;
        let bytes = run_blocking(move || snapshot::write(&core)).await?;
        info!(
            job_id = %self.config.job_id,
            shard_id = self.config.shard_id,
            bytes = bytes.len(),
            "snapshot written"
        );
        Ok(bytes)
    }

    /// Returns the shard's progress.
    pub async fn status(&self) -> ShardStatus {
        let core = self.core.lock().await;
        let waiting_ranks = self
            .waiting
            .lock()
            .map(|waiting| {
                waiting
                    .iter()
                    .enumerate()
                    .flat_map(|(rank, count)| std::iter::repeat_n(rank as u32, *count as usize))
                    .collect()
            })
            .unwrap_or_default();
        ShardStatus {
            initialised: core.model.is_some(),
            version: core.version,
            global_step: core.global_step(),
            rank_next_step: core.rank_next_step.clone(),
            waiting_ranks,
            pending_ranks: core.pending_ranks(),
        }
    }

    /// Returns the most recent accepted pushes (at most [`crate::shard::RECENT_PUSHES`]),
    /// oldest first.
    pub async fn recent_pushes(&self) -> Vec<PushRecord> {
        self.core.lock().await.recent_pushes()
    }

    /// Copies the shard's parameters out, once initialised.
    pub async fn parameters(&self) -> Option<ShardParameters> {
        let core = self.core.lock().await;
        let model = core.model.as_ref()?;
        Some(ShardParameters {
            version: core.version,
            dense: model.dense.clone(),
            tables: model
                .shape
                .tables
                .iter()
                .zip(&model.tables)
                .map(|(shape, values)| (shape.tensor_index, shape.rows.start, values.clone()))
                .collect(),
        })
    }
}
