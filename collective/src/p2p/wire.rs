//! The wire format of a [`PeerLink`](super::PeerLink) message: a frame of a little-endian
//! header (magic, tag, number of dimensions, each dimension, payload bytes) followed by the
//! values as little-endian `f32`.
//!
//! Encoding checks a message before it is queued ([`check_message`]); decoding reads the header
//! in two steps, the fixed start and then the shape, so a receiver knows how many bytes to read
//! next and refuses a bad or oversized frame before reading its values.

/// Marks the start of every frame header.
const FRAME_MAGIC: u32 = 0xC0E5_F2F2;
/// Bytes of a frame header before its dimensions: magic, tag, number of dimensions.
pub(super) const FRAME_FIXED_BYTES: usize = 4 + 8 + 4;
/// Most dimensions a message's shape may have.
pub const MAX_DIMENSIONS: usize = 8;

/// Checks that a message can be sent: returns why not.
pub(super) fn check_message(
    shape: &[usize],
    value_count: usize,
    max_message_bytes: usize,
) -> std::result::Result<(), String> {
    if shape.len() > MAX_DIMENSIONS {
        return Err(format!(
            "shape {shape:?} has {} dimensions, expected at most {MAX_DIMENSIONS}",
            shape.len()
        ));
    }
    let shape_count = shape
        .iter()
        .try_fold(1_usize, |count, &dimension| count.checked_mul(dimension));
    if shape_count != Some(value_count) {
        return Err(format!(
            "shape {shape:?} holds {} values, found {value_count} values",
            shape_count.map_or_else(|| "more than usize::MAX".to_owned(), |c| c.to_string())
        ));
    }
    let bytes = value_count.saturating_mul(4);
    if bytes > max_message_bytes {
        return Err(format!(
            "{bytes} bytes of values, expected at most {max_message_bytes} (max_message_bytes)"
        ));
    }
    Ok(())
}

/// Encodes a frame (header and little-endian values) into `buffer`, replacing its contents.
pub(super) fn encode_frame(buffer: &mut Vec<u8>, tag: u64, shape: &[usize], values: &[f32]) {
    let payload_bytes = values.len() * 4;
    buffer.clear();
    buffer.reserve(FRAME_FIXED_BYTES + 8 * (shape.len() + 1) + payload_bytes);
    buffer.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    buffer.extend_from_slice(&tag.to_le_bytes());
    buffer.extend_from_slice(&(shape.len() as u32).to_le_bytes());
    for &dimension in shape {
        buffer.extend_from_slice(&(dimension as u64).to_le_bytes());
    }
    buffer.extend_from_slice(&(payload_bytes as u64).to_le_bytes());
    if cfg!(target_endian = "little") {
        buffer.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for value in values {
            buffer.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// Decodes the fixed start of a frame header: returns its tag and number of dimensions.
pub(super) fn decode_frame_start(bytes: &[u8]) -> std::result::Result<(u64, usize), String> {
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC {
        return Err(format!(
            "expected a frame header starting {:02x?}, found bytes {:02x?}",
            FRAME_MAGIC.to_le_bytes(),
            &bytes[..FRAME_FIXED_BYTES]
        ));
    }
    let tag = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let dimensions = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if dimensions > MAX_DIMENSIONS {
        return Err(format!(
            "frame with tag {tag:#x} has {dimensions} dimensions, expected at most \
             {MAX_DIMENSIONS}"
        ));
    }
    Ok((tag, dimensions))
}

/// Decodes the dimensions and payload length that follow the fixed start (`8 * (dims + 1)`
/// bytes); checks the length against the shape and `max_message_bytes`.
pub(super) fn decode_frame_shape(
    bytes: &[u8],
    max_message_bytes: usize,
) -> std::result::Result<(Vec<usize>, usize), String> {
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
        .collect();
    let (&payload_bytes, dimensions) = words.split_last().ok_or("frame header is empty")?;
    if payload_bytes > max_message_bytes as u64 {
        return Err(format!(
            "frame of {payload_bytes} bytes, expected at most {max_message_bytes} \
             (max_message_bytes)"
        ));
    }
    let shape: Vec<usize> = dimensions
        .iter()
        .map(|&dimension| usize::try_from(dimension).unwrap_or(usize::MAX))
        .collect();
    let value_count = shape
        .iter()
        .try_fold(1_usize, |count, &dimension| count.checked_mul(dimension));
    if value_count.and_then(|count| count.checked_mul(4)) != Some(payload_bytes as usize) {
        return Err(format!(
            "frame of shape {shape:?} carries {payload_bytes} bytes, expected 4 per value"
        ));
    }
    Ok((shape, payload_bytes as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_that_does_not_match_the_values_is_refused() {
        assert_eq!(
            check_message(&[2, 3], 5, 1024),
            Err("shape [2, 3] holds 6 values, found 5 values".to_owned())
        );
        assert!(check_message(&[1; 9], 1, 1024).is_err());
        assert!(check_message(&[usize::MAX, 2], 0, 1024).is_err());
        assert_eq!(check_message(&[], 1, 4), Ok(()));
    }

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused() {
        let mut buffer = Vec::new();
        encode_frame(&mut buffer, 0xAB, &[2, 3], &[1.5; 6]);
        let (tag, dimensions) = decode_frame_start(&buffer[..FRAME_FIXED_BYTES]).unwrap();
        assert_eq!((tag, dimensions), (0xAB, 2));
        let rest = &buffer[FRAME_FIXED_BYTES..FRAME_FIXED_BYTES + 24];
        assert_eq!(decode_frame_shape(rest, 1024), Ok((vec![2, 3], 24)));
        assert_eq!(buffer.len(), FRAME_FIXED_BYTES + 24 + 24);

        // Garbage, too many dimensions, a length that disagrees with the shape, a shape whose
        // size overflows: all errors, never panics.
        assert!(decode_frame_start(&[0xff; FRAME_FIXED_BYTES]).is_err());
        let mut many = buffer[..FRAME_FIXED_BYTES].to_vec();
        many[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_frame_start(&many)
                .unwrap_err()
                .contains("dimensions")
        );
        let words = |values: &[u64]| -> Vec<u8> {
            values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect()
        };
        let error = decode_frame_shape(&words(&[2, 3, 20]), 1024).unwrap_err();
        assert_eq!(
            error,
            "frame of shape [2, 3] carries 20 bytes, expected 4 per value"
        );
        assert!(decode_frame_shape(&words(&[u64::MAX, u64::MAX, 16]), 1024).is_err());
        assert!(decode_frame_shape(&words(&[u64::MAX]), 1024).is_err());
    }
}
