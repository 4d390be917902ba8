//! Command-line arguments of `cohort`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default coordinator address, for the CLI and the daemons alike.
pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:7077";

/// Cohort: run distributed training jobs on a cluster of worker nodes.
#[derive(Debug, Parser)]
#[command(name = "cohort", version, about, propagate_version = true)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// How the CLI reaches the coordinator, and as whom.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// Coordinator address (host:port) [default: the credentials file's, else
    /// 127.0.0.1:7077].
    #[arg(long, env = "COHORT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Your token (`cohort users add` prints one) [default: the credentials file's:
    /// $COHORT_CREDENTIALS, else ~/.config/cohort/credentials.toml, which `cohort up` writes].
    #[arg(long, env = "COHORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Whom to trust.
    #[command(flatten)]
    pub trust: TrustArgs,
}

impl CoordinatorArgs {
    /// The coordinator and token: flags and environment first, then the credentials file.
    pub fn target(&self) -> anyhow::Result<crate::client::Target> {
        let file = match (&self.coordinator, &self.token) {
            (Some(_), Some(_)) => None,
            _ => match crate::credentials::default_path() {
                Some(path) => crate::credentials::read(&path)?,
                None => None,
            },
        }
        .unwrap_or_default();
        Ok(crate::client::Target {
            address: self
                .coordinator
                .clone()
                .or(file.coordinator.clone())
                .unwrap_or_else(|| DEFAULT_COORDINATOR.to_owned()),
            token: self
                .token
                .as_deref()
                .map(cohort_proto::Secret::new)
                .or_else(|| crate::credentials::token_in(&file)),
            ca: self
                .trust
                .ca
                .clone()
                .or(file.ca.clone())
                .map(|path| cohort_proto::transport::CaCertificate::read(&path))
                .transpose()?,
        })
    }
}

/// `cohort bench train --telemetry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTelemetry {
    /// Metrics reported and collectives recorded, as in every job.
    On,
    /// Neither.
    Off,
    /// Each world size both ways, in the same run.
    Both,
}

/// Output format of inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable tables.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job file (validated locally first).
    Submit(SubmitArgs),
    /// Show all jobs, or one job in detail.
    Status(StatusArgs),
    /// Print a job's captured output, lines prefixed by rank.
    Logs(LogsArgs),
    /// Print a job's metric curves: every rank's reported steps (loss, throughput,
    /// evaluations), kept across coordinator restarts.
    Metrics(MetricsArgs),
    /// Print a one-time link that logs a browser into the web dashboard (the coordinator's
    /// `--http`) as you; it works once, within two minutes.
    Dashboard(DashboardArgs),
    /// Cancel a job: stop every rank (SIGTERM, then SIGKILL after the job's grace period).
    Cancel(CancelArgs),
    /// List worker nodes and their devices.
    Nodes(NodesArgs),
    /// List the scheduler's queues: weights, quotas, the devices each queue and user holds,
    /// fair shares, running and waiting jobs.
    Queues(NodesArgs),
    /// Drain a node (admins): nothing new is placed on it, and the jobs on it that may restart
    /// move off it through a checkpoint and a restart that uses up no restart.
    Drain(DrainArgs),
    /// List the checkpoints a job wrote: step, epoch, the evaluation at that step, size, path,
    /// and whether retention deleted it; the best by the job's metric is marked.
    Checkpoints(CheckpointsArgs),
    /// Hyper-parameter sweeps: `cohort sweep FILE` submits one; `status`, `list`, `cancel`.
    Sweep(SweepArgs),
    /// Run the coordinator.
    Coordinator(CoordinatorDaemonArgs),
    /// Run a worker daemon on this node.
    Worker(WorkerDaemonArgs),
    /// Start a local cluster (coordinator and N workers) in the foreground.
    Up(UpArgs),
    /// Manage the cluster's users (admins only): add prints the new user's token once.
    Users(UsersArgs),
    /// Show the audit log of mutating calls: submissions, cancellations, user and node changes
    /// (admins only).
    Audit(AuditArgs),
    /// Make TLS certificates: a cluster CA and certificates it signs, for the coordinator and
    /// for nodes.
    Certs(CertsArgs),
    /// Use the rendezvous store of the running job (from inside a rank).
    Kv(KvArgs),
    /// Benchmarks: print a table and, as the last line, one JSON object.
    Bench(BenchArgs),
    /// Generate text from a transformer checkpoint (any mesh may have written it).
    Sample(SampleArgs),
    /// Run as a rank of a `kind = "train"` job (started by workers, not by hand).
    #[command(hide = true)]
    Rank,
}

