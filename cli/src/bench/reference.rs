//! The reference implementations benchmarks measure in the same run as Cohort, so that a ratio
//! to a well-known system comes from one machine under one load: Open MPI's `MPI_Allreduce`
//! (under `mpirun`, over shared memory and over TCP) for `bench allreduce`, PyTorch
//! DistributedDataParallel training of the same MLP for `bench train`.
//!
//! One mechanism serves both. A [`Reference`] names a Python script embedded in this binary
//! (`scripts/reference/`), the module its Python must import and the name skips print.
//! [`find_python`] picks the first Python that imports that module: `--python` when given,
//! else `python3` on `PATH`, else `/usr/bin/python3` (a pyenv or virtualenv `python3` first on
//! `PATH` does not see Debian's packages). [`run`] writes the script to a temporary directory,
//! runs it, directly or under a launcher such as `mpirun`, in a process group of its own with
//! a timeout, and parses the script's last line of stdout as JSON into its typed report
//! ([`OpenMpiReport`], [`PytorchReport`]); the arguments a script takes are typed too
//! ([`OpenMpiRequest`], [`PytorchRequest`]). A reference that is turned off, not installed or
//! fails is skipped with one printed line ([`Skip`]): the benchmark still reports Cohort's
//! figures and exits 0. Nothing here is needed to build or test Cohort.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// What `bash scripts/setup-references.sh` installs, named in skips it would cure.
const INSTALL_HINT: &str = "install: bash scripts/setup-references.sh";
/// The Python tried after `python3` on `PATH`: Debian's, where the packages install.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Longest a Python may take to import the reference's module (torch takes seconds).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a timed-out script's process group has to exit on SIGTERM before SIGKILL.
const TERMINATION_GRACE: Duration = Duration::from_secs(5);
/// Lines of a failed script's stderr quoted in the error.
const STDERR_TAIL_LINES: usize = 5;

/// A reference implementation, as a script embedded in the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// `scripts/reference/open_mpi_allreduce.py`, run under `mpirun`.
    OpenMpi,
    /// `scripts/reference/pytorch_ddp_mlp.py`, which starts its own rank processes.
    Pytorch,
}

impl Reference {
    /// The name skips and table headers print.
    pub fn label(self) -> &'static str {
        match self {
            Reference::OpenMpi => "Open MPI",
            Reference::Pytorch => "PyTorch",
        }
    }

    /// The module the script's Python must import.
    fn module(self) -> &'static str {
        match self {
            Reference::OpenMpi => "mpi4py",
            Reference::Pytorch => "torch",
        }
    }

    /// The script's file name and text.
    fn script(self) -> (&'static str, &'static str) {
        match self {
            Reference::OpenMpi => (
                "open_mpi_allreduce.py",
                include_str!("../../../scripts/reference/open_mpi_allreduce.py"),
            ),
            Reference::Pytorch => (
                "pytorch_ddp_mlp.py",
                include_str!("../../../scripts/reference/pytorch_ddp_mlp.py"),
            ),
        }
    }
}

/// Why a reference is not measured in this run; printed as one line, and the benchmark goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// What is skipped: a reference's label, or a label and a variant (`Open MPI tcp`).
    pub what: String,
    /// Why, lowercase.
    pub reason: String,
    /// Whether `scripts/setup-references.sh` would cure it (the line then says so).
    pub installable: bool,
}

impl Skip {
    /// A reference that is not installed.
    pub fn missing(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            reason: reason.into(),
            installable: true,
        }
    }

    /// A reference turned off or not applicable, or one that failed.
    pub fn because(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            reason: reason.into(),
            installable: false,
        }
    }

    /// Prints the skip on stdout, where the table goes, so that a captured run shows it.
    pub fn print(&self) {
        println!("{self}");
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "skipping {}: {}", self.what, self.reason)?;
        if self.installable {
            write!(formatter, " ({INSTALL_HINT})")?;
        }
        Ok(())
    }
}

