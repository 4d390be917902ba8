//! Gang placement: which devices of which nodes each queued job's ranks get.
//!
//! A pure function of the cluster's free devices and the queue, so it can be tested (with
//! property tests) apart from the scheduler loop that applies and persists its result.
//! [`place`] decides what starts now; [`check_could_ever_fit`] decides, at submission, whether a
//! job could start on this cluster at all (so it is rejected instead of queued forever).
//!
//! Rules:
//! - A job is placed whole or not at all (gang scheduling); every rank gets `devices_per_rank`
//!   devices of the job's kind on a single node; no device is given twice, neither within one
//!   job nor across the jobs placed by the same call (each placement is taken out of the free
//!   view before the next job is considered).
//! - Jobs are considered in queue order: higher priority first, then submission order (`seq`).
//!   A job that does not fit now is passed over, and a later job that fits may go before it
//!   (backfill). Nothing is reserved for the passed-over job, so a stream of small jobs can keep
//!   a large one waiting; the scheduler runs `place` again whenever devices are freed.
//! - A job's ranks are packed onto as few nodes as possible. A node's capacity for a job is
//!   `floor(free devices of the job's kind / devices_per_rank)`. Nodes are taken by descending
//!   capacity until the rest of the job fits on one node; the rest then goes to the smallest
//!   node (fewest free devices of the kind) that holds it. So a job that fits on one node goes
//!   to the smallest node that holds it whole (best fit, keeping big nodes free for big jobs),
//!   and a job that needs `k` nodes gets exactly the minimum `k`. Ties are broken by the nodes'
//!   straggler scores (lower first: nodes whose ranks dragged their jobs lately are taken
//!   last), then by node id.
//! - A job with a `rank_group` of `g` > 1 (tensor-parallel groups of consecutive ranks) takes
//!   from every node but the last a multiple of `g` ranks, so no group straddles two nodes,
//!   whenever the job fits that way; otherwise it is placed as if `g` were 1.
//! - Ranks are numbered consecutively node by node in the order the nodes were taken (the first
//!   node gets ranks `0..a` with local ranks `0..a`, the next `a..b` with local ranks
//!   `0..b - a`, ...), and each node hands out its free devices lowest index first.
//! - Jobs asking for zero ranks or zero devices per rank are rejected by spec validation before
//!   they reach the queue; here they are never placed and never cause a panic.

use std::collections::{HashMap, HashSet};

use cohort_jobspec::DeviceKind;
use cohort_proto::{JobId, NodeId};

use index::FreeDevices;

mod index;
pub mod preemption;
pub mod sharing;

pub use preemption::RunningJob;
pub use sharing::{Owner, Sharing};

/// Devices of one ready node, as the scheduler sees them when it calls [`place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node's id; unique within a [`ClusterView`].
    pub node_id: NodeId,
    /// Indices of the node's free devices, per kind (e.g. `Cpu -> [0, 1, 3]`). The indices may
    /// come in any order and duplicates count once; a kind without an entry has none free.
    pub free: HashMap<DeviceKind, Vec<u32>>,
    /// Number of devices of each kind the node has, free or busy; a kind without an entry has
    /// none. Only [`check_could_ever_fit`] reads it; a count below the number of distinct free
    /// indices is read as that number.
    pub total: HashMap<DeviceKind, u32>,
    /// How often its ranks were found straggling lately (0: healthy; see
    /// [`crate::stragglers::NodeScore`]). Among nodes that fit a job equally well, the lower
    /// score is taken first.
    pub straggler_score: u32,
}

impl NodeView {
    /// Returns a node with no devices; add them with [`NodeView::with_devices`] or
    /// [`NodeView::with_all_free`].
    pub fn new(node_id: NodeId) -> Self {
        Self {
            node_id,
            free: HashMap::new(),
            total: HashMap::new(),
            straggler_score: 0,
        }
    }

    /// Returns the node with `total` devices of `kind`, of which those at `free_indices` are
    /// free.
    pub fn with_devices(
        mut self,
        kind: DeviceKind,
        total: u32,
        free_indices: impl IntoIterator<Item = u32>,
    ) -> Self {
        self.total.insert(kind, total);
        self.free.insert(kind, free_indices.into_iter().collect());
        self
    }

    /// Returns the node with `total` devices of `kind`, indexed `0..total`, all free.
    pub fn with_all_free(self, kind: DeviceKind, total: u32) -> Self {
        self.with_devices(kind, total, 0..total)
    }

    /// Returns the free device indices of `kind` as given (any order), empty if none.
    pub fn free_devices(&self, kind: DeviceKind) -> &[u32] {
        self.free.get(&kind).map_or(&[], Vec::as_slice)
    }

    /// Returns how many devices of `kind` the node has, free or busy: the larger of `total` and
    /// the number of distinct free indices.
    pub fn device_count(&self, kind: DeviceKind) -> u64 {
        let total = self.total.get(&kind).copied().unwrap_or(0);
        let distinct_free = self.free_devices(kind).iter().collect::<HashSet<_>>().len();
        u64::from(total).max(distinct_free as u64)
    }
}

/// The ready nodes of the cluster. Node ids are expected to be unique; if one repeats, only its
/// first entry is used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// The nodes, in any order (placement breaks ties by node id, not by position).
    pub nodes: Vec<NodeView>,
}

