//! Identifier newtypes. Each validates its text once, at the boundary where it enters the
//! system (an RPC field, a CLI flag), so the rest of the code can trust it.
//!
//! Ranks, world sizes and shard numbers have no newtype, and one width on each side of one
//! line: `u32` wherever they are sent or stored (messages, job specs, the coordinator's
//! records, the launch contract, the parameter server, whose every rank and shard arrives in a
//! request or a snapshot), `usize` where ranks index a ring's peers and buffers (`collective`,
//! the trainer). They cross that line where a rank reads its launch and where the trainer
//! meets the parameter server's client.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest identifier accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError {
    /// Which identifier was being parsed ("job id", "node id").
    pub what: &'static str,
    /// The offending text, truncated for display.
    pub found: String,
}

/// What every identifier must be, as an error message says it.
pub const ID_EXPECTATION: &str = "1 to 128 characters of a-z, A-Z, 0-9, '-', '_' or '.'";
const _: () = assert!(MAX_ID_LEN == 128, "ID_EXPECTATION states MAX_ID_LEN");

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?}: expected {ID_EXPECTATION}",
            self.what, self.found
        )
    }
}

impl std::error::Error for IdError {}

fn check_id(what: &'static str, text: &str) -> Result<(), IdError> {
    let valid = !text.is_empty()
        && text.len() <= MAX_ID_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(IdError {
            what,
            found: text.chars().take(MAX_ID_LEN).collect(),
        })
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an identifier.
            pub fn new(text: impl Into<String>) -> Result<Self, IdError> {
                let text = text.into();
                check_id($what, &text)?;
                Ok(Self(text))
            }

            /// Returns the identifier's text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::new(text)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<Self, IdError> {
                Self::new(text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

string_id!(
    /// Identifies a job, e.g. `mnist-12`. Assigned by the coordinator at submission.
    JobId,
    "job id"
);
string_id!(
    /// Identifies a hyper-parameter sweep, e.g. `mlp-lr-3`. Assigned by the coordinator at
    /// submission, from the same sequence as job ids.
    SweepId,
    "sweep id"
);
string_id!(
    /// Identifies a worker node, e.g. `gpu-node-3`. Chosen by the worker (defaults to the
    /// hostname) and stable across worker restarts.
    NodeId,
    "node id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids_and_rejects_others() {
        assert_eq!(JobId::new("mnist-12").unwrap().as_str(), "mnist-12");
        assert!(NodeId::new("node_1.local").is_ok());
        for bad in [
            "",
            "a b",
            "../etc",
            "x/y",
            "ünïcode",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let err = JobId::new(bad).unwrap_err();
            assert!(err.to_string().starts_with("job id"), "{err}");
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: NodeId = serde_json::from_str("\"n-1\"").unwrap();
        assert_eq!(id.as_str(), "n-1");
        assert!(serde_json::from_str::<NodeId>("\"bad id\"").is_err());
    }
}
