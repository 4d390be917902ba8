//! [`ShmGroup`]: a [`Communicator`] for ranks on one node, through shared memory.
//!
//! Ranks of a job that share a node need not pay for the TCP stack: they map one segment of
//! shared memory and copy their data through it, synchronising with atomic counters and futexes.
//! A 4 KiB all-reduce of two ranks is one copy in, one barrier and one reduction; a large one
//! is reduced stripe by stripe on every rank's core at once.
//!
//! - `segment`: the memfd, its sealed size and layout, and the group's abort word.
//! - `setup`: forming the group through the store, with a proof of the job's secret, and passing
//!   the segment to every rank.
//! - `sync`: the epoch protocol (one barrier per step, double-buffered slots), waiting, and
//!   failure detection: a dead, dropped or stalled rank is named, as by [`crate::TcpRing`].
//! - `plans`: what each collective copies and reduces in each epoch.
//!
//! Nothing is left behind: the segment has no name (nothing appears in `/dev/shm`), and the
//! kernel frees it with the last rank's mapping, however that rank ended.

mod plans;
mod segment;
mod setup;
mod sync;

use std::time::Duration;

use tracing::debug;

use self::plans::Group;
use self::sync::Epochs;
use crate::buffer::{Element, ReduceOp};
use crate::communicator::TypedCollectives;
use crate::error::{Error, FirstFailure, Result};
use crate::operation::Collective;
use crate::progress::{Channel, Entered, Progress};
use crate::rendezvous::Store;

pub use self::segment::MEMFD_NAME;

/// Largest group [`ShmGroup`] forms (every rank keeps a connection to every other).
pub const MAX_WORLD_SIZE: usize = 64;

/// Settings of a [`ShmGroup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmConfig {
    /// Longest wait for all ranks to join. Default 120 s.
    pub connect_timeout: Duration,
    /// Longest a collective may wait for the rank furthest behind without it moving before it
    /// fails naming that rank. Default 30 s.
    pub io_timeout: Duration,
    /// Bytes of each of a rank's two data slots: the largest chunk a collective moves per step.
    /// Default 512 KiB; a multiple of 64 from 4 KiB to 64 MiB, and at least 4 bytes per rank.
    /// Set by rank 0, whose value the group uses.
    pub slot_bytes: usize,
    /// How long a waiting rank spins before it yields and then sleeps. Default `None`: 50 µs
    /// when the node has a core for every rank of the group, otherwise no spinning.
    pub spin: Option<Duration>,
    /// The job's link secret, which every connection must prove it knows ([`crate::auth`]).
    /// Default `None` (in-process tests and benchmarks).
    pub secret: Option<crate::LinkSecret>,
    /// Where the group records its operations, for hang diagnosis.
    pub progress: Progress,
    /// The rank each member is called in errors, by group rank, when the group is one part of
    /// a larger one (the ranks of one node in a hierarchical all-reduce). Default `None`: group
    /// ranks.
    pub rank_names: Option<Vec<usize>>,
}

impl Default for ShmConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(120),
            io_timeout: Duration::from_secs(30),
            slot_bytes: 512 * 1024,
            spin: None,
            secret: None,
            progress: Progress::default(),
            rank_names: None,
        }
    }
}

impl ShmConfig {
    /// Checks every field for a group of `world_size`; returns the first problem found.
    pub fn validate(&self, world_size: usize) -> Result<()> {
        if !self.slot_bytes.is_multiple_of(64)
            || !(4096..=64 << 20).contains(&self.slot_bytes)
            || self.slot_bytes < 4 * world_size
        {
            return Err(Error::InvalidArgument {
                field: "config.slot_bytes",
                found: self.slot_bytes.to_string(),
                expected: "a multiple of 64 from 4096 to 67108864",
            });
        }
        crate::error::check_positive_durations(&[
            ("config.connect_timeout", self.connect_timeout),
            ("config.io_timeout", self.io_timeout),
        ])
    }
}

/// A communicator whose ranks, all on one node, exchange data through shared memory.
///
/// Built by every rank with [`ShmGroup::connect`]; it may move to another thread. Reductions
/// accumulate in `f32`, round once, and give every rank the same bits.
pub struct ShmGroup {
    rank: usize,
    world_size: usize,
    prefix: String,
    /// `None` for a world of one rank.
    group: Option<Group>,
    /// The first failure, after which every call fails.
    failure: FirstFailure,
    channel: Channel,
    /// What members are called in errors ([`ShmConfig::rank_names`]; empty: group ranks).
    rank_names: Vec<usize>,
}