/// `cohort bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The benchmark.
    #[command(subcommand)]
    pub benchmark: Benchmark,
}

/// Element type of a collective benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// Device a training benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    /// The CPU.
    Cpu,
    /// One CUDA device.
    Gpu,
}

/// Transport of the all-reduce benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllreduceBackend {
    /// The TCP ring, across local rank processes.
    Tcp,
    /// NCCL on device buffers, one thread per local GPU (needs a `--features cuda` build).
    Nccl,
}

/// Ring links of the all-reduce benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchLinks {
    /// Links that prove the job's secret at setup (what Cohort's ranks use).
    Authenticated,
    /// Links that prove nothing.
    Plain,
    /// Both, alternating size by size.
    Both,
}

/// Host transports the all-reduce benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTransport {
    /// The TCP ring (with the links `--links` names).
    Tcp,
    /// Shared memory between the ranks (all on one node).
    Shm,
    /// What a job's ranks use where they are: shared memory on one node, hierarchical (shared
    /// memory within nodes, TCP across) for ranks spread evenly over several, TCP otherwise.
    Auto,
}

/// `cohort bench allreduce --mpi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MpiReference {
    /// Open MPI's `MPI_Allreduce` in the same run when `mpirun` and mpi4py are installed;
    /// otherwise a printed line says why not.
    Auto,
    /// No Open MPI run.
    Off,
}

/// `cohort bench train --reference`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainReference {
    /// PyTorch DDP on the same MLP after each world size, when torch is importable; otherwise
    /// a printed line says why not.
    Pytorch,
    /// No reference run.
    Off,
}

