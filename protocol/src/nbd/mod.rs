//! The NBD wire protocol (newstyle fixed handshake, simple replies) as pure functions.
//!
//! Nothing here performs I/O, spawns tasks or reads clocks: every function takes bytes or
//! values and returns values or bytes. That keeps the node's tokio driver a thin loop of
//! "read N bytes, call a function, write what it returns", and lets fuzzers and property
//! tests reach every parser directly.
//!
//! The protocol is the one in the NBD project's `doc/proto.md`. This module implements:
//!
//! - the fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`,
//!   `NBD_OPT_GO`, `NBD_OPT_LIST` and `NBD_OPT_ABORT` ([`handshake`]);
//! - the transmission phase with simple replies only: READ, WRITE, DISC, FLUSH, TRIM and
//!   WRITE_ZEROES ([`transmission`]);
//! - the client half of both, used by the node's demo and by tests ([`client`]).
//!
//! Structured replies, extended headers, meta contexts and STARTTLS are deliberately
//! absent: their options are answered `NBD_REP_ERR_UNSUP`, which qemu, libnbd and
//! nbd-client all treat as "fall back to the baseline protocol".
//!
//! # How a server driver uses this module
//!
//! 1. Write [`server_greeting`]; read 4 bytes and call [`parse_client_flags`] (an error
//!    means: close the connection, as the spec demands for unknown client flags).
//! 2. Loop: read 16 bytes, call [`parse_option_header`] (an error means: close; the length
//!    check happens here so that nothing is allocated for an oversized option), read
//!    `data_bytes` bytes, call [`answer_option`], write its `reply`, then follow its
//!    [`NextStep`].
//! 3. In transmission: read 28 bytes, call [`parse_request_header`] (an error means: close),
//!    then [`classify_request`] to learn whether to perform the command, answer with an
//!    error (after reading and discarding any write payload), or close. Replies are
//!    [`encode_simple_reply`] followed, for a successful READ, by exactly `length` bytes.

pub mod client;
pub mod handshake;
pub mod transmission;

#[cfg(test)]
mod tests;

pub use client::{
    encode_client_flags, encode_go, encode_info, encode_option, encode_request,
    parse_export_name_reply, parse_info_block_size, parse_info_export, parse_info_type,
    parse_option_reply_header, parse_server_entry, parse_server_greeting, parse_simple_reply,
    server_offers_no_zeroes, BlockSizes, OptionReplyHeader, SimpleReply,
};
pub use handshake::{
    answer_option, parse_client_flags, parse_option_header, server_greeting, transmission_flags,
    ClientFlags, ExportCatalog, ExportInfo, NextStep, OptionHeader, OptionOutcome,
};
pub use transmission::{
    classify_request, encode_simple_reply, parse_request_header, Command, RequestCheck,
    RequestHeader,
};

use crate::error::{Error, Result};

/// The longest export name the spec allows (strings "MUST be no longer than 4096 bytes").
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;

/// The most option data the server accepts before closing the connection.
///
/// Big enough for the largest option a conforming client sends: an export name plus one
/// more string of the same maximum length (a meta-context query) plus room for counts and
/// information requests. Anything larger is treated as a denial-of-service attempt, which
/// the spec allows the server to answer with a hard disconnect.
pub const OPTION_DATA_BYTES_MAX: u32 = 2 * EXPORT_NAME_BYTES_MAX as u32 + 1024;

/// The most option reply data the client half accepts, for the same reason as
/// [`OPTION_DATA_BYTES_MAX`]: the length arrives before the data and bounds an allocation.
pub const OPTION_REPLY_DATA_BYTES_MAX: u32 = OPTION_DATA_BYTES_MAX;

/// The largest READ or WRITE length the server handles: the spec's portable limit (2^25),
/// which no client may treat as a denial of service, and what we advertise as maximum.
pub const REQUEST_PAYLOAD_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Advertised minimum block size: the sector size every NBD client already honours, and
/// the granularity of the storage underneath.
pub const ADVERTISED_BLOCK_MINIMUM_BYTES: u32 = 512;

/// Advertised preferred block size: requests of this size and alignment avoid
/// read-modify-write in the storage underneath.
pub const ADVERTISED_BLOCK_PREFERRED_BYTES: u32 = 4096;

