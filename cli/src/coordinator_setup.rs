//! Making a coordinator ready to serve: its store opened, its users and join token loaded and
//! its listener bound. `cohort coordinator`, `cohort up` and the benchmarks' local clusters
//! share it.

use std::sync::Arc;

use anyhow::{Context, Result};
use cohort_coordinator::auth::{self, Authenticator};
use cohort_coordinator::{CoordinatorConfig, StoreLocation};
use cohort_proto::Secret;
use tokio::net::TcpListener;

/// Opens the store at `location`, loads the users and binds `listen`: a coordinator of
/// `config` ready to serve.
pub async fn prepare(
    config: CoordinatorConfig,
    location: &StoreLocation,
    listen: &str,
) -> Result<PreparedCoordinator> {
    let store = cohort_coordinator::open_store(location, &config).await?;
    // Before the listener: the first admin's token and the join token are in their files
    // before anyone can connect.
    let auth =
        Authenticator::load(store.clone(), &config.data_dir, config.join_token.as_ref()).await?;
    let join_token = match &config.join_token {
        Some(token) => token.clone(),
        None => auth::read_secret_file(&config.data_dir.join(auth::JOIN_TOKEN_FILE))?
            .context("the join token file is missing")?,
    };
    let admin_token = auth::read_secret_file(&config.data_dir.join(auth::ADMIN_TOKEN_FILE))?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    Ok(PreparedCoordinator {
        config,
        store,
        auth: Arc::new(auth),
        listener,
        join_token,
        admin_token,
    })
}

/// A coordinator ready to serve: what [`cohort_coordinator::run`] takes.
pub struct PreparedCoordinator {
    /// Its settings.
    pub config: CoordinatorConfig,
    /// Its store.
    pub store: Arc<dyn cohort_coordinator::ClusterStore>,
    /// Its users and join token.
    pub auth: Arc<Authenticator>,
    /// Its bound listener.
    pub listener: TcpListener,
    /// The token its workers must show.
    pub join_token: Secret,
    /// The first admin's token, while `<data-dir>/admin-token` holds it.
    pub admin_token: Option<Secret>,
}
