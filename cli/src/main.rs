//! The `cohort` command: where Cohort's pieces meet. Job submission and inspection talk to the
//! coordinator over gRPC; `coordinator`, `worker` and `up` run the daemons; `kv` serves rank
//! scripts.
//!
//! - `args`: the command line.
//! - `client`: connecting to the coordinator.
//! - `render`: tables and progress for humans.
//! - `bench`: `cohort bench allreduce` and `cohort bench train`.
//! - `commands`: one module per group of subcommands.
//! - `local_cluster`: a coordinator and worker processes on this machine (`up`, benchmarks).
//! - `rank`: the entry point of a training rank (`cohort rank`, run by workers).

mod args;
mod bench;
mod client;
mod commands;
mod coordinator_setup;
mod credentials;
mod local_cluster;
mod rank;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    init_tracing(&cli.command);
    // Rank processes compute on their main thread and keep async code on a runtime of their
    // own (see `rank`), so they start outside the CLI's runtime.
    let outcome = match cli.command {
        args::Command::Rank => rank::train::run(),
        // Tensor math: on this thread, not on an async runtime.
        args::Command::Sample(args) => commands::sample::run(&args),
        args::Command::Bench(args::BenchArgs {
            benchmark:
                args::Benchmark::AllreduceRank {
                    elements,
                    dtype,
                    links,
                    transport,
                },
        }) => bench::allreduce::rank(&elements, dtype, links, &transport),
        args::Command::Bench(args::BenchArgs {
            benchmark:
                args::Benchmark::TrainRank {
                    steps,
                    no_telemetry,
                },
        }) => bench::train::rank(steps, !no_telemetry),
        args::Command::Bench(args::BenchArgs {
            benchmark: args::Benchmark::Mesh { ranks, steps },
        }) => bench::mesh::run(ranks, steps),
        args::Command::Bench(args::BenchArgs {
            benchmark: args::Benchmark::StreamReceive { bytes },
        }) => bench::allreduce::stream_receive(bytes),
        command => return run_async(command),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// Runs a command on the CLI's async runtime.
fn run_async(command: args::Command) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(command)) {
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
