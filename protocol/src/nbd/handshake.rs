//! The server half of the fixed newstyle handshake, as a sans-IO model.
//!
//! The driver owns the socket; these functions own the protocol. Each option the client
//! sends is answered in one call to [`answer_option`], which returns every byte to write
//! and what to do next, so the driver never has to know an option code.

use super::{
    client_flag, handshake_flag, info, length_u32, magic, malformed, option, parse_export_name,
    reply, transmission_flag, ByteReader, ADVERTISED_BLOCK_MAXIMUM_BYTES,
    ADVERTISED_BLOCK_MINIMUM_BYTES, ADVERTISED_BLOCK_PREFERRED_BYTES, CLIENT_FLAGS_BYTES,
    EXPORT_NAME_REPLY_BYTES, EXPORT_NAME_REPLY_ZEROES_BYTES, OPTION_DATA_BYTES_MAX,
    OPTION_HEADER_BYTES, SERVER_GREETING_BYTES,
};
use crate::error::Result;

/// What the client announced in its flags, which changes how some replies are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle. Clients that do not are served the same way: the
    /// spec lets servers honour fixed newstyle regardless, and every client in use sets it.
    pub fixed_newstyle: bool,
    /// The client asked us to omit the 124 zero bytes after an `NBD_OPT_EXPORT_NAME` reply.
    pub no_zeroes: bool,
}

/// The fixed part of one option sent by the client; its data follows on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (see [`super::option`]).
    pub code: u32,
    /// How many data bytes follow, already checked against [`OPTION_DATA_BYTES_MAX`].
    pub data_bytes: u32,
}

/// What the server knows about one export when a client asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's size; requests beyond it are refused.
    pub size_bytes: u64,
    /// Whether writes are refused with EPERM (and READ_ONLY is advertised).
    pub read_only: bool,
}

/// The exports a server offers, as the handshake needs to see them. The node implements it
/// over its volume table; tests implement it over a map.
pub trait ExportCatalog {
    /// The export with this exact name, if it is offered right now.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// The names of every export offered right now, for `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;
    /// Why an export that [`ExportCatalog::lookup`] does not offer exists but cannot be
    /// used now, in words for the user; `None` when there is no export of that name. The
    /// client then sees the reason (with `NBD_REP_ERR_POLICY`) instead of "no export".
    fn unavailable_reason(&self, _name: &str) -> Option<String> {
        None
    }
}

/// What the driver does after writing an option's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Read the next option.
    Continue,
    /// Enter the transmission phase on this export.
    Transmission {
        export_name: String,
        info: ExportInfo,
    },
    /// Close the connection (after writing the reply, which may be empty).
    Close,
}

/// The answer to one option: the bytes to write, then the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionOutcome {
    /// Every byte to send, possibly several option replies back to back; may be empty.
    pub reply: Vec<u8>,
    pub next: NextStep,
}

/// The greeting the server sends first: `NBDMAGIC`, `IHAVEOPT`, and the handshake flags.
pub fn server_greeting() -> [u8; SERVER_GREETING_BYTES] {
    let mut greeting = [0u8; SERVER_GREETING_BYTES];
    greeting[0..8].copy_from_slice(&magic::INIT.to_be_bytes());
    greeting[8..16].copy_from_slice(&magic::OPTION.to_be_bytes());
    let flags = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
    greeting[16..18].copy_from_slice(&flags.to_be_bytes());
    greeting
}

/// Parses the client's answer to the greeting.
///
/// An error means the client set a flag we do not know, and the spec requires the server
/// to drop the connection.
pub fn parse_client_flags(bytes: &[u8; CLIENT_FLAGS_BYTES]) -> Result<ClientFlags> {
    let flags = u32::from_be_bytes(*bytes);
    let unknown = flags & !client_flag::KNOWN;
    if unknown != 0 {
        return Err(malformed(format!(
            "client set unknown handshake flags {unknown:#010x}"
        )));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & client_flag::FIXED_NEWSTYLE != 0,
        no_zeroes: flags & client_flag::NO_ZEROES != 0,
    })
}

