//! The byte format of stored records: one format-version byte, then the record in bincode.
//!
//! The version byte makes a change to the records detectable: a coordinator that finds a
//! version it does not know refuses the record with an error instead of misreading it, and a
//! record written in an earlier version is read through its type's [`Record::decode_earlier`]
//! (see [`super::legacy`]), so upgrading Cohort keeps every job it knew.
//!
//! One bound, [`MAX_RECORD_BYTES`] from [`crate::limits`], holds for writing and for reading, so
//! nothing is ever written that cannot be read back. A record is within it when both of its
//! sizes are:
//! - its encoded size (version byte included), checked before decoding, so an oversized value
//!   is refused without being parsed;
//! - its decoded footprint: what bincode's decode limit counts, every integer at its in-memory
//!   width (a `u64` counts 8 bytes even where its varint takes 1) plus the length of every
//!   string. The limit keeps a corrupted length prefix from making decoding allocate without
//!   bound. [`decoded_footprint`] computes it without decoding.
//!
//! [`encode`] refuses a record over either size, and every failure is an [`Error::Store`] naming
//! the type being encoded or decoded.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::limits::MAX_RECORD_BYTES;

/// The format version written in front of every record. Version 2 added a job's submitter and
/// each rank's stop cause; version 3 a job's attempts (restarts); version 4 the job that
/// preempted an attempt; version 5 a job's checkpoint versions and sweep trial.
pub const FORMAT_VERSION: u8 = 5;

/// A stored type: decoded in the current format, and in the formats it was stored in before.
pub trait Record: Serialize + DeserializeOwned {
    /// Decodes `body`, written in format `version` (older than [`FORMAT_VERSION`]), or returns
    /// `None` when records of this type were never written in that version. By default, for a
    /// type whose layout has not changed since it was introduced, as today's layout.
    fn decode_earlier(version: u8, body: &[u8]) -> Option<Result<Self>> {
        (version >= 1).then(|| decode_body(body))
    }
}

/// Decodes a record body of any format version under the record bound, refusing leftovers.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let what = short_type_name::<T>();
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

/// Encodes a record: [`FORMAT_VERSION`] followed by its bincode encoding.
///
/// Fails, naming the type and both sizes, when the record is over [`MAX_RECORD_BYTES`] encoded
/// or decoded ([`decoded_footprint`]): [`decode`] would refuse it, so it must never be stored.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let what = short_type_name::<T>();
    let footprint = decoded_footprint(value)?;
    if footprint > MAX_RECORD_BYTES {
        return Err(Error::Store(format!(
            "encoding {what}: record decodes to {footprint} bytes, expected at most \
             {MAX_RECORD_BYTES}"
        )));
    }
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|error| Error::Store(format!("encoding {what}: {error}")))?;
    let encoded = body.len() + 1;
    if encoded > MAX_RECORD_BYTES {
        return Err(Error::Store(format!(
            "encoding {what}: record is {encoded} bytes, expected at most {MAX_RECORD_BYTES}"
        )));
    }
    let mut bytes = Vec::with_capacity(encoded);
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Returns the decoded footprint of a record: the bytes bincode's decode limit counts for it.
///
/// That count is exactly the size of the record in bincode's fixed-width integer encoding
/// (integers at full width, lengths as `u64`, enum variants as `u32`, option tags as one byte),
/// so it is measured by encoding that way into a counter, without allocating.
pub fn decoded_footprint<T: Serialize>(value: &T) -> Result<usize> {
    let mut counter = bincode::enc::write::SizeWriter::default();
    let config = bincode::config::standard().with_fixed_int_encoding();
    bincode::serde::encode_into_writer(value, &mut counter, config)
        .map_err(|error| Error::Store(format!("encoding {}: {error}", short_type_name::<T>())))?;
    Ok(counter.bytes_written)
}

