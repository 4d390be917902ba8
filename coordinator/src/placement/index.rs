//! The free devices left while a placement pass works through the queue, indexed so that a pass
//! over thousands of nodes and jobs stays fast.
//!
//! Per device kind, the nodes with free devices sit in an ordered set keyed by `(free count,
//! position)`, beside a count of nodes per free count. That answers the questions placement
//! asks without walking every node:
//! - whether a job could fit at all (the sum over free counts of `count x floor(free /
//!   devices_per_rank)`: a few distinct counts, not one entry per node), which rejects most jobs
//!   on a full cluster in constant time;
//! - the nodes by descending capacity, position breaking ties (the free counts from the top,
//!   merging the nodes of the counts that give the same capacity by position);
//! - the best fit for a remainder: the first node at or above a free count.
//!
//! A job that fits visits only the nodes it takes (plus the few it skips because it avoids
//! them), so a pass costs about `jobs x log(nodes) + ranks placed`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cohort_jobspec::DeviceKind;
use cohort_proto::NodeId;

use super::{Assignment, ClusterView, QueuedJob, RankPlacement, WaitReason, unique_nodes};

/// The free devices of every node, with an index per device kind.
pub(super) struct FreeDevices {
    /// One entry per distinct node, sorted by straggler score, then node id, so that position
    /// breaks ties (healthy nodes first).
    nodes: Vec<FreeNode>,
    /// Each node's position in `nodes`.
    positions: HashMap<NodeId, usize>,
    /// The nodes with free devices, per kind.
    index: HashMap<DeviceKind, KindIndex>,
    /// Per kind, how many nodes had each free count when the pass began.
    initial: HashMap<DeviceKind, BTreeMap<usize, usize>>,
}

/// The free devices left on one node.
struct FreeNode {
    /// The node's id.
    node_id: NodeId,
    /// Free device indices per kind, ascending and distinct.
    free: HashMap<DeviceKind, Vec<u32>>,
}

/// The nodes that have free devices of one kind.
#[derive(Default)]
struct KindIndex {
    /// `(free count, position)` of every node with at least one free device of the kind.
    by_free: BTreeSet<(usize, usize)>,
    /// How many nodes have each free count (counts above 0 only).
    nodes_with: BTreeMap<usize, usize>,
}

impl KindIndex {
    fn insert(&mut self, free: usize, position: usize) {
        if free > 0 {
            self.by_free.insert((free, position));
            *self.nodes_with.entry(free).or_default() += 1;
        }
    }

    fn remove(&mut self, free: usize, position: usize) {
        if free > 0
            && self.by_free.remove(&(free, position))
            && let Some(count) = self.nodes_with.get_mut(&free)
        {
            *count -= 1;
            if *count == 0 {
                self.nodes_with.remove(&free);
            }
        }
    }

    /// Positions of the nodes with exactly `free` free devices, ascending.
    fn with_free(&self, free: usize) -> impl Iterator<Item = usize> + '_ {
        self.by_free
            .range((free, 0)..=(free, usize::MAX))
            .map(|&(_, position)| position)
    }
}

impl FreeDevices {
    /// Copies the free devices of `view`, sorted and deduplicated.
    pub(super) fn from_view(view: &ClusterView) -> Self {
        let mut nodes: Vec<(u32, FreeNode)> = unique_nodes(view)
            .map(|node| {
                let free = node
                    .free
                    .iter()
                    .map(|(&kind, indices)| {
                        let mut indices = indices.clone();
                        indices.sort_unstable();
                        indices.dedup();
                        (kind, indices)
                    })
                    .collect();
                let entry = FreeNode {
                    node_id: node.node_id.clone(),
                    free,
                };
                (node.straggler_score, entry)
            })
            .collect();
        // Position breaks ties between nodes that fit equally well: healthy nodes first.
        nodes.sort_by(|(left_score, left), (right_score, right)| {
            (left_score, &left.node_id).cmp(&(right_score, &right.node_id))
        });
        let nodes: Vec<FreeNode> = nodes.into_iter().map(|(_, node)| node).collect();
        let mut index: HashMap<DeviceKind, KindIndex> = HashMap::new();
        for (position, node) in nodes.iter().enumerate() {
            for (&kind, free) in &node.free {
                index.entry(kind).or_default().insert(free.len(), position);
            }
        }
        let positions = nodes
            .iter()
            .enumerate()
            .map(|(position, node)| (node.node_id.clone(), position))
            .collect();
        let initial = index
            .iter()
            .map(|(&kind, index)| (kind, index.nodes_with.clone()))
            .collect();
        Self {
            nodes,
            positions,
            index,
            initial,
        }
    }

