//! Records as earlier format versions stored them, and how each is read today
//! ([`codec::Record::decode_earlier`]). A record is upgraded when it is read and written back in
//! the current format with the job's next change; nothing is rewritten in bulk.
//!
//! - Version 1: jobs without a submitter and ranks without a stop cause (read as submitted by
//!   `unknown`, and not stopped by Cohort); nodes as today.
//! - Version 2: jobs without attempts (read as in their first attempt, with no restarts: they
//!   were submitted before restarts existed); nodes as today.
//! - Version 3: jobs whose ended attempts do not say whether a preemption ended them (read as
//!   not preempted: preemption did not exist); nodes and every other record as today.
//! - Version 4: jobs without checkpoint versions or a sweep trial (today's layout less its two
//!   trailing fields: read with those empty, since neither existed); every other record as
//!   today.

use cohort_jobspec::DeviceKind;
use cohort_proto::{JobId, NodeId};
use serde::{Deserialize, Serialize};

use super::codec::{self, Record};
use crate::error::Result;
use crate::lifecycle::JobState;
use crate::model::{
    AttemptRecord, CheckpointVersion, DeviceRecord, JobRecord, MetricsRecord, NodeBackoff,
    NodeRecord, RankRecord, RankState, TrialTag, UnixMillis,
};

impl Record for NodeRecord {
    fn decode_earlier(version: u8, body: &[u8]) -> Option<Result<Self>> {
        match version {
            1 | 2 => Some(codec::decode_body::<NodeRecordV2>(body).map(NodeRecord::from)),
            3 | 4 => Some(codec::decode_body(body)),
            _ => None,
        }
    }
}

/// A node record of versions 1 and 2: today's, before drains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecordV2 {
    /// See [`NodeRecord::id`].
    pub id: NodeId,
    /// See [`NodeRecord::hostname`].
    pub hostname: String,
    /// See [`NodeRecord::address`].
    pub address: String,
    /// See [`NodeRecord::devices`].
    pub devices: Vec<DeviceRecord>,
    /// See [`NodeRecord::registered_at_ms`].
    pub registered_at_ms: UnixMillis,
}

impl From<NodeRecordV2> for NodeRecord {
    fn from(old: NodeRecordV2) -> Self {
        NodeRecord {
            id: old.id,
            hostname: old.hostname,
            address: old.address,
            devices: old.devices,
            registered_at_ms: old.registered_at_ms,
            draining: false,
        }
    }
}

impl Record for JobRecord {
    fn decode_earlier(version: u8, body: &[u8]) -> Option<Result<Self>> {
        match version {
            1 => Some(
                codec::decode_body::<JobRecordV1>(body)
                    .map(JobRecordV2::from)
                    .map(JobRecord::from),
            ),
            2 => Some(codec::decode_body::<JobRecordV2>(body).map(JobRecord::from)),
            3 => Some(codec::decode_body::<JobRecordV3>(body).map(JobRecord::from)),
            4 => Some(decode_job_record_v4(body)),
            _ => None,
        }
    }
}

/// Decodes a version 4 job record: today's layout without its trailing `checkpoints` and
/// `trial`. Bincode lays fields out one after the other, so the body followed by the encoding
/// of those two fields' empty values is a record of today's layout.
fn decode_job_record_v4(body: &[u8]) -> Result<JobRecord> {
    let trailing: (Vec<CheckpointVersion>, Option<TrialTag>) = (Vec::new(), None);
    let trailing = bincode::serde::encode_to_vec(&trailing, bincode::config::standard())
        .map_err(|error| crate::error::Error::Store(format!("encoding JobRecord: {error}")))?;
    let mut today = Vec::with_capacity(body.len() + trailing.len());
    today.extend_from_slice(body);
    today.extend_from_slice(&trailing);
    codec::decode_body(&today)
}