/// Returns the first executable file named `program` in the directories of `search_path`
/// (a `PATH` value), if any.
pub fn find_program(program: &str, search_path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(search_path?)
        .filter(|directory| !directory.as_os_str().is_empty())
        .map(|directory| directory.join(program))
        .find(|candidate| {
            candidate.metadata().is_ok_and(|metadata| {
                metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
            })
        })
}

/// Returns the first Python that imports `reference`'s module: `explicit` alone when given,
/// else `python3` found on `search_path`, else [`SYSTEM_PYTHON`]; or why none does.
pub async fn find_python(
    reference: Reference,
    explicit: Option<&Path>,
    search_path: Option<&OsStr>,
) -> std::result::Result<PathBuf, Skip> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(python) => vec![python.to_owned()],
        None => find_program("python3", search_path)
            .into_iter()
            .chain([PathBuf::from(SYSTEM_PYTHON)])
            .collect(),
    };
    let mut tried = Vec::new();
    for python in candidates {
        if tried.iter().any(|(path, _)| *path == python) {
            continue;
        }
        let mut command = Command::new(&python);
        command.args(["-c", &format!("import {}", reference.module())]);
        match execute(command, IMPORT_TIMEOUT).await {
            Ok(output) if output.succeeded => return Ok(python),
            Ok(output) => tried.push((python, output.stderr_tail(1))),
            Err(error) => tried.push((python, format!("{error:#}"))),
        }
    }
    let tried: Vec<String> = tried
        .iter()
        .map(|(python, why)| format!("{} ({why})", python.display()))
        .collect();
    let reason = format!(
        "no python imports {}: tried {}",
        reference.module(),
        tried.join(", ")
    );
    Err(if explicit.is_some() {
        Skip::because(reference.label(), format!("--python: {reason}"))
    } else {
        Skip::missing(reference.label(), reason)
    })
}

/// Runs `reference`'s script with `python` and `arguments`, under `launcher` (a program and
/// its arguments, before the Python; empty to run the Python directly), and returns the JSON
/// report on its last line of stdout. A script still running after `timeout` is stopped
/// (SIGTERM to its process group, then SIGKILL) and reported as timed out.
pub async fn run<T: DeserializeOwned>(
    reference: Reference,
    launcher: &[OsString],
    python: &Path,
    arguments: &[String],
    timeout: Duration,
) -> Result<T> {
    let directory = tempfile::Builder::new()
        .prefix("cohort-reference-")
        .tempdir()?;
    let (file_name, source) = reference.script();
    let script = directory.path().join(file_name);
    std::fs::write(&script, source).with_context(|| format!("writing {}", script.display()))?;
    let mut command = match launcher.split_first() {
        Some((program, launcher_arguments)) => {
            let mut command = Command::new(program);
            command.args(launcher_arguments).arg(python);
            command
        }
        None => Command::new(python),
    };
    command
        .arg(&script)
        .args(arguments)
        .current_dir(directory.path())
        // One thread per rank process, as Cohort's CPU ranks run with one slot each.
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1");
    let output = execute(command, timeout).await?;
    if !output.succeeded {
        bail!(
            "the {} script failed ({}): {}",
            reference.label(),
            output.status,
            output.stderr_tail(STDERR_TAIL_LINES)
        );
    }
    parse_report(reference, &output.stdout)
}

/// Parses the report a script printed as the last non-empty line of `stdout`.
pub fn parse_report<T: DeserializeOwned>(reference: Reference, stdout: &str) -> Result<T> {
    let last = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .with_context(|| format!("the {} script printed nothing", reference.label()))?;
    serde_json::from_str(last).with_context(|| {
        format!(
            "the {} script's last line, expected its JSON report: {last:?}",
            reference.label()
        )
    })
}

/// What a finished process left.
#[derive(Debug)]
struct Output {
    /// Whether it exited with status 0.
    succeeded: bool,
    /// Its exit status, as printed.
    status: String,
    /// Everything it wrote to stdout.
    stdout: String,
    /// Everything it wrote to stderr.
    stderr: String,
}

