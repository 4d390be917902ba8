//! The launch contract: everything a process of a job is told about its place, as one type with
//! its encodings side by side.
//!
//! 1. The coordinator decides each process's [`RankPlace`] when it places the job and sends it
//!    in the `StartRank` instruction (`StartRank::from(&place)`, plus what only the worker
//!    needs: the program, the job's own variables, the grace period).
//! 2. The worker reads it back (`RankPlace::try_from(&start)`, which checks every field), adds
//!    the facts of its node ([`NodeFacts`]) to make the [`Launch`], and starts the process with
//!    [`Launch::environment`]: its own environment, then the job's variables, then every
//!    variable of [`Launch::to_env`] over them. That order is a security property: a job can
//!    never override its place, its devices or its services (spec validation refuses such a
//!    job at submission too, with [`crate::env::is_managed`]; the order also holds for records
//!    stored before that rule).
//! 3. The process reads it with [`Launch::from_env`], which names the variable that is missing
//!    or malformed.
//!
//! The variables ([`crate::env`] has the names):
//!
//! | variables | value |
//! |---|---|
//! | `COHORT_JOB_ID`, `COHORT_RANK`, `COHORT_WORLD_SIZE`, `COHORT_LOCAL_RANK`, `COHORT_LOCAL_WORLD_SIZE` | the place; `WORLD_SIZE` counts training ranks only |
//! | `COHORT_DEVICES` | the devices held, `cpu:0,cpu:1` |
//! | `OMP_NUM_THREADS`, `RAYON_NUM_THREADS` | CPU processes: the CPU slots held |
//! | `CUDA_VISIBLE_DEVICES`, `COHORT_CUDA_DEVICE` | GPU processes: their GPUs alone, renumbered from 0, and the index of the first (0) |
//! | `NCCL_SOCKET_IFNAME=lo` | GPU processes of a cluster that lives on loopback |
//! | `COHORT_ROLE` | `rank` or `parameter-server` |
//! | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` | training ranks: what a PyTorch script expects |
//! | `COHORT_PS_SHARD`, `COHORT_PS_SHARDS` | parameter servers: their shard |
//! | `COHORT_JOB_SPEC` | processes of `kind = "train"` jobs: the job's spec (TOML) |
//! | `COHORT_JOB_TOKEN` | every process: the job's token, for its rendezvous, metrics and (derived) its links; valid while the job runs |
//! | `COHORT_COORDINATOR_ADDR`, `COHORT_RENDEZVOUS_ADDR`, `COHORT_NODE_ID`, `COHORT_NODE_ADDR`, `COHORT_BIN`, `COHORT_OUTPUT_DIR` | added by the worker: its node's facts |
//!
//! The spec travels in a variable rather than in a file. It is bounded at submission
//! (`cohort_jobspec::MAX_SPEC_BYTES`, 64 KiB), well under Linux's bound on one environment string
//! (`MAX_ARG_STRLEN`, 128 KiB), so a variable always fits ([`MAX_SPEC_BYTES`] is the bound the
//! worker checks, and the coordinator checks at compile time that a submitted spec is under
//! it). A variable needs no file created with the right mode, removed when the rank ends, or
//! found again after a worker restart, and it is as private as such a file would be
//! (`/proc/<pid>/environ` is readable by the process's owner alone). Only `kind = "train"`
//! processes, which run Cohort's own runtime, get it: a command job's program sees exactly the
//! variables it always did.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;

use crate::ids::{ID_EXPECTATION, JobId, NodeId};
use crate::secret::Secret;
use crate::text::excerpt;
use crate::{env, v1};

/// Program name in a start instruction (`argv[0]`) that stands for the worker's own `cohort`
/// executable: the program of every process of a `kind = "train"` job (`@cohort rank`).
pub const COHORT_EXECUTABLE: &str = "@cohort";

/// Largest spec a start instruction may carry, in bytes: what one environment variable holds
/// with room to spare (Linux refuses to start a program with an environment string over 128
/// KiB, `MAX_ARG_STRLEN`).
pub const MAX_SPEC_BYTES: usize = 120 * 1024;

/// The exit status of a process whose job's input is at fault (a data set or checkpoint it
/// cannot read): `EX_CONFIG`. The coordinator does not restart a job for it, since every attempt
/// would fail the same way.
pub const EXIT_INPUT_ERROR: u8 = 78;

/// The exit status of a training rank that stopped on request (SIGTERM) after writing a
/// checkpoint: `EX_TEMPFAIL`, "try again later". The coordinator shows such a rank as stopped
/// with a checkpoint.
pub const EXIT_STOPPED_WITH_CHECKPOINT: u8 = 75;

/// Longest job token a start instruction may carry, in bytes (Cohort's are 75).
pub const MAX_TOKEN_BYTES: usize = 256;

/// Why a launch could not be read: a variable (or a field of the start instruction) that is
/// missing or holds a value the contract does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// A variable the contract needs is not set.
    #[error("{name} is not set: this command runs as a rank started by a Cohort worker")]
    Missing {
        /// The variable.
        name: &'static str,
    },
    /// A variable or field holds a value the contract does not allow.
    #[error("{name} = {found}, expected {expected}")]
    Malformed {
        /// The variable, or the start instruction's field (`start_rank.devices`).
        name: &'static str,
        /// What it holds, quoted (an excerpt of a long value).
        found: String,
        /// What it should hold.
        expected: String,
    },
}

