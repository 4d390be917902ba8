//! Hostile clients against a real coordinator: malformed messages, a forged
//! worker session, a worker that reports a rank's detail of several megabytes. None of them may
//! crash the coordinator, make a job unreadable, stop it from restarting on its data, or echo
//! their input back at length.

use anyhow::{Context, Result, bail};
use cohort_cluster_tests::sandbox::{
    DEFAULT_TIMEOUT, Sandbox, connect_as, one_slot_registration, shell_job,
};
use cohort_proto::MAX_MESSAGE_BYTES;
use cohort_proto::transport::Connection;
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::membership_client::MembershipClient;
use cohort_proto::v1::{
    HeartbeatRequest, RankReport, RankState, RegisterRequest, SubmitJobRequest, instruction,
};

/// `SubmitJobRequest` as raw bytes, so a test can send a spec that is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawSubmit {
    /// Field 1 of `SubmitJobRequest` (`spec_toml`).
    #[prost(bytes = "vec", tag = "1")]
    spec_toml: Vec<u8>,
}

#[tokio::test(flavor = "current_thread")]
async fn a_spec_that_is_not_utf8_is_an_invalid_argument_naming_the_field() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(Sandbox::start).await??;
    let channel = connect_as(cluster.address(), Some(cluster.admin_token())).await?;

    // A spec that is not UTF-8: the caller's mistake, not the server's.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let status = grpc
        .unary::<RawSubmit, RawSubmit, _>(
            tonic::Request::new(RawSubmit {
                spec_toml: vec![b'v', 0xff, 0xfe, b'\n'],
            }),
            "/cohort.v1.JobControl/SubmitJob".parse()?,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("a spec that is not UTF-8 is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("spec_toml"),
        "{}",
        status.message()
    );

    // (Huge keys, deep nesting and long values: `validation.rs`, through the CLI and gRPC.)
    let jobs = tokio::task::spawn_blocking(move || cluster.jobs()).await??;
    assert!(jobs.is_empty(), "a refused job reached the store");
    Ok(())
}

/// A worker of the test's own making: registers with one CPU slot, and answers for its ranks.
struct FakeWorker {
    /// Its membership client.
    client: MembershipClient<Connection>,
    /// Its instruction stream.
    stream: tonic::Streaming<cohort_proto::v1::Instruction>,
    /// Its session id.
    session_id: String,
}

impl FakeWorker {
    async fn register(address: &str, node_id: &str, join_token: &str) -> Result<Self> {
        let mut client = MembershipClient::new(connect_as(address, Some(join_token)).await?);
        let mut stream = client
            .register(RegisterRequest {
                hostname: "fake".to_owned(),
                ..one_slot_registration(node_id)
            })
            .await?
            .into_inner();
        let Some(instruction::Kind::Registered(registered)) =
            stream.message().await?.and_then(|message| message.kind)
        else {
            bail!("the stream did not open with `registered`");
        };
        Ok(Self {
            client,
            stream,
            session_id: registered.session_id,
        })
    }

    /// Waits for the next start instruction; returns (job, rank).
    async fn next_start(&mut self) -> Result<(String, u32)> {
        loop {
            let message = tokio::time::timeout(DEFAULT_TIMEOUT, self.stream.message())
                .await
                .context("waiting for a start instruction")??
                .context("the instruction stream ended")?;
            if let Some(instruction::Kind::StartRank(start)) = message.kind {
                return Ok((start.job_id, start.rank));
            }
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_forged_session_speaks_for_no_one_and_a_huge_detail_is_cut() -> Result<()> {
    let cluster = tokio::task::spawn_blocking(Sandbox::start).await??;
    let address = cluster.address().to_owned();
    let join_token = std::fs::read_to_string(cluster.join_token_file())?;
    let mut worker = FakeWorker::register(&address, "fake-node", join_token.trim()).await?;
    let spec = shell_job("victim", 1, "exec sleep 600");
    let mut control =
        JobControlClient::new(connect_as(&address, Some(cluster.admin_token())).await?);
    let job_id = control
        .submit_job(SubmitJobRequest {
            spec_toml: spec,
            wait_for_resources: true,
            resume_from: String::new(),
        })
        .await?
        .into_inner()
        .job
        .context("submitted job")?
        .job_id;
    let (started, rank) = worker.next_start().await?;
    assert_eq!(started, job_id);
    let running = RankReport {
        job_id: job_id.clone(),
        rank,
        state: RankState::Running as i32,
        pid: 4242,
        ..RankReport::default()
    };
    let heartbeat = |node: &str| HeartbeatRequest {
        node_id: node.to_owned(),
        session_id: String::new(),
        ranks: vec![running.clone()],
        leaving: false,
    };
    let mut real = heartbeat("fake-node");
    real.session_id = worker.session_id.clone();
    assert!(worker.client.heartbeat(real).await?.into_inner().accepted);

    // Someone who knows the node's name but not its session cannot report for it: not with a
    // guess, not with the old sequential ids.
    for guess in [
        "1",
        "2",
        &"0".repeat(32),
        "ffffffffffffffffffffffffffffffff",
    ] {
        let mut forged = heartbeat("fake-node");
        forged.session_id = guess.to_owned();
        forged.ranks[0].state = RankState::Exited as i32;
        forged.ranks[0].exit_code = Some(0);
        let accepted = worker.client.heartbeat(forged).await?.into_inner().accepted;
        assert!(!accepted, "a forged session id {guess:?} was accepted");
    }
    assert_eq!(worker.session_id.len(), 32, "{}", worker.session_id);
    let job = control
        .get_job(cohort_proto::v1::GetJobRequest {
            job_id: job_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(job.state(), cohort_proto::v1::JobState::Running, "{job:?}");

    // The node's own worker reports the rank failed with a detail of 5 MB: kept, cut.
    let session = worker.session_id.clone();
    let failed = RankReport {
        state: RankState::Exited as i32,
        exit_code: Some(1),
        exited_at_unix_ms: 1,
        detail: "x".repeat(5 * 1024 * 1024),
        ..running.clone()
    };
    let mut worker_client = worker
        .client
        .clone()
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let accepted = worker_client
        .heartbeat(HeartbeatRequest {
            node_id: "fake-node".to_owned(),
            session_id: session,
            ranks: vec![failed],
            leaving: false,
        })
        .await?
        .into_inner()
        .accepted;
    assert!(accepted);
    let check = move |cluster: &Sandbox| -> Result<()> {
        let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
        let detail = job["placement"][0]["detail"].as_str().unwrap_or_default();
        assert!(
            detail.len() <= 512 && detail.ends_with("bytes cut]"),
            "{}",
            detail.len()
        );
        let reason = job["reason"].as_str().unwrap_or_default();
        assert!(
            reason.len() <= 2048 && reason.contains("exited with code 1"),
            "{reason}"
        );
        assert_eq!(cluster.jobs()?.len(), 1);
        Ok(())
    };
    let cluster = tokio::task::spawn_blocking(move || -> Result<Sandbox> {
        let mut cluster = cluster;
        check(&cluster)?;
        // And the coordinator restarts on its data with the job intact.
        cluster.kill_coordinator();
        cluster.restart_coordinator()?;
        check(&cluster)?;
        Ok(cluster)
    })
    .await??;
    drop(cluster);
    drop(worker.stream);
    Ok(())
}
