//! The `cohort` command: where Cohort's pieces meet. Job submission and inspection talk to the
//! coordinator over gRPC; `coordinator`, `worker` and `up` run the daemons; `kv` serves rank
//! scripts.
//!
//! - `args`: the command line.
//! - `client`: connecting to the coordinator.
//! - `render`: tables and progress for humans.
//! - `commands`: one module per group of subcommands.

mod args;
mod client;
mod commands;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    init_tracing(&cli.command);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// Daemons log at info, other commands only warnings, unless `RUST_LOG` says otherwise.
fn init_tracing(command: &args::Command) {
    // `up` prints its own summary lines and the job's progress; its daemons speak up only
    // when something is wrong.
    let default = match command {
        args::Command::Coordinator(_) | args::Command::Worker(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Joins an error and its causes on one line.
fn one_line(error: &anyhow::Error) -> String {
    error
        .chain()
        .map(|cause| cause.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
