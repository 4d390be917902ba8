//! Fuzzing every message of the protocol at the wire: arbitrary bytes, and arbitrary but
//! well-formed protobuf fields (so that decoding reaches nested messages, packed repeats and
//! strings), must decode to a message or to an error, never panic, and a decoded message must
//! re-encode to bytes that decode to the same message. The launch contract's reader
//! (`RankPlace::try_from` on any `StartRank`, `Launch::from_vars` on any environment) must
//! answer with a value or a named error.
//!
//! A few thousand cases each by default; run longer with
//! `PROPTEST_CASES=200000 cargo test -p cohort-proto --test decoders`.

use std::collections::BTreeMap;

use cohort_proto::launch::{Launch, RankPlace};
use cohort_proto::{ps_v1, v1};
use proptest::prelude::*;
use prost::Message;

/// One protobuf field: a field number and a value of one of the wire types.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Bytes(u32, Vec<u8>),
    Nested(u32, Vec<Field>),
    Fixed32(u32, u32),
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        let key = |number: u32, wire: u64| (u64::from(number) << 3) | wire;
        match field {
            Field::Varint(number, value) => {
                put_varint(out, key(*number, 0));
                put_varint(out, *value);
            }
            Field::Fixed64(number, value) => {
                put_varint(out, key(*number, 1));
                out.extend_from_slice(&value.to_le_bytes());
            }
            Field::Bytes(number, bytes) => {
                put_varint(out, key(*number, 2));
                put_varint(out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
            Field::Nested(number, inner) => {
                let mut nested = Vec::new();
                encode(inner, &mut nested);
                put_varint(out, key(*number, 2));
                put_varint(out, nested.len() as u64);
                out.extend_from_slice(&nested);
            }
            Field::Fixed32(number, value) => {
                put_varint(out, key(*number, 5));
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

/// Field numbers the protocol uses (1 to 20) and a few it does not.
fn field_number() -> impl Strategy<Value = u32> {
    prop_oneof![9 => 1u32..=20, 1 => 21u32..=536_870_911]
}

fn fields() -> impl Strategy<Value = Vec<Field>> {
    let leaf = prop_oneof![
        (
            field_number(),
            prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()]
        )
            .prop_map(|(number, value)| Field::Varint(number, value)),
        (field_number(), any::<u64>()).prop_map(|(number, value)| Field::Fixed64(number, value)),
        (field_number(), any::<u32>()).prop_map(|(number, value)| Field::Fixed32(number, value)),
        (
            field_number(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                "\\PC{0,40}".prop_map(String::into_bytes),
            ]
        )
            .prop_map(|(number, bytes)| Field::Bytes(number, bytes)),
    ];
    let field = leaf.prop_recursive(3, 48, 6, |inner| {
        (field_number(), prop::collection::vec(inner, 0..6))
            .prop_map(|(number, fields)| Field::Nested(number, fields))
    });
    prop::collection::vec(field, 0..12)
}

/// Bytes to decode: raw noise, well-formed fields, or well-formed fields cut short.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        fields().prop_map(|fields| {
            let mut bytes = Vec::new();
            encode(&fields, &mut bytes);
            bytes
        }),
        (fields(), any::<prop::sample::Index>()).prop_map(|(fields, cut)| {
            let mut bytes = Vec::new();
            encode(&fields, &mut bytes);
            let keep = cut.index(bytes.len() + 1);
            bytes.truncate(keep);
            bytes
        }),
    ]
}

/// Decodes `bytes` as `M`; a decoded message must survive a round trip (equal, or, when it
/// holds a NaN, which equals nothing, encoding to as many bytes: its maps' order may differ).
fn decodes_or_refuses<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        let encoded = message.encode_to_vec();
        let again = M::decode(encoded.as_slice()).expect("re-encoded bytes decode");
        let same = if format!("{message:?}").contains("NaN") {
            again.encode_to_vec().len() == encoded.len()
        } else {
            again == message
        };
        assert!(same, "a decoded message changed in a round trip");
    }
}

