//! Connecting to the coordinator.

use std::time::Duration;

use anyhow::{Context, Result};
use cohort_proto::MAX_MESSAGE_BYTES;
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::rendezvous_client::RendezvousClient;
use cohort_proto::v1::{JobInfo, ListJobsRequest, SubmitJobRequest};
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

/// Most pages `list_jobs` follows: far more jobs than a coordinator queues and keeps, so a
/// coordinator that kept answering with a next page could not loop the CLI forever.
const MAX_LIST_PAGES: usize = 100_000;

/// Lists every job's summary, oldest first, following the coordinator's pages.
pub async fn list_jobs(client: &mut JobControlClient<Channel>) -> Result<Vec<JobInfo>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_LIST_PAGES {
        let page = client
            .list_jobs(ListJobsRequest {
                page_size: 0,
                page_token,
            })
            .await
            .map_err(status)?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        page_token = page.next_page_token;
    }
    anyhow::bail!("the coordinator listed more than {MAX_LIST_PAGES} pages of jobs")
}