/// A rank of a version 1 job record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRecordV1 {
    /// See [`RankRecord::rank`].
    pub rank: u32,
    /// See [`RankRecord::node_id`].
    pub node_id: NodeId,
    /// See [`RankRecord::local_rank`].
    pub local_rank: u32,
    /// See [`RankRecord::devices`].
    pub devices: Vec<u32>,
    /// See [`RankRecord::state`].
    pub state: RankState,
    /// See [`RankRecord::pid`].
    pub pid: u32,
    /// See [`RankRecord::exit_code`].
    pub exit_code: Option<i32>,
    /// See [`RankRecord::signal`].
    pub signal: Option<i32>,
    /// See [`RankRecord::exited_at_ms`].
    pub exited_at_ms: Option<UnixMillis>,
    /// See [`RankRecord::detail`].
    pub detail: String,
}

/// A version 1 job record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecordV1 {
    /// See [`JobRecord::id`].
    pub id: JobId,
    /// See [`JobRecord::seq`].
    pub seq: u64,
    /// See [`JobRecord::spec_toml`].
    pub spec_toml: String,
    /// See [`JobRecord::name`].
    pub name: String,
    /// See [`JobRecord::kind`].
    pub kind: String,
    /// See [`JobRecord::priority`].
    pub priority: i32,
    /// See [`JobRecord::ranks`].
    pub ranks: u32,
    /// See [`JobRecord::devices_per_rank`].
    pub devices_per_rank: u32,
    /// See [`JobRecord::device_kind`].
    pub device_kind: DeviceKind,
    /// See [`JobRecord::wait_for_resources`].
    pub wait_for_resources: bool,
    /// See [`JobRecord::state`].
    pub state: JobState,
    /// See [`JobRecord::reason`].
    pub reason: String,
    /// See [`JobRecord::blamed_rank`].
    pub blamed_rank: Option<u32>,
    /// See [`JobRecord::submitted_at_ms`].
    pub submitted_at_ms: UnixMillis,
    /// See [`JobRecord::scheduled_at_ms`].
    pub scheduled_at_ms: Option<UnixMillis>,
    /// See [`JobRecord::started_at_ms`].
    pub started_at_ms: Option<UnixMillis>,
    /// See [`JobRecord::finished_at_ms`].
    pub finished_at_ms: Option<UnixMillis>,
    /// See [`JobRecord::placement`].
    pub placement: Vec<RankRecordV1>,
    /// See [`JobRecord::metrics`].
    pub metrics: std::collections::BTreeMap<u32, MetricsRecord>,
}

/// A version 2 job record: today's, before attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecordV2 {
    /// See [`JobRecord::id`].
    pub id: JobId,
    /// See [`JobRecord::seq`].
    pub seq: u64,
    /// See [`JobRecord::spec_toml`].
    pub spec_toml: String,
    /// See [`JobRecord::name`].
    pub name: String,
    /// See [`JobRecord::kind`].
    pub kind: String,
    /// See [`JobRecord::priority`].
    pub priority: i32,
    /// See [`JobRecord::ranks`].
    pub ranks: u32,
    /// See [`JobRecord::devices_per_rank`].
    pub devices_per_rank: u32,
    /// See [`JobRecord::device_kind`].
    pub device_kind: DeviceKind,
    /// See [`JobRecord::wait_for_resources`].
    pub wait_for_resources: bool,
    /// See [`JobRecord::submitter`].
    pub submitter: String,
    /// See [`JobRecord::state`].
    pub state: JobState,
    /// See [`JobRecord::reason`].
    pub reason: String,
    /// See [`JobRecord::blamed_rank`].
    pub blamed_rank: Option<u32>,
    /// See [`JobRecord::submitted_at_ms`].
    pub submitted_at_ms: UnixMillis,
    /// See [`JobRecord::scheduled_at_ms`].
    pub scheduled_at_ms: Option<UnixMillis>,
    /// See [`JobRecord::started_at_ms`].
    pub started_at_ms: Option<UnixMillis>,
    /// See [`JobRecord::finished_at_ms`].
    pub finished_at_ms: Option<UnixMillis>,
    /// See [`JobRecord::placement`].
    pub placement: Vec<RankRecord>,
    /// See [`JobRecord::metrics`].
    pub metrics: std::collections::BTreeMap<u32, MetricsRecord>,
}

