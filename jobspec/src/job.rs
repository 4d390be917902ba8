//! The top-level job spec, its `[resources]` and `[command]` sections and their rules (parsing
//! is in [`mod@crate::parse`]).
//!
//! ```toml
//! version = 1
//! name = "hello"
//! kind = "command"
//!
//! [resources]
//! ranks = 3
//!
//! [command]
//! program = "python3"
//! args = ["train.py"]
//! ```

use std::collections::BTreeMap;

use cohort_proto::env::{self as rank_env, torch};
use cohort_proto::text::excerpt;
use serde::{Deserialize, Serialize};

use crate::objective::Objective;
use crate::problems::{Problems, SpecError, field_key};
use crate::train::{
    CheckpointSpec, DataSpec, ModelSpec, OptimizerSpec, ParallelSpec, ScheduleSpec,
};

/// Largest job file accepted, in bytes.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Most ranks one job may ask for.
pub const MAX_RANKS: u32 = 4096;
/// Most devices one rank may ask for.
pub const MAX_DEVICES_PER_RANK: u32 = 64;
/// Priorities lie in `-MAX_PRIORITY..=MAX_PRIORITY`.
pub const MAX_PRIORITY: i32 = 1000;
/// Longest job name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most command-line arguments of a command job.
pub const MAX_ARGS: usize = 1024;
/// Longest single argument, environment value or path, in bytes.
pub const MAX_STRING_LEN: usize = 4096;
/// Most environment variables a job may add.
pub const MAX_ENV_VARS: usize = 256;
/// The queue of a job whose spec names none.
pub const DEFAULT_QUEUE: &str = "default";
/// Longest grace period between SIGTERM and SIGKILL, in seconds.
pub const MAX_STOP_GRACE_S: f64 = 600.0;

/// What a rank runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// An arbitrary program, once per rank (`[command]`).
    Command,
    /// Cohort's own training runtime (`[model]`, `[data]`, `[optimizer]`, `[parallel]`...).
    Train,
}

/// Kind of device a rank asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A CPU slot of a worker (`cohort worker --cpu-slots N`).
    #[default]
    Cpu,
    /// A GPU of a worker.
    Gpu,
}

/// A whole job file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Format version of the file; must be 1. Required.
    pub version: u32,
    /// Human-readable name; the job id is derived from it. Default `"job"`.
    #[serde(default = "default_name")]
    pub name: String,
    /// What each rank runs. Required.
    pub kind: JobKind,
    /// Scheduling priority, -1000 to 1000: higher runs first, FIFO among equals. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Whether a queued job of higher priority may stop this one to take its devices (it is
    /// requeued and resumes from a checkpoint). Default: true for `kind = "train"`, false for
    /// `kind = "command"`.
    pub preemptible: Option<bool>,
    /// The scheduler queue the job waits in (configured on the coordinator with a weight and
    /// an optional device quota). Default `"default"`.
    pub queue: Option<String>,
    /// Devices the job needs. Default: 1 rank of 1 CPU slot.
    #[serde(default)]
    pub resources: Resources,
    /// The program a `kind = "command"` job runs. Required for that kind.
    pub command: Option<CommandSpec>,
    /// How a `kind = "train"` job divides its ranks. Default: data = 1.
    pub parallel: Option<ParallelSpec>,
    /// The model a `kind = "train"` job trains.
    pub model: Option<ModelSpec>,
    /// The data set a `kind = "train"` job reads.
    pub data: Option<DataSpec>,
    /// The optimizer of a `kind = "train"` job.
    pub optimizer: Option<OptimizerSpec>,
    /// Epochs, batch size and learning-rate schedule of a `kind = "train"` job.
    pub schedule: Option<ScheduleSpec>,
    /// Where and how often a `kind = "train"` job saves checkpoints.
    pub checkpoint: Option<CheckpointSpec>,
    /// Precision and loss scaling of a `kind = "train"` job.
    pub train: Option<crate::precision::TrainSpec>,
    /// Restarts after a failure. Default: 3 for `kind = "train"`, none for `kind = "command"`.
    pub fault_tolerance: Option<crate::fault_tolerance::FaultToleranceSpec>,
    /// When a `kind = "train"` job ends because its evaluations stopped improving. Default:
    /// absent, it runs its whole schedule.
    pub early_stopping: Option<crate::early_stopping::EarlyStoppingSpec>,
}

fn default_name() -> String {
    "job".to_owned()
}

