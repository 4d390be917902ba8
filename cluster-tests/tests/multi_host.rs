//! A cluster across separate network hosts (one network namespace each, see
//! `cohort_cluster_tests::network`): the coordinator on host 0, one worker per other host.
//! Skipped with a reason where namespaces are unavailable (not root); required under `CI=true`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::network::TestNetwork;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, SandboxOptions, shell_job};

/// A cluster with its coordinator on host 0 and worker `node-H` (one CPU slot) on each host
/// H of 1..hosts; prints the hosts' addresses.
fn cluster_on_hosts(test_name: &str, hosts: usize, heartbeat_deadline_s: f64) -> Option<Sandbox> {
    cluster_on_hosts_with_slots(test_name, hosts, heartbeat_deadline_s, 1)
}

/// [`cluster_on_hosts`] with `slots` CPU slots per worker.
fn cluster_on_hosts_with_slots(
    test_name: &str,
    hosts: usize,
    heartbeat_deadline_s: f64,
    slots: u32,
) -> Option<Sandbox> {
    let network = TestNetwork::create_or_skip(test_name, hosts)?;
    let addresses: Vec<String> = (0..hosts)
        .map(|host| network.address(host).to_string())
        .collect();
    eprintln!("{test_name}: hosts {addresses:?} (coordinator on host 0)");
    let options = SandboxOptions {
        heartbeat_deadline_s,
        ..SandboxOptions::default()
    };
    let mut cluster =
        Sandbox::start_on_network(network, options).expect("starting the coordinator");
    for host in 1..hosts {
        cluster
            .add_worker_on(&format!("node-{host}"), slots, host)
            .expect("starting a worker");
    }
    Some(cluster)
}

#[test]
fn ranks_on_separate_hosts_see_their_own_address_and_rank_zeros_as_master() -> Result<()> {
    let Some(mut cluster) = cluster_on_hosts("multi-host command job", 3, 5.0) else {
        return Ok(());
    };
    let network = cluster.network().expect("a networked cluster");
    let expected: BTreeMap<String, String> = (1..3)
        .map(|host| (format!("node-{host}"), network.address(host).to_string()))
        .collect();
    let script = r#"echo "node=$COHORT_NODE_ID addr=$COHORT_NODE_ADDR master=$MASTER_ADDR""#;
    let job_id = cluster.submit(&shell_job("hosts", 2, script), &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    let placement = job["placement"].as_array().expect("a placement");
    let rank0_node = placement[0]["node_id"].as_str().expect("rank 0's node");
    let master = &expected[rank0_node];

    let logs = cluster.cli_ok(&["logs", &job_id])?;
    for (rank, place) in placement.iter().enumerate() {
        let node = place["node_id"].as_str().expect("a node");
        let line = format!(
            "[rank {rank}] node={node} addr={} master={master}",
            expected[node]
        );
        assert!(logs.contains(&line), "missing {line:?} in:\n{logs}");
    }
    assert_eq!(placement.len(), 2, "{job}");
    Ok(())
}

#[test]
fn a_partitioned_host_is_lost_and_named_and_after_healing_runs_jobs_again() -> Result<()> {
    let deadline_s = 3.0;
    let Some(mut cluster) = cluster_on_hosts("multi-host partition", 2, deadline_s) else {
        return Ok(());
    };
    let job_id = cluster.submit(&shell_job("cut", 1, "exec sleep 600"), &[])?;
    cluster.wait_for_running_ranks(&job_id)?;

    cluster.network().expect("a networked cluster").cut(1)?;
    let lost =
        cluster.wait_for_node("node-1", "lost", Duration::from_secs_f64(deadline_s * 4.0))?;
    let failed = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("node-1"),
        "the reason names the lost node: {reason:?} ({lost})"
    );

    cluster.network().expect("a networked cluster").heal(1)?;
    cluster.wait_for_node("node-1", "ready", DEFAULT_TIMEOUT)?;
    let again = cluster.submit(&shell_job("healed", 1, "echo healed"), &[])?;
    cluster.wait_for_state(&again, "succeeded", DEFAULT_TIMEOUT)?;
    Ok(())
}

#[test]
fn three_hosts_train_the_mlp_to_83_percent_in_one_epoch() -> Result<()> {
    let Some(mut cluster) = cluster_on_hosts("multi-host training", 4, 5.0) else {
        return Ok(());
    };
    let job_id = cluster.submit(&mlp_job("hosts-mlp", 3, 1, None, 0.002, ""), &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(900))?;
    // Each rank on its own host: the ring's links run between host addresses, the only route
    // there is between the ranks (each listens on its node's address).
    let nodes: std::collections::BTreeSet<&str> = job["placement"]
        .as_array()
        .expect("a placement")
        .iter()
        .filter_map(|rank| rank["node_id"].as_str())
        .collect();
    assert_eq!(nodes.len(), 3, "one rank per host: {job}");
    let metrics = job["metrics"].as_array().expect("metrics");
    let accuracy = metrics[0]["eval_accuracy"].as_f64().expect("an accuracy");
    eprintln!(
        "3 hosts, MLP, 1 epoch: test accuracy {:.2}%",
        accuracy * 100.0
    );
    assert!(accuracy >= 0.83, "test accuracy {accuracy} after 1 epoch");
    Ok(())
}

/// A CLI call an attacker makes: token, extra variables, arguments, and the refusal expected.
type Attempt<'a> = (
    Option<&'a str>,
    Vec<(&'a str, &'a str)>,
    Vec<&'a str>,
    &'a str,
);

