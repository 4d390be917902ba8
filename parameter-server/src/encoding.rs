//! Tensor bytes on the wire: element types, little-endian encoding and decoding to `f32`, and
//! the cutting of a buffer into bounded chunks.
//!
//! Everything the shard stores and accumulates is `f32`; `bf16` and `f16` exist only on the
//! wire, to halve traffic (pushes from mixed-precision ranks, pulls of a working copy).

use half::{bf16, f16};
use prost::bytes::Bytes;

use crate::error::{Error, Result};
use cohort_proto::ps_v1;

/// Element type of tensor bytes on the wire: the one collectives use too, so ranks push
/// gradients in the type their communicator already uses.
pub use cohort_numerics::DType;

/// Returns the protocol's value for `dtype`.
pub fn to_wire(dtype: DType) -> ps_v1::ElementType {
    match dtype {
        DType::F32 => ps_v1::ElementType::F32,
        DType::Bf16 => ps_v1::ElementType::Bf16,
        DType::F16 => ps_v1::ElementType::F16,
    }
}

/// Decodes a protocol value; unspecified means `f32`, unknown values are refused.
pub fn from_wire(value: i32, field: &str) -> Result<DType> {
    match ps_v1::ElementType::try_from(value) {
        Ok(ps_v1::ElementType::Unspecified | ps_v1::ElementType::F32) => Ok(DType::F32),
        Ok(ps_v1::ElementType::Bf16) => Ok(DType::Bf16),
        Ok(ps_v1::ElementType::F16) => Ok(DType::F16),
        Err(_) => Err(Error::invalid(format!(
            "{field} = {value}, expected an ElementType (1 = f32, 2 = bf16, 3 = f16)"
        ))),
    }
}

/// Returns the number of elements in `bytes` of `dtype`, or an error naming `what` when the
/// length is not a whole number of elements.
pub fn element_count(dtype: DType, bytes: usize, what: &str) -> Result<usize> {
    if !bytes.is_multiple_of(dtype.size_bytes()) {
        return Err(Error::invalid(format!(
            "{what}: {bytes} bytes is not a whole number of {dtype} elements"
        )));
    }
    Ok(bytes / dtype.size_bytes())
}

/// Decodes little-endian `data` of `dtype` into `destination`, whose length must be the element
/// count of `data` (callers check it with [`element_count`]).
pub fn decode_into(dtype: DType, data: &[u8], destination: &mut [f32]) {
    debug_assert_eq!(data.len(), destination.len() * dtype.size_bytes());
    match dtype {
        DType::F32 => {
            if cfg!(target_endian = "little") {
                bytemuck::cast_slice_mut::<f32, u8>(destination).copy_from_slice(data);
            } else {
                for (value, bytes) in destination.iter_mut().zip(data.chunks_exact(4)) {
                    *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                }
            }
        }
        DType::Bf16 => {
            for (value, bytes) in destination.iter_mut().zip(data.chunks_exact(2)) {
                *value = bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
            }
        }
        DType::F16 => {
            for (value, bytes) in destination.iter_mut().zip(data.chunks_exact(2)) {
                *value = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
            }
        }
    }
}