/// Advertised maximum block size for READ and WRITE.
pub const ADVERTISED_BLOCK_MAXIMUM_BYTES: u32 = REQUEST_PAYLOAD_BYTES_MAX;

/// Size of the server greeting: two magics and the handshake flags.
pub const SERVER_GREETING_BYTES: usize = 18;
/// Size of the client flags field.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Size of an option header sent by the client (magic, option code, data length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of an option reply header sent by the server (magic, option, type, length).
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Size of the `NBD_OPT_EXPORT_NAME` reply before its optional zeroes: size and flags.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;
/// Size of the reserved zeroes after an `NBD_OPT_EXPORT_NAME` reply without NO_ZEROES.
pub const EXPORT_NAME_REPLY_ZEROES_BYTES: usize = 124;
/// Size of a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// Magic numbers that start each kind of message.
pub mod magic {
    /// `NBDMAGIC`, first in the server greeting.
    pub const INIT: u64 = 0x4e42_444d_4147_4943;
    /// `IHAVEOPT`, second in the greeting and first in every option the client sends.
    pub const OPTION: u64 = 0x4948_4156_454f_5054;
    /// First in every option reply.
    pub const OPTION_REPLY: u64 = 0x0003_e889_0455_65a9;
    /// First in every transmission request.
    pub const REQUEST: u32 = 0x2560_9513;
    /// First in every simple reply.
    pub const SIMPLE_REPLY: u32 = 0x6744_6698;
    /// First in every structured reply chunk (never sent by this server).
    pub const STRUCTURED_REPLY: u32 = 0x668e_33ef;
    /// First in an extended-header request (never negotiated by this server).
    pub const EXTENDED_REQUEST: u32 = 0x21e4_1c71;
}

/// Handshake flags the server sends in its greeting.
pub mod handshake_flag {
    /// The server speaks fixed newstyle: unknown options get an error reply, not a hang-up.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after an `NBD_OPT_EXPORT_NAME` reply.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags the client answers the greeting with.
pub mod client_flag {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after an `NBD_OPT_EXPORT_NAME` reply.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands; any other bit means "close the connection".
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option codes the client sends during the handshake.
pub mod option {
    /// Choose an export and enter transmission; cannot report errors.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake: the server acknowledges and closes.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Withdrawn experiment; answered as unsupported.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS; answered as unsupported (tandem hosts are on trusted links).
    pub const STARTTLS: u32 = 5;
    /// Describe an export without entering transmission.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies; answered as unsupported so clients keep simple replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// Meta-context listing; answered as unsupported.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Meta-context selection; answered as unsupported.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit extended headers; answered as unsupported.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types the server sends during the handshake.
pub mod reply {
    /// The option succeeded (or a list of replies has ended).
    pub const ACK: u32 = 1;
    /// One export in answer to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export, in answer to INFO or GO.
    pub const INFO: u32 = 3;
    /// A meta context (never sent by this server).
    pub const META_CONTEXT: u32 = 4;