    /// The position of node `node_id`, if the view has it.
    pub(super) fn position(&self, node_id: &NodeId) -> Option<usize> {
        self.positions.get(node_id).copied()
    }

    /// The free devices of `kind` on the node at `position`, ascending.
    pub(super) fn free_of(&self, position: usize, kind: DeviceKind) -> &[u32] {
        self.nodes[position]
            .free
            .get(&kind)
            .map_or(&[], Vec::as_slice)
    }

    /// How many ranks of `devices_per_rank` devices of `kind` the free devices hold, every
    /// node counted (`sum floor(free / devices_per_rank)`).
    pub(super) fn rank_room(&self, kind: DeviceKind, devices_per_rank: usize) -> u64 {
        self.index
            .get(&kind)
            .map_or(0, |index| room_in(&index.nodes_with, devices_per_rank))
    }

    /// Why `job`, which [`FreeDevices::place_job`] did not place, waits.
    pub(super) fn wait_reason(&self, job: &QueuedJob) -> WaitReason {
        let devices_per_rank = job.devices_per_rank as usize;
        let ranks = fewest_ranks(job);
        let room = self.rank_room(job.device_kind, devices_per_rank);
        if devices_per_rank > 0 && ranks > 0 && room >= u64::from(ranks) {
            return WaitReason::AvoidedNodes;
        }
        let room_at_start = self
            .initial
            .get(&job.device_kind)
            .map_or(0, |nodes_with| room_in(nodes_with, devices_per_rank));
        if devices_per_rank > 0 && ranks > 0 && room_at_start >= u64::from(ranks) {
            return WaitReason::TakenAhead;
        }
        let nodes = self.index.get(&job.device_kind).map_or(0, |index| {
            index
                .nodes_with
                .range(devices_per_rank.max(1)..)
                .map(|(_, &count)| count as u64)
                .sum()
        });
        WaitReason::Devices {
            ranks,
            devices_per_rank: job.devices_per_rank,
            kind: job.device_kind,
            room,
            nodes,
        }
    }

    /// Places `job` whole (an elastic job with as many of its ranks as fit, down to its
    /// `min_ranks`) and takes its devices out of the free ones, or returns `None` (and takes
    /// nothing) if it does not fit.
    pub(super) fn place_job(&mut self, job: &QueuedJob) -> Option<Assignment> {
        (fewest_ranks(job)..=job.ranks)
            .rev()
            .find_map(|ranks| self.place_ranks(job, ranks))
    }

    /// Places `ranks` ranks of `job` and takes their devices, or returns `None` (and takes
    /// nothing) if they do not fit.
    fn place_ranks(&mut self, job: &QueuedJob, ranks: u32) -> Option<Assignment> {
        if ranks == 0 || job.devices_per_rank == 0 {
            return None;
        }
        let devices_per_rank = usize::try_from(job.devices_per_rank).ok()?;
        let ranks = usize::try_from(ranks).ok()?;
        let avoided: Vec<usize> = job
            .avoid_nodes
            .iter()
            .filter_map(|node_id| self.position(node_id))
            .collect();
        let group = usize::try_from(job.rank_group.max(1)).ok()?;
        let fits =
            |group| self.choose_nodes(job.device_kind, devices_per_rank, ranks, group, &avoided);
        let chosen = fits(group).or_else(|| fits(1))?;

        let mut placements = Vec::with_capacity(ranks);
        let mut next_rank: u32 = 0;
        for (position, ranks_on_node) in chosen {
            let taken =
                self.take_lowest(position, job.device_kind, ranks_on_node * devices_per_rank);
            let node_id = &self.nodes[position].node_id;
            for (local_rank, devices) in (0..).zip(taken.chunks(devices_per_rank)) {
                placements.push(RankPlacement {
                    rank: next_rank,
                    node_id: node_id.clone(),
                    local_rank,
                    devices: devices.to_vec(),
                });
                next_rank += 1;
            }
        }
        Some(Assignment {
            job_id: job.job_id.clone(),
            ranks: placements,
        })
    }

