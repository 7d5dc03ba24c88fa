//! The versioned frame that carries every QUIC message.
//!
//! A frame is a 12-byte header followed by a body of codec bytes:
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..4   | magic `b"TNDM"`                         |
//! | 4..6   | protocol version, u16 big-endian        |
//! | 6..8   | kind ([`FrameKind`]), u16 big-endian    |
//! | 8..12  | body length in bytes, u32 big-endian    |
//!
//! The header is checked completely, including the body length against
//! [`FRAME_BODY_BYTES_MAX`], before any memory is reserved for the body, so a peer cannot
//! make a node allocate by lying about the length.

use crate::codec::{self, CODEC_BYTES_MAX};
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;

/// Marks the start of every frame, so that a peer that does not speak tandem is recognised
/// at once instead of being misread as a garbled message.
pub const FRAME_MAGIC: [u8; 4] = *b"TNDM";

/// The protocol version this build speaks; peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of the fixed frame header: magic, version, kind and body length.
pub const FRAME_HEADER_BYTES: usize = 12;

/// The largest frame body accepted: 16 MiB, the same as the codec limit.
pub const FRAME_BODY_BYTES_MAX: usize = CODEC_BYTES_MAX;

/// The most memory reserved for a body before its bytes arrive: 64 KiB, enough for almost
/// every message in one allocation.
const FRAME_BODY_PREALLOCATION_BYTES_MAX: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
}

impl FrameKind {
    /// The kind with the given wire value, or `None` for a value this build does not know.
    pub fn from_wire(value: u16) -> Option<FrameKind> {
        match value {
            1 => Some(FrameKind::Request),
            2 => Some(FrameKind::Response),
            _ => None,
        }
    }

    /// The value written on the wire.
    pub fn to_wire(self) -> u16 {
        self as u16
    }
}

/// A decoded and validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: FrameKind,
    /// Length of the body that follows the header; never more than [`FRAME_BODY_BYTES_MAX`].
    pub body_bytes: u32,
}

impl FrameHeader {
    /// The header as it goes on the wire.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut bytes = [0u8; FRAME_HEADER_BYTES];
        bytes[0..4].copy_from_slice(&FRAME_MAGIC);
        bytes[4..6].copy_from_slice(&self.version.to_be_bytes());
        bytes[6..8].copy_from_slice(&self.kind.to_wire().to_be_bytes());
        bytes[8..12].copy_from_slice(&self.body_bytes.to_be_bytes());
        bytes
    }
}

