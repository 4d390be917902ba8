//! The user's credentials file: where the CLI finds the coordinator and the token to show it
//! when neither flags nor environment say.
//!
//! `$COHORT_CREDENTIALS`, else `$XDG_CONFIG_HOME/cohort/credentials.toml`, else
//! `~/.config/cohort/credentials.toml`:
//!
//! ```toml
//! coordinator = "127.0.0.1:7077"
//! token = "cohort-user-..."
//! ca = "/etc/cohort/ca.pem"    # a TLS cluster's CA; absent: plaintext (loopback)
//! ```
//!
//! A token is a password: like ssh with a private key, the CLI refuses a file that its group
//! or others may read, and writes one readable by its owner alone from its first moment.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cohort_proto::Secret;
use serde::{Deserialize, Serialize};

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// The coordinator's `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// The user's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The cluster's CA certificate (a path): calls use TLS and trust what it signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// Where the credentials file is, by the environment (`None` without a home directory).
pub fn default_path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(path) = var("COHORT_CREDENTIALS") {
        return Some(PathBuf::from(path));
    }
    let config = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(config.join("cohort").join("credentials.toml"))
}

/// Reads the file at `path`; `None` when there is none. Refuses a file others may read.
pub fn read(path: &Path) -> Result<Option<CredentialsFile>> {
    let Some(text) = read_private(path)? else {
        return Ok(None);
    };
    let file = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(file))
}

/// The text of a file that holds a secret (`None` when it does not exist), refused when its
/// group or others may read it, as ssh refuses such a private key.
pub fn read_private(path: &Path) -> Result<Option<String>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {mode:03o}): it holds a token; `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text))
}

/// Writes `credentials` to `path` (mode 0600 from the start, replaced atomically), creating
/// its directory (mode 0700) if needed.
pub fn write(path: &Path, credentials: &CredentialsFile) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let text = toml::to_string(credentials).context("encoding credentials")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// The token in the credentials file at `path`, if there is one.
pub fn token_in(file: &CredentialsFile) -> Option<Secret> {
    file.token.as_deref().map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_written_private_and_read_back() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("config/cohort/credentials.toml");
        let credentials = CredentialsFile {
            coordinator: Some("127.0.0.1:7077".to_owned()),
            token: Some("cohort-user-abc".to_owned()),
            ca: Some(PathBuf::from("/etc/cohort/ca.pem")),
        };
        write(&path, &credentials).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read(&path).unwrap(), Some(credentials));
        assert_eq!(read(&directory.path().join("absent")).unwrap(), None);
    }

    #[test]
    fn a_file_others_may_read_is_refused_naming_the_fix() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("credentials.toml");
        std::fs::write(&path, "token = \"cohort-user-abc\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read(&path).unwrap_err().to_string();
        assert!(
            refused.contains("mode 644") && refused.contains("chmod 600"),
            "{refused}"
        );
    }
}