impl LaunchError {
    /// `name` holds `text`, which is not `expected`.
    fn malformed(name: &'static str, text: &str, expected: impl Into<String>) -> Self {
        Self::Malformed {
            name,
            found: excerpt(text),
            expected: expected.into(),
        }
    }
}

/// Result with a [`LaunchError`].
pub type Result<T, E = LaunchError> = std::result::Result<T, E>;

/// What a process of a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A training rank.
    Rank,
    /// The parameter server of one shard.
    ParameterServer {
        /// The shard it serves, below `shards`.
        shard: u32,
        /// Shards of the job.
        shards: u32,
    },
}

/// Where PyTorch's rendezvous of a job's training ranks is: rank 0's host and a port chosen
/// for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    /// Host of rank 0's node (`MASTER_ADDR`).
    pub addr: String,
    /// The job's port (`MASTER_PORT`), never 0.
    pub port: u16,
}

/// The devices a process holds, at least one, all of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// CPU slots; the process's thread pools are sized to their number.
    Cpu {
        /// The slots' indices on the node.
        slots: Vec<u32>,
    },
    /// GPUs; the process sees only these.
    Gpu {
        /// The GPUs' indices on the node.
        gpus: Vec<u32>,
        /// Index of the process's first GPU among those it sees (always 0: it sees only its
        /// own, renumbered from 0).
        cuda_device: u32,
        /// Whether NCCL is kept on loopback (`NCCL_SOCKET_IFNAME=lo`): NCCL listens on an
        /// interface of its own choosing, a non-loopback one when the machine has any, and a
        /// cluster that lives on loopback keeps it there too.
        nccl_on_loopback: bool,
    },
}

impl Devices {
    /// The name of the devices' kind in `COHORT_DEVICES`.
    fn kind_name(&self) -> &'static str {
        match self {
            Self::Cpu { .. } => "cpu",
            Self::Gpu { .. } => "gpu",
        }
    }

    /// The devices' indices on the node.
    pub fn indices(&self) -> &[u32] {
        match self {
            Self::Cpu { slots } => slots,
            Self::Gpu { gpus, .. } => gpus,
        }
    }

    /// The CUDA device the process computes on, for a GPU process.
    pub fn cuda_device(&self) -> Option<u32> {
        match self {
            Self::Cpu { .. } => None,
            Self::Gpu { cuda_device, .. } => Some(*cuda_device),
        }
    }
}

/// A process's place in its job, as the coordinator decides it: the half of the contract the
/// start instruction carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlace {
    /// The job.
    pub job_id: JobId,
    /// The process's index: a training rank (`0..world_size`), or a parameter server numbered
    /// after them.
    pub rank: u32,
    /// Training ranks of the job; parameter servers are extra processes of its gang.
    pub world_size: u32,
    /// The process's index among the job's processes on its node.
    pub local_rank: u32,
    /// The job's processes on the node.
    pub local_world_size: u32,
    /// The devices it holds.
    pub devices: Devices,
    /// What it is.
    pub role: Role,
    /// PyTorch's rendezvous: set exactly for training ranks.
    pub master: Option<Master>,
    /// The job's spec (TOML, never empty), for the processes of `kind = "train"` jobs.
    pub spec_toml: Option<String>,
    /// The job's token, issued at placement: the process's credential for the job's
    /// rendezvous and metrics, and (derived) for its links to the job's other processes.
    /// `None` only from a coordinator that issues none.
    pub job_token: Option<Secret>,
    /// The job's attempt, from 0: how often it was restarted (`COHORT_RESTART_COUNT`). A
    /// restarted `train` job resumes from its latest checkpoint; a script can do the same.
    pub restart_count: u32,
}

/// What the worker adds to a process's place: the facts of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// The rendezvous service's `host:port` (served by the coordinator).
    pub rendezvous: String,
    /// The node.
    pub node_id: NodeId,
    /// The host other processes of the job reach this node at (the worker's advertised
    /// address).
    pub node_address: String,
    /// The `cohort` executable the worker runs, so scripts can call `cohort kv ...`.
    pub cohort_bin: PathBuf,
    /// The job's output directory on this node (`<worker --output-dir>/<job id>`), shared by
    /// the job's processes on the node.
    pub output_dir: PathBuf,
    /// The cluster's CA certificate file, when the cluster serves TLS: the process reaches the
    /// coordinator and parameter servers over TLS, trusting what it signed.
    pub ca: Option<PathBuf>,
    /// The node's certificate and key files, which its parameter servers serve TLS with.
    pub tls: Option<TlsFiles>,
}

/// A TLS certificate file and its private key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate (PEM).
    pub certificate: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl NodeFacts {
    /// The node's address as an IP address, for a process that listens on it.
    pub fn node_ip(&self) -> Result<IpAddr> {
        self.node_address.parse().map_err(|_| {
            LaunchError::malformed(env::NODE_ADDR, &self.node_address, "an IP address")
        })
    }
}

/// The whole contract: a process's place and its node's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The place the coordinator decided.
    pub place: RankPlace,
    /// The facts the worker added.
    pub node: NodeFacts,
}

