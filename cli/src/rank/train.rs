//! `cohort rank`: one process of a `kind = "train"` job. Reads its launch from the environment
//! (its place, and the job's spec, which its worker passes with it), checks that it can read its
//! data set and the checkpoint it resumes from ([`super::inputs`]), and either serves a
//! parameter-server shard or trains: loads the data, joins the data-parallel ring (or reaches
//! the job's parameter servers) and trains on this (plain, non-async) thread, reporting metrics
//! as it goes. A rank of a `[resources] device = "gpu"` job computes on the CUDA device its
//! worker named.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cohort_collective::Store;
use cohort_jobspec::DeviceKind;
use cohort_jobspec::train::{CollectiveBackend, Communication, ModelKind, ScheduleSpec};
use cohort_parameter_server::ClientConfig;
use cohort_parameter_server::server::shard_address_key;
use cohort_proto::env;
use cohort_proto::launch::{self, Role};
use cohort_trainer::language_model::train_language_model;
use cohort_trainer::mesh::{MeshShape, connect_mesh, host_transport};
use cohort_trainer::run::StopSignal;
use cohort_trainer::run::config::SlowDown;
use cohort_trainer::{ComputeDevice, EarlyStop, ParameterServerLink, TrainConfig, TrainOutcome};

use super::{RankLink, inputs, parameter_server};

/// How long a rank waits for the job's parameter servers to publish their addresses.
const SERVER_WAIT: Duration = Duration::from_secs(300);

/// Runs one process of a training job to its end.
pub fn run() -> Result<ExitCode> {
    let mut link = RankLink::connect()?;
    let spec_toml = link.launch.place.spec_toml.as_deref().with_context(|| {
        format!(
            "{} is not set: `cohort rank` runs a process of a kind = \"train\" job, whose \
             worker passes it the job's spec",
            env::JOB_SPEC
        )
    })?;
    let spec = cohort_jobspec::parse(spec_toml).context("the job's spec")?;
    link.watch_hangs(spec.hang_timeout_s());
    let place = &link.launch.place;
    let rank = link.rank();
    let mut config = TrainConfig::from_job_spec(&spec, link.launch.node.output_dir.clone());
    if place.world_size != config.parallel.data && spec.min_ranks().is_some() {
        // An elastic job's restart on fewer ranks: the same global batch, bigger shares.
        if rank == 0 {
            eprintln!(
                "[cohort] attempt {}: {} of the job's {} ranks; the global batch stays {}",
                place.restart_count + 1,
                place.world_size,
                config.parallel.data,
                config.schedule.batch_size
            );
        }
        config.parallel.data = place.world_size;
    }
    if place.restart_count > 0 {
        resume_latest(&mut config, place.restart_count, rank)?;
    } else {
        config.stop_in_checkpoint = fault_stop_in_checkpoint()?;
    }
    config.slow_down = fault_slow_rank(rank)?;
    if config.data.record_samples {
        config.sample_record = Some(link.launch.node.output_dir.join(format!(
            "samples/attempt-{}.rank-{rank}.txt",
            place.restart_count
        )));
    }
    // Before joining anything: a rank that cannot read its data or checkpoint says which and
    // why, in one line, rather than failing its peers later; the job is not restarted for it.
    if let Err(error) = inputs::check(&config, place.role, rank) {
        eprintln!("error: {error:#}");
        return Ok(ExitCode::from(launch::EXIT_INPUT_ERROR));
    }
    if let Role::ParameterServer { shard, shards } = place.role {
        return parameter_server::serve(&link, &config, shard, shards);
    }
    config.device = compute_device(spec.resources.device, place.devices.cuda_device())?;
    tracing::info!(
        rank,
        device = %config.device,
        cuda_visible_devices = std::env::var(env::CUDA_VISIBLE_DEVICES).ok(),
        "rank starts"
    );

    if config.model.kind == ModelKind::Transformer {
        return train_transformer(&link, &config);
    }
    let data = cohort_trainer::data::load(&config.data).context("loading the data set")?;
    let mut metrics = link.metrics()?;
    let outcome = match config.parallel.comm {
        Communication::Allreduce => match cohort_jobspec::layout::gradient_transport(&spec) {
            CollectiveBackend::Nccl => {
                let ComputeDevice::Cuda { ordinal } = config.device else {
                    anyhow::bail!("parallel.collective = \"nccl\" on a rank without a GPU");
                };
                let mut nccl = link.nccl("data-parallel", ordinal)?;
                let outcome = cohort_trainer::train(&config, &data, &mut nccl, &mut metrics);
                // Finalize rather than abort, so that peers still finishing the last collective
                // are not cut off.
                if outcome.is_ok() {
                    nccl.close().context("closing the NCCL communicator")?;
                }
                outcome
            }
            CollectiveBackend::Tcp | CollectiveBackend::Auto => {
                config.stop = Some(stop_on_sigterm(&link)?);
                let transport = host_transport(config.parallel.transport);
                let mut group = link.group("data-parallel", transport)?;
                cohort_trainer::train(&config, &data, &mut *group, &mut metrics)
            }
        },
        Communication::Ps => {
            let parameter_servers = connect_parameter_servers(&link, &config)?;
            cohort_trainer::train_with_parameter_server(
                &config,
                &data,
                &parameter_servers,
                &mut metrics,
            )
        }
    }
    .with_context(|| format!("rank {rank} training"))?;
    metrics.finish();
    if let Some(step) = outcome.stopped_at {
        // The last line of error output is what the coordinator shows as the rank's end.
        match &outcome.checkpoint {
            Some(path) => eprintln!(
                "[cohort] stopped on request after step {step}: checkpoint {}",
                path.display()
            ),
            None => eprintln!("[cohort] stopped on request after step {step}"),
        }
        return Ok(ExitCode::from(launch::EXIT_STOPPED_WITH_CHECKPOINT));
    }
    // Stopping as the schedule asks or early stopping is a success: the job is done.
    if rank == 0 {
        let ending = EarlyEnd {
            scheduled_stop: outcome.scheduled_stop,
            early_stop: outcome.early_stop.as_ref(),
            checkpoint: outcome.checkpoint.as_deref(),
            best_checkpoint: outcome.best_checkpoint.as_deref(),
        };
        if let Some(line) = ending.line(&config.schedule) {
            eprintln!("{line}");
        }
        print_outcome(&outcome);
    }
    Ok(ExitCode::SUCCESS)
}

