//! Invalid job specs are refused with a message naming the field, by the CLI before sending and
//! by the coordinator on arrival; none reaches the store. Hostile ones (huge keys and values,
//! deep nesting) get a short message on one line too, which a gRPC status can carry.

use anyhow::Result;
use cohort_cluster_tests::sandbox::Sandbox;
use cohort_proto::text::MAX_ERROR_BYTES;
use cohort_proto::v1::SubmitJobRequest;
use cohort_proto::v1::job_control_client::JobControlClient;

const VALID_TAIL: &str = r#"
[command]
program = "true"
"#;

/// (what is wrong, the field the message must name, the spec).
fn invalid_specs() -> Vec<(&'static str, &'static str, String)> {
    let head = "version = 1\nkind = \"command\"\n";
    let train = "version = 1\nkind = \"train\"\n";
    let env =
        |variables: &str| format!("{head}[command]\nprogram = \"sh\"\nenv = {{ {variables} }}\n");
    vec![
        (
            "absolute checkpoint directory",
            "checkpoint.directory",
            format!("{train}[checkpoint]\ndirectory = \"/etc/cron.d\"\n"),
        ),
        (
            "checkpoint directory out of the output directory",
            "checkpoint.directory",
            format!("{train}[checkpoint]\ndirectory = \"runs/../../elsewhere\"\n"),
        ),
        (
            "environment sets the device allocation",
            "command.env.CUDA_VISIBLE_DEVICES",
            env("CUDA_VISIBLE_DEVICES = \"0,1,2,3\""),
        ),
        (
            "environment sets the rank",
            "command.env.RANK",
            env("RANK = \"0\""),
        ),
        (
            "environment sets a cohort variable",
            "command.env.COHORT_FOO",
            env("COHORT_FOO = \"x\""),
        ),
        (
            "a 60 KB value of the wrong type",
            "priority",
            format!("{head}priority = \"{}\"\n{VALID_TAIL}", "v".repeat(60_000)),
        ),
        (
            "arguments nested 5,000 deep",
            "command.args",
            format!(
                "{head}[command]\nprogram = \"sh\"\nargs = {}\"x\"{}\n",
                "[".repeat(5_000),
                "]".repeat(5_000)
            ),
        ),
        (
            "a 60 KB unknown key",
            "unknown field",
            format!("{head}{} = 1\n{VALID_TAIL}", "k".repeat(60_000)),
        ),
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
        assert!(
            stderr.len() <= 2 * MAX_ERROR_BYTES,
            "{what}: {} bytes",
            stderr.len()
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
    let channel =
        cohort_cluster_tests::sandbox::connect_as(cluster.address(), Some(cluster.admin_token()))
            .await?;
    let mut client = JobControlClient::new(channel);
    for (what, field, spec) in invalid_specs() {
        let status = client
            .submit_job(SubmitJobRequest {
                spec_toml: spec,
                wait_for_resources: true,
                resume_from: String::new(),
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
        assert!(
            status.message().len() <= MAX_ERROR_BYTES && !status.message().contains('\n'),
            "{what}: {} bytes: {}",
            status.message().len(),
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
            resume_from: String::new(),
        })
        .await
        .expect_err("oversized spec");
    assert!(status.message().contains("expected at most"), "{status:?}");
    let jobs = tokio::task::spawn_blocking(move || cluster.jobs()).await??;
    assert!(jobs.is_empty(), "an invalid job reached the store");
    Ok(())
}
