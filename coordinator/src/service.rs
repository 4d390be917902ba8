//! The gRPC services. Each handler authenticates its caller and checks what they may do
//! ([`crate::auth`]), decodes its request, calls [`Cluster`], and encodes the answer; errors
//! become `tonic::Status` in one place (`impl From<Error> for Status`). Mutating calls go to
//! the audit log, refused or not.

use std::pin::Pin;
use std::sync::Arc;

use cohort_proto::JobId;
use cohort_proto::v1::job_control_server::JobControl;
use cohort_proto::v1::membership_server::Membership;
use cohort_proto::v1::rendezvous_server::Rendezvous;
use cohort_proto::v1::*;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::auth::access::sees_job;
use crate::auth::{Action, Authenticator, Caller, authorize};
use crate::cluster::{Cluster, JobSubmission, MetricsReport};
use crate::convert;
use crate::error::Error;
use crate::limits::MAX_LOG_LINES_PER_PUSH;
use crate::logs::SequencedLine;

/// A server stream of `T`.
type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How many messages a streaming handler buffers for a slow client.
const STREAM_BUFFER: usize = 256;

/// Most audit entries one `ListAudit` answers.
const AUDIT_PAGE: usize = 1_000;

fn job_id(text: &str) -> Result<JobId, Status> {
    JobId::new(text).map_err(|e| Status::from(Error::from(e)))
}

fn sweep_id(text: &str) -> Result<cohort_proto::SweepId, Status> {
    cohort_proto::SweepId::new(text).map_err(|e| Status::from(Error::from(e)))
}

/// The bearer token of a call's `authorization` metadata, if it has one.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    cohort_proto::transport::bearer_token(request.metadata())
}

/// Serves [`JobControl`] (the CLI), [`Membership`] (workers) and [`Rendezvous`] (ranks).
#[derive(Clone)]
pub struct CoordinatorService {
    /// The domain core.
    cluster: Arc<Cluster>,
    /// Who is calling.
    auth: Arc<Authenticator>,
    /// The web dashboard, when the coordinator serves one (`--http`).
    dashboard: Option<DashboardAccess>,
}

/// Where the web dashboard is, and its login codes.
#[derive(Clone)]
pub struct DashboardAccess {
    /// Its login codes and sessions.
    pub logins: Arc<crate::dashboard::Logins>,
    /// The address its listener is bound to.
    pub address: std::net::SocketAddr,
    /// Whether it serves TLS.
    pub tls: bool,
}

impl CoordinatorService {
    /// Serves `cluster` to the callers `auth` knows.
    pub fn new(cluster: Arc<Cluster>, auth: Arc<Authenticator>) -> Self {
        Self {
            cluster,
            auth,
            dashboard: None,
        }
    }

    /// Hands out login links to `dashboard`.
    pub fn with_dashboard(mut self, dashboard: DashboardAccess) -> Self {
        self.dashboard = Some(dashboard);
        self
    }

    /// The caller of `request`, allowed to do `action`.
    fn allowed<T>(&self, request: &Request<T>, action: Action<'_>) -> Result<Caller, Status> {
        let caller = self.auth.caller(bearer(request))?;
        authorize(&caller, action)?;
        Ok(caller)
    }

    /// The caller of `request` if they may read job `job_id` (returned too).
    async fn reader_of<T>(&self, request: &Request<T>, job_id: &JobId) -> Result<JobInfo, Status> {
        let caller = self.auth.caller(bearer(request))?;
        let job = self.cluster.job(job_id).await?;
        authorize(
            &caller,
            Action::ReadJob {
                job_id,
                owner: &job.submitter,
            },
        )?;
        Ok(job)
    }
}

