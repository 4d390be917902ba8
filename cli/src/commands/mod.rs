//! One module per group of subcommands.

mod certs;
mod daemons;
mod experiments;
mod jobs;
mod json;
mod kv;
pub mod sample;
mod up;
mod users;

use std::process::ExitCode;

use anyhow::Result;

use crate::args::Command;

/// Runs one subcommand and returns the process exit code.
pub async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Submit(args) => jobs::submit(args).await,
        Command::Status(args) => jobs::status(args).await,
        Command::Logs(args) => jobs::logs(args).await,
        Command::Metrics(args) => jobs::metrics(args).await,
        Command::Dashboard(args) => jobs::dashboard(args).await,
        Command::Cancel(args) => jobs::cancel(args).await,
        Command::Nodes(args) => jobs::nodes(args).await,
        Command::Queues(args) => jobs::queues(args).await,
        Command::Drain(args) => jobs::drain(args).await,
        Command::Checkpoints(args) => experiments::checkpoints(args).await,
        Command::Sweep(args) => experiments::sweep(args).await,
        Command::Coordinator(args) => daemons::coordinator(args).await,
        Command::Worker(args) => daemons::worker(args).await,
        Command::Up(args) => up::up(args).await,
        Command::Users(args) => users::users(args).await,
        Command::Audit(args) => users::audit(args).await,
        Command::Certs(args) => certs::certs(args),
        Command::Kv(args) => kv::kv(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Rank | Command::Sample(_) => {
            anyhow::bail!(
                "`cohort rank` and `cohort sample` start outside the CLI runtime (see main)"
            )
        }
    }
}
