//! The scheduler pass: builds the view of free devices, asks [`placement::place`] where queued
//! jobs go, persists each placement, and only then tells the workers to start the ranks. Each
//! start instruction carries the process's place in its job, the coordinator's half of the
//! launch contract ([`cohort_proto::launch`]).
//!
//! The pass runs in two steps so that the state lock is not held while placements are written:
//! placing (memory changed, records enqueued) and, once the records are stored, starting the
//! ranks of every job that is still placed as written (a job cancelled or failed meanwhile is
//! not started).

use std::collections::{BTreeMap, HashMap};

use cohort_jobspec::{DeviceKind, JobKind, JobSpec};
use cohort_proto::launch::{self, Devices, Master, RankPlace, Role};
use cohort_proto::v1::{StartRank, instruction};
use cohort_proto::{JobId, NodeId, Secret};
use tracing::{info, instrument};

use super::persistence::{Written, all_landed};
use super::{Cluster, State};
use crate::config::CoordinatorConfig;
use crate::error::Result;
use crate::lifecycle::{JobState, transition};
use crate::model::{JobRecord, ProcessRole, RankRecord, RankState, StopCause, now_ms};
use crate::placement::sharing::{self, Usage};
use crate::placement::{self, ClusterView, NodeView, QueuedJob, RunningJob, Sharing, WaitReason};

/// First port of the range `MASTER_PORT` is drawn from.
const MASTER_PORT_BASE: u16 = 20_000;
/// Size of that range.
const MASTER_PORT_RANGE: u16 = 20_000;
// A submitted spec always fits the start instruction (and so the rank's environment).
const _: () = assert!(cohort_jobspec::MAX_SPEC_BYTES <= launch::MAX_SPEC_BYTES);

/// Why a queued job is not running yet, as the last scheduler pass found (kept in memory: every
/// pass finds it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Waiting {
    /// The free devices do not hold it, and it may not preempt enough.
    Devices(WaitReason),
    /// The jobs it preempted have not stopped yet.
    Victims(Vec<JobId>),
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::Devices(reason) => reason.fmt(formatter),
            Waiting::Victims(victims) => {
                let names: Vec<&str> = victims.iter().map(JobId::as_str).collect();
                write!(
                    formatter,
                    "waiting for the {} it preempted to checkpoint and stop: {}",
                    if victims.len() == 1 { "job" } else { "jobs" },
                    names.join(", ")
                )
            }
        }
    }
}

/// Devices held on one node.
#[derive(Default)]
pub(super) struct NodeLoad {
    /// Held devices.
    pub devices: Vec<(DeviceKind, u32)>,
    /// Ranks holding them.
    pub ranks: u32,
}

impl State {
    /// Devices held by ranks that may still run, per node. A rank of an ended job holds its
    /// devices until its worker reports the process gone.
    pub(super) fn busy_devices(&self) -> HashMap<NodeId, NodeLoad> {
        let mut busy: HashMap<NodeId, NodeLoad> = HashMap::new();
        for entry in self.live_jobs() {
            for rank in entry
                .record
                .placement
                .iter()
                .filter(|r| !r.state.is_final())
            {
                let load = busy.entry(rank.node_id.clone()).or_default();
                load.ranks += 1;
                load.devices.extend(
                    rank.devices
                        .iter()
                        .map(|&index| (entry.record.device_kind, index)),
                );
            }
        }
        busy
    }

