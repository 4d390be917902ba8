//! The protobuf codec every Cohort service and client uses: prost's, except that a message that
//! does not decode is answered `INVALID_ARGUMENT` rather than `INTERNAL`.
//!
//! gRPC's status-code guide lists `INTERNAL` for parse errors, and tonic's prost codec follows
//! it. For a server that faces untrusted clients that hides the culprit: a request with a string
//! field that is not UTF-8, or with a malformed field, is the caller's mistake, and a monitoring
//! rule on `INTERNAL` must only fire for the server's own failures. prost's error names the
//! message and field (`SubmitJobRequest.spec_toml: invalid string value: data is not UTF-8
//! encoded`), so the caller learns what to fix. Encoding is prost's own.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// The codec named in `build.rs` (`codec_path`): encodes `T`, decodes `U`.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    /// The message types.
    types: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self { types: PhantomData }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder { types: PhantomData }
    }
}

/// Decodes `U`, turning a decoding failure into `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U> {
    /// The message type.
    types: PhantomData<U>,
}

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buffer).map(Some).map_err(invalid_message)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status of a message that does not decode.
fn invalid_message(error: prost::DecodeError) -> Status {
    Status::invalid_argument(crate::text::truncate(
        &format!("malformed message: {error}"),
        crate::text::MAX_ERROR_BYTES,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::SubmitJobRequest;

    #[test]
    fn a_string_that_is_not_utf8_is_an_invalid_argument_naming_the_field() {
        // Field 1 (spec_toml), length-delimited, 3 bytes that are not UTF-8.
        let bytes = [0x0a, 0x03, 0xff, 0xfe, 0x80];
        let error = SubmitJobRequest::decode(&bytes[..]).unwrap_err();
        let status = invalid_message(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("SubmitJobRequest.spec_toml"),
            "{}",
            status.message()
        );
    }
}
