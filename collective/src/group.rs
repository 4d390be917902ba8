//! One entry point for a host communicator: [`connect_group`] learns which node every rank is
//! on and picks the transport: shared memory ([`ShmGroup`]) when all ranks share a node, the TCP
//! ring otherwise, or what the job asked for ([`Transport`]).
//!
//! The choice is a pure function of what every rank published ([`plan_layout`]), so every rank
//! makes the same one.

use std::time::Duration;

use tracing::debug;

use crate::communicator::Communicator;
use crate::error::{Error, Result};
use crate::hierarchical::{Hierarchical, Placement};
use crate::progress::Progress;
use crate::rendezvous::Store;
use crate::shm::{ShmConfig, ShmGroup};
use crate::tcp_ring::{TcpRing, TcpRingConfig};

/// Which transport a group of ranks uses between host buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Shared memory when every rank is on one node, TCP otherwise.
    #[default]
    Auto,
    /// The TCP ring, wherever the ranks are.
    Tcp,
    /// Shared memory; an error unless every rank is on one node.
    Shm,
}

impl Transport {
    /// The name used in job specs and flags.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
        }
    }
}

/// How a group's ranks are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One ring over TCP.
    TcpRing,
    /// Shared memory on one node.
    SharedMemory,
    /// Shared memory within each node and one TCP ring per local rank across nodes
    /// ([`Hierarchical`]).
    Hierarchical(Placement),
}

/// Chooses the layout for ranks on `nodes` (node of each rank, in rank order), or says why
/// `transport` cannot be honoured.
pub fn plan_layout(nodes: &[String], transport: Transport) -> Result<Layout, String> {
    let one_node = nodes.windows(2).all(|pair| pair[0] == pair[1]);
    match transport {
        Transport::Tcp => Ok(Layout::TcpRing),
        Transport::Auto if one_node => Ok(Layout::SharedMemory),
        Transport::Auto => Ok(even_placement(nodes).map_or(Layout::TcpRing, Layout::Hierarchical)),
        Transport::Shm if one_node => Ok(Layout::SharedMemory),
        Transport::Shm => {
            let mut distinct: Vec<&str> = nodes.iter().map(String::as_str).collect();
            distinct.dedup();
            Err(format!(
                "transport \"shm\" needs every rank on one node, but they are on nodes {}",
                distinct.join(", ")
            ))
        }
    }
}

/// The placement of ranks numbered node by node, with the same number (at least 2) on each
/// of at least 2 nodes; `None` for any other arrangement.
fn even_placement(nodes: &[String]) -> Option<Placement> {
    let per_node = nodes.iter().take_while(|node| **node == nodes[0]).count();
    if per_node < 2 || !nodes.len().is_multiple_of(per_node) || nodes.len() == per_node {
        return None;
    }
    let blocks: Vec<&[String]> = nodes.chunks(per_node).collect();
    let uniform = blocks
        .iter()
        .all(|block| block.iter().all(|node| *node == block[0]));
    let mut firsts: Vec<&String> = blocks.iter().map(|block| &block[0]).collect();
    firsts.sort();
    firsts.dedup();
    (uniform && firsts.len() == blocks.len()).then_some(Placement {
        nodes: blocks.len(),
        per_node,
    })
}

/// Settings of [`connect_group`].
#[derive(Debug, Clone, Default)]
pub struct GroupConfig {
    /// The transport asked for.
    pub transport: Transport,
    /// This rank's node, as every rank of the group names it (ranks with equal names share
    /// memory). Empty: one node for all.
    pub node: String,
    /// Settings of a TCP ring, if one is formed (its timeouts, secret and progress record are
    /// used for shared memory too).
    pub tcp: TcpRingConfig,
    /// Bytes of each shared-memory slot (`None`: [`ShmConfig`]'s default).
    pub shm_slot_bytes: Option<usize>,
}

