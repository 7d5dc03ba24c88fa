//! The one error type of the protocol crate.

/// Everything that can go wrong while encoding, decoding or moving tandem's wire formats.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("frame body of {body_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    FrameTooLarge { body_bytes: u64, limit_bytes: u64 },
    #[error("frame has bad magic {found:02x?}; the peer does not speak tandem")]
    FrameBadMagic { found: [u8; 4] },
    #[error("frame protocol version {found} is not supported (this build speaks {supported})")]
    FrameVersionUnsupported { found: u16, supported: u16 },
    #[error("frame is truncated: needed {needed_bytes} bytes, have {have_bytes}")]
    FrameTruncated { needed_bytes: u64, have_bytes: u64 },
    #[error("could not encode a message: {detail}")]
    Encode { detail: String },
    #[error("could not decode a message: {detail}")]
    Decode { detail: String },
    #[error("NBD: {detail}")]
    NbdMalformed { detail: String },
    #[error("TLS configuration: {detail}")]
    Tls { detail: String },
    #[error("certificate files in {path}: {detail}")]
    Certificates { path: String, detail: String },
    #[error("connection to {peer}: {detail}")]
    Connection { peer: String, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame kind {found} is unknown; the peer speaks a different dialect of tandem")]
    FrameKindUnknown { found: u16 },
    #[error("expected a {expected:?} frame but the peer sent a {found:?} frame")]
    FrameKindUnexpected {
        expected: crate::frame::FrameKind,
        found: crate::frame::FrameKind,
    },
    #[error("{trailing_bytes} unexpected bytes follow the end of the message")]
    TrailingBytes { trailing_bytes: u64 },
    #[error(
        "encoded value of {encoded_bytes} bytes exceeds the codec limit of {limit_bytes} bytes"
    )]
    CodecTooLarge {
        encoded_bytes: u64,
        limit_bytes: u64,
    },
    #[error("QUIC {stream}: {detail}")]
    Stream { stream: String, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