impl Launch {
    /// Every variable of the contract, by name.
    pub fn to_env(&self) -> BTreeMap<String, String> {
        let place = &self.place;
        let mut variables = BTreeMap::new();
        let mut set = |name: &str, value: String| {
            variables.insert(name.to_owned(), value);
        };
        let rank = place.rank.to_string();
        let world_size = place.world_size.to_string();
        let local_rank = place.local_rank.to_string();
        let local_world_size = place.local_world_size.to_string();
        set(env::JOB_ID, place.job_id.to_string());
        set(env::RANK, rank.clone());
        set(env::WORLD_SIZE, world_size.clone());
        set(env::LOCAL_RANK, local_rank.clone());
        set(env::LOCAL_WORLD_SIZE, local_world_size.clone());
        let kind = place.devices.kind_name();
        let devices = place.devices.indices();
        set(
            env::DEVICES,
            join(devices.iter().map(|i| format!("{kind}:{i}"))),
        );
        match &place.devices {
            Devices::Cpu { slots } => {
                // A CPU slot is a core: the process's thread pools get the slots it holds, as
                // torchrun does with OMP_NUM_THREADS, so processes sharing a node do not
                // oversubscribe it.
                let threads = slots.len().max(1).to_string();
                set(env::OMP_NUM_THREADS, threads.clone());
                set(env::RAYON_NUM_THREADS, threads);
            }
            Devices::Gpu {
                gpus,
                cuda_device,
                nccl_on_loopback,
            } => {
                set(env::CUDA_VISIBLE_DEVICES, join(gpus.iter()));
                set(env::CUDA_DEVICE, cuda_device.to_string());
                if *nccl_on_loopback {
                    set(env::NCCL_SOCKET_IFNAME, "lo".to_owned());
                }
            }
        }
        match place.role {
            Role::Rank => {
                set(env::ROLE, env::ROLE_RANK.to_owned());
                set(env::torch::RANK, rank);
                set(env::torch::WORLD_SIZE, world_size);
                set(env::torch::LOCAL_RANK, local_rank);
                set(env::torch::LOCAL_WORLD_SIZE, local_world_size);
                set(
                    env::torch::TORCHELASTIC_RESTART_COUNT,
                    place.restart_count.to_string(),
                );
                if let Some(master) = &place.master {
                    set(env::torch::MASTER_ADDR, master.addr.clone());
                    set(env::torch::MASTER_PORT, master.port.to_string());
                }
            }
            Role::ParameterServer { shard, shards } => {
                set(env::ROLE, env::ROLE_PARAMETER_SERVER.to_owned());
                set(env::PS_SHARD, shard.to_string());
                set(env::PS_SHARDS, shards.to_string());
            }
        }
        if let Some(spec) = &place.spec_toml {
            set(env::JOB_SPEC, spec.clone());
        }
        if let Some(token) = &place.job_token {
            set(env::JOB_TOKEN, token.expose().to_owned());
        }
        set(env::RESTART_COUNT, place.restart_count.to_string());
        let node = &self.node;
        set(env::COORDINATOR_ADDR, node.coordinator.clone());
        set(env::RENDEZVOUS_ADDR, node.rendezvous.clone());
        set(env::NODE_ID, node.node_id.to_string());
        set(env::NODE_ADDR, node.node_address.clone());
        set(env::COHORT_BIN, node.cohort_bin.display().to_string());
        set(env::OUTPUT_DIR, node.output_dir.display().to_string());
        if let Some(ca) = &node.ca {
            set(env::CA, ca.display().to_string());
        }
        if let Some(tls) = &node.tls {
            set(env::TLS_CERT, tls.certificate.display().to_string());
            set(env::TLS_KEY, tls.key.display().to_string());
        }
        variables
    }

    /// The variables a process is started with, over the worker's own: the job's `job_env`
    /// first, then [`Launch::to_env`] over them, so the contract's values always win.
    pub fn environment(&self, job_env: &HashMap<String, String>) -> HashMap<String, String> {
        let mut environment = job_env.clone();
        environment.extend(self.to_env());
        environment
    }

