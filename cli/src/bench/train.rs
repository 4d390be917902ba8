//! `cohort bench train` (wired once the trainer lands).

use std::process::ExitCode;

use anyhow::{Result, bail};

/// `cohort bench train`.
pub async fn run(_ranks: &[u32], _steps: u64, _device: String) -> Result<ExitCode> {
    bail!("cohort bench train: not built yet")
}
