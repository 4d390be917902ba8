//! Hybrid parallel meshes: `data x pipeline x tensor` ranks, where each rank sits, and the
//! communicators of its three axes.
//!
//! Ranks are numbered tensor-fastest: `rank = (data * pipeline + stage) * tensor + shard`.
//! Tensor-parallel groups (which talk the most, twice per block and pass) are therefore
//! consecutive ranks, which the coordinator packs onto one node where it can; pipeline
//! neighbours come next.

use std::net::SocketAddr;
use std::time::Duration;

use cohort_collective::p2p::{PeerLink, PeerLinkConfig};
use cohort_collective::{
    Communicator, GroupConfig, LinkSecret, Progress, Store, TcpRingConfig, Transport, connect_group,
};
use cohort_jobspec::train::{HostTransport, ParallelSpec};

use crate::error::{Result, TrainerError};
use crate::pipeline::{PipelineLinks, StagePosition};

/// The extent of each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshShape {
    /// Data-parallel replicas.
    pub data: usize,
    /// Pipeline stages.
    pub pipeline: usize,
    /// Tensor-parallel shards.
    pub tensor: usize,
}

/// Where one rank sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCoordinates {
    /// Its replica.
    pub data: usize,
    /// Its pipeline stage.
    pub stage: usize,
    /// Its tensor-parallel shard.
    pub tensor: usize,
}

impl MeshShape {
    /// The mesh `[parallel]` describes.
    pub fn of(parallel: &ParallelSpec) -> Self {
        Self {
            data: parallel.data as usize,
            pipeline: parallel.pipeline as usize,
            tensor: parallel.tensor as usize,
        }
    }

    /// Ranks in the mesh.
    pub fn world_size(&self) -> usize {
        self.data * self.pipeline * self.tensor
    }

    /// Where `rank` sits; `None` outside the mesh.
    pub fn coordinates(&self, rank: usize) -> Option<MeshCoordinates> {
        (rank < self.world_size()).then(|| MeshCoordinates {
            data: rank / (self.pipeline * self.tensor),
            stage: rank / self.tensor % self.pipeline,
            tensor: rank % self.tensor,
        })
    }

    /// The rank at `coordinates`.
    pub fn rank(&self, coordinates: MeshCoordinates) -> usize {
        (coordinates.data * self.pipeline + coordinates.stage) * self.tensor + coordinates.tensor
    }

    /// `data x pipeline x tensor`, as meshes are written (`2x2x1`).
    pub fn name(&self) -> String {
        format!("{}x{}x{}", self.data, self.pipeline, self.tensor)
    }
}

/// One rank's communicators.
pub struct MeshGroups {
    /// The mesh.
    pub shape: MeshShape,
    /// This rank's place.
    pub coordinates: MeshCoordinates,
    /// Every rank of the job (losses, checkpoints).
    pub world: Box<dyn Communicator + Send>,
    /// The replicas of this rank's stage and shard (gradient averaging).
    pub data: Box<dyn Communicator + Send>,
    /// The shards of this rank's stage and replica (Megatron's all-reduces); taken by the model.
    pub tensor: Option<Box<dyn Communicator + Send>>,
    /// This rank's pipeline neighbours.
    pub links: PipelineLinks,
}

impl MeshGroups {
    /// This rank's pipeline position.
    pub fn position(&self) -> StagePosition {
        StagePosition {
            index: self.coordinates.stage,
            count: self.shape.pipeline,
        }
    }
}

/// How a rank's mesh links are made.
#[derive(Debug, Clone)]
pub struct MeshLinks {
    /// Address to listen on (port 0: any).
    pub listen_address: SocketAddr,
    /// What every link proves (the job's secret; `None` only in-process).
    pub secret: Option<LinkSecret>,
    /// Where every group and link records its operations (hang diagnosis).
    pub progress: Progress,
    /// Longest a collective or a receive waits on a peer before it fails.
    pub io_timeout: Duration,
    /// How the groups' collectives travel (`parallel.transport`).
    pub transport: Transport,
    /// This rank's node: ranks with the same node share memory with `transport` auto or shm.
    pub node: String,
}

impl MeshLinks {
    /// Loopback links proving nothing, with the transports' default timeouts (in-process
    /// meshes: tests and benchmarks).
    pub fn loopback() -> Self {
        Self {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: None,
            progress: Progress::default(),
            io_timeout: TcpRingConfig::default().io_timeout,
            transport: Transport::Auto,
            node: String::new(),
        }
    }
}