/// Every benchmark.
#[derive(Debug, Subcommand)]
pub enum Benchmark {
    /// All-reduce time, algbw and busbw per size: the TCP ring and shared memory across local
    /// rank processes, against raw single-stream loopback TCP and Open MPI measured in the same
    /// run, or NCCL across the local GPUs.
    Allreduce {
        /// Number of ranks: rank processes for `tcp` (default 2); GPUs for `nccl` (default
        /// every local GPU, and never more).
        #[arg(long)]
        ranks: Option<u32>,
        /// Transport: `tcp` (the ring) or `nccl` (device buffers, no host copies).
        #[arg(long, value_enum, default_value_t = AllreduceBackend::Tcp)]
        backend: AllreduceBackend,
        /// Payload sizes as fp32-equivalent bytes (element count x 4), with K, M or G suffixes.
        #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M,16M,64M,256M")]
        sizes: Vec<String>,
        /// Element type moved.
        #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
        dtype: BenchDtype,
        /// Ring links (`tcp`): proving the job's secret at setup as Cohort's ranks do
        /// (`authenticated`), proving nothing (`plain`), or both in the same run, size by
        /// size, with their ratio.
        #[arg(long, value_enum, default_value_t = BenchLinks::Authenticated)]
        links: BenchLinks,
        /// Host transports to time (`--backend tcp`), taking turns size by size: the TCP ring
        /// (`tcp`), shared memory (`shm`, what ranks on one node use by default) and `auto`
        /// (what a job's ranks use where they are; on this one-node cluster, shared memory).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "tcp,shm")]
        transport: Vec<BenchTransport>,
        /// `tcp`, `f32`: also time Open MPI's `MPI_Allreduce` (mpirun, same ranks, sizes and
        /// call counts) over shared memory and over TCP, with Cohort's busbw against each
        /// (`auto`: when mpirun and mpi4py are installed; `bash scripts/setup-references.sh`
        /// installs them).
        #[arg(long, value_enum, default_value_t = MpiReference::Auto)]
        mpi: MpiReference,
        /// The Python that runs the reference script [default: the first of `python3` on
        /// PATH and /usr/bin/python3 that imports mpi4py].
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Data-parallel training throughput of the benchmark MLP (784-1024-1024-10, global batch
    /// 256, fp32, SGD) per world size, scaling efficiency, and where a step's time goes; with
    /// `--device gpu`, samples/s of that MLP and tokens/s of a transformer on one GPU, in fp32
    /// and bf16.
    Train {
        /// World sizes to run on the CPU (default 1,2,4); a GPU run is one rank.
        #[arg(long, value_delimiter = ',')]
        ranks: Option<Vec<u32>>,
        /// Optimizer steps timed per run (after warm-up).
        #[arg(long, default_value_t = 30)]
        steps: u64,
        /// Device the ranks train on: cpu (rank processes on a local cluster) or gpu (one rank
        /// in this process; needs a build with `--features candle-cuda`).
        #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
        device: BenchDevice,
        /// Index of the CUDA device `--device gpu` trains on.
        #[arg(long, default_value_t = 0)]
        gpu: usize,
        /// CPU runs: whether the ranks report metrics and record their collectives for hang
        /// diagnosis (`on`, as every job does), or not (`off`), or each world size both ways
        /// with the ratio (`both`).
        #[arg(long, value_enum, default_value_t = BenchTelemetry::On)]
        telemetry: BenchTelemetry,
        /// CPU runs: after each world size, train the same MLP with PyTorch DDP (gloo, one
        /// thread per rank process) on the same data, with Cohort's samples/s against it
        /// (`pytorch`: when torch is importable; `bash scripts/setup-references.sh` installs
        /// it).
        #[arg(long, value_enum, default_value_t = TrainReference::Pytorch)]
        reference: TrainReference,
        /// The Python that runs the reference script [default: the first of `python3` on
        /// PATH and /usr/bin/python3 that imports torch].
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Parameter-server push+pull throughput per rank and aggregate, against single-stream
    /// loopback TCP measured in the same run.
    Ps {
        /// Parameter shards (one server each).
        #[arg(long, default_value_t = 2)]
        shards: u32,
        /// Ranks pushing and pulling concurrently.
        #[arg(long, default_value_t = 2)]
        ranks: u32,
        /// Parameter sizes in bytes (K, M, G suffixes).
        #[arg(long, value_delimiter = ',', default_value = "64M")]
        size: Vec<String>,
        /// Element type of the pushed gradients.
        #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
        dtype: BenchDtype,
        /// Timed push+pull rounds per size (after one warm-up round).
        #[arg(long, default_value_t = 5)]
        iterations: u32,
        /// Largest chunk a push or pull is cut into (K, M suffixes) [default: the servers'
        /// limit, 4M].
        #[arg(long)]
        chunk_bytes: Option<String>,
    },
    /// Transformer tokens/s under meshes of 4 ranks (4x1x1, 1x4x1 gpipe and 1f1b, 1x1x4,
    /// 2x2x1) and each pipeline's measured bubble against the ideal (P-1)/(M+P-1).
    Mesh {
        /// Ranks of every mesh (4).
        #[arg(long, default_value_t = 4)]
        ranks: u32,
        /// Optimizer steps timed per mesh (after 2 warm-up steps).
        #[arg(long, default_value_t = 6)]
        steps: u64,
    },
    /// The time of one scheduler placement pass over a simulated cluster and a queue of gang
    /// jobs of 1 to 512 GPUs and mixed priorities: from an empty cluster, and from a full one
    /// with and without preemption; and the memory it takes.
    Scheduler {
        /// Simulated nodes.
        #[arg(long, default_value_t = 10_000)]
        nodes: u32,
        /// GPUs per node.
        #[arg(long, default_value_t = 8)]
        gpus_per_node: u32,
        /// Queued jobs per pass.
        #[arg(long, default_value_t = 10_000)]
        jobs: u32,
        /// Runs of each pass (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Seed of the job mix.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Submission throughput and latency of a real coordinator process with simulated workers
    /// (gRPC clients in this process that register, heartbeat every second and finish what
    /// they are told to start), its CPU time per heartbeat, how long jobs wait to be placed,
    /// and whether any acknowledged job is lost when it is killed during submissions.
    Submit {
        /// Jobs submitted.
        #[arg(long, default_value_t = 20_000)]
        jobs: u32,
        /// Simulated workers (one CPU slot each).
        #[arg(long, default_value_t = 1_000)]
        workers: u32,
        /// Concurrent submitting clients.
        #[arg(long, default_value_t = 64)]
        submitters: u32,
        /// The coordinator's store: `embedded` or `etcd://host:port`.
        #[arg(long, default_value = "embedded")]
        store: String,
    },
    /// One rank of the training benchmark (run as a job by `train`).
    #[command(hide = true)]
    TrainRank {
        /// Timed steps.
        #[arg(long)]
        steps: u64,
        /// Neither report metrics nor record collectives.
        #[arg(long)]
        no_telemetry: bool,
    },
    /// One side of the loopback TCP measurement (run by `allreduce`).
    #[command(hide = true)]
    StreamReceive {
        /// Bytes to receive.
        #[arg(long)]
        bytes: u64,
    },
    /// One rank of the all-reduce benchmark (run as a job by `allreduce`).
    #[command(hide = true)]
    AllreduceRank {
        /// Element counts to time.
        #[arg(long, value_delimiter = ',')]
        elements: Vec<usize>,
        /// Element type.
        #[arg(long, value_enum)]
        dtype: BenchDtype,
        /// Which ring links to time.
        #[arg(long, value_enum)]
        links: BenchLinks,
        /// Which transports to time.
        #[arg(long, value_enum, value_delimiter = ',')]
        transport: Vec<BenchTransport>,
    },
}

/// `cohort submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (TOML).
    pub file: PathBuf,
    /// Follow the job until it ends, showing progress; exit non-zero unless it succeeds.
    #[arg(long)]
    pub watch: bool,
    /// Queue the job even if the cluster is too small for it today.
    #[arg(long)]
    pub wait_for_resources: bool,
    /// Start a `kind = "train"` job from a checkpoint (sets `checkpoint.resume_from`): weights,
    /// optimizer state and step are restored. Either one another job recorded, `JOB@best` (by
    /// that job's metric), `JOB@latest` or `JOB@step-N` (see `cohort checkpoints JOB`), or a
    /// checkpoint directory.
    #[arg(long, value_name = "JOB@WHICH|DIR")]
    pub resume_from: Option<String>,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// The checkpoint directory (`.../checkpoints/step-NNNNNNNN`) of a transformer job.
    pub checkpoint: PathBuf,
    /// Text the generation continues.
    #[arg(long, default_value = "ROMEO:\n")]
    pub prompt: String,
    /// Characters to generate (at most 100,000).
    #[arg(long, default_value_t = 400)]
    pub tokens: usize,
    /// Sampling temperature: 1 samples the model's distribution, lower is more conservative,
    /// 0 always takes the most likely character.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `cohort status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A job id; all jobs when omitted.
    pub job: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The job id.
    pub job: String,
    /// Keep printing new lines until the job ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this rank's lines.
    #[arg(long)]
    pub rank: Option<u32>,
    /// Fold lines that the ranks print alike (numbers may differ) into one line prefixed by the
    /// rank set (`[ranks 0-3]`), the differing numbers listed per rank (`{0.41|0.42}`); every
    /// rank's lines stay in order and nothing is lost.
    #[arg(long, conflicts_with = "follow")]
    pub collapse: bool,
    /// First show the last lines of standard error of the rank that failed first (of the
    /// current or last attempt), then the log.
    #[arg(long, conflicts_with = "follow")]
    pub errors_first: bool,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// How `cohort metrics` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum MetricsFormat {
    /// A table, one row per point.
    #[default]
    Table,
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON document.
    Json,
}

/// `cohort metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The job id.
    pub job: String,
    /// Only this rank's curve.
    #[arg(long)]
    pub rank: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: MetricsFormat,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Open this job's page instead of the jobs page.
    #[arg(long)]
    pub job: Option<String>,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    pub job: String,
    /// Require a checkpoint: a data-parallel training job's ranks stop after the next step they
    /// agree on and rank 0 writes a checkpoint (they do on any cancel, within the job's grace
    /// period); with this flag the command waits for it, prints where it is, and fails if none
    /// was written.
    #[arg(long)]
    pub checkpoint: bool,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort nodes` and `cohort queues`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort checkpoints`.
#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    /// The job id.
    pub job_id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort sweep`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SweepArgs {
    /// What to do; without one, submits FILE.
    #[command(subcommand)]
    pub command: Option<SweepCommand>,
    /// The sweep file (TOML) to submit: a `[sweep]` section and the base `[job]`.
    #[arg(required = true)]
    pub file: Option<PathBuf>,
    /// Follow the sweep until it ends, showing its leaderboard; exit non-zero unless it
    /// succeeds.
    #[arg(long)]
    pub watch: bool,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort sweep` subcommands.
#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Show a sweep and its leaderboard: every trial's parameters, metric, steps and state,
    /// best first.
    Status(SweepIdArgs),
    /// List sweeps.
    List(NodesArgs),
    /// Cancel a sweep: no trial starts or resumes any more, and its running trials are
    /// cancelled.
    Cancel(SweepIdArgs),
}

/// A sweep to show or cancel.
#[derive(Debug, Args)]
pub struct SweepIdArgs {
    /// The sweep id (printed by `cohort sweep FILE`).
    pub sweep_id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The node id.
    pub node: String,
    /// Take the drain back: the node takes work again.
    #[arg(long)]
    pub undo: bool,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `cohort users`.
#[derive(Debug, Args)]
pub struct UsersArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: UsersAction,
}

/// `cohort users` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Add a user and print their token (shown this once; only its hash is kept).
    Add {
        /// The user's name: 1 to 64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit.
        name: String,
        /// Make the user an admin: sees and cancels every job, manages users, reads the audit
        /// log.
        #[arg(long)]
        admin: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// List the users.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        /// Where the coordinator is.
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Remove a user: their token stops working at once.
    Remove {
        /// The user's name.
        name: String,
        /// Where the coordinator is.
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
}

/// `cohort audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Show entries after this sequence number only.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Where the coordinator is.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Settings shared by `cohort coordinator` and `cohort up`.
#[derive(Debug, Clone, Args)]
pub struct ClusterSettings {
    /// Directory for the embedded store and job logs [default: ~/.local/share/cohort].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where cluster state is kept: `embedded` (under --data-dir) or `etcd://host:port`.
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// Seconds of silence after which a worker is marked lost.
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_deadline_s: f64,
    /// Seconds between worker heartbeats.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat_interval_s: f64,
    /// Seconds a restarted job keeps off the node its failed attempt is blamed on (doubled for
    /// each further failure there, at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub restart_backoff_s: f64,
    /// A scheduler queue, `NAME=WEIGHT` or `NAME=WEIGHT:QUOTA` (e.g. `research=2:16`: twice the
    /// share of a weight-1 queue, its jobs holding at most 16 devices); repeat for more.
    /// `default` (weight 1, no quota) always exists and may be given here too.
    #[arg(long = "queue", value_name = "NAME=WEIGHT[:QUOTA]")]
    pub queues: Vec<String>,
    /// The most devices one user's jobs may hold at once [default: no limit].
    #[arg(long)]
    pub user_quota: Option<u64>,
    /// Never preempt: a queued job waits for free devices even when running jobs of lower
    /// priority hold them.
    #[arg(long)]
    pub no_preemption: bool,
    /// Seconds an attempt that follows a preemption runs before it may be preempted again (0
    /// to 86400).
    #[arg(long, default_value_t = cohort_coordinator::config::DEFAULT_PREEMPTION_MIN_RUNTIME.as_secs_f64())]
    pub preemption_min_runtime_s: f64,
    /// Most jobs queued at once; later submissions are refused until some start.
    #[arg(long, default_value_t = cohort_coordinator::limits::DEFAULT_MAX_QUEUED_JOBS)]
    pub max_queued_jobs: usize,
    /// Most jobs one submitter (a user) may have queued at once.
    #[arg(long, default_value_t = cohort_coordinator::limits::DEFAULT_MAX_QUEUED_JOBS_PER_SUBMITTER)]
    pub max_queued_jobs_per_submitter: usize,
    /// The file holding the token workers must show (readable by its owner alone)
    /// [default: <data-dir>/join-token, drawn on first start].
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
}

/// `cohort coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorDaemonArgs {
    /// Address to listen on. Loopback by default: listen on a public address only on purpose.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    pub listen: String,
    /// Cluster settings.
    #[command(flatten)]
    pub settings: ClusterSettings,
    /// Write the bound address to this file as soon as it listens (useful with port 0); with
    /// etcd, that is before it leads, while it answers as a standby.
    #[arg(long)]
    pub address_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM; `cohort certs create` makes one). Needs
    /// --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Listen off loopback without TLS although calls (tokens, job specs, logs) then cross the
    /// network unencrypted. Logged as a warning on every start.
    #[arg(long)]
    pub insecure: bool,
    /// With an etcd store: seconds the leader's lease lasts unrenewed, so how soon a standby
    /// coordinator takes over from a leader that died (whole seconds, 2 to 60).
    #[arg(long, default_value_t = 3.0)]
    pub leader_lease_s: f64,
    /// With an etcd store: the address standbys name to clients while this coordinator leads
    /// [default: the address it listens on].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_address: Option<String>,
    /// Also serve HTTP here: `/metrics` for Prometheus (a user's token as bearer token; TLS
    /// as the gRPC API). Off loopback only with TLS or --insecure, as --listen.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<String>,
}

/// TLS settings of a client of the cluster: whom to trust.
#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// The cluster's CA certificate (PEM): the coordinator and parameter servers are trusted
    /// only with a certificate it signed, and every call uses TLS [default: the credentials
    /// file's; none: plaintext, unless the address starts with https://, which trusts the
    /// Mozilla roots].
    #[arg(long, env = "COHORT_CA")]
    pub ca: Option<PathBuf>,
}

