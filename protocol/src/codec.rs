//! The one place in tandem that turns values into bytes and back.
//!
//! Everything that is encoded, whether it travels in a QUIC frame or rests in a node's
//! metadata store, goes through [`encode`] and [`decode`], so the format (bincode's standard
//! configuration: little-endian, variable-length integers) and its size limit are decided
//! once.

use crate::error::{Error, Result};
use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::enc::write::Writer;
use bincode::error::EncodeError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest encoded value accepted in either direction: 16 MiB, the same as the frame
/// body limit, so anything that can be encoded can also be framed.
pub const CODEC_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Bincode's standard configuration with the limit attached, so that a length prefix read
/// from untrusted bytes can never make the decoder allocate more than the limit.
type CodecConfiguration = Configuration<LittleEndian, Varint, Limit<CODEC_BYTES_MAX>>;

fn configuration() -> CodecConfiguration {
    bincode::config::standard().with_limit::<CODEC_BYTES_MAX>()
}

/// A writer that stops storing bytes once the limit is passed but keeps counting them, so an
/// oversized value never grows the buffer beyond the limit and the error still says how large
/// the value really was.
struct LimitedWriter {
    bytes: Vec<u8>,
    encoded_bytes: u64,
}

impl Writer for LimitedWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.encoded_bytes = self.encoded_bytes.saturating_add(bytes.len() as u64);
        if self.encoded_bytes <= CODEC_BYTES_MAX as u64 {
            self.bytes.extend_from_slice(bytes);
        }
        Ok(())
    }
}

/// Encodes `value`, failing when the encoding would exceed [`CODEC_BYTES_MAX`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut writer = LimitedWriter {
        bytes: Vec::new(),
        encoded_bytes: 0,
    };
    bincode::serde::encode_into_writer(value, &mut writer, configuration()).map_err(|error| {
        Error::Encode {
            detail: error.to_string(),
        }
    })?;
    if writer.encoded_bytes > CODEC_BYTES_MAX as u64 {
        return Err(Error::CodecTooLarge {
            encoded_bytes: writer.encoded_bytes,
            limit_bytes: CODEC_BYTES_MAX as u64,
        });
    }
    Ok(writer.bytes)
}

/// Decodes exactly one value from `bytes`.
///
/// Input longer than [`CODEC_BYTES_MAX`] is refused before decoding starts, and bytes left
/// over after the value are an error: a message that carries more than it says is corrupt or
/// comes from an incompatible peer, and silently ignoring the rest would hide that.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    if bytes.len() > CODEC_BYTES_MAX {
        return Err(Error::CodecTooLarge {
            encoded_bytes: bytes.len() as u64,
            limit_bytes: CODEC_BYTES_MAX as u64,
        });
    }
    let (value, consumed_bytes) = bincode::serde::decode_from_slice(bytes, configuration())
        .map_err(|error| Error::Decode {
            detail: error.to_string(),
        })?;
    let trailing_bytes = bytes.len().saturating_sub(consumed_bytes);
    if trailing_bytes > 0 {
        return Err(Error::TrailingBytes {
            trailing_bytes: trailing_bytes as u64,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Extent, Readiness, Request, Response, VolumeInfo};
    use proptest::prelude::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let request = Request::Snap {
            request_id: 7,
            source: "alpha".to_owned(),
            target: "beta".to_owned(),
            extents: vec![
                Extent { first: 0, last: 9 },
                Extent {
                    first: 20,
                    last: 20,
                },
            ],
            overwrite: false,
        };
        assert_eq!(
            decode::<Request>(&encode(&request).unwrap()).unwrap(),
            request
        );

        let response = Response::Volumes(vec![VolumeInfo {
            name: "alpha".to_owned(),
            id: 7,
            size_bytes: 1 << 40,
            track_size_bytes: 1 << 20,
            track_count: 1 << 20,
            readiness: Readiness::ReadOnly,
            session_slots_used: 3,
            layer_depth: 2,
            created_unix_seconds: 1_700_000_000,
        }]);
        assert_eq!(
            decode::<Response>(&encode(&response).unwrap()).unwrap(),
            response
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&Request::NodeStatus).unwrap();
        bytes.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode::<Request>(&bytes),
            Err(Error::TrailingBytes { trailing_bytes: 2 })
        ));
    }

    #[test]
    fn empty_and_garbage_input_is_a_decode_error() {
        assert!(matches!(decode::<Request>(&[]), Err(Error::Decode { .. })));
        assert!(matches!(
            decode::<Request>(&[0xff, 0xff, 0xff]),
            Err(Error::Decode { .. })
        ));
    }

    #[test]
    fn a_huge_claimed_length_fails_without_allocating_it() {
        // A variable-length integer prefix (marker 253 means "64-bit length follows") claiming
        // u64::MAX elements: decoding must fail cleanly rather than try to reserve the memory.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Vec<u8>>(&bytes),
            Err(Error::Decode { .. })
        ));
    }

    #[test]
    fn values_over_the_limit_are_refused_in_both_directions() {
        let oversized = vec![7u8; CODEC_BYTES_MAX + 1];
        match encode(&oversized) {
            Err(Error::CodecTooLarge {
                encoded_bytes,
                limit_bytes,
            }) => {
                // The length prefix takes 5 bytes in the variable-length integer encoding: a
                // marker byte for "32-bit length follows" and the length itself.
                assert_eq!(encoded_bytes, CODEC_BYTES_MAX as u64 + 1 + 5);
                assert_eq!(limit_bytes, CODEC_BYTES_MAX as u64);
            }
            other => panic!("expected CodecTooLarge, got {other:?}"),
        }
        assert!(matches!(
            decode::<Vec<u8>>(&oversized),
            Err(Error::CodecTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn volume_creation_requests_round_trip(
            name in ".{0,64}",
            size_bytes in any::<u64>(),
            track_size_bytes in any::<u32>(),
        ) {
            let request = Request::VolumeCreate { name, size_bytes, track_size_bytes };
            prop_assert_eq!(decode::<Request>(&encode(&request).unwrap()).unwrap(), request);
        }

        #[test]
        fn error_responses_round_trip(message in ".{0,256}") {
            let response = Response::Error {
                code: crate::messages::ErrorCode::LimitExceeded,
                message,
            };
            prop_assert_eq!(decode::<Response>(&encode(&response).unwrap()).unwrap(), response);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
