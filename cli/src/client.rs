//! Connecting to the coordinator.

use std::time::Duration;

use anyhow::{Context, Result};
use cohort_proto::MAX_MESSAGE_BYTES;
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::rendezvous_client::RendezvousClient;
use cohort_proto::v1::{JobInfo, SubmitJobRequest};
use tonic::transport::{Channel, Endpoint};

/// Opens a channel to the coordinator at `address`, failing fast when nothing answers.
pub async fn channel(address: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{address}"))
        .with_context(|| format!("coordinator address {address:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the coordinator at {address} (is it running? see `cohort up`)")
        })
}

/// A job-control client.
pub async fn job_control(address: &str) -> Result<JobControlClient<Channel>> {
    Ok(JobControlClient::new(channel(address).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A rendezvous client.
pub async fn rendezvous(address: &str) -> Result<RendezvousClient<Channel>> {
    Ok(RendezvousClient::new(channel(address).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Turns a gRPC status into an error carrying only its message.
pub fn status(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// Submits a job spec and returns the queued job.
pub async fn submit(
    client: &mut JobControlClient<Channel>,
    spec_toml: String,
    wait_for_resources: bool,
) -> Result<JobInfo> {
    client
        .submit_job(SubmitJobRequest {
            spec_toml,
            wait_for_resources,
        })
        .await
        .map_err(status)?
        .into_inner()
        .job
        .context("coordinator answered without the job")
}
