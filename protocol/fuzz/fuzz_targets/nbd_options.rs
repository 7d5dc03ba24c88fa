//! Arbitrary bytes as one handshake option: the server must answer without panicking, and
//! every answer other than to NBD_OPT_EXPORT_NAME must be a well-formed reply stream that
//! the client half can parse.
//!
//! Input layout: one byte of client flags, sixteen bytes of option header, then the data.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::nbd::{self, ExportCatalog, ExportInfo, NextStep, OptionHeader};

struct FuzzCatalog;

impl ExportCatalog for FuzzCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "disk" => Some(ExportInfo {
                size_bytes: 64 * 1024 * 1024,
                read_only: false,
            }),
            "archive" => Some(ExportInfo {
                size_bytes: 1024 * 1024,
                read_only: true,
            }),
            _ => None,
        }
    }

    fn names(&self) -> Vec<String> {
        vec!["archive".to_owned(), "disk".to_owned()]
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flag_byte, rest)) = input.split_first() else {
        return;
    };
    let Ok(client_flags) = nbd::parse_client_flags(&u32::from(flag_byte & 0b11).to_be_bytes())
    else {
        panic!("known client flags were refused");
    };
    let Some((header_bytes, data)) = rest.split_first_chunk::<{ nbd::OPTION_HEADER_BYTES }>()
    else {
        return;
    };

    // The header parser sees the raw bytes, magic and length included.
    if let Ok(header) = nbd::parse_option_header(header_bytes) {
        assert!(header.data_bytes <= nbd::OPTION_DATA_BYTES_MAX);
    }

    // The option parsers see every input, whatever its magic: the code comes from the
    // header bytes and the data is everything after them (within the limit).
    let code = u32::from_be_bytes([
        header_bytes[8],
        header_bytes[9],
        header_bytes[10],
        header_bytes[11],
    ]);
    let data = &data[..data.len().min(nbd::OPTION_DATA_BYTES_MAX as usize)];
    let header = OptionHeader {
        code,
        data_bytes: data.len() as u32,
    };
    let outcome = nbd::answer_option(client_flags, &header, data, &FuzzCatalog);

    if code == nbd::option::EXPORT_NAME {
        match outcome.next {
            NextStep::Close => assert!(outcome.reply.is_empty()),
            NextStep::Transmission { .. } => assert!(
                outcome.reply.len() == nbd::EXPORT_NAME_REPLY_BYTES
                    || outcome.reply.len()
                        == nbd::EXPORT_NAME_REPLY_BYTES + nbd::EXPORT_NAME_REPLY_ZEROES_BYTES
            ),
            NextStep::Continue => panic!("NBD_OPT_EXPORT_NAME cannot continue haggling"),
        }
        return;
    }

    let mut remaining = outcome.reply.as_slice();
    let mut last_reply_type = None;
    while !remaining.is_empty() {
        let Some((reply_header_bytes, after_header)) =
            remaining.split_first_chunk::<{ nbd::OPTION_REPLY_HEADER_BYTES }>()
        else {
            panic!("reply stream ends inside a header");
        };
        let reply_header = nbd::parse_option_reply_header(reply_header_bytes)
            .expect("the server's own reply header parses");
        assert_eq!(reply_header.option, code);
        let Some((reply_data, after_data)) =
            after_header.split_at_checked(reply_header.data_bytes as usize)
        else {
            panic!("reply stream ends inside reply data");
        };
        if reply_header.reply_type == nbd::reply::INFO
            && nbd::parse_info_type(reply_data).ok() == Some(nbd::info::EXPORT)
        {
            nbd::parse_info_export(reply_data).expect("the server's own export info parses");
        }
        if reply_header.reply_type == nbd::reply::SERVER {
            nbd::parse_server_entry(reply_data).expect("the server's own list entry parses");
        }
        last_reply_type = Some(reply_header.reply_type);
        remaining = after_data;
    }
    let last_reply_type = last_reply_type.expect("every option gets at least one reply");
    let ends_well =
        last_reply_type == nbd::reply::ACK || last_reply_type & nbd::reply::ERROR_BIT != 0;
    assert!(
        ends_well,
        "reply stream ends with type {last_reply_type:#x}"
    );
    if matches!(outcome.next, NextStep::Transmission { .. }) {
        assert_eq!(code, nbd::option::GO);
        assert_eq!(last_reply_type, nbd::reply::ACK);
    }

    // The client half's parsers also face the raw input.
    if let Some((raw_reply_header, raw_data)) =
        rest.split_first_chunk::<{ nbd::OPTION_REPLY_HEADER_BYTES }>()
    {
        let _ = nbd::parse_option_reply_header(raw_reply_header);
        let _ = nbd::parse_info_export(raw_data);
        let _ = nbd::parse_info_block_size(raw_data);
        let _ = nbd::parse_server_entry(raw_data);
    }
    if let Some((raw_greeting, _)) = rest.split_first_chunk::<{ nbd::SERVER_GREETING_BYTES }>() {
        let _ = nbd::parse_server_greeting(raw_greeting);
    }
});
