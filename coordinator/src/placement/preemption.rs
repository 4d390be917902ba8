//! Preemption: which running jobs a queued job that does not fit may stop to make room.
//!
//! Rules (checked by property tests against a brute force over every subset):
//! - Only running jobs of strictly lower priority, holding devices of the queued job's kind,
//!   that may be preempted now ([`RunningJob::preemptible`]: opted in and not protected after
//!   an earlier preemption) and are not already stopping for another job are candidates.
//! - Candidates are taken lowest priority first, then least progress lost, then youngest,
//!   until the free devices plus theirs hold the job's gang (its fewest ranks, for an elastic
//!   restart) on whole nodes' worth of devices per rank; then every chosen victim that is not
//!   needed is spared, the latest taken first. What is left is minimal: sparing any one victim
//!   more leaves the job without room.
//! - Jobs already stopping for the queued job (chosen by an earlier pass) count first; new
//!   victims are chosen only when those are not enough.
//! - A job that preempts holds on to the devices it will be placed on (free ones and its
//!   victims'), so nothing behind it in the queue is placed there meanwhile.
//!
//! Whether a gang fits is the sum over nodes of `floor(free / devices_per_rank)` against its
//! ranks: placement puts a gang wherever that sum suffices (it takes the largest nodes first).

use std::cmp::Reverse;
use std::collections::HashMap;

use cohort_jobspec::DeviceKind;
use cohort_proto::{JobId, NodeId};

use super::index::{FreeDevices, fewest_ranks};
use super::{Preemption, QueuedJob};
use crate::model::UnixMillis;

/// A job that holds devices, as preemption sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob {
    /// The job's id.
    pub job_id: JobId,
    /// Its priority: only strictly higher-priority jobs may preempt it.
    pub priority: i32,
    /// The kind of the devices it holds.
    pub device_kind: DeviceKind,
    /// The devices it holds, per node.
    pub held: Vec<(NodeId, Vec<u32>)>,
    /// Whether it may be preempted now: its spec allows it and it is not protected (a job
    /// that was preempted runs a minimum time before it may be preempted again).
    pub preemptible: bool,
    /// The work lost if it is stopped now, in milliseconds (0 for a job that checkpoints when
    /// asked to stop).
    pub progress_lost_ms: u64,
    /// When its current attempt started: among equals, the youngest is preempted first.
    pub started_at_ms: UnixMillis,
    /// The queued job it is already stopping for, if an earlier pass preempted it.
    pub stopping_for: Option<JobId>,
}

/// The running jobs of one pass: the candidates in the order they are taken, and the jobs
/// already stopping.
pub(super) struct Candidates<'a> {
    /// Candidates per device kind, lowest priority first, then least progress lost, then
    /// youngest, then job id.
    by_kind: HashMap<DeviceKind, Vec<&'a RunningJob>>,
    /// Per kind, whether each candidate was taken by a job earlier in this pass.
    claimed: HashMap<DeviceKind, Vec<bool>>,
    /// The jobs already stopping, per queued job they stop for.
    stopping: HashMap<&'a JobId, Vec<&'a RunningJob>>,
}

impl<'a> Candidates<'a> {
    pub(super) fn new(running: &'a [RunningJob]) -> Self {
        let mut by_kind: HashMap<DeviceKind, Vec<&RunningJob>> = HashMap::new();
        let mut stopping: HashMap<&JobId, Vec<&RunningJob>> = HashMap::new();
        for job in running {
            match &job.stopping_for {
                Some(preemptor) => stopping.entry(preemptor).or_default().push(job),
                None if job.preemptible => by_kind.entry(job.device_kind).or_default().push(job),
                None => {}
            }
        }
        for jobs in by_kind.values_mut() {
            jobs.sort_by_key(|job| {
                (
                    job.priority,
                    job.progress_lost_ms,
                    Reverse(job.started_at_ms),
                    &job.job_id,
                )
            });
        }
        let claimed = by_kind
            .iter()
            .map(|(&kind, jobs)| (kind, vec![false; jobs.len()]))
            .collect();
        Self {
            by_kind,
            claimed,
            stopping,
        }
    }

