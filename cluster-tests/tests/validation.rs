//! Invalid job specs are refused with a message naming the field, by the CLI before sending and
//! by the coordinator on arrival; none reaches the store.

use anyhow::Result;
use cohort_cluster_tests::sandbox::Sandbox;
use cohort_proto::v1::SubmitJobRequest;
use cohort_proto::v1::job_control_client::JobControlClient;

const VALID_TAIL: &str = r#"
[command]
program = "true"
"#;

/// (what is wrong, the field the message must name, the spec).
fn invalid_specs() -> Vec<(&'static str, &'static str, String)> {
    let head = "version = 1\nkind = \"command\"\n";
    vec![
        (
            "unknown field",
            "colour",
            format!("{head}colour = \"blue\"\n{VALID_TAIL}"),
        ),
        (
            "zero ranks",
            "resources.ranks",
            format!("{head}[resources]\nranks = 0\n{VALID_TAIL}"),
        ),
        (
            "absurd ranks",
            "resources.ranks",
            format!("{head}[resources]\nranks = 1000000000\n{VALID_TAIL}"),
        ),
        (
            "absurd devices per rank",
            "resources.devices_per_rank",
            format!("{head}[resources]\ndevices_per_rank = 100000\n{VALID_TAIL}"),
        ),
        (
            "ranks of the wrong type",
            "resources.ranks",
            format!("{head}[resources]\nranks = \"three\"\n{VALID_TAIL}"),
        ),
        (
            "empty command",
            "command.program",
            format!("{head}[command]\nprogram = \"\"\n"),
        ),
        (
            "bad version",
            "version",
            format!("version = 9\nkind = \"command\"\n{VALID_TAIL}"),
        ),
        (
            "priority out of range",
            "priority",
            format!("{head}priority = 99999\n{VALID_TAIL}"),
        ),
        (
            "unknown kind",
            "kind",
            format!("version = 1\nkind = \"teleport\"\n{VALID_TAIL}"),
        ),
        (
            "args of the wrong type",
            "command.args",
            format!("{head}[command]\nprogram = \"sh\"\nargs = \"-c true\"\n"),
        ),
        (
            "bad environment variable name",
            "command.env",
            format!("{head}[command]\nprogram = \"sh\"\nenv = {{ \"1BAD\" = \"x\" }}\n"),
        ),
    ]
}

#[test]
fn the_cli_refuses_invalid_specs_naming_the_field() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    for (what, field, spec) in invalid_specs() {
        let path = cluster.write_job(&spec)?;
        let output = cluster.cli(&["submit", &path.display().to_string()])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what}: accepted");
        assert!(
            stderr.contains(field),
            "{what}: message does not name {field}: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{what}: not one line: {stderr}"
        );
    }
    assert!(
        cluster.jobs()?.is_empty(),
        "an invalid job reached the store"
    );
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn the_coordinator_refuses_invalid_specs_sent_directly() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(Sandbox::start).await??;
    let mut client = JobControlClient::connect(format!("http://{}", cluster.address())).await?;
    for (what, field, spec) in invalid_specs() {
        let status = client
            .submit_job(SubmitJobRequest {
                spec_toml: spec,
                wait_for_resources: true,
            })
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{what}: {}",
            status.message()
        );
    }
    let oversized = format!(
        "version = 1\nkind = \"command\"\n# {}\n{VALID_TAIL}",
        "x".repeat(70_000)
    );
    let status = client
        .submit_job(SubmitJobRequest {
            spec_toml: oversized,
            wait_for_resources: true,
        })
        .await
        .expect_err("oversized spec");
    assert!(status.message().contains("expected at most"), "{status:?}");
    let jobs = tokio::task::spawn_blocking(move || cluster.jobs()).await??;
    assert!(jobs.is_empty(), "an invalid job reached the store");
    Ok(())
}