impl MeshLinks {
    /// The settings of a collective group made with these links.
    pub fn group_config(&self) -> GroupConfig {
        GroupConfig {
            transport: self.transport,
            node: self.node.clone(),
            tcp: TcpRingConfig {
                listen_address: self.listen_address,
                secret: self.secret.clone(),
                io_timeout: self.io_timeout,
                progress: self.progress.clone(),
                ..TcpRingConfig::default()
            },
            shm_slot_bytes: None,
        }
    }
}

/// The collective crate's transport for a job spec's `parallel.transport`.
pub fn host_transport(transport: HostTransport) -> Transport {
    match transport {
        HostTransport::Auto => Transport::Auto,
        HostTransport::Tcp => Transport::Tcp,
        HostTransport::Shm => Transport::Shm,
    }
}

/// Joins rank `rank` of `shape` to its groups through `store`, with links made as `links`
/// says. Every rank of the mesh must call it; groups are formed in the same order on every rank
/// (world, data, tensor, then pipeline links towards stage 0 first), so no rank waits on a
/// group its peers have not reached.
pub fn connect_mesh(
    store: &dyn Store,
    rank: usize,
    shape: MeshShape,
    links: &MeshLinks,
) -> Result<MeshGroups> {
    let coordinates = shape.coordinates(rank).ok_or_else(|| {
        TrainerError::Config(format!(
            "rank {rank} outside a {} mesh of {} ranks",
            shape.name(),
            shape.world_size()
        ))
    })?;
    let group_config = links.group_config();
    let ring =
        |name: String, member: usize, members: usize| -> Result<Box<dyn Communicator + Send>> {
            Ok(connect_group(store, &name, member, members, &group_config)?)
        };
    let MeshCoordinates {
        data,
        stage,
        tensor,
    } = coordinates;
    let world = ring("mesh/world".to_owned(), rank, shape.world_size())?;
    let data_group = ring(format!("mesh/data/s{stage}-t{tensor}"), data, shape.data)?;
    let tensor_group = ring(
        format!("mesh/tensor/d{data}-s{stage}"),
        tensor,
        shape.tensor,
    )?;
    let link_config = PeerLinkConfig {
        listen_address: links.listen_address,
        secret: links.secret.clone(),
        // A receive waits for a whole stage's work, not only for the wire.
        receive_timeout: links
            .io_timeout
            .max(PeerLinkConfig::default().receive_timeout),
        progress: links.progress.clone(),
        ..PeerLinkConfig::default()
    };
    let link = |from_stage: usize| -> Result<PeerLink> {
        let lower = shape.rank(MeshCoordinates {
            stage: from_stage,
            ..coordinates
        });
        let upper = shape.rank(MeshCoordinates {
            stage: from_stage + 1,
            ..coordinates
        });
        let peer = if lower == rank { upper } else { lower };
        Ok(PeerLink::connect(
            store,
            &format!("mesh/pipe/d{data}-t{tensor}/s{from_stage}"),
            rank,
            peer,
            &link_config,
        )?)
    };
    let previous = if stage > 0 {
        Some(link(stage - 1)?)
    } else {
        None
    };
    let next = if stage + 1 < shape.pipeline {
        Some(link(stage)?)
    } else {
        None
    };
    Ok(MeshGroups {
        shape,
        coordinates,
        world,
        data: data_group,
        tensor: Some(tensor_group),
        links: PipelineLinks { previous, next },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_numbered_tensor_fastest() {
        let shape = MeshShape {
            data: 2,
            pipeline: 3,
            tensor: 2,
        };
        assert_eq!(shape.world_size(), 12);
        assert_eq!(
            shape.coordinates(7),
            Some(MeshCoordinates {
                data: 1,
                stage: 0,
                tensor: 1
            })
        );
        for rank in 0..12 {
            assert_eq!(shape.rank(shape.coordinates(rank).unwrap()), rank);
        }
        assert_eq!(shape.coordinates(12), None);
        // A tensor group is two consecutive ranks.
        assert_eq!(shape.coordinates(4).unwrap().stage, 2);
        assert_eq!(shape.coordinates(5).unwrap().stage, 2);
        assert_eq!(shape.name(), "2x3x2");
    }
}
