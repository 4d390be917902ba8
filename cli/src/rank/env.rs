//! What a rank learns from the environment its worker gave it.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use cohort_proto::env;
use cohort_spec::DeviceKind;
use cohort_trainer::ComputeDevice;

/// What the process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A training rank.
    Rank,
    /// The parameter server of one shard.
    ParameterServer {
        /// The shard it serves.
        shard: u32,
        /// Shards of the job.
        shards: u32,
    },
}

/// The rank's place in its job and where its services are.
#[derive(Debug, Clone)]
pub struct RankEnv {
    /// The job.
    pub job_id: String,
    /// What this process is.
    pub role: Role,
    /// This rank (a parameter server's process index, after the ranks).
    pub rank: usize,
    /// Training ranks in the job.
    pub world_size: usize,
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// The rendezvous service's `host:port`.
    pub rendezvous: String,
    /// The address other ranks reach this node at.
    pub node_address: IpAddr,
    /// Directory for outputs, when the worker gave one.
    pub output_dir: Option<PathBuf>,
    /// `COHORT_CUDA_DEVICE` as the worker set it (on GPU ranks): the index of the rank's GPU
    /// among those `CUDA_VISIBLE_DEVICES` makes visible. Read by [`RankEnv::compute_device`].
    pub cuda_device: Option<String>,
}

fn variable(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: this command runs as a rank started by a Cohort worker")
    })
}

impl RankEnv {
    /// Reads the rank environment.
    pub fn from_env() -> Result<Self> {
        let rank: usize = variable(env::RANK)?
            .parse()
            .with_context(|| format!("{} is not a number", env::RANK))?;
        let world_size: usize = variable(env::WORLD_SIZE)?
            .parse()
            .with_context(|| format!("{} is not a number", env::WORLD_SIZE))?;
        let role = match std::env::var(env::ROLE).as_deref() {
            Err(_) | Ok(env::ROLE_RANK) => Role::Rank,
            Ok(env::ROLE_PARAMETER_SERVER) => {
                let number = |name: &str| -> Result<u32> {
                    variable(name)?
                        .parse()
                        .with_context(|| format!("{name} is not a number"))
                };
                let (shard, shards) = (number(env::PS_SHARD)?, number(env::PS_SHARDS)?);
                anyhow::ensure!(
                    shard < shards,
                    "{} = {shard}, expected below {} = {shards}",
                    env::PS_SHARD,
                    env::PS_SHARDS
                );
                Role::ParameterServer { shard, shards }
            }
            Ok(other) => anyhow::bail!(
                "{} = {other:?}, expected {:?} or {:?}",
                env::ROLE,
                env::ROLE_RANK,
                env::ROLE_PARAMETER_SERVER
            ),
        };
        anyhow::ensure!(
            role != Role::Rank || rank < world_size,
            "{} = {rank}, expected below {} = {world_size}",
            env::RANK,
            env::WORLD_SIZE
        );
        let node_address = match std::env::var(env::NODE_ADDR) {
            Ok(text) => text
                .parse()
                .with_context(|| format!("{} = {text:?} is not an IP address", env::NODE_ADDR))?,
            Err(_) => IpAddr::from([127, 0, 0, 1]),
        };
        Ok(Self {
            job_id: variable(env::JOB_ID)?,
            role,
            rank,
            world_size,
            coordinator: variable(env::COORDINATOR_ADDR)?,
            rendezvous: variable(env::RENDEZVOUS_ADDR)?,
            node_address,
            output_dir: std::env::var_os(env::OUTPUT_DIR).map(PathBuf::from),
            cuda_device: std::env::var(env::CUDA_DEVICE).ok(),
        })
    }

    /// Returns where a rank of a job asking for `kind` devices computes: the CPU, or the CUDA
    /// device `COHORT_CUDA_DEVICE` names, which a GPU rank must have.
    pub fn compute_device(&self, kind: DeviceKind) -> Result<ComputeDevice> {
        compute_device(kind, self.cuda_device.as_deref())
    }
}

/// Returns the device of a rank of a job asking for `kind` devices, given the value of
/// `COHORT_CUDA_DEVICE` (ignored on CPU ranks).
fn compute_device(kind: DeviceKind, cuda_device: Option<&str>) -> Result<ComputeDevice> {
    match kind {
        DeviceKind::Cpu => Ok(ComputeDevice::Cpu),
        DeviceKind::Gpu => {
            let text = cuda_device.with_context(|| {
                format!(
                    "{} is not set, expected the index of this rank's gpu (the job asks for \
                     resources.device = \"gpu\")",
                    env::CUDA_DEVICE
                )
            })?;
            let ordinal = text.trim().parse().with_context(|| {
                format!(
                    "{} = {text:?}, expected the index of this rank's gpu (a number)",
                    env::CUDA_DEVICE
                )
            })?;
            Ok(ComputeDevice::Cuda { ordinal })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_ranks_compute_on_the_device_the_worker_names() {
        assert_eq!(
            compute_device(DeviceKind::Cpu, None).unwrap(),
            ComputeDevice::Cpu
        );
        // A CPU rank ignores the variable, whatever it holds.
        assert_eq!(
            compute_device(DeviceKind::Cpu, Some("x")).unwrap(),
            ComputeDevice::Cpu
        );
        assert_eq!(
            compute_device(DeviceKind::Gpu, Some("2")).unwrap(),
            ComputeDevice::Cuda { ordinal: 2 }
        );
        let missing = compute_device(DeviceKind::Gpu, None)
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("COHORT_CUDA_DEVICE is not set"),
            "{missing}"
        );
        let garbage = compute_device(DeviceKind::Gpu, Some("gpu0"))
            .unwrap_err()
            .to_string();
        assert!(
            garbage.starts_with("COHORT_CUDA_DEVICE = \"gpu0\""),
            "{garbage}"
        );
    }
}