    /// Chooses the nodes for `ranks` ranks of `devices_per_rank` devices of `kind` each,
    /// leaving out the nodes at the `avoided` positions. Returns `(node position, ranks on it)`
    /// in the order the ranks are numbered, or `None` if the job does not fit.
    ///
    /// Takes nodes by descending capacity (`free / devices_per_rank`, rounded down to a multiple
    /// of `group`; position breaks ties) until the remaining ranks fit on one of the nodes not
    /// taken yet, then gives them to the one with the fewest free devices (position breaking
    /// ties). The result uses the fewest nodes possible for that rounding: it stops at the
    /// first `k` for which the `k` largest capacities hold the job.
    pub(super) fn choose_nodes(
        &self,
        kind: DeviceKind,
        devices_per_rank: usize,
        ranks: usize,
        group: usize,
        avoided: &[usize],
    ) -> Option<Vec<(usize, usize)>> {
        if devices_per_rank == 0 || ranks == 0 || group == 0 {
            return None;
        }
        // Avoided nodes only lower the room, so this rejects without walking any node.
        if self.rank_room(kind, devices_per_rank) < ranks as u64 {
            return None;
        }
        let index = self.index.get(&kind)?;
        let whole_groups = devices_per_rank.checked_mul(group)?;
        let capacity = |free: usize| free / devices_per_rank / group * group;
        let mut chosen: Vec<(usize, usize)> = Vec::new();
        let mut remaining = ranks;
        // Free counts from the top, in classes of equal capacity; a node has a capacity above 0
        // when it has at least one whole group's devices free.
        let mut counts = index
            .nodes_with
            .range(whole_groups..)
            .rev()
            .map(|(&free, _)| free)
            .peekable();
        while let Some(top) = counts.next() {
            let class_capacity = capacity(top);
            let mut class = vec![top];
            while let Some(&next) = counts.peek()
                && capacity(next) == class_capacity
            {
                class.push(next);
                counts.next();
            }
            for (position, free) in merge_by_position(index, &class) {
                if avoided.contains(&position) {
                    continue;
                }
                let room = free / devices_per_rank;
                if class_capacity >= remaining || (group > 1 && room >= remaining) {
                    let best_fit = self.best_fit(
                        index,
                        devices_per_rank,
                        remaining,
                        whole_groups,
                        &chosen,
                        avoided,
                    )?;
                    chosen.push((best_fit, remaining));
                    return Some(chosen);
                }
                chosen.push((position, class_capacity));
                remaining -= class_capacity;
            }
        }
        None
    }

    /// The node not `chosen` nor `avoided`, with at least `whole_groups` free devices, that
    /// holds `ranks` ranks with the fewest free devices (position breaking ties).
    fn best_fit(
        &self,
        index: &KindIndex,
        devices_per_rank: usize,
        ranks: usize,
        whole_groups: usize,
        chosen: &[(usize, usize)],
        avoided: &[usize],
    ) -> Option<usize> {
        let least = devices_per_rank.checked_mul(ranks)?.max(whole_groups);
        index
            .by_free
            .range((least, 0)..)
            .map(|&(_, position)| position)
            .find(|position| {
                !avoided.contains(position) && !chosen.iter().any(|(taken, _)| taken == position)
            })
    }

