//! Byte formats on the ring's connections: the handshake a rank sends when it connects to its
//! successor, and the 16-byte header in front of every message.
//!
//! Integers are little-endian. Payloads are the elements' native bytes; the handshake carries a
//! byte-order probe so that ranks of different endianness refuse to connect instead of
//! exchanging garbage.

use crate::operation::Collective;

/// Identifies a Cohort ring handshake (and its version).
/// Version 2: the handshake is followed by the proof of the job's secret ([`crate::auth`]).
pub(crate) const HANDSHAKE_MAGIC: [u8; 8] = *b"COHRING2";
/// Written in native byte order; a peer that reads a different value has another endianness.
const BYTE_ORDER_PROBE: u32 = 0x0102_0304;
/// Bytes of the handshake before the prefix.
pub(crate) const HANDSHAKE_FIXED_BYTES: usize = 8 + 4 + 4 + 4 + 4;
/// Longest prefix a handshake may carry.
pub(crate) const MAX_PREFIX_BYTES: usize = 1024;
/// The byte an acceptor answers a valid handshake with.
pub(crate) const HANDSHAKE_ACCEPTED: u8 = 0xA5;

/// Marks the start of every frame header.
const FRAME_MAGIC: u16 = 0xC047;
/// Size of a frame header in bytes.
pub(crate) const HEADER_BYTES: usize = 16;

/// What a connecting rank says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handshake {
    /// The communicator's key prefix; a connection for another communicator is rejected.
    pub prefix: String,
    /// The connecting rank.
    pub rank: u32,
    /// The world size the connecting rank was built with.
    pub world_size: u32,
}

impl Handshake {
    /// Encodes the handshake.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HANDSHAKE_FIXED_BYTES + self.prefix.len());
        bytes.extend_from_slice(&HANDSHAKE_MAGIC);
        bytes.extend_from_slice(&BYTE_ORDER_PROBE.to_ne_bytes());
        bytes.extend_from_slice(&self.rank.to_le_bytes());
        bytes.extend_from_slice(&self.world_size.to_le_bytes());
        bytes.extend_from_slice(&(self.prefix.len() as u32).to_le_bytes());
        bytes.extend_from_slice(self.prefix.as_bytes());
        bytes
    }

    /// Decodes the fixed part; returns the handshake with an empty prefix and the prefix length
    /// still to be read, or a description of what is wrong.
    pub fn decode_fixed(bytes: &[u8; HANDSHAKE_FIXED_BYTES]) -> Result<(Handshake, usize), String> {
        if bytes[..8] != HANDSHAKE_MAGIC {
            return Err(format!(
                "expected handshake magic {:?}, found {:?}",
                String::from_utf8_lossy(&HANDSHAKE_MAGIC),
                String::from_utf8_lossy(&bytes[..8])
            ));
        }
        let word = |index: usize| -> [u8; 4] {
            let start = 8 + 4 * index;
            [
                bytes[start],
                bytes[start + 1],
                bytes[start + 2],
                bytes[start + 3],
            ]
        };
        if u32::from_ne_bytes(word(0)) != BYTE_ORDER_PROBE {
            return Err("peer uses a different byte order".to_owned());
        }
        let prefix_bytes = u32::from_le_bytes(word(3)) as usize;
        if prefix_bytes > MAX_PREFIX_BYTES {
            return Err(format!(
                "prefix of {prefix_bytes} bytes, expected at most {MAX_PREFIX_BYTES}"
            ));
        }
        let handshake = Handshake {
            prefix: String::new(),
            rank: u32::from_le_bytes(word(1)),
            world_size: u32::from_le_bytes(word(2)),
        };
        Ok((handshake, prefix_bytes))
    }
}

/// The kinds of frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// A message of a collective, followed by `payload_bytes` of payload.
    Data,
    /// A rank failed or detected a failure; the ring must stop. No payload.
    Abort,
    /// The sender has been waiting on its predecessor for a while and blames the rank named;
    /// lets a stalled rank be identified by every other rank. No payload.
    Starved,
}

/// A decoded frame header.
///
/// Field use by kind: `Data` uses all fields; `Abort` puts the failed rank in `index`, the
/// reporting rank in `sequence` and the [`crate::error::AbortCause`] code in `payload_bytes`;
/// `Starved` puts the blamed rank in `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// What the frame is.
    pub kind: FrameKind,
    /// The collective the sender is running.
    pub collective: Collective,
    /// The sender's collective call counter (wrapping).
    pub sequence: u32,
    /// The message's index within the collective.
    pub index: u32,
    /// Length of the payload that follows.
    pub payload_bytes: u32,
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0_u8; HEADER_BYTES];
        bytes[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes[2] = match self.kind {
            FrameKind::Data => 1,
            FrameKind::Abort => 2,
            FrameKind::Starved => 3,
        };
        bytes[3] = self.collective.code();
        bytes[4..8].copy_from_slice(&self.sequence.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.index.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.payload_bytes.to_le_bytes());
        bytes
    }

    /// Decodes a header, or describes why the bytes are not one.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, String> {
        if u16::from_le_bytes([bytes[0], bytes[1]]) != FRAME_MAGIC {
            return Err(format!(
                "expected a frame header, found bytes {:02x?}",
                &bytes[..4]
            ));
        }
        let kind = match bytes[2] {
            1 => FrameKind::Data,
            2 => FrameKind::Abort,
            3 => FrameKind::Starved,
            other => return Err(format!("unknown frame kind {other}")),
        };
        let collective = Collective::from_code(bytes[3])
            .ok_or_else(|| format!("unknown collective code {}", bytes[3]))?;
        let word = |start: usize| {
            u32::from_le_bytes([
                bytes[start],
                bytes[start + 1],
                bytes[start + 2],
                bytes[start + 3],
            ])
        };
        Ok(FrameHeader {
            kind,
            collective,
            sequence: word(4),
            index: word(8),
            payload_bytes: word(12),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_round_trips() {
        let handshake = Handshake {
            prefix: "job-7/dp".to_owned(),
            rank: 3,
            world_size: 5,
        };
        let bytes = handshake.encode();
        let fixed: [u8; HANDSHAKE_FIXED_BYTES] = bytes[..HANDSHAKE_FIXED_BYTES].try_into().unwrap();
        let (mut decoded, prefix_bytes) = Handshake::decode_fixed(&fixed).unwrap();
        decoded.prefix = String::from_utf8(bytes[HANDSHAKE_FIXED_BYTES..].to_vec()).unwrap();
        assert_eq!(prefix_bytes, 8);
        assert_eq!(decoded, handshake);
    }

    #[test]
    fn stray_bytes_are_not_a_handshake() {
        let mut fixed = [0_u8; HANDSHAKE_FIXED_BYTES];
        fixed[..8].copy_from_slice(b"GET / HT");
        let error = Handshake::decode_fixed(&fixed).unwrap_err();
        assert!(error.contains("expected handshake magic"), "{error}");
    }

    #[test]
    fn frame_headers_round_trip_and_reject_garbage() {
        let header = FrameHeader {
            kind: FrameKind::Data,
            collective: Collective::ReduceScatter,
            sequence: u32::MAX,
            index: 17,
            payload_bytes: 524_288,
        };
        assert_eq!(FrameHeader::decode(&header.encode()), Ok(header));
        assert!(FrameHeader::decode(&[0xff; HEADER_BYTES]).is_err());
    }
}