/// Decodes a record written by [`encode`].
///
/// Fails, naming the type being decoded, on input over [`MAX_RECORD_BYTES`], empty input, an
/// unknown format version, bytes that are not a valid encoding, a decoded footprint over
/// [`MAX_RECORD_BYTES`], or bytes left over after the record.
pub fn decode<T: Record>(bytes: &[u8]) -> Result<T> {
    let what = short_type_name::<T>();
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(Error::Store(format!(
            "decoding {what}: record is {} bytes, expected at most {MAX_RECORD_BYTES}",
            bytes.len()
        )));
    }
    let Some((&version, body)) = bytes.split_first() else {
        return Err(Error::Store(format!(
            "decoding {what}: empty value, expected a format version byte"
        )));
    };
    if version == FORMAT_VERSION {
        return decode_body(body);
    }
    if version < FORMAT_VERSION
        && let Some(decoded) = T::decode_earlier(version, body)
    {
        return decoded;
    }
    Err(Error::Store(format!(
        "decoding {what}: format version {version}, expected {FORMAT_VERSION} \
         (written by a different version of cohort?)"
    )))
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
        let expected = format!("format version 7, expected {FORMAT_VERSION}");
        assert!(error.contains(&expected), "{error}");
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

    /// Wraps a value the way a record wraps its fields.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Wrapper<T> {
        inner: T,
    }

    impl Record for Sample {}
    impl<T: Serialize + DeserializeOwned> Record for Wrapper<T> {}

    #[test]
    fn counts_the_decoded_footprint_at_in_memory_widths() {
        // name: 8 + 5; count: 8; tags: 8 + (8 + 1) + (8 + 2); maybe: 1 + 4.
        assert_eq!(decoded_footprint(&sample()).unwrap(), 13 + 8 + 27 + 5);
        // The varint encoding of the same record is far smaller.
        assert!(encode(&sample()).unwrap().len() < 30);
    }

    #[test]
    fn a_record_whose_footprint_is_exactly_the_bound_round_trips() {
        // A sequence of u64 counts 8 bytes for its length and 8 per element.
        let elements = (MAX_RECORD_BYTES - 8) / 8;
        let value = Wrapper {
            inner: vec![1u64; elements],
        };
        assert_eq!(decoded_footprint(&value).unwrap(), MAX_RECORD_BYTES);
        let bytes = encode(&value).unwrap();
        let back: Wrapper<Vec<u64>> = decode(&bytes).unwrap();
        assert_eq!(back, value);
        // A string: 8 bytes of length, then its bytes.
        let text = Wrapper {
            inner: "x".repeat(MAX_RECORD_BYTES - 8),
        };
        let back: Wrapper<String> = decode(&encode(&text).unwrap()).unwrap();
        assert_eq!(back, text);
    }

    #[test]
    fn encode_refuses_a_footprint_that_decode_would_refuse() {
        let value = Wrapper {
            inner: vec![1u64; (MAX_RECORD_BYTES - 8) / 8 + 1],
        };
        let error = encode(&value).unwrap_err();
        assert!(matches!(error, Error::Store(_)), "{error:?}");
        let error = error.to_string();
        assert!(error.contains("encoding Wrapper"), "{error}");
        assert!(
            error.contains(&format!(
                "decodes to {} bytes, expected at most {MAX_RECORD_BYTES}",
                MAX_RECORD_BYTES + 8
            )),
            "{error}"
        );
        // The check is needed: these bytes are about 2 MiB, yet decoding them is refused.
        let mut bytes = vec![FORMAT_VERSION];
        bytes.extend(bincode::serde::encode_to_vec(&value, bincode::config::standard()).unwrap());
        assert!(bytes.len() < MAX_RECORD_BYTES / 4, "{}", bytes.len());
        let error = decode::<Wrapper<Vec<u64>>>(&bytes).unwrap_err().to_string();
        assert!(error.contains("LimitExceeded"), "{error}");
    }

    #[test]
    fn encode_refuses_an_encoded_size_over_the_bound() {
        // Values of 2^32 and more take 9 bytes as varints but count 8 decoded, so the encoded
        // size passes the bound first: 1 + 5 + 9 * n > bound >= 8 + 8 * n.
        let elements = MAX_RECORD_BYTES / 9;
        let value = Wrapper {
            inner: vec![u64::MAX; elements],
        };
        assert!(decoded_footprint(&value).unwrap() <= MAX_RECORD_BYTES);
        let error = encode(&value).unwrap_err().to_string();
        assert!(error.contains("encoding Wrapper"), "{error}");
        assert!(
            error.contains(&format!(
                "record is {} bytes, expected at most {MAX_RECORD_BYTES}",
                1 + 5 + 9 * elements
            )),
            "{error}"
        );
    }

    #[test]
    fn decode_refuses_an_oversized_record_before_parsing_it() {
        let mut bytes = vec![0u8; MAX_RECORD_BYTES + 1];
        bytes[0] = FORMAT_VERSION;
        let error = decode::<Sample>(&bytes).unwrap_err().to_string();
        assert!(error.contains("decoding Sample"), "{error}");
        assert!(
            error.contains(&format!(
                "record is {} bytes, expected at most {MAX_RECORD_BYTES}",
                MAX_RECORD_BYTES + 1
            )),
            "{error}"
        );
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
