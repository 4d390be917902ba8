//! `scripts/gpu-check.sh run` on a machine without a GPU: every step of the script's table
//! starts and fails at once naming what is missing, the run exits 1, and the report exists and
//! names the missing driver.
//!
//! The script runs with a PATH of only the system tools it uses (a directory of symbolic links,
//! so no nvidia-smi, nvcc or cargo whatever this machine has: nothing is built), an empty
//! directory of GPU binaries and an empty environment otherwise.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

/// The tools the script may call on its way to failing every step; those this machine lacks
/// (git, python3, ldd) are left out, as the script allows.
const TOOLS: &[&str] = &[
    "bash", "awk", "cat", "cp", "date", "dirname", "du", "env", "git", "grep", "head", "hostname",
    "ldd", "mkdir", "mktemp", "mv", "python3", "realpath", "rm", "sed", "sort", "strip", "tail",
    "tee", "timeout", "tr", "uname",
];

/// Where the tools are looked up: the system's directories, never the test's own PATH (which
/// may hold cargo).
const SYSTEM_DIRECTORIES: &[&str] = &["/usr/bin", "/bin", "/usr/sbin", "/sbin"];

/// The run must not compile or wait for anything.
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// What the script prints for a missing driver.
const MISSING_DRIVER: &str = "NVIDIA driver (nvidia-smi not found)";

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cluster-tests lies in the repository")
        .to_path_buf()
}

/// Returns the step names of the script's table (`readonly STEPS='` ... `'`), in order.
fn step_names(script: &str) -> Result<Vec<String>> {
    let table = script
        .split_once("readonly STEPS='")
        .and_then(|(_, rest)| rest.split_once('\''))
        .context("the script has no `readonly STEPS='...'` table")?
        .0;
    Ok(table
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Makes `directory` hold a link to each of [`TOOLS`] found in [`SYSTEM_DIRECTORIES`].
fn link_tools(directory: &Path) -> Result<()> {
    for tool in TOOLS {
        let found = SYSTEM_DIRECTORIES
            .iter()
            .map(|system| Path::new(system).join(tool))
            .find(|path| path.is_file());
        if let Some(path) = found {
            symlink(&path, directory.join(tool))
                .with_context(|| format!("linking {}", path.display()))?;
        }
    }
    ensure!(
        directory.join("bash").exists(),
        "no bash in {SYSTEM_DIRECTORIES:?}"
    );
    Ok(())
}

#[test]
fn without_a_gpu_every_step_fails_naming_what_is_missing() -> Result<()> {
    let root = repository_root();
    let script_path = root.join("scripts/gpu-check.sh");
    let steps = step_names(&std::fs::read_to_string(&script_path)?)?;
    ensure!(steps.len() >= 6, "the step table lists only {steps:?}");

    let scratch = tempfile::tempdir()?;
    let tools = scratch.path().join("bin");
    let binaries = scratch.path().join("gpu-check");
    std::fs::create_dir_all(&tools)?;
    std::fs::create_dir_all(&binaries)?;
    link_tools(&tools)?;
    let report_path = scratch.path().join("r.txt");

    let started = Instant::now();
    let output = Command::new(tools.join("bash"))
        .arg(&script_path)
        .arg("run")
        .arg("--report")
        .arg(&report_path)
        .current_dir(&root)
        .env_clear()
        .env("PATH", &tools)
        .env("HOME", scratch.path())
        .env("COHORT_GPU_CHECK_DIR", &binaries)
        .output()?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shown = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    ensure!(
        output.status.code() == Some(1),
        "exit status {:?}, expected 1\n{shown}",
        output.status.code()
    );
    ensure!(
        elapsed < TIME_LIMIT,
        "took {elapsed:?}, expected < {TIME_LIMIT:?}\n{shown}"
    );
    ensure!(
        !stdout.contains("== build") && !stdout.contains("PASS "),
        "a build started or a step passed\n{shown}"
    );

    // Each step in table order: its header, then one FAIL line naming the driver and binary.
    let lines: Vec<&str> = stdout.lines().collect();
    let mut position = 0;
    for (index, step) in steps.iter().enumerate() {
        let header = format!("== [{}/{}] {step}: ", index + 1, steps.len());
        let failure = format!("FAIL {step}: missing: ");
        let header_at = lines[position..]
            .iter()
            .position(|line| line.starts_with(&header))
            .with_context(|| format!("no header {header:?} after line {position}\n{shown}"))?
            + position;
        let failure_line = lines
            .get(header_at + 1)
            .with_context(|| format!("nothing after the header of {step}\n{shown}"))?;
        ensure!(
            failure_line.starts_with(&failure)
                && failure_line.contains(MISSING_DRIVER)
                && failure_line.contains(&*binaries.to_string_lossy()),
            "{step}: expected {failure:?} naming {MISSING_DRIVER:?} and a binary of {}, found \
             {failure_line:?}\n{shown}",
            binaries.display()
        );
        position = header_at + 2;
    }

    let report = std::fs::read_to_string(&report_path)
        .with_context(|| format!("no report at {}\n{shown}", report_path.display()))?;
    ensure!(
        report.contains(&format!("devices: none (missing: {MISSING_DRIVER})")),
        "the report does not name the missing driver:\n{report}"
    );
    for step in &steps {
        ensure!(
            report.contains(&format!("FAIL {step}: missing: {MISSING_DRIVER}")),
            "the report lacks the failure of {step}:\n{report}"
        );
    }
    ensure!(
        report.contains(&format!("result: 0 passed, {} failed", steps.len())),
        "the report lacks the result line:\n{report}"
    );
    Ok(())
}