    /// Chooses the victims that make room for `job` (which does not fit in `free`), claims
    /// them and holds on to the devices `job` will take; returns `None` (changing nothing) when
    /// even every candidate would not make room.
    pub(super) fn preempt_for(
        &mut self,
        free: &mut FreeDevices,
        job: &QueuedJob,
    ) -> Option<Preemption> {
        let ranks = u64::from(fewest_ranks(job));
        let devices_per_rank = job.devices_per_rank as usize;
        if ranks == 0 || devices_per_rank == 0 {
            return None;
        }
        let stopping: &[&RunningJob] = self.stopping.get(&job.job_id).map_or(&[], Vec::as_slice);
        let mut room = Room::new(free, job);
        for victim in stopping {
            room.add(victim);
        }
        let mut chosen: Vec<usize> = Vec::new();
        if room.ranks < ranks {
            let candidates = self.by_kind.get(&job.device_kind)?;
            let claimed = &self.claimed[&job.device_kind];
            for (position, candidate) in candidates.iter().enumerate() {
                if candidate.priority >= job.priority {
                    break;
                }
                if claimed[position] {
                    continue;
                }
                room.add(candidate);
                chosen.push(position);
                if room.ranks >= ranks {
                    break;
                }
            }
            if room.ranks < ranks {
                return None;
            }
            // Spare every victim not needed, the latest taken (the most valuable) first.
            let mut index = chosen.len();
            while index > 0 {
                index -= 1;
                let victim = candidates[chosen[index]];
                room.remove(victim);
                if room.ranks >= ranks {
                    chosen.remove(index);
                } else {
                    room.add(victim);
                }
            }
        }
        let new_victims: Vec<&RunningJob> = match self.by_kind.get(&job.device_kind) {
            Some(candidates) => chosen
                .iter()
                .map(|&position| candidates[position])
                .collect(),
            None => Vec::new(),
        };
        if let Some(claimed) = self.claimed.get_mut(&job.device_kind) {
            for &position in &chosen {
                claimed[position] = true;
            }
        }
        hold_devices_for(free, job, stopping.iter().chain(&new_victims).copied());
        Some(Preemption {
            job_id: job.job_id.clone(),
            new_victims: new_victims
                .iter()
                .map(|victim| victim.job_id.clone())
                .collect(),
            victims: stopping
                .iter()
                .chain(&new_victims)
                .map(|victim| victim.job_id.clone())
                .collect(),
        })
    }
}

/// Places `job` on the free devices plus its victims' devices and keeps what it takes out of
/// the free devices; the victims' other devices stay held.
fn hold_devices_for<'a>(
    free: &mut FreeDevices,
    job: &QueuedJob,
    victims: impl Iterator<Item = &'a RunningJob>,
) {
    let kind = job.device_kind;
    let lent: Vec<(usize, &[u32])> = victims
        .flat_map(|victim| &victim.held)
        .filter_map(|(node_id, devices)| {
            free.position(node_id)
                .map(|position| (position, devices.as_slice()))
        })
        .collect();
    for &(position, devices) in &lent {
        free.give(position, kind, devices);
    }
    // It fits by construction; whether or not, every lent device is taken back below.
    let _held_for_it = free.place_job(job);
    for (position, devices) in lent {
        free.withdraw(position, kind, devices);
    }
}

/// How many of a job's ranks the free devices plus its chosen victims' devices hold.
struct Room<'a> {
    free: &'a FreeDevices,
    kind: DeviceKind,
    devices_per_rank: usize,
    /// Nodes the job keeps off: their devices never count.
    avoided: Vec<usize>,
    /// Devices the chosen victims free, per node position.
    extra: HashMap<usize, usize>,
    /// The ranks held.
    ranks: u64,
}

