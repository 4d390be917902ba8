//! What the store keeps of users and of audited calls.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_AUDIT_FIELD_BYTES, MAX_REASON_BYTES};
use crate::model::UnixMillis;
use crate::store::codec;

/// A user of the cluster: who may call the job-control API, identified by a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Their name ([`valid_user_name`]).
    pub name: String,
    /// Whether they administer the cluster.
    pub admin: bool,
    /// SHA-256 of their token; the token itself is never stored.
    pub token_hash: [u8; 32],
    /// When they were added.
    pub created_at_ms: UnixMillis,
    /// Who added them.
    pub created_by: String,
}

impl codec::Record for UserRecord {}

/// One audited call: every mutating call (submit, cancel, user and node changes), refused or
/// not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned by the store on append: strictly increasing from 1.
    pub seq: u64,
    /// When it was made.
    pub at_ms: UnixMillis,
    /// Who made it: `user alice`, `a worker`.
    pub actor: String,
    /// What: `submit`, `cancel`, `users add`, `users remove`, `register`.
    pub action: String,
    /// On what: a job id, a user name, a node id.
    pub target: String,
    /// `ok`, or why it was refused.
    pub outcome: String,
}

impl codec::Record for AuditEntry {}

impl AuditEntry {
    /// The entry with every field cut to its bound (the caller's text may be anything).
    pub fn bounded(mut self) -> Self {
        let cut = |text: &str, bound| cohort_proto::text::truncate(text, bound).into_owned();
        self.actor = cut(&self.actor, MAX_AUDIT_FIELD_BYTES);
        self.action = cut(&self.action, MAX_AUDIT_FIELD_BYTES);
        self.target = cut(&self.target, MAX_AUDIT_FIELD_BYTES);
        self.outcome = cut(&self.outcome, MAX_REASON_BYTES);
        self
    }
}

/// Longest user name.
pub const MAX_USER_NAME: usize = 64;

/// Checks a user name: 1 to 64 of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or digit.
pub fn valid_user_name(name: &str) -> Result<(), String> {
    let expected = "1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit";
    let shown = cohort_proto::text::excerpt(name);
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit());
    let allowed = name.bytes().all(|byte| {
        byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-')
    });
    if name.len() <= MAX_USER_NAME && starts_well && allowed {
        Ok(())
    } else {
        Err(format!("{shown}: expected {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_short_lowercase_words() {
        for good in ["admin", "alice", "a", "ml-team.bob_2", &"x".repeat(64)] {
            assert!(valid_user_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Alice",
            "-bob",
            ".x",
            "bob smith",
            "bob/..",
            "ü",
            &"x".repeat(65),
        ] {
            let refused = valid_user_name(bad).unwrap_err();
            assert!(refused.contains("expected"), "{refused}");
        }
    }

    #[test]
    fn audit_fields_are_cut_to_their_bounds() {
        let entry = AuditEntry {
            seq: 0,
            at_ms: 1,
            actor: "a".repeat(10_000),
            action: "submit".to_owned(),
            target: "t".repeat(10_000),
            outcome: "o".repeat(100_000),
        }
        .bounded();
        assert!(entry.actor.len() <= MAX_AUDIT_FIELD_BYTES);
        assert!(entry.target.len() <= MAX_AUDIT_FIELD_BYTES);
        assert!(entry.outcome.len() <= MAX_REASON_BYTES);
        assert_eq!(entry.action, "submit");
    }
}