/// Joins the group named `prefix` as `rank` of `world_size`: publishes this rank's node under
/// `{prefix}/node/{rank}`, waits for every rank's, and forms the layout [`plan_layout`] picks.
pub fn connect_group(
    store: &dyn Store,
    prefix: &str,
    rank: usize,
    world_size: usize,
    config: &GroupConfig,
) -> Result<Box<dyn Communicator + Send>> {
    if world_size <= 1 || config.transport == Transport::Tcp {
        return Ok(Box::new(TcpRing::connect(
            store,
            prefix,
            rank,
            world_size,
            &config.tcp,
        )?));
    }
    let nodes = node_names(
        store,
        prefix,
        rank,
        world_size,
        &config.node,
        config.tcp.connect_timeout,
    )?;
    let layout =
        plan_layout(&nodes, config.transport).map_err(|reason| Error::InvalidArgument {
            field: "transport",
            found: reason,
            expected: "\"auto\" or \"tcp\" for ranks on several nodes",
        })?;
    debug!(prefix, rank, world_size, ?layout, "group layout");
    Ok(match layout {
        Layout::TcpRing => Box::new(TcpRing::connect(
            store,
            prefix,
            rank,
            world_size,
            &config.tcp,
        )?),
        Layout::SharedMemory => Box::new(ShmGroup::connect(
            store,
            prefix,
            rank,
            world_size,
            &shm_config(config),
        )?),
        Layout::Hierarchical(placement) => {
            let (node, local) = (rank / placement.per_node, rank % placement.per_node);
            // The parts record nothing of their own: the group records its collectives.
            let local_group = ShmGroup::connect(
                store,
                &format!("{prefix}/local/{node}"),
                local,
                placement.per_node,
                &ShmConfig {
                    progress: Progress::disabled(),
                    rank_names: Some(placement.local_names(node)),
                    ..shm_config(config)
                },
            )?;
            let cross = TcpRing::connect(
                store,
                &format!("{prefix}/cross/{local}"),
                node,
                placement.nodes,
                &TcpRingConfig {
                    progress: Progress::disabled(),
                    rank_names: Some(placement.cross_names(local)),
                    // Half again the node's timeout: a stall inside a node, which shared memory
                    // names exactly, is detected and passed on before the ring across nodes
                    // would blame the stalled rank's node-mate it waits for.
                    io_timeout: config.tcp.io_timeout.saturating_mul(3) / 2,
                    ..config.tcp.clone()
                },
            )?;
            let channel = config.tcp.progress.channel(prefix, world_size);
            Box::new(Hierarchical::new(placement, local_group, cross, channel))
        }
    })
}

/// The shared-memory settings `config` implies.
fn shm_config(config: &GroupConfig) -> ShmConfig {
    ShmConfig {
        connect_timeout: config.tcp.connect_timeout,
        io_timeout: config.tcp.io_timeout,
        slot_bytes: config
            .shm_slot_bytes
            .unwrap_or(ShmConfig::default().slot_bytes),
        spin: None,
        secret: config.tcp.secret.clone(),
        progress: config.tcp.progress.clone(),
        rank_names: None,
    }
}

