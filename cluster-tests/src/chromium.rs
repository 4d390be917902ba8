//! Headless Chromium (Debian `chromium`, installed by `scripts/setup.sh`) for the dashboard
//! tests: each call is a fresh browser with a profile of its own that loads one page (running
//! its script) and prints its DOM, or saves a screenshot. Nothing leaves the machine: every
//! host name but the loopback address resolves to nothing, and Chromium's background traffic
//! (updates, sync, safe browsing) is off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::external::binary_or_skip;

/// Longest one page load may take.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A Chromium binary.
pub struct Chromium {
    binary: PathBuf,
    /// Profiles of the calls, removed on drop.
    profiles: tempfile::TempDir,
}

impl Chromium {
    /// Chromium (`$CHROMIUM_BIN`, `/usr/bin/chromium`, or on `PATH`), or `None` after saying
    /// why when it is missing and the test may skip (a panic under `CI=true`).
    pub fn find_or_skip(test_name: &str) -> Option<Self> {
        let binary = binary_or_skip(
            test_name,
            "CHROMIUM_BIN",
            "/usr/bin/chromium",
            "chromium",
            "chromium",
        )?;
        let profiles = tempfile::tempdir().ok()?;
        Some(Self { binary, profiles })
    }

    /// The DOM of `url` once loaded (and its script run), as HTML.
    pub fn dump_dom(&self, url: &str) -> Result<String> {
        let output = self.run(&["--dump-dom", url])?;
        Ok(output)
    }

    /// Saves a `width` x `height` screenshot of `url` to `path` (PNG).
    pub fn screenshot(&self, url: &str, path: &Path, width: u32, height: u32) -> Result<()> {
        let target = format!("--screenshot={}", path.display());
        let size = format!("--window-size={width},{height}");
        self.run(&[&target, &size, "--hide-scrollbars", url])?;
        if !path.is_file() {
            bail!("chromium wrote no screenshot to {}", path.display());
        }
        Ok(())
    }

    /// Runs a fresh headless browser with `arguments`; its standard output.
    fn run(&self, arguments: &[&str]) -> Result<String> {
        let profile = tempfile::tempdir_in(self.profiles.path())?;
        let mut child = Command::new(&self.binary)
            .args([
                "--headless",
                // Tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--disable-sync",
                "--disable-domain-reliability",
                "--disable-client-side-phishing-detection",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(arguments)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromium")?;
        // Read as it comes, so that a page larger than the pipe's buffer cannot stall it.
        let mut stdout = child.stdout.take().context("chromium's output")?;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut text).map(|_| text)
        });
        let deadline = Instant::now() + PAGE_TIMEOUT;
        // Polled, not waited on, so that a browser that never finishes is killed.
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("chromium took longer than {PAGE_TIMEOUT:?} on {arguments:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader of chromium's output panicked"))??;
        if !status.success() {
            bail!("chromium failed ({status}) on {arguments:?}");
        }
        Ok(text)
    }
}