    /// Takes the `count` lowest free devices of `kind` on the node at `position`.
    fn take_lowest(&mut self, position: usize, kind: DeviceKind, count: usize) -> Vec<u32> {
        let Some(free) = self.nodes[position].free.get_mut(&kind) else {
            return Vec::new();
        };
        let before = free.len();
        let taken: Vec<u32> = free.drain(..count.min(before)).collect();
        let after = free.len();
        self.reindex(kind, position, before, after);
        taken
    }

    /// Makes `devices` of `kind` on the node at `position` free (devices already free stay
    /// once).
    pub(super) fn give(&mut self, position: usize, kind: DeviceKind, devices: &[u32]) {
        let free = self.nodes[position].free.entry(kind).or_default();
        let before = free.len();
        free.extend_from_slice(devices);
        free.sort_unstable();
        free.dedup();
        let after = free.len();
        self.reindex(kind, position, before, after);
    }

    /// Takes `devices` of `kind` on the node at `position` out of the free ones (those not
    /// free are ignored).
    pub(super) fn withdraw(&mut self, position: usize, kind: DeviceKind, devices: &[u32]) {
        let Some(free) = self.nodes[position].free.get_mut(&kind) else {
            return;
        };
        let before = free.len();
        free.retain(|device| !devices.contains(device));
        let after = free.len();
        self.reindex(kind, position, before, after);
    }

    fn reindex(&mut self, kind: DeviceKind, position: usize, before: usize, after: usize) {
        if before != after {
            let index = self.index.entry(kind).or_default();
            index.remove(before, position);
            index.insert(after, position);
        }
    }
}

/// How many ranks of `devices_per_rank` devices nodes with these free counts (free count ->
/// number of nodes) hold.
fn room_in(nodes_with: &BTreeMap<usize, usize>, devices_per_rank: usize) -> u64 {
    if devices_per_rank == 0 {
        return 0;
    }
    nodes_with
        .range(devices_per_rank..)
        .map(|(&free, &count)| (free / devices_per_rank) as u64 * count as u64)
        .sum()
}

/// The fewest ranks `job` runs on: its `min_ranks` for an elastic restart, else all of them.
pub(super) fn fewest_ranks(job: &QueuedJob) -> u32 {
    match job.min_ranks {
        0 => job.ranks,
        fewest => fewest.min(job.ranks),
    }
}