/// Adds little-endian `data` of `dtype` to `destination` element by element (lengths as for
/// [`decode_into`]).
pub fn add_decoded(dtype: DType, data: &[u8], destination: &mut [f32]) {
    debug_assert_eq!(data.len(), destination.len() * dtype.size_bytes());
    match dtype {
        DType::F32 => {
            for (value, bytes) in destination.iter_mut().zip(data.chunks_exact(4)) {
                *value += f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
        DType::Bf16 => {
            for (value, bytes) in destination.iter_mut().zip(data.chunks_exact(2)) {
                *value += bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
            }
        }
        DType::F16 => {
            for (value, bytes) in destination.iter_mut().zip(data.chunks_exact(2)) {
                *value += f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
            }
        }
    }
}

/// Encodes `values` as little-endian `dtype` bytes (rounding to nearest for 16-bit types).
pub fn encode(dtype: DType, values: &[f32]) -> Bytes {
    match dtype {
        DType::F32 => {
            if cfg!(target_endian = "little") {
                Bytes::copy_from_slice(bytemuck::cast_slice::<f32, u8>(values))
            } else {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        }
        DType::Bf16 => {
            let mut bytes = Vec::with_capacity(values.len() * 2);
            for value in values {
                bytes.extend_from_slice(&bf16::from_f32(*value).to_le_bytes());
            }
            Bytes::from(bytes)
        }
        DType::F16 => {
            let mut bytes = Vec::with_capacity(values.len() * 2);
            for value in values {
                bytes.extend_from_slice(&f16::from_f32(*value).to_le_bytes());
            }
            Bytes::from(bytes)
        }
    }
}

/// Returns how many elements of `dtype` fit one chunk of at most `max_chunk_bytes` (at least 1).
pub fn elements_per_chunk(dtype: DType, max_chunk_bytes: usize) -> usize {
    (max_chunk_bytes / dtype.size_bytes()).max(1)
}

/// Encodes `values` into chunks of at most `max_chunk_bytes`, each with the element offset of
/// its first value (offsets start at 0).
pub fn encode_chunks(dtype: DType, values: &[f32], max_chunk_bytes: usize) -> Vec<(u64, Bytes)> {
    let per_chunk = elements_per_chunk(dtype, max_chunk_bytes);
    values
        .chunks(per_chunk)
        .enumerate()
        .map(|(index, chunk)| ((index * per_chunk) as u64, encode(dtype, chunk)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_representable_values() {
        let values = [0.0f32, 1.0, -2.5, 1024.0, 0.125];
        for dtype in [DType::F32, DType::Bf16, DType::F16] {
            let bytes = encode(dtype, &values);
            assert_eq!(bytes.len(), values.len() * dtype.size_bytes());
            let mut decoded = vec![0.0; values.len()];
            decode_into(dtype, &bytes, &mut decoded);
            assert_eq!(decoded, values, "{dtype}");
            add_decoded(dtype, &bytes, &mut decoded);
            let doubled: Vec<f32> = values.iter().map(|v| 2.0 * v).collect();
            assert_eq!(decoded, doubled, "{dtype}");
        }
    }

    #[test]
    fn f32_bytes_are_little_endian() {
        assert_eq!(&encode(DType::F32, &[1.0])[..], &[0, 0, 0x80, 0x3f]);
        assert_eq!(&encode(DType::Bf16, &[1.0])[..], &[0x80, 0x3f]);
        assert_eq!(&encode(DType::F16, &[1.0])[..], &[0x00, 0x3c]);
    }

    #[test]
    fn chunks_cover_the_buffer_with_bounded_sizes() {
        let values: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let chunks = encode_chunks(DType::F32, &values, 12);
        let offsets: Vec<u64> = chunks.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(offsets, vec![0, 3, 6, 9]);
        assert!(chunks.iter().all(|(_, bytes)| bytes.len() <= 12));
        assert_eq!(chunks.iter().map(|(_, b)| b.len()).sum::<usize>(), 40);
        assert!(encode_chunks(DType::F32, &[], 12).is_empty());
    }

    #[test]
    fn partial_elements_and_unknown_types_are_refused() {
        assert!(element_count(DType::F32, 6, "dense chunk").is_err());
        assert_eq!(element_count(DType::Bf16, 6, "dense chunk").unwrap(), 3);
        assert_eq!(from_wire(0, "dtype").unwrap(), DType::F32);
        assert_eq!(from_wire(2, "dtype").unwrap(), DType::Bf16);
        let error = from_wire(9, "header.dtype").unwrap_err();
        assert!(error.to_string().starts_with("header.dtype = 9"), "{error}");
    }
}
