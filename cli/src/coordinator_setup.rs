//! Making a coordinator ready to serve: its listener bound, its store opened (with etcd, once
//! it leads its group), its users and join token loaded. `cohort coordinator`, `cohort up` and
//! the benchmarks' local clusters share it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use cohort_coordinator::auth::{self, Authenticator};
use cohort_coordinator::{CoordinatorConfig, StoreLocation};
use cohort_proto::Secret;
use tokio::net::TcpListener;

/// Binds `listen` (writing the bound address to `address_file`, when given, at once: a
/// standby answers there too) and `http` (the HTTP endpoint, served once it leads), opens the store at `location` (with etcd, after winning the
/// leadership) and loads the users: a coordinator of `config` ready to serve.
pub async fn prepare(
    config: CoordinatorConfig,
    location: &StoreLocation,
    listen: &str,
    address_file: Option<&Path>,
    http: Option<&str>,
) -> Result<PreparedCoordinator> {
    let listener = Arc::new(
        TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?,
    );
    let http = match http {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("listening on {address} (--http)"))?,
        ),
        None => None,
    };
    if let Some(path) = address_file {
        write_atomically(path, &listener.local_addr()?.to_string())?;
    }
    let (store, leadership) = cohort_coordinator::open_store(location, &config, &listener).await?;
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
    Ok(PreparedCoordinator {
        config,
        store,
        auth: Arc::new(auth),
        listener,
        http,
        leadership,
        join_token,
        admin_token,
    })
}

/// Writes `contents` to `path` atomically (temporary file, then rename), so that a reader
/// polling for the file never sees it half written.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
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
    pub listener: Arc<TcpListener>,
    /// Its bound HTTP listener (`--http`), if any.
    pub http: Option<TcpListener>,
    /// Its leadership of the coordinators sharing its etcd store; `None` with the embedded
    /// store.
    pub leadership: Option<cohort_coordinator::Leadership>,
    /// The token its workers must show.
    pub join_token: Secret,
    /// The first admin's token, while `<data-dir>/admin-token` holds it.
    pub admin_token: Option<Secret>,
}