/// `[resources]`: what the job asks the scheduler for. All ranks are placed together or none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Number of ranks (1 to 4096). Default 1. For `kind = "train"` it is derived from
    /// `[parallel]` and may be omitted; if given it must agree.
    pub ranks: Option<u32>,
    /// Devices each rank holds (1 to 64). Default 1.
    pub devices_per_rank: u32,
    /// Kind of those devices: `"cpu"` or `"gpu"`. Default `"cpu"`.
    pub device: DeviceKind,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            ranks: None,
            devices_per_rank: 1,
            device: DeviceKind::Cpu,
        }
    }
}

/// `[command]`: the program a command job runs once per rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program to run, looked up in the worker's PATH unless it contains a `/`. Required.
    pub program: String,
    /// Its arguments. Default none.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables for every rank; none may be one Cohort sets itself
    /// ([`cohort_proto::env::is_managed`]: `COHORT_*`, `RANK`, `CUDA_VISIBLE_DEVICES`...).
    /// Default none.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the rank processes. Default: the worker's working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when ranks are stopped. Default 10.
    #[serde(default = "default_stop_grace_s")]
    pub stop_grace_s: f64,
}

fn default_stop_grace_s() -> f64 {
    10.0
}

impl JobSpec {
    /// Number of ranks the job runs.
    pub fn ranks(&self) -> u32 {
        match self.kind {
            JobKind::Train => self.parallel.as_ref().map_or(1, ParallelSpec::world_size),
            JobKind::Command => self.resources.ranks.unwrap_or(1),
        }
    }

    /// Number of processes the job runs: its ranks plus, for `parallel.comm = "ps"`, one
    /// parameter server per shard (numbered after the ranks).
    pub fn processes(&self) -> u32 {
        let servers = match self.kind {
            JobKind::Train => self.parallel.as_ref().map_or(0, ParallelSpec::server_count),
            JobKind::Command => 0,
        };
        self.ranks().saturating_add(servers)
    }

    /// Size of the groups of consecutive ranks that talk the most and should share a node: a
    /// transformer's tensor-parallel degree; 1 otherwise.
    pub fn rank_group(&self) -> u32 {
        match self.kind {
            JobKind::Train => self
                .parallel
                .as_ref()
                .map_or(1, |parallel| parallel.tensor.max(1)),
            JobKind::Command => 1,
        }
    }

