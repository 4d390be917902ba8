//! Bad requests, sent with a raw gRPC client: each gets an error status (never a crash) and
//! changes nothing on the server.

mod common;

use cohort_parameter_server::{
    Limits, OptimizerConfig, OptimizerKind, PsMode, ServerConfig, ShardParameters, ShardStatus,
    TensorDeclaration,
};
use cohort_proto::ps_v1::{self, parameter_server_client::ParameterServerClient};
use common::{TestShards, job_id};
use prost::bytes::Bytes;
use tonic::Code;
use tonic::transport::Channel;

const CHUNK_BYTES: u64 = 4096;

fn tensors() -> Vec<TensorDeclaration> {
    vec![
        TensorDeclaration::dense("w", 2000),
        TensorDeclaration::embedding_table("e", 100, 4),
    ]
}

fn config() -> ServerConfig {
    ServerConfig {
        ranks: 1,
        mode: PsMode::Sync,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Sgd,
            learning_rate: 0.1,
            momentum: 0.9,
            ..OptimizerConfig::default()
        },
        limits: Limits {
            max_chunk_bytes: CHUNK_BYTES,
            max_rows_per_chunk: 16,
            ..Limits::default()
        },
        ..ServerConfig::default()
    }
}

async fn raw_client(address: &str) -> ParameterServerClient<Channel> {
    ParameterServerClient::connect(format!("http://{address}"))
        .await
        .unwrap()
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

fn sender(shard_id: u32, rank: u32) -> Option<ps_v1::Sender> {
    Some(ps_v1::Sender {
        job_id: job_id().to_string(),
        shard_id,
        rank,
    })
}

fn f32_bytes(count: usize) -> Bytes {
    Bytes::from(vec![0u8; count * 4])
}

/// A valid push of step 1 to shard 0 (dense part of `dense_elements` elements), before the
/// tests spoil it.
fn valid_push(
    dense_elements: usize,
    fingerprint: u64,
) -> (ps_v1::PushHeader, Vec<ps_v1::PushChunk>) {
    let header = ps_v1::PushHeader {
        sender: sender(0, 0),
        step: 1,
        version: 1,
        dtype: ps_v1::ElementType::F32 as i32,
        layout_fingerprint: fingerprint,
        pull: Some(ps_v1::PullSpec {
            dense: true,
            ..ps_v1::PullSpec::default()
        }),
    };
    let per_chunk = CHUNK_BYTES as usize / 4;
    let chunks = (0..dense_elements)
        .step_by(per_chunk)
        .map(|offset| {
            dense_chunk(
                offset as u64,
                f32_bytes(per_chunk.min(dense_elements - offset)),
            )
        })
        .collect();
    (header, chunks)
}

fn dense_chunk(offset: u64, data: Bytes) -> ps_v1::PushChunk {
    ps_v1::PushChunk {
        body: Some(ps_v1::push_chunk::Body::Dense(ps_v1::DenseChunk {
            offset,
            data,
        })),
    }
}

fn header_chunk(header: ps_v1::PushHeader) -> ps_v1::PushChunk {
    ps_v1::PushChunk {
        body: Some(ps_v1::push_chunk::Body::Header(header)),
    }
}

/// Sends a push stream and returns the status it failed with.
async fn push_error(
    client: &mut ParameterServerClient<Channel>,
    chunks: Vec<ps_v1::PushChunk>,
) -> tonic::Status {
    match client.push_pull(futures::stream::iter(chunks)).await {
        Ok(response) => {
            // An error may also arrive in the reply stream.
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the bad push was accepted"),
                    Err(status) => return status,
                }
            }
        }
        Err(status) => status,
    }
}