impl Output {
    /// The last `lines` non-empty lines of stderr, joined with ` | `, or a note that it was
    /// empty.
    fn stderr_tail(&self, lines: usize) -> String {
        let tail: Vec<&str> = self
            .stderr
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        if tail.is_empty() {
            return "no output on stderr".to_owned();
        }
        tail[tail.len().saturating_sub(lines)..].join(" | ")
    }
}

/// Runs `command` in a process group of its own with its output in temporary files (a
/// chatty process never blocks on a full pipe), stopping the whole group after `timeout`.
async fn execute(mut command: Command, timeout: Duration) -> Result<Output> {
    let stdout = tempfile::tempfile()?;
    let stderr = tempfile::tempfile()?;
    command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .process_group(0)
        .kill_on_drop(true);
    cohort_worker::process::die_with_parent(&mut command);
    let program = command.as_std().get_program().to_owned();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", Path::new(&program).display()))?;
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            if let Some(pid) = child.id() {
                cohort_worker::process::signal_group(pid, cohort_worker::process::SIGTERM);
            }
            if tokio::time::timeout(TERMINATION_GRACE, child.wait())
                .await
                .is_err()
            {
                child.kill().await?;
            }
            bail!(
                "{} still running after {} s, stopped",
                Path::new(&program).display(),
                timeout.as_secs()
            );
        }
    };
    Ok(Output {
        succeeded: status.success(),
        status: status.to_string(),
        stdout: read_back(stdout)?,
        stderr: read_back(stderr)?,
    })
}

/// Reads a temporary output file from its start.
fn read_back(mut file: std::fs::File) -> Result<String> {
    use std::io::{Read as _, Seek as _};
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The transport an Open MPI run is confined to, through its byte transfer layers (BTLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpiTransport {
    /// `self,vader`: shared memory between the processes of one machine.
    SharedMemory,
    /// `self,tcp`: TCP over loopback, as Cohort's ring.
    Tcp,
}

impl MpiTransport {
    /// Both, in the order they run and print.
    pub const ALL: [MpiTransport; 2] = [MpiTransport::SharedMemory, MpiTransport::Tcp];

    /// Short name for table headers and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            MpiTransport::SharedMemory => "shm",
            MpiTransport::Tcp => "tcp",
        }
    }

    /// The `--mca btl` value.
    pub fn btl(self) -> &'static str {
        match self {
            MpiTransport::SharedMemory => "self,vader",
            MpiTransport::Tcp => "self,tcp",
        }
    }
}

/// `mpirun`'s arguments for `ranks` processes on this machine over `transport`. The `ob1`
/// point-to-point layer is chosen explicitly: the UCX one, where installed, would ignore the
/// BTL list. Processes are not bound to cores (more ranks than cores is allowed, as Cohort's
/// local cluster allows it), and TCP stays on loopback, as Cohort's ring does.
pub fn mpirun_arguments(
    mpirun: &Path,
    ranks: u32,
    transport: MpiTransport,
    as_root: bool,
) -> Vec<OsString> {
    let mut arguments: Vec<OsString> = vec![mpirun.into()];
    if as_root {
        arguments.push("--allow-run-as-root".into());
    }
    let np = ranks.to_string();
    let mut flags = vec![
        "-np",
        &np,
        "--oversubscribe",
        "--bind-to",
        "none",
        "--mca",
        "pml",
        "ob1",
        "--mca",
        "btl",
        transport.btl(),
    ];
    if transport == MpiTransport::Tcp {
        flags.extend(["--mca", "btl_tcp_if_include", "lo"]);
    }
    arguments.extend(flags.into_iter().map(OsString::from));
    arguments
}

/// Whether this process runs as root (`mpirun` refuses to unless told it may).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