    /// The scheduler queue the job waits in: `queue`, by default `"default"`.
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }

    /// Whether a higher-priority job may preempt this one: `preemptible`, by default true for
    /// training jobs (they resume from a checkpoint) and false for command jobs.
    pub fn preemptible(&self) -> bool {
        self.preemptible.unwrap_or(self.kind == JobKind::Train)
    }

    /// Whether the job's ranks write a checkpoint when asked to stop (SIGTERM), so that a
    /// restart loses no step: data-parallel image models whose gradients go over the TCP ring.
    /// Other jobs resume from their last periodic checkpoint.
    pub fn checkpoints_when_stopped(&self) -> bool {
        let parallel = self.parallel.clone().unwrap_or_default();
        let model = self.model.clone().unwrap_or_default();
        self.kind == JobKind::Train
            && model.kind != crate::train::ModelKind::Transformer
            && parallel.comm == crate::parallel::Communication::Allreduce
            && crate::layout::gradient_transport(self) != crate::parallel::CollectiveBackend::Nccl
    }

    /// Seconds between SIGTERM and SIGKILL when the job's ranks are stopped: `command.stop_grace_s`
    /// or `checkpoint.stop_grace_s`, default 10.
    pub fn stop_grace_s(&self) -> f64 {
        let checkpoint = self
            .checkpoint
            .as_ref()
            .and_then(|checkpoint| checkpoint.stop_grace_s);
        match (&self.command, checkpoint) {
            (Some(command), _) => command.stop_grace_s,
            (None, Some(grace)) => grace,
            (None, None) => default_stop_grace_s(),
        }
    }

    /// What "best" means for the job's evaluations (its best checkpoints, a sweep's
    /// leaderboard): `checkpoint.metric` and `checkpoint.mode` when given, else early
    /// stopping's objective, else the highest evaluation accuracy.
    pub fn objective(&self) -> Objective {
        if let Some(checkpoint) = &self.checkpoint
            && let Some(metric) = checkpoint.metric
        {
            return Objective::new(metric, checkpoint.mode);
        }
        self.early_stopping
            .as_ref()
            .map_or_else(Objective::default, |early_stopping| {
                early_stopping.objective()
            })
    }

    /// How often a failed attempt of the job is restarted before it fails for good.
    pub fn max_restarts(&self) -> u32 {
        use crate::fault_tolerance::{DEFAULT_COMMAND_RESTARTS, DEFAULT_TRAIN_RESTARTS};
        let default = match self.kind {
            JobKind::Train => DEFAULT_TRAIN_RESTARTS,
            JobKind::Command => DEFAULT_COMMAND_RESTARTS,
        };
        self.fault_tolerance
            .as_ref()
            .and_then(|fault_tolerance| fault_tolerance.max_restarts)
            .unwrap_or(default)
    }

    /// The fewest ranks a restart of the job may run on (`fault_tolerance.min_ranks`), for an
    /// elastic job.
    pub fn min_ranks(&self) -> Option<u32> {
        self.fault_tolerance.as_ref().and_then(|ft| ft.min_ranks)
    }

    /// Seconds the job's communication may stand still before it is a hang
    /// (`fault_tolerance.hang_timeout_s`, default 60; 0: never).
    pub fn hang_timeout_s(&self) -> u32 {
        self.fault_tolerance
            .as_ref()
            .and_then(|ft| ft.hang_timeout_s)
            .unwrap_or(crate::fault_tolerance::DEFAULT_HANG_TIMEOUT_S)
    }

    /// Whether the job can run on fewer ranks than it asks for, or why not: only the
    /// data-parallel loop of Cohort's runtime over all-reduce divides the same global batch
    /// among any number of ranks.
    pub fn elastic(&self) -> Result<(), &'static str> {
        use crate::train::{Communication, ModelKind};
        let why_not = "only for data-parallel train jobs (comm = \"allreduce\", an image model): \
                       their global batch divides among any number of ranks";
        if self.kind != JobKind::Train {
            return Err(why_not);
        }
        let parallel = self.parallel.clone().unwrap_or_default();
        let transformer = self
            .model
            .as_ref()
            .is_some_and(|model| model.kind == ModelKind::Transformer);
        if transformer || parallel.comm != Communication::Allreduce {
            return Err(why_not);
        }
        Ok(())
    }

    /// Checks every rule and returns all problems found.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut problems = Problems::default();
        if self.version != crate::SPEC_VERSION {
            problems.push(
                "version",
                format!("{}, expected {}", self.version, crate::SPEC_VERSION),
            );
        }
        validate_name(&self.name, &mut problems);
        if let Some(queue) = &self.queue {
            check_name("queue", queue, &mut problems);
        }
        problems.check_range("priority", self.priority, -MAX_PRIORITY, MAX_PRIORITY);
        if let Some(ranks) = self.resources.ranks {
            problems.check_range("resources.ranks", ranks, 1, MAX_RANKS);
        }
        problems.check_range(
            "resources.devices_per_rank",
            self.resources.devices_per_rank,
            1,
            MAX_DEVICES_PER_RANK,
        );
        if let Some(fault_tolerance) = &self.fault_tolerance {
            fault_tolerance.validate(self.ranks(), self.elastic(), &mut problems);
        }
        match self.kind {
            JobKind::Command => {
                match &self.command {
                    Some(command) => command.validate(&mut problems),
                    None => problems.push("command", "missing, expected a [command] section"),
                }
                let train_sections = [
                    ("parallel", self.parallel.is_some()),
                    ("model", self.model.is_some()),
                    ("data", self.data.is_some()),
                    ("optimizer", self.optimizer.is_some()),
                    ("schedule", self.schedule.is_some()),
                    ("checkpoint", self.checkpoint.is_some()),
                    ("train", self.train.is_some()),
                    ("early_stopping", self.early_stopping.is_some()),
                ];
                for (section, present) in train_sections {
                    if present {
                        problems.push(section, "only allowed with kind = \"train\"");
                    }
                }
            }
            JobKind::Train => {
                if self.command.is_some() {
                    problems.push("command", "only allowed with kind = \"command\"");
                }
                if let Some(ranks) = self.resources.ranks {
                    let layout = self.ranks();
                    if ranks != layout {
                        problems.push(
                            "resources.ranks",
                            format!("{ranks}, expected {layout} (the product of [parallel])"),
                        );
                    }
                }
                crate::train::validate(self, &mut problems);
            }
        }
        problems.into_result()
    }
}