/// A job waiting in the queue, with what placement needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    /// The job's id.
    pub job_id: JobId,
    /// Scheduling priority; higher goes first.
    pub priority: i32,
    /// Submission sequence number; lower goes first among jobs of equal priority.
    pub seq: u64,
    /// Number of ranks (the gang size).
    pub ranks: u32,
    /// Devices each rank holds, all on the rank's node.
    pub devices_per_rank: u32,
    /// Kind of those devices.
    pub device_kind: DeviceKind,
    /// Size of the groups of consecutive ranks that should share a node where the cluster
    /// allows (a transformer's tensor-parallel groups); 1 for none.
    pub rank_group: u32,
    /// Nodes the job is not placed on (a restarted job's back-off from the node it failed on).
    pub avoid_nodes: Vec<NodeId>,
    /// Fewest ranks the job may run on when the whole gang does not fit (an elastic job's
    /// restart): it is placed with as many ranks as fit, down to this. Equal to `ranks` (or 0)
    /// for a job that runs whole or not at all.
    pub min_ranks: u32,
    /// Its queue and user, whose shares and quotas decide among jobs of equal priority.
    pub owner: Owner,
}

/// Where one rank of a placed job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlacement {
    /// The rank, `0..ranks`.
    pub rank: u32,
    /// The node it runs on.
    pub node_id: NodeId,
    /// Its index among the job's ranks on that node, `0..ranks on the node`.
    pub local_rank: u32,
    /// Indices of the devices (of the job's kind) it holds, ascending.
    pub devices: Vec<u32>,
}

/// A job placed whole: one entry per rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The placed job.
    pub job_id: JobId,
    /// Every rank's placement, ordered by rank (`ranks[i].rank == i`).
    pub ranks: Vec<RankPlacement>,
}

/// Places as many queued jobs as fit, in queue order (priority descending, then `seq`
/// ascending), each whole or not at all.
///
/// A job that does not fit in what is left is skipped and later jobs may still be placed
/// (backfill). Returns the assignments in the order they were made, i.e. in queue order. The
/// queue may be given in any order; jobs of equal priority and `seq` keep their given order.
pub fn place(view: &ClusterView, queue: &[QueuedJob]) -> Vec<Assignment> {
    plan(view, queue, &[], &Sharing::default()).assignments
}

/// What one scheduling pass decides.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The jobs placed now, in queue order.
    pub assignments: Vec<Assignment>,
    /// The queued jobs that take devices from running jobs of lower priority, in queue order.
    /// They are not placed yet: they start once their victims have stopped.
    pub preemptions: Vec<Preemption>,
    /// Every other queued job, with why it waits.
    pub waiting: Vec<Waiting>,
}

/// A queued job that preempts running jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    /// The queued job.
    pub job_id: JobId,
    /// The running jobs to stop now for it (none when the ones already stopping for it
    /// suffice).
    pub new_victims: Vec<JobId>,
    /// Every job it waits for: those already stopping for it, then the new ones.
    pub victims: Vec<JobId>,
}

/// A queued job left waiting by a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The queued job.
    pub job_id: JobId,
    /// Why it waits.
    pub reason: WaitReason,
}

/// Why a queued job waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// The free devices (after the jobs ahead of it in the queue took theirs) hold too few of
    /// its ranks, and no running job it may preempt frees enough.
    Devices {
        /// Ranks it needs (its fewest, for an elastic restart).
        ranks: u32,
        /// Devices per rank.
        devices_per_rank: u32,
        /// Their kind.
        kind: DeviceKind,
        /// How many of its ranks the free devices hold, on how many nodes.
        room: u64,
        /// Nodes with room for at least one of its ranks.
        nodes: u64,
    },
    /// There is room for its ranks, but not on the nodes it may use (it backs off from nodes
    /// it failed on, or its groups do not fit).
    AvoidedNodes,
    /// The free devices held it when the pass began, but jobs considered before it (of
    /// higher priority, or of a queue or user with a lower fair share) took them.
    TakenAhead,
    /// Its queue's device quota would be exceeded.
    QueueQuota {
        /// The queue.
        queue: String,
        /// Its quota.
        quota: u64,
        /// Devices its running jobs hold.
        held: u64,
        /// Devices the job asks for.
        asked: u64,
    },
    /// Its user's device quota would be exceeded.
    UserQuota {
        /// The user.
        user: String,
        /// The quota.
        quota: u64,
        /// Devices the user's running jobs hold.
        held: u64,
        /// Devices the job asks for.
        asked: u64,
    },
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitReason::Devices {
                ranks,
                devices_per_rank,
                kind,
                room,
                nodes,
            } => write!(
                formatter,
                "not enough free devices: room for {room} of its {} ({} each) on {}",
                counted(u64::from(*ranks), "rank"),
                counted(
                    u64::from(*devices_per_rank),
                    &format!("{} device", device_kind_name(*kind))
                ),
                counted(*nodes, "node"),
            ),
            WaitReason::AvoidedNodes => write!(
                formatter,
                "the free devices that would hold it are on nodes it keeps off after failures"
            ),
            WaitReason::TakenAhead => write!(
                formatter,
                "jobs of higher priority or of a lower fair share took the free devices first"
            ),
            WaitReason::QueueQuota {
                queue,
                quota,
                held,
                asked,
            } => write!(
                formatter,
                "queue {queue}'s quota of {} is reached: it holds {held}, the job asks for {asked}",
                counted(*quota, "device")
            ),
            WaitReason::UserQuota {
                user,
                quota,
                held,
                asked,
            } => write!(
                formatter,
                "user {user}'s quota of {} is reached: they hold {held}, the job asks for {asked}",
                counted(*quota, "device")
            ),
        }
    }
}

