//! A real etcd server for tests, used by the coordinator's store conformance suite and by the
//! cluster tests that run the coordinator with `--store etcd://...`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::external::{self, free_loopback_address, log_tail};

/// A single-member etcd server started for one test, on free loopback ports, with its data in a
/// temporary directory. Dropping it (also while a failing test unwinds) kills the process and
/// removes the directory.
///
/// Usage: `let Some(etcd) = TestEtcd::start_or_skip("my_test") else { return };` then connect to
/// `etcd.endpoint()` (`127.0.0.1:PORT`). The binary is `$ETCD_BIN`, else `/usr/bin/etcd`, else
/// `etcd` on `PATH`; when none exists the test is skipped with a note on stderr, or fails when
/// `CI=true` (CI must run every test). Startup blocks (up to [`TestEtcd::STARTUP_TIMEOUT`]), so
/// async tests call it through `tokio::task::spawn_blocking`.
pub struct TestEtcd {
    /// The running server.
    child: Child,
    /// `127.0.0.1:PORT` of the client API.
    client_address: SocketAddr,
    /// Holds the server's data dir and log file; removed on drop, after the process is gone.
    _directory: tempfile::TempDir,
}

impl TestEtcd {
    /// How long a server may take to answer its health check.
    pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

    /// Starts a server, or returns `None` after explaining on stderr why the test is skipped.
    ///
    /// # Panics
    ///
    /// When the binary is missing and `CI=true`, or when a present binary fails to start.
    pub fn start_or_skip(test_name: &str) -> Option<Self> {
        let binary = external::binary_or_skip(
            test_name,
            "ETCD_BIN",
            "/usr/bin/etcd",
            "etcd",
            "etcd-server",
        )?;
        match Self::start(&binary) {
            Ok(server) => Some(server),
            Err(error) => panic!("{test_name}: {error}"),
        }
    }

    /// Returns the etcd binary to run, if there is one.
    pub fn find_binary() -> Option<PathBuf> {
        external::find_binary("ETCD_BIN", "/usr/bin/etcd", "etcd")
    }

    /// Starts `binary` on free ports and waits until it reports healthy. Retries with new ports
    /// a couple of times, in case another process took a port between choosing and binding it.
    pub fn start(binary: &Path) -> Result<Self, String> {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::start_once(binary) {
                Ok(server) => return Ok(server),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// Returns `127.0.0.1:PORT` of the client API.
    pub fn endpoint(&self) -> String {
        self.client_address.to_string()
    }

    /// One attempt of [`TestEtcd::start`].
    fn start_once(binary: &Path) -> Result<Self, String> {
        let directory = tempfile::Builder::new()
            .prefix("cohort-test-etcd-")
            .tempdir()
            .map_err(|error| format!("creating a temporary dir for etcd: {error}"))?;
        let client_address = free_loopback_address()?;
        let peer_address = free_loopback_address()?;
        let client_url = format!("http://{client_address}");
        let peer_url = format!("http://{peer_address}");
        let log_path = directory.path().join("etcd.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|error| format!("creating {}: {error}", log_path.display()))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|error| format!("duplicating {}: {error}", log_path.display()))?;
        let child = Command::new(binary)
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(directory.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("test={peer_url}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .map_err(|error| format!("starting {}: {error}", binary.display()))?;
        // From here on, dropping `server` kills the process.
        let mut server = Self {
            child,
            client_address,
            _directory: directory,
        };
        let deadline = Instant::now() + Self::STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "etcd exited during startup ({status}); its log:\n{}",
                    log_tail(&log_path)
                ));
            }
            if is_healthy(client_address) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd did not become healthy at {client_url} within {:?}; its log:\n{}",
                    Self::STARTUP_TIMEOUT,
                    log_tail(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        // Already exited is fine; the wait reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks etcd's `/health` endpoint whether the server is ready to serve requests.
fn is_healthy(address: SocketAddr) -> bool {
    external::http_get(address, "/health", None)
        .is_ok_and(|(status, body)| status == 200 && body.contains("\"health\":\"true\""))
}