/// Encodes `value` as the body of a frame of `kind` and returns header and body together.
pub fn encode_frame<T: Serialize + ?Sized>(kind: FrameKind, value: &T) -> Result<Vec<u8>> {
    let body = codec::encode(value)?;
    let header = header_for_body(kind, body.len())?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The header for a body of `body_length` bytes, refusing bodies over the limit.
fn header_for_body(kind: FrameKind, body_length: usize) -> Result<FrameHeader> {
    let too_large = || Error::FrameTooLarge {
        body_bytes: body_length as u64,
        limit_bytes: FRAME_BODY_BYTES_MAX as u64,
    };
    if body_length > FRAME_BODY_BYTES_MAX {
        return Err(too_large());
    }
    let body_bytes = u32::try_from(body_length).map_err(|_| too_large())?;
    Ok(FrameHeader {
        version: PROTOCOL_VERSION,
        kind,
        body_bytes,
    })
}

/// Decodes and validates the header at the start of `bytes`; anything after the header is
/// ignored here.
pub fn decode_header(bytes: &[u8]) -> Result<FrameHeader> {
    let Some(header) = bytes.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(Error::FrameTruncated {
            needed_bytes: FRAME_HEADER_BYTES as u64,
            have_bytes: bytes.len() as u64,
        });
    };
    let [m0, m1, m2, m3, v0, v1, k0, k1, l0, l1, l2, l3] = *header;
    let magic = [m0, m1, m2, m3];
    if magic != FRAME_MAGIC {
        return Err(Error::FrameBadMagic { found: magic });
    }
    let version = u16::from_be_bytes([v0, v1]);
    if version != PROTOCOL_VERSION {
        return Err(Error::FrameVersionUnsupported {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let kind_value = u16::from_be_bytes([k0, k1]);
    let kind =
        FrameKind::from_wire(kind_value).ok_or(Error::FrameKindUnknown { found: kind_value })?;
    let body_bytes = u32::from_be_bytes([l0, l1, l2, l3]);
    if body_bytes as u64 > FRAME_BODY_BYTES_MAX as u64 {
        return Err(Error::FrameTooLarge {
            body_bytes: body_bytes as u64,
            limit_bytes: FRAME_BODY_BYTES_MAX as u64,
        });
    }
    Ok(FrameHeader {
        version,
        kind,
        body_bytes,
    })
}

/// Decodes one complete frame that must fill `bytes` exactly.
///
/// This is a pure function over untrusted input: it never panics and never allocates more
/// than the decoded value itself needs.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<(FrameHeader, T)> {
    let header = decode_header(bytes)?;
    let body_length = header.body_bytes as usize;
    let frame_length = FRAME_HEADER_BYTES + body_length;
    let Some(body) = bytes.get(FRAME_HEADER_BYTES..frame_length) else {
        return Err(Error::FrameTruncated {
            needed_bytes: frame_length as u64,
            have_bytes: bytes.len() as u64,
        });
    };
    if bytes.len() > frame_length {
        return Err(Error::TrailingBytes {
            trailing_bytes: (bytes.len() - frame_length) as u64,
        });
    }
    let value = codec::decode(body)?;
    Ok((header, value))
}

/// Describes a stream for error messages, since quinn's streams do not know their peer.
fn stream_name(stream: quinn::StreamId) -> String {
    stream.to_string()
}

/// Reads exactly one frame from `stream`.
///
/// The stream may carry more data after the frame; it is left unread.
pub async fn read_frame<T: DeserializeOwned>(
    stream: &mut quinn::RecvStream,
) -> Result<(FrameHeader, T)> {
    let stream_id = stream.id();
    let mut header_bytes = [0u8; FRAME_HEADER_BYTES];
    read_exactly(stream, &mut header_bytes).await?;
    let header = decode_header(&header_bytes)?;
    // The length was checked against the limit by decode_header. The body still grows only
    // as bytes actually arrive, so a peer that claims a large body and then sends nothing
    // costs a small buffer rather than the full claimed size.
    let body_length = header.body_bytes as usize;
    let mut body = Vec::with_capacity(body_length.min(FRAME_BODY_PREALLOCATION_BYTES_MAX));
    while body.len() < body_length {
        let chunk = stream
            .read_chunk(body_length - body.len(), true)
            .await
            .map_err(|error| Error::Stream {
                stream: stream_name(stream_id),
                detail: error.to_string(),
            })?;
        let Some(chunk) = chunk else {
            return Err(Error::FrameTruncated {
                needed_bytes: (FRAME_HEADER_BYTES + body_length) as u64,
                have_bytes: (FRAME_HEADER_BYTES + body.len()) as u64,
            });
        };
        body.extend_from_slice(&chunk.bytes);
    }
    let value = codec::decode(&body).map_err(|error| {
        tracing::debug!(stream = %stream_id, %error, "frame body does not decode");
        error
    })?;
    Ok((header, value))
}

/// Fills `buffer` from `stream`, reporting a stream that ends early as a truncated frame.
async fn read_exactly(stream: &mut quinn::RecvStream, buffer: &mut [u8]) -> Result<()> {
    let stream_id = stream.id();
    stream
        .read_exact(buffer)
        .await
        .map_err(|error| match error {
            quinn::ReadExactError::FinishedEarly(have_bytes) => Error::FrameTruncated {
                needed_bytes: buffer.len() as u64,
                have_bytes: have_bytes as u64,
            },
            quinn::ReadExactError::ReadError(error) => Error::Stream {
                stream: stream_name(stream_id),
                detail: error.to_string(),
            },
        })
}

/// Writes `value` as one frame of `kind` to `stream`; the caller decides when to finish it.
///
/// The value is encoded before the returned future first runs, so the future holds only
/// bytes and not a reference to `value`: a caller can send it to another thread even when
/// the value's type is not `Sync`.
pub fn write_frame<'stream, T: Serialize + ?Sized>(
    stream: &'stream mut quinn::SendStream,
    kind: FrameKind,
    value: &T,
) -> impl Future<Output = Result<()>> + Send + 'stream {
    let encoded = codec::encode(value)
        .and_then(|body| header_for_body(kind, body.len()).map(|header| (header, body)));
    async move {
        let (header, body) = encoded?;
        let stream_id = stream.id();
        let write_error = |error: quinn::WriteError| Error::Stream {
            stream: stream_name(stream_id),
            detail: error.to_string(),
        };
        // Header and body are written separately so a large body is not copied just to put
        // twelve bytes in front of it.
        stream
            .write_all(&header.to_bytes())
            .await
            .map_err(write_error)?;
        stream.write_all(&body).await.map_err(write_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Readiness, Request, Response};
    use proptest::prelude::*;

    fn header_bytes(magic: [u8; 4], version: u16, kind: u16, body_bytes: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&magic);
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&body_bytes.to_be_bytes());
        bytes
    }

    #[test]
    fn frames_round_trip() {
        let request = Request::VolumeSetReadiness {
            name: "alpha".to_owned(),
            readiness: Readiness::NotReady,
        };
        let bytes = encode_frame(FrameKind::Request, &request).unwrap();
        assert_eq!(&bytes[0..4], b"TNDM");
        assert_eq!(&bytes[4..6], &[0, 1]);
        assert_eq!(&bytes[6..8], &[0, 1]);
        let (header, decoded) = decode_frame::<Request>(&bytes).unwrap();
        assert_eq!(header.kind, FrameKind::Request);
        assert_eq!(header.version, PROTOCOL_VERSION);
        assert_eq!(header.body_bytes as usize, bytes.len() - FRAME_HEADER_BYTES);
        assert_eq!(decoded, request);
        assert_eq!(header.to_bytes()[..], bytes[..FRAME_HEADER_BYTES]);
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut bytes = encode_frame(FrameKind::Request, &Request::NodeStatus).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode_frame::<Request>(&bytes),
            Err(Error::FrameBadMagic { found }) if found == *b"XNDM"
        ));
    }

    #[test]
    fn other_versions_are_refused() {
        let mut bytes = encode_frame(FrameKind::Request, &Request::NodeStatus).unwrap();
        bytes[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert!(matches!(
            decode_frame::<Request>(&bytes),
            Err(Error::FrameVersionUnsupported {
                found: 2,
                supported: PROTOCOL_VERSION
            })
        ));
    }

    #[test]
    fn unknown_kinds_are_refused() {
        for kind in [0u16, 3, u16::MAX] {
            let bytes = header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, kind, 0);
            assert!(matches!(
                decode_header(&bytes),
                Err(Error::FrameKindUnknown { found }) if found == kind
            ));
        }
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        // A header claiming almost 4 GiB with no body at all: the error must be about the
        // size, which proves the length was judged before any body was read or allocated.
        let bytes = header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 1, u32::MAX);
        assert!(matches!(
            decode_frame::<Request>(&bytes),
            Err(Error::FrameTooLarge {
                body_bytes,
                limit_bytes,
            }) if body_bytes == u32::MAX as u64 && limit_bytes == FRAME_BODY_BYTES_MAX as u64
        ));
        let just_over = header_bytes(
            FRAME_MAGIC,
            PROTOCOL_VERSION,
            1,
            FRAME_BODY_BYTES_MAX as u32 + 1,
        );
        assert!(matches!(
            decode_header(&just_over),
            Err(Error::FrameTooLarge { .. })
        ));
        let at_limit = header_bytes(
            FRAME_MAGIC,
            PROTOCOL_VERSION,
            1,
            FRAME_BODY_BYTES_MAX as u32,
        );
        assert!(decode_header(&at_limit).is_ok());
    }

    #[test]
    fn truncated_headers_and_bodies_are_refused() {
        let bytes = encode_frame(
            FrameKind::Response,
            &Response::Deleted {
                name: "alpha".to_owned(),
            },
        )
        .unwrap();
        assert!(matches!(
            decode_frame::<Response>(&bytes[..5]),
            Err(Error::FrameTruncated {
                needed_bytes: 12,
                have_bytes: 5
            })
        ));
        let short = &bytes[..bytes.len() - 1];
        assert!(matches!(
            decode_frame::<Response>(short),
            Err(Error::FrameTruncated { needed_bytes, have_bytes })
                if needed_bytes == bytes.len() as u64 && have_bytes == short.len() as u64
        ));
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let mut bytes = encode_frame(FrameKind::Request, &Request::VolumeList).unwrap();
        bytes.extend_from_slice(b"junk");
        assert!(matches!(
            decode_frame::<Request>(&bytes),
            Err(Error::TrailingBytes { trailing_bytes: 4 })
        ));
    }

    #[test]
    fn a_body_that_is_not_the_expected_message_is_a_decode_error() {
        let bytes = header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 1, 3)
            .into_iter()
            .chain([0xff, 0xff, 0xff])
            .collect::<Vec<u8>>();
        assert!(matches!(
            decode_frame::<Request>(&bytes),
            Err(Error::Decode { .. })
        ));
    }

    #[test]
    fn oversized_bodies_are_refused_when_encoding() {
        let oversized = vec![0u8; FRAME_BODY_BYTES_MAX + 1];
        assert!(encode_frame(FrameKind::Request, &oversized).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame::<Request>(&bytes);
        }

        #[test]
        fn arbitrary_bodies_behind_a_valid_header_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut bytes = header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 2, body.len() as u32);
            bytes.extend_from_slice(&body);
            let _ = decode_frame::<Response>(&bytes);
        }

        #[test]
        fn show_requests_round_trip(name in ".{0,128}") {
            let request = Request::VolumeShow { name };
            let bytes = encode_frame(FrameKind::Request, &request).unwrap();
            let (header, decoded) = decode_frame::<Request>(&bytes).unwrap();
            prop_assert_eq!(header.kind, FrameKind::Request);
            prop_assert_eq!(decoded, request);
        }
    }
}
