//! The scheduler pass: builds the view of free devices, asks [`placement::place`] where queued
//! jobs go, persists each placement, and only then tells the workers to start the ranks.

use std::collections::{BTreeMap, HashMap};

use cohort_proto::v1::{DeviceRef, StartRank, instruction};
use cohort_proto::{NodeId, env};
use cohort_spec::{DeviceKind, JobKind, JobSpec};
use tracing::{info, instrument};

use super::{Cluster, State};
use crate::convert;
use crate::error::Result;
use crate::lifecycle::{JobState, transition};
use crate::model::{JobRecord, ProcessRole, RankRecord, RankState, StopCause, now_ms};
use crate::placement::{self, ClusterView, NodeView, QueuedJob};

/// First port of the range `MASTER_PORT` is drawn from.
const MASTER_PORT_BASE: u32 = 20_000;
/// Size of that range.
const MASTER_PORT_RANGE: u32 = 20_000;
/// Program name a start instruction uses for "the worker's own `cohort` executable".
pub const COHORT_EXECUTABLE: &str = "@cohort";

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
                }
            })
            .collect();
        ClusterView { nodes }
    }
}

impl State {
    /// The start instruction of every process of a placed job, with its node: parameter servers
    /// (numbered after the ranks) first, since ranks wait for their addresses anyway.
    fn start_instructions(&self, job_id: &cohort_proto::JobId) -> Vec<(NodeId, StartRank)> {
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
                );
                (rank.node_id.clone(), start)
            })
            .collect()
    }
}

/// Picks the job's `MASTER_PORT`, spread over a range by job sequence so that concurrent jobs
/// on one node rarely collide.
fn master_port(seq: u64) -> u32 {
    MASTER_PORT_BASE + (seq.wrapping_mul(7919) % u64::from(MASTER_PORT_RANGE)) as u32
}

/// Sets the variables that tie a rank to its devices: thread pools sized to its CPU slots, or
/// its GPUs alone visible (and NCCL kept on loopback on a cluster that lives there).
fn device_environment(
    kind: DeviceKind,
    rank: &RankRecord,
    master_addr: &str,
    environment: &mut BTreeMap<String, String>,
) {
    match kind {
        DeviceKind::Cpu => {
            // A CPU slot is a core: size the rank's thread pools to the slots it holds, as
            // torchrun does with OMP_NUM_THREADS, so ranks sharing a node do not oversubscribe
            // it.
            let threads = rank.devices.len().max(1).to_string();
            environment.insert(env::OMP_NUM_THREADS.to_owned(), threads.clone());
            environment.insert(env::RAYON_NUM_THREADS.to_owned(), threads);
        }
        DeviceKind::Gpu => {
            // The rank sees only its own GPUs, renumbered from 0.
            let visible = rank
                .devices
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            environment.insert(env::CUDA_VISIBLE_DEVICES.to_owned(), visible);
            environment.insert(env::CUDA_DEVICE.to_owned(), "0".to_owned());
            if is_loopback_host(master_addr) {
                // NCCL listens on an interface of its own choosing, a non-loopback one when
                // the machine has any; a cluster that lives on loopback keeps NCCL there too.
                environment.insert(env::NCCL_SOCKET_IFNAME.to_owned(), "lo".to_owned());
            }
        }
    }
}