macro_rules! every_message {
    ($bytes:expr; $($message:ty),+ $(,)?) => {
        $( decodes_or_refuses::<$message>($bytes); )+
    };
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cohort_proto::fuzz_cases()))]

    #[test]
    fn every_cohort_message_decodes_or_refuses_without_panicking(bytes in wire_bytes()) {
        every_message!(&bytes;
            v1::Device, v1::GpuPeer, v1::DeviceRef, v1::RankInfo, v1::RankMetrics, v1::JobInfo,
            v1::NodeInfo, v1::AddUserRequest, v1::AddUserResponse, v1::UserInfo,
            v1::ListUsersRequest, v1::ListUsersResponse, v1::RemoveUserRequest,
            v1::RemoveUserResponse, v1::ListAuditRequest, v1::AuditRecord,
            v1::ListAuditResponse, v1::SubmitJobRequest, v1::SubmitJobResponse,
            v1::GetJobRequest, v1::ListJobsRequest, v1::ListJobsResponse, v1::CancelJobRequest,
            v1::WatchJobRequest, v1::JobEvent, v1::StreamLogsRequest, v1::LogLine,
            v1::ListNodesRequest, v1::ListNodesResponse, v1::RegisterRequest, v1::RankReport,
            v1::Instruction, v1::Registered, v1::StartRank, v1::StopRank,
            v1::HeartbeatRequest, v1::HeartbeatResponse, v1::PushLogsRequest,
            v1::PushLogsResponse, v1::KvSetRequest, v1::KvSetResponse, v1::KvGetRequest,
            v1::KvGetResponse, v1::KvWaitRequest, v1::KvWaitResponse, v1::KvAddRequest,
            v1::KvAddResponse, v1::BarrierRequest, v1::BarrierResponse,
            v1::ReportMetricsRequest, v1::ReportMetricsResponse,
        );
    }

    #[test]
    fn every_parameter_server_message_decodes_or_refuses_without_panicking(
        bytes in wire_bytes()
    ) {
        every_message!(&bytes;
            ps_v1::Sender, ps_v1::TensorDeclaration, ps_v1::DenseChunk, ps_v1::RowsChunk,
            ps_v1::RowSelection, ps_v1::PullSpec, ps_v1::DescribeRequest, ps_v1::DescribeReply,
            ps_v1::InitHeader, ps_v1::InitChunk, ps_v1::InitReply, ps_v1::PullRequest,
            ps_v1::PushHeader, ps_v1::PushChunk, ps_v1::PullHeader, ps_v1::PullChunk,
            ps_v1::SnapshotRequest, ps_v1::SnapshotChunk,
        );
    }

    #[test]
    fn any_start_instruction_is_read_or_refused_naming_a_field(bytes in wire_bytes()) {
        if let Ok(start) = v1::StartRank::decode(bytes.as_slice())
            && let Err(error) = RankPlace::try_from(&start)
        {
            let message = error.to_string();
            prop_assert!(message.contains("start_rank") || message.contains("COHORT_"),
                "{message}");
        }
    }

    #[test]
    fn any_environment_is_read_or_refused_naming_a_variable(
        variables in prop::collection::btree_map(
            prop_oneof![
                prop::sample::select(vec![
                    "COHORT_JOB_ID", "COHORT_RANK", "COHORT_WORLD_SIZE", "COHORT_LOCAL_RANK",
                    "COHORT_LOCAL_WORLD_SIZE", "COHORT_DEVICES", "COHORT_ROLE", "COHORT_NODE_ID",
                    "COHORT_NODE_ADDR", "COHORT_PS_SHARD", "COHORT_PS_SHARDS", "MASTER_ADDR",
                    "MASTER_PORT", "COHORT_TLS_CERT", "COHORT_CA", "CUDA_VISIBLE_DEVICES",
                ]).prop_map(str::to_owned),
                "[A-Z_]{1,12}",
            ],
            prop_oneof!["\\PC{0,24}", "[0-9]{1,12}", Just("cpu:0,cpu:1".to_owned())],
            0..20,
        )
    ) {
        let variables: BTreeMap<String, String> = variables;
        if let Err(error) = Launch::from_vars(&variables) {
            prop_assert!(error.to_string().contains("COHORT_")
                || error.to_string().contains("MASTER_")
                || error.to_string().contains("CUDA_"), "{error}");
        }
    }
}
