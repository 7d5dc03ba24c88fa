//! The client half of the protocol, for the node's demo and for tests.
//!
//! It speaks exactly what the server half offers: fixed newstyle, GO (or INFO, or
//! EXPORT_NAME), simple replies. Parsers here check lengths before the caller allocates,
//! like the server's, because a client may also face a hostile peer.

use super::{
    client_flag, handshake_flag, info, length_u32, magic, malformed, option, reply,
    transmission_flag, ByteReader, ClientFlags, RequestHeader, CLIENT_FLAGS_BYTES,
    EXPORT_NAME_REPLY_BYTES, OPTION_HEADER_BYTES, OPTION_REPLY_DATA_BYTES_MAX,
    OPTION_REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES, SERVER_GREETING_BYTES, SIMPLE_REPLY_BYTES,
};
use crate::error::Result;

/// The fixed part of one option reply; its data follows on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// The reply type (see [`super::reply`]).
    pub reply_type: u32,
    /// How many data bytes follow, already checked against [`OPTION_REPLY_DATA_BYTES_MAX`].
    pub data_bytes: u32,
}

impl OptionReplyHeader {
    /// Whether this reply reports an error (bit 31 of the type).
    pub fn is_error(&self) -> bool {
        self.reply_type & reply::ERROR_BIT != 0
    }
}

/// The block size constraints a server advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    pub maximum_bytes: u32,
}

/// A simple reply header; a successful READ's data follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 on success, otherwise one of [`super::error_value`].
    pub error: u32,
    /// The cookie of the request this answers.
    pub cookie: u64,
}

/// Parses the server greeting and returns its handshake flags.
///
/// Only the magics are checked: the caller decides whether a server without
/// FIXED_NEWSTYLE is acceptable (this module's option functions assume fixed newstyle).
pub fn parse_server_greeting(bytes: &[u8; SERVER_GREETING_BYTES]) -> Result<u16> {
    let mut reader = ByteReader::new(bytes);
    let (Some(init_magic), Some(option_magic), Some(flags)) =
        (reader.u64(), reader.u64(), reader.u16())
    else {
        return Err(malformed("server greeting is truncated"));
    };
    if init_magic != magic::INIT {
        return Err(malformed(format!(
            "server greeting starts with {init_magic:#018x}, expected NBDMAGIC"
        )));
    }
    if option_magic != magic::OPTION {
        return Err(malformed(format!(
            "server greeting has {option_magic:#018x} where IHAVEOPT belongs \
             (an oldstyle server?)"
        )));
    }
    Ok(flags)
}

/// The client flags for a client that wants these features.
///
/// Only ask for `no_zeroes` if the greeting had [`handshake_flag::NO_ZEROES`]; the spec
/// forbids it otherwise.
pub fn encode_client_flags(flags: ClientFlags) -> [u8; CLIENT_FLAGS_BYTES] {
    let mut bits = 0u32;
    if flags.fixed_newstyle {
        bits |= client_flag::FIXED_NEWSTYLE;
    }
    if flags.no_zeroes {
        bits |= client_flag::NO_ZEROES;
    }
    bits.to_be_bytes()
}

/// Whether a greeting's handshake flags allow a client to ask for NO_ZEROES.
pub fn server_offers_no_zeroes(handshake_flags: u16) -> bool {
    handshake_flags & handshake_flag::NO_ZEROES != 0
}

/// One option: `IHAVEOPT`, the code, the data length, the data.
pub fn encode_option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    encoded.extend_from_slice(&magic::OPTION.to_be_bytes());
    encoded.extend_from_slice(&code.to_be_bytes());
    encoded.extend_from_slice(&length_u32(data.len()).to_be_bytes());
    encoded.extend_from_slice(data);
    encoded
}

/// `NBD_OPT_GO` for an export, requesting `NBD_INFO_BLOCK_SIZE` — which commits this
/// client to honour the block sizes the server returns.
pub fn encode_go(export_name: &str) -> Vec<u8> {
    encode_option(option::GO, &info_request_data(export_name))
}

/// `NBD_OPT_INFO` for an export, requesting `NBD_INFO_BLOCK_SIZE` without committing.
pub fn encode_info(export_name: &str) -> Vec<u8> {
    encode_option(option::INFO, &info_request_data(export_name))
}

fn info_request_data(export_name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + export_name.len() + 4);
    data.extend_from_slice(&length_u32(export_name.len()).to_be_bytes());
    data.extend_from_slice(export_name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data
}

/// Parses an option reply header, refusing a bad magic or an oversized data length before
/// the caller allocates.
pub fn parse_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_BYTES],
) -> Result<OptionReplyHeader> {
    let mut reader = ByteReader::new(bytes);
    let (Some(found_magic), Some(option), Some(reply_type), Some(data_bytes)) =
        (reader.u64(), reader.u32(), reader.u32(), reader.u32())
    else {
        return Err(malformed("option reply header is truncated"));
    };
    if found_magic != magic::OPTION_REPLY {
        return Err(malformed(format!(
            "option reply has magic {found_magic:#018x}, expected {:#018x}",
            magic::OPTION_REPLY
        )));
    }
    if data_bytes > OPTION_REPLY_DATA_BYTES_MAX {
        return Err(malformed(format!(
            "option reply carries {data_bytes} bytes of data, more than the limit of \
             {OPTION_REPLY_DATA_BYTES_MAX} bytes"
        )));
    }
    Ok(OptionReplyHeader {
        option,
        reply_type,
        data_bytes,
    })
}

