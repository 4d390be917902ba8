//! `cohort rank`: one rank of a `kind = "train"` job. Reads its place from the environment,
//! fetches the job spec from the coordinator, loads the data, joins the data-parallel ring and
//! trains on this (plain, non-async) thread, reporting metrics as it goes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cohort_proto::v1::GetJobRequest;
use cohort_trainer::TrainConfig;

use super::RankLink;
use crate::client;

/// Runs one training rank to the end of training.
pub fn run() -> Result<ExitCode> {
    let link = RankLink::connect()?;
    let env = link.env.clone();
    let job = link.runtime.block_on(async {
        let mut control = client::job_control(&env.coordinator).await?;
        control
            .get_job(GetJobRequest {
                job_id: env.job_id.clone(),
            })
            .await
            .map_err(client::status)
    })?;
    let spec = cohort_spec::parse(&job.into_inner().spec_toml).context("the job's spec")?;
    let output_directory = env
        .output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("cohort-output").join(&env.job_id));
    let config = TrainConfig::from_job_spec(&spec, output_directory);
    let data = cohort_trainer::data::load(&config.data).context("loading the data set")?;
    let mut ring = link.ring("data-parallel")?;
    let mut metrics = link.metrics()?;
    let outcome = cohort_trainer::train(&config, &data, &mut ring, &mut metrics)
        .with_context(|| format!("rank {} training", env.rank))?;
    metrics.finish();
    if env.rank == 0 {
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
    Ok(ExitCode::SUCCESS)
}
