//! Arbitrary bytes as a transmission request: parsing and classification must not panic,
//! and what classification allows must respect the export's bounds and the payload limit.
//!
//! Input layout: 28 bytes of request header, 8 bytes of export size, 1 byte of read-only.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::nbd::{self, Command, RequestCheck};

fuzz_target!(|input: &[u8]| {
    let Some((header_bytes, rest)) = input.split_first_chunk::<{ nbd::REQUEST_HEADER_BYTES }>()
    else {
        return;
    };
    let export_size_bytes = rest
        .first_chunk::<8>()
        .map_or(64 * 1024 * 1024, |bytes| u64::from_be_bytes(*bytes));
    let read_only = rest.get(8).is_some_and(|byte| byte & 1 == 1);

    if let Some(reply_bytes) = input.first_chunk::<{ nbd::SIMPLE_REPLY_BYTES }>() {
        let _ = nbd::parse_simple_reply(reply_bytes);
    }

    let Ok(header) = nbd::parse_request_header(header_bytes) else {
        return;
    };
    assert_eq!(&nbd::encode_request(header), header_bytes);

    match nbd::classify_request(&header, export_size_bytes, read_only) {
        RequestCheck::Proceed => {
            if matches!(
                header.command,
                Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
            ) {
                let end = header.offset.checked_add(u64::from(header.length));
                assert!(end.is_some_and(|end| end <= export_size_bytes));
                assert!(!(read_only && header.command.modifies_export()));
            }
            if matches!(header.command, Command::Read | Command::Write) {
                assert!(header.length <= nbd::REQUEST_PAYLOAD_BYTES_MAX);
            }
            assert!(!matches!(header.command, Command::Unknown(_)));
        }
        RequestCheck::ErrorReply {
            error,
            discard_payload_bytes,
        } => {
            assert_ne!(error, 0);
            assert_eq!(discard_payload_bytes, header.payload_bytes());
            assert!(discard_payload_bytes <= nbd::REQUEST_PAYLOAD_BYTES_MAX);
            let reply = nbd::encode_simple_reply(error, header.cookie);
            let parsed = nbd::parse_simple_reply(&reply).expect("our own reply parses");
            assert_eq!((parsed.error, parsed.cookie), (error, header.cookie));
        }
        RequestCheck::Disconnect => {
            assert_eq!(header.command, Command::Write);
            assert!(header.length > nbd::REQUEST_PAYLOAD_BYTES_MAX);
        }
    }
});
