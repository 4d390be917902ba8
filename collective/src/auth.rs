//! Proof that both ends of a rank-to-rank link belong to the same job: a challenge-response
//! over nonces from both sides, keyed by the job's [`LinkSecret`].
//!
//! The connecting side sends its introduction (the ring handshake or the link hello), a fresh
//! nonce and `HMAC(secret, "hello" | intro | nonce_c)`; a connection whose tag is wrong is
//! refused as a stray before anything else happens, so a process without the secret can neither
//! join a ring nor hold up the real peer. The accepting side answers with its own nonce and
//! `HMAC(secret, "reply" | intro | nonce_c | nonce_a)`, which the connector checks (the
//! acceptor knows the secret, and the answer is fresh), and the connector finally sends
//! `HMAC(secret, "confirm" | intro | nonce_c | nonce_a)`, which the acceptor checks (fresh
//! too, so a recorded hello replayed by an eavesdropper fails there). Tags are compared in
//! constant time. The proof costs one round trip per link at setup and nothing per message;
//! messages themselves carry no integrity check (a host that can rewrite the job's TCP
//! streams in flight is outside what it defends against, see docs/security.md).

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce.
pub(crate) const NONCE_BYTES: usize = 32;
/// Bytes of a tag (HMAC-SHA256).
pub(crate) const TAG_BYTES: usize = 32;
/// Bytes the connector sends after its introduction: nonce and tag.
pub(crate) const HELLO_PROOF_BYTES: usize = NONCE_BYTES + TAG_BYTES;
/// Bytes the acceptor answers with: nonce and tag.
pub(crate) const ANSWER_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// Domain separation of the derived key: a job token used elsewhere never yields link tags.
const DERIVATION_LABEL: &[u8] = b"cohort link secret v1";

/// The key a job's links prove they share, derived from the job's token
/// (`COHORT_JOB_TOKEN`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkSecret {
    key: [u8; 32],
}

impl std::fmt::Debug for LinkSecret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("LinkSecret(..)")
    }
}

impl LinkSecret {
    /// The link secret of the job whose token is `job_token`.
    pub fn derive(job_token: &str) -> Self {
        let mut mac = keyed(job_token.as_bytes());
        mac.update(DERIVATION_LABEL);
        Self {
            key: mac.finalize().into_bytes().into(),
        }
    }