/// Parses an option header, refusing a bad magic or an oversized data length before the
/// caller allocates a buffer for the data. An error means: close the connection.
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader> {
    let mut reader = ByteReader::new(bytes);
    let (Some(found_magic), Some(code), Some(data_bytes)) =
        (reader.u64(), reader.u32(), reader.u32())
    else {
        return Err(malformed("option header is truncated"));
    };
    if found_magic != magic::OPTION {
        return Err(malformed(format!(
            "option header has magic {found_magic:#018x}, expected IHAVEOPT"
        )));
    }
    if data_bytes > OPTION_DATA_BYTES_MAX {
        return Err(malformed(format!(
            "option {code} carries {data_bytes} bytes of data, more than the limit of \
             {OPTION_DATA_BYTES_MAX} bytes"
        )));
    }
    Ok(OptionHeader { code, data_bytes })
}

/// The transmission flags advertised for an export.
///
/// FLUSH, FUA, TRIM and WRITE_ZEROES are advertised even on read-only exports: an export
/// can switch between ready and read-only during a session (classification happens per
/// request), and the flags cannot change after the handshake. On a read-only export those
/// commands simply fail with EPERM.
pub fn transmission_flags(export: &ExportInfo) -> u16 {
    let mut flags = transmission_flag::HAS_FLAGS
        | transmission_flag::SEND_FLUSH
        | transmission_flag::SEND_FUA
        | transmission_flag::SEND_TRIM
        | transmission_flag::SEND_WRITE_ZEROES
        | transmission_flag::CAN_MULTI_CONN;
    if export.read_only {
        flags |= transmission_flag::READ_ONLY;
    }
    flags
}

/// Answers one option. `data` is the option's data, exactly `header.data_bytes` long.
///
/// Never fails: a malformed option is answered with `NBD_REP_ERR_INVALID` (the spec wants
/// servers to keep negotiating), except `NBD_OPT_EXPORT_NAME`, which has no way to report
/// an error and so closes the connection, as the spec requires.
pub fn answer_option(
    client_flags: ClientFlags,
    header: &OptionHeader,
    data: &[u8],
    catalog: &dyn ExportCatalog,
) -> OptionOutcome {
    let data_matches_header = usize::try_from(header.data_bytes).ok() == Some(data.len());
    match header.code {
        option::EXPORT_NAME if data_matches_header => {
            answer_export_name(client_flags, data, catalog)
        }
        option::EXPORT_NAME => close_without_reply(),
        _ if !data_matches_header => error_reply(
            header.code,
            reply::ERROR_INVALID,
            "option data length does not match its header",
        ),
        option::ABORT => OptionOutcome {
            // The spec asks servers to ignore any data sent with ABORT.
            reply: option_reply(option::ABORT, reply::ACK, &[]),
            next: NextStep::Close,
        },
        option::LIST => answer_list(data, catalog),
        option::INFO | option::GO => answer_info_or_go(header.code, data, catalog),
        _ => error_reply(
            header.code,
            reply::ERROR_UNSUPPORTED,
            "option not supported by this server",
        ),
    }
}

