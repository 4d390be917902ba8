//! The byte format of stored records: one format-version byte, then the record in bincode.
//!
//! The version byte makes a change to the records detectable: a coordinator that finds a
//! version it does not know refuses the record with an error instead of misreading it. Decoding
//! is bounded ([`MAX_RECORD_BYTES`]), so a corrupted length prefix cannot make it allocate
//! without limit, and every failure is an [`Error::Store`] naming the type being decoded.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The format version written in front of every record.
pub const FORMAT_VERSION: u8 = 1;

/// Largest encoded record accepted, in bytes. Records hold a job spec of at most 64 KiB plus its
/// placement, so anything near this bound is corruption, not data.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Encodes a record: [`FORMAT_VERSION`] followed by its bincode encoding.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|error| Error::Store(format!("encoding {}: {error}", short_type_name::<T>())))?;
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Decodes a record written by [`encode`].
///
/// Fails, naming the type being decoded, on empty input, an unknown format version, bytes that
/// are not a valid encoding, or bytes left over after the record.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let what = short_type_name::<T>();
    let Some((&version, body)) = bytes.split_first() else {
        return Err(Error::Store(format!(
            "decoding {what}: empty value, expected a format version byte"
        )));
    };
    if version != FORMAT_VERSION {
        return Err(Error::Store(format!(
            "decoding {what}: format version {version}, expected {FORMAT_VERSION} \
             (written by a different version of cohort?)"
        )));
    }
    let config = bincode::config::standard().with_limit::<MAX_RECORD_BYTES>();
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(body, config)
        .map_err(|error| Error::Store(format!("decoding {what}: {error}")))?;
    if read != body.len() {
        return Err(Error::Store(format!(
            "decoding {what}: {} bytes left over after the record, expected none",
            body.len() - read
        )));
    }
    Ok(value)
}

/// Returns the last path segment of a type's name (`JobRecord` for
/// `cohort_coordinator::model::JobRecord`), keeping generic arguments readable enough.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let before_generics = full.split('<').next().unwrap_or(full);
    match before_generics.rfind("::") {
        Some(index) => &full[index + 2..],
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        count: u64,
        tags: Vec<String>,
        maybe: Option<i32>,
    }

    fn sample() -> Sample {
        Sample {
            name: "mnist".to_owned(),
            count: 42,
            tags: vec!["a".to_owned(), "bb".to_owned()],
            maybe: Some(-3),
        }
    }

    #[test]
    fn round_trips_and_starts_with_the_version_byte() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: Sample = decode(&bytes).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn rejects_empty_input() {
        let error = decode::<Sample>(&[]).unwrap_err().to_string();
        assert!(error.contains("decoding Sample"), "{error}");
        assert!(error.contains("empty"), "{error}");
    }

    #[test]
    fn rejects_an_unknown_version_naming_both_versions() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0] = 7;
        let error = decode::<Sample>(&bytes).unwrap_err().to_string();
        assert!(error.contains("decoding Sample"), "{error}");
        assert!(error.contains("format version 7, expected 1"), "{error}");
    }

    #[test]
    fn rejects_truncated_input() {
        let bytes = encode(&sample()).unwrap();
        for cut in 1..bytes.len() {
            let result = decode::<Sample>(&bytes[..cut]);
            assert!(
                result.is_err(),
                "decoding {cut} of {} bytes succeeded",
                bytes.len()
            );
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = encode(&sample()).unwrap();
        bytes.push(0);
        let error = decode::<Sample>(&bytes).unwrap_err().to_string();
        assert!(error.contains("1 bytes left over"), "{error}");
    }

    #[test]
    fn rejects_a_huge_length_prefix_without_allocating_it() {
        // Version byte, then a string length of u64::MAX in bincode's varint form (0xfd = u64).
        let mut bytes = vec![FORMAT_VERSION, 0xfd];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let error = decode::<Sample>(&bytes).unwrap_err().to_string();
        assert!(error.contains("decoding Sample"), "{error}");
        // Just under the limit is refused too: the input is far shorter than the claim.
        let mut bytes = vec![FORMAT_VERSION, 0xfc];
        bytes.extend_from_slice(&((MAX_RECORD_BYTES as u32) - 16).to_le_bytes());
        assert!(decode::<Sample>(&bytes).is_err());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic byte generator (xorshift) instead of a dependency.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for length in 0..2_000usize {
            let mut bytes = Vec::with_capacity(length % 64);
            for _ in 0..length % 64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            if let Some(first) = bytes.first_mut() {
                *first = FORMAT_VERSION;
            }
            let _ = decode::<Sample>(&bytes);
        }
    }

    #[test]
    fn names_the_type_without_its_module_path() {
        assert_eq!(short_type_name::<Sample>(), "Sample");
        assert_eq!(short_type_name::<u64>(), "u64");
    }
}