impl<'a> Room<'a> {
    fn new(free: &'a FreeDevices, job: &QueuedJob) -> Self {
        let kind = job.device_kind;
        let devices_per_rank = job.devices_per_rank as usize;
        let mut avoided: Vec<usize> = job
            .avoid_nodes
            .iter()
            .filter_map(|node_id| free.position(node_id))
            .collect();
        avoided.sort_unstable();
        avoided.dedup();
        let avoided_room: u64 = avoided
            .iter()
            .map(|&position| (free.free_of(position, kind).len() / devices_per_rank) as u64)
            .sum();
        Self {
            ranks: free.rank_room(kind, devices_per_rank) - avoided_room,
            free,
            kind,
            devices_per_rank,
            avoided,
            extra: HashMap::new(),
        }
    }

    fn add(&mut self, victim: &RunningJob) {
        self.change(victim, true);
    }

    fn remove(&mut self, victim: &RunningJob) {
        self.change(victim, false);
    }

    fn change(&mut self, victim: &RunningJob, adding: bool) {
        if victim.device_kind != self.kind {
            return;
        }
        for (node_id, devices) in &victim.held {
            let Some(position) = self.free.position(node_id) else {
                continue;
            };
            if self.avoided.binary_search(&position).is_ok() {
                continue;
            }
            let base = self.free.free_of(position, self.kind).len();
            let extra = self.extra.entry(position).or_default();
            let before = (base + *extra) / self.devices_per_rank;
            if adding {
                *extra += devices.len();
            } else {
                *extra -= devices.len();
            }
            let after = (base + *extra) / self.devices_per_rank;
            self.ranks = self.ranks + after as u64 - before as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;

    use super::*;
    use crate::placement::{self, ClusterView, NodeView, Owner, Plan, Sharing};

    const GPU: DeviceKind = DeviceKind::Gpu;

    fn id(text: &str) -> JobId {
        JobId::new(text).unwrap()
    }

    fn node(text: &str) -> NodeId {
        NodeId::new(text).unwrap()
    }

    fn queued(name: &str, priority: i32, ranks: u32, devices_per_rank: u32) -> QueuedJob {
        QueuedJob {
            job_id: id(name),
            priority,
            seq: 0,
            ranks,
            devices_per_rank,
            device_kind: GPU,
            rank_group: 1,
            avoid_nodes: Vec::new(),
            min_ranks: 0,
            owner: Owner::default(),
        }
    }

    fn running(name: &str, priority: i32, held: &[(&str, &[u32])]) -> RunningJob {
        RunningJob {
            job_id: id(name),
            priority,
            device_kind: GPU,
            held: held
                .iter()
                .map(|(node_id, devices)| (node(node_id), devices.to_vec()))
                .collect(),
            preemptible: true,
            progress_lost_ms: 0,
            started_at_ms: 0,
            stopping_for: None,
        }
    }

    /// Nodes of `total` gpus, with the devices the `running` jobs hold taken.
    fn cluster(nodes: &[(&str, u32)], running: &[RunningJob]) -> ClusterView {
        let nodes = nodes
            .iter()
            .map(|&(name, total)| {
                let held: HashSet<u32> = running
                    .iter()
                    .flat_map(|job| &job.held)
                    .filter(|(node_id, _)| node_id.as_str() == name)
                    .flat_map(|(_, devices)| devices.iter().copied())
                    .collect();
                NodeView::new(node(name)).with_devices(
                    GPU,
                    total,
                    (0..total).filter(|device| !held.contains(device)),
                )
            })
            .collect();
        ClusterView { nodes }
    }

    fn victims(plan: &Plan) -> Vec<Vec<&str>> {
        plan.preemptions
            .iter()
            .map(|preemption| preemption.victims.iter().map(JobId::as_str).collect())
            .collect()
    }

    #[test]
    fn the_lowest_priority_goes_first_and_no_more_than_needed() {
        let running = [
            running("mid", 5, &[("a", &[0, 1])]),
            running("low", 0, &[("b", &[0, 1])]),
            running("lower-but-small", -1, &[("a", &[2])]),
        ];
        let view = cluster(&[("a", 3), ("b", 2)], &running);
        let plan = placement::plan(
            &view,
            &[queued("urgent", 10, 2, 1)],
            &running,
            &Sharing::default(),
        );
        assert!(plan.assignments.is_empty());
        // "lower-but-small" alone holds one rank; "low" then holds both, and the small one is
        // no longer needed.
        assert_eq!(victims(&plan), [["low"]]);
    }

    #[test]
    fn equal_or_higher_priority_and_opted_out_jobs_are_never_victims() {
        let mut opted_out = running("opted-out", 0, &[("a", &[0])]);
        opted_out.preemptible = false;
        let running = [running("equal", 10, &[("b", &[0])]), opted_out];
        let view = cluster(&[("a", 1), ("b", 1)], &running);
        let plan = placement::plan(
            &view,
            &[queued("urgent", 10, 1, 1)],
            &running,
            &Sharing::default(),
        );
        assert!(plan.preemptions.is_empty());
        assert_eq!(plan.waiting.len(), 1);
        assert_eq!(
            plan.waiting[0].reason.to_string(),
            "not enough free devices: room for 0 of its 1 rank (1 gpu device each) on 0 nodes"
        );
    }

    #[test]
    fn among_equals_the_least_progress_lost_then_the_youngest_is_taken() {
        let mut old = running("old", 0, &[("a", &[0])]);
        old.started_at_ms = 1_000;
        let mut young = running("young", 0, &[("b", &[0])]);
        young.started_at_ms = 2_000;
        let mut costly = running("costly", 0, &[("c", &[0])]);
        costly.started_at_ms = 3_000;
        costly.progress_lost_ms = 60_000;
        let running = [old, young, costly];
        let view = cluster(&[("a", 1), ("b", 1), ("c", 1)], &running);
        let plan = placement::plan(
            &view,
            &[queued("urgent", 1, 1, 1)],
            &running,
            &Sharing::default(),
        );
        assert_eq!(victims(&plan), [["young"]]);
    }

    #[test]
    fn a_rank_needs_its_devices_on_one_node() {
        // Two victims with one gpu each on different nodes do not make room for a rank of 2.
        let running = [
            running("x", 0, &[("a", &[0])]),
            running("y", 0, &[("b", &[0])]),
            running("z", 0, &[("b", &[1])]),
        ];
        let view = cluster(&[("a", 1), ("b", 2)], &running);
        let plan = placement::plan(
            &view,
            &[queued("pair", 1, 1, 2)],
            &running,
            &Sharing::default(),
        );
        let mut chosen = victims(&plan).remove(0);
        chosen.sort_unstable();
        assert_eq!(chosen, ["y", "z"]);
    }

    #[test]
    fn a_preemptor_keeps_its_devices_from_jobs_behind_it() {
        // One gpu free, the other held by "low": "urgent" needs both; "small" behind it must not
        // take the free one.
        let running = [running("low", 0, &[("a", &[1])])];
        let view = cluster(&[("a", 2)], &running);
        let mut small = queued("small", 5, 1, 1);
        small.seq = 1;
        let plan = placement::plan(
            &view,
            &[queued("urgent", 10, 2, 1), small],
            &running,
            &Sharing::default(),
        );
        assert_eq!(victims(&plan), [["low"]]);
        assert!(plan.assignments.is_empty());
        assert_eq!(plan.waiting[0].job_id, id("small"));
    }

    #[test]
    fn jobs_already_stopping_count_before_new_victims_are_chosen() {
        let mut stopping = running("stopping", 0, &[("a", &[0])]);
        stopping.stopping_for = Some(id("urgent"));
        let running = [stopping, running("other", 0, &[("b", &[0])])];
        let view = cluster(&[("a", 1), ("b", 1)], &running);
        let plan = placement::plan(
            &view,
            &[queued("urgent", 10, 1, 1)],
            &running,
            &Sharing::default(),
        );
        assert_eq!(victims(&plan), [["stopping"]]);
        assert!(plan.preemptions[0].new_victims.is_empty());
        // Once it has stopped, the job is placed on its devices.
        let view = cluster(&[("a", 1), ("b", 1)], &running[1..]);
        let after = placement::plan(
            &view,
            &[queued("urgent", 10, 1, 1)],
            &running[1..],
            &Sharing::default(),
        );
        assert_eq!(after.assignments[0].ranks[0].node_id, node("a"));
    }

    // Property tests: random clusters, running jobs and queues, every decision checked against
    // a brute force over the candidates.

    fn arbitrary_case() -> impl Strategy<Value = (ClusterView, Vec<RunningJob>, Vec<QueuedJob>)> {
        let nodes = prop::collection::vec(1..=4u32, 1..=4);
        nodes
            .prop_flat_map(|sizes| {
                let node_count = sizes.len();
                // Each device is free or held by one of up to 5 running jobs.
                let owners = prop::collection::vec(
                    prop::option::of(0..5usize),
                    sizes.iter().sum::<u32>() as usize,
                );
                let running =
                    prop::collection::vec((-2..=2i32, any::<bool>(), 0..3u64, 0..3i64), 5);
                let queue = prop::collection::vec((-2..=3i32, 1..=4u32, 1..=2u32, 0..=1u32), 1..=4);
                let avoided = prop::option::of(0..node_count);
                (Just(sizes), owners, running, queue, avoided)
            })
            .prop_map(|(sizes, owners, running_specs, queue_specs, avoided)| {
                let mut held: Vec<Vec<(NodeId, Vec<u32>)>> = vec![Vec::new(); running_specs.len()];
                let mut owner_of = owners.into_iter();
                let mut nodes = Vec::new();
                for (index, &size) in sizes.iter().enumerate() {
                    let name = node(&format!("n{index}"));
                    let mut free = Vec::new();
                    for device in 0..size {
                        match owner_of.next().flatten() {
                            Some(owner) => match held[owner].iter_mut().find(|(n, _)| *n == name) {
                                Some((_, devices)) => devices.push(device),
                                None => held[owner].push((name.clone(), vec![device])),
                            },
                            None => free.push(device),
                        }
                    }
                    nodes.push(NodeView::new(name).with_devices(GPU, size, free));
                }
                let running: Vec<RunningJob> = running_specs
                    .into_iter()
                    .zip(held)
                    .enumerate()
                    .filter(|(_, (_, held))| !held.is_empty())
                    .map(
                        |(index, ((priority, preemptible, lost, started), held))| RunningJob {
                            job_id: id(&format!("run-{index}")),
                            priority,
                            device_kind: GPU,
                            held,
                            preemptible,
                            progress_lost_ms: lost,
                            started_at_ms: started,
                            stopping_for: None,
                        },
                    )
                    .collect();
                let queue = queue_specs
                    .into_iter()
                    .enumerate()
                    .map(
                        |(index, (priority, ranks, devices_per_rank, avoid))| QueuedJob {
                            job_id: id(&format!("queued-{index}")),
                            seq: index as u64,
                            avoid_nodes: match (avoid, avoided) {
                                (1, Some(position)) => vec![node(&format!("n{position}"))],
                                _ => Vec::new(),
                            },
                            ..queued("x", priority, ranks, devices_per_rank)
                        },
                    )
                    .collect();
                (ClusterView { nodes }, running, queue)
            })
    }

    /// Free device counts per node after the given devices are freed.
    fn holds(
        free: &HashMap<NodeId, BTreeSet<u32>>,
        freed: &[&RunningJob],
        job: &QueuedJob,
    ) -> bool {
        let mut counts: HashMap<&NodeId, usize> = free
            .iter()
            .map(|(node_id, devices)| (node_id, devices.len()))
            .collect();
        for victim in freed {
            for (node_id, devices) in &victim.held {
                *counts.entry(node_id).or_default() += devices.len();
            }
        }
        let room: usize = counts
            .iter()
            .filter(|(node_id, _)| !job.avoid_nodes.contains(node_id))
            .map(|(_, count)| count / job.devices_per_rank as usize)
            .sum();
        room >= job.ranks as usize
    }

    proptest! {
        #[test]
        fn preemption_follows_every_rule((view, running, queue) in arbitrary_case()) {
            let plan = placement::plan(&view, &queue, &running, &Sharing::default());
            let by_id: HashMap<&JobId, &RunningJob> =
                running.iter().map(|job| (&job.job_id, job)).collect();
            let queued_by_id: HashMap<&JobId, &QueuedJob> =
                queue.iter().map(|job| (&job.job_id, job)).collect();

            // No device is given twice or given while held: the placed gangs are whole.
            let mut free: HashMap<NodeId, BTreeSet<u32>> = view
                .nodes
                .iter()
                .map(|node| (node.node_id.clone(), node.free_devices(GPU).iter().copied().collect()))
                .collect();
            for assignment in &plan.assignments {
                let job = queued_by_id[&assignment.job_id];
                prop_assert_eq!(assignment.ranks.len(), job.ranks as usize);
                for rank in &assignment.ranks {
                    prop_assert_eq!(rank.devices.len(), job.devices_per_rank as usize);
                    for device in &rank.devices {
                        prop_assert!(
                            free.get_mut(&rank.node_id).is_some_and(|set| set.remove(device)),
                            "device {} on {} given twice or while held", device, rank.node_id
                        );
                    }
                }
            }

            let mut claimed = HashSet::new();
            for preemption in &plan.preemptions {
                let job = queued_by_id[&preemption.job_id];
                let victims: Vec<&RunningJob> =
                    preemption.victims.iter().map(|victim| by_id[victim]).collect();
                for victim in &victims {
                    prop_assert!(victim.priority < job.priority, "{} preempts {}", job.job_id, victim.job_id);
                    prop_assert!(victim.preemptible);
                    prop_assert!(claimed.insert(&victim.job_id), "{} taken twice", victim.job_id);
                }
                // Enough, given the free devices when the pass began (nothing placed ahead of
                // it is counted: the job got what it needs even so, or less was free).
                let initial: HashMap<NodeId, BTreeSet<u32>> = view
                    .nodes
                    .iter()
                    .map(|node| (node.node_id.clone(), node.free_devices(GPU).iter().copied().collect()))
                    .collect();
                prop_assert!(holds(&initial, &victims, job), "{} has too little room", job.job_id);
                // Minimal: sparing any one victim leaves too little room in what was left
                // to it, and so it does with the initial free devices when nothing ahead of it
                // was placed or preempting.
                let first_in_queue = plan.assignments.is_empty()
                    && plan.preemptions[0].job_id == job.job_id;
                if first_in_queue {
                    for spared in 0..victims.len() {
                        let mut fewer = victims.clone();
                        fewer.remove(spared);
                        prop_assert!(
                            !holds(&initial, &fewer, job),
                            "{} did not need {}", job.job_id, victims[spared].job_id
                        );
                    }
                }
            }

            // A job left waiting at the head of the queue could not have preempted its way
            // in: every candidate together does not make room.
            if let Some(head) = queue_head(&queue)
                && plan.waiting.iter().any(|waiting| waiting.job_id == head.job_id)
            {
                let candidates: Vec<&RunningJob> = running
                    .iter()
                    .filter(|job| job.preemptible && job.priority < head.priority)
                    .collect();
                let initial: HashMap<NodeId, BTreeSet<u32>> = view
                    .nodes
                    .iter()
                    .map(|node| (node.node_id.clone(), node.free_devices(GPU).iter().copied().collect()))
                    .collect();
                prop_assert!(!holds(&initial, &candidates, head), "{} could preempt", head.job_id);
            }
        }
    }

    fn queue_head(queue: &[QueuedJob]) -> Option<&QueuedJob> {
        queue
            .iter()
            .min_by_key(|job| (Reverse(job.priority), job.seq))
    }
}