/// `cohort worker`.
#[derive(Debug, Args)]
pub struct WorkerDaemonArgs {
    /// Coordinator address (host:port).
    #[arg(long, env = "COHORT_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// CPU slots to offer [default: the number of logical CPUs].
    #[arg(long)]
    pub cpu_slots: Option<u32>,
    /// Node id [default: the host name].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Address other nodes reach this node's ranks at.
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_address: String,
    /// Directory for job outputs: each job's ranks get `<dir>/<job id>` as `COHORT_OUTPUT_DIR`.
    #[arg(long, default_value = "cohort-output")]
    pub output_dir: PathBuf,
    /// GPUs to offer: a comma-separated list of indices, or `none` [default: every GPU the CUDA
    /// driver reports, when built with `--features cuda`].
    #[arg(long)]
    pub gpus: Option<String>,
    /// Directory where the worker records its ranks until they are gone, so that after a crash
    /// the restarted worker kills what is left of them before offering devices; one per worker
    /// [default: $XDG_STATE_HOME/cohort/worker-<node id>, else
    /// ~/.local/state/cohort/worker-<node id>].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The file holding the cluster's join token (the coordinator's `<data-dir>/join-token`
    /// unless it was given one), readable by its owner alone.
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
    /// The join token itself, from the environment (never give it on a command line, where
    /// every user of the machine can read it).
    #[arg(long, env = "COHORT_JOIN_TOKEN", hide = true, hide_env_values = true)]
    pub join_token: Option<String>,
    /// Whom to trust: with a CA, the worker and its ranks reach the coordinator over TLS.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// This node's TLS certificate (PEM, for the advertised address), which the parameter
    /// servers it runs serve. Needed on a TLS cluster unless the node advertises a loopback
    /// address. Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// `cohort certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// What to make.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// Every `cohort certs` subcommand.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a certificate for the given hosts, signed by the CA in --out (made there first,
    /// as ca.pem and ca-key.pem, when there is none). Writes NAME.pem and NAME-key.pem.
    Create(CertsCreateArgs),
}

