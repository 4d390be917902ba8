//! Fair share and quotas: the order a pass considers queued jobs in, and which jobs their
//! queue's or their user's quota holds back.
//!
//! Jobs belong to a named queue and a user ([`Owner`]). Among jobs of equal priority, the pass
//! takes next the job whose queue, then whose user, has the lowest *dominant share*: of each
//! device kind, the fraction of the cluster's devices the queue (or user) holds, the largest of
//! those fractions (dominant-resource fairness), divided by the queue's weight. Within one queue
//! and user, jobs keep their order (priority, then submission). Shares count the devices held
//! by running jobs and those the pass itself hands out, so a queue that is given a job moves
//! back in line for the next.
//!
//! A queue may have a device quota and every user the same one: a job that would take its
//! queue's (or its user's) held devices past the quota waits, whatever is free.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};

use cohort_jobspec::DeviceKind;

use super::{QueuedJob, WaitReason};

/// The queue a job is in and the user it runs for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// The queue's name.
    pub queue: String,
    /// The user's name.
    pub user: String,
}

impl Default for Owner {
    fn default() -> Self {
        Self {
            queue: DEFAULT_QUEUE.to_owned(),
            user: String::new(),
        }
    }
}

pub use cohort_jobspec::job::DEFAULT_QUEUE;

/// A queue's share of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePolicy {
    /// Its weight: a queue of weight 2 is entitled to twice the devices of one of weight 1.
    pub weight: f64,
    /// The most devices (of any kind, together) its running jobs may hold; `None`: no limit.
    pub quota: Option<u64>,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            weight: 1.0,
            quota: None,
        }
    }
}

/// How devices are shared: the queues, the user quota, and who holds what now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sharing {
    /// The configured queues by name; a queue not listed has weight 1 and no quota.
    pub queues: BTreeMap<String, QueuePolicy>,
    /// The most devices one user's running jobs may hold; `None`: no limit.
    pub user_quota: Option<u64>,
    /// Devices held by running jobs (and jobs stopping), per queue and per user.
    pub held: Usage,
    /// Devices of each kind the cluster has (the denominators of the shares).
    pub capacity: HashMap<DeviceKind, u64>,
}

/// Devices held, per queue and per user, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Per queue.
    pub queues: HashMap<String, Devices>,
    /// Per user.
    pub users: HashMap<String, Devices>,
}

impl Usage {
    /// Counts `count` devices of `kind` for `owner`.
    pub fn add(&mut self, owner: &Owner, kind: DeviceKind, count: u64) {
        self.queues
            .entry(owner.queue.clone())
            .or_default()
            .add(kind, count);
        self.users
            .entry(owner.user.clone())
            .or_default()
            .add(kind, count);
    }
}

/// Device counts by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Devices {
    /// CPU slots.
    pub cpu: u64,
    /// GPUs.
    pub gpu: u64,
}

impl Devices {
    /// Counts `count` more devices of `kind`.
    pub fn add(&mut self, kind: DeviceKind, count: u64) {
        match kind {
            DeviceKind::Cpu => self.cpu += count,
            DeviceKind::Gpu => self.gpu += count,
        }
    }

    /// Every device, whatever its kind.
    pub fn total(&self) -> u64 {
        self.cpu + self.gpu
    }

    /// The largest fraction of the cluster's devices of a kind these are (0 for a kind the
    /// cluster has none of).
    pub fn dominant_share(&self, capacity: &HashMap<DeviceKind, u64>) -> f64 {
        let fraction = |held: u64, kind| match capacity.get(&kind) {
            Some(&total) if total > 0 => held as f64 / total as f64,
            _ => 0.0,
        };
        fraction(self.cpu, DeviceKind::Cpu).max(fraction(self.gpu, DeviceKind::Gpu))
    }
}

impl Sharing {
    /// The policy of queue `name`.
    pub fn queue(&self, name: &str) -> QueuePolicy {
        self.queues.get(name).cloned().unwrap_or_default()
    }
}

/// The queued jobs of one pass in the order they are considered, with the shares kept up to
/// date as jobs are handed devices.
pub(super) struct FairOrder<'a> {
    sharing: &'a Sharing,
    /// Devices held, counting what this pass handed out.
    held: Usage,
    /// Each queue and user's jobs, in priority then submission order.
    groups: Vec<Group<'a>>,
    /// Each group's position in `groups`, by owner.
    group_of: HashMap<&'a Owner, usize>,
    /// The queues' names and current shares (dominant share over weight), by index.
    queue_shares: Vec<(&'a str, f64)>,
    /// The users' names and current dominant shares, by index.
    user_shares: Vec<(&'a str, f64)>,
}

/// What orders the heads of the owners' jobs: priority (highest first), queue share, user
/// share (lowest first), submission.
type FairKey = (Reverse<i32>, f64, f64, u64);

/// The queued jobs of one queue and user.
struct Group<'a> {
    owner: &'a Owner,
    /// Index into the queue shares.
    queue: usize,
    /// Index into the user shares.
    user: usize,
    jobs: VecDeque<&'a QueuedJob>,
}