    /// The view placement works on: ready, connected nodes with their free devices (or all
    /// their devices, when `all_free`, to judge what could ever fit).
    pub(super) fn cluster_view(&self, all_free: bool) -> ClusterView {
        let busy = if all_free {
            HashMap::new()
        } else {
            self.busy_devices()
        };
        let nodes = self
            .nodes
            .values()
            .filter(|n| n.schedulable())
            .map(|node| {
                let mut free: HashMap<DeviceKind, Vec<u32>> = HashMap::new();
                let mut total: HashMap<DeviceKind, u32> = HashMap::new();
                let held = busy.get(&node.record.id);
                for device in &node.record.devices {
                    *total.entry(device.kind).or_default() += 1;
                    let taken = held
                        .is_some_and(|load| load.devices.contains(&(device.kind, device.index)));
                    if !taken {
                        free.entry(device.kind).or_default().push(device.index);
                    }
                }
                for indices in free.values_mut() {
                    indices.sort_unstable();
                }
                NodeView {
                    node_id: node.record.id.clone(),
                    free,
                    total,
                    straggler_score: node.stragglers.rank(now_ms()),
                }
            })
            .collect();
        ClusterView { nodes }
    }
}

impl State {
    /// How devices are shared now: the configured queues and user quota, the devices every
    /// queue and user holds (ranks that may still run), and the cluster's devices (of `view`).
    pub(super) fn sharing(&self, config: &CoordinatorConfig, view: &ClusterView) -> Sharing {
        let mut held = Usage::default();
        for entry in self.live_jobs() {
            let ranks = entry
                .record
                .placement
                .iter()
                .filter(|rank| !rank.state.is_final())
                .count() as u64;
            if ranks > 0 {
                let count = ranks * u64::from(entry.record.devices_per_rank);
                held.add(&entry.owner(), entry.record.device_kind, count);
            }
        }
        let mut capacity: HashMap<DeviceKind, u64> = HashMap::new();
        for node in &view.nodes {
            for (&kind, &total) in &node.total {
                *capacity.entry(kind).or_default() += u64::from(total);
            }
        }
        Sharing {
            queues: config.queues.clone(),
            user_quota: config.user_quota,
            held,
            capacity,
        }
    }

    /// The jobs that hold devices and that preemption may weigh: running jobs (preemptible
    /// when their spec allows it and they are not protected after an earlier preemption), and
    /// jobs already stopping because they were preempted.
    fn preemption_candidates(&self, now: i64, min_runtime: std::time::Duration) -> Vec<RunningJob> {
        self.live_jobs()
            .filter_map(|entry| {
                let record = &entry.record;
                let stopping_for = match record.state {
                    JobState::Running => None,
                    JobState::Restarting => Some(record.attempts.last()?.preempted_by.clone()?),
                    _ => return None,
                };
                let mut held: Vec<(NodeId, Vec<u32>)> = Vec::new();
                for rank in record
                    .placement
                    .iter()
                    .filter(|rank| !rank.state.is_final())
                {
                    match held.last_mut() {
                        Some((node_id, devices)) if *node_id == rank.node_id => {
                            devices.extend(&rank.devices);
                        }
                        _ => held.push((rank.node_id.clone(), rank.devices.clone())),
                    }
                }
                if held.is_empty() {
                    return None;
                }
                let started_at_ms = record.started_at_ms.unwrap_or(now);
                Some(RunningJob {
                    job_id: record.id.clone(),
                    priority: record.priority,
                    device_kind: record.device_kind,
                    held,
                    preemptible: entry.spec.preemptible()
                        && !super::restarts::protected_from_preemption(record, now, min_runtime),
                    progress_lost_ms: if entry.spec.checkpoints_when_stopped() {
                        0
                    } else {
                        u64::try_from(now.saturating_sub(started_at_ms)).unwrap_or(0)
                    },
                    started_at_ms,
                    stopping_for,
                })
            })
            .collect()
    }
}

