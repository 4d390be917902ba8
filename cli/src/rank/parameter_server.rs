//! `cohort rank` as the parameter server of one shard of a `comm = "ps"` job: restores the
//! shard from the checkpoint being resumed (if it holds the shard's snapshot), listens on the
//! node's address, publishes that address in the job's rendezvous store and serves until the
//! worker stops it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cohort_collective::Store;
use cohort_parameter_server::{ServerConfig, ShardServer};
use cohort_parameter_server::{serve_shard, shard_address_key};
use cohort_proto::transport::ServerTls;
use cohort_trainer::TrainConfig;
use cohort_trainer::checkpoint::read_parameter_server_snapshot;
use cohort_trainer::parameter_server::server_config;
use tokio::signal::unix::{SignalKind, signal};

use super::RankLink;

/// Serves shard `shard` of `shards` until SIGTERM or SIGINT.
pub fn serve(link: &RankLink, config: &TrainConfig, shard: u32, shards: u32) -> Result<ExitCode> {
    let job_id = link.launch.place.job_id.clone();
    let server_config = ServerConfig {
        // Only the job's own ranks reach the shard.
        token: link.launch.place.job_token.clone(),
        // On a TLS cluster the node's certificate, which the job's ranks verify.
        tls: link
            .launch
            .node
            .tls
            .as_ref()
            .map(|files| ServerTls::read(&files.certificate, &files.key))
            .transpose()?,
        ..server_config(config, job_id, shard, shards)
    };
    let server = restore_or_create(config, server_config)?;
    let node_address = link.node_address;
    let listener = std::net::TcpListener::bind(SocketAddr::new(node_address, 0))
        .with_context(|| format!("binding shard {shard}'s listener on {node_address}"))?;
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    let address = listener
        .local_addr()
        .context("reading the listener's address")?;
    // The scheme tells the job's ranks to speak TLS to the shard.
    let published = if server.config().tls.is_some() {
        format!("https://{address}")
    } else {
        address.to_string()
    };
    link.store
        .set(&shard_address_key(shard), published.as_bytes())
        .with_context(|| format!("publishing shard {shard}'s address"))?;
    tracing::info!(shard, shards, address = %published, "parameter server listening");
    link.runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).context("registering the listener")?;
        let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        serve_shard(Arc::new(server), listener, shutdown)
            .await
            .with_context(|| format!("serving shard {shard}"))
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Restores the shard from the snapshot in the checkpoint being resumed, or creates it empty
/// (rank 0 then initialises it).
fn restore_or_create(config: &TrainConfig, server_config: ServerConfig) -> Result<ShardServer> {
    let shard = server_config.shard_id;
    if let Some(path) = config.resume_path()
        && let Some(snapshot) = read_parameter_server_snapshot(&path, shard)?
    {
        tracing::info!(shard, checkpoint = %path.display(), "restoring the shard");
        return ShardServer::from_snapshot(server_config, &snapshot)
            .with_context(|| format!("restoring shard {shard} from {}", path.display()));
    }
    ShardServer::new(server_config).with_context(|| format!("configuring shard {shard}"))
}
