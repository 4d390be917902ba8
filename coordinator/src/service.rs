//! The gRPC services. Each handler decodes its request, calls [`Cluster`], and encodes the
//! answer; errors become `tonic::Status` in one place (`impl From<Error> for Status`).

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

use crate::cluster::Cluster;
use crate::convert;
use crate::error::Error;
use crate::limits::MAX_LOG_LINES_PER_PUSH;
use crate::logs::SequencedLine;

/// A server stream of `T`.
type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How many messages a streaming handler buffers for a slow client.
const STREAM_BUFFER: usize = 256;

fn job_id(text: &str) -> Result<JobId, Status> {
    JobId::new(text).map_err(|e| Status::from(Error::from(e)))
}

/// Serves [`JobControl`] (the CLI), [`Membership`] (workers) and [`Rendezvous`] (ranks).
#[derive(Clone)]
pub struct CoordinatorService {
    /// The domain core.
    cluster: Arc<Cluster>,
}

impl CoordinatorService {
    /// Wraps the cluster.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl JobControl for CoordinatorService {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        // Until clients authenticate, a submitter is the address it connects from.
        let submitter = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |address| address.ip().to_string());
        let request = request.into_inner();
        // A submission runs to its end on a task of its own: a client that hangs up while its
        // job's record is being written must not leave the job stored but unknown to the
        // running coordinator (it would appear only after a restart).
        let cluster = self.cluster.clone();
        let job = tokio::spawn(async move {
            cluster
                .submit(request.spec_toml, request.wait_for_resources, submitter)
                .await
        })
        .await
        .map_err(|_| Status::internal("the submission's task ended before its answer"))??;
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        let job_id = job_id(&request.into_inner().job_id)?;
        Ok(Response::new(self.cluster.job(&job_id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        let page = self
            .cluster
            .jobs(request.page_size, &request.page_token)
            .await?;
        Ok(Response::new(ListJobsResponse {
            jobs: page.jobs,
            next_page_token: page.next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<JobInfo>, Status> {
        let job_id = job_id(&request.into_inner().job_id)?;
        Ok(Response::new(self.cluster.cancel(&job_id).await?))
    }

    type WatchJobStream = ServerStream<JobEvent>;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = job_id(&request.into_inner().job_id)?;
        // Subscribe before reading the snapshot so that no change falls in between.
        let mut events = self.cluster.subscribe();
        let first = self.cluster.job(&job_id).await?;
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
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        let job = self.cluster.job(&job_id).await?;
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
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse {
            nodes: self.cluster.nodes().await,
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
        let receiver = self.cluster.register(request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let accepted = self.cluster.heartbeat(request.into_inner()).await?;
        Ok(Response::new(HeartbeatResponse { accepted }))
    }

    async fn push_logs(
        &self,
        request: Request<PushLogsRequest>,
    ) -> Result<Response<PushLogsResponse>, Status> {
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
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        self.cluster.check_live(&job_id).await?;
        self.cluster
            .rendezvous()
            .set(&job_id, &request.key, request.value)?;
        Ok(Response::new(KvSetResponse {}))
    }

    async fn get(&self, request: Request<KvGetRequest>) -> Result<Response<KvGetResponse>, Status> {
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        self.cluster.check_live(&job_id).await?;
        let value = self.cluster.rendezvous().get(&job_id, &request.key)?;
        Ok(Response::new(KvGetResponse { value }))
    }

    async fn wait(
        &self,
        request: Request<KvWaitRequest>,
    ) -> Result<Response<KvWaitResponse>, Status> {
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        self.cluster.check_live(&job_id).await?;
        let values = self
            .cluster
            .rendezvous()
            .wait(&job_id, &request.keys, request.timeout_ms)
            .await?;
        Ok(Response::new(KvWaitResponse { values }))
    }

    async fn add(&self, request: Request<KvAddRequest>) -> Result<Response<KvAddResponse>, Status> {
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        self.cluster.check_live(&job_id).await?;
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
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        self.cluster.check_live(&job_id).await?;
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
        let request = request.into_inner();
        let job_id = job_id(&request.job_id)?;
        let metrics = request
            .metrics
            .ok_or_else(|| Error::InvalidArgument("metrics: missing".to_owned()))?;
        let record = convert::metrics_record(&metrics)?;
        self.cluster
            .report_metrics(&job_id, record, metrics.rank)
            .await?;
        Ok(Response::new(ReportMetricsResponse {}))
    }
}