    /// Bit 31 marks every error reply.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// The option is not implemented by this server.
    pub const ERROR_UNSUPPORTED: u32 = ERROR_BIT + 1;
    /// The option is forbidden by server policy.
    pub const ERROR_POLICY: u32 = ERROR_BIT + 2;
    /// The option's data is syntactically or semantically invalid.
    pub const ERROR_INVALID: u32 = ERROR_BIT + 3;
    /// The option is not available on this platform.
    pub const ERROR_PLATFORM: u32 = ERROR_BIT + 4;
    /// TLS must be negotiated first.
    pub const ERROR_TLS_REQUIRED: u32 = ERROR_BIT + 5;
    /// The requested export does not exist.
    pub const ERROR_UNKNOWN: u32 = ERROR_BIT + 6;
    /// The server is shutting down.
    pub const ERROR_SHUTDOWN: u32 = ERROR_BIT + 7;
    /// The client must request block sizes before entering transmission.
    pub const ERROR_BLOCK_SIZE_REQUIRED: u32 = ERROR_BIT + 8;
    /// The request or its reply is too large.
    pub const ERROR_TOO_BIG: u32 = ERROR_BIT + 9;
    /// Extended headers must be negotiated first.
    pub const ERROR_EXTENDED_HEADER_REQUIRED: u32 = ERROR_BIT + 10;
}

/// Information types inside `NBD_REP_INFO` replies and INFO/GO requests.
pub mod info {
    /// Export size and transmission flags; mandatory before a successful ACK.
    pub const EXPORT: u16 = 0;
    /// The canonical export name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags the server sends with the export size.
pub mod transmission_flag {
    /// Always set: the flags field is meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes, trims and write-zeroes will fail with EPERM.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational (never set by this server).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Don't-fragment reads (structured replies only; never set by this server).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flushes on one connection cover writes completed on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// Resize (experimental; never set by this server).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` (never set by this server).
    pub const SEND_CACHE: u16 = 1 << 10;
    /// Fast-zero write-zeroes (never set by this server).
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command codes in the transmission request header.
pub mod command {
    /// Read `length` bytes at `offset`.
    pub const READ: u16 = 0;
    /// Write the `length` payload bytes that follow the header at `offset`.
    pub const WRITE: u16 = 1;
    /// Soft disconnect: finish in-flight requests, send no reply, close.
    pub const DISCONNECT: u16 = 2;
    /// Make every completed write durable.
    pub const FLUSH: u16 = 3;
    /// The range is no longer needed.
    pub const TRIM: u16 = 4;
    /// Prefetch hint (not supported).
    pub const CACHE: u16 = 5;
    /// Zero the range without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status query (needs structured replies; not supported).
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize (experimental; not supported).
    pub const RESIZE: u16 = 8;
}

/// Command flags in the transmission request header.
pub mod command_flag {
    /// Force unit access: reply only once the data is durable.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must allocate rather than punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment (structured replies only; not supported).
    pub const DF: u16 = 1 << 2;
    /// One extent only (block status only; not supported).
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail WRITE_ZEROES quickly unless fast (not advertised; not supported).
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Payload length in extended headers (not supported).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Error values in simple replies. The spec fixes these numbers independently of the
/// server's operating system, so they are constants here rather than `libc` values.
pub mod error_value {
    /// Operation not permitted: a write to a read-only export.
    pub const EPERM: u32 = 1;
    /// Input/output error in the storage underneath.
    pub const EIO: u32 = 5;
    /// Out of memory (the spec asks servers to avoid it).
    pub const ENOMEM: u32 = 12;
    /// Invalid argument: bad command, flags, alignment, or a read past the end.
    pub const EINVAL: u32 = 22;
    /// No space: a write past the end of the export.
    pub const ENOSPC: u32 = 28;
    /// Value too large (only for don't-fragment reads).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (only for fast-zero write-zeroes).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down; the client must disconnect.
    pub const ESHUTDOWN: u32 = 108;
}

/// Builds the one error this module returns.
fn malformed(detail: impl Into<String>) -> Error {
    Error::NbdMalformed {
        detail: detail.into(),
    }
}

/// Converts a length to the 32-bit field the wire carries. Lengths here are bounded by
/// the limits above, so the saturation never happens in practice; it only keeps a
/// pathological caller from panicking.
fn length_u32(length: usize) -> u32 {
    u32::try_from(length).unwrap_or(u32::MAX)
}

/// A cursor over peer bytes whose every read is checked, so parsers never index out of
/// bounds on short or hostile input.
struct ByteReader<'a> {
    remaining: &'a [u8],
}

impl<'a> ByteReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        ByteReader { remaining: bytes }
    }

    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.remaining.split_at_checked(count)?;
        self.remaining = rest;
        Some(taken)
    }

    fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.take_array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take_array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take_array().map(u64::from_be_bytes)
    }

    fn remaining_bytes(&self) -> usize {
        self.remaining.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.remaining)
    }
}

/// Checks an export name against the spec's string rules: UTF-8, no NUL, at most
/// [`EXPORT_NAME_BYTES_MAX`] bytes.
fn parse_export_name(bytes: &[u8]) -> Result<&str> {
    if bytes.len() > EXPORT_NAME_BYTES_MAX {
        return Err(malformed(format!(
            "export name of {} bytes exceeds the limit of {EXPORT_NAME_BYTES_MAX} bytes",
            bytes.len()
        )));
    }
    let name =
        std::str::from_utf8(bytes).map_err(|_| malformed("export name is not valid UTF-8"))?;
    if name.contains('\0') {
        return Err(malformed("export name contains a NUL character"));
    }
    Ok(name)
}
