//! Authentication and access control: who is calling ([`Authenticator`]), and whether they may
//! ([`access`]).
//!
//! Every call carries a bearer token (`authorization: Bearer ...`):
//! - a **user's** token (`cohort users add`), for the job-control API;
//! - the cluster's **join token**, for workers (`--join-token-file`; without one the
//!   coordinator draws one into `<data-dir>/join-token`, readable by its owner alone);
//! - a **job's** token, issued when the job is placed and handed to its processes in the
//!   launch contract (`COHORT_JOB_TOKEN`), for that job's rendezvous and metrics while it runs.
//!
//! Only hashes of user and job tokens are stored ([`token`]). The first start on an empty store
//! creates the user `admin` and writes its token to `<data-dir>/admin-token` (mode 0600), which
//! `cohort up` turns into the credentials file of the OS user who ran it.

pub mod access;
pub mod records;
pub mod token;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use cohort_proto::Secret;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::model::now_ms;
use crate::store::ClusterStore;
pub use access::{Action, Caller, authorize};
use records::{AuditEntry, UserRecord, valid_user_name};
use token::{TokenHash, TokenKind};

/// File under the data directory holding the first admin's token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// File under the data directory holding the join token the coordinator drew itself.
pub const JOIN_TOKEN_FILE: &str = "join-token";
/// Name of the user created on an empty store.
pub const FIRST_ADMIN: &str = "admin";

/// Knows the cluster's users and join token; turns a call's token into a [`Caller`].
pub struct Authenticator {
    store: Arc<dyn ClusterStore>,
    /// Users by their token's hash. Read on every call, written on user changes.
    users: RwLock<HashMap<TokenHash, UserRecord>>,
    /// The join token's hash.
    join: TokenHash,
}

impl Authenticator {
    /// Loads the users from `store` and takes the join token: `join_token` when given, else
    /// the one under `data_dir` (drawn and written there on first start). On an empty store,
    /// creates the first admin and writes its token to `<data_dir>/admin-token`.
    pub async fn load(
        store: Arc<dyn ClusterStore>,
        data_dir: &Path,
        join_token: Option<&Secret>,
    ) -> Result<Self> {
        let join = match join_token {
            Some(token) => token.clone(),
            None => read_or_create_secret(&data_dir.join(JOIN_TOKEN_FILE), TokenKind::Join)?,
        };
        let join_hash = token::hash(join.expose());
        check_shared_join_token(store.as_ref(), &join_hash).await?;
        let users = store
            .list_users()
            .await?
            .into_iter()
            .map(|user| (user.token_hash, user))
            .collect::<HashMap<_, _>>();
        let authenticator = Self {
            store,
            users: RwLock::new(users),
            join: join_hash,
        };
        if authenticator.users.read().expect("users lock").is_empty() {
            let (_, token) = authenticator
                .add_user(FIRST_ADMIN, true, "the coordinator's first start")
                .await?;
            let path = data_dir.join(ADMIN_TOKEN_FILE);
            write_secret(&path, &token)?;
            info!(path = %path.display(), user = FIRST_ADMIN, "created the first admin; its token is in the file");
        }
        Ok(authenticator)
    }

    /// The caller a user's or worker's `token` identifies, or why none.
    pub fn caller(&self, token: Option<&str>) -> Result<Caller> {
        let token = token.ok_or_else(|| {
            Error::Unauthenticated(
                "no credentials: give a token with --token, COHORT_TOKEN or a credentials file \
                 (`cohort users add` makes one)"
                    .to_owned(),
            )
        })?;
        let hash = token::hash(token);
        if token::constant_time_eq(&hash, &self.join) {
            return Ok(Caller::Worker);
        }
        match self.users.read().expect("users lock").get(&hash) {
            Some(user) => Ok(Caller::User {
                name: user.name.clone(),
                admin: user.admin,
            }),
            None => Err(Error::Unauthenticated(
                "unknown token: it was never issued by this cluster, or its user was removed"
                    .to_owned(),
            )),
        }
    }