/// One scheduling pass: considers the queued jobs in fair-share order ([`sharing`]: priority,
/// then the lowest queue share, then the lowest user share, then submission), holds back the
/// jobs over a quota, places every other job that fits (as [`place`] does) and, for a job
/// that does not, chooses running jobs of strictly lower priority to preempt ([`preemption`]).
/// A job that preempts holds on, for the rest of the pass, to the free devices it will use
/// with its victims' devices, so that jobs behind it cannot take them (no backfill into a
/// preemptor's place).
///
/// `running` lists the jobs that hold devices and may be preempted; pass none to disable
/// preemption.
pub fn plan(
    view: &ClusterView,
    queue: &[QueuedJob],
    running: &[RunningJob],
    sharing: &Sharing,
) -> Plan {
    let mut free_devices = FreeDevices::from_view(view);
    let mut candidates = preemption::Candidates::new(running);
    let mut order = sharing::FairOrder::new(sharing, queue);
    let mut plan = Plan::default();
    while let Some(job) = order.next_job() {
        if let Some(reason) = order.over_quota(job) {
            plan.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason,
            });
        } else if let Some(assignment) = free_devices.place_job(job) {
            order.handed(job, assignment.ranks.len());
            plan.assignments.push(assignment);
        } else if let Some(preemption) = candidates.preempt_for(&mut free_devices, job) {
            order.handed(job, index::fewest_ranks(job) as usize);
            plan.preemptions.push(preemption);
        } else {
            plan.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: free_devices.wait_reason(job),
            });
        }
    }
    plan
}

/// Checks whether `job` could ever be placed on this cluster, i.e. with every device of every
/// node free (this reads the nodes' `total`, not what is free now).
///
/// On failure returns a message naming what is short, e.g. `job asks for 6 ranks x 1 cpu
/// device, the cluster has at most 4 cpu devices (2 nodes)` or `job asks for 2 ranks x 8 gpu
/// devices, no node has 8 gpu devices (largest: 4)`. It agrees with [`place`]: on a cluster with
/// every device free, `place` places the job exactly when this returns `Ok`.
pub fn check_could_ever_fit(view: &ClusterView, job: &QueuedJob) -> Result<(), String> {
    if job.ranks == 0 {
        return Err("job asks for 0 ranks, expected at least 1".to_string());
    }
    if job.devices_per_rank == 0 {
        return Err("job asks for 0 devices per rank, expected at least 1".to_string());
    }
    let kind = device_kind_name(job.device_kind);
    let devices_per_rank = u64::from(job.devices_per_rank);
    let device_counts: Vec<u64> = unique_nodes(view)
        .map(|node| node.device_count(job.device_kind))
        .collect();
    let node_count = counted(device_counts.len() as u64, "node");
    let device_total: u64 = device_counts.iter().sum();
    let largest_node = device_counts.iter().copied().max().unwrap_or(0);
    let rank_capacity: u64 = device_counts
        .iter()
        .map(|count| count / devices_per_rank)
        .sum();
    let asked = format!(
        "job asks for {} x {}",
        counted(u64::from(job.ranks), "rank"),
        counted(devices_per_rank, &format!("{kind} device"))
    );

    if device_total == 0 {
        Err(format!(
            "{asked}, the cluster has no {kind} devices ({node_count})"
        ))
    } else if largest_node < devices_per_rank {
        Err(format!(
            "{asked}, no node has {} (largest: {largest_node})",
            counted(devices_per_rank, &format!("{kind} device"))
        ))
    } else if rank_capacity >= u64::from(job.ranks) {
        Ok(())
    } else if rank_capacity * devices_per_rank == device_total {
        Err(format!(
            "{asked}, the cluster has at most {} ({node_count})",
            counted(device_total, &format!("{kind} device"))
        ))
    } else {
        Err(format!(
            "{asked}, the cluster has room for at most {} of {} ({} on {node_count}; a rank's \
             devices must be on one node)",
            counted(rank_capacity, "rank"),
            counted(devices_per_rank, &format!("{kind} device")),
            counted(device_total, &format!("{kind} device")),
        ))
    }
}

/// Returns the name a job spec uses for `kind`.
fn device_kind_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Gpu => "gpu",
    }
}

