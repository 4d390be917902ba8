//! `cohort coordinator` and `cohort worker`: thin wrappers that turn flags into configs and run
//! the daemons until Ctrl-C or SIGTERM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_coordinator::config::QueuePolicy;
use cohort_coordinator::{CoordinatorConfig, StoreLocation};
use cohort_proto::NodeId;
use cohort_proto::Secret;
use cohort_proto::launch::TlsFiles;
use cohort_proto::transport::{self, CaCertificate, ServerTls};
use cohort_worker::WorkerConfig;
use cohort_worker::devices::{Combined, CpuSlots};
use cohort_worker::gpu::GpuInventory;

use crate::args::{ClusterSettings, CoordinatorDaemonArgs, WorkerDaemonArgs};
use crate::coordinator_setup::{PreparedCoordinator, prepare};

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 3600.0) {
        bail!("--{flag} = {value}, expected more than 0 and at most 3600 seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

/// `--restart-backoff-s`: 0 (restart anywhere at once) up to the longest back-off.
fn backoff(value: f64) -> Result<Duration> {
    let most = cohort_coordinator::config::MAX_RESTART_BACKOFF.as_secs_f64();
    if !(value.is_finite() && (0.0..=most).contains(&value)) {
        bail!("--restart-backoff-s = {value}, expected 0 to {most} seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

/// `--preemption-min-runtime-s`: 0 (a resumed job may be preempted at once) up to a day.
fn preemption_min_runtime(value: f64) -> Result<Duration> {
    let most = cohort_coordinator::config::MAX_PREEMPTION_MIN_RUNTIME.as_secs_f64();
    if !(value.is_finite() && (0.0..=most).contains(&value)) {
        bail!("--preemption-min-runtime-s = {value}, expected 0 to {most} seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

/// `--queue NAME=WEIGHT[:QUOTA]`, repeated.
fn queues(specs: &[String]) -> Result<BTreeMap<String, QueuePolicy>> {
    let mut queues = BTreeMap::new();
    for spec in specs {
        let usage = || format!("--queue {spec:?}: expected NAME=WEIGHT or NAME=WEIGHT:QUOTA");
        let (name, policy) = spec.split_once('=').with_context(usage)?;
        let (weight, quota) = match policy.split_once(':') {
            Some((weight, quota)) => (weight, Some(quota)),
            None => (policy, None),
        };
        if !cohort_jobspec::job::is_valid_name(name) {
            bail!(
                "--queue {spec:?}: the name must be 1 to 64 characters of a-z, A-Z, 0-9, '-', '_' or '.'"
            );
        }
        let weight: f64 = weight.parse().ok().with_context(usage)?;
        if !(weight.is_finite() && weight > 0.0 && weight <= MAX_QUEUE_WEIGHT) {
            bail!(
                "--queue {spec:?}: weight {weight}, expected above 0 and at most {MAX_QUEUE_WEIGHT}"
            );
        }
        let quota = match quota {
            Some(quota) => match quota.parse::<u64>() {
                Ok(quota) if quota > 0 => Some(quota),
                _ => bail!(
                    "--queue {spec:?}: quota {quota:?}, expected a number of devices, at least 1"
                ),
            },
            None => None,
        };
        if queues
            .insert(name.to_owned(), QueuePolicy { weight, quota })
            .is_some()
        {
            bail!("--queue {name}: given twice");
        }
    }
    Ok(queues)
}

/// The largest queue weight.
const MAX_QUEUE_WEIGHT: f64 = 1e6;

/// Builds the coordinator's config from flags.
pub fn coordinator_config(settings: &ClusterSettings) -> Result<CoordinatorConfig> {
    let defaults = CoordinatorConfig::default();
    let heartbeat_deadline = seconds("heartbeat-deadline-s", settings.heartbeat_deadline_s)?;
    let heartbeat_interval = seconds("heartbeat-interval-s", settings.heartbeat_interval_s)?;
    if heartbeat_interval >= heartbeat_deadline {
        bail!(
            "--heartbeat-interval-s = {}, expected less than --heartbeat-deadline-s = {}",
            settings.heartbeat_interval_s,
            settings.heartbeat_deadline_s
        );
    }
    Ok(CoordinatorConfig {
        data_dir: settings.data_dir.clone().unwrap_or(defaults.data_dir),
        heartbeat_interval,
        heartbeat_deadline,
        restart_grace: heartbeat_deadline,
        restart_backoff: backoff(settings.restart_backoff_s)?,
        preemption: !settings.no_preemption,
        preemption_min_runtime: preemption_min_runtime(settings.preemption_min_runtime_s)?,
        queues: queues(&settings.queues)?,
        user_quota: match settings.user_quota {
            Some(0) => bail!("--user-quota = 0, expected at least 1 device"),
            quota => quota,
        },
        max_queued_jobs: positive("max-queued-jobs", settings.max_queued_jobs)?,
        max_queued_jobs_per_submitter: positive(
            "max-queued-jobs-per-submitter",
            settings.max_queued_jobs_per_submitter,
        )?,
        join_token: settings
            .join_token_file
            .as_deref()
            .map(read_token_file)
            .transpose()?,
        ..defaults
    })
}

/// Reads a token file: one line, readable by its owner alone (like an ssh key).
pub fn read_token_file(path: &Path) -> Result<Secret> {
    let text = crate::credentials::read_private(path)?
        .with_context(|| format!("{} does not exist", path.display()))?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        bail!(
            "{} does not hold a token (one line of visible characters)",
            path.display()
        );
    }
    Ok(Secret::new(token))
}

fn positive(flag: &str, value: usize) -> Result<usize> {
    if value == 0 {
        bail!("--{flag} = 0, expected at least 1");
    }
    Ok(value)
}

/// Binds the listener and opens the store the flags name, with `config`.
pub async fn prepare_coordinator(
    settings: &ClusterSettings,
    config: CoordinatorConfig,
    listen: &str,
    address_file: Option<&Path>,
    http: Option<&str>,
) -> Result<PreparedCoordinator> {
    let location: StoreLocation = settings.store.parse()?;
    prepare(config, &location, listen, address_file, http).await
}

/// `--leader-lease-s`: whole seconds from [`cohort_coordinator::leadership::MIN_LEASE`] to
/// its maximum.
fn leader_lease(value: f64) -> Result<Duration> {
    use cohort_coordinator::leadership::{MAX_LEASE, MIN_LEASE};
    let (least, most) = (MIN_LEASE.as_secs_f64(), MAX_LEASE.as_secs_f64());
    if !(value.is_finite() && (least..=most).contains(&value) && value.fract() == 0.0) {
        bail!("--leader-lease-s = {value}, expected whole seconds from {least} to {most}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// Whether `address` (`host:port` or `host`) names this machine's loopback.
pub fn is_loopback(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// Whether the coordinator may listen on `listen`: loopback always; any other address only
/// with TLS (the join token always exists: given, or drawn into the data directory), or
/// `insecure`, since calls would carry tokens in the clear.
pub fn listen_policy(listen: &str, tls: bool, insecure: bool) -> Result<()> {
    if tls || insecure || is_loopback(listen) {
        return Ok(());
    }
    bail!(
        "refusing to listen on {listen} without TLS: off loopback, every call (users' tokens, \
         the join token, job specs and their environments, logs) would cross the network \
         unencrypted. Give --tls-cert and --tls-key (`cohort certs create --out DIR --host \
         ADDRESS` makes a CA and a certificate); workers then need the CA (--ca) and the join \
         token (--join-token-file, default <data-dir>/join-token). Pass --insecure to listen \
         there without TLS anyway, on a network only trusted machines reach"
    )
}

/// `cohort coordinator`.
pub async fn coordinator(args: CoordinatorDaemonArgs) -> Result<ExitCode> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(certificate), Some(key)) => Some(ServerTls::read(certificate, key)?),
        _ => None,
    };
    listen_policy(&args.listen, tls.is_some(), args.insecure)?;
    if let Some(http) = &args.http {
        listen_policy(http, tls.is_some(), args.insecure).context("--http")?;
    }
    if args.insecure && tls.is_none() {
        tracing::warn!(
            listen = %args.listen,
            "--insecure: calls to this coordinator cross the network unencrypted (no TLS)"
        );
    }
    let mut config = coordinator_config(&args.settings)?;
    config.tls = tls;
    let location: StoreLocation = args.settings.store.parse()?;
    if matches!(location, StoreLocation::Etcd(_)) {
        config.leader_lease = leader_lease(args.leader_lease_s)?;
    }
    config.advertise_address = args.advertise_address.clone();
    let prepared = tokio::select! {
        prepared = prepare_coordinator(
            &args.settings,
            config,
            &args.listen,
            args.address_file.as_deref(),
            args.http.as_deref(),
        ) => prepared?,
        // A standby waits for the leadership as long as it takes; a signal ends the wait.
        () = shutdown_signal() => return Ok(ExitCode::SUCCESS),
    };
    cohort_coordinator::run(
        prepared.config,
        prepared.store,
        prepared.auth,
        prepared.listener,
        prepared.http,
        prepared.leadership,
        shutdown_signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// The GPUs to offer: those `--gpus` lists (an error if any is missing), none for `none`, or
/// every GPU found when the flag is absent (none, with a note, when there is no CUDA).
fn gpu_inventory(flag: Option<&str>) -> Result<GpuInventory> {
    match flag {
        Some("none") => Ok(GpuInventory::default()),
        Some(list) => {
            let indices = list
                .split(',')
                .map(|index| {
                    index.trim().parse::<u32>().with_context(|| {
                        format!("--gpus {list:?}: expected GPU indices like 0,1 or `none`")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(GpuInventory::detect(Some(&indices)).with_context(|| format!("--gpus {list}"))?)
        }
        None => match GpuInventory::detect(None) {
            Ok(gpus) => Ok(gpus),
            Err(error) => {
                tracing::info!(%error, "offering no GPUs");
                Ok(GpuInventory::default())
            }
        },
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{}", path.display()))
}

/// Whether a worker may start with these TLS settings: on a cluster that serves TLS, the
/// parameter servers it runs must serve TLS too, so it needs a certificate of its own unless
/// it advertises a loopback address. Its files are read now, so that a bad one stops the
/// worker rather than a job.
fn worker_tls_policy(config: &WorkerConfig) -> Result<()> {
    if let Some(ca) = &config.ca {
        CaCertificate::read(ca)?;
    }
    if let Some(files) = &config.tls {
        ServerTls::read(&files.certificate, &files.key)?;
        return Ok(());
    }
    let tls_cluster = transport::uses_tls(&config.coordinator, None) || config.ca.is_some();
    if tls_cluster && !is_loopback(&config.advertise_address) {
        bail!(
            "the coordinator serves TLS, so parameter servers on this node must too: give \
             --tls-cert and --tls-key, a certificate for {} signed by the cluster's CA \
             (`cohort certs create --out DIR --name {} --host {}` beside the CA's files)",
            config.advertise_address,
            config.node_id,
            config.advertise_address
        );
    }
    Ok(())
}

/// `cohort worker`.
pub async fn worker(args: WorkerDaemonArgs) -> Result<ExitCode> {
    let node_id = NodeId::new(args.node_id.unwrap_or_else(cohort_worker::config::hostname))?;
    let cpu_slots = match args.cpu_slots {
        Some(0) => bail!("--cpu-slots = 0, expected at least 1"),
        Some(slots) if slots > 4096 => bail!("--cpu-slots = {slots}, expected at most 4096"),
        Some(slots) => slots,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let state_dir = match &args.state_dir {
        Some(dir) => std::path::absolute(dir)
            .with_context(|| format!("state directory {}", dir.display()))?,
        None => cohort_worker::config::default_state_dir(&node_id)?,
    };
    let config = WorkerConfig {
        coordinator: args.coordinator,
        state_dir,
        node_id,
        advertise_address: args.advertise_address,
        cpu_slots,
        output_dir: std::path::absolute(&args.output_dir)
            .with_context(|| format!("output directory {}", args.output_dir.display()))?,
        cohort_executable: std::env::current_exe().context("locating the cohort executable")?,
        ca: args.trust.ca.as_deref().map(absolute).transpose()?,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(certificate), Some(key)) => Some(TlsFiles {
                certificate: absolute(certificate)?,
                key: absolute(key)?,
            }),
            _ => None,
        },
        join_token: match (&args.join_token_file, &args.join_token) {
            (Some(path), _) => read_token_file(path)?,
            (None, Some(token)) if !token.trim().is_empty() => Secret::new(token.trim()),
            _ => bail!(
                "no join token: give --join-token-file FILE (the coordinator's \
                 <data-dir>/join-token unless it was given one) or COHORT_JOIN_TOKEN"
            ),
        },
    };
    worker_tls_policy(&config)?;
    let gpus = gpu_inventory(args.gpus.as_deref())?;
    let inventory = Combined(vec![
        Box::new(CpuSlots { slots: cpu_slots }),
        Box::new(gpus),
    ]);
    cohort_worker::run(config, Box::new(inventory), shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_read_with_their_weights_and_quotas_and_bad_ones_are_named() {
        let parsed = queues(&["research=2:16".to_owned(), "default=0.5".to_owned()]).unwrap();
        assert_eq!(
            parsed["research"],
            QueuePolicy {
                weight: 2.0,
                quota: Some(16)
            }
        );
        assert_eq!(parsed["default"].quota, None);
        for (bad, says) in [
            ("research", "expected NAME=WEIGHT"),
            ("research=0", "weight 0, expected above 0"),
            ("research=nan", "weight NaN"),
            ("research=1:0", "quota \"0\""),
            ("a b=1", "the name must be"),
        ] {
            let error = queues(&[bad.to_owned()]).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        let error = queues(&["x=1".to_owned(), "x=2".to_owned()]).unwrap_err();
        assert!(error.to_string().contains("given twice"), "{error}");
    }

    #[test]
    fn the_coordinator_listens_off_loopback_only_with_tls_or_when_told_it_is_insecure() {
        for listen in [
            "127.0.0.1:7077",
            "127.0.0.2:0",
            "[::1]:7077",
            "localhost:7077",
        ] {
            assert!(listen_policy(listen, false, false).is_ok(), "{listen}");
        }
        for listen in [
            "0.0.0.0:7077",
            "10.0.0.5:0",
            "[::]:7077",
            "head.example:7077",
        ] {
            let refused = listen_policy(listen, false, false).unwrap_err().to_string();
            assert!(
                refused.contains("TLS")
                    && refused.contains("join token")
                    && refused.contains("--tls-cert"),
                "{refused}"
            );
            assert!(refused.contains("--insecure"), "{refused}");
            assert!(listen_policy(listen, false, true).is_ok(), "{listen}");
            assert!(listen_policy(listen, true, false).is_ok(), "{listen}");
        }
    }

    fn worker_config(coordinator: &str, advertise: &str) -> WorkerConfig {
        WorkerConfig {
            coordinator: coordinator.to_owned(),
            node_id: NodeId::new("node-2").unwrap(),
            advertise_address: advertise.to_owned(),
            cpu_slots: 1,
            output_dir: PathBuf::from("/tmp/out"),
            cohort_executable: PathBuf::from("/usr/bin/cohort"),
            state_dir: PathBuf::from("/tmp/state"),
            join_token: Secret::new("cohort-join-x"),
            ca: None,
            tls: None,
        }
    }

    #[test]
    fn a_worker_of_a_tls_cluster_needs_a_certificate_unless_it_stays_on_loopback() {
        // Plaintext cluster: nothing to serve over TLS.
        assert!(worker_tls_policy(&worker_config("10.0.0.1:7077", "10.0.0.2")).is_ok());
        // TLS cluster (an https:// coordinator), node on the network, no certificate.
        let refused = worker_tls_policy(&worker_config("https://head:7077", "10.0.0.2"))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("--tls-cert") && refused.contains("10.0.0.2"),
            "{refused}"
        );
        assert!(refused.contains("cohort certs create"), "{refused}");
        // On loopback its parameter servers are reached from this machine only.
        assert!(worker_tls_policy(&worker_config("https://head:7077", "127.0.0.1")).is_ok());
        // A CA that cannot be read stops the worker before it registers.
        let mut missing_ca = worker_config("10.0.0.1:7077", "127.0.0.1");
        missing_ca.ca = Some(PathBuf::from("/nonexistent/ca.pem"));
        let refused = worker_tls_policy(&missing_ca).unwrap_err().to_string();
        assert!(refused.contains("/nonexistent/ca.pem"), "{refused}");
    }
}