/// The information type at the start of an `NBD_REP_INFO` reply's data, so the client
/// can pick the parser (and ignore types it does not know, as the spec requires).
pub fn parse_info_type(data: &[u8]) -> Result<u16> {
    ByteReader::new(data)
        .u16()
        .ok_or_else(|| malformed("NBD_REP_INFO data is shorter than its type"))
}

/// Parses `NBD_INFO_EXPORT` data into the export size and transmission flags.
pub fn parse_info_export(data: &[u8]) -> Result<(u64, u16)> {
    let mut reader = ByteReader::new(data);
    let (Some(information_type), Some(size_bytes), Some(flags)) =
        (reader.u16(), reader.u64(), reader.u16())
    else {
        return Err(malformed(format!(
            "NBD_INFO_EXPORT data is {} bytes, expected 12",
            data.len()
        )));
    };
    if information_type != info::EXPORT || reader.remaining_bytes() != 0 {
        return Err(malformed(format!(
            "expected NBD_INFO_EXPORT of 12 bytes, got type {information_type} in {} bytes",
            data.len()
        )));
    }
    check_transmission_flags(flags)?;
    Ok((size_bytes, flags))
}

/// Parses `NBD_INFO_BLOCK_SIZE` data.
pub fn parse_info_block_size(data: &[u8]) -> Result<BlockSizes> {
    let mut reader = ByteReader::new(data);
    let (Some(information_type), Some(minimum_bytes), Some(preferred_bytes), Some(maximum_bytes)) =
        (reader.u16(), reader.u32(), reader.u32(), reader.u32())
    else {
        return Err(malformed(format!(
            "NBD_INFO_BLOCK_SIZE data is {} bytes, expected 14",
            data.len()
        )));
    };
    if information_type != info::BLOCK_SIZE || reader.remaining_bytes() != 0 {
        return Err(malformed(format!(
            "expected NBD_INFO_BLOCK_SIZE of 14 bytes, got type {information_type} in {} bytes",
            data.len()
        )));
    }
    Ok(BlockSizes {
        minimum_bytes,
        preferred_bytes,
        maximum_bytes,
    })
}

/// Parses an `NBD_REP_SERVER` reply's data into the export name (any description that
/// follows the name is dropped).
pub fn parse_server_entry(data: &[u8]) -> Result<String> {
    let mut reader = ByteReader::new(data);
    let name_bytes = reader
        .u32()
        .and_then(|length| usize::try_from(length).ok())
        .and_then(|length| reader.take(length))
        .ok_or_else(|| malformed("NBD_REP_SERVER name length exceeds the reply data"))?;
    let _description = reader.rest();
    super::parse_export_name(name_bytes).map(str::to_owned)
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME`: export size and transmission flags. The
/// caller then reads (and ignores) 124 zero bytes unless it negotiated NO_ZEROES.
pub fn parse_export_name_reply(bytes: &[u8; EXPORT_NAME_REPLY_BYTES]) -> Result<(u64, u16)> {
    let mut reader = ByteReader::new(bytes);
    let (Some(size_bytes), Some(flags)) = (reader.u64(), reader.u16()) else {
        return Err(malformed("NBD_OPT_EXPORT_NAME reply is truncated"));
    };
    check_transmission_flags(flags)?;
    Ok((size_bytes, flags))
}

fn check_transmission_flags(flags: u16) -> Result<()> {
    if flags & transmission_flag::HAS_FLAGS == 0 {
        return Err(malformed(format!(
            "transmission flags {flags:#06x} lack HAS_FLAGS, which the spec requires"
        )));
    }
    Ok(())
}

/// A request header; a WRITE's payload must follow it.
pub fn encode_request(header: RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut encoded = [0u8; REQUEST_HEADER_BYTES];
    encoded[0..4].copy_from_slice(&magic::REQUEST.to_be_bytes());
    encoded[4..6].copy_from_slice(&header.flags.to_be_bytes());
    encoded[6..8].copy_from_slice(&header.command.code().to_be_bytes());
    encoded[8..16].copy_from_slice(&header.cookie.to_be_bytes());
    encoded[16..24].copy_from_slice(&header.offset.to_be_bytes());
    encoded[24..28].copy_from_slice(&header.length.to_be_bytes());
    encoded
}

/// Parses a simple reply header. A structured reply's magic is refused: this client never
/// negotiates structured replies, so one arriving means the stream is out of step.
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_BYTES]) -> Result<SimpleReply> {
    let mut reader = ByteReader::new(bytes);
    let (Some(found_magic), Some(error), Some(cookie)) = (reader.u32(), reader.u32(), reader.u64())
    else {
        return Err(malformed("simple reply is truncated"));
    };
    if found_magic != magic::SIMPLE_REPLY {
        return Err(malformed(format!(
            "reply has magic {found_magic:#010x}, expected the simple reply magic {:#010x}",
            magic::SIMPLE_REPLY
        )));
    }
    Ok(SimpleReply { error, cookie })
}