/// How a run that exits successfully ended before its last step, for the line rank 0 prints.
struct EarlyEnd<'a> {
    /// The step `schedule.stop_after_*` ended the run after.
    scheduled_stop: Option<u64>,
    /// Early stopping's report.
    early_stop: Option<&'a EarlyStop>,
    /// The checkpoint of the step the run ended at.
    checkpoint: Option<&'a Path>,
    /// Early stopping's best checkpoint.
    best_checkpoint: Option<&'a Path>,
}

impl EarlyEnd<'_> {
    /// The `[cohort] ...` line saying why the run ended early, if it did.
    fn line(&self, schedule: &ScheduleSpec) -> Option<String> {
        let path =
            |path: Option<&Path>| path.map_or("none".to_owned(), |p| p.display().to_string());
        if let Some(stop) = self.early_stop {
            let evaluations = if stop.patience == 1 {
                "evaluation"
            } else {
                "evaluations"
            };
            return Some(format!(
                "[cohort] early stopped at step {}: {} did not improve on {:.4} (step {}) for {} \
                 {evaluations}; best checkpoint: {}",
                stop.step,
                stop.objective.metric,
                stop.best_value,
                stop.best_step,
                stop.patience,
                path(self.best_checkpoint)
            ));
        }
        let step = self.scheduled_stop?;
        let field = if schedule.stop_after_steps.is_some() {
            "schedule.stop_after_steps"
        } else {
            "schedule.stop_after_epochs"
        };
        Some(format!(
            "[cohort] stopped after step {step} ({field}): checkpoint {}",
            path(self.checkpoint)
        ))
    }
}

/// Makes SIGTERM a request to stop with a checkpoint: the run stops after the next step every
/// rank agrees on, rank 0 writes the checkpoint, and the process exits with
/// [`launch::EXIT_STOPPED_WITH_CHECKPOINT`] (the worker sends SIGKILL if that takes longer than
/// the job's grace period).
fn stop_on_sigterm(link: &RankLink) -> Result<StopSignal> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = StopSignal::new();
    let raised = stop.clone();
    let mut terminate = {
        let _entered = link.runtime.enter();
        signal(SignalKind::terminate()).context("handling SIGTERM")?
    };
    link.runtime.spawn(async move {
        if terminate.recv().await.is_some() {
            tracing::info!("SIGTERM: stopping after the current step with a checkpoint");
            raised.raise();
        }
    });
    Ok(stop)
}

