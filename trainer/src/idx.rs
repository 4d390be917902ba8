//! Reader of IDX files, the format of MNIST and Fashion-MNIST, gzipped or plain.
//!
//! An IDX file is a 4-byte magic number (`0x00 0x00`, a type code, the number of dimensions),
//! one big-endian `u32` per dimension, then the elements in row-major order. Only unsigned
//! bytes (type `0x08`) occur in these data sets and only they are accepted. Every header field
//! and the exact payload length are checked, so a truncated, padded or corrupt file is an error
//! naming the file, never a panic or a silently short data set.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::bufread::GzDecoder;

use crate::error::{Result, TrainerError};

/// Type code of unsigned bytes in the IDX magic number.
const UNSIGNED_BYTE: u8 = 0x08;
/// First two bytes of a gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Most elements one IDX file may hold (256 MiB of bytes; Fashion-MNIST's largest has 47 MB).
pub const MAX_ELEMENTS: u64 = 256 * 1024 * 1024;

/// The decoded contents of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Size of each dimension, outermost first.
    pub dimensions: Vec<usize>,
    /// Elements in row-major order; exactly the product of `dimensions` long.
    pub data: Vec<u8>,
}

/// Reads the IDX file at `path`, gzipped (detected by its magic bytes) or plain, and checks
/// that it has `expected_dimensions` dimensions.
pub fn read_idx_file(path: &Path, expected_dimensions: usize) -> Result<IdxArray> {
    let read_error = |source| TrainerError::DataRead {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut reader = BufReader::new(file);
    let is_gzip = reader
        .fill_buf()
        .map_err(read_error)?
        .starts_with(&GZIP_MAGIC);
    if is_gzip {
        read_idx(GzDecoder::new(reader), expected_dimensions, path)
    } else {
        read_idx(reader, expected_dimensions, path)
    }
}

/// Decodes an IDX stream; `path` only names the source in errors.
pub fn read_idx(
    mut reader: impl Read,
    expected_dimensions: usize,
    path: &Path,
) -> Result<IdxArray> {
    let format_error = |message: String| TrainerError::DataFormat {
        path: path.to_owned(),
        message,
    };
    let read_error = |source| TrainerError::DataRead {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    read_header_bytes(&mut reader, &mut magic, "magic number", path)?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(format_error(format!(
            "magic number starts with {:#04x} {:#04x}, expected 0x00 0x00 (not an IDX file)",
            magic[0], magic[1]
        )));
    }
    if magic[2] != UNSIGNED_BYTE {
        return Err(format_error(format!(
            "element type {:#04x}, expected {UNSIGNED_BYTE:#04x} (unsigned byte)",
            magic[2]
        )));
    }
    let dimension_count = usize::from(magic[3]);
    if dimension_count != expected_dimensions {
        return Err(format_error(format!(
            "{dimension_count} dimensions, expected {expected_dimensions}"
        )));
    }
    let mut dimensions = Vec::with_capacity(dimension_count);
    let mut elements: u64 = 1;
    for index in 0..dimension_count {
        let mut size = [0u8; 4];
        read_header_bytes(&mut reader, &mut size, "dimension sizes", path)?;
        let size = u32::from_be_bytes(size);
        if size == 0 {
            return Err(format_error(format!(
                "dimension {index} has size 0, expected at least 1"
            )));
        }
        elements = elements.saturating_mul(u64::from(size));
        dimensions.push(size as usize);
    }
    if elements > MAX_ELEMENTS {
        return Err(format_error(format!(
            "header announces {elements} elements, expected at most {MAX_ELEMENTS}"
        )));
    }
    // Grows with the bytes actually present, so a lying header cannot force a huge allocation.
    let mut data = Vec::new();
    (&mut reader)
        .take(elements)
        .read_to_end(&mut data)
        .map_err(read_error)?;
    if data.len() as u64 != elements {
        return Err(format_error(format!(
            "truncated: {} data bytes, expected {elements} for dimensions {dimensions:?}",
            data.len()
        )));
    }
    // Reading past the payload also makes a gzip stream verify its CRC and length trailer.
    let mut extra = [0u8; 1];
    let trailing = reader.read(&mut extra).map_err(read_error)?;
    if trailing != 0 {
        return Err(format_error(format!(
            "trailing bytes after the {elements} elements announced by the header"
        )));
    }
    Ok(IdxArray { dimensions, data })
}

fn read_header_bytes(
    reader: &mut impl Read,
    buffer: &mut [u8],
    what: &str,
    path: &Path,
) -> Result<()> {
    reader.read_exact(buffer).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            TrainerError::DataFormat {
                path: path.to_owned(),
                message: format!("truncated header: file ends inside the {what}"),
            }
        } else {
            TrainerError::DataRead {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Encodes `data` as an IDX file of unsigned bytes with `dimensions`; used to write test
/// fixtures and small synthetic data sets.
pub fn encode_idx(dimensions: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, UNSIGNED_BYTE, dimensions.len() as u8];
    for size in dimensions {
        bytes.extend_from_slice(&size.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn format_message(result: Result<IdxArray>) -> String {
        match result {
            Err(TrainerError::DataFormat { message, .. }) => message,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn round_trips_gzipped_and_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 7).collect();
        let raw = encode_idx(&[2, 3, 4], &pixels);
        for (name, bytes) in [("a.gz", gzip(&raw)), ("a", raw.clone())] {
            let path = write_file(dir.path(), name, &bytes);
            let array = read_idx_file(&path, 3).unwrap();
            assert_eq!(array.dimensions, vec![2, 3, 4]);
            assert_eq!(array.data, pixels);
        }
    }

    #[test]
    fn truncated_payload_is_an_error() {
        let raw = encode_idx(&[10], &[1; 10]);
        let message = format_message(read_idx(&raw[..raw.len() - 3], 1, Path::new("x")));
        assert!(
            message.contains("truncated: 7 data bytes, expected 10"),
            "{message}"
        );
    }

    #[test]
    fn truncated_header_is_an_error() {
        let raw = encode_idx(&[10, 2, 2], &[1; 40]);
        for cut in [0, 3, 4, 9, 15] {
            let message = format_message(read_idx(&raw[..cut], 3, Path::new("x")));
            assert!(message.contains("truncated header"), "cut {cut}: {message}");
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut raw = encode_idx(&[4], &[1; 4]);
        raw.push(9);
        let message = format_message(read_idx(raw.as_slice(), 1, Path::new("x")));
        assert!(message.contains("trailing bytes"), "{message}");
    }

    #[test]
    fn wrong_magic_type_and_rank_are_errors() {
        let mut raw = encode_idx(&[4], &[1; 4]);
        raw[0] = 1;
        assert!(format_message(read_idx(raw.as_slice(), 1, Path::new("x"))).contains("magic"));
        let mut raw = encode_idx(&[4], &[1; 4]);
        raw[2] = 0x0d;
        assert!(
            format_message(read_idx(raw.as_slice(), 1, Path::new("x"))).contains("element type")
        );
        let raw = encode_idx(&[4], &[1; 4]);
        assert!(
            format_message(read_idx(raw.as_slice(), 3, Path::new("x")))
                .contains("1 dimensions, expected 3")
        );
    }

    #[test]
    fn zero_and_huge_dimensions_are_errors() {
        let raw = encode_idx(&[0, 28, 28], &[]);
        assert!(format_message(read_idx(raw.as_slice(), 3, Path::new("x"))).contains("size 0"));
        let raw = encode_idx(&[u32::MAX, u32::MAX, u32::MAX], &[]);
        assert!(format_message(read_idx(raw.as_slice(), 3, Path::new("x"))).contains("at most"));
    }

    #[test]
    fn corrupt_gzip_is_a_read_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut compressed = gzip(&encode_idx(&[64], &[5; 64]));
        let middle = compressed.len() / 2;
        compressed[middle] ^= 0xff;
        let crc_at = compressed.len() - 8;
        compressed[crc_at] ^= 0xff;
        let path = write_file(dir.path(), "corrupt.gz", &compressed);
        assert!(read_idx_file(&path, 1).is_err());
        let truncated = gzip(&encode_idx(&[64], &[5; 64]));
        let path = write_file(dir.path(), "short.gz", &truncated[..truncated.len() - 10]);
        assert!(read_idx_file(&path, 1).is_err());
    }

    #[test]
    fn missing_file_names_the_path() {
        let error = read_idx_file(Path::new("/nonexistent/file.gz"), 1).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/file.gz"),
            "{error}"
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = read_idx(bytes.as_slice(), 1, Path::new("x"));
            let _ = read_idx(bytes.as_slice(), 3, Path::new("x"));
        }
    }
}