/// Returns `mpirun` on `search_path`, or why Open MPI is skipped.
pub fn find_mpirun(search_path: Option<&OsStr>) -> std::result::Result<PathBuf, Skip> {
    find_program("mpirun", search_path)
        .ok_or_else(|| Skip::missing(Reference::OpenMpi.label(), "mpirun not found on PATH"))
}

/// Asks `ompi_info` (next to `mpirun`) which single-copy mechanism the shared-memory BTL uses
/// (`cma`, `xpmem`, `knem`, `emulated` or `none`) and where that setting came from.
pub async fn vader_single_copy_mechanism(mpirun: &Path) -> Option<String> {
    let ompi_info = mpirun.with_file_name("ompi_info");
    let mut command = Command::new(ompi_info);
    command.args(["--parsable", "--param", "btl", "vader", "--level", "3"]);
    let output = execute(command, Duration::from_secs(30)).await.ok()?;
    parse_single_copy_mechanism(&output.stdout)
}

/// Reads the vader single-copy mechanism out of `ompi_info --parsable` output: `cma (default)`.
fn parse_single_copy_mechanism(parsable: &str) -> Option<String> {
    const PREFIX: &str = "mca:btl:vader:param:btl_vader_single_copy_mechanism:";
    let field = |name: &str| {
        parsable
            .lines()
            .find_map(|line| line.strip_prefix(PREFIX)?.strip_prefix(name))
            .map(str::trim)
    };
    let value = field("value:")?;
    Some(match field("source:") {
        Some(source) => format!("{value} ({source})"),
        None => value.to_owned(),
    })
}

/// The arguments of `open_mpi_allreduce.py`: per size, the `float32` elements, the untimed
/// and the timed all-reduces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenMpiRequest {
    /// Elements per size.
    pub elements: Vec<usize>,
    /// Untimed all-reduces per size.
    pub warmup: Vec<usize>,
    /// Timed all-reduces per size.
    pub iterations: Vec<usize>,
}

impl OpenMpiRequest {
    /// The script's command-line arguments.
    pub fn arguments(&self) -> Vec<String> {
        let list = |values: &[usize]| {
            values
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            "--elements".to_owned(),
            list(&self.elements),
            "--warmup".to_owned(),
            list(&self.warmup),
            "--iterations".to_owned(),
            list(&self.iterations),
        ]
    }
}

/// What `open_mpi_allreduce.py` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenMpiReport {
    /// The library's version (`Open MPI v4.1.4`).
    pub library: String,
    /// Ranks `mpirun` started.
    pub world_size: u32,
    /// One entry per requested size, in order.
    pub sizes: Vec<OpenMpiSize>,
}

/// One size of an [`OpenMpiReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenMpiSize {
    /// `float32` elements all-reduced.
    pub elements: usize,
    /// Untimed all-reduces before the timed ones.
    pub warmup: usize,
    /// Timed all-reduces.
    pub iterations: usize,
    /// Each rank's median time of one all-reduce, in seconds, by rank.
    pub rank_times_s: Vec<f64>,
}

impl OpenMpiReport {
    /// The slowest rank's median time of each size, in seconds, checked against the request
    /// (a size is as slow as its slowest rank, as Cohort's sizes are).
    pub fn slowest_rank_times(&self, request: &OpenMpiRequest, ranks: u32) -> Result<Vec<f64>> {
        if self.world_size != ranks {
            bail!(
                "{} ran {} ranks, expected {ranks}",
                self.library,
                self.world_size
            );
        }
        let reported: Vec<usize> = self.sizes.iter().map(|size| size.elements).collect();
        if reported != request.elements {
            bail!(
                "{} reported sizes of {reported:?} elements, expected {:?}",
                self.library,
                request.elements
            );
        }
        self.sizes
            .iter()
            .map(|size| {
                if size.rank_times_s.len() != ranks as usize {
                    bail!(
                        "{} reported {} ranks' times for {} elements, expected {ranks}",
                        self.library,
                        size.rank_times_s.len(),
                        size.elements
                    );
                }
                Ok(size.rank_times_s.iter().copied().fold(0.0, f64::max))
            })
            .collect()
    }
}

