//! [`Hierarchical`]: a group spanning several nodes with several ranks on each, which moves
//! most of its bytes through shared memory and sends each node's share across the network once.
//!
//! Ranks are numbered node by node (`rank = node * per_node + local_rank`), as the
//! coordinator places a job's ranks. Each node's ranks form a [`ShmGroup`]; the ranks with the
//! same local rank on every node form a [`TcpRing`], so a node's `per_node` rings all run at once
//! and every local rank's links carry a share. An all-reduce is a reduce-scatter within the
//! node (each local rank ends with the node's sum of one stripe), an all-reduce of that stripe
//! across nodes, and an all-gather within the node: each rank sends `2 (nodes - 1) / nodes`
//! times its stripe across the network, and the node sends `2 (nodes - 1) / nodes` times the
//! buffer in all, where a flat ring sends `2 (world - 1) / world` times the buffer out of every
//! rank on the node's boundary. Partial sums stay `f32` until the end, so low-precision
//! buffers are rounded once.
//!
//! Both parts name ranks of the whole group in their errors, and when one part fails the rank
//! tells the other part's peers before it gives up (an abort notice on the ring, the abort word
//! in shared memory), so every rank reports the same failed rank.

use crate::buffer::{Element, ReduceOp};
use crate::communicator::{Communicator, TypedCollectives};
use crate::error::{Error, FirstFailure, Result};
use crate::operation::Collective;
use crate::progress::{Channel, Entered};
use crate::shm::ShmGroup;
use crate::tcp_ring::TcpRing;

/// Where a rank sits in a hierarchical group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Nodes.
    pub nodes: usize,
    /// Ranks on each node.
    pub per_node: usize,
}

impl Placement {
    /// The whole group's names of a node's ranks, by local rank.
    pub fn local_names(self, node: usize) -> Vec<usize> {
        (0..self.per_node)
            .map(|local| node * self.per_node + local)
            .collect()
    }

    /// The whole group's names of the ranks with local rank `local`, by node.
    pub fn cross_names(self, local: usize) -> Vec<usize> {
        (0..self.nodes)
            .map(|node| node * self.per_node + local)
            .collect()
    }
}

/// A group of ranks on several nodes: shared memory within each node, TCP rings across.
pub struct Hierarchical {
    rank: usize,
    world_size: usize,
    placement: Placement,
    /// This node's ranks.
    local: ShmGroup,
    /// The ranks of this local rank on every node.
    cross: TcpRing,
    /// `f32` working copy of a buffer, padded to a multiple of `per_node`.
    sums: Vec<f32>,
    /// This rank's stripe of `sums`.
    stripe: Vec<f32>,
    /// The first failure, after which every call fails.
    failure: FirstFailure,
    channel: Channel,
}

impl Hierarchical {
    /// Joins `local` (this node's ranks, naming ranks of the whole group) and `cross` (this
    /// local rank's ring across nodes, likewise) into one group of `placement`.
    pub fn new(
        placement: Placement,
        local: ShmGroup,
        cross: TcpRing,
        channel: Channel,
    ) -> Hierarchical {
        let rank = cross.rank() * placement.per_node + local.rank();
        Hierarchical {
            rank,
            world_size: placement.nodes * placement.per_node,
            placement,
            local,
            cross,
            sums: Vec::new(),
            stripe: Vec::new(),
            failure: FirstFailure::default(),
            channel,
        }
    }

    /// The payload bytes this rank has sent across nodes since the group formed.
    pub fn network_bytes(&self) -> u64 {
        self.cross.payload_bytes_sent()
    }