/// Points a restarted job (attempt `attempt`, from 0) at the latest complete checkpoint its
/// earlier attempts wrote in its output directory, so that it loses at most the steps since
/// then; with none written yet it starts as its first attempt did (from the spec's own
/// `checkpoint.resume_from`, if any). Every process of the attempt finds the same one: none of
/// the earlier attempt's processes still runs to write another.
fn resume_latest(config: &mut TrainConfig, attempt: u32, rank: usize) -> Result<()> {
    let directory = config.checkpoint_directory();
    let latest = cohort_trainer::checkpoint::latest(&directory).with_context(|| {
        format!(
            "looking for the latest checkpoint in {}",
            directory.display()
        )
    })?;
    let announce = rank == 0;
    match latest {
        Some((step, path)) => {
            if announce {
                eprintln!(
                    "[cohort] attempt {}: resuming from the checkpoint of step {step} ({})",
                    attempt + 1,
                    path.display()
                );
            }
            config.checkpoint.resume_from = Some(path.display().to_string());
        }
        None if announce => eprintln!(
            "[cohort] attempt {}: no checkpoint in {} yet; starting as the first attempt did",
            attempt + 1,
            directory.display()
        ),
        None => {}
    }
    Ok(())
}

/// The step whose checkpoint write this rank stops in (`COHORT_FAULT_STOP_IN_CHECKPOINT`, set in
/// a worker's environment by fault-injection tests), if any; honoured on a job's first attempt
/// only, so that the restart the fault causes can finish.
fn fault_stop_in_checkpoint() -> Result<Option<u64>> {
    match std::env::var(env::FAULT_STOP_IN_CHECKPOINT) {
        Err(_) => Ok(None),
        Ok(step) => step.trim().parse().map(Some).with_context(|| {
            format!(
                "{} = {step:?}, expected a step number",
                env::FAULT_STOP_IN_CHECKPOINT
            )
        }),
    }
}

/// How much longer this rank computes each step (`COHORT_FAULT_SLOW_RANK`, set in a worker's
/// environment by fault-injection tests), if it names this rank.
fn fault_slow_rank(rank: usize) -> Result<Option<SlowDown>> {
    match std::env::var(env::FAULT_SLOW_RANK) {
        Err(_) => Ok(None),
        Ok(value) => SlowDown::parse(&value, rank)
            .map_err(|error| anyhow::anyhow!("{}: {error}", env::FAULT_SLOW_RANK)),
    }
}

/// Returns the device of a rank of a job asking for `kind` devices, given the CUDA device its
/// launch names (`COHORT_CUDA_DEVICE`, on GPU ranks; ignored on CPU ranks).
fn compute_device(kind: DeviceKind, cuda_device: Option<u32>) -> Result<ComputeDevice> {
    match kind {
        DeviceKind::Cpu => Ok(ComputeDevice::Cpu),
        DeviceKind::Gpu => {
            let ordinal = cuda_device.with_context(|| {
                format!(
                    "{} is not set, expected the index of this rank's gpu (the job asks for \
                     resources.device = \"gpu\")",
                    env::CUDA_DEVICE
                )
            })?;
            Ok(ComputeDevice::Cuda {
                ordinal: ordinal as usize,
            })
        }
    }
}

