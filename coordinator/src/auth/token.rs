//! Tokens: how they are drawn, what is kept of them, and how they are compared.
//!
//! A token is 256 bits from the operating system's random source, written as
//! `cohort-<kind>-<64 hex digits>` so that a leaked one says what it opens (and secret scanners
//! can match it). The coordinator keeps only a token's SHA-256: a copy of the store opens
//! nothing. A plain hash is enough for 256 random bits (no dictionary to try); a slow password
//! hash would only cost every RPC time.

use cohort_proto::Secret;
use sha2::{Digest, Sha256};

/// What a stored token hash is.
pub type TokenHash = [u8; 32];

/// Random bytes in a token: 256 bits.
const TOKEN_BYTES: usize = 32;

/// What a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A user's: the job-control API, as that user.
    User,
    /// A job's: its rendezvous and metrics, and its processes' links; issued at placement.
    Job,
    /// The cluster's join token: registering workers.
    Join,
}

impl TokenKind {
    fn name(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::Job => "job",
            TokenKind::Join => "join",
        }
    }
}

/// Draws a new token of `kind`.
pub fn issue(kind: TokenKind) -> Secret {
    use rand::TryRngCore;
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random source works");
    Secret::new(format!("cohort-{}-{}", kind.name(), hex(&bytes)))
}

/// What the coordinator keeps of `token`.
pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub use cohort_proto::secret::constant_time_eq;

/// `bytes` as lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Issues and checks job tokens without storing them: a job's token is an HMAC of its id under
/// the cluster's job key, so the coordinator can check one after a restart, and a token of one
/// job opens no other. It stops working when the job ends (the caller checks that the job is
/// still running).
#[derive(Clone)]
pub struct JobTokens {
    key: [u8; TOKEN_BYTES],
}

impl std::fmt::Debug for JobTokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("JobTokens(..)")
    }
}

impl JobTokens {
    /// Job tokens under `key`.
    pub fn new(key: [u8; TOKEN_BYTES]) -> Self {
        Self { key }
    }

    /// Job tokens under a fresh random key (tests, and clusters that keep none).
    pub fn generate() -> Self {
        use rand::TryRngCore;
        let mut key = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .expect("the operating system's random source works");
        Self { key }
    }

    /// The key as hexadecimal, to keep it in a file.
    pub fn key_hex(&self) -> String {
        hex(&self.key)
    }

    /// Reads a key written by [`JobTokens::key_hex`].
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 2 * TOKEN_BYTES {
            return None;
        }
        let mut key = [0u8; TOKEN_BYTES];
        for (index, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * index..2 * index + 2)?, 16).ok()?;
        }
        Some(Self { key })
    }

    /// The token of job `job_id`'s `attempt`: every attempt's processes get a token of their
    /// own, so a process of a failed attempt that still runs (on a node that lost touch) can
    /// neither reach the next attempt's rendezvous nor its processes' links.
    pub fn issue_for_attempt(&self, job_id: &str, attempt: u32) -> Secret {
        match attempt {
            // The first attempt's token is the job's as issued before restarts existed.
            0 => self.issue(job_id),
            // `#` never occurs in a job id, so no attempt's subject is another job's id.
            attempt => self.issue(&format!("{job_id}#{attempt}")),
        }
    }

    /// Whether `token` is that of job `job_id`'s `attempt`.
    pub fn verify_for_attempt(&self, job_id: &str, attempt: u32, token: &str) -> bool {
        constant_time_eq(
            self.issue_for_attempt(job_id, attempt).expose().as_bytes(),
            token.as_bytes(),
        )
    }

    /// The token of job `job_id`.
    pub fn issue(&self, job_id: &str) -> Secret {
        Secret::new(format!(
            "cohort-{}-{}",
            TokenKind::Job.name(),
            hex(&self.mac(job_id))
        ))
    }

    /// Whether `token` is job `job_id`'s.
    pub fn verify(&self, job_id: &str, token: &str) -> bool {
        constant_time_eq(self.issue(job_id).expose().as_bytes(), token.as_bytes())
    }

    fn mac(&self, job_id: &str) -> [u8; 32] {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(b"cohort job token v1\0");
        mac.update(job_id.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_token_opens_its_job_alone_and_survives_the_key_being_reloaded() {
        let tokens = JobTokens::generate();
        let token = tokens.issue("train-7");
        assert!(token.expose().starts_with("cohort-job-"));
        assert!(tokens.verify("train-7", token.expose()));
        assert!(!tokens.verify("train-8", token.expose()));
        assert!(!tokens.verify("train-7", &token.expose()[..token.expose().len() - 1]));
        let reloaded = JobTokens::from_hex(&tokens.key_hex()).unwrap();
        assert!(reloaded.verify("train-7", token.expose()));
        assert!(!JobTokens::generate().verify("train-7", token.expose()));
        assert!(JobTokens::from_hex("00").is_none());
        assert!(JobTokens::from_hex(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn every_attempt_of_a_job_has_a_token_of_its_own() {
        let tokens = JobTokens::generate();
        let first = tokens.issue_for_attempt("train-7", 0);
        let second = tokens.issue_for_attempt("train-7", 1);
        assert_eq!(first, tokens.issue("train-7"));
        assert_ne!(first, second);
        assert!(tokens.verify_for_attempt("train-7", 1, second.expose()));
        assert!(!tokens.verify_for_attempt("train-7", 1, first.expose()));
        assert!(!tokens.verify_for_attempt("train-7", 2, second.expose()));
    }

    #[test]
    fn the_job_token_is_hmac_sha256_of_the_id() {
        // An independent reference, Python's
        // `hmac.new(bytes(32), b"cohort job token v1\0job-1", "sha256").hexdigest()`.
        let tokens = JobTokens::new([0u8; 32]);
        assert_eq!(
            tokens.issue("job-1").expose(),
            "cohort-job-1412ede34e8c202d5716d8439df25a85916c845bc520307b448961cc3145e8e4"
        );
    }

    #[test]
    fn tokens_carry_their_kind_and_256_random_bits() {
        let first = issue(TokenKind::User);
        let second = issue(TokenKind::User);
        assert_ne!(first, second);
        let digits = first.expose().strip_prefix("cohort-user-").unwrap();
        assert_eq!(digits.len(), 64);
        assert!(digits.bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert!(issue(TokenKind::Job).expose().starts_with("cohort-job-"));
    }

    #[test]
    fn the_hash_is_sha256() {
        // An independent reference: `printf abc | sha256sum`.
        assert_eq!(
            hex(&hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