impl State {
    /// The start instruction of every process of a placed job, with its node: parameter servers
    /// (numbered after the ranks) first, since ranks wait for their addresses anyway.
    fn start_instructions(&self, job_id: &JobId, job_token: &Secret) -> Vec<(NodeId, StartRank)> {
        let Some(entry) = self.live(job_id) else {
            return Vec::new();
        };
        let Some(rank0) = entry.record.placement.first() else {
            return Vec::new();
        };
        let master_addr = self
            .nodes
            .get(&rank0.node_id)
            .map_or("127.0.0.1", |node| host_of(&node.record.address))
            .to_owned();
        let ranks = entry.spec.ranks();
        let placement = &entry.record.placement;
        let servers_first = placement
            .iter()
            .filter(|rank| rank.rank >= ranks)
            .chain(placement.iter().filter(|rank| rank.rank < ranks));
        servers_first
            .map(|rank| {
                let local_world_size = placement
                    .iter()
                    .filter(|other| other.node_id == rank.node_id)
                    .count() as u32;
                let start = start_instruction(
                    &entry.record,
                    &entry.spec,
                    rank,
                    local_world_size,
                    &master_addr,
                    job_token,
                );
                (rank.node_id.clone(), start)
            })
            .collect()
    }
}

/// Picks the job's `MASTER_PORT`, spread over a range by job sequence so that concurrent jobs
/// on one node rarely collide.
fn master_port(seq: u64) -> u16 {
    MASTER_PORT_BASE + (seq.wrapping_mul(7919) % u64::from(MASTER_PORT_RANGE)) as u16
}

/// Builds the start instruction of one process: its place in the job (the coordinator's half of
/// the launch contract, [`launch`]), the program, the job's own variables and the grace period.
fn start_instruction(
    record: &JobRecord,
    spec: &JobSpec,
    rank: &RankRecord,
    local_world_size: u32,
    master_addr: &str,
    job_token: &Secret,
) -> StartRank {
    let devices = match record.device_kind {
        DeviceKind::Cpu => Devices::Cpu {
            slots: rank.devices.clone(),
        },
        DeviceKind::Gpu => Devices::Gpu {
            gpus: rank.devices.clone(),
            cuda_device: 0,
            nccl_on_loopback: is_loopback_host(master_addr),
        },
    };
    let (role, master) = match ProcessRole::of(rank.rank, spec.ranks()) {
        ProcessRole::Rank => (
            Role::Rank,
            Some(Master {
                addr: master_addr.to_owned(),
                port: master_port(record.seq),
            }),
        ),
        ProcessRole::ParameterServer { shard } => (
            Role::ParameterServer {
                shard,
                shards: record.ranks - spec.ranks(),
            },
            None,
        ),
    };
    // The training ranks of this attempt: all of them, or fewer for an elastic job's restart
    // (its parameter servers, if it had any, always run whole).
    let servers = record.ranks - spec.ranks();
    let attempt_ranks = u32::try_from(record.placement.len())
        .unwrap_or(u32::MAX)
        .saturating_sub(servers);
    let place = RankPlace {
        job_id: record.id.clone(),
        rank: rank.rank,
        // WORLD_SIZE counts training ranks only: parameter servers are extra processes of the
        // gang.
        world_size: attempt_ranks,
        local_rank: rank.local_rank,
        local_world_size,
        devices,
        role,
        master,
        // Cohort's own runtime reads the spec it runs; a command job's program never sees it.
        spec_toml: (spec.kind == JobKind::Train).then(|| record.spec_toml.clone()),
        job_token: Some(job_token.clone()),
        restart_count: record.attempt,
    };
    let (argv, working_dir) = match (spec.kind, &spec.command) {
        (JobKind::Command, Some(command)) => (
            std::iter::once(command.program.clone())
                .chain(command.args.iter().cloned())
                .collect(),
            command.working_dir.clone().unwrap_or_default(),
        ),
        _ => (
            vec![launch::COHORT_EXECUTABLE.to_owned(), "rank".to_owned()],
            String::new(),
        ),
    };
    StartRank {
        world_size: attempt_ranks + servers,
        argv,
        env: spec
            .command
            .as_ref()
            .map(|command| command.env.clone().into_iter().collect())
            .unwrap_or_default(),
        working_dir,
        stop_grace_ms: (spec.stop_grace_s() * 1000.0) as u32,
        ..StartRank::from(&place)
    }
}

/// The host part of a `host:port` address (IPv6 brackets kept).
fn host_of(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map_or(address, |(host, _port)| host)
}