impl ShmGroup {
    /// Joins the group named `prefix` as `rank` of `world_size`, through `store`: every rank
    /// must call this concurrently with the same prefix and world size, on the same node (the
    /// same network namespace). Fails within `config.connect_timeout` naming missing ranks.
    pub fn connect(
        store: &dyn Store,
        prefix: &str,
        rank: usize,
        world_size: usize,
        config: &ShmConfig,
    ) -> Result<ShmGroup> {
        config.validate(world_size)?;
        if !(1..=MAX_WORLD_SIZE).contains(&world_size) {
            return Err(Error::InvalidArgument {
                field: "world_size",
                found: world_size.to_string(),
                expected: "1 to 64",
            });
        }
        if rank >= world_size {
            return Err(Error::InvalidArgument {
                field: "rank",
                found: rank.to_string(),
                expected: "less than world_size",
            });
        }
        let rank_names = config.rank_names.clone().unwrap_or_default();
        let group = if world_size == 1 {
            None
        } else {
            let joined = setup::join(store, prefix, rank, world_size, config)
                .map_err(|error| error.with_rank_names(&rank_names))?;
            let spin = config
                .spin
                .unwrap_or_else(|| sync::default_spin(world_size));
            let epochs = Epochs::new(
                rank,
                world_size,
                spin,
                config.io_timeout,
                joined.peers,
                rank_names.clone(),
            );
            Some(Group {
                rank,
                world_size,
                epochs,
                segment: joined.segment,
                partial: Vec::new(),
            })
        };
        debug!(prefix, rank, world_size, "shared-memory group ready");
        Ok(ShmGroup {
            rank,
            world_size,
            prefix: prefix.to_owned(),
            group,
            failure: FirstFailure::default(),
            channel: config.progress.channel(prefix, world_size),
            rank_names,
        })
    }

    /// Returns the key prefix the group was formed under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Runs `body` on the group unless there is nothing to exchange (one rank, or `elements`
    /// is 0); remembers a failure so that later calls fail at once.
    fn exchange(
        &mut self,
        collective: Collective,
        elements: usize,
        body: impl FnOnce(&mut Group) -> Result<()>,
    ) -> Result<()> {
        self.failure.check(collective)?;
        let Some(group) = self.group.as_mut() else {
            return Ok(());
        };
        if elements == 0 {
            return Ok(());
        }
        let result = body(group).map_err(|error| error.with_rank_names(&self.rank_names));
        if let Err(error) = &result {
            self.failure.record(error);
        }
        result
    }

    /// Errors already name ranks as asked (`exchange` does it before recording the failure).
    fn name_error(&self, error: Error) -> Error {
        error
    }

    /// Makes every rank of the group fail, blaming `failed_rank` (a name) as reported by
    /// `reporter`, because another part of the larger group failed; this rank's later calls
    /// fail too.
    pub(crate) fn abort(&mut self, failed_rank: usize, cause: crate::AbortCause, reporter: usize) {
        if let Some(group) = &self.group {
            group
                .epochs
                .abort(&group.segment, failed_rank, cause, reporter);
        }
        self.failure.record_text(
            format!("the group failed: rank {failed_rank} {cause} (reported by rank {reporter})"),
            Some(failed_rank),
        );
    }

    /// [`Communicator::barrier`], unrecorded.
    fn barrier_untracked(&mut self) -> Result<()> {
        self.exchange(Collective::Barrier, 1, Group::barrier)
    }

    fn enter(&self, collective: Collective, len: usize, dtype: crate::DType) -> Entered {
        self.channel
            .enter(collective.name(), len * dtype.size_bytes(), None)
    }
}

impl Drop for ShmGroup {
    fn drop(&mut self) {
        if let Some(group) = &self.group {
            group.epochs.depart(&group.segment);
        }
    }
}

impl TypedCollectives for ShmGroup {
    fn all_reduce_typed<T: Element>(&mut self, buffer: &mut [T], op: ReduceOp) -> Result<()> {
        self.exchange(Collective::AllReduce, buffer.len(), |group| {
            group.all_reduce(buffer, op)
        })
    }

    fn broadcast_typed<T: Element>(&mut self, buffer: &mut [T], root: usize) -> Result<()> {
        self.exchange(Collective::Broadcast, buffer.len(), |group| {
            group.broadcast(buffer, root)
        })
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let own = self.rank * input.len()..(self.rank + 1) * input.len();
        self.exchange(Collective::AllGather, input.len(), |group| {
            output[own].copy_from_slice(input);
            group.all_gather(input, output)
        })?;
        if self.group.is_none() {
            output.copy_from_slice(input);
        }
        Ok(())
    }

