//! Shared by the integration tests: shard servers on `127.0.0.1:0` in this process, served over
//! real gRPC, and clients for them.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cohort_parameter_server::{
    ClientConfig, ParameterClient, ServerConfig, ShardServer, ShardStatus, TensorDeclaration,
    serve_shard,
};
use cohort_proto::JobId;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The job id every test cluster uses.
pub fn job_id() -> JobId {
    JobId::new("ps-test-1").unwrap()
}

/// S shard servers of one job, each served on its own loopback listener.
pub struct TestShards {
    /// The servers, by shard id (for inspection).
    pub servers: Vec<Arc<ShardServer>>,
    /// Their addresses, by shard id.
    pub addresses: Vec<String>,
    /// Stops each server.
    stops: Vec<oneshot::Sender<()>>,
}

impl TestShards {
    /// Starts `shard_count` shards configured like `base` (job id, shard id and count set
    /// here).
    pub async fn start(base: &ServerConfig, shard_count: u32) -> Self {
        let servers = (0..shard_count)
            .map(|shard_id| {
                let config = ServerConfig {
                    job_id: job_id(),
                    shard_id,
                    shard_count,
                    ..base.clone()
                };
                Arc::new(ShardServer::new(config).unwrap())
            })
            .collect();
        Self::serve(servers).await
    }

    /// Serves existing shard servers (for example restored from snapshots).
    pub async fn serve(servers: Vec<Arc<ShardServer>>) -> Self {
        let mut addresses = Vec::new();
        let mut stops = Vec::new();
        for server in &servers {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addresses.push(listener.local_addr().unwrap().to_string());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            tokio::spawn(serve_shard(server.clone(), listener, async {
                let _ = stopped.await;
            }));
        }
        Self {
            servers,
            addresses,
            stops,
        }
    }

    /// Connects a client for `rank`.
    pub async fn client(&self, rank: u32, tensors: &[TensorDeclaration]) -> ParameterClient {
        self.client_with(
            ClientConfig {
                job_id: job_id(),
                rank,
                ..ClientConfig::default()
            },
            tensors,
        )
        .await
    }

    /// Connects a client with its own configuration.
    pub async fn client_with(
        &self,
        config: ClientConfig,
        tensors: &[TensorDeclaration],
    ) -> ParameterClient {
        ParameterClient::connect(config, &self.addresses, tensors.to_vec())
            .await
            .unwrap()
    }

    /// Polls every shard's status (a few times per millisecond, never a fixed sleep standing in
    /// for synchronisation) until `condition` holds for all of them, for at most 20 s.
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&ShardStatus) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut all = true;
            for server in &self.servers {
                all &= condition(&server.status().await);
            }
            if all {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.servers[0].status().await
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Stops every server.
    pub fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
    }
}

/// Largest of `|a - b| / max(1, |b|)` over two equally long slices.
pub fn max_relative_difference(got: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(got.len(), expected.len());
    got.iter()
        .zip(expected)
        .map(|(&got, &expected)| (f64::from(got) - expected).abs() / expected.abs().max(1.0))
        .fold(0.0, f64::max)
}
