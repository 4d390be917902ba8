//! The attacks of the security issue, tried against a real cluster through the CLI and raw
//! gRPC: every one is refused, naming why. (The same decisions are unit-tested per RPC in
//! `coordinator/src/service.rs`; the table is in `docs/security.md`.)

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cohort_cluster_tests::sandbox::{
    DEFAULT_TIMEOUT, Sandbox, connect_as, one_slot_registration, shell_job,
};
use cohort_proto::v1::membership_client::MembershipClient;

/// Runs `args` as `token`; returns (success, stdout, stderr).
fn run(cluster: &Sandbox, token: Option<&str>, args: &[&str]) -> Result<(bool, String, String)> {
    let output = cluster.cli_as(token, args)?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Runs `args` as `token`, which must fail with a message containing `expected`.
fn refused(cluster: &Sandbox, token: Option<&str>, args: &[&str], expected: &str) -> Result<()> {
    let (ok, stdout, stderr) = run(cluster, token, args)?;
    assert!(!ok, "cohort {} succeeded: {stdout}", args.join(" "));
    assert!(
        stderr.contains(expected),
        "cohort {}: {stderr}",
        args.join(" ")
    );
    Ok(())
}

#[test]
fn without_a_valid_token_nothing_and_users_see_and_cancel_only_their_own_jobs() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    refused(&cluster, None, &["status"], "no credentials")?;
    refused(&cluster, None, &["nodes"], "no credentials")?;
    let forged = format!("cohort-user-{}", "0".repeat(64));
    refused(&cluster, Some(&forged), &["status"], "unknown token")?;

    let alice = cluster
        .cli_ok(&["users", "add", "alice"])?
        .trim()
        .to_owned();
    let bob = cluster.cli_ok(&["users", "add", "bob"])?.trim().to_owned();
    assert!(
        alice.starts_with("cohort-user-") && alice.len() == 76,
        "{alice}"
    );
    let path = cluster.write_job(&shell_job("alices", 1, "exec sleep 600"))?;
    let path = path.display().to_string();
    let (ok, stdout, stderr) = run(
        &cluster,
        Some(&alice),
        &["submit", &path, "--wait-for-resources"],
    )?;
    assert!(ok, "{stderr}");
    let job_id = stdout.trim().to_owned();

    // Another user's token neither reads, lists, follows nor cancels it.
    refused(
        &cluster,
        Some(&bob),
        &["status", &job_id],
        "user bob may not read",
    )?;
    refused(
        &cluster,
        Some(&bob),
        &["logs", &job_id],
        "user bob may not read",
    )?;
    refused(
        &cluster,
        Some(&bob),
        &["cancel", &job_id],
        "user bob may not cancel",
    )?;
    let (ok, listed, _) = run(&cluster, Some(&bob), &["status", "--output", "json"])?;
    assert!(
        ok && !listed.contains(&job_id),
        "bob lists alice's job: {listed}"
    );
    let (ok, listed, _) = run(&cluster, Some(&alice), &["status", "--output", "json"])?;
    assert!(
        ok && listed.contains(&job_id) && listed.contains("\"alice\""),
        "{listed}"
    );
    // A user cannot make themselves an admin or read the audit log.
    refused(
        &cluster,
        Some(&alice),
        &["users", "add", "mallory", "--admin"],
        "only admins",
    )?;
    refused(&cluster, Some(&alice), &["audit"], "only admins")?;

    // A removed user is locked out at once; the owner cancels their own job.
    cluster.cli_ok(&["users", "remove", "bob"])?;
    refused(&cluster, Some(&bob), &["status"], "unknown token")?;
    let (ok, _, stderr) = run(&cluster, Some(&alice), &["cancel", &job_id])?;
    assert!(ok, "{stderr}");

    let audit = cluster.cli_ok(&["audit", "--output", "json"])?;
    let entries: serde_json::Value = serde_json::from_str(&audit)?;
    let seen: Vec<String> = entries
        .as_array()
        .context("a list")?
        .iter()
        .map(|entry| {
            format!(
                "{} | {} | {} | {}",
                entry["actor"].as_str().unwrap_or_default(),
                entry["action"].as_str().unwrap_or_default(),
                entry["target"].as_str().unwrap_or_default(),
                entry["outcome"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let expected_prefixes = [
        "user admin | users add | alice | ok".to_owned(),
        "user admin | users add | bob | ok".to_owned(),
        format!("user alice | submit | {job_id} | ok"),
        format!("user bob | cancel | {job_id} | user bob may not cancel"),
        "user alice | users add | mallory | user alice may not manage users".to_owned(),
        "user admin | users remove | bob | ok".to_owned(),
        format!("user alice | cancel | {job_id} | ok"),
    ];
    let workers: Vec<&String> = seen.iter().filter(|e| !e.starts_with("a worker")).collect();
    assert_eq!(workers.len(), expected_prefixes.len(), "{seen:#?}");
    for (entry, prefix) in workers.iter().zip(&expected_prefixes) {
        assert!(entry.starts_with(prefix.as_str()), "{entry} / {prefix}");
    }
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn workers_need_the_join_token_and_cannot_take_a_live_nodes_id() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| -> Result<Sandbox> {
        let mut cluster = Sandbox::start()?;
        cluster.add_worker("node-a", 1)?;
        Ok(cluster)
    })
    .await??;
    let request = one_slot_registration;
    let join = std::fs::read_to_string(cluster.join_token_file())?;
    for (token, code) in [
        (None, tonic::Code::Unauthenticated),
        (Some("cohort-join-guessed"), tonic::Code::Unauthenticated),
        // A user (even an admin) is not a worker.
        (Some(cluster.admin_token()), tonic::Code::PermissionDenied),
    ] {
        let mut client = MembershipClient::new(connect_as(cluster.address(), token).await?);
        let status = client
            .register(request("thief"))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{token:?}: {status:?}");
    }
    // The join token admits a new node, but not a live node's id without that node's session.
    let mut client = MembershipClient::new(connect_as(cluster.address(), Some(join.trim())).await?);
    let status = client
        .register(request("node-a"))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("live worker"),
        "{}",
        status.message()
    );
    assert!(client.register(request("node-new")).await.is_ok());
    let nodes = tokio::task::spawn_blocking(move || cluster.nodes()).await??;
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["node_id"].as_str()).collect();
    assert!(!ids.contains(&"thief"), "{ids:?}");
    Ok(())
}

#[test]
fn a_jobs_token_opens_its_own_rendezvous_and_no_other_jobs() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    let victim = cluster.submit(&shell_job("victim", 1, "exec sleep 600"), &[])?;
    cluster.wait_for_state(&victim, "running", DEFAULT_TIMEOUT)?;
    let script = format!(
        "if COHORT_JOB_ID={victim} \"$COHORT_BIN\" kv set MASTER_ADDR 6.6.6.6; then echo ACCEPTED; \
         else echo REFUSED; fi; \"$COHORT_BIN\" kv set own-key ok && echo OWN-OK"
    );
    let attacker = cluster.submit(&shell_job("attacker", 1, &script), &[])?;
    cluster.wait_for_state(&attacker, "succeeded", DEFAULT_TIMEOUT)?;
    let logs = cluster.cli_ok(&["logs", &attacker])?;
    assert!(
        logs.contains("REFUSED") && !logs.contains("ACCEPTED"),
        "{logs}"
    );
    assert!(logs.contains(&format!("not job {victim}'s")), "{logs}");
    assert!(logs.contains("OWN-OK"), "{logs}");
    // The token is never shown: not in the job's record nor its status.
    let record = cluster.cli_ok(&["status", &attacker, "--output", "json"])?;
    assert!(!record.contains("cohort-job-"), "{record}");
    cluster.cli_ok(&["cancel", &victim])?;
    Ok(())
}

#[test]
fn the_coordinator_refuses_to_listen_off_loopback_without_insecure() -> Result<()> {
    let data = tempfile::tempdir()?;
    let started = Instant::now();
    let output = std::process::Command::new(cohort_cluster_tests::sandbox::cohort_executable())
        .args(["coordinator", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .env_remove("RUST_LOG")
        .output()?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it started: {stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        stderr.contains("TLS") && stderr.contains("join token"),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure"), "{stderr}");
    eprintln!("refused in {took:?}: {stderr}");
    Ok(())
}
