//! `cohort rank` (wired once the trainer lands).

use std::process::ExitCode;

use anyhow::{Result, bail};

/// Runs one training rank.
pub fn run() -> Result<ExitCode> {
    bail!("cohort rank: not built yet")
}