/// `NBD_OPT_EXPORT_NAME`: the old way into transmission; an unknown export closes.
fn answer_export_name(
    client_flags: ClientFlags,
    data: &[u8],
    catalog: &dyn ExportCatalog,
) -> OptionOutcome {
    let Ok(name) = parse_export_name(data) else {
        return close_without_reply();
    };
    let Some(export) = catalog.lookup(name) else {
        return close_without_reply();
    };
    let mut reply = Vec::with_capacity(EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_REPLY_ZEROES_BYTES);
    reply.extend_from_slice(&export.size_bytes.to_be_bytes());
    reply.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    if !client_flags.no_zeroes {
        reply.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES_BYTES]);
    }
    OptionOutcome {
        reply,
        next: NextStep::Transmission {
            export_name: name.to_owned(),
            info: export,
        },
    }
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then ACK.
fn answer_list(data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    if !data.is_empty() {
        return error_reply(
            option::LIST,
            reply::ERROR_INVALID,
            "NBD_OPT_LIST carries no data",
        );
    }
    let mut reply = Vec::new();
    for name in catalog.names() {
        let mut entry = Vec::with_capacity(4 + name.len());
        entry.extend_from_slice(&length_u32(name.len()).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        push_option_reply(&mut reply, option::LIST, reply::SERVER, &entry);
    }
    push_option_reply(&mut reply, option::LIST, reply::ACK, &[]);
    OptionOutcome {
        reply,
        next: NextStep::Continue,
    }
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO`, as far as this server cares.
struct InfoRequest<'a> {
    name: &'a str,
    wants_name: bool,
}

/// Parses `u32 name length, name, u16 count, count × u16 information types`, insisting
/// that the lengths account for every byte.
fn parse_info_request(data: &[u8]) -> std::result::Result<InfoRequest<'_>, &'static str> {
    let mut reader = ByteReader::new(data);
    let name_bytes = reader
        .u32()
        .and_then(|length| usize::try_from(length).ok())
        .and_then(|length| reader.take(length))
        .ok_or("export name length exceeds the option data")?;
    let name = parse_export_name(name_bytes).map_err(|_| "export name is not a valid string")?;
    let request_count = reader.u16().ok_or("information request count is missing")?;
    if reader.remaining_bytes() != usize::from(request_count) * 2 {
        return Err("information request count does not match the option data length");
    }
    let mut wants_name = false;
    while let Some(information_type) = reader.u16() {
        // Unknown information types are ignored, as the spec requires.
        wants_name |= information_type == info::NAME;
    }
    Ok(InfoRequest { name, wants_name })
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: identical replies; GO then enters transmission.
///
/// `NBD_INFO_BLOCK_SIZE` is sent whether or not it was requested (the spec allows
/// unrequested information). Clients that did not request it may still send unaligned
/// requests; those are refused cleanly with EINVAL by [`super::classify_request`], which
/// is what the spec asks of a server enforcing non-default constraints.
fn answer_info_or_go(code: u32, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    let request = match parse_info_request(data) {
        Ok(request) => request,
        Err(detail) => return error_reply(code, reply::ERROR_INVALID, detail),
    };
    let Some(export) = catalog.lookup(request.name) else {
        // An export that exists but is not offered now is refused by policy, with the
        // reason; qemu and libnbd show the message, so the user learns what to do.
        return match catalog.unavailable_reason(request.name) {
            Some(reason) => error_reply(code, reply::ERROR_POLICY, &reason),
            None => error_reply(code, reply::ERROR_UNKNOWN, "no export with that name"),
        };
    };

    let mut reply = Vec::new();
    let mut export_information = Vec::with_capacity(12);
    export_information.extend_from_slice(&info::EXPORT.to_be_bytes());
    export_information.extend_from_slice(&export.size_bytes.to_be_bytes());
    export_information.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    push_option_reply(&mut reply, code, reply::INFO, &export_information);

    let mut block_size_information = Vec::with_capacity(14);
    block_size_information.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    block_size_information.extend_from_slice(&ADVERTISED_BLOCK_MINIMUM_BYTES.to_be_bytes());
    block_size_information.extend_from_slice(&ADVERTISED_BLOCK_PREFERRED_BYTES.to_be_bytes());
    block_size_information.extend_from_slice(&ADVERTISED_BLOCK_MAXIMUM_BYTES.to_be_bytes());
    push_option_reply(&mut reply, code, reply::INFO, &block_size_information);

    if request.wants_name {
        let mut name_information = Vec::with_capacity(2 + request.name.len());
        name_information.extend_from_slice(&info::NAME.to_be_bytes());
        name_information.extend_from_slice(request.name.as_bytes());
        push_option_reply(&mut reply, code, reply::INFO, &name_information);
    }

    push_option_reply(&mut reply, code, reply::ACK, &[]);
    let next = if code == option::GO {
        NextStep::Transmission {
            export_name: request.name.to_owned(),
            info: export,
        }
    } else {
        NextStep::Continue
    };
    OptionOutcome { reply, next }
}

/// An error reply carrying a short message for the user, after which haggling goes on.
fn error_reply(code: u32, reply_type: u32, message: &str) -> OptionOutcome {
    OptionOutcome {
        reply: option_reply(code, reply_type, message.as_bytes()),
        next: NextStep::Continue,
    }
}

fn close_without_reply() -> OptionOutcome {
    OptionOutcome {
        reply: Vec::new(),
        next: NextStep::Close,
    }
}

fn option_reply(code: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(super::OPTION_REPLY_HEADER_BYTES + data.len());
    push_option_reply(&mut reply, code, reply_type, data);
    reply
}

fn push_option_reply(out: &mut Vec<u8>, code: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}
