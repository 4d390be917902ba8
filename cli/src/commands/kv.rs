//! `cohort kv`: the job's rendezvous store, from inside a rank (shell scripts, non-Rust
//! programs). Job id, rank, world size and the store's address come from the rank's environment.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cohort_proto::env;
use cohort_proto::v1::{BarrierRequest, KvAddRequest, KvGetRequest, KvSetRequest, KvWaitRequest};

use crate::args::{KvArgs, KvOperation};
use crate::client;

fn from_env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: `cohort kv` runs inside a rank started by a Cohort worker")
    })
}

/// Runs one rendezvous operation and prints its result.
pub async fn kv(args: KvArgs) -> Result<ExitCode> {
    let job_id = from_env(env::JOB_ID)?;
    let address = from_env(env::RENDEZVOUS_ADDR)?;
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0 && args.timeout_s <= 3600.0) {
        bail!(
            "--timeout-s = {}, expected more than 0 and at most 3600",
            args.timeout_s
        );
    }
    let timeout_ms = (args.timeout_s * 1000.0) as u32;
    let token = from_env(env::JOB_TOKEN).ok().map(cohort_proto::Secret::new);
    let ca = std::env::var_os(env::CA)
        .map(|path| cohort_proto::transport::CaCertificate::read(path.as_ref()))
        .transpose()?;
    let mut client = client::rendezvous(&client::Target { address, token, ca }).await?;
    match args.operation {
        KvOperation::Set { key, value } => {
            client
                .set(KvSetRequest {
                    job_id,
                    key,
                    value: value.into_bytes(),
                })
                .await
                .map_err(client::status)?;
        }
        KvOperation::Get { key } => {
            let value = client
                .get(KvGetRequest {
                    job_id,
                    key: key.clone(),
                })
                .await
                .map_err(client::status)?
                .into_inner()
                .value;
            match value {
                Some(value) => println!("{}", String::from_utf8_lossy(&value)),
                None => bail!("key {key:?} is not set"),
            }
        }
        KvOperation::Wait { key } => {
            let values = client
                .wait(KvWaitRequest {
                    job_id,
                    keys: vec![key],
                    timeout_ms,
                })
                .await
                .map_err(client::status)?
                .into_inner()
                .values;
            for value in values {
                println!("{}", String::from_utf8_lossy(&value));
            }
        }
        KvOperation::Add { key, delta } => {
            let value = client
                .add(KvAddRequest { job_id, key, delta })
                .await
                .map_err(client::status)?
                .into_inner()
                .value;
            println!("{value}");
        }
        KvOperation::Barrier { name } => {
            let rank = from_env(env::RANK)?.parse().context("COHORT_RANK")?;
            let world_size = from_env(env::WORLD_SIZE)?
                .parse()
                .context("COHORT_WORLD_SIZE")?;
            client
                .barrier(BarrierRequest {
                    job_id,
                    name,
                    rank,
                    world_size,
                    timeout_ms,
                })
                .await
                .map_err(client::status)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