impl<'a> FairOrder<'a> {
    pub(super) fn new(sharing: &'a Sharing, queue: &'a [QueuedJob]) -> Self {
        let mut by_owner: HashMap<&Owner, Vec<&QueuedJob>> = HashMap::new();
        for job in queue {
            by_owner.entry(&job.owner).or_default().push(job);
        }
        let mut owners: Vec<(&Owner, Vec<&QueuedJob>)> = by_owner.into_iter().collect();
        // Ties between owners of equal shares go by the owner, not by hash order.
        owners.sort_by(|left, right| left.0.cmp(right.0));
        let mut queue_index: HashMap<&str, usize> = HashMap::new();
        let mut user_index: HashMap<&str, usize> = HashMap::new();
        let mut order = Self {
            sharing,
            held: sharing.held.clone(),
            groups: Vec::with_capacity(owners.len()),
            group_of: HashMap::new(),
            queue_shares: Vec::new(),
            user_shares: Vec::new(),
        };
        for (owner, mut jobs) in owners {
            jobs.sort_by_key(|job| (Reverse(job.priority), job.seq));
            let queue = *queue_index.entry(&owner.queue).or_insert_with(|| {
                order.queue_shares.push((&owner.queue, 0.0));
                order.queue_shares.len() - 1
            });
            let user = *user_index.entry(&owner.user).or_insert_with(|| {
                order.user_shares.push((&owner.user, 0.0));
                order.user_shares.len() - 1
            });
            order.group_of.insert(owner, order.groups.len());
            order.groups.push(Group {
                owner,
                queue,
                user,
                jobs: jobs.into(),
            });
        }
        for index in 0..order.queue_shares.len() {
            order.queue_shares[index].1 = order.queue_share(order.queue_shares[index].0);
        }
        for index in 0..order.user_shares.len() {
            order.user_shares[index].1 = order.user_share(order.user_shares[index].0);
        }
        order
    }

    /// The next job to consider: the highest priority at the head of any owner's jobs, then
    /// the lowest queue share, then the lowest user share, then the earliest submitted.
    pub(super) fn next_job(&mut self) -> Option<&'a QueuedJob> {
        let mut best: Option<(usize, FairKey)> = None;
        for (index, group) in self.groups.iter().enumerate() {
            let Some(head) = group.jobs.front() else {
                continue;
            };
            let key = (
                Reverse(head.priority),
                self.queue_shares[group.queue].1,
                self.user_shares[group.user].1,
                head.seq,
            );
            let better = best
                .as_ref()
                .is_none_or(|(_, current)| key.partial_cmp(current).is_some_and(|o| o.is_lt()));
            if better {
                best = Some((index, key));
            }
        }
        let (index, _) = best?;
        self.groups[index].jobs.pop_front()
    }

    /// Why `job` may not take devices now because of a quota, if it may not.
    pub(super) fn over_quota(&self, job: &QueuedJob) -> Option<WaitReason> {
        let asked = u64::from(super::index::fewest_ranks(job)) * u64::from(job.devices_per_rank);
        let queue_held = self
            .held
            .queues
            .get(&job.owner.queue)
            .map_or(0, Devices::total);
        if let Some(quota) = self.sharing.queue(&job.owner.queue).quota
            && queue_held + asked > quota
        {
            return Some(WaitReason::QueueQuota {
                queue: job.owner.queue.clone(),
                quota,
                held: queue_held,
                asked,
            });
        }
        let user_held = self
            .held
            .users
            .get(&job.owner.user)
            .map_or(0, Devices::total);
        if let Some(quota) = self.sharing.user_quota
            && user_held + asked > quota
        {
            return Some(WaitReason::UserQuota {
                user: job.owner.user.clone(),
                quota,
                held: user_held,
                asked,
            });
        }
        None
    }

    /// Counts the devices `job` was handed (`ranks` of its ranks), and moves its queue and user
    /// back in line.
    pub(super) fn handed(&mut self, job: &QueuedJob, ranks: usize) {
        let count = ranks as u64 * u64::from(job.devices_per_rank);
        self.held.add(&job.owner, job.device_kind, count);
        if let Some(&index) = self.group_of.get(&job.owner) {
            let (queue, user) = (self.groups[index].queue, self.groups[index].user);
            self.queue_shares[queue].1 = self.queue_share(&job.owner.queue);
            self.user_shares[user].1 = self.user_share(&job.owner.user);
            debug_assert_eq!(self.groups[index].owner, &job.owner);
        }
    }

    fn queue_share(&self, queue: &str) -> f64 {
        let held = self.held.queues.get(queue).copied().unwrap_or_default();
        held.dominant_share(&self.sharing.capacity) / self.sharing.queue(queue).weight
    }

    fn user_share(&self, user: &str) -> f64 {
        let held = self.held.users.get(user).copied().unwrap_or_default();
        held.dominant_share(&self.sharing.capacity)
    }
}

