//! The scheduler's queues, quotas and waiting reasons through the CLI and a real coordinator.

use anyhow::{Context, Result};
use cohort_cluster_tests::sandbox::{Sandbox, SandboxOptions, poll, shell_job};
use std::time::Duration;

#[test]
fn queues_hold_jobs_to_their_quota_name_why_they_wait_and_refuse_what_could_never_start()
-> Result<()> {
    let mut cluster = Sandbox::start_with_options(SandboxOptions {
        coordinator_flags: ["--queue", "research=2:2", "--user-quota", "3"]
            .map(str::to_owned)
            .to_vec(),
        ..SandboxOptions::default()
    })?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    let in_research = |name: &str, ranks: u32| {
        format!(
            "queue = \"research\"\n{}",
            shell_job(name, ranks, "sleep 60")
        )
    };

    let first = cluster.submit(&in_research("first", 2), &[])?;
    cluster.wait_for_running_ranks(&first)?;
    // Two slots are free, but the queue holds its quota of 2.
    let second = cluster.submit(&in_research("second", 1), &[])?;
    let waiting = poll("a waiting reason", Duration::from_secs(30), || {
        let job = cluster.job(&second)?;
        let waiting = job["waiting"].as_str().unwrap_or_default().to_owned();
        Ok((!waiting.is_empty()).then_some(waiting))
    })?;
    assert_eq!(
        waiting,
        "queue research's quota of 2 devices is reached: it holds 2, the job asks for 1"
    );
    let status = cluster.cli_ok(&["status", &second])?;
    assert!(
        status.contains("waiting:   queue research's quota"),
        "{status}"
    );
    // The default queue is not held back by it; the user's quota of 3 is, once reached.
    let elsewhere = cluster.submit(&shell_job("elsewhere", 1, "sleep 60"), &[])?;
    cluster.wait_for_running_ranks(&elsewhere)?;
    let over = cluster.submit(&shell_job("over", 1, "sleep 60"), &[])?;
    let waiting = poll("a waiting reason", Duration::from_secs(30), || {
        let job = cluster.job(&over)?;
        let waiting = job["waiting"].as_str().unwrap_or_default().to_owned();
        Ok((!waiting.is_empty()).then_some(waiting))
    })?;
    assert_eq!(
        waiting,
        "user admin's quota of 3 devices is reached: they hold 3, the job asks for 1"
    );

    let queues: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&["queues", "--output", "json"])?)?;
    let research = queues["queues"]
        .as_array()
        .context("no queues")?
        .iter()
        .find(|queue| queue["name"] == "research")
        .context("no research queue")?;
    assert_eq!(research["weight"], 2.0, "{queues}");
    assert_eq!(research["quota"], 2, "{queues}");
    assert_eq!(research["held_cpu"], 2, "{queues}");
    assert_eq!(
        (
            research["running_jobs"].clone(),
            research["queued_jobs"].clone()
        ),
        (1.into(), 1.into()),
        "{queues}"
    );
    // 2 of the cluster's 4 slots over a weight of 2.
    assert_eq!(research["share"], 0.25, "{queues}");
    assert_eq!(queues["user_quota"], 3, "{queues}");
    let table = cluster.cli_ok(&["queues"])?;
    assert!(
        table.contains("research") && table.contains("admin"),
        "{table}"
    );

    // What could never start is refused at submission, naming why.
    let unknown = cluster.write_job(&format!("queue = \"nope\"\n{}", shell_job("x", 1, "true")))?;
    let refused = cluster.cli(&["submit", unknown.to_str().context("path")?])?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("\"nope\" is not a queue of this cluster (its queues: default, research)"),
        "{said}"
    );
    let wide = cluster.write_job(&in_research("wide", 3))?;
    let refused = cluster.cli(&["submit", wide.to_str().context("path")?])?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("job asks for 3 devices, queue research's quota is 2"),
        "{said}"
    );

    for job in [&first, &second, &elsewhere, &over] {
        cluster.cli_ok(&["cancel", job])?;
    }
    Ok(())
}

#[test]
fn no_acknowledged_submission_is_lost_when_the_coordinator_is_killed_among_them() -> Result<()> {
    use cohort_cluster_tests::sandbox::connect_as;
    use cohort_proto::v1::SubmitJobRequest;
    use cohort_proto::v1::job_control_client::JobControlClient;
    use std::sync::{Arc, Mutex};

    let mut cluster = Sandbox::start()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    // Eight clients submit until the coordinator stops answering: their records share commits.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (address, token) = (
            cluster.address().to_owned(),
            cluster.admin_token().to_owned(),
        );
        let acknowledged = acknowledged.clone();
        clients.push(runtime.spawn(async move {
            let mut client = JobControlClient::new(connect_as(&address, Some(&token)).await?);
            for _ in 0..10_000 {
                let answer = client
                    .submit_job(SubmitJobRequest {
                        spec_toml: shell_job("durable", 1, "true"),
                        wait_for_resources: true,
                        resume_from: String::new(),
                    })
                    .await;
                match answer.ok().and_then(|answer| answer.into_inner().job) {
                    Some(job) => acknowledged.lock().expect("not poisoned").push(job.job_id),
                    None => break,
                }
            }
            anyhow::Ok(())
        }));
    }
    poll(
        "300 acknowledged submissions",
        Duration::from_secs(60),
        || Ok((acknowledged.lock().expect("not poisoned").len() >= 300).then_some(())),
    )?;
    cluster.kill_coordinator();
    for client in clients {
        runtime.block_on(client)??;
    }
    let acknowledged = acknowledged.lock().expect("not poisoned").clone();
    cluster.restart_coordinator()?;
    let known: std::collections::HashSet<String> = cluster
        .jobs()?
        .iter()
        .filter_map(|job| job["job_id"].as_str().map(str::to_owned))
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !known.contains(*id))
        .collect();
    eprintln!(
        "{} submissions acknowledged before SIGKILL, {} jobs after the restart, {} lost",
        acknowledged.len(),
        known.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    Ok(())
}