/// The nodes with any of the free counts `class`, by ascending position, each with its free
/// count: a merge of the index's runs for those counts.
fn merge_by_position<'a>(
    index: &'a KindIndex,
    class: &[usize],
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let mut runs: Vec<_> = class
        .iter()
        .map(|&free| (free, index.with_free(free).peekable()))
        .collect();
    std::iter::from_fn(move || {
        let (free, run) = runs
            .iter_mut()
            .filter_map(|(free, run)| Some((*run.peek()?, *free, run)))
            .min_by_key(|(position, _, _)| *position)
            .map(|(_, free, run)| (free, run))?;
        run.next().map(|position| (position, free))
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::placement::NodeView;

    const CPU: DeviceKind = DeviceKind::Cpu;

    /// Free devices of one kind, `free_counts[i]` of them on node `i` (ids sort by position).
    fn free_devices(free_counts: &[usize]) -> FreeDevices {
        let nodes = free_counts
            .iter()
            .enumerate()
            .map(|(position, &free)| {
                NodeView::new(NodeId::new(format!("node-{position:03}")).unwrap())
                    .with_all_free(CPU, free as u32)
            })
            .collect();
        FreeDevices::from_view(&ClusterView { nodes })
    }

    fn choose(
        free_counts: &[usize],
        per_rank: usize,
        ranks: usize,
        group: usize,
    ) -> Option<Vec<(usize, usize)>> {
        free_devices(free_counts).choose_nodes(CPU, per_rank, ranks, group, &[])
    }

    /// The walk the index replaces, kept as the reference the index must agree with: sorts
    /// every node by capacity for every job.
    fn reference_choose_nodes(
        free_counts: &[usize],
        devices_per_rank: usize,
        ranks: usize,
        group: usize,
        avoided: &[usize],
    ) -> Option<Vec<(usize, usize)>> {
        if devices_per_rank == 0 || ranks == 0 || group == 0 {
            return None;
        }
        let free = |position: usize| {
            if avoided.contains(&position) {
                0
            } else {
                free_counts[position]
            }
        };
        let capacity = |position: usize| free(position) / devices_per_rank / group * group;
        let room = |position: usize| free(position) / devices_per_rank;
        let mut by_capacity: Vec<usize> = (0..free_counts.len())
            .filter(|&position| capacity(position) > 0)
            .collect();
        by_capacity.sort_by_key(|&position| (std::cmp::Reverse(capacity(position)), position));
        let mut chosen = Vec::new();
        let mut remaining = ranks;
        for (taken_so_far, &position) in by_capacity.iter().enumerate() {
            if capacity(position) >= remaining || (group > 1 && room(position) >= remaining) {
                let best_fit = by_capacity[taken_so_far..]
                    .iter()
                    .copied()
                    .filter(|&candidate| room(candidate) >= remaining)
                    .min_by_key(|&candidate| (free(candidate), candidate))?;
                chosen.push((best_fit, remaining));
                return Some(chosen);
            }
            chosen.push((position, capacity(position)));
            remaining -= capacity(position);
        }
        None
    }

    #[test]
    fn nodes_are_chosen_by_capacity_and_stop_at_the_fewest() {
        assert_eq!(choose(&[1, 3, 5, 3], 1, 8, 1), Some(vec![(2, 5), (1, 3)]));
        assert_eq!(choose(&[1, 3, 5, 3], 1, 3, 1), Some(vec![(1, 3)]));
        assert_eq!(choose(&[1, 3, 5, 3], 1, 13, 1), None);
        assert_eq!(choose(&[4, 4], 2, 3, 1), Some(vec![(0, 2), (1, 1)]));
        assert_eq!(choose(&[], 1, 1, 1), None);
        assert_eq!(choose(&[4], 0, 1, 1), None);
    }

    #[test]
    fn room_counts_whole_ranks_per_node() {
        let free = free_devices(&[5, 1, 4, 0]);
        assert_eq!(free.rank_room(CPU, 1), 10);
        assert_eq!(free.rank_room(CPU, 2), 4);
        assert_eq!(free.rank_room(CPU, 6), 0);
        assert_eq!(free.rank_room(DeviceKind::Gpu, 1), 0);
    }

    #[test]
    fn devices_given_back_and_withdrawn_move_a_node_in_the_index() {
        let mut free = free_devices(&[2, 2]);
        free.withdraw(0, CPU, &[0, 1]);
        assert_eq!(free.free_of(0, CPU), &[] as &[u32]);
        assert_eq!(free.rank_room(CPU, 1), 2);
        assert_eq!(free.choose_nodes(CPU, 1, 2, 1, &[]), Some(vec![(1, 2)]));
        free.give(0, CPU, &[1, 0, 3]);
        assert_eq!(free.free_of(0, CPU), &[0, 1, 3]);
        assert_eq!(free.choose_nodes(CPU, 1, 3, 1, &[]), Some(vec![(0, 3)]));
        assert_eq!(free.choose_nodes(CPU, 1, 3, 1, &[0]), None);
    }

    proptest! {
        #[test]
        fn the_index_chooses_what_the_walk_over_every_node_chooses(
            free_counts in prop::collection::vec(0..=12usize, 0..=24),
            devices_per_rank in 1..=4usize,
            ranks in 1..=40usize,
            group in 1..=4usize,
            avoided in prop::collection::vec(0..24usize, 0..=3),
        ) {
            let free = free_devices(&free_counts);
            prop_assert_eq!(
                free.choose_nodes(CPU, devices_per_rank, ranks, group, &avoided),
                reference_choose_nodes(&free_counts, devices_per_rank, ranks, group, &avoided)
            );
        }
    }
}