/// The arguments of `pytorch_ddp_mlp.py`: the world, the model, the optimizer and the steps.
#[derive(Debug, Clone, PartialEq)]
pub struct PytorchRequest {
    /// Rank processes.
    pub world_size: u32,
    /// Timed steps.
    pub steps: u64,
    /// Untimed first steps.
    pub warmup_steps: u64,
    /// Examples per step over all ranks.
    pub global_batch: u32,
    /// Widths of the hidden layers (ReLU after each).
    pub hidden: Vec<u32>,
    /// SGD learning rate.
    pub learning_rate: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
    /// Seed of the initial weights and the example order.
    pub seed: u64,
    /// The directory of the Fashion-MNIST files (those Cohort's benchmark reads).
    pub data: PathBuf,
}

impl PytorchRequest {
    /// The script's command-line arguments.
    pub fn arguments(&self) -> Vec<String> {
        let hidden = self
            .hidden
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        [
            ("--world-size", self.world_size.to_string()),
            ("--steps", self.steps.to_string()),
            ("--warmup-steps", self.warmup_steps.to_string()),
            ("--global-batch", self.global_batch.to_string()),
            ("--hidden", hidden),
            ("--lr", self.learning_rate.to_string()),
            ("--momentum", self.momentum.to_string()),
            ("--weight-decay", self.weight_decay.to_string()),
            ("--seed", self.seed.to_string()),
            ("--data", self.data.display().to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }
}

/// What `pytorch_ddp_mlp.py` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PytorchReport {
    /// `torch.__version__`.
    pub torch_version: String,
    /// The BLAS libraries rank 0 had mapped (OpenBLAS, or the slow reference BLAS).
    pub blas: Vec<String>,
    /// Rank processes.
    pub world_size: u32,
    /// Intra-op threads per rank.
    pub threads_per_rank: u32,
    /// Each rank's medians, by rank.
    pub ranks: Vec<PytorchPhases>,
}

/// Median times of one step's phases, in seconds: one rank's, or the slowest rank's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PytorchPhases {
    /// The rank (in a combined figure, the world size minus one).
    pub rank: u32,
    /// A whole step.
    pub step_s: f64,
    /// Gathering and normalising the batch.
    pub data_s: f64,
    /// The forward pass and the loss.
    pub forward_s: f64,
    /// The backward pass, including DDP's gradient all-reduce it overlaps.
    pub backward_s: f64,
    /// The optimizer step and clearing the gradients.
    pub optimizer_s: f64,
    /// The loss of the last step (a sanity check: it should fall from ln 10).
    pub last_loss: f64,
}

impl PytorchReport {
    /// Each phase's slowest rank (a step is as slow as its slowest rank, as Cohort's
    /// benchmark combines its ranks), checked against the world size asked for.
    pub fn slowest(&self, world_size: u32) -> Result<PytorchPhases> {
        if self.world_size != world_size || self.ranks.len() != world_size as usize {
            bail!(
                "PyTorch reported {} ranks of a world of {}, expected {world_size}",
                self.ranks.len(),
                self.world_size
            );
        }
        let slowest =
            |pick: fn(&PytorchPhases) -> f64| self.ranks.iter().map(pick).fold(0.0, f64::max);
        Ok(PytorchPhases {
            rank: world_size - 1,
            step_s: slowest(|rank| rank.step_s),
            data_s: slowest(|rank| rank.data_s),
            forward_s: slowest(|rank| rank.forward_s),
            backward_s: slowest(|rank| rank.backward_s),
            optimizer_s: slowest(|rank| rank.optimizer_s),
            last_loss: slowest(|rank| rank.last_loss),
        })
    }