fn validate_name(name: &str, problems: &mut Problems) {
    check_name("name", name, problems);
}

/// Whether `name` is a valid job or queue name: 1 to [`MAX_NAME_LEN`] characters of a-z, A-Z,
/// 0-9, '-', '_' or '.'.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_name(field: &str, name: &str, problems: &mut Problems) {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        problems.push(
            field,
            format!(
                "{}, expected 1 to {MAX_NAME_LEN} characters of a-z, A-Z, 0-9, '-', '_' or '.'",
                excerpt(name)
            ),
        );
    }
}

impl CommandSpec {
    fn validate(&self, problems: &mut Problems) {
        if self.program.trim().is_empty() {
            problems.push("command.program", "empty, expected a program to run");
        }
        check_string("command.program", &self.program, problems);
        if self.args.len() > MAX_ARGS {
            problems.push(
                "command.args",
                format!("{} arguments, expected at most {MAX_ARGS}", self.args.len()),
            );
        }
        for (i, arg) in self.args.iter().enumerate() {
            check_string(&format!("command.args[{i}]"), arg, problems);
        }
        if self.env.len() > MAX_ENV_VARS {
            problems.push(
                "command.env",
                format!(
                    "{} variables, expected at most {MAX_ENV_VARS}",
                    self.env.len()
                ),
            );
        }
        for (key, value) in &self.env {
            let path = format!("command.env.{}", field_key(key));
            let valid_key = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_key {
                problems.push(&path, "invalid name, expected letters, digits and '_'");
            } else if let Some(why) = managed_variable(key) {
                problems.push(&path, why);
            }
            check_string(&path, value, problems);
        }
        if let Some(dir) = &self.working_dir {
            check_string("command.working_dir", dir, problems);
            if dir.is_empty() {
                problems.push("command.working_dir", "empty, expected a directory");
            }
        }
        if !(self.stop_grace_s.is_finite() && (0.0..=MAX_STOP_GRACE_S).contains(&self.stop_grace_s))
        {
            problems.push(
                "command.stop_grace_s",
                format!("{}, expected 0 to {MAX_STOP_GRACE_S}", self.stop_grace_s),
            );
        }
    }
}

/// Why a job may not set the variable `name`, when Cohort manages it
/// ([`cohort_proto::env::is_managed`]): a job's value would override a rank's place or its
/// device allocation.
fn managed_variable(name: &str) -> Option<&'static str> {
    if !rank_env::is_managed(name) {
        return None;
    }
    Some(match name {
        torch::RANK
        | torch::WORLD_SIZE
        | torch::LOCAL_RANK
        | torch::LOCAL_WORLD_SIZE
        | torch::MASTER_ADDR
        | torch::MASTER_PORT => {
            "set by cohort for every rank (its place in the job), a job may not set it"
        }
        rank_env::CUDA_VISIBLE_DEVICES => {
            "set by cohort for every rank (its device allocation), a job may not set it"
        }
        rank_env::NCCL_SOCKET_IFNAME => {
            "set by cohort for ranks (the interface their collectives use), a job may not set it"
        }
        rank_env::OMP_NUM_THREADS | rank_env::RAYON_NUM_THREADS => {
            "set by cohort for every rank (its cpu slots), a job may not set it"
        }
        _ => "reserved for cohort (every COHORT_* name is its own), a job may not set it",
    })
}

fn check_string(path: &str, value: &str, problems: &mut Problems) {
    if value.len() > MAX_STRING_LEN {
        problems.push(
            path,
            format!("{} bytes, expected at most {MAX_STRING_LEN}", value.len()),
        );
    }
    if value.contains('\0') {
        problems.push(path, "contains a NUL byte");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::problems::problem_strings;

    #[test]
    fn every_example_job_and_sweep_file_is_valid() {
        let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|extension| extension == "toml")
            {
                let text = std::fs::read_to_string(&path).unwrap();
                // Sweep files (a `[sweep]` around a `[job]`) are checked as sweeps.
                let table: toml::Table = text.parse().unwrap();
                let parsed = if table.contains_key("sweep") {
                    crate::sweep::parse_sweep(&text).map(|_| ())
                } else {
                    parse(&text).map(|_| ())
                };
                if let Err(error) = parsed {
                    panic!("{}: {error}", path.display());
                }
                checked += 1;
            }
        }
        assert!(
            checked >= 9,
            "only {checked} examples in {}",
            directory.display()
        );
    }

    const HELLO: &str = r#"