/// `cohort certs create`.
#[derive(Debug, Args)]
pub struct CertsCreateArgs {
    /// Directory of the CA and the certificates (created, mode 0700, if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// A host name or IP address clients use to reach the server; repeat for several.
    #[arg(long = "host", required = true, value_name = "NAME_OR_IP")]
    pub hosts: Vec<String>,
    /// The certificate's name: its files are NAME.pem and NAME-key.pem.
    #[arg(long, default_value = "coordinator")]
    pub name: String,
    /// Days the certificate is valid (the CA, made once, is valid for ten years).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// `cohort up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// CPU slots per worker.
    #[arg(long, default_value_t = 1)]
    pub cpu_slots: u32,
    /// Coordinator address to listen on.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    pub listen: String,
    /// Cluster settings.
    #[command(flatten)]
    pub settings: ClusterSettings,
    /// Submit this job file once the cluster is up, follow it, and exit when it ends.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Directory for job outputs (checkpoints): `<dir>/<job id>`.
    #[arg(long, default_value = "cohort-output")]
    pub output_dir: PathBuf,
    /// Also serve HTTP on this loopback address: `/metrics` for Prometheus.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<String>,
}

/// `cohort kv`: the rendezvous store, for rank scripts. Job, rank and address come from the
/// environment the worker gives every rank.
#[derive(Debug, Args)]
pub struct KvArgs {
    /// The operation.
    #[command(subcommand)]
    pub operation: KvOperation,
    /// Seconds a wait or barrier may take.
    #[arg(long, global = true, default_value_t = 300.0)]
    pub timeout_s: f64,
}

/// Rendezvous operations.
#[derive(Debug, Subcommand)]
pub enum KvOperation {
    /// Store VALUE under KEY.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Print the value under KEY (exit 1 if missing).
    Get {
        /// The key.
        key: String,
    },
    /// Wait until KEY exists and print its value.
    Wait {
        /// The key.
        key: String,
    },
    /// Add DELTA to the counter KEY and print the new value.
    Add {
        /// The key.
        key: String,
        /// The amount.
        #[arg(allow_hyphen_values = true)]
        delta: i64,
    },
    /// Wait until every rank of the job has entered barrier NAME.
    Barrier {
        /// The barrier's name.
        name: String,
    },
}
