//! The crate's one error type and its `Result` alias.

/// Result of every fallible operation in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the shared numerics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Memory for a buffer could not be reserved.
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// How much was asked for.
        bytes: u64,
    },
    /// An update was applied to optimizer state of another rule (SGD constants to AdamW
    /// moments, or the reverse).
    #[error("optimizer state does not match the update rule")]
    StateMismatch,
}