/// Returns `"1 rank"`, `"2 ranks"`, ...
fn counted(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Returns the nodes of `view`, skipping any whose id already appeared.
fn unique_nodes(view: &ClusterView) -> impl Iterator<Item = &NodeView> {
    let mut seen = HashSet::new();
    view.nodes
        .iter()
        .filter(move |node| seen.insert(&node.node_id))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;

    const CPU: DeviceKind = DeviceKind::Cpu;
    const GPU: DeviceKind = DeviceKind::Gpu;

    fn node_id(text: &str) -> NodeId {
        NodeId::new(text).unwrap()
    }

    /// A node whose only devices are `free` of `kind`, all free, total = their number.
    fn node(id: &str, kind: DeviceKind, free: &[u32]) -> NodeView {
        NodeView::new(node_id(id)).with_devices(kind, free.len() as u32, free.iter().copied())
    }

    /// A cluster of `(node id, cpu slots)` nodes with every slot free.
    fn idle_cpu_cluster(nodes: &[(&str, u32)]) -> ClusterView {
        cluster(
            nodes
                .iter()
                .map(|&(id, slots)| NodeView::new(node_id(id)).with_all_free(CPU, slots))
                .collect(),
        )
    }

    fn cluster(nodes: Vec<NodeView>) -> ClusterView {
        ClusterView { nodes }
    }

    fn job(id: &str, ranks: u32, devices_per_rank: u32, kind: DeviceKind) -> QueuedJob {
        QueuedJob {
            job_id: JobId::new(id).unwrap(),
            priority: 0,
            seq: 0,
            ranks,
            devices_per_rank,
            device_kind: kind,
            rank_group: 1,
            avoid_nodes: Vec::new(),
            min_ranks: 0,
            owner: Owner::default(),
        }
    }

    fn prioritised(mut queued: QueuedJob, priority: i32, seq: u64) -> QueuedJob {
        queued.priority = priority;
        queued.seq = seq;
        queued
    }

    /// Each rank as `node/local_rank:devices`, in rank order, after checking the rank numbers:
    /// `"a/0:0,1 a/1:2,3 b/0:0,1"` is ranks 0 and 1 on node a, rank 2 on node b.
    fn layout(assignment: &Assignment) -> String {
        for (expected_rank, placement) in (0..).zip(&assignment.ranks) {
            assert_eq!(placement.rank, expected_rank);
        }
        let ranks: Vec<String> = assignment
            .ranks
            .iter()
            .map(|placement| {
                let devices: Vec<String> = placement.devices.iter().map(u32::to_string).collect();
                format!(
                    "{}/{}:{}",
                    placement.node_id,
                    placement.local_rank,
                    devices.join(",")
                )
            })
            .collect();
        ranks.join(" ")
    }

    fn placed_job_ids(assignments: &[Assignment]) -> Vec<&str> {
        assignments
            .iter()
            .map(|assignment| assignment.job_id.as_str())
            .collect()
    }

    fn nodes_used(assignment: &Assignment) -> Vec<&str> {
        let mut nodes: Vec<&str> = assignment
            .ranks
            .iter()
            .map(|placement| placement.node_id.as_str())
            .collect();
        nodes.dedup();
        nodes
    }

    #[test]
    fn gang_that_does_not_fit_is_not_placed_at_all() {
        let view = idle_cpu_cluster(&[("a", 2), ("b", 2)]);
        assert!(place(&view, &[job("six", 6, 1, CPU)]).is_empty());
    }

    #[test]
    fn gang_that_fits_across_nodes_is_placed_whole() {
        let view = idle_cpu_cluster(&[("a", 2), ("b", 2), ("c", 2)]);
        let assignments = place(&view, &[job("six", 6, 1, CPU)]);
        assert_eq!(placed_job_ids(&assignments), ["six"]);
        assert_eq!(
            layout(&assignments[0]),
            "a/0:0 a/1:1 b/0:0 b/1:1 c/0:0 c/1:1"
        );
    }

    #[test]
    fn tensor_parallel_groups_stay_on_one_node_where_the_cluster_allows() {
        let view = idle_cpu_cluster(&[("a", 3), ("b", 3)]);
        let ungrouped = place(&view, &[job("four", 4, 1, CPU)]);
        assert_eq!(layout(&ungrouped[0]), "a/0:0 a/1:1 a/2:2 b/0:0");
        let grouped = QueuedJob {
            rank_group: 2,
            ..job("four", 4, 1, CPU)
        };
        assert_eq!(
            layout(&place(&view, &[grouped])[0]),
            "a/0:0 a/1:1 b/0:0 b/1:1"
        );
        // When groups cannot all stay whole, the gang is still placed.
        let view = idle_cpu_cluster(&[("a", 3), ("b", 3), ("c", 2)]);
        let grouped = QueuedJob {
            rank_group: 4,
            ..job("eight", 8, 1, CPU)
        };
        assert_eq!(place(&view, &[grouped])[0].ranks.len(), 8);
    }

    #[test]
    fn an_elastic_job_takes_as_many_ranks_as_fit_down_to_its_fewest() {
        let view = idle_cpu_cluster(&[("a", 1), ("b", 1), ("c", 1)]);
        let elastic = |min_ranks| QueuedJob {
            min_ranks,
            ..job("elastic", 4, 1, CPU)
        };
        assert_eq!(place(&view, &[elastic(2)])[0].ranks.len(), 3);
        assert!(
            place(&view, &[elastic(4)]).is_empty(),
            "whole or not at all"
        );
        assert!(place(&view, &[elastic(0)]).is_empty(), "0: not elastic");
        // A job ahead of it in the queue leaves it one node: under its fewest, it waits.
        let first = prioritised(job("first", 2, 1, CPU), 1, 0);
        let placed = place(&view, &[first, prioritised(elastic(2), 0, 1)]);
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].job_id.as_str(), "first");
    }

    #[test]
    fn a_job_is_never_placed_on_a_node_it_avoids() {
        let view = idle_cpu_cluster(&[("a", 2), ("b", 1), ("c", 1)]);
        let avoiding = QueuedJob {
            avoid_nodes: vec![node_id("a")],
            ..job("two", 2, 1, CPU)
        };
        assert_eq!(nodes_used(&place(&view, &[avoiding])[0]), ["b", "c"]);
        let stuck = QueuedJob {
            avoid_nodes: vec![node_id("a"), node_id("b")],
            ..job("two", 2, 1, CPU)
        };
        assert!(place(&view, &[stuck]).is_empty(), "one free slot is left");
    }

    #[test]
    fn job_that_fits_one_node_goes_to_the_smallest_node_that_holds_it() {
        let view = idle_cpu_cluster(&[("big", 8), ("medium", 4), ("small", 2)]);
        let assignments = place(&view, &[job("three", 3, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["medium"]);
        let assignments = place(&view, &[job("two", 2, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["small"]);
        let assignments = place(&view, &[job("five", 5, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["big"]);
    }

    #[test]
    fn best_fit_compares_free_devices_not_only_capacity() {
        // Both nodes hold one rank of 2; "tight" has no device left over.
        let view = cluster(vec![
            node("loose", GPU, &[0, 1, 2]),
            node("tight", GPU, &[0, 1]),
        ]);
        let assignments = place(&view, &[job("pair", 1, 2, GPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["tight"]);
    }

    #[test]
    fn ties_are_broken_by_node_id_whatever_the_view_order() {
        let view = idle_cpu_cluster(&[("c", 2), ("a", 2), ("b", 2)]);
        let assignments = place(&view, &[job("one", 1, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["a"]);
        let assignments = place(&view, &[job("five", 5, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["a", "b", "c"]);
    }

    #[test]
    fn job_too_big_for_one_node_fills_largest_nodes_first() {
        let view = idle_cpu_cluster(&[("a", 1), ("b", 3), ("c", 5), ("d", 3)]);
        // 5 + 3 holds 8 on two nodes; taking small nodes first would need all four.
        let assignments = place(&view, &[job("eight", 8, 1, CPU)]);
        assert_eq!(
            layout(&assignments[0]),
            "c/0:0 c/1:1 c/2:2 c/3:3 c/4:4 b/0:0 b/1:1 b/2:2"
        );
    }

    #[test]
    fn remainder_of_a_multi_node_job_goes_to_the_smallest_node_that_holds_it() {
        let view = idle_cpu_cluster(&[("huge", 6), ("large", 4), ("small", 2)]);
        // Two nodes are needed either way; 6 + 2 keeps the 4-slot node free.
        let assignments = place(&view, &[job("seven", 7, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["huge", "small"]);
        let assignments = place(&view, &[job("seven", 7, 1, CPU), job("four", 4, 1, CPU)]);
        assert_eq!(placed_job_ids(&assignments), ["seven", "four"]);
        assert_eq!(nodes_used(&assignments[1]), ["large"]);
    }

    #[test]
    fn capacity_counts_whole_ranks_only() {
        // 5 free gpus hold 2 ranks of 2; the fifth gpu cannot hold a rank on its own.
        let view = cluster(vec![node("a", GPU, &[0, 1, 2, 3, 4]), node("b", GPU, &[0])]);
        assert!(place(&view, &[job("three", 3, 2, GPU)]).is_empty());
        let assignments = place(&view, &[job("two", 2, 2, GPU)]);
        assert_eq!(layout(&assignments[0]), "a/0:0,1 a/1:2,3");
    }

    #[test]
    fn among_nodes_that_fit_equally_the_one_without_stragglers_is_taken() {
        let scored = |id: &str, score: u32| NodeView {
            straggler_score: score,
            ..node(id, CPU, &[0, 1])
        };
        let view = ClusterView {
            nodes: vec![scored("a", 2), scored("b", 0), scored("c", 1)],
        };
        let placed = place(&view, &[job("one", 1, 2, CPU)]);
        assert_eq!(placed[0].ranks[0].node_id, node_id("b"));
        // Fitting comes first: a job that needs two nodes takes the two healthiest.
        let placed = place(&view, &[job("two", 2, 2, CPU)]);
        let nodes: Vec<_> = placed[0]
            .ranks
            .iter()
            .map(|rank| rank.node_id.clone())
            .collect();
        assert_eq!(nodes, vec![node_id("b"), node_id("c")]);
    }

    #[test]
    fn devices_are_given_lowest_index_first_from_unsorted_free_lists() {
        let view = cluster(vec![node("a", GPU, &[7, 1, 5, 3])]);
        let assignments = place(&view, &[job("pairs", 2, 2, GPU)]);
        assert_eq!(layout(&assignments[0]), "a/0:1,3 a/1:5,7");
    }

    #[test]
    fn device_kind_is_respected() {
        let view = cluster(vec![
            node("cpus", CPU, &[0, 1, 2, 3]),
            NodeView::new(node_id("mixed"))
                .with_all_free(CPU, 1)
                .with_all_free(GPU, 2),
        ]);
        let assignments = place(&view, &[job("gpu-job", 1, 2, GPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["mixed"]);
        assert!(place(&view, &[job("gpu-job", 3, 1, GPU)]).is_empty());
        let assignments = place(&view, &[job("cpu-job", 5, 1, CPU)]);
        assert_eq!(nodes_used(&assignments[0]), ["cpus", "mixed"]);
    }

    #[test]
    fn no_device_is_given_twice_across_jobs_of_one_call() {
        let view = idle_cpu_cluster(&[("a", 3)]);
        let assignments = place(
            &view,
            &[
                prioritised(job("first", 2, 1, CPU), 0, 1),
                prioritised(job("second", 2, 1, CPU), 0, 2),
                prioritised(job("third", 1, 1, CPU), 0, 3),
            ],
        );
        assert_eq!(placed_job_ids(&assignments), ["first", "third"]);
        assert_eq!(layout(&assignments[0]), "a/0:0 a/1:1");
        assert_eq!(layout(&assignments[1]), "a/0:2");
    }

    #[test]
    fn busy_devices_are_not_given() {
        let view = cluster(vec![
            NodeView::new(node_id("a")).with_devices(CPU, 4, [2]),
            NodeView::new(node_id("b")).with_devices(CPU, 4, []),
        ]);
        assert!(place(&view, &[job("two", 2, 1, CPU)]).is_empty());
        let assignments = place(&view, &[job("one", 1, 1, CPU)]);
        assert_eq!(layout(&assignments[0]), "a/0:2");
    }

    #[test]
    fn higher_priority_goes_first_whatever_the_submission_order() {
        let view = idle_cpu_cluster(&[("a", 2)]);
        let assignments = place(
            &view,
            &[
                prioritised(job("early-low", 2, 1, CPU), 0, 1),
                prioritised(job("late-high", 2, 1, CPU), 5, 2),
            ],
        );
        assert_eq!(placed_job_ids(&assignments), ["late-high"]);
    }

    #[test]
    fn equal_priority_goes_first_in_first_out() {
        let view = idle_cpu_cluster(&[("a", 3)]);
        let assignments = place(
            &view,
            &[
                prioritised(job("third", 1, 1, CPU), 1, 30),
                prioritised(job("second", 2, 1, CPU), 1, 20),
                prioritised(job("first", 1, 1, CPU), 1, 10),
            ],
        );
        // 1 + 2 slots: the third job finds none left.
        assert_eq!(placed_job_ids(&assignments), ["first", "second"]);
    }

    #[test]
    fn later_job_that_fits_backfills_around_one_that_does_not() {
        let view = idle_cpu_cluster(&[("a", 2), ("b", 2)]);
        let assignments = place(
            &view,
            &[
                prioritised(job("wide", 3, 1, CPU), 9, 1),
                prioritised(job("too-wide", 3, 1, CPU), 9, 2),
                prioritised(job("narrow", 1, 1, CPU), 0, 3),
            ],
        );
        assert_eq!(placed_job_ids(&assignments), ["wide", "narrow"]);
    }

    #[test]
    fn zero_sized_jobs_are_never_placed_and_never_panic() {
        let view = idle_cpu_cluster(&[("a", 2)]);
        let queue = [job("no-ranks", 0, 1, CPU), job("no-devices", 2, 0, CPU)];
        assert!(place(&view, &queue).is_empty());
        assert!(place(&ClusterView::default(), &queue).is_empty());
        assert_eq!(
            check_could_ever_fit(&view, &queue[0]).unwrap_err(),
            "job asks for 0 ranks, expected at least 1"
        );
        assert_eq!(
            check_could_ever_fit(&view, &queue[1]).unwrap_err(),
            "job asks for 0 devices per rank, expected at least 1"
        );
    }

    #[test]
    fn huge_requests_do_not_overflow() {
        let view = idle_cpu_cluster(&[("a", 4)]);
        let queue = [
            job("many-ranks", u32::MAX, 1, CPU),
            job("many-devices", 1, u32::MAX, CPU),
            job("both", u32::MAX, u32::MAX, CPU),
        ];
        assert!(place(&view, &queue).is_empty());
        for queued in &queue {
            assert!(check_could_ever_fit(&view, queued).is_err());
        }
    }

    #[test]
    fn repeated_node_ids_and_free_indices_are_counted_once() {
        let view = cluster(vec![
            NodeView::new(node_id("a")).with_devices(CPU, 2, [1, 0, 0]),
            node("a", CPU, &[0, 1, 2, 3]),
        ]);
        assert!(place(&view, &[job("three", 3, 1, CPU)]).is_empty());
        let assignments = place(&view, &[job("two", 2, 1, CPU)]);
        assert_eq!(layout(&assignments[0]), "a/0:0 a/1:1");
        assert!(check_could_ever_fit(&view, &job("three", 3, 1, CPU)).is_err());
    }

    #[test]
    fn could_ever_fit_reads_totals_not_free_devices() {
        let view = cluster(vec![
            NodeView::new(node_id("a")).with_devices(CPU, 2, []),
            NodeView::new(node_id("b")).with_devices(CPU, 2, [1]),
        ]);
        let four = job("four", 4, 1, CPU);
        assert!(place(&view, std::slice::from_ref(&four)).is_empty());
        assert_eq!(check_could_ever_fit(&view, &four), Ok(()));
    }

    #[test]
    fn could_ever_fit_names_the_missing_devices() {
        let view = idle_cpu_cluster(&[("a", 2), ("b", 2)]);
        assert_eq!(
            check_could_ever_fit(&view, &job("six", 6, 1, CPU)).unwrap_err(),
            "job asks for 6 ranks x 1 cpu device, the cluster has at most 4 cpu devices (2 nodes)"
        );
        assert_eq!(
            check_could_ever_fit(&view, &job("gpu", 1, 1, GPU)).unwrap_err(),
            "job asks for 1 rank x 1 gpu device, the cluster has no gpu devices (2 nodes)"
        );
        assert_eq!(
            check_could_ever_fit(&ClusterView::default(), &job("any", 1, 1, CPU)).unwrap_err(),
            "job asks for 1 rank x 1 cpu device, the cluster has no cpu devices (0 nodes)"
        );
    }

    #[test]
    fn could_ever_fit_names_the_largest_node_when_a_rank_is_too_wide() {
        let view = cluster(vec![
            NodeView::new(node_id("a")).with_all_free(GPU, 4),
            NodeView::new(node_id("b")).with_all_free(GPU, 2),
        ]);
        assert_eq!(
            check_could_ever_fit(&view, &job("wide", 2, 8, GPU)).unwrap_err(),
            "job asks for 2 ranks x 8 gpu devices, no node has 8 gpu devices (largest: 4)"
        );
        assert_eq!(check_could_ever_fit(&view, &job("fits", 3, 2, GPU)), Ok(()));
    }

    #[test]
    fn could_ever_fit_explains_devices_split_across_nodes() {
        // 9 gpus in all, but 3 per node hold only one rank of 2 each.
        let view = cluster(vec![
            NodeView::new(node_id("a")).with_all_free(GPU, 3),
            NodeView::new(node_id("b")).with_all_free(GPU, 3),
            NodeView::new(node_id("c")).with_all_free(GPU, 3),
        ]);
        assert_eq!(
            check_could_ever_fit(&view, &job("four", 4, 2, GPU)).unwrap_err(),
            "job asks for 4 ranks x 2 gpu devices, the cluster has room for at most 3 ranks of \
             2 gpu devices (9 gpu devices on 3 nodes; a rank's devices must be on one node)"
        );
        assert_eq!(
            check_could_ever_fit(&view, &job("three", 3, 2, GPU)),
            Ok(())
        );
    }

    // Property tests over random clusters and queues.

    /// Free device sets per (node, kind), as the properties replay placements.
    type ReplayState = HashMap<(NodeId, DeviceKind), BTreeSet<u32>>;

    /// A node with `total` devices of each kind and a random (shuffled) subset of them free.
    fn arbitrary_devices() -> impl Strategy<Value = (u32, Vec<u32>)> {
        prop::collection::vec(any::<bool>(), 0..=8).prop_flat_map(|free_mask| {
            let total = free_mask.len() as u32;
            let free: Vec<u32> = (0..total)
                .filter(|&index| free_mask[index as usize])
                .collect();
            (Just(total), Just(free).prop_shuffle())
        })
    }

    /// 1 to 8 nodes with 0 to 8 devices of each kind, given in shuffled order.
    fn arbitrary_cluster() -> impl Strategy<Value = ClusterView> {
        prop::collection::vec((arbitrary_devices(), arbitrary_devices()), 1..=8)
            .prop_map(|nodes| {
                nodes
                    .into_iter()
                    .enumerate()
                    .map(|(index, ((cpu_total, cpu_free), (gpu_total, gpu_free)))| {
                        NodeView::new(node_id(&format!("node-{index}")))
                            .with_devices(CPU, cpu_total, cpu_free)
                            .with_devices(GPU, gpu_total, gpu_free)
                    })
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
            .prop_map(cluster)
    }

    /// 1 to 10 jobs with distinct, shuffled sequence numbers; a few ask for zero of something.
    fn arbitrary_queue() -> impl Strategy<Value = Vec<QueuedJob>> {
        let arbitrary_job = (
            -2..=2i32,
            prop_oneof![1 => Just(0u32), 12 => 1..=12u32],
            prop_oneof![1 => Just(0u32), 9 => 1..=4u32],
            prop_oneof![Just(CPU), Just(GPU)],
        );
        prop::collection::vec(arbitrary_job, 1..=10).prop_flat_map(|jobs| {
            let seqs: Vec<u64> = (0..jobs.len() as u64).collect();
            (Just(jobs), Just(seqs).prop_shuffle()).prop_map(|(jobs, seqs)| {
                jobs.into_iter()
                    .zip(seqs)
                    .enumerate()
                    .map(
                        |(index, ((priority, ranks, devices_per_rank, kind), seq))| QueuedJob {
                            job_id: JobId::new(format!("job-{index}")).unwrap(),
                            priority,
                            seq,
                            ranks,
                            devices_per_rank,
                            device_kind: kind,
                            rank_group: 1,
                            avoid_nodes: Vec::new(),
                            min_ranks: 0,
                            owner: Owner::default(),
                        },
                    )
                    .collect()
            })
        })
    }

    fn replay_state(view: &ClusterView) -> ReplayState {
        let mut state = ReplayState::new();
        for node in &view.nodes {
            for kind in [CPU, GPU] {
                state.insert(
                    (node.node_id.clone(), kind),
                    node.free_devices(kind).iter().copied().collect(),
                );
            }
        }
        state
    }

    /// The fewest nodes whose free devices hold `queued`, from the free sets alone: the least
    /// `k` such that the `k` largest capacities sum to at least `ranks`.
    fn reference_minimum_nodes(state: &ReplayState, queued: &QueuedJob) -> Option<usize> {
        let mut capacities: Vec<u64> = state
            .iter()
            .filter(|((_, kind), _)| *kind == queued.device_kind)
            .map(|(_, free)| free.len() as u64 / u64::from(queued.devices_per_rank))
            .collect();
        capacities.sort_unstable_by(|left, right| right.cmp(left));
        let mut held = 0;
        for (count, capacity) in capacities.into_iter().enumerate() {
            held += capacity;
            if held >= u64::from(queued.ranks) {
                return Some(count + 1);
            }
        }
        None
    }

    /// Replays `assignments` over `view` in queue order and checks every rule on the way.
    fn check_assignments(
        view: &ClusterView,
        queue: &[QueuedJob],
        assignments: &[Assignment],
    ) -> Result<(), TestCaseError> {
        let mut ordered: Vec<&QueuedJob> = queue.iter().collect();
        ordered.sort_by_key(|queued| (-i64::from(queued.priority), queued.seq));
        let expected_order: Vec<&JobId> = ordered.iter().map(|queued| &queued.job_id).collect();

        let mut by_job: HashMap<&JobId, &Assignment> = HashMap::new();
        for assignment in assignments {
            prop_assert!(
                by_job.insert(&assignment.job_id, assignment).is_none(),
                "{} placed twice",
                assignment.job_id
            );
        }
        let placed_order: Vec<&JobId> = expected_order
            .iter()
            .copied()
            .filter(|job_id| by_job.contains_key(job_id))
            .collect();
        let returned_order: Vec<&JobId> = assignments.iter().map(|a| &a.job_id).collect();
        prop_assert_eq!(
            returned_order,
            placed_order,
            "assignments not in queue order"
        );

        let mut state = replay_state(view);
        for queued in ordered {
            let zero_sized = queued.ranks == 0 || queued.devices_per_rank == 0;
            let minimum_nodes = if zero_sized {
                None
            } else {
                reference_minimum_nodes(&state, queued)
            };
            let Some(assignment) = by_job.get(&queued.job_id) else {
                // Not placed: it must not have fit in what the jobs ahead of it left.
                prop_assert!(
                    minimum_nodes.is_none(),
                    "{} was skipped but fits on {:?} nodes",
                    queued.job_id,
                    minimum_nodes
                );
                continue;
            };
            prop_assert!(
                !zero_sized,
                "{} asks for nothing but was placed",
                queued.job_id
            );

            // The gang is whole: ranks 0..n in order, each with devices_per_rank devices.
            let ranks: Vec<u32> = assignment.ranks.iter().map(|p| p.rank).collect();
            prop_assert_eq!(ranks, (0..queued.ranks).collect::<Vec<_>>());
            for placement in &assignment.ranks {
                prop_assert_eq!(placement.devices.len(), queued.devices_per_rank as usize);
            }

            // Ranks are consecutive per node with local ranks 0..m, and each node gives its
            // lowest free devices of the job's kind, each at most once.
            let mut node_order: Vec<&NodeId> = Vec::new();
            let mut devices_per_node: HashMap<&NodeId, Vec<u32>> = HashMap::new();
            for placement in &assignment.ranks {
                if node_order.last() != Some(&&placement.node_id) {
                    prop_assert!(
                        !node_order.contains(&&placement.node_id),
                        "ranks on {} are not consecutive",
                        placement.node_id
                    );
                    node_order.push(&placement.node_id);
                }
                let devices = devices_per_node.entry(&placement.node_id).or_default();
                prop_assert_eq!(
                    placement.local_rank as usize,
                    devices.len() / queued.devices_per_rank as usize
                );
                devices.extend(&placement.devices);
            }
            prop_assert_eq!(
                Some(node_order.len()),
                minimum_nodes,
                "not packed minimally"
            );
            for (node, devices) in devices_per_node {
                let free = state
                    .get_mut(&(node.clone(), queued.device_kind))
                    .ok_or_else(|| TestCaseError::fail(format!("unknown node {node}")))?;
                let lowest: Vec<u32> = free.iter().copied().take(devices.len()).collect();
                prop_assert_eq!(
                    &devices,
                    &lowest,
                    "not lowest free devices first on {}",
                    node
                );
                for device in devices {
                    prop_assert!(
                        free.remove(&device),
                        "device {} on {} given twice",
                        device,
                        node
                    );
                }
            }
        }
        Ok(())
    }

    /// The same cluster with every device free.
    fn idle(view: &ClusterView) -> ClusterView {
        let mut idle_view = view.clone();
        for node in &mut idle_view.nodes {
            for kind in [CPU, GPU] {
                let total = node.total.get(&kind).copied().unwrap_or(0);
                node.free.insert(kind, (0..total).collect());
            }
        }
        idle_view
    }

    proptest! {
        #[test]
        fn placements_follow_every_rule(view in arbitrary_cluster(), queue in arbitrary_queue()) {
            let assignments = place(&view, &queue);
            check_assignments(&view, &queue, &assignments)?;
        }

        #[test]
        fn placements_do_not_depend_on_input_order(
            view in arbitrary_cluster(),
            queue in arbitrary_queue(),
        ) {
            let mut reordered_view = view.clone();
            reordered_view.nodes.reverse();
            for node in &mut reordered_view.nodes {
                for free in node.free.values_mut() {
                    free.reverse();
                }
            }
            let mut reordered_queue = queue.clone();
            reordered_queue.reverse();
            prop_assert_eq!(place(&view, &queue), place(&reordered_view, &reordered_queue));
        }

        #[test]
        fn could_ever_fit_agrees_with_place_on_an_idle_cluster(
            view in arbitrary_cluster(),
            queue in arbitrary_queue(),
        ) {
            let idle_view = idle(&view);
            let placed_now: HashSet<JobId> =
                place(&view, &queue).into_iter().map(|a| a.job_id).collect();
            for queued in &queue {
                let placed_when_idle = !place(&idle_view, std::slice::from_ref(queued)).is_empty();
                let verdict = check_could_ever_fit(&view, queued);
                prop_assert_eq!(placed_when_idle, verdict.is_ok(), "{:?}: {:?}", queued, verdict);
                if placed_now.contains(&queued.job_id) {
                    prop_assert!(verdict.is_ok(), "{} placed but never fits", queued.job_id);
                }
            }
        }
    }
}