    fn reduce_scatter_typed<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if self.group.is_none() && !self.failure.is_set() {
            output.copy_from_slice(input);
            return Ok(());
        }
        self.exchange(Collective::ReduceScatter, output.len(), |group| {
            group.reduce_scatter(input, output, op)
        })
    }
}

crate::communicator::recorded_communicator!(ShmGroup, barrier = barrier_untracked);

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};
    use std::time::Instant;

    use super::*;
    use crate::communicator::Communicator;
    use crate::rendezvous::InMemoryStore;

    /// Forms a group of `world_size` on threads and runs `body` on every rank, returning the
    /// results in rank order.
    fn on_group<R: Send>(
        world_size: usize,
        config: impl Fn(usize) -> ShmConfig + Sync,
        body: impl Fn(&mut ShmGroup) -> R + Sync,
    ) -> Vec<Result<R>> {
        let store = Arc::new(InMemoryStore::new());
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world_size)
                .map(|rank| {
                    let (store, config, body) = (Arc::clone(&store), &config, &body);
                    scope.spawn(move || {
                        let mut group =
                            ShmGroup::connect(&*store, "test", rank, world_size, &config(rank))?;
                        Ok(body(&mut group))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        })
    }

    #[test]
    fn epoch_counters_wrap_around() {
        let world_size = 3;
        let ready = Barrier::new(world_size);
        let results = on_group(
            world_size,
            |_| ShmConfig::default(),
            |group| {
                let start = u32::MAX - 4;
                let inner = group.group.as_mut().unwrap();
                inner.epochs.start_at(&inner.segment, start);
                ready.wait();
                let mut sums = Vec::new();
                for round in 0..6 {
                    let mut values = vec![(group.rank() + round) as f32; 100_000];
                    group
                        .all_reduce((&mut values).into(), ReduceOp::Sum)
                        .unwrap();
                    sums.push(values[99_999]);
                }
                sums
            },
        );
        for sums in results {
            assert_eq!(sums.unwrap(), vec![3.0, 6.0, 9.0, 12.0, 15.0, 18.0]);
        }
    }

    #[test]
    fn ranks_that_sleep_instead_of_spinning_still_meet() {
        let config = |_| ShmConfig {
            spin: Some(Duration::ZERO),
            ..ShmConfig::default()
        };
        let results = on_group(4, config, |group| {
            let mut total = 0.0;
            for round in 0..50 {
                if group.rank() == round % 4 {
                    // The others reach the collective first and must sleep on the futex.
                    std::thread::sleep(Duration::from_millis(2));
                }
                let mut values = vec![1.0_f32; 1000];
                group
                    .all_reduce((&mut values).into(), ReduceOp::Average)
                    .unwrap();
                total += values[0];
            }
            total
        });
        for total in results {
            assert_eq!(total.unwrap(), 50.0);
        }
    }

    #[test]
    fn mismatched_calls_name_the_peer_and_what_it_called() {
        let results = on_group(
            2,
            |_| ShmConfig::default(),
            |group| {
                let mut values = vec![1.0_f32; 7 + group.rank()];
                group
                    .all_reduce((&mut values).into(), ReduceOp::Sum)
                    .unwrap_err()
                    .to_string()
            },
        );
        assert_eq!(
            results[0].as_ref().unwrap(),
            "all_reduce: peer rank 1 broke the protocol: it called all_reduce (sum) of 8 f32 \
             elements while this rank called all_reduce (sum) of 7 f32 elements"
        );
        assert!(results[1].as_ref().unwrap().contains("peer rank 0"));
    }

    #[test]
    fn ranks_with_different_secrets_never_form_a_group() {
        let config = |rank: usize| ShmConfig {
            connect_timeout: Duration::from_secs(2),
            secret: Some(crate::LinkSecret::derive(&format!("token {rank}"))),
            ..ShmConfig::default()
        };
        let started = Instant::now();
        let results = on_group(2, config, |_| ());
        assert!(started.elapsed() < Duration::from_secs(10));
        for result in results {
            let error = result.unwrap_err();
            assert!(
                matches!(error, Error::Handshake { .. } | Error::RanksMissing { .. }),
                "{error}"
            );
        }
    }

    #[test]
    fn a_dropped_group_leaves_no_mapping_behind() {
        let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();
        let count = || maps().matches(MEMFD_NAME).count();
        let before = count();
        let results = on_group(
            3,
            |_| ShmConfig::default(),
            |group| {
                group.barrier().unwrap();
                count()
            },
        );
        for during in results {
            assert!(during.unwrap() > before, "the ranks map the segment");
        }
        assert_eq!(count(), before);
    }
}