version = 1
name = "hello"
kind = "command"
[resources]
ranks = 3
[command]
program = "sh"
args = ["-c", "echo $RANK"]
"#;

    #[test]
    fn parses_a_command_job_with_defaults() {
        let spec = parse(HELLO).unwrap();
        assert_eq!(spec.ranks(), 3);
        assert_eq!(spec.priority, 0);
        assert_eq!(spec.resources.devices_per_rank, 1);
        assert_eq!(spec.resources.device, DeviceKind::Cpu);
        assert_eq!(spec.stop_grace_s(), 10.0);
        assert!(
            !spec.preemptible(),
            "command jobs are not preempted unless they say so"
        );
        let opted_in = parse(&format!("preemptible = true\n{HELLO}")).unwrap();
        assert!(opted_in.preemptible());
        assert_eq!(spec.queue(), "default");
        let queued = parse(&format!("queue = \"research\"\n{HELLO}")).unwrap();
        assert_eq!(queued.queue(), "research");
        let error = parse(&format!("queue = \"a b\"\n{HELLO}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("queue: \"a b\", expected 1 to"), "{error}");
    }

    #[test]
    fn unknown_field_is_named() {
        let text = HELLO.replace("ranks = 3", "ranks = 3\nrankz = 4");
        let problems = problem_strings(&text);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("rankz"), "{problems:?}");
        assert!(problems[0].starts_with("resources"), "{problems:?}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let text = HELLO.replace("ranks = 3", "ranks = \"three\"");
        let problems = problem_strings(&text);
        assert!(problems[0].starts_with("resources.ranks"), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
version = 2
name = "bad name"
kind = "command"
priority = 5000
[resources]
ranks = 0
devices_per_rank = 1000
[command]
program = ""
stop_grace_s = -1.0
"#;
        let problems = problem_strings(text);
        for path in [
            "version",
            "name",
            "priority",
            "resources.ranks",
            "resources.devices_per_rank",
            "command.program",
            "command.stop_grace_s",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} not in {problems:?}"
            );
        }
    }

    #[test]
    fn oversized_spec_is_refused_before_parsing() {
        let text = format!("{HELLO}\n# {}", "x".repeat(MAX_SPEC_BYTES));
        assert!(problem_strings(&text)[0].contains("expected at most"));
    }

    #[test]
    fn syntax_error_is_one_line() {
        let problems = problem_strings("version = = 1");
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].contains('\n'));
    }

    #[test]
    fn variables_cohort_manages_are_refused_naming_the_field() {
        let with_env = |env: &str| HELLO.replace("[command]", &format!("[command]\nenv = {env}"));
        let problems = problem_strings(&with_env(
            "{ CUDA_VISIBLE_DEVICES = \"1\", RANK = \"0\", COHORT_FOO = \"x\", \
             MASTER_PORT = \"1\", OMP_NUM_THREADS = \"64\" }",
        ));
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(
            problems.contains(
                &"command.env.CUDA_VISIBLE_DEVICES: set by cohort for every rank (its device \
                  allocation), a job may not set it"
                    .to_owned()
            ),
            "{problems:?}"
        );
        for name in ["RANK", "COHORT_FOO", "MASTER_PORT", "OMP_NUM_THREADS"] {
            let path = format!("command.env.{name}: ");
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&path) && p.ends_with("a job may not set it")),
                "{name} not in {problems:?}"
            );
        }
        let spec = parse(&with_env(
            "{ NCCL_DEBUG = \"INFO\", PYTHONPATH = \"/srv\", MY_RANK = \"1\" }",
        ))
        .unwrap();
        assert_eq!(spec.command.unwrap().env.len(), 3);
    }

    #[test]
    fn long_names_are_quoted_as_excerpts() {
        let name = "n".repeat(5_000);
        let problems = problem_strings(&HELLO.replace("\"hello\"", &format!("\"{name}\"")));
        assert!(problems[0].starts_with("name: \"nnnn"), "{problems:?}");
        assert!(problems[0].len() < 200, "{problems:?}");
        let key = "1".repeat(5_000);
        let problems = problem_strings(&HELLO.replace(
            "[command]",
            &format!("[command]\nenv = {{ {key} = \"x\" }}"),
        ));
        assert!(
            problems[0].starts_with("command.env.\"1111"),
            "{problems:?}"
        );
        assert!(problems[0].len() < 200, "{problems:?}");
    }
}
