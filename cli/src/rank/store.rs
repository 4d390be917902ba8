//! The collective crate's rendezvous [`Store`], served by the coordinator's per-job key-value
//! service over gRPC. Calls block the calling (training) thread on a small runtime of their own.

use cohort_proto::failover::CoordinatorConnection;
use std::time::Duration;

use cohort_collective::{Error, Result, Store};
use cohort_proto::v1::rendezvous_client::RendezvousClient;
use cohort_proto::v1::{KvAddRequest, KvGetRequest, KvSetRequest, KvWaitRequest};
use tokio::runtime::Handle;

/// Longest single wait the coordinator accepts; longer waits are split.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A job's rendezvous store on the coordinator.
pub struct GrpcStore {
    /// Runtime the calls run on (not the caller's: the caller is a plain thread).
    runtime: Handle,
    /// Client of the coordinator's rendezvous service.
    client: RendezvousClient<CoordinatorConnection>,
    /// The job whose keys these are.
    job_id: String,
}

impl GrpcStore {
    /// Wraps a connected client for `job_id`.
    pub fn new(
        runtime: Handle,
        client: RendezvousClient<CoordinatorConnection>,
        job_id: String,
    ) -> Self {
        Self {
            runtime,
            client,
            job_id,
        }
    }

    fn error(status: tonic::Status) -> Error {
        Error::Store {
            message: status.message().to_owned(),
        }
    }
}

impl Store for GrpcStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut client = self.client.clone();
        let request = KvSetRequest {
            job_id: self.job_id.clone(),
            key: key.to_owned(),
            value: value.to_vec(),
        };
        self.runtime
            .block_on(client.set(request))
            .map_err(Self::error)?;
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut client = self.client.clone();
        let request = KvGetRequest {
            job_id: self.job_id.clone(),
            key: key.to_owned(),
        };
        let response = self
            .runtime
            .block_on(client.get(request))
            .map_err(Self::error)?;
        Ok(response.into_inner().value)
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let mut client = self.client.clone();
        let request = KvWaitRequest {
            job_id: self.job_id.clone(),
            keys: keys.iter().map(|key| (*key).to_owned()).collect(),
            timeout_ms: timeout.min(MAX_WAIT).as_millis().max(1) as u32,
        };
        match self.runtime.block_on(client.wait(request)) {
            Ok(response) => Ok(response.into_inner().values),
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(Error::StoreTimeout {
                    keys: keys.iter().map(|key| (*key).to_owned()).collect(),
                    timeout,
                })
            }
            Err(status) => Err(Self::error(status)),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut client = self.client.clone();
        let request = KvAddRequest {
            job_id: self.job_id.clone(),
            key: key.to_owned(),
            delta,
        };
        let response = self
            .runtime
            .block_on(client.add(request))
            .map_err(Self::error)?;
        Ok(response.into_inner().value)
    }
}