    /// Adds user `name` (`created_by` an admin) and returns them with their new token.
    pub async fn add_user(
        &self,
        name: &str,
        admin: bool,
        created_by: &str,
    ) -> Result<(UserRecord, Secret)> {
        valid_user_name(name)
            .map_err(|problem| Error::InvalidArgument(format!("user name: {problem}")))?;
        if self.users().iter().any(|user| user.name == name) {
            return Err(Error::FailedPrecondition(format!(
                "user {name} exists; remove it first to issue a new token"
            )));
        }
        let token = token::issue(TokenKind::User);
        let user = UserRecord {
            name: name.to_owned(),
            admin,
            token_hash: token::hash(token.expose()),
            created_at_ms: now_ms(),
            created_by: created_by.to_owned(),
        };
        self.store.put_user(&user).await?;
        self.users
            .write()
            .expect("users lock")
            .insert(user.token_hash, user.clone());
        Ok((user, token))
    }

    /// Removes user `name`: their token stops working before this returns. Refuses to remove
    /// the last admin, which would lock everyone out of user management.
    pub async fn remove_user(&self, name: &str) -> Result<()> {
        let users = self.users();
        let Some(user) = users.iter().find(|user| user.name == name) else {
            return Err(Error::InvalidArgument(format!("no user named {name}")));
        };
        if user.admin && users.iter().filter(|other| other.admin).count() == 1 {
            return Err(Error::FailedPrecondition(format!(
                "{name} is the last admin; add another admin first"
            )));
        }
        // Out of memory first: from here on the token opens nothing, even if the store write
        // fails (the user then reappears after a restart, and removing again finishes it).
        self.users
            .write()
            .expect("users lock")
            .remove(&user.token_hash);
        self.store.remove_user(name).await?;
        Ok(())
    }

    /// Every user, sorted by name.
    pub fn users(&self) -> Vec<UserRecord> {
        let mut users: Vec<_> = self
            .users
            .read()
            .expect("users lock")
            .values()
            .cloned()
            .collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        users
    }

    /// Audit entries after `after_seq`, at most `limit`, oldest first.
    pub async fn audit_log(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        self.store.list_audit(after_seq, limit).await
    }

    /// Records a mutating call in the audit log. A failed write is logged, not returned: the
    /// call itself already happened.
    pub async fn audit<T, E: std::fmt::Display>(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        outcome: &std::result::Result<T, E>,
    ) {
        let outcome = match outcome {
            Ok(_) => "ok".to_owned(),
            Err(error) => error.to_string(),
        };
        let entry = AuditEntry {
            seq: 0,
            at_ms: now_ms(),
            actor: caller.to_string(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome,
        };
        if let Err(error) = self.store.append_audit(entry).await {
            warn!(%error, %caller, action, target, "could not write the audit log");
        }
    }
}

/// File under the data directory holding the key job tokens are derived under.
pub const JOB_KEY_FILE: &str = "job-key";

/// Name of the shared setting holding the job key ([`ClusterStore::shared_setting`]).
const JOB_KEY_SETTING: &str = "job_key";

/// Name of the shared setting holding the join token's hash.
const JOIN_TOKEN_SETTING: &str = "join_token_sha256";

/// The cluster's job tokens: under the key the store shares between coordinators (etcd: every
/// coordinator of a group must check the tokens any of them issued), else under the key in
/// `<data_dir>/job-key` (drawn and written there, mode 0600, on first start).
pub async fn load_job_tokens(
    data_dir: &Path,
    store: &dyn ClusterStore,
) -> Result<token::JobTokens> {
    let drawn = token::JobTokens::generate();
    if let Some(shared) = store
        .shared_setting(JOB_KEY_SETTING, drawn.key_hex().as_bytes())
        .await?
    {
        return std::str::from_utf8(&shared)
            .ok()
            .and_then(token::JobTokens::from_hex)
            .ok_or_else(|| {
                Error::Store(format!(
                    "the shared setting {JOB_KEY_SETTING} does not hold a job key (64 \
                     hexadecimal digits)"
                ))
            });
    }
    let path = data_dir.join(JOB_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => token::JobTokens::from_hex(&text).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} does not hold a job key (64 hexadecimal digits); remove it to draw a new \
                 one (running jobs then lose their rendezvous)",
                path.display()
            ))
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            write_secret(&path, &Secret::new(drawn.key_hex()))?;
            Ok(drawn)
        }
        Err(error) => Err(Error::io(format!("reading {}", path.display()), error)),
    }
}

