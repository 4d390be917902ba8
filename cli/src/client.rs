//! Connecting to the coordinator, as someone: every client shows a token
//! ([`cohort_proto::transport::Credentials`]), and follows the leader when given several
//! coordinators ([`cohort_proto::failover`]).

use std::time::Duration;

use anyhow::{Context, Result};
use cohort_proto::failover::{self, CoordinatorConnection, Failover};
use cohort_proto::transport::{self, CaCertificate, Credentials};
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::rendezvous_client::RendezvousClient;
use cohort_proto::v1::{JobInfo, ListJobsRequest, SubmitJobRequest};
use cohort_proto::{MAX_MESSAGE_BYTES, Secret};

/// A coordinator and who to be there.
#[derive(Debug, Clone)]
pub struct Target {
    /// The coordinator's `host:port`, or the comma-separated addresses of a group of
    /// coordinators (the leader is found among them).
    pub address: String,
    /// The token to show (a user's, or inside a rank its job's).
    pub token: Option<Secret>,
    /// The cluster's CA: with one, calls use TLS and trust only what it signed.
    pub ca: Option<CaCertificate>,
}

/// Opens a channel to the coordinator of `target` (to the first of its coordinators that
/// answers, then to whichever leads), failing fast when none can be reached.
pub async fn channel(target: &Target) -> Result<CoordinatorConnection> {
    let credentials = Credentials::new(target.token.as_ref())?;
    let addresses = failover::parse_addresses(&target.address)?;
    let mut members = Vec::with_capacity(addresses.len());
    let mut reached = None;
    let mut failures = Vec::new();
    for address in addresses {
        let endpoint = transport::coordinator_endpoint(&address, target.ca.as_ref())?
            .connect_timeout(Duration::from_secs(5));
        let channel = if reached.is_some() {
            endpoint.connect_lazy()
        } else {
            match endpoint.connect().await {
                Ok(channel) => {
                    reached = Some(members.len());
                    channel
                }
                Err(error) => {
                    failures.push(format!("{address}: {}", innermost(&error)));
                    endpoint.connect_lazy()
                }
            }
        };
        members.push((address, channel));
    }
    let Some(reached) = reached else {
        let address = &target.address;
        let hint = if transport::uses_tls(address, target.ca.as_ref()) {
            "is it running, and does its certificate name this address and chain to the CA?"
        } else {
            "is it running? see `cohort up`; one that serves TLS needs --ca"
        };
        anyhow::bail!(
            "cannot reach the coordinator at {address} ({hint}): {}",
            failures.join("; ")
        );
    };
    Ok(credentials.wrap(Failover::over(members, reached)))
}

/// The innermost cause of `error`: what actually failed (`Connection refused`).
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A job-control client.
pub async fn job_control(target: &Target) -> Result<JobControlClient<CoordinatorConnection>> {
    Ok(JobControlClient::new(channel(target).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A rendezvous client.
pub async fn rendezvous(target: &Target) -> Result<RendezvousClient<CoordinatorConnection>> {
    Ok(RendezvousClient::new(channel(target).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Turns a gRPC status into an error carrying only its message, with a hint when the
/// connection itself broke (as it does when a plaintext client meets a TLS coordinator).
pub fn status(status: tonic::Status) -> anyhow::Error {
    let broken = matches!(
        status.code(),
        tonic::Code::Cancelled | tonic::Code::Unavailable
    ) || ["h2 protocol error", "transport error"]
        .iter()
        .any(|prefix| status.message().starts_with(prefix));
    if broken {
        anyhow::anyhow!(
            "{} (the connection to the coordinator broke: is it still running? one that \
             serves TLS needs --ca, or `ca` in the credentials file)",
            status.message()
        )
    } else {
        anyhow::anyhow!("{}", status.message())
    }
}

/// Submits a job spec and returns the queued job.
pub async fn submit(
    client: &mut JobControlClient<CoordinatorConnection>,
    spec_toml: String,
    wait_for_resources: bool,
) -> Result<JobInfo> {
    submit_request(
        client,
        SubmitJobRequest {
            spec_toml,
            wait_for_resources,
            resume_from: String::new(),
        },
    )
    .await
}

/// Submits a job as `request` says (a checkpoint of another job to start from included).
pub async fn submit_request(
    client: &mut JobControlClient<CoordinatorConnection>,
    request: SubmitJobRequest,
) -> Result<JobInfo> {
    client
        .submit_job(request)
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
pub async fn list_jobs(
    client: &mut JobControlClient<CoordinatorConnection>,
) -> Result<Vec<JobInfo>> {
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
