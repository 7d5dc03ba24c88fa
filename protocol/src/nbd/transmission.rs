//! The transmission phase: request headers in, decisions and simple replies out.
//!
//! [`classify_request`] holds every rule about which requests are acceptable, so the
//! driver only performs commands that are known to be in range, aligned and permitted.

use super::{
    command, command_flag, error_value, magic, malformed, ByteReader,
    ADVERTISED_BLOCK_MINIMUM_BYTES, REQUEST_HEADER_BYTES, REQUEST_PAYLOAD_BYTES_MAX,
    SIMPLE_REPLY_BYTES,
};
use crate::error::Result;

/// A transmission command, with unknown codes kept so they can be refused with EINVAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    /// Soft disconnect: finish in-flight requests, send no reply, close.
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    /// Any other code, including ones defined by extensions this server does not offer.
    Unknown(u16),
}

impl Command {
    /// The command for a wire code.
    pub fn from_code(code: u16) -> Command {
        match code {
            command::READ => Command::Read,
            command::WRITE => Command::Write,
            command::DISCONNECT => Command::Disconnect,
            command::FLUSH => Command::Flush,
            command::TRIM => Command::Trim,
            command::WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Unknown(other),
        }
    }

    /// The wire code of this command.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => command::READ,
            Command::Write => command::WRITE,
            Command::Disconnect => command::DISCONNECT,
            Command::Flush => command::FLUSH,
            Command::Trim => command::TRIM,
            Command::WriteZeroes => command::WRITE_ZEROES,
            Command::Unknown(code) => code,
        }
    }

    /// Whether the command changes the export, and so is refused on a read-only one.
    pub fn modifies_export(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// One transmission request header; a WRITE's payload follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// Command flags (see [`super::command_flag`]).
    pub flags: u16,
    pub command: Command,
    /// Opaque to the server; echoed in the reply so the client can match it.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// How many payload bytes follow this header on the wire: `length` for a WRITE,
    /// nothing for anything else (extended headers, the only other source of payloads,
    /// are never negotiated).
    pub fn payload_bytes(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// What the server must do with a request, decided before touching storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestCheck {
    /// Perform the command. For a READ, reply with error 0 then exactly `length` bytes;
    /// for [`Command::Disconnect`], send nothing, finish in-flight requests and close.
    Proceed,
    /// Read and throw away `discard_payload_bytes` payload bytes (never more than
    /// [`REQUEST_PAYLOAD_BYTES_MAX`]; skip them through a bounded buffer), then send a
    /// simple reply carrying `error` and no data.
    ErrorReply {
        error: u32,
        discard_payload_bytes: u32,
    },
    /// Close the connection without a reply: the request cannot be answered safely.
    Disconnect,
}

/// Parses a request header. An error (a bad magic, including the extended-header magic we
/// never negotiate) means the stream is out of step: close the connection.
pub fn parse_request_header(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader> {
    let mut reader = ByteReader::new(bytes);
    let (Some(found_magic), Some(flags), Some(code), Some(cookie), Some(offset), Some(length)) = (
        reader.u32(),
        reader.u16(),
        reader.u16(),
        reader.u64(),
        reader.u64(),
        reader.u32(),
    ) else {
        return Err(malformed("request header is truncated"));
    };
    if found_magic != magic::REQUEST {
        return Err(malformed(format!(
            "request header has magic {found_magic:#010x}, expected {:#010x}",
            magic::REQUEST
        )));
    }
    Ok(RequestHeader {
        flags,
        command: Command::from_code(code),
        cookie,
        offset,
        length,
    })
}

/// Decides what the server must do with a request on an export of `export_size_bytes`
/// that currently is (or is not) read-only.
///
/// The rules, in the order they are applied:
///
/// 1. A WRITE longer than [`REQUEST_PAYLOAD_BYTES_MAX`] → [`RequestCheck::Disconnect`].
///    The client broke the advertised maximum block size, and the spec lets a server
///    treat payloads of 2^25 bytes or more as a denial of service. Refusing to skip them
///    also bounds how long one request can occupy the connection.
/// 2. DISC → proceed, whatever its flags: there is no reply in which to report an error.
/// 3. An unknown command (CACHE, BLOCK_STATUS, ...) → EINVAL.
/// 4. Flags other than FUA (and NO_HOLE on WRITE_ZEROES) → EINVAL. FUA is accepted on
///    every command, as the spec requires once SEND_FUA is advertised.
/// 5. FLUSH → proceed; its offset and length are reserved and ignored.
/// 6. WRITE, TRIM or WRITE_ZEROES on a read-only export → EPERM.
/// 7. An offset or length not a multiple of [`ADVERTISED_BLOCK_MINIMUM_BYTES`] → EINVAL
///    (the storage works in whole sectors; this is the clean refusal the spec asks of a
///    server whose constraints are stricter than the defaults).
/// 8. A READ longer than [`REQUEST_PAYLOAD_BYTES_MAX`] → EINVAL. TRIM and WRITE_ZEROES
///    carry no payload and may be longer (the Linux client sends them up to 4 GiB); the
///    driver splits them as its storage needs.
/// 9. A range ending past the export (or overflowing) → ENOSPC for WRITE and
///    WRITE_ZEROES, EINVAL for READ and TRIM, as the spec recommends.
///
/// A length of zero passes every rule when the offset is within the export: the spec
/// leaves such requests unspecified but says the server should not disconnect, so the
/// driver treats them as no-ops that succeed.
///
/// Every error on a WRITE carries the payload length to discard, so the stream stays in
/// step.
pub fn classify_request(
    header: &RequestHeader,
    export_size_bytes: u64,
    read_only: bool,
) -> RequestCheck {
    let payload_bytes = header.payload_bytes();
    if payload_bytes > REQUEST_PAYLOAD_BYTES_MAX {
        return RequestCheck::Disconnect;
    }
    let refuse = |error: u32| RequestCheck::ErrorReply {
        error,
        discard_payload_bytes: payload_bytes,
    };

    let allowed_flags = match header.command {
        Command::Disconnect => return RequestCheck::Proceed,
        Command::Unknown(_) => return refuse(error_value::EINVAL),
        Command::WriteZeroes => command_flag::FUA | command_flag::NO_HOLE,
        Command::Read | Command::Write | Command::Flush | Command::Trim => command_flag::FUA,
    };
    if header.flags & !allowed_flags != 0 {
        return refuse(error_value::EINVAL);
    }
    if header.command == Command::Flush {
        return RequestCheck::Proceed;
    }
    if read_only && header.command.modifies_export() {
        return refuse(error_value::EPERM);
    }

    let block_bytes = u64::from(ADVERTISED_BLOCK_MINIMUM_BYTES);
    if !header.offset.is_multiple_of(block_bytes)
        || !u64::from(header.length).is_multiple_of(block_bytes)
    {
        return refuse(error_value::EINVAL);
    }
    if header.command == Command::Read && header.length > REQUEST_PAYLOAD_BYTES_MAX {
        return refuse(error_value::EINVAL);
    }

    let end = header.offset.checked_add(u64::from(header.length));
    let within_export = end.is_some_and(|end| end <= export_size_bytes);
    if !within_export {
        return refuse(match header.command {
            Command::Write | Command::WriteZeroes => error_value::ENOSPC,
            _ => error_value::EINVAL,
        });
    }
    RequestCheck::Proceed
}

/// A simple reply header. For a successful READ the driver sends the data right after.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut reply = [0u8; SIMPLE_REPLY_BYTES];
    reply[0..4].copy_from_slice(&magic::SIMPLE_REPLY.to_be_bytes());
    reply[4..8].copy_from_slice(&error.to_be_bytes());
    reply[8..16].copy_from_slice(&cookie.to_be_bytes());
    reply
}