/// Publishes `node` for `rank` and returns every rank's node, in rank order.
fn node_names(
    store: &dyn Store,
    prefix: &str,
    rank: usize,
    world_size: usize,
    node: &str,
    timeout: Duration,
) -> Result<Vec<String>> {
    store.set(&format!("{prefix}/node/{rank}"), node.as_bytes())?;
    let keys: Vec<String> = (0..world_size)
        .map(|peer| format!("{prefix}/node/{peer}"))
        .collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = store
        .wait(&key_refs, timeout)
        .map_err(|error| match error {
            Error::StoreTimeout { timeout, .. } => Error::RanksMissing {
                prefix: prefix.to_owned(),
                missing_ranks: (0..world_size)
                    .filter(|&peer| store.get(&keys[peer]).ok().flatten().is_none())
                    .collect(),
                world_size,
                timeout,
            },
            other => other,
        })?;
    Ok(values
        .into_iter()
        .map(|value| String::from_utf8_lossy(&value).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::rendezvous::InMemoryStore;
    use crate::{BufferMut, ReduceOp};

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn ranks_on_one_node_share_memory_unless_tcp_is_asked_for() {
        let same = nodes(&["a", "a", "a"]);
        assert_eq!(
            plan_layout(&same, Transport::Auto),
            Ok(Layout::SharedMemory)
        );
        assert_eq!(plan_layout(&same, Transport::Shm), Ok(Layout::SharedMemory));
        assert_eq!(plan_layout(&same, Transport::Tcp), Ok(Layout::TcpRing));
    }

    #[test]
    fn ranks_on_several_nodes_use_tcp_and_refuse_shared_memory() {
        let spread = nodes(&["a", "a", "b", "b"]);
        assert_eq!(
            plan_layout(&spread, Transport::Auto),
            Ok(Layout::Hierarchical(Placement {
                nodes: 2,
                per_node: 2
            }))
        );
        for flat in [
            &["a", "b"][..],
            &["a", "a", "b"],
            &["a", "b", "a", "b"],
            &["a", "a", "b", "b", "a", "a"],
            &["a", "a", "a", "b", "b", "c"],
        ] {
            assert_eq!(
                plan_layout(&nodes(flat), Transport::Auto),
                Ok(Layout::TcpRing),
                "{flat:?}"
            );
        }
        assert_eq!(
            plan_layout(
                &nodes(&["a", "a", "a", "b", "b", "b", "c", "c", "c"]),
                Transport::Auto
            ),
            Ok(Layout::Hierarchical(Placement {
                nodes: 3,
                per_node: 3
            }))
        );
        assert_eq!(plan_layout(&spread, Transport::Tcp), Ok(Layout::TcpRing));
        assert_eq!(
            plan_layout(&spread, Transport::Shm),
            Err(
                "transport \"shm\" needs every rank on one node, but they are on nodes a, b"
                    .to_owned()
            )
        );
    }

    /// Forms a group of ranks on `nodes` (by rank) with `transport`, each on a thread, runs
    /// `body` on each, and returns the results in rank order.
    fn on_nodes<R: Send>(
        nodes: &[&str],
        transport: Transport,
        body: impl Fn(&mut (dyn Communicator + Send)) -> Result<R> + Sync,
    ) -> Vec<Result<R>> {
        let store = Arc::new(InMemoryStore::new());
        let world_size = nodes.len();
        std::thread::scope(|scope| {
            let handles: Vec<_> = nodes
                .iter()
                .enumerate()
                .map(|(rank, node)| {
                    let (store, body) = (Arc::clone(&store), &body);
                    scope.spawn(move || {
                        let config = GroupConfig {
                            transport,
                            node: (*node).to_owned(),
                            ..GroupConfig::default()
                        };
                        let mut group = connect_group(&*store, "g", rank, world_size, &config)?;
                        body(&mut *group)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        })
    }

    /// All-reduces ones on ranks on `nodes`; returns each rank's result or error.
    fn all_reduce_ones(nodes: &[&str], transport: Transport) -> Vec<Result<f32>> {
        on_nodes(nodes, transport, |group| {
            let mut values = vec![1.0_f32; 3];
            group.all_reduce(BufferMut::from(&mut values), ReduceOp::Sum)?;
            Ok(values[0])
        })
    }

    #[test]
    fn every_transport_forms_a_working_group() {
        for (nodes, transport) in [
            (&["n", "n", "n"][..], Transport::Auto),
            (&["n", "n", "n"][..], Transport::Shm),
            (&["a", "b", "b"][..], Transport::Auto),
            (&["a", "a", "b", "b"][..], Transport::Auto),
            (&["a", "a", "a", "b", "b", "b"][..], Transport::Auto),
            (&["n", "n"][..], Transport::Tcp),
        ] {
            for result in all_reduce_ones(nodes, transport) {
                assert_eq!(
                    result.unwrap(),
                    nodes.len() as f32,
                    "{nodes:?} {transport:?}"
                );
            }
        }
    }

    /// All-reduces `elements` f32 on ranks placed on `nodes` with `transport`; returns the
    /// network bytes each rank sent for it.
    fn network_bytes(nodes: &[&str], transport: Transport, elements: usize) -> Vec<u64> {
        let world_size = nodes.len();
        on_nodes(nodes, transport, |group| {
            let mut values = vec![group.rank() as f32; elements];
            let before = group.network_bytes_sent().unwrap();
            group.all_reduce(BufferMut::from(&mut values), ReduceOp::Sum)?;
            let expected = (world_size * (world_size - 1) / 2) as f32;
            assert!(values.iter().all(|&value| value == expected));
            Ok(group.network_bytes_sent().unwrap() - before)
        })
        .into_iter()
        .map(Result::unwrap)
        .collect()
    }

    #[test]
    fn a_hierarchical_group_sends_each_nodes_share_across_once() {
        // 2 nodes x 2 ranks, 1 MiB: each rank sends 2 (2 - 1) / 2 of its half across nodes.
        let elements = 1 << 18;
        let bytes = (elements * 4) as u64;
        let nodes = ["a", "a", "b", "b"];
        let hierarchical = network_bytes(&nodes, Transport::Auto, elements);
        assert_eq!(hierarchical, vec![bytes / 2; 4]);
        // The flat ring sends 2 (4 - 1) / 4 of the buffer out of every rank, and the ranks at
        // a node's boundary (1 and 3) send it across: 1.5 times the bytes per node.
        let flat = network_bytes(&nodes, Transport::Tcp, elements);
        assert_eq!(flat, vec![bytes * 3 / 2; 4]);
        let per_node = |sent: &[u64], crossing: &[usize]| -> u64 {
            crossing.iter().map(|&rank| sent[rank]).sum()
        };
        assert_eq!(per_node(&hierarchical, &[0, 1]), bytes);
        assert_eq!(per_node(&flat, &[1]), bytes * 3 / 2);
    }

    #[test]
    fn shared_memory_across_nodes_fails_on_every_rank_naming_the_nodes() {
        for result in all_reduce_ones(&["a", "b"], Transport::Shm) {
            let error = result.unwrap_err().to_string();
            assert!(error.contains("on nodes a, b"), "{error}");
        }
    }
}