    /// The tag of `label` over `parts`.
    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; TAG_BYTES] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `label` over `parts` (constant time).
    fn verify(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(label, parts).verify_slice(tag).is_ok()
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = keyed(&self.key);
        mac.update(label);
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// The key links of a job without a secret use: they prove nothing (in-process tests and
/// benchmarks; Cohort's ranks always have their job's).
fn no_secret() -> LinkSecret {
    LinkSecret { key: [0; 32] }
}

fn fresh_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0_u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

/// A nonce followed by a tag, as both sides send them.
fn nonce_and_tag(
    nonce: &[u8; NONCE_BYTES],
    tag: &[u8; TAG_BYTES],
) -> [u8; NONCE_BYTES + TAG_BYTES] {
    let mut bytes = [0_u8; NONCE_BYTES + TAG_BYTES];
    bytes[..NONCE_BYTES].copy_from_slice(nonce);
    bytes[NONCE_BYTES..].copy_from_slice(tag);
    bytes
}

/// The connecting side of a link's proof, between its hello and its confirmation.
pub(crate) struct Connector {
    secret: LinkSecret,
    intro: Vec<u8>,
    nonce: [u8; NONCE_BYTES],
}

impl Connector {
    /// Starts the proof for introduction `intro`; returns it with the bytes to send after
    /// the introduction.
    pub(crate) fn start(
        secret: Option<&LinkSecret>,
        intro: &[u8],
    ) -> (Self, [u8; HELLO_PROOF_BYTES]) {
        let secret = secret.cloned().unwrap_or_else(no_secret);
        let nonce = fresh_nonce();
        let proof = nonce_and_tag(&nonce, &secret.tag(b"hello", &[intro, &nonce]));
        let connector = Self {
            secret,
            intro: intro.to_vec(),
            nonce,
        };
        (connector, proof)
    }

    /// Reads the acceptor's answer (nonce and tag), checks it and sends the confirmation.
    /// Returns what is wrong otherwise.
    pub(crate) fn finish(self, stream: &mut (impl Read + Write)) -> Result<(), String> {
        let mut answer = [0_u8; ANSWER_BYTES];
        stream
            .read_exact(&mut answer)
            .map_err(|error| format!("read the peer's proof: {error}"))?;
        let (nonce, tag) = answer.split_at(NONCE_BYTES);
        let parts: [&[u8]; 3] = [&self.intro, &self.nonce, nonce];
        if !self.secret.verify(b"reply", &parts, tag) {
            return Err(
                "the peer does not know the job's secret: it is not a rank of this job".to_owned(),
            );
        }
        let confirm = self.secret.tag(b"confirm", &parts);
        stream
            .write_all(&confirm)
            .map_err(|error| format!("send the proof: {error}"))
    }
}

/// The accepting side of a link's proof, between its answer and the connector's confirmation.
pub(crate) struct Acceptor {
    secret: LinkSecret,
    intro: Vec<u8>,
    connector_nonce: [u8; NONCE_BYTES],
    nonce: [u8; NONCE_BYTES],
}

impl Acceptor {
    /// Checks the connector's hello proof (read after introduction `intro`); returns the
    /// acceptor and the answer to send, or why the connection is not the job's.
    pub(crate) fn answer(
        secret: Option<&LinkSecret>,
        intro: &[u8],
        hello: &[u8; HELLO_PROOF_BYTES],
    ) -> Result<(Self, [u8; ANSWER_BYTES]), String> {
        let secret = secret.cloned().unwrap_or_else(no_secret);
        let (connector_nonce, tag) = hello.split_at(NONCE_BYTES);
        if !secret.verify(b"hello", &[intro, connector_nonce], tag) {
            return Err("it does not know the job's secret (not a rank of this job)".to_owned());
        }
        let connector_nonce: [u8; NONCE_BYTES] = connector_nonce.try_into().expect("nonce");
        let nonce = fresh_nonce();
        let answer = nonce_and_tag(
            &nonce,
            &secret.tag(b"reply", &[intro, &connector_nonce, &nonce]),
        );
        let acceptor = Self {
            secret,
            intro: intro.to_vec(),
            connector_nonce,
            nonce,
        };
        Ok((acceptor, answer))
    }

    /// Reads and checks the connector's confirmation; returns what is wrong otherwise.
    pub(crate) fn confirm(self, stream: &mut impl Read) -> Result<(), String> {
        let mut tag = [0_u8; TAG_BYTES];
        stream
            .read_exact(&mut tag)
            .map_err(|error| format!("read the peer's proof: {error}"))?;
        let parts: [&[u8]; 3] = [&self.intro, &self.connector_nonce, &self.nonce];
        if self.secret.verify(b"confirm", &parts, &tag) {
            Ok(())
        } else {
            Err("the peer's proof of the job's secret is wrong (a replayed hello?)".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// Runs the proof between a connector holding `theirs` and an acceptor holding `ours`.
    fn prove(theirs: Option<&LinkSecret>, ours: Option<&LinkSecret>) -> Result<(), String> {
        let intro = b"COHRING2 rank 1 of 2";
        let (connector, hello) = Connector::start(theirs, intro);
        let (acceptor, answer) = Acceptor::answer(ours, intro, &hello)?;
        // The connector reads the answer and writes its confirmation to the same buffer.
        let mut wire = Cursor::new(answer.to_vec());
        connector.finish(&mut wire)?;
        let written = wire.into_inner();
        acceptor.confirm(&mut &written[ANSWER_BYTES..])
    }

    #[test]
    fn ranks_of_one_job_prove_it_and_others_are_refused() {
        let job = LinkSecret::derive("cohort-job-aaaa");
        let other = LinkSecret::derive("cohort-job-bbbb");
        assert_eq!(prove(Some(&job), Some(&job)), Ok(()));
        assert_eq!(prove(None, None), Ok(()));
        for (theirs, ours) in [
            (Some(&other), Some(&job)),
            (None, Some(&job)),
            (Some(&job), None),
        ] {
            let refused = prove(theirs, ours).unwrap_err();
            assert!(refused.contains("secret"), "{refused}");
        }
        assert_eq!(format!("{job:?}"), "LinkSecret(..)");
        assert_ne!(job, other);
    }

    #[test]
    fn a_replayed_hello_is_refused_at_the_confirmation() {
        let secret = LinkSecret::derive("cohort-job-aaaa");
        let intro = b"intro";
        let (_honest, hello) = Connector::start(Some(&secret), intro);
        // An eavesdropper replays the hello: it passes the first check, but it cannot
        // compute the confirmation over the acceptor's fresh nonce.
        let (acceptor, answer) = Acceptor::answer(Some(&secret), intro, &hello).unwrap();
        let guessed = secret.tag(b"confirm", &[intro, &hello[..NONCE_BYTES], &[0; 32]]);
        assert_ne!(&answer[..NONCE_BYTES], &[0; 32]);
        let refused = acceptor.confirm(&mut &guessed[..]).unwrap_err();
        assert!(refused.contains("wrong"), "{refused}");
    }

    #[test]
    fn a_tampered_introduction_fails_the_proof() {
        let secret = LinkSecret::derive("cohort-job-aaaa");
        let (_connector, hello) = Connector::start(Some(&secret), b"rank 1");
        assert!(Acceptor::answer(Some(&secret), b"rank 0", &hello).is_err());
    }
}