async fn state(shards: &TestShards) -> Vec<(ShardParameters, ShardStatus)> {
    let mut states = Vec::new();
    for server in &shards.servers {
        states.push((server.parameters().await.unwrap(), server.status().await));
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_change_nothing() {
    let shards = TestShards::start(&config(), 2).await;
    let tensors = tensors();
    let mut client = shards.client(0, &tensors).await;
    let values: Vec<f32> = (0..2400).map(|i| i as f32 / 100.0).collect();
    client.init(&values, 10).await.unwrap();
    let mut dense = vec![0.0f32; 2000];
    client.pull(&mut dense).await.unwrap();
    client
        .push_pull(&vec![0.5; 2000], &[], &mut dense, &[])
        .await
        .unwrap();
    let fingerprint = client.plan().fingerprint();
    let dense_elements = client.plan().shard(0).unwrap().dense_element_count() as usize;
    let held_rows = {
        let layout = client.plan().shard(0).unwrap();
        layout
            .segments
            .iter()
            .any(|segment| segment.tensor_index == 1)
    };
    let before = state(&shards).await;
    assert_eq!(before[0].1.version, 1);
    let mut raw = raw_client(&shards.addresses[0]).await;

    let expect = |status: tonic::Status, code: Code, text: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(text),
            "{:?} lacks {text:?}",
            status.message()
        );
    };

    // Addressing: job, shard, rank.
    let status = raw
        .describe(ps_v1::DescribeRequest {
            job_id: "other-job".into(),
            shard_id: 0,
        })
        .await
        .unwrap_err();
    expect(status, Code::InvalidArgument, "job_id = \"other-job\"");
    let pull = |shard_id, rank| ps_v1::PullRequest {
        sender: sender(shard_id, rank),
        min_version: 0,
        pull: Some(ps_v1::PullSpec {
            dense: true,
            ..ps_v1::PullSpec::default()
        }),
    };
    expect(
        raw.pull(pull(7, 0)).await.unwrap_err(),
        Code::InvalidArgument,
        "shard_id = 7, expected 0..2",
    );
    expect(
        raw.pull(pull(1, 0)).await.unwrap_err(),
        Code::InvalidArgument,
        "this server holds shard 0",
    );
    expect(
        raw.pull(pull(0, 5)).await.unwrap_err(),
        Code::InvalidArgument,
        "rank = 5, expected 0..1",
    );
    let mut no_sender = pull(0, 0);
    no_sender.sender = None;
    expect(
        raw.pull(no_sender).await.unwrap_err(),
        Code::InvalidArgument,
        "sender is missing",
    );
    let mut rows_of_dense = pull(0, 0);
    rows_of_dense.pull = Some(ps_v1::PullSpec {
        rows: vec![ps_v1::RowSelection {
            tensor_index: 0,
            rows: vec![0],
        }],
        ..ps_v1::PullSpec::default()
    });
    expect(
        raw.pull(rows_of_dense).await.unwrap_err(),
        Code::InvalidArgument,
        "holds no rows of such an embedding table",
    );

    let (header, chunks) = valid_push(dense_elements, fingerprint);
    let push = |header: ps_v1::PushHeader, chunks: &[ps_v1::PushChunk]| {
        let mut all = vec![header_chunk(header)];
        all.extend_from_slice(chunks);
        all
    };
    let spoiled = |change: &dyn Fn(&mut ps_v1::PushHeader)| {
        let mut header = header.clone();
        change(&mut header);
        push(header, &chunks)
    };

    let long_text = format!("expected {dense_elements} elements");
    let cases: Vec<(&str, Vec<ps_v1::PushChunk>, Code, &str)> = vec![
        (
            "wrong job",
            spoiled(&|h| h.sender.as_mut().unwrap().job_id = "other-job".into()),
            Code::InvalidArgument,
            "this server belongs to job",
        ),
        (
            "shard out of range",
            spoiled(&|h| h.sender.as_mut().unwrap().shard_id = 2),
            Code::InvalidArgument,
            "shard_id = 2, expected 0..2",
        ),
        (
            "duplicate step",
            spoiled(&|h| {
                h.step = 0;
                h.version = 0;
            }),
            Code::AlreadyExists,
            "rank 0 already pushed step 0",
        ),
        (
            "skipped step",
            spoiled(&|h| h.step = 5),
            Code::InvalidArgument,
            "pushed step 5, expected step 1",
        ),
        (
            "stale version",
            spoiled(&|h| h.version = 0),
            Code::FailedPrecondition,
            "computed from version 0",
        ),
        (
            "future version",
            spoiled(&|h| h.version = 9),
            Code::InvalidArgument,
            "version 9 is newer than the shard's version 1",
        ),
        (
            "other layout",
            spoiled(&|h| h.layout_fingerprint ^= 1),
            Code::FailedPrecondition,
            "layout fingerprint",
        ),
        (
            "unknown dtype",
            spoiled(&|h| h.dtype = 9),
            Code::InvalidArgument,
            "dtype = 9",
        ),
        (
            "missing header",
            chunks.clone(),
            Code::InvalidArgument,
            "the first message must be the header",
        ),
        (
            "short gradient",
            push(header.clone(), &chunks[..chunks.len() - 1]),
            Code::InvalidArgument,
            "dense gradient of",
        ),
        (
            "long gradient",
            push(
                header.clone(),
                &[
                    chunks.clone(),
                    vec![dense_chunk(dense_elements as u64, f32_bytes(1))],
                ]
                .concat(),
            ),
            Code::InvalidArgument,
            &long_text,
        ),
        (
            "chunk out of order",
            push(
                header.clone(),
                &[chunks[1..].to_vec(), chunks[..1].to_vec()].concat(),
            ),
            Code::InvalidArgument,
            "chunks must arrive in order",
        ),
        (
            "oversized chunk",
            push(
                header.clone(),
                &[dense_chunk(0, f32_bytes(2 * CHUNK_BYTES as usize / 4))],
            ),
            Code::InvalidArgument,
            "expected at most max_chunk_bytes = 4096",
        ),
        (
            "row not on this shard",
            push(
                header.clone(),
                &[
                    chunks.clone(),
                    vec![ps_v1::PushChunk {
                        body: Some(ps_v1::push_chunk::Body::Rows(ps_v1::RowsChunk {
                            tensor_index: 1,
                            rows: vec![100_000],
                            data: f32_bytes(4),
                        })),
                    }],
                ]
                .concat(),
            ),
            Code::InvalidArgument,
            if held_rows {
                "row 100000 of table 1"
            } else {
                "holds no rows"
            },
        ),
    ];
    for (name, chunks, code, text) in cases {
        let status = push_error(&mut raw, chunks).await;
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(text),
            "{name}: {:?} lacks {text:?}",
            status.message()
        );
        assert_eq!(state(&shards).await, before, "{name} changed the shard");
    }

    // A message beyond the gRPC size limit is refused by the transport, and the server stays up.
    let huge = push(header.clone(), &[dense_chunk(0, f32_bytes((5 << 20) / 4))]);
    let status = push_error(&mut raw, huge).await;
    assert_ne!(status.code(), Code::Ok);
    assert_eq!(
        state(&shards).await,
        before,
        "an oversized message changed the shard"
    );

    // An init with another tensor list is refused; the same list changes nothing.
    let init = |tensors: Vec<ps_v1::TensorDeclaration>| {
        futures::stream::iter(vec![ps_v1::InitChunk {
            body: Some(ps_v1::init_chunk::Body::Header(ps_v1::InitHeader {
                sender: sender(0, 0),
                tensors,
                total_steps: 10,
            })),
        }])
    };
    let declaration = |name: &str, count: u64, row: u64, sparse: bool| ps_v1::TensorDeclaration {
        name: name.into(),
        element_count: count,
        row_elements: row,
        sparse,
    };
    let status = raw
        .init(init(vec![
            declaration("w", 2001, 1, false),
            declaration("e", 400, 4, true),
        ]))
        .await
        .unwrap_err();
    expect(status, Code::FailedPrecondition, "layout fingerprint");
    let status = raw
        .init(init(vec![declaration("w", 0, 1, false)]))
        .await
        .unwrap_err();
    expect(status, Code::InvalidArgument, "has 0 elements");
    let reply = raw
        .init(init(vec![
            declaration("w", 2000, 1, false),
            declaration("e", 400, 4, true),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.initialised_by_this_call);
    assert_eq!(state(&shards).await, before);

    // The valid push still goes through afterwards.
    let mut reply = raw
        .push_pull(futures::stream::iter(push(header, &chunks)))
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    while reply.message().await.unwrap().is_some() {
        messages += 1;
    }
    let dense_chunks = (dense_elements * 4).div_ceil(CHUNK_BYTES as usize);
    assert_eq!(
        messages,
        1 + dense_chunks,
        "a header, then chunks of at most 4 KiB"
    );
    assert_eq!(shards.servers[0].status().await.version, 2);
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninitialised_shard_refuses_pushes_and_holds_pulls() {
    let shards = TestShards::start(&config(), 1).await;
    let mut raw = raw_client(&shards.addresses[0]).await;
    let (header, chunks) = valid_push(2400, 1);
    let mut all = vec![header_chunk(ps_v1::PushHeader {
        step: 0,
        version: 0,
        ..header
    })];
    all.extend(chunks);
    let status = push_error(&mut raw, all).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("not initialised"));
    // A pull waits for initialisation, which a client's init then provides.
    let tensors = tensors();
    let mut reader = shards.client(0, &tensors).await;
    let waiting = tokio::spawn(async move {
        let mut dense = vec![0.0f32; 2000];
        reader.pull(&mut dense).await.unwrap();
        dense
    });
    shards
        .wait_for("the pull to wait", |status| status.waiting_ranks == vec![0])
        .await;
    let writer = shards.client(0, &tensors).await;
    let values: Vec<f32> = (0..2400).map(|i| i as f32).collect();
    assert!(writer.init(&values, 1).await.unwrap());
    assert_eq!(waiting.await.unwrap(), values[..2000]);
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_a_job_token_answers_only_requests_that_show_it() {
    let token = cohort_proto::Secret::new("cohort-job-0123456789abcdef");
    let shards = TestShards::start(
        &ServerConfig {
            token: Some(token.clone()),
            ..config()
        },
        1,
    )
    .await;
    let describe = || ps_v1::DescribeRequest {
        job_id: job_id().to_string(),
        shard_id: 0,
    };
    // No token, and another job's token: refused before the request is looked at.
    let status = raw_client(&shards.addresses[0])
        .await
        .describe(describe())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    for wrong in ["cohort-job-fedcba9876543210", "cohort-job-0123456789abcde"] {
        let channel = Channel::from_shared(format!("http://{}", shards.addresses[0]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let credentials =
            cohort_proto::transport::Credentials::new(Some(&cohort_proto::Secret::new(wrong)))
                .unwrap();
        let status = ParameterServerClient::new(credentials.wrap(channel))
            .describe(describe())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{wrong}: {status:?}");
        assert!(status.message().contains("not this job's"), "{status:?}");
    }
    // The job's own ranks (the client shows the token) work as before.
    let client = shards
        .client_with(
            cohort_parameter_server::ClientConfig {
                job_id: job_id(),
                token: Some(token),
                ..cohort_parameter_server::ClientConfig::default()
            },
            &tensors(),
        )
        .await;
    drop(client);
}