/// Trains the transformer as one rank of the job's mesh.
fn train_transformer(link: &RankLink, config: &TrainConfig) -> Result<ExitCode> {
    let rank = link.rank();
    let corpus = cohort_trainer::text::load(&config.data).context("loading the text")?;
    let shape = MeshShape::of(&config.parallel);
    let links = link.mesh_links(host_transport(config.parallel.transport));
    let mesh = connect_mesh(&link.store, rank, shape, &links)
        .with_context(|| format!("rank {rank} joining the {} mesh", shape.name()))?;
    let mut metrics = link.metrics()?.for_language_model();
    let outcome = train_language_model(config, &corpus, mesh, &mut metrics)
        .with_context(|| format!("rank {rank} training"))?;
    metrics.finish();
    if rank == 0 {
        let ending = EarlyEnd {
            scheduled_stop: outcome.scheduled_stop,
            early_stop: outcome.early_stop.as_ref(),
            checkpoint: outcome.checkpoint.as_deref(),
            best_checkpoint: outcome.best_checkpoint.as_deref(),
        };
        if let Some(line) = ending.line(&config.schedule) {
            eprintln!("{line}");
        }
        let describe = |evaluation: &cohort_trainer::EvaluationMetrics| {
            format!(
                "validation loss {:.4} (perplexity {:.2}, next-character accuracy {:.2}%) at step {}",
                evaluation.loss,
                f64::from(evaluation.loss).exp(),
                evaluation.accuracy * 100.0,
                evaluation.step
            )
        };
        if let Some(initial) = &outcome.initial_validation {
            println!("initial {}", describe(initial));
        }
        if let Some(last) = &outcome.final_validation {
            println!("final {}", describe(last));
        }
        println!(
            "{:.0} tokens/s; pipeline waiting {:.1}% of its time",
            outcome.tokens_per_second,
            100.0 * outcome.pipeline.waiting.as_secs_f64()
                / outcome.pipeline.total.as_secs_f64().max(1e-9)
        );
        if let Some(path) = &outcome.checkpoint {
            println!("final checkpoint: {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for every shard's address in the rendezvous store.
fn connect_parameter_servers(link: &RankLink, config: &TrainConfig) -> Result<ParameterServerLink> {
    let shards = config.parallel.server_count();
    let keys: Vec<String> = (0..shards).map(shard_address_key).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = link
        .store
        .wait(&key_refs, SERVER_WAIT)
        .context("waiting for the parameter servers' addresses")?;
    let addresses = values
        .into_iter()
        .zip(&keys)
        .map(|(value, key)| {
            String::from_utf8(value).with_context(|| format!("{key} is not an address"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ParameterServerLink {
        runtime: link.runtime.handle().clone(),
        client: ClientConfig {
            job_id: link.launch.place.job_id.clone(),
            rank: link.launch.place.rank,
            gradient_dtype: cohort_trainer::precision::wire_dtype(config.train.grad_comm_dtype()),
            token: link.launch.place.job_token.clone(),
            ca: link.ca.clone(),
            ..ClientConfig::default()
        },
        addresses,
        progress: link.progress.clone(),
    })
}

fn print_outcome(outcome: &TrainOutcome) {
    if let Some(evaluation) = &outcome.final_evaluation {
        println!(
            "final test accuracy {:.2}% (loss {:.4}) after {} steps",
            evaluation.accuracy * 100.0,
            evaluation.loss,
            outcome.steps
        );
    }
    if let Some(path) = &outcome.checkpoint {
        println!("final checkpoint: {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use cohort_jobspec::objective::{Metric, Objective};

    use super::*;

    #[test]
    fn a_run_ended_early_says_why_in_one_line() {
        let schedule = ScheduleSpec {
            stop_after_steps: Some(40),
            ..ScheduleSpec::default()
        };
        let stopped = EarlyEnd {
            scheduled_stop: Some(40),
            early_stop: None,
            checkpoint: Some(Path::new("/out/checkpoints/step-00000040")),
            best_checkpoint: None,
        };
        assert_eq!(
            stopped.line(&schedule).unwrap(),
            "[cohort] stopped after step 40 (schedule.stop_after_steps): checkpoint \
             /out/checkpoints/step-00000040"
        );
        let in_epochs = ScheduleSpec {
            stop_after_epochs: Some(1.5),
            ..ScheduleSpec::default()
        };
        assert!(
            stopped
                .line(&in_epochs)
                .unwrap()
                .contains("(schedule.stop_after_epochs)")
        );
        let stop = EarlyStop {
            step: 60,
            best_step: 30,
            best_value: 0.412_34,
            objective: Objective::natural(Metric::EvalLoss),
            patience: 3,
        };
        let early = EarlyEnd {
            scheduled_stop: None,
            early_stop: Some(&stop),
            checkpoint: Some(Path::new("/out/checkpoints/step-00000060")),
            best_checkpoint: Some(Path::new("/out/checkpoints/step-00000030")),
        };
        assert_eq!(
            early.line(&ScheduleSpec::default()).unwrap(),
            "[cohort] early stopped at step 60: eval_loss did not improve on 0.4123 (step 30) \
             for 3 evaluations; best checkpoint: /out/checkpoints/step-00000030"
        );
        let to_the_end = EarlyEnd {
            scheduled_stop: None,
            early_stop: None,
            checkpoint: Some(Path::new("/out/checkpoints/step-00000100")),
            best_checkpoint: None,
        };
        assert_eq!(to_the_end.line(&ScheduleSpec::default()), None);
    }

    #[test]
    fn gpu_ranks_compute_on_the_device_the_worker_names() {
        assert_eq!(
            compute_device(DeviceKind::Cpu, None).unwrap(),
            ComputeDevice::Cpu
        );
        // A CPU rank ignores the launch's CUDA device, whatever it is.
        assert_eq!(
            compute_device(DeviceKind::Cpu, Some(7)).unwrap(),
            ComputeDevice::Cpu
        );
        assert_eq!(
            compute_device(DeviceKind::Gpu, Some(2)).unwrap(),
            ComputeDevice::Cuda { ordinal: 2 }
        );
        let missing = compute_device(DeviceKind::Gpu, None)
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("COHORT_CUDA_DEVICE is not set"),
            "{missing}"
        );
        // A malformed COHORT_CUDA_DEVICE is refused when the launch is read
        // (`cohort_proto::launch`'s tests).
    }
}