/// Builds the start instruction of one rank.
fn start_instruction(
    record: &JobRecord,
    spec: &JobSpec,
    rank: &RankRecord,
    local_world_size: u32,
    master_addr: &str,
) -> StartRank {
    let kind = convert::device_kind_name(record.device_kind);
    let devices = rank
        .devices
        .iter()
        .map(|index| format!("{kind}:{index}"))
        .collect::<Vec<_>>()
        .join(",");
    // The job's own variables first: Cohort's below replace any of the same name (validation
    // refuses those already; this keeps a record from before that rule from overriding them).
    let mut environment: BTreeMap<String, String> = spec
        .command
        .as_ref()
        .map(|command| command.env.clone())
        .unwrap_or_default();
    device_environment(record.device_kind, rank, master_addr, &mut environment);
    // WORLD_SIZE counts training ranks only: parameter servers are extra processes of the gang.
    let world_size = spec.ranks().to_string();
    let rank_text = rank.rank.to_string();
    let local_rank = rank.local_rank.to_string();
    let local_world_size_text = local_world_size.to_string();
    for (name, value) in [
        (env::JOB_ID, record.id.to_string()),
        (env::RANK, rank_text.clone()),
        (env::WORLD_SIZE, world_size.clone()),
        (env::LOCAL_RANK, local_rank.clone()),
        (env::LOCAL_WORLD_SIZE, local_world_size_text.clone()),
        (env::DEVICES, devices),
    ] {
        environment.insert(name.to_owned(), value);
    }
    match ProcessRole::of(rank.rank, spec.ranks()) {
        ProcessRole::Rank => {
            for (name, value) in [
                (env::ROLE, env::ROLE_RANK.to_owned()),
                (env::torch::RANK, rank_text),
                (env::torch::WORLD_SIZE, world_size),
                (env::torch::LOCAL_RANK, local_rank),
                (env::torch::LOCAL_WORLD_SIZE, local_world_size_text),
                (env::torch::MASTER_ADDR, master_addr.to_owned()),
                (env::torch::MASTER_PORT, master_port(record.seq).to_string()),
            ] {
                environment.insert(name.to_owned(), value);
            }
        }
        ProcessRole::ParameterServer { shard } => {
            let shards = record.ranks - spec.ranks();
            for (name, value) in [
                (env::ROLE, env::ROLE_PARAMETER_SERVER.to_owned()),
                (env::PS_SHARD, shard.to_string()),
                (env::PS_SHARDS, shards.to_string()),
            ] {
                environment.insert(name.to_owned(), value);
            }
        }
    }
    let (argv, working_dir) = match (spec.kind, &spec.command) {
        (JobKind::Command, Some(command)) => (
            std::iter::once(command.program.clone())
                .chain(command.args.iter().cloned())
                .collect(),
            command.working_dir.clone().unwrap_or_default(),
        ),
        _ => (
            vec![COHORT_EXECUTABLE.to_owned(), "rank".to_owned()],
            String::new(),
        ),
    };
    StartRank {
        job_id: record.id.to_string(),
        rank: rank.rank,
        world_size: record.ranks,
        local_rank: rank.local_rank,
        local_world_size,
        devices: rank
            .devices
            .iter()
            .map(|&index| DeviceRef {
                kind: convert::device_kind_to_proto(record.device_kind) as i32,
                index,
            })
            .collect(),
        argv,
        env: environment.into_iter().collect(),
        working_dir,
        stop_grace_ms: (spec.stop_grace_s() * 1000.0) as u32,
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
    /// Places every queued job that fits, persists each placement, then starts its ranks.
    #[instrument(skip(self), level = "debug")]
    pub(super) async fn schedule(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        let mut queue: Vec<QueuedJob> = state
            .live_jobs()
            .filter(|entry| entry.record.state == JobState::Queued)
            .map(|entry| QueuedJob {
                job_id: entry.record.id.clone(),
                priority: entry.record.priority,
                seq: entry.record.seq,
                ranks: entry.record.ranks,
                devices_per_rank: entry.record.devices_per_rank,
                device_kind: entry.record.device_kind,
                rank_group: entry.spec.rank_group(),
            })
            .collect();
        if queue.is_empty() {
            return Ok(());
        }
        queue.sort_by_key(|job| (std::cmp::Reverse(job.priority), job.seq));
        let view = state.cluster_view(false);
        let assignments = placement::place(&view, &queue);
        for assignment in assignments {
            let Some(entry) = state.live_mut(&assignment.job_id) else {
                continue;
            };
            let job_id = assignment.job_id.clone();
            entry.record.state =
                transition(job_id.as_str(), entry.record.state, JobState::Scheduled)?;
            entry.record.scheduled_at_ms = Some(now_ms());
            entry.record.reason.clear();
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
            // Persist before acting: a crash from here on finds the placement in the store.
            self.store.put_job(&entry.record).await?;
            self.rendezvous.open(&job_id, entry.record.ranks);
            let entry: &super::LiveJob = entry;
            self.publish(entry);
            let nodes: Vec<_> = entry
                .record
                .placement
                .iter()
                .map(|rank| rank.node_id.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            info!(%job_id, ranks = entry.record.ranks, nodes = ?nodes, "job scheduled");

            let instructions = state.start_instructions(&job_id);
            let mut unreachable = None;
            for (node_id, start) in instructions {
                if !state.send(&node_id, instruction::Kind::StartRank(start)) {
                    unreachable = Some(node_id);
                    break;
                }
            }
            if let Some(node_id) = unreachable {
                self.finish_job(
                    &mut state,
                    &job_id,
                    JobState::Failed,
                    format!("node {node_id} could not be reached to start a rank"),
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_port_stays_in_range() {
        for seq in [0, 1, 2, 12_345, u64::MAX / 8000] {
            let port = master_port(seq);
            assert!((MASTER_PORT_BASE..MASTER_PORT_BASE + MASTER_PORT_RANGE).contains(&port));
        }
        assert_ne!(master_port(1), master_port(2));
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