    /// Reads the launch from this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::read(&|name| match std::env::var(name) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(raw)) => Err(LaunchError::malformed(
                name,
                &raw.to_string_lossy(),
                "unicode text",
            )),
        })
    }

    /// Reads the launch from `variables` (what [`Launch::to_env`] wrote, and whatever else).
    pub fn from_vars(variables: &BTreeMap<String, String>) -> Result<Self> {
        Self::read(&|name| Ok(variables.get(name).cloned()))
    }

    /// Reads the launch through `lookup`, which gives a variable's value if it is set.
    fn read(lookup: &Lookup<'_>) -> Result<Self> {
        let variables = Variables(lookup);
        let rank = variables.number(env::RANK)?;
        let world_size = variables.number(env::WORLD_SIZE)?;
        let role = match variables.optional(env::ROLE)?.as_deref() {
            None | Some(env::ROLE_RANK) => Role::Rank,
            Some(env::ROLE_PARAMETER_SERVER) => {
                let shard = variables.number(env::PS_SHARD)?;
                let shards = variables.number(env::PS_SHARDS)?;
                if shard >= shards {
                    return Err(LaunchError::malformed(
                        env::PS_SHARD,
                        &shard.to_string(),
                        format!("below {} = {shards}", env::PS_SHARDS),
                    ));
                }
                Role::ParameterServer { shard, shards }
            }
            Some(other) => {
                return Err(LaunchError::malformed(
                    env::ROLE,
                    other,
                    format!("{:?} or {:?}", env::ROLE_RANK, env::ROLE_PARAMETER_SERVER),
                ));
            }
        };
        let master = match role {
            Role::Rank => {
                if rank >= world_size {
                    return Err(LaunchError::malformed(
                        env::RANK,
                        &rank.to_string(),
                        format!("below {} = {world_size}", env::WORLD_SIZE),
                    ));
                }
                let addr = variables.required(env::torch::MASTER_ADDR)?;
                let port = variables.required(env::torch::MASTER_PORT)?;
                Some(master(
                    env::torch::MASTER_ADDR,
                    addr,
                    env::torch::MASTER_PORT,
                    &port,
                )?)
            }
            Role::ParameterServer { .. } => None,
        };
        let devices = variables.required(env::DEVICES)?;
        let devices = match parse_devices(&devices)? {
            (DeviceKind::Cpu, slots) => Devices::Cpu { slots },
            (DeviceKind::Gpu, gpus) => {
                let cuda_device = variables.required(env::CUDA_DEVICE)?;
                let cuda_device = cuda_device.trim().parse().map_err(|_| {
                    LaunchError::malformed(
                        env::CUDA_DEVICE,
                        &cuda_device,
                        "the index of this rank's gpu (a number)",
                    )
                })?;
                let interface = variables.optional(env::NCCL_SOCKET_IFNAME)?;
                Devices::Gpu {
                    gpus,
                    cuda_device,
                    nccl_on_loopback: interface.as_deref() == Some("lo"),
                }
            }
        };
        let place = RankPlace {
            job_id: variables.job_id()?,
            rank,
            world_size,
            local_rank: variables.number(env::LOCAL_RANK)?,
            local_world_size: variables.number(env::LOCAL_WORLD_SIZE)?,
            devices,
            role,
            master,
            // An empty spec is no spec, as in the start instruction.
            spec_toml: variables
                .optional(env::JOB_SPEC)?
                .filter(|spec| !spec.is_empty()),
            job_token: variables
                .optional(env::JOB_TOKEN)?
                .filter(|token| !token.is_empty())
                .map(Secret::new),
            // Absent from a launch of a Cohort without restarts: the first attempt.
            restart_count: match variables.optional(env::RESTART_COUNT)? {
                None => 0,
                Some(_) => variables.number(env::RESTART_COUNT)?,
            },
        };
        let node_id = variables.required(env::NODE_ID)?;
        let node = NodeFacts {
            coordinator: variables.required(env::COORDINATOR_ADDR)?,
            rendezvous: variables.required(env::RENDEZVOUS_ADDR)?,
            node_id: NodeId::new(node_id.as_str())
                .map_err(|_| LaunchError::malformed(env::NODE_ID, &node_id, ID_EXPECTATION))?,
            node_address: variables.required(env::NODE_ADDR)?,
            cohort_bin: variables.required(env::COHORT_BIN)?.into(),
            output_dir: variables.required(env::OUTPUT_DIR)?.into(),
            ca: variables.optional(env::CA)?.map(PathBuf::from),
            tls: match (
                variables.optional(env::TLS_CERT)?,
                variables.optional(env::TLS_KEY)?,
            ) {
                (Some(certificate), Some(key)) => Some(TlsFiles {
                    certificate: certificate.into(),
                    key: key.into(),
                }),
                (None, None) => None,
                (Some(_), None) => return Err(LaunchError::Missing { name: env::TLS_KEY }),
                (None, Some(_)) => {
                    return Err(LaunchError::Missing {
                        name: env::TLS_CERT,
                    });
                }
            },
        };
        Ok(Self { place, node })
    }
}

/// Gives a variable's value if it is set.
type Lookup<'a> = dyn Fn(&'static str) -> Result<Option<String>> + 'a;

/// Typed reads of the variables a [`Lookup`] gives.
struct Variables<'a>(&'a Lookup<'a>);

impl Variables<'_> {
    fn optional(&self, name: &'static str) -> Result<Option<String>> {
        (self.0)(name)
    }

    fn required(&self, name: &'static str) -> Result<String> {
        self.optional(name)?.ok_or(LaunchError::Missing { name })
    }

    fn number(&self, name: &'static str) -> Result<u32> {
        let text = self.required(name)?;
        text.parse()
            .map_err(|_| LaunchError::malformed(name, &text, "a number"))
    }

    fn job_id(&self) -> Result<JobId> {
        let text = self.required(env::JOB_ID)?;
        JobId::new(text.as_str())
            .map_err(|_| LaunchError::malformed(env::JOB_ID, &text, ID_EXPECTATION))
    }
}

/// The kinds of device a process may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceKind {
    Cpu,
    Gpu,
}

/// Parses `COHORT_DEVICES` (`cpu:0,cpu:1`): at least one device, all of one kind.
fn parse_devices(text: &str) -> Result<(DeviceKind, Vec<u32>)> {
    let expected = "devices of one kind as kind:index, comma-separated (cpu:0,cpu:1)";
    let malformed = || LaunchError::malformed(env::DEVICES, text, expected);
    let mut kind = None;
    let mut indices = Vec::new();
    for device in text.split(',') {
        let (name, index) = device.split_once(':').ok_or_else(malformed)?;
        let this = match name {
            "cpu" => DeviceKind::Cpu,
            "gpu" => DeviceKind::Gpu,
            _ => return Err(malformed()),
        };
        if *kind.get_or_insert(this) != this {
            return Err(malformed());
        }
        indices.push(index.parse().map_err(|_| malformed())?);
    }
    Ok((kind.ok_or_else(malformed)?, indices))
}