    /// The BLAS in use, for the summary line: OpenBLAS or MKL when mapped, else what was.
    pub fn blas_summary(&self) -> String {
        let optimised: Vec<&str> = self
            .blas
            .iter()
            .map(String::as_str)
            .filter(|name| name.contains("openblas") || name.contains("mkl"))
            .collect();
        match (optimised.is_empty(), self.blas.is_empty()) {
            (false, _) => optimised.join("+"),
            (true, false) => format!(
                "{} (the reference BLAS? install libopenblas0-pthread)",
                self.blas.join("+")
            ),
            (true, true) => "unknown BLAS".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `open_mpi_allreduce.py` printed for two sizes on two ranks (captured).
    const OPEN_MPI_OUTPUT: &str = r#"{"library": "Open MPI v4.1.4", "world_size": 2, "sizes": [{"elements": 1024, "warmup": 40, "iterations": 200, "rank_times_s": [3.4149998100474477e-06, 3.3850010368041694e-06]}, {"elements": 262144, "warmup": 10, "iterations": 50, "rank_times_s": [0.00018285500118508935, 0.0001827849991968833]}]}
"#;

    /// What `pytorch_ddp_mlp.py` printed for two ranks (captured).
    const PYTORCH_OUTPUT: &str = r#"{"torch_version": "1.13.0a0", "blas": ["libblas.so.3", "liblapack.so.3", "libopenblasp-r0.3.21.so"], "world_size": 2, "threads_per_rank": 1, "ranks": [{"step_s": 0.02011167800083058, "data_s": 0.00013753600069321692, "forward_s": 0.004420887999003753, "backward_s": 0.014470747999439482, "optimizer_s": 0.0010597110012895428, "rank": 0, "last_loss": 1.771765947341919}, {"step_s": 0.021076766999613028, "data_s": 0.00013171800674172118, "forward_s": 0.004420657001901418, "backward_s": 0.014723949003382586, "optimizer_s": 0.0010647189992596395, "rank": 1, "last_loss": 1.7403775453567505}]}"#;

    fn request() -> OpenMpiRequest {
        OpenMpiRequest {
            elements: vec![1024, 262_144],
            warmup: vec![40, 10],
            iterations: vec![200, 50],
        }
    }

    #[test]
    fn the_open_mpi_report_parses_from_the_last_line_and_takes_the_slowest_rank() {
        // mpirun may print warnings before rank 0's report.
        let stdout = format!("a warning from some rank\n\n{OPEN_MPI_OUTPUT}\n");
        let report: OpenMpiReport = parse_report(Reference::OpenMpi, &stdout).unwrap();
        assert_eq!(report.library, "Open MPI v4.1.4");
        assert_eq!(
            report.slowest_rank_times(&request(), 2).unwrap(),
            [3.4149998100474477e-06, 0.00018285500118508935]
        );
        let error = report.slowest_rank_times(&request(), 4).unwrap_err();
        assert_eq!(error.to_string(), "Open MPI v4.1.4 ran 2 ranks, expected 4");
        let mut other_sizes = request();
        other_sizes.elements[1] = 1;
        let error = report.slowest_rank_times(&other_sizes, 2).unwrap_err();
        assert!(error.to_string().contains("expected [1024, 1]"), "{error}");
    }

    #[test]
    fn the_pytorch_report_parses_and_takes_each_phase_of_the_slowest_rank() {
        let report: PytorchReport = parse_report(Reference::Pytorch, PYTORCH_OUTPUT).unwrap();
        let slowest = report.slowest(2).unwrap();
        assert_eq!(slowest.step_s, 0.021076766999613028);
        assert_eq!(slowest.forward_s, 0.004420887999003753);
        assert_eq!(slowest.backward_s, 0.014723949003382586);
        assert_eq!(slowest.data_s, 0.00013753600069321692);
        assert_eq!(report.blas_summary(), "libopenblasp-r0.3.21.so");
        assert!(report.slowest(1).is_err());
        let reference_blas = PytorchReport {
            blas: vec!["libblas.so.3".to_owned()],
            ..report
        };
        assert!(
            reference_blas
                .blas_summary()
                .contains("install libopenblas0-pthread")
        );
    }

    #[test]
    fn a_script_that_prints_no_report_is_an_error_naming_its_last_line() {
        let error = parse_report::<OpenMpiReport>(Reference::OpenMpi, "").unwrap_err();
        assert_eq!(error.to_string(), "the Open MPI script printed nothing");
        let error =
            parse_report::<PytorchReport>(Reference::Pytorch, "{}\nTraceback: boom\n").unwrap_err();
        assert!(error.to_string().contains("\"Traceback: boom\""), "{error}");
        // A report of the wrong shape is refused, not half-read.
        let error = parse_report::<PytorchReport>(Reference::Pytorch, OPEN_MPI_OUTPUT).unwrap_err();
        assert!(format!("{error:#}").contains("unknown field"), "{error:#}");
    }

    #[test]
    fn reports_round_trip_through_json() {
        let open_mpi: OpenMpiReport = parse_report(Reference::OpenMpi, OPEN_MPI_OUTPUT).unwrap();
        let text = serde_json::to_string(&open_mpi).unwrap();
        assert_eq!(
            parse_report::<OpenMpiReport>(Reference::OpenMpi, &text).unwrap(),
            open_mpi
        );
        let pytorch: PytorchReport = parse_report(Reference::Pytorch, PYTORCH_OUTPUT).unwrap();
        let text = serde_json::to_string(&pytorch).unwrap();
        assert_eq!(
            parse_report::<PytorchReport>(Reference::Pytorch, &text).unwrap(),
            pytorch
        );
    }

    #[test]
    fn every_argument_a_request_passes_is_one_its_script_takes() {
        let open_mpi = request().arguments();
        assert_eq!(
            open_mpi,
            [
                "--elements",
                "1024,262144",
                "--warmup",
                "40,10",
                "--iterations",
                "200,50"
            ]
        );
        let pytorch = PytorchRequest {
            world_size: 2,
            steps: 30,
            warmup_steps: 3,
            global_batch: 256,
            hidden: vec![1024, 1024],
            learning_rate: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 0,
            data: PathBuf::from("/data/fashion-mnist"),
        }
        .arguments();
        assert_eq!(pytorch[8..10], ["--hidden", "1024,1024"]);
        assert_eq!(pytorch[10..12], ["--lr", "0.01"]);
        assert_eq!(pytorch[18..], ["--data", "/data/fashion-mnist"]);
        for (reference, arguments) in [
            (Reference::OpenMpi, &open_mpi),
            (Reference::Pytorch, &pytorch),
        ] {
            let (_, script) = reference.script();
            for flag in arguments
                .iter()
                .filter(|argument| argument.starts_with("--"))
            {
                assert!(
                    script.contains(&format!("add_argument(\n        \"{flag}\""))
                        || script.contains(&format!("add_argument(\"{flag}\"")),
                    "{flag} is not an argument of {reference:?}'s script"
                );
            }
        }
    }

    #[test]
    fn without_mpirun_on_path_open_mpi_is_skipped_with_the_installer_named() {
        let empty = tempfile::tempdir().unwrap();
        let with_mpirun = tempfile::tempdir().unwrap();
        let mpirun = with_mpirun.path().join("mpirun");
        std::fs::write(&mpirun, "#!/bin/sh\n").unwrap();
        let search_path = std::env::join_paths([empty.path()]).unwrap();
        let skip = find_mpirun(Some(&search_path)).unwrap_err();
        assert_eq!(
            skip.to_string(),
            "skipping Open MPI: mpirun not found on PATH (install: bash \
             scripts/setup-references.sh)"
        );
        assert!(find_mpirun(None).is_err());
        // Not executable: not a program.
        let search_path = std::env::join_paths([empty.path(), with_mpirun.path()]).unwrap();
        assert!(find_mpirun(Some(&search_path)).is_err());
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&mpirun, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_mpirun(Some(&search_path)).unwrap(), mpirun);
    }

    #[tokio::test]
    async fn a_python_that_cannot_import_the_module_is_skipped_with_the_reason() {
        let skip = find_python(
            Reference::Pytorch,
            Some(Path::new("/nonexistent/python3")),
            None,
        )
        .await
        .unwrap_err();
        assert!(!skip.installable);
        let line = skip.to_string();
        assert!(
            line.starts_with(
                "skipping PyTorch: --python: no python imports torch: tried /nonexistent/python3 \
                 (starting /nonexistent/python3: "
            ),
            "{line}"
        );
        // `false` is a program that never imports anything, whatever is installed.
        let skip = find_python(Reference::OpenMpi, Some(Path::new("false")), None)
            .await
            .unwrap_err();
        assert!(
            skip.to_string().contains("false (no output on stderr)"),
            "{skip}"
        );
    }

    #[tokio::test]
    async fn a_script_runs_under_its_launcher_and_a_slow_one_is_stopped() {
        // `sh -c SCRIPT_TEXT` stands in for a launcher and a Python: the launcher's arguments
        // come first, then the "python" (here `$0`), the script and its arguments.
        let launcher: Vec<OsString> = [
            "sh",
            "-c",
            "echo noise; echo \"{\\\"args\\\": \\\"$*\\\"}\"",
        ]
        .map(OsString::from)
        .to_vec();
        #[derive(Debug, Deserialize)]
        struct Echo {
            args: String,
        }
        let echo: Echo = run(
            Reference::OpenMpi,
            &launcher,
            Path::new("python"),
            &["--elements".to_owned(), "4".to_owned()],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(
            echo.args.ends_with("/open_mpi_allreduce.py --elements 4"),
            "{}",
            echo.args
        );

        let failing: Vec<OsString> = ["sh", "-c", "echo one >&2; echo two >&2; exit 3"]
            .map(OsString::from)
            .to_vec();
        let error = run::<Echo>(
            Reference::Pytorch,
            &failing,
            Path::new("python"),
            &[],
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the PyTorch script failed (exit status: 3): one | two"
        );

        let slow: Vec<OsString> = ["sh", "-c", "sleep 60 & wait"].map(OsString::from).to_vec();
        let started = std::time::Instant::now();
        let error = run::<Echo>(
            Reference::Pytorch,
            &slow,
            Path::new("python"),
            &[],
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert_eq!(error.to_string(), "sh still running after 0 s, stopped");
        assert!(
            started.elapsed() < TERMINATION_GRACE,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn mpirun_is_confined_to_one_transport_and_allowed_to_run_as_root() {
        let arguments = mpirun_arguments(Path::new("/usr/bin/mpirun"), 2, MpiTransport::Tcp, true);
        let arguments: Vec<&str> = arguments.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            arguments.join(" "),
            "/usr/bin/mpirun --allow-run-as-root -np 2 --oversubscribe --bind-to none --mca pml \
             ob1 --mca btl self,tcp --mca btl_tcp_if_include lo"
        );
        let arguments = mpirun_arguments(Path::new("mpirun"), 4, MpiTransport::SharedMemory, false);
        assert!(!arguments.contains(&OsString::from("--allow-run-as-root")));
        assert!(arguments.contains(&OsString::from("self,vader")));
    }

    #[test]
    fn the_single_copy_mechanism_is_read_from_ompi_info() {
        let parsable = "mca:btl:vader:param:btl_vader_single_copy_mechanism:value:cma\n\
                        mca:btl:vader:param:btl_vader_single_copy_mechanism:source:default\n\
                        mca:btl:vader:param:btl_vader_single_copy_mechanism:enumerator:value:1:cma\n";
        assert_eq!(
            parse_single_copy_mechanism(parsable).as_deref(),
            Some("cma (default)")
        );
        assert_eq!(
            parse_single_copy_mechanism("mca:btl:vader:param:x:value:1"),
            None
        );
    }
}