#[test]
fn a_host_without_credentials_can_do_nothing_to_a_cluster_on_the_network() -> Result<()> {
    let Some(mut cluster) = cluster_on_hosts("multi-host attacker", 3, 5.0) else {
        return Ok(());
    };
    let job_id = cluster.submit(&shell_job("target", 1, "exec sleep 600"), &[])?;
    cluster.wait_for_state(&job_id, "running", DEFAULT_TIMEOUT)?;
    // Host 2 runs no worker: it is someone else's machine on the same network.
    let attacker = 2;
    let forged = format!("cohort-user-{}", "0".repeat(64));
    let forged_job = format!("cohort-job-{}", "0".repeat(64));
    let attempts: [Attempt<'_>; 5] = [
        (None, vec![], vec!["status"], "no credentials"),
        (None, vec![], vec!["cancel", &job_id], "no credentials"),
        (Some(&forged), vec![], vec!["nodes"], "unknown token"),
        (
            Some(&forged),
            vec![],
            vec!["logs", &job_id],
            "unknown token",
        ),
        (
            None,
            vec![
                ("COHORT_JOB_ID", &job_id),
                ("COHORT_RENDEZVOUS_ADDR", cluster.address()),
                ("COHORT_JOB_TOKEN", &forged_job),
            ],
            vec!["kv", "set", "MASTER_ADDR", "10.77.0.3"],
            "not job",
        ),
    ];
    for (token, env, args, expected) in &attempts {
        let output = cluster.cli_from(attacker, *token, env, args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "cohort {args:?} succeeded from host 2"
        );
        assert!(stderr.contains(expected), "cohort {args:?}: {stderr}");
    }
    // The job is untouched, and its owner (the admin, on host 0) still reaches it.
    assert_eq!(cluster.job(&job_id)?["state"], "running");
    cluster.cli_ok(&["cancel", &job_id])?;
    Ok(())
}

#[test]
fn two_hosts_of_two_ranks_all_reduce_hierarchically_with_less_on_the_host_links() -> Result<()> {
    let Some(mut cluster) = cluster_on_hosts_with_slots("multi-host hierarchical", 3, 5.0, 2)
    else {
        return Ok(());
    };
    let network = cluster.network().expect("a networked cluster");
    for host in 1..3 {
        network.rate_limit(host, "1gbit")?;
    }
    // 4 MiB of f32, timed on a flat TCP ring and on the group jobs get (`auto`), call by call.
    let elements: u64 = 1 << 20;
    let bytes = elements * 4;
    let job = format!(
        r#"
version = 1
name = "hierarchical"
kind = "command"
[resources]
ranks = 4
[command]
program = {program}
args = ["bench", "allreduce-rank", "--elements", "{elements}", "--dtype", "f32", "--links", "authenticated", "--transport", "tcp,auto"]
"#,
        program = serde_json::json!(
            cohort_cluster_tests::sandbox::cohort_executable()
                .display()
                .to_string()
        ),
    );
    let job_id = cluster.submit(&job, &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(120))?;
    // Ranks are placed node by node: 0 and 1 on one host, 2 and 3 on the other.
    let nodes: Vec<&str> = job["placement"]
        .as_array()
        .expect("a placement")
        .iter()
        .map(|place| place["node_id"].as_str().expect("a node"))
        .collect();
    assert!(
        nodes[0] == nodes[1] && nodes[2] == nodes[3] && nodes[0] != nodes[2],
        "{nodes:?}"
    );
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    let result = logs
        .lines()
        .find_map(|line| {
            line.split_once("cohort-bench-result ")
                .map(|(_, json)| json)
        })
        .expect("rank 0 printed the result");
    // Per rank, per kind of group: its name (`links`) and one sample per size.
    let per_rank: Vec<serde_json::Value> = serde_json::from_str(result)?;
    let kind = |name: &str| -> (f64, Vec<u64>) {
        let samples: Vec<&serde_json::Value> = per_rank
            .iter()
            .map(|kinds| {
                let kinds = kinds.as_array().expect("kinds");
                let kind = kinds.iter().find(|k| k["links"] == name).expect(name);
                &kind["samples"][0]
            })
            .collect();
        let slowest = samples
            .iter()
            .map(|sample| sample["time_s"].as_f64().expect("a time"))
            .fold(0.0, f64::max);
        let sent = samples
            .iter()
            .map(|sample| sample["bytes_sent"].as_u64().expect("counted bytes"))
            .collect();
        (slowest, sent)
    };
    let (flat_s, flat_sent) = kind("authenticated");
    let (hierarchical_s, hierarchical_sent) = kind("auto");
    // Bytes that cross a host's link (1 Gbit/s): in the flat ring 0 -> 1 -> 2 -> 3 -> 0 only
    // rank 1's and rank 3's; in the hierarchical group every rank's ring across nodes.
    assert_eq!(flat_sent, vec![bytes * 3 / 2; 4]);
    assert_eq!(hierarchical_sent, vec![bytes / 2; 4]);
    let flat_host = flat_sent[1];
    let hierarchical_host = hierarchical_sent[0] + hierarchical_sent[1];
    let speedup = flat_s / hierarchical_s;
    eprintln!(
        "2 hosts x 2 ranks, 4 MiB, host links at 1 Gbit/s: bytes across each host link per \
         all-reduce {flat_host} (flat ring) and {hierarchical_host} (hierarchical), ratio {:.2}; \
         time {:.1} ms and {:.1} ms, busbw ratio {speedup:.2}",
        flat_host as f64 / hierarchical_host as f64,
        flat_s * 1e3,
        hierarchical_s * 1e3,
    );
    assert_eq!(flat_host * 2, hierarchical_host * 3);
    // The links bound both: the hierarchical group is faster by about the bytes it saves
    // (1.5x in theory).
    assert!(speedup > 1.25, "busbw ratio {speedup:.2}");
    Ok(())
}
