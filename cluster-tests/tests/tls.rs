//! A cluster that serves TLS (`cohort certs create`, the coordinator with `--tls-cert`, workers
//! and clients with the CA): plaintext clients and clients that trust another CA are refused,
//! and training, rendezvous and parameter servers all work over TLS.

use anyhow::Result;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, SandboxOptions, shell_job};
use cohort_proto::v1::ListJobsRequest;
use cohort_proto::v1::job_control_client::JobControlClient;

fn tls_cluster() -> Result<Sandbox> {
    let mut cluster = Sandbox::start_with_options(SandboxOptions {
        tls: true,
        ..SandboxOptions::default()
    })?;
    cluster.add_worker("node-a", 4)?;
    Ok(cluster)
}

#[test]
fn plaintext_clients_and_clients_trusting_another_ca_are_refused() -> Result<()> {
    let cluster = tls_cluster()?;
    let token = Some(cluster.admin_token());

    // Plaintext on the TLS port: no answer, and the CLI says what is missing.
    let plaintext = cluster.cli_without_ca(token, &["nodes"])?;
    let stderr = String::from_utf8_lossy(&plaintext.stderr);
    assert!(
        !plaintext.status.success(),
        "plaintext was answered: {stderr}"
    );
    assert!(stderr.contains("--ca"), "{stderr}");
    eprintln!("plaintext client: {}", stderr.trim());

    // A client that trusts another CA does not trust this coordinator.
    let other = cluster.path().join("other-ca");
    let made = std::process::Command::new(cohort_cluster_tests::sandbox::cohort_executable())
        .args(["certs", "create", "--host", "127.0.0.1", "--out"])
        .arg(&other)
        .output()?;
    assert!(made.status.success());
    let other_ca = other.join("ca.pem").display().to_string();
    let untrusting = cluster.cli_from(0, token, &[("COHORT_CA", &other_ca)], &["nodes"])?;
    let stderr = String::from_utf8_lossy(&untrusting.stderr);
    assert!(!untrusting.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
    eprintln!("client trusting another CA: {}", stderr.trim());

    // The same token with the cluster's CA works.
    assert!(cluster.cli_ok(&["nodes"])?.contains("node-a"));
    Ok(())
}

#[tokio::test]
async fn a_raw_plaintext_grpc_client_gets_no_answer_from_the_tls_port() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(tls_cluster).await??;
    // An HTTP/2 client without TLS, as an attacker's tool would be: the TLS handshake fails
    // and no call is answered.
    let refused = match cohort_cluster_tests::sandbox::connect_as(
        cluster.address(),
        Some(cluster.admin_token()),
    )
    .await
    {
        Err(error) => format!("connect: {error}"),
        Ok(channel) => {
            let status = JobControlClient::new(channel)
                .list_jobs(ListJobsRequest::default())
                .await
                .expect_err("answered in plaintext");
            format!("{:?}: {}", status.code(), status.message())
        }
    };
    eprintln!("raw plaintext client: {refused}");
    // Over TLS with the CA the same call is answered.
    let channel = cluster.connect(Some(cluster.admin_token())).await?;
    JobControlClient::new(channel)
        .list_jobs(ListJobsRequest::default())
        .await?;
    Ok(())
}

#[test]
fn ranks_rendezvous_and_parameter_servers_work_over_tls() -> Result<()> {
    let mut cluster = tls_cluster()?;
    // A command job's rank uses the rendezvous store through `cohort kv`, over TLS with the
    // CA its worker passes on.
    let script = r#"test -n "$COHORT_CA" && "$COHORT_BIN" kv set greeting hello && "$COHORT_BIN" kv get greeting"#;
    let job_id = cluster.submit(&shell_job("kv-over-tls", 1, script), &[])?;
    cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    assert!(cluster.cli_ok(&["logs", &job_id])?.contains("hello"));

    // A parameter-server job: the servers serve TLS with the node's certificate and the ranks
    // verify them against the CA.
    let parallel = "comm = \"ps\"\nps_shards = 2\nps_mode = \"sync\"";
    let job_id = cluster.submit(
        &mlp_job("ps-over-tls", 2, 1, Some(20), 0.001, parallel),
        &[],
    )?;
    let job = cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    assert_eq!(job["metrics"][0]["step"], 20, "{job}");
    let server_logs = cluster.cli_ok(&["logs", &job_id, "--rank", "2"])?;
    assert!(
        server_logs.contains("parameter server listening") && server_logs.contains("https://"),
        "{server_logs}"
    );
    Ok(())
}