#[cfg(test)]
mod tests {
    use cohort_proto::JobId;

    use super::*;

    fn job(id: &str, queue: &str, user: &str, priority: i32, seq: u64) -> QueuedJob {
        QueuedJob {
            job_id: JobId::new(id).unwrap(),
            priority,
            seq,
            ranks: 1,
            devices_per_rank: 1,
            device_kind: DeviceKind::Cpu,
            rank_group: 1,
            avoid_nodes: Vec::new(),
            min_ranks: 0,
            owner: Owner {
                queue: queue.to_owned(),
                user: user.to_owned(),
            },
        }
    }

    fn order(sharing: &Sharing, queue: &[QueuedJob]) -> Vec<String> {
        let mut fair = FairOrder::new(sharing, queue);
        let mut taken = Vec::new();
        while let Some(next) = fair.next_job() {
            fair.handed(next, 1);
            taken.push(next.job_id.to_string());
        }
        taken
    }

    fn cpu_cluster(slots: u64) -> Sharing {
        Sharing {
            capacity: HashMap::from([(DeviceKind::Cpu, slots)]),
            ..Sharing::default()
        }
    }

    #[test]
    fn users_of_one_queue_take_turns_whatever_the_submission_order() {
        let queue = [
            job("a-1", "default", "alice", 0, 1),
            job("a-2", "default", "alice", 0, 2),
            job("a-3", "default", "alice", 0, 3),
            job("b-1", "default", "bob", 0, 4),
            job("b-2", "default", "bob", 0, 5),
        ];
        assert_eq!(
            order(&cpu_cluster(10), &queue),
            ["a-1", "b-1", "a-2", "b-2", "a-3"]
        );
    }

    #[test]
    fn priority_comes_before_fair_share() {
        let mut sharing = cpu_cluster(10);
        sharing.held.add(
            &Owner {
                queue: "default".to_owned(),
                user: "alice".to_owned(),
            },
            DeviceKind::Cpu,
            5,
        );
        let queue = [
            job("bob-low", "default", "bob", 0, 1),
            job("alice-high", "default", "alice", 9, 2),
        ];
        assert_eq!(order(&sharing, &queue), ["alice-high", "bob-low"]);
    }

    #[test]
    fn a_queue_of_twice_the_weight_gets_twice_the_devices() {
        let mut sharing = cpu_cluster(6);
        sharing.queues.insert(
            "research".to_owned(),
            QueuePolicy {
                weight: 2.0,
                quota: None,
            },
        );
        let queue: Vec<QueuedJob> = (0..6)
            .map(|n| job(&format!("r-{n}"), "research", "alice", 0, n))
            .chain((0..6).map(|n| job(&format!("d-{n}"), "default", "bob", 0, 10 + n)))
            .collect();
        let first_six: Vec<String> = order(&sharing, &queue).into_iter().take(6).collect();
        let research = first_six.iter().filter(|id| id.starts_with("r-")).count();
        assert_eq!(research, 4, "{first_six:?}");
    }

    #[test]
    fn dominant_share_is_the_largest_fraction_over_kinds() {
        let capacity = HashMap::from([(DeviceKind::Cpu, 100), (DeviceKind::Gpu, 8)]);
        let held = Devices { cpu: 10, gpu: 2 };
        assert_eq!(held.dominant_share(&capacity), 0.25);
        assert_eq!(Devices::default().dominant_share(&HashMap::new()), 0.0);
    }

    #[test]
    fn a_job_past_its_queue_or_user_quota_waits_naming_it() {
        let mut sharing = cpu_cluster(10);
        sharing.queues.insert(
            "small".to_owned(),
            QueuePolicy {
                weight: 1.0,
                quota: Some(2),
            },
        );
        sharing.user_quota = Some(3);
        let owner = Owner {
            queue: "small".to_owned(),
            user: "alice".to_owned(),
        };
        sharing.held.add(&owner, DeviceKind::Cpu, 2);
        let fair = FairOrder::new(&sharing, &[]);
        let reason = fair.over_quota(&job("x", "small", "alice", 0, 1)).unwrap();
        assert_eq!(
            reason.to_string(),
            "queue small's quota of 2 devices is reached: it holds 2, the job asks for 1"
        );
        let reason = fair.over_quota(&{
            let mut wide = job("y", "default", "alice", 0, 2);
            wide.ranks = 2;
            wide
        });
        assert_eq!(
            reason.unwrap().to_string(),
            "user alice's quota of 3 devices is reached: they hold 2, the job asks for 2"
        );
        assert_eq!(fair.over_quota(&job("z", "default", "bob", 0, 3)), None);
    }
}