    /// Runs `body` unless an earlier call failed; on failure, tells both parts' peers which
    /// rank failed before remembering it.
    fn guarded(
        &mut self,
        collective: Collective,
        body: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<()> {
        self.failure.check(collective)?;
        let result = body(self);
        if let Err(error) = &result {
            let (failed_rank, cause, reporter) = match error {
                Error::Aborted {
                    failed_rank,
                    cause,
                    reporter,
                    ..
                } => (*failed_rank, *cause, *reporter),
                other => (
                    other.failed_rank().unwrap_or(self.rank),
                    other.abort_cause(),
                    self.rank,
                ),
            };
            self.cross.abort(failed_rank, cause, reporter);
            self.local.abort(failed_rank, cause, reporter);
            self.failure.record(error);
        }
        result
    }

    /// This rank's stripe of a buffer of `len` elements padded for the node: its range.
    fn stripe_range(&self, len: usize) -> std::ops::Range<usize> {
        let stripe = len.div_ceil(self.placement.per_node);
        let local = self.local.rank();
        stripe * local..stripe * (local + 1)
    }

    fn enter(&self, collective: Collective, len: usize, dtype: crate::DType) -> Entered {
        self.channel
            .enter(collective.name(), len * dtype.size_bytes(), None)
    }

    /// Errors already name ranks of the whole group (both parts do).
    fn name_error(&self, error: Error) -> Error {
        error
    }

    /// [`Communicator::barrier`], unrecorded.
    fn barrier_untracked(&mut self) -> Result<()> {
        self.guarded(Collective::Barrier, |group| {
            group.local.barrier()?;
            group.cross.barrier()?;
            group.local.barrier()
        })
    }
}

impl TypedCollectives for Hierarchical {
    fn all_reduce_typed<T: Element>(&mut self, buffer: &mut [T], op: ReduceOp) -> Result<()> {
        if buffer.is_empty() {
            return self.guarded(Collective::AllReduce, |_| Ok(()));
        }
        self.guarded(Collective::AllReduce, |group| {
            let len = buffer.len();
            let padded = len.div_ceil(group.placement.per_node) * group.placement.per_node;
            let own = group.stripe_range(len);
            group.sums.clear();
            group.sums.resize(padded, 0.0);
            T::widen_slice(buffer, &mut group.sums[..len]);
            group.stripe.resize(own.len(), 0.0);
            group.local.reduce_scatter(
                (&group.sums).into(),
                (&mut group.stripe).into(),
                ReduceOp::Sum,
            )?;
            group
                .cross
                .all_reduce((&mut group.stripe).into(), ReduceOp::Sum)?;
            group
                .local
                .all_gather((&group.stripe).into(), (&mut group.sums).into())?;
            if op == ReduceOp::Average {
                let divisor = group.world_size as f32;
                for sum in &mut group.sums[..len] {
                    *sum /= divisor;
                }
            }
            T::narrow_slice(&group.sums[..len], buffer);
            Ok(())
        })
    }

    fn broadcast_typed<T: Element>(&mut self, buffer: &mut [T], root: usize) -> Result<()> {
        let (root_node, root_local) = (
            root / self.placement.per_node,
            root % self.placement.per_node,
        );
        self.guarded(Collective::Broadcast, |group| {
            if buffer.is_empty() {
                return Ok(());
            }
            if group.local.rank() == root_local {
                group.cross.broadcast(T::buffer_mut(buffer), root_node)?;
            }
            group.local.broadcast(T::buffer_mut(buffer), root_local)
        })
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let Placement { nodes, per_node } = self.placement;
        self.guarded(Collective::AllGather, |group| {
            let block = input.len();
            if block == 0 {
                return Ok(());
            }
            // Across nodes first: this local rank's block of every node, by node.
            let mut across = vec![T::from_f32(0.0); block * nodes];
            group
                .cross
                .all_gather(T::buffer_ref(input), T::buffer_mut(&mut across))?;
            // Then within the node: by local rank, then node.
            let mut gathered = vec![T::from_f32(0.0); block * nodes * per_node];
            group
                .local
                .all_gather(T::buffer_ref(&across), T::buffer_mut(&mut gathered))?;
            for local in 0..per_node {
                for node in 0..nodes {
                    let from = (local * nodes + node) * block;
                    let to = (node * per_node + local) * block;
                    output[to..to + block].copy_from_slice(&gathered[from..from + block]);
                }
            }
            Ok(())
        })
    }

    fn reduce_scatter_typed<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        // Not on a hot path: the whole reduction, then this rank's block.
        let mut reduced = input.to_vec();
        self.all_reduce_typed(&mut reduced, op)?;
        let block = output.len();
        output.copy_from_slice(&reduced[self.rank * block..(self.rank + 1) * block]);
        Ok(())
    }
}

crate::communicator::recorded_communicator!(
    Hierarchical,
    barrier = barrier_untracked,
    bytes_sent = network_bytes
);
