//! A real cluster on loopback for one test: a coordinator process and worker processes, each a
//! `cohort` executable, on ports the OS picks. Everything waits by polling the coordinator,
//! never by fixed sleeps. Every worker keeps its state directory in the sandbox
//! (`state/<node id>`), so a worker restarted under the same node id finds what its
//! predecessor left, and no test touches the real home. When the sandbox is dropped, workers
//! are stopped with SIGTERM (so they stop their ranks and remove their cgroups), SIGKILL after
//! [`WORKER_STOP_TIMEOUT`]; the coordinator is killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cohort_worker::containment::procfs;
use serde_json::Value;

use crate::network::TestNetwork;

/// How often state is polled at first.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The longest [`poll`] waits between two checks: it waits [`POLL_INTERVAL`] more after each,
/// up to this. Most checks start a `cohort` process; twenty a second would take a good share of
/// a two-core machine from the ranks under test (and skew what they measure).
pub const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Default limit for waits that should succeed quickly on an idle machine (generous: CI
/// machines are small and busy).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long workers get to stop their ranks and exit when the sandbox is dropped.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a gRPC connection to `address` that shows `token` on every call (none: calls carry
/// no credentials, as an attacker's would).
pub async fn connect_as(
    address: &str,
    token: Option<&str>,
) -> Result<cohort_proto::transport::Connection> {
    connect_trusting(address, None, token).await
}

/// Opens a gRPC connection to `address` showing `token`, over TLS trusting `ca` when given.
async fn connect_trusting(
    address: &str,
    ca: Option<&cohort_proto::transport::CaCertificate>,
    token: Option<&str>,
) -> Result<cohort_proto::transport::Connection> {
    let channel = cohort_proto::transport::endpoint(address, ca)?
        .connect()
        .await?;
    let token = token.map(cohort_proto::Secret::new);
    Ok(cohort_proto::transport::Credentials::new(token.as_ref())?.wrap(channel))
}

/// A registration of node `node_id` on 127.0.0.1 offering one CPU slot, as a hand-made worker
/// sends it.
pub fn one_slot_registration(node_id: &str) -> cohort_proto::v1::RegisterRequest {
    cohort_proto::v1::RegisterRequest {
        node_id: node_id.to_owned(),
        hostname: node_id.to_owned(),
        address: "127.0.0.1".to_owned(),
        devices: vec![cohort_proto::v1::Device {
            kind: cohort_proto::v1::DeviceKind::Cpu as i32,
            index: 0,
            name: "cpu slot".to_owned(),
            ..cohort_proto::v1::Device::default()
        }],
        ..cohort_proto::v1::RegisterRequest::default()
    }
}

/// Finds the `cohort` executable: `$COHORT_BIN`, else the one built next to this test binary
/// (`target/<profile>/cohort`).
pub fn cohort_executable() -> PathBuf {
    if let Some(path) = std::env::var_os("COHORT_BIN") {
        return PathBuf::from(path);
    }
    let test_binary = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/cohort
    let profile_dir = test_binary
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let executable = profile_dir.join("cohort");
    assert!(
        executable.exists(),
        "{} not found: build it first with `cargo build -p cohort-cli` (scripts/test.sh does)",
        executable.display()
    );
    executable
}

/// The name of coordinator `index`'s log and address files.
fn coordinator_name(index: usize) -> String {
    match index {
        0 => "coordinator".to_owned(),
        _ => format!("coordinator-{index}"),
    }
}

/// A child process killed (and reaped) on drop.
pub struct Daemon {
    /// The process.
    child: Child,
    /// Where its stderr goes, for failure messages.
    log: PathBuf,
}

impl Daemon {
    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }

    /// Whether it has exited, and how (reaping it if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Live processes whose environment (as they started) holds every `NAME=value` of `entries`,
/// found in `/proc`.
pub fn processes_with_environment(entries: &[String]) -> Vec<u32> {
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    let Ok(proc_entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| procfs::environment_has(pid, &entries) && process_alive(pid))
        .collect()
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what` in the message.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut interval = POLL_INTERVAL;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(interval);
        interval = (interval + POLL_INTERVAL).min(MAX_POLL_INTERVAL);
    }
}

/// A `kind = "command"` job file whose `ranks` ranks each run `script` with `sh -c`, stopped
/// with a 1 s grace period.
pub fn shell_job(name: &str, ranks: u32, script: &str) -> String {
    format!(
        r#"
version = 1
name = "{name}"
kind = "command"
[resources]
ranks = {ranks}
[command]
program = "sh"
args = ["-c", '''{script}''']
stop_grace_s = 1.0
"#
    )
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone)]
pub enum Store {
    /// Embedded database in the sandbox's data dir.
    Embedded,
    /// etcd at `host:port`.
    Etcd(String),
}

/// How a sandbox's coordinator runs.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Where the coordinator keeps its state. Default: embedded.
    pub store: Store,
    /// Seconds of silence after which a worker is lost. Default 5.
    pub heartbeat_deadline_s: f64,
    /// Limit on the coordinator's open files (`RLIMIT_NOFILE`). Default: the test's own.
    pub coordinator_open_files: Option<u64>,
    /// Whether the cluster serves TLS (`cohort certs create` in the sandbox; clients and
    /// workers get the CA, workers the certificate). Default: only on a network (a
    /// coordinator off loopback refuses to start without it).
    pub tls: bool,
    /// Whether the (first) coordinator serves its HTTP endpoint (`--http`, on a free loopback
    /// port: [`Sandbox::http_address`]). Default: no.
    pub http: bool,
    /// More flags for every coordinator (e.g. `--queue research=2:4`). Default: none.
    pub coordinator_flags: Vec<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            store: Store::Embedded,
            heartbeat_deadline_s: 5.0,
            coordinator_open_files: None,
            tls: false,
            http: false,
            coordinator_flags: Vec::new(),
        }
    }
}

/// A sandbox cluster's TLS files: one CA, and one certificate naming every address of the
/// cluster (loopback and each network host), which the coordinator and every worker serve.
/// A real cluster gives each node its own; one is enough for tests.
#[derive(Debug, Clone)]
pub struct SandboxTls {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The certificate.
    pub certificate: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// A running cluster for one test.
pub struct Sandbox {
    /// Holds data dirs, logs and job files; removed on drop.
    directory: tempfile::TempDir,
    /// The `cohort` executable.
    executable: PathBuf,
    /// The coordinator processes, when running: the first, then those
    /// [`Self::add_coordinator`] started (a group sharing an etcd store).
    coordinators: Vec<Option<Daemon>>,
    /// Each coordinator's `host:port`, in the same order.
    addresses: Vec<String>,
    /// What clients and workers are given: the coordinators' addresses, comma-separated.
    address: String,
    /// Coordinator flags (heartbeat deadline, store).
    coordinator_flags: Vec<String>,
    /// Limit on the coordinator's open files, kept across restarts.
    coordinator_open_files: Option<u64>,
    /// Worker processes by node id.
    workers: BTreeMap<String, Daemon>,
    /// Variables set in the environment of workers started from now on (and so of their
    /// ranks): fault injection.
    worker_env: Vec<(String, String)>,
    /// Counter for file names.
    files: u32,
    /// The first admin's token, which CLI calls show.
    admin_token: String,
    /// The separate network hosts the cluster runs on, if not on loopback: the coordinator and
    /// the CLI on host 0, each worker on the host it was given. Dropped last, after every
    /// process on it.
    network: Option<TestNetwork>,
    /// The TLS files, when the cluster serves TLS.
    tls: Option<SandboxTls>,
    /// The (first) coordinator's HTTP endpoint, when it serves one.
    http_address: Option<String>,
}

impl Sandbox {
    /// Starts a coordinator with the embedded store and the default heartbeat deadline.
    pub fn start() -> Result<Self> {
        Self::start_with(Store::Embedded, 5.0)
    }

    /// Starts a coordinator with the given store and heartbeat deadline (seconds).
    pub fn start_with(store: Store, heartbeat_deadline_s: f64) -> Result<Self> {
        Self::start_with_options(SandboxOptions {
            store,
            heartbeat_deadline_s,
            ..SandboxOptions::default()
        })
    }

    /// Starts a coordinator as `options` say.
    pub fn start_with_options(options: SandboxOptions) -> Result<Self> {
        Self::start_in(options, None)
    }

    /// Starts a coordinator as `options` say on host 0 of `network`, listening on that host's
    /// address; the CLI runs there too, and workers go on the hosts [`Self::add_worker_on`]
    /// names.
    pub fn start_on_network(network: TestNetwork, options: SandboxOptions) -> Result<Self> {
        Self::start_in(options, Some(network))
    }

    /// Starts a coordinator on loopback, or on host 0 of `network`.
    fn start_in(options: SandboxOptions, network: Option<TestNetwork>) -> Result<Self> {
        let SandboxOptions {
            store,
            heartbeat_deadline_s,
            coordinator_open_files,
            tls,
            http,
            coordinator_flags,
        } = options;
        let directory = tempfile::Builder::new()
            .prefix("cohort-sandbox-")
            .tempdir()?;
        let store_flag = match store {
            Store::Embedded => "embedded".to_owned(),
            Store::Etcd(endpoint) => format!("etcd://{endpoint}"),
        };
        let interval = (heartbeat_deadline_s / 5.0).min(1.0);
        let mut sandbox = Self {
            directory,
            executable: cohort_executable(),
            coordinators: Vec::new(),
            addresses: Vec::new(),
            address: String::new(),
            coordinator_flags: vec![
                "--store".to_owned(),
                store_flag,
                "--heartbeat-deadline-s".to_owned(),
                heartbeat_deadline_s.to_string(),
                "--heartbeat-interval-s".to_owned(),
                interval.to_string(),
            ]
            .into_iter()
            .chain(coordinator_flags)
            .collect(),
            coordinator_open_files,
            workers: BTreeMap::new(),
            worker_env: Vec::new(),
            files: 0,
            admin_token: String::new(),
            network,
            tls: None,
            http_address: None,
        };
        if http {
            let address = crate::external::free_loopback_address().map_err(anyhow::Error::msg)?;
            sandbox.http_address = Some(address.to_string());
        }
        if tls || sandbox.network.is_some() {
            let files = sandbox.make_certificates()?;
            sandbox.coordinator_flags.extend([
                "--tls-cert".to_owned(),
                files.certificate.display().to_string(),
                "--tls-key".to_owned(),
                files.key.display().to_string(),
            ]);
            sandbox.tls = Some(files);
        }
        let listen = match &sandbox.network {
            Some(network) => format!("{}:0", network.address(0)),
            None => "127.0.0.1:0".to_owned(),
        };
        sandbox.start_coordinator(0, &listen)?;
        Ok(sandbox)
    }

    /// Makes the cluster's CA and certificate with `cohort certs create`.
    fn make_certificates(&self) -> Result<SandboxTls> {
        let out = self.directory.path().join("certs");
        let mut hosts = vec!["127.0.0.1".to_owned()];
        if let Some(network) = &self.network {
            hosts.extend((0..network.hosts()).map(|host| network.address(host).to_string()));
        }
        let mut command = Command::new(&self.executable);
        command.args(["certs", "create", "--out", &out.display().to_string()]);
        command.args(["--name", "cluster"]);
        for host in &hosts {
            command.args(["--host", host]);
        }
        let output = command.output().context("running cohort certs create")?;
        if !output.status.success() {
            bail!(
                "cohort certs create failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(SandboxTls {
            ca: out.join("ca.pem"),
            certificate: out.join("cluster.pem"),
            key: out.join("cluster-key.pem"),
        })
    }

    /// The cluster's TLS files, when it serves TLS.
    pub fn tls(&self) -> Option<&SandboxTls> {
        self.tls.as_ref()
    }

    /// Opens a gRPC connection to the coordinator that shows `token` (none: no credentials),
    /// over TLS trusting the cluster's CA when it serves TLS.
    pub async fn connect(
        &self,
        token: Option<&str>,
    ) -> Result<cohort_proto::transport::Connection> {
        let ca = self
            .tls
            .as_ref()
            .map(|tls| cohort_proto::transport::CaCertificate::read(&tls.ca))
            .transpose()?;
        connect_trusting(&self.address, ca.as_ref(), token).await
    }

    /// The (first) coordinator's HTTP endpoint (`host:port`), when it serves one.
    pub fn http_address(&self) -> Option<&str> {
        self.http_address.as_deref()
    }

    /// The coordinator's `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The sandbox's scratch directory.
    pub fn path(&self) -> &Path {
        self.directory.path()
    }

    /// The separate network hosts the cluster runs on, if not on loopback.
    pub fn network(&self) -> Option<&TestNetwork> {
        self.network.as_ref()
    }

    /// Starts `cohort` with `args`, its stderr in `<name>.log`, with at most `open_files`
    /// open files when given, on network host `host` when the cluster has a network.
    fn spawn(
        &self,
        name: &str,
        args: &[String],
        open_files: Option<u64>,
        host: usize,
        env: &[(String, String)],
    ) -> Result<Daemon> {
        let log = self.directory.path().join(format!("{name}.log"));
        let stderr = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new(&self.executable);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(network) = &self.network {
            network.enter(&mut command, host)?;
        }
        if let Some(limit) = open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and reads only the copied `limit`.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon { child, log })
    }

    /// Starts coordinator `index` (0: the first, with the sandbox's data dir; others get their
    /// own and the first's join token) listening on `listen`, and waits until it answers as
    /// the leader when it is the only one, or until it has bound its address otherwise.
    fn start_coordinator(&mut self, index: usize, listen: &str) -> Result<()> {
        let name = coordinator_name(index);
        let address_file = self.directory.path().join(format!("{name}.addr"));
        let _ = std::fs::remove_file(&address_file);
        let mut args = vec![
            "coordinator".to_owned(),
            "--listen".to_owned(),
            listen.to_owned(),
            "--data-dir".to_owned(),
            self.coordinator_data_dir(index).display().to_string(),
            "--address-file".to_owned(),
            address_file.display().to_string(),
        ];
        if index > 0 {
            args.extend([
                "--join-token-file".to_owned(),
                self.join_token_file().display().to_string(),
            ]);
        } else if let Some(http) = &self.http_address {
            args.extend(["--http".to_owned(), http.clone()]);
        }
        args.extend(self.coordinator_flags.iter().cloned());
        let mut daemon = self.spawn(&name, &args, self.coordinator_open_files, 0, &[])?;
        let address = poll("the coordinator's address file", DEFAULT_TIMEOUT, || {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("coordinator exited ({status}): {}", daemon.log_tail());
            }
            Ok(std::fs::read_to_string(&address_file).ok())
        })?;
        let address = address.trim().to_owned();
        if index < self.addresses.len() {
            self.addresses[index] = address;
            self.coordinators[index] = Some(daemon);
        } else {
            self.addresses.push(address);
            self.coordinators.push(Some(daemon));
        }
        self.address = self.addresses.join(",");
        if index > 0 {
            return Ok(());
        }
        // With etcd the first admin is made once the coordinator leads, after it listens.
        let admin_token_file = self.data_dir().join("admin-token");
        let admin_token = poll("the first admin's token", DEFAULT_TIMEOUT, || {
            if let Some(status) = self.coordinators[0].as_mut().and_then(Daemon::exited) {
                bail!("coordinator exited ({status})");
            }
            Ok(std::fs::read_to_string(&admin_token_file).ok())
        })?;
        self.admin_token = admin_token.trim().to_owned();
        poll("the coordinator to answer", DEFAULT_TIMEOUT, || {
            Ok(self.cli(&["nodes"]).ok().filter(|o| o.status.success()))
        })?;
        Ok(())
    }

    /// Starts another coordinator sharing the first's etcd store and join token, on a loopback
    /// port of its own; it stands by while the first leads. Clients and workers started from
    /// now on are given every coordinator's address. Returns its index.
    pub fn add_coordinator(&mut self) -> Result<usize> {
        let index = self.coordinators.len();
        self.start_coordinator(index, "127.0.0.1:0")?;
        Ok(index)
    }

    /// Coordinator `index`'s `host:port`.
    pub fn coordinator_address(&self, index: usize) -> &str {
        &self.addresses[index]
    }

    /// Coordinator `index`'s process, while it runs.
    pub fn coordinator(&mut self, index: usize) -> Option<&mut Daemon> {
        self.coordinators.get_mut(index).and_then(Option::as_mut)
    }

    /// Kills coordinator `index` with SIGKILL.
    pub fn kill_coordinator_at(&mut self, index: usize) {
        if let Some(mut daemon) = self.coordinators.get_mut(index).and_then(Option::take) {
            daemon.kill();
        }
    }

    /// Pauses coordinator `index` with SIGSTOP (a process that hangs without dying: it keeps
    /// its connections and its lease until the lease runs out).
    pub fn pause_coordinator(&mut self, index: usize) -> Result<()> {
        self.signal_coordinator(index, libc::SIGSTOP)
    }

    /// Resumes coordinator `index` with SIGCONT after [`Self::pause_coordinator`].
    pub fn resume_coordinator(&mut self, index: usize) -> Result<()> {
        self.signal_coordinator(index, libc::SIGCONT)
    }

    /// Sends `number` to coordinator `index`.
    fn signal_coordinator(&mut self, index: usize, number: i32) -> Result<()> {
        let daemon = self
            .coordinator(index)
            .ok_or_else(|| anyhow!("coordinator {index} is not running"))?;
        signal(daemon.pid(), number);
        Ok(())
    }

    /// Whether coordinator `index` alone answers `cohort nodes`: it leads.
    pub fn leads(&self, index: usize) -> bool {
        self.coordinators.get(index).is_some_and(Option::is_some)
            && self
                .cli_from(
                    0,
                    Some(&self.admin_token),
                    &[("COHORT_COORDINATOR", &self.addresses[index])],
                    &["nodes"],
                )
                .is_ok_and(|output| output.status.success())
    }

    /// Which coordinator leads: the first whose own address alone answers `cohort nodes`.
    pub fn leader(&self) -> Option<usize> {
        (0..self.addresses.len()).find(|&index| self.leads(index))
    }

    /// The (first) coordinator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.coordinator_data_dir(0)
    }

    /// Coordinator `index`'s data directory.
    fn coordinator_data_dir(&self, index: usize) -> PathBuf {
        match index {
            0 => self.directory.path().join("data"),
            _ => self.directory.path().join(format!("data-{index}")),
        }
    }

    /// The first admin's token (what CLI calls show).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The cluster's join token file (what workers show).
    pub fn join_token_file(&self) -> PathBuf {
        self.data_dir().join("join-token")
    }

    /// The (first) coordinator's process id, while it runs.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinators.first()?.as_ref().map(Daemon::pid)
    }

    /// Kills the (first) coordinator with SIGKILL.
    pub fn kill_coordinator(&mut self) {
        self.kill_coordinator_at(0);
    }

    /// Starts the (first) coordinator again on the same address and data dir.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        let address = self.addresses[0].clone();
        self.start_coordinator(0, &address)
    }

    /// Starts a worker with `cpu_slots` slots as node `node_id` and waits until it is ready.
    pub fn add_worker(&mut self, node_id: &str, cpu_slots: u32) -> Result<()> {
        self.start_worker(node_id, cpu_slots)?;
        self.wait_for_node(node_id, "ready", DEFAULT_TIMEOUT)?;
        Ok(())
    }

    /// Starts a worker with `cpu_slots` slots as node `node_id`, with the node's output and
    /// state directories, and returns at once (a worker restarted under a node id the
    /// coordinator still shows `ready` cannot be waited for by status).
    pub fn start_worker(&mut self, node_id: &str, cpu_slots: u32) -> Result<()> {
        self.start_worker_on(node_id, cpu_slots, 0)
    }

    /// Starts a worker with `cpu_slots` slots as node `node_id` on network host `host`,
    /// advertising that host's address, and waits until it is ready.
    pub fn add_worker_on(&mut self, node_id: &str, cpu_slots: u32, host: usize) -> Result<()> {
        self.start_worker_on(node_id, cpu_slots, host)?;
        self.wait_for_node(node_id, "ready", DEFAULT_TIMEOUT)?;
        Ok(())
    }

    /// Starts a worker as [`Self::start_worker`] does, on network host `host` (ignored on
    /// loopback).
    fn start_worker_on(&mut self, node_id: &str, cpu_slots: u32, host: usize) -> Result<()> {
        if self.workers.contains_key(node_id) {
            bail!("worker {node_id} is already running");
        }
        let args: Vec<String> = [
            "worker",
            "--coordinator",
            &self.address,
            "--cpu-slots",
            &cpu_slots.to_string(),
            "--node-id",
            node_id,
            "--output-dir",
            &self.directory.path().join("outputs").display().to_string(),
            "--state-dir",
            &self.state_dir(node_id).display().to_string(),
            "--join-token-file",
            &self.join_token_file().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut args = args;
        if let Some(network) = &self.network {
            args.extend([
                "--advertise-address".to_owned(),
                network.address(host).to_string(),
            ]);
        }
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--ca", &tls.ca),
                ("--tls-cert", &tls.certificate),
                ("--tls-key", &tls.key),
            ] {
                args.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        // A restarted worker appends to its predecessor's log.
        let daemon = self.spawn(
            &format!("worker-{node_id}"),
            &args,
            None,
            host,
            &self.worker_env,
        )?;
        self.workers.insert(node_id.to_owned(), daemon);
        Ok(())
    }

    /// Sets `name` to `value` in the environment of the workers started from now on, which
    /// their ranks inherit: how a test injects a fault into a rank.
    pub fn set_worker_env(&mut self, name: &str, value: &str) {
        self.worker_env.push((name.to_owned(), value.to_owned()));
    }

    /// The state directory of node `node_id`'s worker.
    pub fn state_dir(&self, node_id: &str) -> PathBuf {
        self.directory.path().join("state").join(node_id)
    }

    /// Kills a worker process with SIGKILL; returns when it is gone.
    pub fn kill_worker(&mut self, node_id: &str) -> Result<()> {
        let mut daemon = self
            .workers
            .remove(node_id)
            .ok_or_else(|| anyhow!("no worker {node_id}"))?;
        daemon.kill();
        Ok(())
    }

    /// Stops a worker process with SIGTERM (it stops its ranks first); returns when it is gone.
    pub fn terminate_worker(&mut self, node_id: &str) -> Result<()> {
        let mut daemon = self
            .workers
            .remove(node_id)
            .ok_or_else(|| anyhow!("no worker {node_id}"))?;
        daemon.terminate();
        Ok(())
    }

    /// The worker process of a node.
    pub fn worker(&self, node_id: &str) -> Option<&Daemon> {
        self.workers.get(node_id)
    }

    /// Runs a `cohort` CLI command against this cluster, as its first admin.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_as(Some(&self.admin_token), args)
    }

    /// Runs a `cohort` CLI command against this cluster showing `token` (none: no token, and
    /// no credentials file either).
    pub fn cli_as(&self, token: Option<&str>, args: &[&str]) -> Result<Output> {
        self.cli_from(0, token, &[], args)
    }

    /// Runs a `cohort` CLI command as [`Self::cli_as`] does, from network host `host` (ignored
    /// on loopback), with the variables `env` set too.
    pub fn cli_from(
        &self,
        host: usize,
        token: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Output> {
        self.run_cli(host, token, env, args, true)
    }

    /// Runs a `cohort` CLI command showing `token` but not given the cluster's CA, so that it
    /// speaks plaintext to the coordinator.
    pub fn cli_without_ca(&self, token: Option<&str>, args: &[&str]) -> Result<Output> {
        self.run_cli(0, token, &[], args, false)
    }

    fn run_cli(
        &self,
        host: usize,
        token: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
        with_ca: bool,
    ) -> Result<Output> {
        let mut command = Command::new(&self.executable);
        command
            .args(args)
            .env("COHORT_COORDINATOR", &self.address)
            .env(
                "COHORT_CREDENTIALS",
                self.directory.path().join("no-credentials.toml"),
            )
            .env_remove("COHORT_TOKEN")
            .env_remove("COHORT_CA")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        if let Some(token) = token {
            command.env("COHORT_TOKEN", token);
        }
        if let Some(tls) = self.tls.as_ref().filter(|_| with_ca) {
            command.env("COHORT_CA", &tls.ca);
        }
        command.envs(env.iter().copied());
        if let Some(network) = &self.network {
            network.enter(&mut command, host)?;
        }
        command.output().context("running the cohort CLI")
    }

    /// Runs a CLI command that must succeed and returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.cli(args)?;
        if !output.status.success() {
            bail!(
                "cohort {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Writes a job file into the sandbox and returns its path.
    pub fn write_job(&mut self, toml: &str) -> Result<PathBuf> {
        self.files += 1;
        let path = self
            .directory
            .path()
            .join(format!("job-{}.toml", self.files));
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// Submits a job file through the CLI; returns the job id.
    pub fn submit(&mut self, toml: &str, extra: &[&str]) -> Result<String> {
        let path = self.write_job(toml)?;
        let path = path.display().to_string();
        let mut args = vec!["submit", path.as_str()];
        args.extend_from_slice(extra);
        Ok(self.cli_ok(&args)?.trim().to_owned())
    }

    /// `cohort status JOB --output json`.
    pub fn job(&self, job_id: &str) -> Result<Value> {
        let text = self.cli_ok(&["status", job_id, "--output", "json"])?;
        Ok(serde_json::from_str(&text)?)
    }

    /// `cohort status --output json`.
    pub fn jobs(&self) -> Result<Vec<Value>> {
        let text = self.cli_ok(&["status", "--output", "json"])?;
        match serde_json::from_str(&text)? {
            Value::Array(jobs) => Ok(jobs),
            other => bail!("expected a JSON array, got {other}"),
        }
    }

    /// `cohort nodes --output json`.
    pub fn nodes(&self) -> Result<Vec<Value>> {
        let text = self.cli_ok(&["nodes", "--output", "json"])?;
        match serde_json::from_str(&text)? {
            Value::Array(nodes) => Ok(nodes),
            other => bail!("expected a JSON array, got {other}"),
        }
    }

    /// Polls until the job's state is `state`; returns the job.
    pub fn wait_for_state(&self, job_id: &str, state: &str, timeout: Duration) -> Result<Value> {
        poll(&format!("job {job_id} to be {state}"), timeout, || {
            let job = self.job(job_id)?;
            let current = job["state"].as_str().unwrap_or_default();
            if current == state {
                return Ok(Some(job));
            }
            let finished = matches!(current, "succeeded" | "failed" | "cancelled");
            if finished {
                bail!("job {job_id} ended {current} instead of {state}: {job}");
            }
            Ok(None)
        })
    }

    /// Polls until node `node_id` has `status` (`ready`, `lost`).
    pub fn wait_for_node(&self, node_id: &str, status: &str, timeout: Duration) -> Result<Value> {
        poll(&format!("node {node_id} to be {status}"), timeout, || {
            Ok(self
                .nodes()?
                .into_iter()
                .find(|node| node["node_id"] == node_id && node["status"] == status))
        })
    }

    /// Pids of the job's ranks as reported by the workers (0 for ranks never started).
    pub fn rank_pids(&self, job_id: &str) -> Result<Vec<u32>> {
        let job = self.job(job_id)?;
        Ok(job["placement"]
            .as_array()
            .map(|ranks| {
                ranks
                    .iter()
                    .map(|rank| rank["pid"].as_u64().unwrap_or(0) as u32)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Polls until every rank of the job reports running; returns their pids.
    pub fn wait_for_running_ranks(&self, job_id: &str) -> Result<Vec<u32>> {
        poll(
            &format!("every rank of {job_id} to run"),
            DEFAULT_TIMEOUT,
            || {
                let job = self.job(job_id)?;
                let ranks = job["placement"].as_array().cloned().unwrap_or_default();
                let running =
                    !ranks.is_empty() && ranks.iter().all(|rank| rank["state"] == "running");
                Ok(running.then(|| {
                    ranks
                        .iter()
                        .map(|rank| rank["pid"].as_u64().unwrap_or(0) as u32)
                        .collect()
                }))
            },
        )
    }

    /// Stops every worker with SIGTERM and waits (at most [`WORKER_STOP_TIMEOUT`] in all) for
    /// them to exit; SIGKILL for those that did not.
    fn stop_workers(&mut self) {
        for daemon in self.workers.values() {
            signal(daemon.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + WORKER_STOP_TIMEOUT;
        for daemon in self.workers.values_mut() {
            while matches!(daemon.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        // Dropping each daemon kills (if still running) and reaps it.
        self.workers.clear();
    }

    /// Live processes of job `job_id` of this cluster, whatever started them: those whose
    /// environment names the job and this sandbox's coordinator.
    pub fn processes_of_job(&self, job_id: &str) -> Vec<u32> {
        processes_with_environment(&[
            format!("{}={job_id}", cohort_proto::env::JOB_ID),
            format!("{}={}", cohort_proto::env::COORDINATOR_ADDR, self.address),
        ])
    }

    /// Polls until none of `pids` is alive.
    pub fn wait_for_processes_gone(&self, pids: &[u32], timeout: Duration) -> Result<()> {
        poll("rank processes to be gone", timeout, || {
            Ok(pids.iter().all(|&pid| !process_alive(pid)).then_some(()))
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Workers first, while the coordinator still answers their last heartbeat and before
        // the directory holding their state goes.
        self.stop_workers();
    }
}