#[tonic::async_trait]
impl JobControl for CoordinatorService {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let caller = self.auth.caller(bearer(&request))?;
        let submitter = match (authorize(&caller, Action::Submit), caller.user_name()) {
            (Ok(()), Some(name)) => name.to_owned(),
            (refused, _) => {
                let refused = refused.err().unwrap_or_else(|| {
                    Error::PermissionDenied(format!("{caller} may not submit jobs"))
                });
                let outcome: Result<(), &Error> = Err(&refused);
                self.auth.audit(&caller, "submit", "", &outcome).await;
                return Err(refused.into());
            }
        };
        // Resuming from another job's checkpoint reads that job: the caller must be allowed to.
        let resume_from = match request.get_ref().resume_from.as_str() {
            "" => None,
            text => {
                let reference: crate::checkpoints::CheckpointRef = text.parse()?;
                self.reader_of(&request, &reference.job_id).await?;
                Some(reference)
            }
        };
        let request = request.into_inner();
        // A submission runs to its end on a task of its own: a client that hangs up while its
        // job's record is being written must not leave the job stored but unknown to the
        // running coordinator (it would appear only after a restart).
        let cluster = self.cluster.clone();
        let job = tokio::spawn(async move {
            cluster
                .submit_job(JobSubmission {
                    spec_toml: request.spec_toml,
                    wait_for_resources: request.wait_for_resources,
                    submitter,
                    resume_from,
                    trial: None,
                })
                .await
        })
        .await
        .map_err(|_| Status::internal("the submission's task ended before its answer"))?;
        let target = job.as_ref().map_or("", |job| job.job_id.as_str());
        self.auth.audit(&caller, "submit", target, &job).await;
        Ok(Response::new(SubmitJobResponse { job: Some(job?) }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        Ok(Response::new(self.reader_of(&request, &job_id).await?))
    }

    async fn get_job_metrics(
        &self,
        request: Request<GetJobMetricsRequest>,
    ) -> Result<Response<JobMetricsResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.reader_of(&request, &job_id).await?;
        let curves = self
            .cluster
            .job_metrics(&job_id, request.get_ref().rank)
            .await?;
        Ok(Response::new(convert::job_metrics_response(&curves)))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = self.allowed(&request, Action::ListJobs)?;
        let request = request.into_inner();
        let page = self
            .cluster
            .jobs(request.page_size, &request.page_token)
            .await?;
        // A user's page lists their own jobs; the next page token still walks every job.
        Ok(Response::new(ListJobsResponse {
            jobs: page
                .jobs
                .into_iter()
                .filter(|job| sees_job(&caller, &job.submitter))
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<JobInfo>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        let caller = self.auth.caller(bearer(&request))?;
        let job = self.cluster.job(&job_id).await?;
        let allowed = authorize(
            &caller,
            Action::CancelJob {
                job_id: &job_id,
                owner: &job.submitter,
            },
        );
        let outcome = match allowed {
            Ok(()) => self.cluster.cancel(&job_id).await,
            Err(error) => Err(error),
        };
        self.auth
            .audit(&caller, "cancel", job_id.as_str(), &outcome)
            .await;
        Ok(Response::new(outcome?))
    }

    type WatchJobStream = ServerStream<JobEvent>;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        // Subscribe before reading the snapshot so that no change falls in between.
        let mut events = self.cluster.subscribe();
        let first = self.reader_of(&request, &job_id).await?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let mut finished = is_final(&first);
            if sender
                .send(Ok(JobEvent { job: Some(first) }))
                .await
                .is_err()
            {
                return;
            }
            while !finished {
                match events.recv().await {
                    Ok(changed) if changed.job_id == job_id => {}
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        debug!(%job_id, skipped, "watcher lagged; reading the job again");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                let Ok(job) = cluster.job(&job_id).await else {
                    return;
                };
                finished = is_final(&job);
                if sender.send(Ok(JobEvent { job: Some(job) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type StreamLogsStream = ServerStream<LogLine>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        let job = self.reader_of(&request, &job_id).await?;
        let request = request.into_inner();
        // Subscribe before reading the file, so that no line falls between the two.
        let mut job_events = self.cluster.subscribe();
        let feed = if request.follow && !is_final(&job) {
            self.cluster.logs().follow(&job_id)
        } else {
            None
        };
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let cluster = self.cluster.clone();
        let rank_filter = request.rank;
        tokio::spawn(async move {
            let seen = match cluster
                .logs()
                .stream_file(&job_id, rank_filter, sender.clone())
                .await
            {
                Ok(seen) => seen,
                Err(error) => {
                    let _ = sender.send(Err(Status::from(error))).await;
                    return;
                }
            };
            let Some(mut feed) = feed else {
                return;
            };
            // A job may have ended between the snapshot and the subscription.
            if cluster.job(&job_id).await.is_ok_and(|job| is_final(&job)) {
                while let Ok(line) = feed.try_recv() {
                    if !forward(&sender, &line, seen, rank_filter).await {
                        return;
                    }
                }
                return;
            }
            loop {
                tokio::select! {
                    line = feed.recv() => match line {
                        Ok(line) => {
                            if !forward(&sender, &line, seen, rank_filter).await {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(skipped)) => {
                            warn!(%job_id, skipped, "log follower fell behind; lines skipped");
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    event = job_events.recv() => match event {
                        Ok(changed) if changed.job_id == job_id && changed.finished => {
                            // Lines shipped before the end are already in the feed: send them.
                            while let Ok(line) = feed.try_recv() {
                                if !forward(&sender, &line, seen, rank_filter).await {
                                    return;
                                }
                            }
                            return;
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.allowed(&request, Action::ListNodes)?;
        Ok(Response::new(ListNodesResponse {
            nodes: self.cluster.nodes().await,
        }))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.reader_of(&request, &job_id).await?;
        let (versions, objective) = self.cluster.checkpoints(&job_id).await?;
        Ok(Response::new(ListCheckpointsResponse {
            checkpoints: convert::checkpoint_infos(&versions, objective),
        }))
    }

    async fn submit_sweep(
        &self,
        request: Request<SubmitSweepRequest>,
    ) -> Result<Response<SweepInfo>, Status> {
        let caller = self.auth.caller(bearer(&request))?;
        let submitter = match (authorize(&caller, Action::Submit), caller.user_name()) {
            (Ok(()), Some(name)) => name.to_owned(),
            (refused, _) => {
                let refused = refused.err().unwrap_or_else(|| {
                    Error::PermissionDenied(format!("{caller} may not submit sweeps"))
                });
                let outcome: Result<(), &Error> = Err(&refused);
                self.auth.audit(&caller, "submit sweep", "", &outcome).await;
                return Err(refused.into());
            }
        };
        let spec_toml = request.into_inner().spec_toml;
        let cluster = self.cluster.clone();
        // Like a job's submission, it runs to its end whether or not the client waits.
        let sweep = tokio::spawn(async move { cluster.submit_sweep(spec_toml, submitter).await })
            .await
            .map_err(|_| Status::internal("the submission's task ended before its answer"))?;
        let target = sweep.as_ref().map_or("", |sweep| sweep.sweep_id.as_str());
        self.auth
            .audit(&caller, "submit sweep", target, &sweep)
            .await;
        Ok(Response::new(sweep?))
    }

    async fn get_sweep(
        &self,
        request: Request<GetSweepRequest>,
    ) -> Result<Response<SweepInfo>, Status> {
        let sweep_id = sweep_id(&request.get_ref().sweep_id)?;
        let caller = self.auth.caller(bearer(&request))?;
        let (sweep, owner) = self.cluster.sweep(&sweep_id).await?;
        authorize(
            &caller,
            Action::ReadSweep {
                sweep_id: &sweep_id,
                owner: &owner,
            },
        )?;
        Ok(Response::new(sweep))
    }

    async fn list_sweeps(
        &self,
        request: Request<ListSweepsRequest>,
    ) -> Result<Response<ListSweepsResponse>, Status> {
        let caller = self.allowed(&request, Action::ListJobs)?;
        let sweeps = self.cluster.sweeps().await;
        Ok(Response::new(ListSweepsResponse {
            sweeps: sweeps
                .into_iter()
                .filter(|sweep| sees_job(&caller, &sweep.submitter))
                .collect(),
        }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<CancelSweepRequest>,
    ) -> Result<Response<SweepInfo>, Status> {
        let sweep_id = sweep_id(&request.get_ref().sweep_id)?;
        let caller = self.auth.caller(bearer(&request))?;
        let outcome = match self.cluster.sweep(&sweep_id).await {
            Ok((_, owner)) => match authorize(
                &caller,
                Action::CancelSweep {
                    sweep_id: &sweep_id,
                    owner: &owner,
                },
            ) {
                Ok(()) => self.cluster.cancel_sweep(&sweep_id).await,
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        self.auth
            .audit(&caller, "cancel sweep", sweep_id.as_str(), &outcome)
            .await;
        Ok(Response::new(outcome?))
    }

    async fn list_queues(
        &self,
        request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        self.allowed(&request, Action::ListQueues)?;
        Ok(Response::new(self.cluster.queues().await))
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<DrainNodeResponse>, Status> {
        let caller = self.auth.caller(bearer(&request))?;
        let request = request.into_inner();
        let outcome = match authorize(&caller, Action::DrainNode) {
            Ok(()) => match cohort_proto::NodeId::new(request.node_id.as_str()) {
                Ok(node_id) => self.cluster.drain(&node_id, request.undo).await,
                Err(error) => Err(Error::from(error)),
            },
            Err(error) => Err(error),
        };
        let what = if request.undo { "undrain" } else { "drain" };
        let target = cohort_proto::text::excerpt(&request.node_id);
        self.auth.audit(&caller, what, &target, &outcome).await;
        Ok(Response::new(outcome?))
    }

    async fn add_user(
        &self,
        request: Request<AddUserRequest>,
    ) -> Result<Response<AddUserResponse>, Status> {
        let caller = self.auth.caller(bearer(&request))?;
        let request = request.into_inner();
        let added = match authorize(&caller, Action::ManageUsers) {
            Ok(()) => {
                self.auth
                    .add_user(&request.name, request.admin, &caller.to_string())
                    .await
            }
            Err(error) => Err(error),
        };
        self.auth
            .audit(&caller, "users add", &request.name, &added)
            .await;
        let (user, token) = added?;
        Ok(Response::new(AddUserResponse {
            user: Some(convert::user_info(&user)),
            token: token.expose().to_owned(),
        }))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.allowed(&request, Action::ManageUsers)?;
        Ok(Response::new(ListUsersResponse {
            users: self.auth.users().iter().map(convert::user_info).collect(),
        }))
    }

    async fn remove_user(
        &self,
        request: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserResponse>, Status> {
        let caller = self.auth.caller(bearer(&request))?;
        let request = request.into_inner();
        let removed = match authorize(&caller, Action::ManageUsers) {
            Ok(()) => self.auth.remove_user(&request.name).await,
            Err(error) => Err(error),
        };
        self.auth
            .audit(&caller, "users remove", &request.name, &removed)
            .await;
        removed?;
        Ok(Response::new(RemoveUserResponse {}))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.allowed(&request, Action::ReadAudit)?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => AUDIT_PAGE,
            limit => (limit as usize).min(AUDIT_PAGE),
        };
        let entries = self.auth.audit_log(request.after_seq, limit).await?;
        Ok(Response::new(ListAuditResponse {
            entries: entries.iter().map(convert::audit_record).collect(),
        }))
    }

    async fn create_dashboard_link(
        &self,
        request: Request<CreateDashboardLinkRequest>,
    ) -> Result<Response<CreateDashboardLinkResponse>, Status> {
        let caller = self.allowed(&request, Action::ListJobs)?;
        if caller.user_name().is_none() {
            return Err(
                Error::PermissionDenied(format!("{caller} may not open the dashboard")).into(),
            );
        }
        let Some(dashboard) = &self.dashboard else {
            return Err(Error::FailedPrecondition(
                "this coordinator serves no dashboard: start it with --http ADDR".to_owned(),
            )
            .into());
        };
        let next = &request.get_ref().next;
        if next.len() > crate::limits::MAX_NAME_BYTES
            || !next
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c))
        {
            return Err(Error::InvalidArgument(format!(
                "next: {}, expected a dashboard path such as /jobs/ID",
                cohort_proto::text::excerpt(next)
            ))
            .into());
        }
        let code = dashboard.logins.issue_code(caller);
        let mut login_path = format!("/login?code={code}");
        if !next.is_empty() {
            login_path.push_str("&next=");
            login_path.push_str(next);
        }
        Ok(Response::new(CreateDashboardLinkResponse {
            login_path,
            http_address: dashboard.address.to_string(),
            tls: dashboard.tls,
        }))
    }
}

/// Sends a followed line unless it was already read from the file (`seq < seen`) or is of
/// another rank; returns false when the follower went away.
async fn forward(
    sender: &mpsc::Sender<Result<LogLine, Status>>,
    line: &SequencedLine,
    seen: u64,
    rank_filter: Option<u32>,
) -> bool {
    if line.seq < seen || rank_filter.is_some_and(|rank| rank != line.line.rank) {
        return true;
    }
    sender.send(Ok(line.line.clone())).await.is_ok()
}

fn is_final(job: &JobInfo) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

#[tonic::async_trait]
impl Membership for CoordinatorService {
    type RegisterStream = ServerStream<Instruction>;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let caller = self.allowed(&request, Action::Join)?;
        let request = request.into_inner();
        let node_id = request.node_id.clone();
        let registered = self.cluster.register(request).await;
        self.auth
            .audit(&caller, "register", &node_id, &registered)
            .await;
        let receiver = registered?;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.allowed(&request, Action::Join)?;
        let accepted = self.cluster.heartbeat(request.into_inner()).await?;
        Ok(Response::new(HeartbeatResponse { accepted }))
    }

    async fn push_logs(
        &self,
        request: Request<PushLogsRequest>,
    ) -> Result<Response<PushLogsResponse>, Status> {
        self.allowed(&request, Action::Join)?;
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        if request.lines.len() > MAX_LOG_LINES_PER_PUSH {
            return Err(Error::InvalidArgument(format!(
                "{} log lines, expected at most {MAX_LOG_LINES_PER_PUSH}",
                request.lines.len()
            ))
            .into());
        }
        // Only the registered worker of a node that runs one of the job's ranks may add to its
        // log, so a stray client cannot fill the disk or forge a rank's output.
        let node_id = cohort_proto::NodeId::new(request.node_id).map_err(Error::from)?;
        self.cluster
            .check_log_source(&node_id, &request.session_id, &job_id)
            .await?;
        self.cluster.logs().append(&job_id, &request.lines)?;
        Ok(Response::new(PushLogsResponse {}))
    }
}

#[tonic::async_trait]
impl Rendezvous for CoordinatorService {
    async fn set(&self, request: Request<KvSetRequest>) -> Result<Response<KvSetResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.cluster
            .check_job_token(&job_id, bearer(&request))
            .await?;
        let request = request.into_inner();
        self.cluster
            .rendezvous()
            .set(&job_id, &request.key, request.value)?;
        Ok(Response::new(KvSetResponse {}))
    }

    async fn get(&self, request: Request<KvGetRequest>) -> Result<Response<KvGetResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.cluster
            .check_job_token(&job_id, bearer(&request))
            .await?;
        let request = request.into_inner();
        let value = self.cluster.rendezvous().get(&job_id, &request.key)?;
        Ok(Response::new(KvGetResponse { value }))
    }

    async fn wait(
        &self,
        request: Request<KvWaitRequest>,
    ) -> Result<Response<KvWaitResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.cluster
            .check_job_token(&job_id, bearer(&request))
            .await?;
        let request = request.into_inner();
        let values = self
            .cluster
            .rendezvous()
            .wait(&job_id, &request.keys, request.timeout_ms)
            .await?;
        Ok(Response::new(KvWaitResponse { values }))
    }

    async fn add(&self, request: Request<KvAddRequest>) -> Result<Response<KvAddResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.cluster
            .check_job_token(&job_id, bearer(&request))
            .await?;
        let request = request.into_inner();
        let value = self
            .cluster
            .rendezvous()
            .add(&job_id, &request.key, request.delta)?;
        Ok(Response::new(KvAddResponse { value }))
    }

    async fn barrier(
        &self,
        request: Request<BarrierRequest>,
    ) -> Result<Response<BarrierResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.cluster
            .check_job_token(&job_id, bearer(&request))
            .await?;
        let request = request.into_inner();
        self.cluster
            .rendezvous()
            .barrier(
                &job_id,
                &request.name,
                request.rank,
                request.world_size,
                request.timeout_ms,
            )
            .await?;
        Ok(Response::new(BarrierResponse {}))
    }

    async fn report_metrics(
        &self,
        request: Request<ReportMetricsRequest>,
    ) -> Result<Response<ReportMetricsResponse>, Status> {
        let job_id = job_id(&request.get_ref().job_id)?;
        self.cluster
            .check_job_token(&job_id, bearer(&request))
            .await?;
        let request = request.into_inner();
        let metrics = request
            .metrics
            .ok_or_else(|| Error::InvalidArgument("metrics: missing".to_owned()))?;
        let report = MetricsReport {
            metrics: convert::metrics_record(&metrics)?,
            progress: convert::collective_progress(&metrics.collectives)?,
            step_times: convert::step_times(&metrics)?,
            checkpoints: convert::checkpoint_report(&metrics)?,
        };
        self.cluster
            .report_metrics(&job_id, metrics.rank, report)
            .await?;
        Ok(Response::new(ReportMetricsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    //! Every service refuses callers without credentials, with unknown ones, and with those of
    //! someone else; each case is one row of the attack table in `docs/security.md`.

    use cohort_proto::v1::instruction::Kind;
    use tonic::Code;

    use super::*;
    use crate::auth::ADMIN_TOKEN_FILE;
    use crate::config::CoordinatorConfig;
    use crate::store::embedded::EmbeddedStore;

    const SPEC: &str =
        "version = 1\nname = \"sleepy\"\nkind = \"command\"\n[command]\nprogram = \"true\"\n";

    struct Fixture {
        service: CoordinatorService,
        cluster: Arc<Cluster>,
        admin: String,
        join: String,
        _data: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let data = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::ClusterStore> =
            Arc::new(EmbeddedStore::open(data.path()).unwrap());
        let auth = Authenticator::load(store.clone(), data.path(), None)
            .await
            .unwrap();
        let config = CoordinatorConfig {
            data_dir: data.path().to_owned(),
            ..CoordinatorConfig::default()
        };
        let cluster = Arc::new(Cluster::load(config, store).await.unwrap());
        let read = |file: &str| {
            std::fs::read_to_string(data.path().join(file))
                .unwrap()
                .trim()
                .to_owned()
        };
        Fixture {
            service: CoordinatorService::new(cluster.clone(), Arc::new(auth)),
            cluster,
            admin: read(ADMIN_TOKEN_FILE),
            join: read(crate::auth::JOIN_TOKEN_FILE),
            _data: data,
        }
    }

    #[tokio::test]
    async fn dashboard_links_go_to_users_of_a_coordinator_that_serves_one() {
        let fixture = fixture().await;
        let request = |next: &str, token: &str| {
            call(
                CreateDashboardLinkRequest {
                    next: next.to_owned(),
                },
                Some(token),
            )
        };
        let none = fixture
            .service
            .create_dashboard_link(request("", &fixture.admin))
            .await
            .unwrap_err();
        assert_eq!(none.code(), Code::FailedPrecondition, "{none}");
        let logins = Arc::new(crate::dashboard::Logins::default());
        let service = fixture.service.clone().with_dashboard(DashboardAccess {
            logins,
            address: "127.0.0.1:8080".parse().unwrap(),
            tls: false,
        });
        let link = service
            .create_dashboard_link(request("/jobs/mlp-1", &fixture.admin))
            .await
            .unwrap()
            .into_inner();
        assert!(link.login_path.starts_with("/login?code="), "{link:?}");
        assert!(link.login_path.ends_with("&next=/jobs/mlp-1"), "{link:?}");
        assert_eq!(link.http_address, "127.0.0.1:8080");
        let worker = service
            .create_dashboard_link(request("", &fixture.join))
            .await
            .unwrap_err();
        assert_eq!(worker.code(), Code::PermissionDenied, "{worker}");
        let elsewhere = service
            .create_dashboard_link(request("https://elsewhere.example/", &fixture.admin))
            .await
            .unwrap_err();
        assert_eq!(elsewhere.code(), Code::InvalidArgument, "{elsewhere}");
    }

    /// `message` as a call carrying `token`, if any.
    fn call<T>(message: T, token: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    impl Fixture {
        async fn add_user(&self, name: &str, admin: bool) -> String {
            let request = AddUserRequest {
                name: name.to_owned(),
                admin,
            };
            let added = self
                .service
                .add_user(call(request, Some(&self.admin)))
                .await
                .unwrap();
            added.into_inner().token
        }

        async fn submit(&self, token: &str) -> Result<String, Status> {
            let request = SubmitJobRequest {
                spec_toml: SPEC.to_owned(),
                wait_for_resources: true,
                resume_from: String::new(),
            };
            let job = self.service.submit_job(call(request, Some(token))).await?;
            Ok(job.into_inner().job.unwrap().job_id)
        }

        /// Registers a one-slot node, places `job_id` on it, and returns the job's token as
        /// the start instruction carried it.
        async fn place(&self, job_id: &str) -> String {
            let request = cohort_cluster_tests::sandbox::one_slot_registration("node-1");
            let mut stream = self
                .service
                .register(call(request, Some(&self.join)))
                .await
                .unwrap()
                .into_inner();
            self.cluster.schedule().await.unwrap();
            for _ in 0..4 {
                let message = futures::StreamExt::next(&mut stream)
                    .await
                    .unwrap()
                    .unwrap();
                if let Some(Kind::StartRank(start)) = message.kind {
                    assert_eq!(start.job_id, job_id);
                    return start.job_token;
                }
            }
            panic!("no start instruction for {job_id}");
        }
    }

    fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
        result.expect_err("refused").code()
    }

    #[tokio::test]
    async fn calls_without_or_with_an_unknown_token_are_unauthenticated() {
        let fixture = fixture().await;
        let service = &fixture.service;
        for token in [None, Some("cohort-user-0000"), Some(""), Some("Basic x")] {
            let list = service
                .list_jobs(call(ListJobsRequest::default(), token))
                .await;
            assert_eq!(code(list), Code::Unauthenticated, "{token:?}");
            let nodes = service.list_nodes(call(ListNodesRequest {}, token)).await;
            assert_eq!(code(nodes), Code::Unauthenticated, "{token:?}");
            let register = service
                .register(call(RegisterRequest::default(), token))
                .await
                .map(|_| ());
            assert_eq!(code(register), Code::Unauthenticated, "{token:?}");
        }
        let submitted = fixture.submit("cohort-user-forged").await;
        assert_eq!(code(submitted), Code::Unauthenticated);
        // The admin's own token works.
        assert!(fixture.submit(&fixture.admin).await.is_ok());
    }

    #[tokio::test]
    async fn a_user_sees_and_cancels_only_their_own_jobs_and_admins_all() {
        let fixture = fixture().await;
        let alice = fixture.add_user("alice", false).await;
        let bob = fixture.add_user("bob", false).await;
        let job = fixture.submit(&alice).await.unwrap();
        let service = &fixture.service;
        let get = |token: &str| {
            service.get_job(call(
                GetJobRequest {
                    job_id: job.clone(),
                },
                Some(token),
            ))
        };
        assert_eq!(get(&alice).await.unwrap().into_inner().submitter, "alice");
        assert_eq!(code(get(&bob).await), Code::PermissionDenied);
        assert!(get(&fixture.admin).await.is_ok());
        let logs = service
            .stream_logs(call(
                StreamLogsRequest {
                    job_id: job.clone(),
                    ..StreamLogsRequest::default()
                },
                Some(&bob),
            ))
            .await
            .map(|_| ());
        assert_eq!(code(logs), Code::PermissionDenied);
        let watch = service
            .watch_job(call(
                WatchJobRequest {
                    job_id: job.clone(),
                },
                Some(&bob),
            ))
            .await
            .map(|_| ());
        assert_eq!(code(watch), Code::PermissionDenied);
        let listed = |token: String| async move {
            let page = service
                .list_jobs(call(ListJobsRequest::default(), Some(&token)))
                .await
                .unwrap();
            page.into_inner().jobs.len()
        };
        assert_eq!(listed(alice.clone()).await, 1);
        assert_eq!(listed(bob.clone()).await, 0);
        assert_eq!(listed(fixture.admin.clone()).await, 1);
        let cancel = |token: &str| {
            service.cancel_job(call(
                CancelJobRequest {
                    job_id: job.clone(),
                },
                Some(token),
            ))
        };
        let refused = cancel(&bob).await;
        assert_eq!(code(refused), Code::PermissionDenied);
        assert!(cancel(&alice).await.is_ok());
    }

    #[tokio::test]
    async fn only_admins_manage_users_and_a_removed_user_is_locked_out_at_once() {
        let fixture = fixture().await;
        let alice = fixture.add_user("alice", false).await;
        let service = &fixture.service;
        let request = AddUserRequest {
            name: "mallory".to_owned(),
            admin: true,
        };
        let escalated = service.add_user(call(request, Some(&alice))).await;
        assert_eq!(code(escalated), Code::PermissionDenied);
        let audit = service
            .list_audit(call(ListAuditRequest::default(), Some(&alice)))
            .await;
        assert_eq!(code(audit), Code::PermissionDenied);
        assert!(fixture.submit(&alice).await.is_ok());
        let remove = RemoveUserRequest {
            name: "alice".to_owned(),
        };
        service
            .remove_user(call(remove, Some(&fixture.admin)))
            .await
            .unwrap();
        assert_eq!(code(fixture.submit(&alice).await), Code::Unauthenticated);
        let last_admin = RemoveUserRequest {
            name: crate::auth::FIRST_ADMIN.to_owned(),
        };
        let refused = service
            .remove_user(call(last_admin, Some(&fixture.admin)))
            .await;
        assert_eq!(code(refused), Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn workers_need_the_join_token_and_users_cannot_act_as_workers() {
        let fixture = fixture().await;
        let alice = fixture.add_user("alice", false).await;
        let service = &fixture.service;
        for token in [alice.as_str(), fixture.admin.as_str()] {
            let register = service
                .register(call(RegisterRequest::default(), Some(token)))
                .await
                .map(|_| ());
            assert_eq!(code(register), Code::PermissionDenied);
            let heartbeat = service
                .heartbeat(call(HeartbeatRequest::default(), Some(token)))
                .await;
            assert_eq!(code(heartbeat), Code::PermissionDenied);
        }
        // The join token opens the membership service, and nothing of job control.
        assert_eq!(
            code(fixture.submit(&fixture.join).await),
            Code::PermissionDenied
        );
    }

    #[tokio::test]
    async fn a_job_token_opens_its_own_rendezvous_alone_and_only_while_it_runs() {
        let fixture = fixture().await;
        let first = fixture.submit(&fixture.admin).await.unwrap();
        let token = fixture.place(&first).await;
        assert!(token.starts_with("cohort-job-"), "{token}");
        let service = &fixture.service;
        let set = |job_id: &str, token: Option<&str>| {
            let request = KvSetRequest {
                job_id: job_id.to_owned(),
                key: "MASTER_ADDR".to_owned(),
                value: b"10.0.0.66".to_vec(),
            };
            service.set(call(request, token))
        };
        assert!(set(&first, Some(&token)).await.is_ok());
        assert_eq!(code(set(&first, None).await), Code::Unauthenticated);
        assert_eq!(
            code(set(&first, Some(&fixture.admin)).await),
            Code::PermissionDenied
        );
        // A second job (queued: the one slot is taken) is not opened by the first's token.
        let second = fixture.submit(&fixture.admin).await.unwrap();
        assert_eq!(
            code(set(&second, Some(&token)).await),
            Code::PermissionDenied
        );
        let metrics = ReportMetricsRequest {
            job_id: second.clone(),
            metrics: Some(RankMetrics::default()),
        };
        let forged = service.report_metrics(call(metrics, Some(&token))).await;
        assert_eq!(code(forged), Code::PermissionDenied);
        // Once the job ends, its token opens nothing.
        service
            .cancel_job(call(
                CancelJobRequest {
                    job_id: first.clone(),
                },
                Some(&fixture.admin),
            ))
            .await
            .unwrap();
        assert_eq!(
            code(set(&first, Some(&token)).await),
            Code::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn mutating_calls_are_audited_refused_or_not() {
        let fixture = fixture().await;
        let alice = fixture.add_user("alice", false).await;
        let bob = fixture.add_user("bob", false).await;
        let job = fixture.submit(&alice).await.unwrap();
        let service = &fixture.service;
        let refused = service
            .cancel_job(call(
                CancelJobRequest {
                    job_id: job.clone(),
                },
                Some(&bob),
            ))
            .await;
        assert_eq!(code(refused), Code::PermissionDenied);
        let _ = service
            .cancel_job(call(
                CancelJobRequest {
                    job_id: job.clone(),
                },
                Some(&fixture.admin),
            ))
            .await
            .unwrap();
        let entries = service
            .list_audit(call(ListAuditRequest::default(), Some(&fixture.admin)))
            .await
            .unwrap()
            .into_inner()
            .entries;
        let seen: Vec<(&str, &str, &str, &str)> = entries
            .iter()
            .map(|e| {
                (
                    e.actor.as_str(),
                    e.action.as_str(),
                    e.target.as_str(),
                    e.outcome.as_str(),
                )
            })
            .collect();
        let refusal = format!(
            "user bob may not cancel job {job}: only the user who submitted it and admins may"
        );
        assert_eq!(
            seen,
            [
                ("user admin", "users add", "alice", "ok"),
                ("user admin", "users add", "bob", "ok"),
                ("user alice", "submit", job.as_str(), "ok"),
                ("user bob", "cancel", job.as_str(), refusal.as_str()),
                ("user admin", "cancel", job.as_str(), "ok"),
            ]
        );
        assert!(entries.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    }

    /// One call of the fuzz property below.
    #[derive(Debug, Clone)]
    enum Fuzzed {
        Set(KvSetRequest),
        Get(KvGetRequest),
        Add(KvAddRequest),
        Wait(KvWaitRequest),
        Barrier(BarrierRequest),
        Metrics(ReportMetricsRequest),
        Submit(SubmitJobRequest),
        Register(RegisterRequest),
        Heartbeat(HeartbeatRequest),
        Logs(PushLogsRequest),
        Drain(DrainNodeRequest),
        Curves(GetJobMetricsRequest),
    }

    fn fuzzed_call(job_id: String) -> impl proptest::strategy::Strategy<Value = Fuzzed> {
        use proptest::prelude::*;
        // Mostly the placed job (so calls reach the store), sometimes anything.
        let job = prop_oneof![4 => Just(job_id), 1 => "\\PC{0,80}"];
        let key = prop_oneof![
            Just("__barrier/b".to_owned()),
            Just("counter".to_owned()),
            "[a-z/_]{0,12}",
            "\\PC{0,300}",
        ];
        let number = prop_oneof![Just(0u32), Just(1), Just(2), Just(u32::MAX), any::<u32>()];
        let big = prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(i64::MAX - 1),
            any::<i64>(),
            -3i64..3
        ];
        let value = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            big.clone().prop_map(|n| n.to_string().into_bytes()),
        ];
        let float = prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-1.0),
            any::<f64>()
        ];
        let text = "\\PC{0,200}";
        prop_oneof![
            (job.clone(), key.clone(), value)
                .prop_map(|(job_id, key, value)| Fuzzed::Set(KvSetRequest { job_id, key, value })),
            (job.clone(), key.clone())
                .prop_map(|(job_id, key)| Fuzzed::Get(KvGetRequest { job_id, key })),
            (job.clone(), key.clone(), big)
                .prop_map(|(job_id, key, delta)| Fuzzed::Add(KvAddRequest { job_id, key, delta })),
            (
                job.clone(),
                prop::collection::vec(key.clone(), 0..4),
                0u32..3
            )
                .prop_map(|(job_id, keys, timeout_ms)| Fuzzed::Wait(KvWaitRequest {
                    job_id,
                    keys,
                    timeout_ms
                })),
            (
                job.clone(),
                prop_oneof![Just("b".to_owned()), key],
                number.clone(),
                number.clone(),
                0u32..3
            )
                .prop_map(|(job_id, name, rank, world_size, timeout_ms)| {
                    Fuzzed::Barrier(BarrierRequest {
                        job_id,
                        name,
                        rank,
                        world_size,
                        timeout_ms,
                    })
                }),
            (
                job.clone(),
                number.clone(),
                any::<u64>(),
                float.clone(),
                float,
                prop::collection::btree_map("\\PC{0,40}", any::<f64>(), 0..4)
            )
                .prop_map(|(job_id, rank, step, loss, accuracy, extra)| {
                    Fuzzed::Metrics(ReportMetricsRequest {
                        job_id,
                        metrics: Some(RankMetrics {
                            rank,
                            step,
                            total_steps: step,
                            loss,
                            eval_accuracy: Some(accuracy),
                            extra: extra.into_iter().collect(),
                            ..RankMetrics::default()
                        }),
                    })
                }),
            prop_oneof![
                text.prop_map(|text| text.to_owned()),
                Just(SPEC.to_owned()),
                "[a-z_]{1,12}".prop_map(|field| format!("{SPEC}{field} = 1\n")),
            ]
            .prop_map(|spec_toml| Fuzzed::Submit(SubmitJobRequest {
                spec_toml,
                wait_for_resources: false,
                resume_from: String::new(),
            })),
            (text, text, number.clone(), any::<u64>()).prop_map(
                |(node_id, address, index, memory)| {
                    Fuzzed::Register(RegisterRequest {
                        node_id,
                        hostname: "fuzz".to_owned(),
                        address,
                        devices: vec![Device {
                            kind: i32::from(index % 3 == 0),
                            index,
                            memory_total_bytes: memory,
                            ..Device::default()
                        }],
                        ..RegisterRequest::default()
                    })
                }
            ),
            (text, text, number.clone()).prop_map(|(node_id, session_id, rank)| {
                Fuzzed::Heartbeat(HeartbeatRequest {
                    node_id,
                    session_id,
                    ranks: vec![RankReport {
                        rank,
                        ..RankReport::default()
                    }],
                    leaving: rank % 2 == 0,
                })
            }),
            (text, job.clone(), text, number.clone()).prop_map(|(node_id, job_id, text, rank)| {
                Fuzzed::Logs(PushLogsRequest {
                    node_id,
                    job_id,
                    lines: vec![LogLine {
                        rank,
                        text,
                        ..LogLine::default()
                    }],
                    ..PushLogsRequest::default()
                })
            }),
            (prop_oneof![Just("node-a".to_owned()), text], any::<bool>())
                .prop_map(|(node_id, undo)| Fuzzed::Drain(DrainNodeRequest { node_id, undo })),
            (job, proptest::option::of(number)).prop_map(|(job_id, rank)| {
                Fuzzed::Curves(GetJobMetricsRequest { job_id, rank })
            }),
        ]
    }

    /// Every RPC, fed arbitrary sequences of requests by the holders of real credentials (a
    /// running job's token, an admin, the join token): each is answered or refused with a
    /// caller's error code and a short message, and nothing panics. A few thousand sequences
    /// by default (`PROPTEST_CASES` for more); the store persists across them, so later calls
    /// meet what earlier ones left (a barrier meets the counter a `Set` wrote).
    #[test]
    fn arbitrary_requests_are_answered_or_refused_with_a_short_reason() {
        use proptest::test_runner::{Config, TestRunner};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (fixture, job_id, job_token) = runtime.block_on(async {
            let fixture = fixture().await;
            let admin = fixture.admin.clone();
            let job_id = fixture.submit(&admin).await.unwrap();
            let token = fixture.place(&job_id).await;
            (fixture, job_id, token)
        });
        let mut runner = TestRunner::new(Config::with_cases(cohort_proto::fuzz_cases()));
        let service = &fixture.service;
        let calls = proptest::collection::vec(fuzzed_call(job_id), 1..8);
        runner
            .run(&calls, |calls| {
                let (job, admin, join) = (
                    Some(job_token.as_str()),
                    Some(fixture.admin.as_str()),
                    Some(fixture.join.as_str()),
                );
                for fuzzed in calls {
                    let answer: Result<(), Status> = runtime.block_on(async {
                        match fuzzed {
                            Fuzzed::Set(r) => service.set(call(r, job)).await.map(drop),
                            Fuzzed::Get(r) => service.get(call(r, job)).await.map(drop),
                            Fuzzed::Add(r) => service.add(call(r, job)).await.map(drop),
                            Fuzzed::Wait(r) => service.wait(call(r, job)).await.map(drop),
                            Fuzzed::Barrier(r) => service.barrier(call(r, job)).await.map(drop),
                            Fuzzed::Metrics(r) => {
                                service.report_metrics(call(r, job)).await.map(drop)
                            }
                            Fuzzed::Submit(r) => service.submit_job(call(r, admin)).await.map(drop),
                            Fuzzed::Register(r) => service.register(call(r, join)).await.map(drop),
                            Fuzzed::Heartbeat(r) => {
                                service.heartbeat(call(r, join)).await.map(drop)
                            }
                            Fuzzed::Logs(r) => service.push_logs(call(r, join)).await.map(drop),
                            Fuzzed::Drain(r) => service.drain_node(call(r, admin)).await.map(drop),
                            Fuzzed::Curves(r) => {
                                service.get_job_metrics(call(r, admin)).await.map(drop)
                            }
                        }
                    });
                    if let Err(status) = answer {
                        proptest::prop_assert!(
                            !matches!(
                                status.code(),
                                Code::Internal
                                    | Code::Unknown
                                    | Code::Unimplemented
                                    | Code::DataLoss
                            ),
                            "{status:?}"
                        );
                        proptest::prop_assert!(!status.message().is_empty());
                        proptest::prop_assert!(
                            status.message().len() <= cohort_proto::text::MAX_ERROR_BYTES,
                            "{} bytes",
                            status.message().len()
                        );
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    #[tokio::test]
    async fn a_barrier_whose_counter_was_set_near_the_largest_value_is_refused() {
        let fixture = fixture().await;
        let admin = fixture.admin.clone();
        let job_id = fixture.submit(&admin).await.unwrap();
        let token = fixture.place(&job_id).await;
        let set = KvSetRequest {
            job_id: job_id.clone(),
            key: "__barrier/b".to_owned(),
            value: (i64::MAX - 1).to_string().into_bytes(),
        };
        fixture.service.set(call(set, Some(&token))).await.unwrap();
        let barrier = BarrierRequest {
            job_id,
            name: "b".to_owned(),
            rank: 0,
            world_size: 2,
            timeout_ms: 10,
        };
        let status = fixture
            .service
            .barrier(call(barrier, Some(&token)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("too large"),
            "{}",
            status.message()
        );
    }
}