/// Whether `host` (an IP address, IPv6 in brackets or not, or a name) is this machine's
/// loopback.
fn is_loopback_host(host: &str) -> bool {
    let address = host.trim_start_matches('[').trim_end_matches(']');
    address == "localhost"
        || address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Cluster {
    /// The scheduler's queues as `cohort queues` shows them: each configured queue (and any
    /// other a live job names) with its weight, quota, the devices it and each of its users
    /// hold, their fair shares and their running and queued jobs.
    pub async fn queues(&self) -> cohort_proto::v1::ListQueuesResponse {
        use cohort_proto::v1::{ListQueuesResponse, QueueInfo, QueueUser};
        let state = self.state.lock().await;
        let view = state.cluster_view(true);
        let sharing = state.sharing(&self.config, &view);
        // (running, queued) jobs per queue; and per (queue, user), with their devices held.
        let mut jobs: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        let mut user_jobs: BTreeMap<(String, String), (u32, u32, sharing::Devices)> =
            BTreeMap::new();
        for entry in state.live_jobs() {
            let holding = entry
                .record
                .placement
                .iter()
                .filter(|rank| !rank.state.is_final())
                .count() as u64;
            let queued = entry.record.state == JobState::Queued;
            if holding == 0 && !queued {
                continue;
            }
            let owner = entry.owner();
            let (running, waiting) = (u32::from(!queued), u32::from(queued));
            let counts = jobs.entry(owner.queue.clone()).or_default();
            counts.0 += running;
            counts.1 += waiting;
            let user = user_jobs
                .entry((owner.queue.clone(), owner.user.clone()))
                .or_default();
            user.0 += running;
            user.1 += waiting;
            let devices = holding * u64::from(entry.record.devices_per_rank);
            user.2.add(entry.record.device_kind, devices);
        }
        let mut names: Vec<String> = self
            .config
            .queue_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        for name in jobs.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let share = |held: &sharing::Devices| held.dominant_share(&sharing.capacity);
        let queues = names
            .into_iter()
            .map(|name| {
                let policy = sharing.queue(&name);
                let held = sharing.held.queues.get(&name).copied().unwrap_or_default();
                let (running_jobs, queued_jobs) = jobs.get(&name).copied().unwrap_or_default();
                let users = user_jobs
                    .iter()
                    .filter(|((queue, _), _)| *queue == name)
                    .map(|((_, user), (running_jobs, queued_jobs, held_here))| {
                        let held = sharing.held.users.get(user).copied().unwrap_or_default();
                        QueueUser {
                            user: user.clone(),
                            held_cpu: held_here.cpu,
                            held_gpu: held_here.gpu,
                            share: share(&held),
                            running_jobs: *running_jobs,
                            queued_jobs: *queued_jobs,
                        }
                    })
                    .collect();
                QueueInfo {
                    configured: self.config.queue(&name).is_some(),
                    weight: policy.weight,
                    quota: policy.quota,
                    held_cpu: held.cpu,
                    held_gpu: held.gpu,
                    share: share(&held) / policy.weight,
                    running_jobs,
                    queued_jobs,
                    users,
                    name,
                }
            })
            .collect();
        ListQueuesResponse {
            queues,
            user_quota: self.config.user_quota,
            cluster_cpu: sharing.capacity.get(&DeviceKind::Cpu).copied().unwrap_or(0),
            cluster_gpu: sharing.capacity.get(&DeviceKind::Gpu).copied().unwrap_or(0),
        }
    }

    /// Places every queued job that fits, persists each placement, then starts its ranks.
    #[instrument(skip(self), level = "debug")]
    pub(crate) async fn schedule(&self) -> Result<()> {
        let mut planned = Vec::new();
        let placed = {
            let mut state = self.state.lock().await;
            self.grow_back(&mut state, &mut planned)?;
            self.place_queued(&mut state, &mut planned)?
        };
        all_landed(planned).await?;
        if placed.is_empty() {
            return Ok(());
        }
        // Persist before acting: a crash from here on finds the placement in the store.
        let mut first_failure = None;
        let mut stored = Vec::with_capacity(placed.len());
        for (job_id, written) in placed {
            match written.landed().await {
                Ok(()) => stored.push(job_id),
                Err(error) => {
                    first_failure.get_or_insert(error);
                }
            }
        }
        let mut writes = Vec::new();
        {
            let mut state = self.state.lock().await;
            for job_id in &stored {
                self.start_placed(&mut state, job_id, &mut writes)?;
            }
        }
        all_landed(writes).await?;
        first_failure.map_or(Ok(()), Err)
    }

    /// Places every queued job that fits, in memory, and enqueues each placed record; returns
    /// the placed jobs with their writes. Preempts what a job that does not fit may preempt
    /// (their records go on `writes`), and notes why every other queued job waits.
    fn place_queued(
        &self,
        state: &mut State,
        writes: &mut Vec<Written>,
    ) -> Result<Vec<(JobId, Written)>> {
        let now = now_ms();
        let queue: Vec<QueuedJob> = state
            .live_jobs()
            .filter(|entry| entry.record.state == JobState::Queued)
            .map(|entry| QueuedJob {
                avoid_nodes: super::restarts::avoided_nodes(&entry.record.backoff, now),
                // The first attempt runs whole; a restart of an elastic job takes what fits.
                min_ranks: if entry.record.attempt > 0 {
                    entry.record.min_ranks
                } else {
                    0
                },
                job_id: entry.record.id.clone(),
                priority: entry.record.priority,
                seq: entry.record.seq,
                ranks: entry.record.ranks,
                devices_per_rank: entry.record.devices_per_rank,
                device_kind: entry.record.device_kind,
                rank_group: entry.spec.rank_group(),
                owner: entry.owner(),
            })
            .collect();
        if queue.is_empty() {
            return Ok(Vec::new());
        }
        let deciding = std::time::Instant::now();
        let view = state.cluster_view(false);
        let sharing = state.sharing(&self.config, &view);
        let running = if self.config.preemption {
            state.preemption_candidates(now, self.config.preemption_min_runtime)
        } else {
            Vec::new()
        };
        let plan = placement::plan(&view, &queue, &running, &sharing);
        self.telemetry
            .observe_scheduling(deciding.elapsed().as_secs_f64());
        for preemption in plan.preemptions {
            let Some(preemptor) = state.live(&preemption.job_id) else {
                continue;
            };
            let priority = preemptor.record.priority;
            if !preemption.new_victims.is_empty() {
                info!(job_id = %preemption.job_id, priority, victims = ?preemption.new_victims, "job preempts lower-priority jobs");
            }
            for victim in &preemption.new_victims {
                self.preempt(state, victim, &preemption.job_id, priority, writes)?;
            }
            state.note_waiting(&preemption.job_id, Waiting::Victims(preemption.victims));
        }
        for waiting in plan.waiting {
            state.note_waiting(&waiting.job_id, Waiting::Devices(waiting.reason));
        }
        let mut placed = Vec::new();
        for assignment in plan.assignments {
            let Some(entry) = state.live_mut(&assignment.job_id) else {
                continue;
            };
            let job_id = assignment.job_id.clone();
            entry.record.state =
                transition(job_id.as_str(), entry.record.state, JobState::Scheduled)?;
            entry.record.scheduled_at_ms = Some(now);
            // Queued since its submission, or since its last attempt ended.
            let queued_since = entry
                .record
                .attempts
                .last()
                .map_or(entry.record.submitted_at_ms, |attempt| attempt.ended_at_ms);
            self.telemetry
                .observe_queue_wait((now - queued_since) as f64 / 1000.0);
            entry.record.reason.clear();
            entry.waiting = None;
            entry.record.placement = assignment
                .ranks
                .into_iter()
                .map(|placed| RankRecord {
                    rank: placed.rank,
                    node_id: placed.node_id,
                    local_rank: placed.local_rank,
                    devices: placed.devices,
                    state: RankState::Pending,
                    pid: 0,
                    exit_code: None,
                    signal: None,
                    exited_at_ms: None,
                    detail: String::new(),
                    stop_cause: StopCause::None,
                })
                .collect();
            let written = self.writes.put_job(&entry.record);
            let nodes: Vec<_> = entry
                .record
                .placement
                .iter()
                .map(|rank| rank.node_id.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            info!(%job_id, ranks = entry.record.placement.len(), nodes = ?nodes, "job scheduled");
            placed.push((job_id, written));
        }
        Ok(placed)
    }

    /// Opens the rendezvous of a job whose placement is stored and tells its nodes to start
    /// its ranks, unless the job left `scheduled` meanwhile (cancelled, or failed by a lost
    /// node). Fails the job when a node cannot be reached; its record goes on `writes`.
    fn start_placed(
        &self,
        state: &mut State,
        job_id: &JobId,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(entry) = state.live(job_id) else {
            return Ok(());
        };
        if entry.record.state != JobState::Scheduled {
            return Ok(());
        }
        self.rendezvous.open(
            job_id,
            u32::try_from(entry.record.placement.len()).unwrap_or(u32::MAX),
        );
        let instructions = state.start_instructions(
            job_id,
            &self
                .job_tokens
                .issue_for_attempt(job_id.as_str(), entry.record.attempt),
        );
        let mut unreachable = None;
        for (node_id, start) in instructions {
            if !state.send(&node_id, instruction::Kind::StartRank(start)) {
                unreachable = Some(node_id);
                break;
            }
        }
        if let Some(node_id) = unreachable {
            self.fail_attempt(
                state,
                job_id,
                (
                    format!("node {node_id} could not be reached to start a rank"),
                    true,
                ),
                Some(node_id),
                writes,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Secret {
        Secret::new("cohort-job-test")
    }

    #[test]
    fn master_port_stays_in_range() {
        for seq in [0, 1, 2, 12_345, u64::MAX / 8000] {
            let port = master_port(seq);
            assert!((MASTER_PORT_BASE..MASTER_PORT_BASE + MASTER_PORT_RANGE).contains(&port));
        }
        assert_ne!(master_port(1), master_port(2));
    }

    /// The record of job `spec_toml` placed on one node, each process holding `devices` devices
    /// from index 0 on.
    fn placed(spec_toml: &str, devices: u32) -> (JobRecord, JobSpec) {
        let spec = cohort_jobspec::parse(spec_toml).unwrap();
        let mut record = crate::store::conformance::sample_job(7);
        record.spec_toml = spec_toml.to_owned();
        record.ranks = spec.processes();
        record.device_kind = spec.resources.device;
        let template = record.placement[0].clone();
        record.placement = (0..record.ranks)
            .map(|rank| RankRecord {
                rank,
                local_rank: rank,
                devices: (rank * devices..(rank + 1) * devices).collect(),
                ..template.clone()
            })
            .collect();
        (record, spec)
    }

    #[test]
    fn a_command_rank_gets_its_program_its_env_and_its_place_but_not_the_spec() {
        let spec_toml = "version = 1\nname = \"hello\"\nkind = \"command\"\n\
                         [resources]\nranks = 2\ndevices_per_rank = 2\n\
                         [command]\nprogram = \"python\"\nargs = [\"train.py\"]\n\
                         env = { WANDB_PROJECT = \"mnist\" }\n";
        let (record, spec) = placed(spec_toml, 2);
        let start = start_instruction(
            &record,
            &spec,
            &record.placement[1],
            2,
            "10.0.0.2",
            &token(),
        );
        assert_eq!(start.argv, ["python", "train.py"]);
        assert_eq!(start.world_size, 2);
        assert_eq!(
            start.env,
            HashMap::from([("WANDB_PROJECT".to_owned(), "mnist".to_owned())])
        );
        assert!(start.spec_toml.is_empty());
        let place = RankPlace::try_from(&start).unwrap();
        assert_eq!(
            place,
            RankPlace {
                job_id: record.id.clone(),
                rank: 1,
                world_size: 2,
                local_rank: 1,
                local_world_size: 2,
                devices: Devices::Cpu { slots: vec![2, 3] },
                role: Role::Rank,
                master: Some(Master {
                    addr: "10.0.0.2".to_owned(),
                    port: master_port(record.seq),
                }),
                spec_toml: None,
                job_token: Some(token()),
                restart_count: record.attempt,
            }
        );
    }

    #[test]
    fn the_processes_of_a_train_job_get_its_spec_and_their_role() {
        let spec_toml = "version = 1\nname = \"ps\"\nkind = \"train\"\n\
                         [parallel]\ndata = 2\ncomm = \"ps\"\nps_shards = 1\n";
        let (record, spec) = placed(spec_toml, 1);
        assert_eq!(record.ranks, 3, "2 ranks and a server");
        let server = start_instruction(
            &record,
            &spec,
            &record.placement[2],
            3,
            "127.0.0.1",
            &token(),
        );
        assert_eq!(server.argv, [launch::COHORT_EXECUTABLE, "rank"]);
        assert!(server.env.is_empty());
        assert_eq!(server.world_size, 3);
        let place = RankPlace::try_from(&server).unwrap();
        assert_eq!(
            place.role,
            Role::ParameterServer {
                shard: 0,
                shards: 1
            }
        );
        assert_eq!(place.master, None);
        assert_eq!(place.world_size, 2);
        assert_eq!(place.spec_toml.as_deref(), Some(spec_toml));
        assert_eq!(place.devices, Devices::Cpu { slots: vec![2] });
        let rank = start_instruction(
            &record,
            &spec,
            &record.placement[0],
            3,
            "127.0.0.1",
            &token(),
        );
        let place = RankPlace::try_from(&rank).unwrap();
        assert_eq!(place.role, Role::Rank);
        assert_eq!(place.spec_toml.as_deref(), Some(spec_toml));
    }

    #[test]
    fn gpu_ranks_keep_nccl_on_loopback_only_on_a_loopback_cluster() {
        let spec_toml = "version = 1\nname = \"gpus\"\nkind = \"train\"\n\
                         [resources]\ndevice = \"gpu\"\n[parallel]\ndata = 2\n";
        let (record, spec) = placed(spec_toml, 1);
        for (master_addr, nccl_on_loopback) in [("127.0.0.1", true), ("10.0.0.2", false)] {
            let start = start_instruction(
                &record,
                &spec,
                &record.placement[1],
                2,
                master_addr,
                &token(),
            );
            assert_eq!(
                RankPlace::try_from(&start).unwrap().devices,
                Devices::Gpu {
                    gpus: vec![1],
                    cuda_device: 0,
                    nccl_on_loopback
                },
                "{master_addr}"
            );
        }
    }

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7000"), "[::1]");
        assert_eq!(host_of("node-a"), "node-a");
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in ["127.0.0.1", "127.3.2.1", "[::1]", "::1", "localhost"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["10.0.0.2", "[fe80::1]", "node-a", "0.0.0.0", ""] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}

/// Fair share through the coordinator core, with test nodes standing in for workers.
#[cfg(test)]
mod fair_share_tests {
    use std::collections::{BTreeMap, HashMap};

    use cohort_proto::v1;

    use super::super::testing::{TestNode, cluster_with, record_of};
    use super::*;
    use crate::placement::sharing::QueuePolicy;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_users_of_queues_weighted_two_to_one_get_device_time_two_to_one() {
        let data_dir = tempfile::tempdir().unwrap();
        let queues = BTreeMap::from([
            (
                "gold".to_owned(),
                QueuePolicy {
                    weight: 2.0,
                    quota: None,
                },
            ),
            (
                "silver".to_owned(),
                QueuePolicy {
                    weight: 1.0,
                    quota: None,
                },
            ),
        ]);
        let config = CoordinatorConfig {
            data_dir: data_dir.path().to_owned(),
            queues,
            ..CoordinatorConfig::default()
        };
        let (cluster, _store) = cluster_with(data_dir.path(), config).await;
        let mut nodes = Vec::new();
        for index in 0..6 {
            nodes.push(TestNode::join(&cluster, &format!("node-{index}")).await);
        }
        let submit = |name: String, queue: &str, user: &str, ranks: u32| {
            let spec = format!(
                "version = 1\nname = \"{name}\"\nkind = \"command\"\nqueue = \"{queue}\"\n\
                 [resources]\nranks = {ranks}\n[command]\nprogram = \"true\"\n"
            );
            let (cluster, user) = (cluster.clone(), user.to_owned());
            async move {
                let job = cluster.submit(spec, false, user).await.unwrap();
                JobId::new(job.job_id).unwrap()
            }
        };
        // Each placed job reports its one rank running; returns the jobs placed.
        let start_placed = |jobs: Vec<JobId>| {
            let (cluster, nodes) = (cluster.clone(), &nodes);
            async move {
                let mut started = Vec::new();
                for job in jobs {
                    let record = record_of(&cluster, &job).await;
                    if record.state != JobState::Scheduled {
                        continue;
                    }
                    for rank in &record.placement {
                        let node = nodes
                            .iter()
                            .find(|n| n.id == rank.node_id.as_str())
                            .unwrap();
                        node.report(&cluster, &job, (rank.rank, 0), v1::RankState::Running, None)
                            .await;
                    }
                    started.push(job);
                }
                started
            }
        };

        // The cluster is full when both users submit: alice all her jobs first.
        let filler = submit("filler".to_owned(), "default", "carol", 6).await;
        cluster.schedule().await.unwrap();
        let mut running = start_placed(vec![filler]).await;
        let mut queued: HashMap<&str, Vec<JobId>> = HashMap::new();
        for (user, queue) in [("alice", "gold"), ("bob", "silver")] {
            for n in 0..20 {
                let job = submit(format!("{user}-{n}"), queue, user, 1).await;
                queued.entry(user).or_default().push(job);
            }
        }
        let owner_of = |job: &JobId| job.as_str().split('-').next().unwrap().to_owned();
        let mut device_time: HashMap<String, u64> = HashMap::new();
        // One running job ends at every step (the longest running first: every job runs about
        // as long), and the scheduler fills the slot it frees.
        for _step in 0..200 {
            let ended = running.remove(0);
            let record = record_of(&cluster, &ended).await;
            for rank in &record.placement {
                let node = nodes
                    .iter()
                    .find(|n| n.id == rank.node_id.as_str())
                    .unwrap();
                node.report(
                    &cluster,
                    &ended,
                    (rank.rank, 0),
                    v1::RankState::Exited,
                    Some(0),
                )
                .await;
            }
            cluster.schedule().await.unwrap();
            let mut waiting = Vec::new();
            for jobs in queued.values_mut() {
                let mut still = Vec::new();
                for job in jobs.drain(..) {
                    if record_of(&cluster, &job).await.state == JobState::Queued {
                        still.push(job);
                    } else {
                        waiting.push(job);
                    }
                }
                *jobs = still;
            }
            running.extend(start_placed(waiting).await);
            if queued.values().any(Vec::is_empty) {
                break;
            }
            for job in &running {
                *device_time.entry(owner_of(job)).or_default() += 1;
            }
        }
        let (alice, bob) = (device_time["alice"] as f64, device_time["bob"] as f64);
        eprintln!("device-time while both waited: alice {alice}, bob {bob} (weights 2:1)");
        assert!(
            ((alice / bob) / 2.0 - 1.0).abs() <= 0.1,
            "alice {alice}, bob {bob}"
        );
    }
}