/// An ended attempt of a version 3 job record: today's, before preemption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecordV3 {
    /// See [`AttemptRecord::attempt`].
    pub attempt: u32,
    /// See [`AttemptRecord::nodes`].
    pub nodes: Vec<NodeId>,
    /// See [`AttemptRecord::started_at_ms`].
    pub started_at_ms: Option<UnixMillis>,
    /// See [`AttemptRecord::ended_at_ms`].
    pub ended_at_ms: UnixMillis,
    /// See [`AttemptRecord::reason`].
    pub reason: String,
    /// See [`AttemptRecord::planned`].
    pub planned: bool,
    /// See [`AttemptRecord::failed_node`].
    pub failed_node: Option<NodeId>,
}

/// A version 3 job record: today's, with attempts of version 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecordV3 {
    /// The fields a version 2 record has, in their order (bincode lays a nested struct's
    /// fields out in place, so this reads them where they are).
    pub unchanged: JobRecordV2,
    /// See [`JobRecord::attempt`].
    pub attempt: u32,
    /// See [`JobRecord::max_restarts`].
    pub max_restarts: u32,
    /// See [`JobRecord::min_ranks`].
    pub min_ranks: u32,
    /// See [`JobRecord::attempts`].
    pub attempts: Vec<AttemptRecordV3>,
    /// See [`JobRecord::backoff`].
    pub backoff: Vec<NodeBackoff>,
}

impl From<JobRecordV3> for JobRecord {
    fn from(old: JobRecordV3) -> Self {
        JobRecord {
            attempt: old.attempt,
            max_restarts: old.max_restarts,
            min_ranks: old.min_ranks,
            attempts: old
                .attempts
                .into_iter()
                .map(|attempt| AttemptRecord {
                    attempt: attempt.attempt,
                    nodes: attempt.nodes,
                    started_at_ms: attempt.started_at_ms,
                    ended_at_ms: attempt.ended_at_ms,
                    reason: attempt.reason,
                    planned: attempt.planned,
                    failed_node: attempt.failed_node,
                    preempted_by: None,
                })
                .collect(),
            backoff: old.backoff,
            ..JobRecord::from(old.unchanged)
        }
    }
}

impl From<JobRecordV2> for JobRecord {
    fn from(old: JobRecordV2) -> Self {
        JobRecord {
            id: old.id,
            seq: old.seq,
            spec_toml: old.spec_toml,
            name: old.name,
            kind: old.kind,
            priority: old.priority,
            ranks: old.ranks,
            devices_per_rank: old.devices_per_rank,
            device_kind: old.device_kind,
            wait_for_resources: old.wait_for_resources,
            submitter: old.submitter,
            state: old.state,
            reason: old.reason,
            blamed_rank: old.blamed_rank,
            submitted_at_ms: old.submitted_at_ms,
            scheduled_at_ms: old.scheduled_at_ms,
            started_at_ms: old.started_at_ms,
            finished_at_ms: old.finished_at_ms,
            placement: old.placement,
            metrics: old.metrics,
            attempt: 0,
            max_restarts: 0,
            min_ranks: 0,
            attempts: Vec::new(),
            backoff: Vec::new(),
            checkpoints: Vec::new(),
            trial: None,
        }
    }
}