/// The master of a job from its address and port (`port_text`), named `addr_name` and
/// `port_name` in errors.
fn master(
    addr_name: &'static str,
    addr: String,
    port_name: &'static str,
    port_text: &str,
) -> Result<Master> {
    if addr.is_empty() {
        return Err(LaunchError::malformed(addr_name, &addr, "a host"));
    }
    let port = port_text
        .parse()
        .ok()
        .filter(|&port: &u16| port != 0)
        .ok_or_else(|| LaunchError::malformed(port_name, port_text, "a port, 1 to 65535"))?;
    Ok(Master { addr, port })
}

/// `items` separated by commas.
fn join(items: impl Iterator<Item = impl ToString>) -> String {
    items
        .map(|item| item.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl From<&RankPlace> for v1::StartRank {
    /// The launch fields of a start instruction. The rest (the process count `world_size`,
    /// the program, the job's variables, the working directory, the grace period) are the
    /// caller's.
    fn from(place: &RankPlace) -> Self {
        let kind = match place.devices {
            Devices::Cpu { .. } => v1::DeviceKind::Cpu,
            Devices::Gpu { .. } => v1::DeviceKind::Gpu,
        };
        let (master_addr, master_port) =
            place.master.as_ref().map_or((String::new(), 0), |master| {
                (master.addr.clone(), u32::from(master.port))
            });
        Self {
            job_id: place.job_id.to_string(),
            rank: place.rank,
            local_rank: place.local_rank,
            local_world_size: place.local_world_size,
            devices: place
                .devices
                .indices()
                .iter()
                .map(|&index| v1::DeviceRef {
                    kind: kind as i32,
                    index,
                })
                .collect(),
            ranks: place.world_size,
            master_addr,
            master_port,
            parameter_server_shards: match place.role {
                Role::Rank => 0,
                Role::ParameterServer { shards, .. } => shards,
            },
            nccl_on_loopback: matches!(
                place.devices,
                Devices::Gpu {
                    nccl_on_loopback: true,
                    ..
                }
            ),
            spec_toml: place.spec_toml.clone().unwrap_or_default(),
            job_token: place
                .job_token
                .as_ref()
                .map(|token| token.expose().to_owned())
                .unwrap_or_default(),
            attempt: place.restart_count,
            ..Self::default()
        }
    }
}

impl TryFrom<&v1::StartRank> for RankPlace {
    type Error = LaunchError;

    /// Reads a process's place from its start instruction, checking every field.
    fn try_from(start: &v1::StartRank) -> Result<Self> {
        let job_id = JobId::new(start.job_id.as_str()).map_err(|_| {
            LaunchError::malformed("start_rank.job_id", &start.job_id, ID_EXPECTATION)
        })?;
        let devices_expected = "at least one device, all cpu or all gpu";
        let kinds = start
            .devices
            .iter()
            .map(|device| v1::DeviceKind::try_from(device.kind).unwrap_or_default())
            .collect::<Vec<_>>();
        let indices: Vec<u32> = start.devices.iter().map(|device| device.index).collect();
        let devices = match kinds.first() {
            Some(&first) if kinds.iter().all(|&kind| kind == first) => match first {
                v1::DeviceKind::Cpu => Some(Devices::Cpu { slots: indices }),
                v1::DeviceKind::Gpu => Some(Devices::Gpu {
                    gpus: indices,
                    // The worker makes the process's GPUs alone visible, renumbered from 0.
                    cuda_device: 0,
                    nccl_on_loopback: start.nccl_on_loopback,
                }),
                v1::DeviceKind::Unspecified => None,
            },
            _ => None,
        }
        .ok_or_else(|| {
            LaunchError::malformed(
                "start_rank.devices",
                &format!("{:?}", start.devices),
                devices_expected,
            )
        })?;
        if start.ranks == 0 {
            return Err(LaunchError::malformed(
                "start_rank.ranks",
                "0",
                "at least 1",
            ));
        }
        let (role, master) = if start.rank < start.ranks {
            let port = start.master_port.to_string();
            let master = master(
                "start_rank.master_addr",
                start.master_addr.clone(),
                "start_rank.master_port",
                &port,
            )?;
            (Role::Rank, Some(master))
        } else {
            let shard = start.rank - start.ranks;
            let shards = start.parameter_server_shards;
            if shard >= shards {
                return Err(LaunchError::malformed(
                    "start_rank.parameter_server_shards",
                    &shards.to_string(),
                    format!(
                        "more than shard {shard} (rank {} of {} training ranks)",
                        start.rank, start.ranks
                    ),
                ));
            }
            (Role::ParameterServer { shard, shards }, None)
        };
        if start.job_token.len() > MAX_TOKEN_BYTES
            || !start.job_token.bytes().all(|byte| byte.is_ascii_graphic())
        {
            return Err(LaunchError::Malformed {
                name: "start_rank.job_token",
                found: format!("{} bytes", start.job_token.len()),
                expected: format!("at most {MAX_TOKEN_BYTES} printable ASCII characters"),
            });
        }
        if start.spec_toml.len() > MAX_SPEC_BYTES {
            return Err(LaunchError::Malformed {
                name: "start_rank.spec_toml",
                found: format!("{} bytes", start.spec_toml.len()),
                expected: format!("at most {MAX_SPEC_BYTES} bytes"),
            });
        }
        Ok(Self {
            job_id,
            rank: start.rank,
            world_size: start.ranks,
            local_rank: start.local_rank,
            local_world_size: start.local_world_size,
            devices,
            role,
            master,
            spec_toml: (!start.spec_toml.is_empty()).then(|| start.spec_toml.clone()),
            job_token: (!start.job_token.is_empty()).then(|| Secret::new(&start.job_token)),
            restart_count: start.attempt,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn node() -> NodeFacts {
        NodeFacts {
            coordinator: "127.0.0.1:7000".to_owned(),
            rendezvous: "127.0.0.1:7000".to_owned(),
            node_id: NodeId::new("node-a").unwrap(),
            node_address: "127.0.0.1".to_owned(),
            cohort_bin: PathBuf::from("/usr/bin/cohort"),
            output_dir: PathBuf::from("/var/cohort/outputs/train-3"),
            ca: None,
            tls: None,
        }
    }

    fn rank(devices: Devices) -> Launch {
        Launch {
            place: RankPlace {
                job_id: JobId::new("train-3").unwrap(),
                rank: 1,
                world_size: 4,
                local_rank: 1,
                local_world_size: 2,
                devices,
                role: Role::Rank,
                master: Some(Master {
                    addr: "127.0.0.1".to_owned(),
                    port: 27919,
                }),
                spec_toml: None,
                job_token: Some(Secret::new("cohort-job-0123456789abcdef")),
                restart_count: 0,
            },
            node: node(),
        }
    }

    fn gpus(gpus: Vec<u32>, nccl_on_loopback: bool) -> Devices {
        Devices::Gpu {
            gpus,
            cuda_device: 0,
            nccl_on_loopback,
        }
    }

    fn parameter_server() -> Launch {
        let mut launch = rank(Devices::Cpu { slots: vec![5] });
        launch.place.rank = 5;
        launch.place.role = Role::ParameterServer {
            shard: 1,
            shards: 2,
        };
        launch.place.master = None;
        launch.place.spec_toml = Some("version = 1\nkind = \"train\"\n".to_owned());
        launch
    }

    fn variables(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// The variables a command job's rank saw before the contract was one type (captured from
    /// a cluster run): the contract keeps them exactly.
    #[test]
    fn a_command_rank_sees_its_place_its_node_and_its_job_token() {
        let cpu = rank(Devices::Cpu { slots: vec![2, 3] });
        let expected = variables(&[
            ("COHORT_BIN", "/usr/bin/cohort"),
            ("COHORT_COORDINATOR_ADDR", "127.0.0.1:7000"),
            ("COHORT_DEVICES", "cpu:2,cpu:3"),
            ("COHORT_JOB_ID", "train-3"),
            ("COHORT_JOB_TOKEN", "cohort-job-0123456789abcdef"),
            ("COHORT_LOCAL_RANK", "1"),
            ("COHORT_LOCAL_WORLD_SIZE", "2"),
            ("COHORT_NODE_ADDR", "127.0.0.1"),
            ("COHORT_NODE_ID", "node-a"),
            ("COHORT_OUTPUT_DIR", "/var/cohort/outputs/train-3"),
            ("COHORT_RANK", "1"),
            ("COHORT_RENDEZVOUS_ADDR", "127.0.0.1:7000"),
            ("COHORT_RESTART_COUNT", "0"),
            ("COHORT_ROLE", "rank"),
            ("COHORT_WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "27919"),
            ("OMP_NUM_THREADS", "2"),
            ("RANK", "1"),
            ("RAYON_NUM_THREADS", "2"),
            ("TORCHELASTIC_RESTART_COUNT", "0"),
            ("WORLD_SIZE", "4"),
        ]);
        assert_eq!(cpu.to_env(), expected);

        let gpu = rank(gpus(vec![4, 6], true)).to_env();
        let mut gpu_expected = expected.clone();
        gpu_expected.remove("OMP_NUM_THREADS");
        gpu_expected.remove("RAYON_NUM_THREADS");
        gpu_expected.extend(variables(&[
            ("COHORT_DEVICES", "gpu:4,gpu:6"),
            ("CUDA_VISIBLE_DEVICES", "4,6"),
            ("COHORT_CUDA_DEVICE", "0"),
            ("NCCL_SOCKET_IFNAME", "lo"),
        ]));
        assert_eq!(gpu, gpu_expected);
        let off_loopback = rank(gpus(vec![4, 6], false)).to_env();
        gpu_expected.remove("NCCL_SOCKET_IFNAME");
        assert_eq!(off_loopback, gpu_expected);
    }

    #[test]
    fn a_parameter_server_gets_its_shard_and_no_torch_variables() {
        let server = parameter_server().to_env();
        for name in [
            env::torch::RANK,
            env::torch::WORLD_SIZE,
            env::torch::MASTER_ADDR,
            env::torch::MASTER_PORT,
        ] {
            assert!(!server.contains_key(name), "{name}");
        }
        assert_eq!(server[env::ROLE], "parameter-server");
        assert_eq!(server[env::PS_SHARD], "1");
        assert_eq!(server[env::PS_SHARDS], "2");
        assert_eq!(server[env::RANK], "5");
        assert_eq!(server[env::JOB_SPEC], "version = 1\nkind = \"train\"\n");
    }

    #[test]
    fn the_job_env_goes_first_and_the_contract_over_it() {
        let launch = rank(Devices::Cpu { slots: vec![0] });
        let job_env = HashMap::from([
            ("RANK".to_owned(), "7".to_owned()),
            ("COHORT_JOB_ID".to_owned(), "other".to_owned()),
            ("WANDB_PROJECT".to_owned(), "mnist".to_owned()),
        ]);
        let environment = launch.environment(&job_env);
        assert_eq!(environment["RANK"], "1");
        assert_eq!(environment["COHORT_JOB_ID"], "train-3");
        assert_eq!(environment["WANDB_PROJECT"], "mnist");
        assert_eq!(environment.len(), launch.to_env().len() + 1);
    }

    #[test]
    fn every_variable_the_contract_writes_is_managed_and_every_managed_name_is_written() {
        let launches = [
            rank(Devices::Cpu { slots: vec![0, 1] }),
            rank(gpus(vec![0], true)),
            parameter_server(),
        ];
        let mut written = std::collections::BTreeSet::new();
        for launch in &launches {
            for name in launch.to_env().into_keys() {
                assert!(env::is_managed(&name), "{name} is written but not managed");
                written.insert(name);
            }
        }
        for name in env::MANAGED_NAMES {
            assert!(
                written.contains(name),
                "{name} is managed but never written"
            );
        }
    }

    #[test]
    fn launches_round_trip_through_the_environment() {
        for launch in [
            rank(Devices::Cpu { slots: vec![0, 1] }),
            rank(gpus(vec![3], true)),
            rank(gpus(vec![1, 2], false)),
            parameter_server(),
        ] {
            assert_eq!(Launch::from_vars(&launch.to_env()).unwrap(), launch);
        }
    }

    #[test]
    fn places_round_trip_through_the_start_instruction() {
        for launch in [
            rank(Devices::Cpu { slots: vec![0, 1] }),
            rank(gpus(vec![3], true)),
            parameter_server(),
        ] {
            let start = v1::StartRank::from(&launch.place);
            assert_eq!(RankPlace::try_from(&start).unwrap(), launch.place);
        }
    }

    #[test]
    fn a_missing_variable_is_named() {
        let complete = rank(gpus(vec![0], false)).to_env();
        for name in [
            env::JOB_ID,
            env::RANK,
            env::WORLD_SIZE,
            env::LOCAL_RANK,
            env::LOCAL_WORLD_SIZE,
            env::DEVICES,
            env::CUDA_DEVICE,
            env::torch::MASTER_ADDR,
            env::torch::MASTER_PORT,
            env::COORDINATOR_ADDR,
            env::RENDEZVOUS_ADDR,
            env::NODE_ID,
            env::NODE_ADDR,
            env::COHORT_BIN,
            env::OUTPUT_DIR,
        ] {
            let mut partial = complete.clone();
            partial.remove(name);
            let error = Launch::from_vars(&partial).unwrap_err();
            assert_eq!(error, LaunchError::Missing { name }, "{name}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("{name} is not set: ")),
                "{error}"
            );
        }
        let mut server = parameter_server().to_env();
        server.remove(env::PS_SHARDS);
        assert_eq!(
            Launch::from_vars(&server).unwrap_err(),
            LaunchError::Missing {
                name: env::PS_SHARDS
            }
        );
    }

    #[test]
    fn a_malformed_variable_is_named_with_what_it_holds_and_what_was_expected() {
        let complete = rank(gpus(vec![0], false)).to_env();
        let cases: [(&str, &str, &str); 11] = [
            (env::RANK, "one", "COHORT_RANK = \"one\", expected a number"),
            (
                env::RANK,
                "4",
                "COHORT_RANK = \"4\", expected below COHORT_WORLD_SIZE = 4",
            ),
            (
                env::CUDA_DEVICE,
                "gpu0",
                "COHORT_CUDA_DEVICE = \"gpu0\", expected the index of this rank's gpu (a number)",
            ),
            (env::DEVICES, "", "COHORT_DEVICES = \"\", expected devices"),
            (
                env::DEVICES,
                "cpu:0,gpu:1",
                "COHORT_DEVICES = \"cpu:0,gpu:1\", expected",
            ),
            (
                env::DEVICES,
                "tpu:0",
                "COHORT_DEVICES = \"tpu:0\", expected",
            ),
            (
                env::DEVICES,
                "gpu:x",
                "COHORT_DEVICES = \"gpu:x\", expected",
            ),
            (
                env::torch::MASTER_PORT,
                "0",
                "MASTER_PORT = \"0\", expected a port",
            ),
            (
                env::torch::MASTER_PORT,
                "70000",
                "MASTER_PORT = \"70000\", expected a port",
            ),
            (
                env::ROLE,
                "chief",
                "COHORT_ROLE = \"chief\", expected \"rank\" or",
            ),
            (
                env::JOB_ID,
                "a b",
                "COHORT_JOB_ID = \"a b\", expected 1 to 128 characters",
            ),
        ];
        for (name, value, message) in cases {
            let mut broken = complete.clone();
            broken.insert(name.to_owned(), value.to_owned());
            let error = Launch::from_vars(&broken).unwrap_err().to_string();
            assert!(error.starts_with(message), "{name} = {value:?}: {error}");
        }
        let mut server = parameter_server().to_env();
        server.insert(env::PS_SHARD.to_owned(), "2".to_owned());
        assert_eq!(
            Launch::from_vars(&server).unwrap_err().to_string(),
            "COHORT_PS_SHARD = \"2\", expected below COHORT_PS_SHARDS = 2"
        );
        let mut unreachable = rank(Devices::Cpu { slots: vec![0] });
        assert_eq!(
            unreachable.node.node_ip().unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
        unreachable.node.node_address = "node-a.example".to_owned();
        assert_eq!(
            unreachable.node.node_ip().unwrap_err().to_string(),
            "COHORT_NODE_ADDR = \"node-a.example\", expected an IP address"
        );
    }

    #[test]
    fn a_bad_start_instruction_is_refused_naming_the_field() {
        let good = v1::StartRank::from(&rank(Devices::Cpu { slots: vec![0] }).place);
        let refused = |change: &dyn Fn(&mut v1::StartRank), field: &str| {
            let mut start = good.clone();
            change(&mut start);
            let error = RankPlace::try_from(&start).unwrap_err().to_string();
            assert!(error.starts_with(field), "{field}: {error}");
        };
        refused(
            &|start| start.job_id = "../x".to_owned(),
            "start_rank.job_id",
        );
        refused(&|start| start.devices.clear(), "start_rank.devices");
        refused(
            &|start| {
                start.devices.push(v1::DeviceRef {
                    kind: v1::DeviceKind::Gpu as i32,
                    index: 0,
                });
            },
            "start_rank.devices",
        );
        refused(&|start| start.devices[0].kind = 0, "start_rank.devices");
        refused(&|start| start.ranks = 0, "start_rank.ranks");
        refused(&|start| start.master_port = 0, "start_rank.master_port");
        refused(
            &|start| start.master_port = 65_536,
            "start_rank.master_port",
        );
        refused(&|start| start.master_addr.clear(), "start_rank.master_addr");
        refused(
            &|start| start.rank = 4,
            "start_rank.parameter_server_shards",
        );
        refused(
            &|start| start.spec_toml = "#".repeat(MAX_SPEC_BYTES + 1),
            "start_rank.spec_toml",
        );
        let mut largest = good.clone();
        largest.spec_toml = "#".repeat(MAX_SPEC_BYTES);
        assert!(RankPlace::try_from(&largest).is_ok());
    }

    fn any_launch() -> impl Strategy<Value = Launch> {
        let devices = prop_oneof![
            prop::collection::vec(0u32..4096, 1..8).prop_map(|slots| Devices::Cpu { slots }),
            (
                prop::collection::vec(0u32..64, 1..8),
                0u32..8,
                any::<bool>()
            )
                .prop_map(|(gpus, cuda_device, nccl_on_loopback)| Devices::Gpu {
                    gpus,
                    cuda_device,
                    nccl_on_loopback,
                }),
        ];
        let role = prop_oneof![
            Just(None),
            (0u32..4)
                .prop_flat_map(|shards| (0..shards + 1, Just(shards + 1)))
                .prop_map(Some),
        ];
        (
            ("[a-z][a-z0-9.-]{0,20}", "[a-z][a-z0-9_-]{0,20}"),
            (1u32..4096, 0u32..4096, 1u32..64, 0u32..64),
            devices,
            role,
            ("[a-z0-9.:\\[\\]]{1,30}", 1u16..=u16::MAX),
            (prop::option::of(".{1,200}"), any::<bool>()),
            (
                "[ -~]{1,40}",
                "[ -~]{1,40}",
                "[ -~]{0,40}",
                "/[ -~]{0,40}",
                "/[ -~]{0,40}",
            ),
        )
            .prop_map(
                |(
                    (job_id, node_id),
                    (world_size, rank_seed, local_world_size, local_seed),
                    devices,
                    server,
                    (addr, port),
                    (spec_toml, tls),
                    (coordinator, rendezvous, node_address, cohort_bin, output_dir),
                )| {
                    let (rank, role, master) = match server {
                        None => (
                            rank_seed % world_size,
                            Role::Rank,
                            Some(Master { addr, port }),
                        ),
                        Some((shard, shards)) => (
                            world_size + shard,
                            Role::ParameterServer { shard, shards },
                            None,
                        ),
                    };
                    Launch {
                        place: RankPlace {
                            job_id: JobId::new(job_id).unwrap(),
                            rank,
                            world_size,
                            local_rank: local_seed % local_world_size,
                            local_world_size,
                            devices,
                            role,
                            master,
                            spec_toml,
                            job_token: Some(Secret::new("cohort-job-00ff")),
                            restart_count: 2,
                        },
                        node: NodeFacts {
                            coordinator,
                            rendezvous,
                            node_id: NodeId::new(node_id).unwrap(),
                            node_address,
                            cohort_bin: cohort_bin.into(),
                            output_dir: output_dir.into(),
                            ca: tls.then(|| PathBuf::from("/etc/cohort/ca.pem")),
                            tls: tls.then(|| TlsFiles {
                                certificate: "/etc/cohort/node.pem".into(),
                                key: "/etc/cohort/node-key.pem".into(),
                            }),
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn every_launch_round_trips(launch in any_launch()) {
            prop_assert_eq!(Launch::from_vars(&launch.to_env()).unwrap(), launch.clone());
            let start = v1::StartRank::from(&launch.place);
            let mut place = RankPlace::try_from(&start).unwrap();
            // The start instruction does not carry the first visible GPU: it is always 0.
            if let (Devices::Gpu { cuda_device, .. }, Devices::Gpu { cuda_device: sent, .. }) =
                (&mut place.devices, &launch.place.devices)
            {
                prop_assert_eq!(*cuda_device, 0);
                *cuda_device = *sent;
            }
            prop_assert_eq!(place, launch.place);
        }
    }
}
