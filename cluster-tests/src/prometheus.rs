//! A real Prometheus server for tests: it scrapes one coordinator's `/metrics` every second,
//! showing a token as Prometheus deployments do (`authorization.credentials_file`), and
//! answers PromQL through its HTTP API.
//!
//! Usage: `let Some(prometheus) = TestPrometheus::start_or_skip("my_test", target, token)
//! else { return Ok(()) };` then [`TestPrometheus::query`]. The binary is `$PROMETHEUS_BIN`,
//! else `/usr/bin/prometheus`, else `prometheus` on `PATH` (Debian package `prometheus`,
//! which scripts/setup.sh installs); without one the test is skipped, or fails under
//! `CI=true`. Dropping it kills the server and removes its data.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::external::{self, free_loopback_address, http_get, log_tail};

/// A Prometheus server scraping one target for one test.
pub struct TestPrometheus {
    /// The running server.
    child: Child,
    /// Its web and API address.
    address: SocketAddr,
    /// Its configuration, data and log; removed on drop, after the process is gone.
    _directory: tempfile::TempDir,
}

impl TestPrometheus {
    /// How long the server may take to become ready.
    pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

    /// Starts a server scraping `target` (`host:port` of a coordinator's `--http`) every
    /// second with `token`, or returns `None` after saying why the test is skipped.
    ///
    /// # Panics
    ///
    /// When the binary is missing and `CI=true`, or when a present binary fails to start.
    pub fn start_or_skip(test_name: &str, target: &str, token: &str) -> Option<Self> {
        let binary = external::binary_or_skip(
            test_name,
            "PROMETHEUS_BIN",
            "/usr/bin/prometheus",
            "prometheus",
            "prometheus",
        )?;
        match Self::start(&binary, target, token) {
            Ok(server) => Some(server),
            Err(error) => panic!("{test_name}: {error:#}"),
        }
    }

    /// Starts `binary` scraping `target` with `token`, and waits until it is ready.
    pub fn start(binary: &Path, target: &str, token: &str) -> Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("cohort-test-prometheus-")
            .tempdir()?;
        let token_file = directory.path().join("token");
        std::fs::write(&token_file, token)?;
        let config = directory.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: cohort\n    authorization:\n      \
                 credentials_file: {}\n    static_configs:\n      - targets: [\"{target}\"]\n",
                token_file.display()
            ),
        )?;
        let address = free_loopback_address().map_err(anyhow::Error::msg)?;
        let log_path = directory.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = Self {
            child,
            address,
            _directory: directory,
        };
        let deadline = Instant::now() + Self::STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!(
                    "prometheus exited during startup ({status}); its log:\n{}",
                    log_tail(&log_path)
                );
            }
            if http_get(address, "/-/ready", None).is_ok_and(|(status, _)| status == 200) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus was not ready at {address} within {:?}; its log:\n{}",
                    Self::STARTUP_TIMEOUT,
                    log_tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The result vector of the instant PromQL query `expression` (`data.result`).
    pub fn query(&self, expression: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", percent_encode(expression));
        let (status, body) = http_get(self.address, &path, None)?;
        if status != 200 {
            bail!("prometheus answered {status} to {expression}: {body}");
        }
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus' answer to {expression}: {body}"))?;
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` with every byte but unreserved URL characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