impl From<JobRecordV1> for JobRecordV2 {
    fn from(old: JobRecordV1) -> Self {
        JobRecordV2 {
            id: old.id,
            seq: old.seq,
            spec_toml: old.spec_toml,
            name: old.name,
            kind: old.kind,
            priority: old.priority,
            ranks: old.ranks,
            devices_per_rank: old.devices_per_rank,
            device_kind: old.device_kind,
            wait_for_resources: old.wait_for_resources,
            submitter: "unknown".to_owned(),
            state: old.state,
            reason: old.reason,
            blamed_rank: old.blamed_rank,
            submitted_at_ms: old.submitted_at_ms,
            scheduled_at_ms: old.scheduled_at_ms,
            started_at_ms: old.started_at_ms,
            finished_at_ms: old.finished_at_ms,
            placement: old
                .placement
                .into_iter()
                .map(|rank| RankRecord {
                    rank: rank.rank,
                    node_id: rank.node_id,
                    local_rank: rank.local_rank,
                    devices: rank.devices,
                    state: rank.state,
                    pid: rank.pid,
                    exit_code: rank.exit_code,
                    signal: rank.signal,
                    exited_at_ms: rank.exited_at_ms,
                    detail: rank.detail,
                    stop_cause: Default::default(),
                })
                .collect(),
            metrics: old.metrics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StopCause;

    /// A version 1 record as the previous release wrote it: version byte 1, then bincode.
    fn written_by_version_1(record: &JobRecordV1) -> Vec<u8> {
        let mut bytes = vec![1];
        bytes.extend(bincode::serde::encode_to_vec(record, bincode::config::standard()).unwrap());
        bytes
    }

    #[test]
    fn a_version_1_job_is_read_with_every_field_it_had() {
        let old = JobRecordV1 {
            id: JobId::new("mnist-3").unwrap(),
            seq: 3,
            spec_toml: "version = 1".to_owned(),
            name: "mnist".to_owned(),
            kind: "train".to_owned(),
            priority: 5,
            ranks: 2,
            devices_per_rank: 1,
            device_kind: DeviceKind::Cpu,
            wait_for_resources: false,
            state: JobState::Failed,
            reason: "rank 1 on node a exited with code 3".to_owned(),
            blamed_rank: Some(1),
            submitted_at_ms: 10,
            scheduled_at_ms: Some(11),
            started_at_ms: Some(12),
            finished_at_ms: Some(13),
            placement: vec![RankRecordV1 {
                rank: 1,
                node_id: NodeId::new("a").unwrap(),
                local_rank: 0,
                devices: vec![0],
                state: RankState::Exited,
                pid: 77,
                exit_code: Some(3),
                signal: None,
                exited_at_ms: Some(13),
                detail: "x".to_owned(),
            }],
            metrics: Default::default(),
        };
        let record: JobRecord = codec::decode(&written_by_version_1(&old)).unwrap();
        assert_eq!(record.id, old.id);
        assert_eq!(record.reason, old.reason);
        assert_eq!(record.submitter, "unknown");
        assert_eq!(record.placement[0].pid, 77);
        assert_eq!(record.placement[0].detail, "x");
        assert_eq!(record.placement[0].stop_cause, StopCause::None);
        // Written back, it is a current record.
        assert_eq!(codec::encode(&record).unwrap()[0], codec::FORMAT_VERSION);
    }

    #[test]
    fn a_version_2_job_is_read_as_its_first_attempt_without_restarts() {
        let mut current = sample_job_before_version_5();
        current.attempt = 0;
        current.max_restarts = 0;
        current.min_ranks = 0;
        current.attempts.clear();
        current.backoff.clear();
        let old = version_2_fields(&current);
        let mut bytes = vec![2];
        bytes.extend(bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap());
        assert_eq!(codec::decode::<JobRecord>(&bytes).unwrap(), current);
    }

    /// The fields of `current` a version 2 record has (laid out first in versions 3 and 4).
    fn version_2_fields(current: &JobRecord) -> JobRecordV2 {
        JobRecordV2 {
            id: current.id.clone(),
            seq: current.seq,
            spec_toml: current.spec_toml.clone(),
            name: current.name.clone(),
            kind: current.kind.clone(),
            priority: current.priority,
            ranks: current.ranks,
            devices_per_rank: current.devices_per_rank,
            device_kind: current.device_kind,
            wait_for_resources: current.wait_for_resources,
            submitter: current.submitter.clone(),
            state: current.state,
            reason: current.reason.clone(),
            blamed_rank: current.blamed_rank,
            submitted_at_ms: current.submitted_at_ms,
            scheduled_at_ms: current.scheduled_at_ms,
            started_at_ms: current.started_at_ms,
            finished_at_ms: current.finished_at_ms,
            placement: current.placement.clone(),
            metrics: current.metrics.clone(),
        }
    }

    /// A sample job without what version 5 added.
    fn sample_job_before_version_5() -> JobRecord {
        let mut current = crate::store::conformance::sample_job(4);
        current.checkpoints.clear();
        current.trial = None;
        current
    }

    #[test]
    fn a_version_4_job_is_read_without_checkpoints_or_trial() {
        /// A version 4 job record, laid out as version 4 wrote it.
        #[derive(Serialize)]
        struct JobRecordV4 {
            unchanged: JobRecordV2,
            attempt: u32,
            max_restarts: u32,
            min_ranks: u32,
            attempts: Vec<AttemptRecord>,
            backoff: Vec<NodeBackoff>,
        }
        let mut current = sample_job_before_version_5();
        current.attempts[0].preempted_by = Some(JobId::new("urgent-1").unwrap());
        let old = JobRecordV4 {
            unchanged: version_2_fields(&current),
            attempt: current.attempt,
            max_restarts: current.max_restarts,
            min_ranks: current.min_ranks,
            attempts: current.attempts.clone(),
            backoff: current.backoff.clone(),
        };
        let mut bytes = vec![4];
        bytes.extend(bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap());
        assert_eq!(codec::decode::<JobRecord>(&bytes).unwrap(), current);
        // A truncated version 4 record is still refused, not padded into shape.
        bytes.truncate(bytes.len() - 1);
        assert!(codec::decode::<JobRecord>(&bytes).is_err());
        // A version 4 node is today's.
        let node = crate::store::conformance::sample_node(1);
        let mut bytes = vec![4];
        bytes.extend(bincode::serde::encode_to_vec(&node, bincode::config::standard()).unwrap());
        assert_eq!(codec::decode::<NodeRecord>(&bytes).unwrap(), node);
    }

    #[test]
    fn a_version_3_job_is_read_with_its_attempts_as_not_preempted() {
        let mut current = sample_job_before_version_5();
        for attempt in &mut current.attempts {
            attempt.preempted_by = None;
        }
        assert!(!current.attempts.is_empty());
        let old = JobRecordV3 {
            unchanged: version_2_fields(&current),
            attempt: current.attempt,
            max_restarts: current.max_restarts,
            min_ranks: current.min_ranks,
            attempts: current
                .attempts
                .iter()
                .map(|attempt| AttemptRecordV3 {
                    attempt: attempt.attempt,
                    nodes: attempt.nodes.clone(),
                    started_at_ms: attempt.started_at_ms,
                    ended_at_ms: attempt.ended_at_ms,
                    reason: attempt.reason.clone(),
                    planned: attempt.planned,
                    failed_node: attempt.failed_node.clone(),
                })
                .collect(),
            backoff: current.backoff.clone(),
        };
        let mut bytes = vec![3];
        bytes.extend(bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap());
        assert_eq!(codec::decode::<JobRecord>(&bytes).unwrap(), current);
        // A version 3 node is today's.
        let node = crate::store::conformance::sample_node(1);
        let mut bytes = vec![3];
        bytes.extend(bincode::serde::encode_to_vec(&node, bincode::config::standard()).unwrap());
        assert_eq!(codec::decode::<NodeRecord>(&bytes).unwrap(), node);
    }

    #[test]
    fn version_1_and_2_nodes_read_as_not_draining() {
        let old = NodeRecordV2 {
            id: NodeId::new("a").unwrap(),
            hostname: "h".to_owned(),
            address: "127.0.0.1".to_owned(),
            devices: Vec::new(),
            registered_at_ms: 1,
        };
        for version in [1, 2] {
            let mut bytes = vec![version];
            bytes.extend(bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap());
            let node = codec::decode::<NodeRecord>(&bytes).unwrap();
            assert_eq!(node.id, old.id);
            assert_eq!(node.registered_at_ms, 1);
            assert!(!node.draining);
        }
    }
}