/// Refuses to serve with a join token other than the one the store's other coordinators use
/// (the first coordinator of a group records its hash): workers registered with one would be
/// refused by the other after a failover.
async fn check_shared_join_token(store: &dyn ClusterStore, join: &TokenHash) -> Result<()> {
    let ours = token::hex(join);
    match store
        .shared_setting(JOIN_TOKEN_SETTING, ours.as_bytes())
        .await?
    {
        Some(shared) if shared != ours.as_bytes() => Err(Error::InvalidArgument(
            "this coordinator's join token is not the one the other coordinators of its \
             cluster use (the first to start recorded it in the store): give every \
             coordinator the same --join-token-file"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

/// Reads a secret written by [`write_secret`] (trimmed); `None` when the file does not exist.
pub fn read_secret_file(path: &Path) -> Result<Option<Secret>> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(Secret::new(text.trim()))),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "{} is empty",
            path.display()
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(Error::io(format!("reading {}", path.display()), error)),
    }
}

/// Reads the secret in `path`, or draws one of `kind` and writes it there (mode 0600).
fn read_or_create_secret(path: &Path, kind: TokenKind) -> Result<Secret> {
    if let Some(secret) = read_secret_file(path)? {
        return Ok(secret);
    }
    let secret = token::issue(kind);
    write_secret(path, &secret)?;
    info!(path = %path.display(), "drew the cluster's join token; workers need it (--join-token-file)");
    Ok(secret)
}

/// Writes `secret` to `path`, readable by its owner alone from the moment it exists.
fn write_secret(path: &Path, secret: &Secret) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let context = || format!("writing {}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(context(), e))?;
    }
    let temporary: PathBuf = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| Error::io(context(), e))?;
    writeln!(file, "{}", secret.expose()).map_err(|e| Error::io(context(), e))?;
    file.sync_all().map_err(|e| Error::io(context(), e))?;
    std::fs::rename(&temporary, path).map_err(|e| Error::io(context(), e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_first_start_creates_one_admin_and_private_credential_files() {
        let data = tempfile::tempdir().unwrap();
        let (admin, join) = {
            let store = Arc::new(EmbeddedStore::open(data.path()).unwrap());
            let auth = Authenticator::load(store, data.path(), None).await.unwrap();
            let read = |file| std::fs::read_to_string(data.path().join(file)).unwrap();
            let (admin, join) = (read(ADMIN_TOKEN_FILE), read(JOIN_TOKEN_FILE));
            for file in [ADMIN_TOKEN_FILE, JOIN_TOKEN_FILE] {
                assert_eq!(mode(&data.path().join(file)), 0o600, "{file}");
            }
            let caller = auth.caller(Some(admin.trim())).unwrap();
            assert_eq!(
                caller,
                Caller::User {
                    name: FIRST_ADMIN.to_owned(),
                    admin: true
                }
            );
            assert_eq!(auth.caller(Some(join.trim())).unwrap(), Caller::Worker);
            (admin, join)
        };
        // A restart keeps the admin and the join token, and makes no second admin.
        let store = Arc::new(EmbeddedStore::open(data.path()).unwrap());
        let auth = Authenticator::load(store, data.path(), None).await.unwrap();
        assert_eq!(auth.users().len(), 1);
        assert!(auth.caller(Some(admin.trim())).is_ok());
        assert_eq!(auth.caller(Some(join.trim())).unwrap(), Caller::Worker);
        let stored = std::fs::read(data.path().join("cluster.redb")).unwrap();
        let needle = admin.trim().as_bytes();
        assert!(
            !stored.windows(needle.len()).any(|window| window == needle),
            "the store holds the token itself"
        );
    }

    #[tokio::test]
    async fn a_given_join_token_is_the_only_one_and_job_keys_are_private() {
        let data = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(data.path()).unwrap());
        let given = Secret::new("cohort-join-operator-chose-this");
        let auth = Authenticator::load(store.clone(), data.path(), Some(&given))
            .await
            .unwrap();
        assert_eq!(auth.caller(Some(given.expose())).unwrap(), Caller::Worker);
        assert!(!data.path().join(JOIN_TOKEN_FILE).exists());
        let tokens = load_job_tokens(data.path(), store.as_ref()).await.unwrap();
        assert_eq!(mode(&data.path().join(JOB_KEY_FILE)), 0o600);
        let again = load_job_tokens(data.path(), store.as_ref()).await.unwrap();
        assert!(again.verify("job-1", tokens.issue("job-1").expose()));
        std::fs::write(data.path().join(JOB_KEY_FILE), "not a key").unwrap();
        let refused = load_job_tokens(data.path(), store.as_ref())
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("job key"), "{refused}");
    }
}
