//! Handshakes and transmissions driven purely through the module's own functions: the
//! client half produces bytes, the server half answers, the client half parses.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const DISK_BYTES: u64 = 64 * 1024 * 1024;

struct FakeCatalog {
    exports: BTreeMap<String, ExportInfo>,
}

impl FakeCatalog {
    fn new() -> Self {
        let mut exports = BTreeMap::new();
        exports.insert(
            "disk".to_owned(),
            ExportInfo {
                size_bytes: DISK_BYTES,
                read_only: false,
            },
        );
        exports.insert(
            "archive".to_owned(),
            ExportInfo {
                size_bytes: 1024 * 1024,
                read_only: true,
            },
        );
        FakeCatalog { exports }
    }
}

impl ExportCatalog for FakeCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.exports.get(name).copied()
    }

    fn names(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    fn unavailable_reason(&self, name: &str) -> Option<String> {
        (name == "resting").then(|| "volume 'resting' exists but is not ready".to_owned())
    }
}

/// Runs the opening exchange and returns the flags the server parsed.
fn open_session(client_wants_no_zeroes: bool) -> ClientFlags {
    let greeting = server_greeting();
    let handshake_flags = parse_server_greeting(&greeting).expect("greeting parses");
    assert_ne!(handshake_flags & handshake_flag::FIXED_NEWSTYLE, 0);
    assert!(server_offers_no_zeroes(handshake_flags));
    let client_bytes = encode_client_flags(ClientFlags {
        fixed_newstyle: true,
        no_zeroes: client_wants_no_zeroes,
    });
    parse_client_flags(&client_bytes).expect("client flags parse")
}

/// Feeds one encoded option (header and data) to the server half.
fn send_option(client_flags: ClientFlags, encoded_option: &[u8]) -> OptionOutcome {
    let (header_bytes, data) = encoded_option.split_at(OPTION_HEADER_BYTES);
    let header_array: [u8; OPTION_HEADER_BYTES] = header_bytes.try_into().expect("16 bytes");
    let header = parse_option_header(&header_array).expect("option header parses");
    assert_eq!(header.data_bytes as usize, data.len());
    answer_option(client_flags, &header, data, &FakeCatalog::new())
}

/// Splits a server reply stream into option replies using the client half's parser.
fn parse_replies(mut bytes: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        let (header_bytes, rest) = bytes.split_at(OPTION_REPLY_HEADER_BYTES);
        let header_array: [u8; OPTION_REPLY_HEADER_BYTES] =
            header_bytes.try_into().expect("20 bytes");
        let header = parse_option_reply_header(&header_array).expect("reply header parses");
        let (data, rest) = rest.split_at(header.data_bytes as usize);
        replies.push((header, data.to_vec()));
        bytes = rest;
    }
    replies
}

fn expected_flags(read_only: bool) -> u16 {
    let mut flags = transmission_flag::HAS_FLAGS
        | transmission_flag::SEND_FLUSH
        | transmission_flag::SEND_FUA
        | transmission_flag::SEND_TRIM
        | transmission_flag::SEND_WRITE_ZEROES
        | transmission_flag::CAN_MULTI_CONN;
    if read_only {
        flags |= transmission_flag::READ_ONLY;
    }
    flags
}

/// Checks an INFO/GO success: EXPORT and BLOCK_SIZE information, then ACK.
fn assert_export_described(
    replies: &[(OptionReplyHeader, Vec<u8>)],
    code: u32,
    size_bytes: u64,
    read_only: bool,
) {
    let mut export = None;
    let mut block_sizes = None;
    for (header, data) in &replies[..replies.len() - 1] {
        assert_eq!(header.option, code);
        assert_eq!(header.reply_type, reply::INFO);
        match parse_info_type(data).expect("info type") {
            info::EXPORT => export = Some(parse_info_export(data).expect("export info")),
            info::BLOCK_SIZE => {
                block_sizes = Some(parse_info_block_size(data).expect("block size info"))
            }
            other => panic!("unexpected information type {other}"),
        }
    }
    let (last_header, last_data) = replies.last().expect("at least one reply");
    assert_eq!(last_header.reply_type, reply::ACK);
    assert_eq!(last_header.option, code);
    assert!(last_data.is_empty());
    assert_eq!(export, Some((size_bytes, expected_flags(read_only))));
    assert_eq!(
        block_sizes,
        Some(BlockSizes {
            minimum_bytes: 512,
            preferred_bytes: 4096,
            maximum_bytes: 32 * 1024 * 1024,
        })
    );
}

#[test]
fn greeting_has_both_magics_and_flags() {
    let greeting = server_greeting();
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(greeting[16..18], [0, 3]);
}

#[test]
fn go_on_known_export_enters_transmission() {
    let client_flags = open_session(true);
    let outcome = send_option(client_flags, &encode_go("disk"));
    assert_eq!(
        outcome.next,
        NextStep::Transmission {
            export_name: "disk".to_owned(),
            info: ExportInfo {
                size_bytes: DISK_BYTES,
                read_only: false
            },
        }
    );
    assert_export_described(
        &parse_replies(&outcome.reply),
        option::GO,
        DISK_BYTES,
        false,
    );
}

#[test]
fn go_on_read_only_export_advertises_read_only() {
    let client_flags = open_session(false);
    let outcome = send_option(client_flags, &encode_go("archive"));
    assert!(matches!(outcome.next, NextStep::Transmission { .. }));
    assert_export_described(
        &parse_replies(&outcome.reply),
        option::GO,
        1024 * 1024,
        true,
    );
}

#[test]
fn go_on_unknown_export_is_error_unknown_and_continues() {
    let client_flags = open_session(true);
    let outcome = send_option(client_flags, &encode_go("missing"));
    assert_eq!(outcome.next, NextStep::Continue);
    let replies = parse_replies(&outcome.reply);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0.option, option::GO);
    assert_eq!(replies[0].0.reply_type, reply::ERROR_UNKNOWN);
    assert!(replies[0].0.is_error());
}

#[test]
fn go_on_an_export_that_is_not_offered_now_is_refused_with_the_reason() {
    let client_flags = open_session(true);
    for encoded in [encode_go("resting"), encode_info("resting")] {
        let outcome = send_option(client_flags, &encoded);
        assert_eq!(outcome.next, NextStep::Continue);
        let replies = parse_replies(&outcome.reply);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0.reply_type, reply::ERROR_POLICY);
        assert_eq!(
            String::from_utf8_lossy(&replies[0].1),
            "volume 'resting' exists but is not ready"
        );
    }
}

#[test]
fn info_then_go_describe_the_same_export() {
    let client_flags = open_session(true);
    let info_outcome = send_option(client_flags, &encode_info("disk"));
    assert_eq!(info_outcome.next, NextStep::Continue);
    assert_export_described(
        &parse_replies(&info_outcome.reply),
        option::INFO,
        DISK_BYTES,
        false,
    );

    let go_outcome = send_option(client_flags, &encode_go("disk"));
    assert!(matches!(go_outcome.next, NextStep::Transmission { .. }));
    assert_export_described(
        &parse_replies(&go_outcome.reply),
        option::GO,
        DISK_BYTES,
        false,
    );
}

#[test]
fn go_requesting_name_gets_name_information() {
    let client_flags = open_session(true);
    let mut data = Vec::new();
    data.extend_from_slice(&4u32.to_be_bytes());
    data.extend_from_slice(b"disk");
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&info::NAME.to_be_bytes());
    data.extend_from_slice(&0x7777u16.to_be_bytes()); // unknown: ignored
    let outcome = send_option(client_flags, &encode_option(option::GO, &data));
    let replies = parse_replies(&outcome.reply);
    let name_replies: Vec<_> = replies
        .iter()
        .filter(|(header, data)| {
            header.reply_type == reply::INFO && parse_info_type(data).ok() == Some(info::NAME)
        })
        .collect();
    assert_eq!(name_replies.len(), 1);
    assert_eq!(&name_replies[0].1[2..], b"disk");
    assert_eq!(
        replies.last().map(|(header, _)| header.reply_type),
        Some(reply::ACK)
    );
}

#[test]
fn go_with_inconsistent_lengths_is_error_invalid() {
    let client_flags = open_session(true);
    let cases: Vec<Vec<u8>> = vec![
        // Too short to hold even the name length.
        vec![0, 0],
        // Name length beyond the data.
        [&100u32.to_be_bytes()[..], b"disk", &0u16.to_be_bytes()].concat(),
        // Request count promises two entries, one present.
        [
            &4u32.to_be_bytes()[..],
            b"disk",
            &2u16.to_be_bytes(),
            &3u16.to_be_bytes(),
        ]
        .concat(),
        // Trailing garbage after the requests.
        [&4u32.to_be_bytes()[..], b"disk", &0u16.to_be_bytes(), &[9]].concat(),
        // Name not UTF-8.
        [&2u32.to_be_bytes()[..], &[0xff, 0xfe], &0u16.to_be_bytes()].concat(),
    ];
    for data in cases {
        let outcome = send_option(client_flags, &encode_option(option::GO, &data));
        assert_eq!(outcome.next, NextStep::Continue, "data {data:?}");
        let replies = parse_replies(&outcome.reply);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            replies[0].0.reply_type,
            reply::ERROR_INVALID,
            "data {data:?}"
        );
    }
}

#[test]
fn list_names_every_export_then_acks() {
    let client_flags = open_session(true);
    let outcome = send_option(client_flags, &encode_option(option::LIST, &[]));
    assert_eq!(outcome.next, NextStep::Continue);
    let replies = parse_replies(&outcome.reply);
    let names: Vec<String> = replies
        .iter()
        .filter(|(header, _)| header.reply_type == reply::SERVER)
        .map(|(_, data)| parse_server_entry(data).expect("server entry"))
        .collect();
    assert_eq!(names, vec!["archive".to_owned(), "disk".to_owned()]);
    assert_eq!(replies.len(), 3);
    assert_eq!(replies[2].0.reply_type, reply::ACK);
    assert!(replies
        .iter()
        .all(|(header, _)| header.option == option::LIST));
}

#[test]
fn list_with_data_is_error_invalid() {
    let client_flags = open_session(true);
    let outcome = send_option(client_flags, &encode_option(option::LIST, b"x"));
    assert_eq!(outcome.next, NextStep::Continue);
    let replies = parse_replies(&outcome.reply);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0.reply_type, reply::ERROR_INVALID);
}

#[test]
fn export_name_without_no_zeroes_sends_size_flags_and_zeroes() {
    let client_flags = open_session(false);
    let outcome = send_option(client_flags, &encode_option(option::EXPORT_NAME, b"disk"));
    assert_eq!(
        outcome.reply.len(),
        EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_REPLY_ZEROES_BYTES
    );
    let head: [u8; EXPORT_NAME_REPLY_BYTES] = outcome.reply[..EXPORT_NAME_REPLY_BYTES]
        .try_into()
        .expect("10 bytes");
    assert_eq!(
        parse_export_name_reply(&head).expect("reply parses"),
        (DISK_BYTES, expected_flags(false))
    );
    assert!(outcome.reply[EXPORT_NAME_REPLY_BYTES..]
        .iter()
        .all(|byte| *byte == 0));
    assert!(matches!(
        outcome.next,
        NextStep::Transmission { ref export_name, .. } if export_name == "disk"
    ));
}

#[test]
fn export_name_with_no_zeroes_sends_only_size_and_flags() {
    let client_flags = open_session(true);
    let outcome = send_option(
        client_flags,
        &encode_option(option::EXPORT_NAME, b"archive"),
    );
    assert_eq!(outcome.reply.len(), EXPORT_NAME_REPLY_BYTES);
    let head: [u8; EXPORT_NAME_REPLY_BYTES] =
        outcome.reply.as_slice().try_into().expect("10 bytes");
    assert_eq!(
        parse_export_name_reply(&head).expect("reply parses"),
        (1024 * 1024, expected_flags(true))
    );
    assert!(matches!(outcome.next, NextStep::Transmission { .. }));
}

#[test]
fn export_name_unknown_closes_without_reply() {
    let client_flags = open_session(true);
    let outcome = send_option(
        client_flags,
        &encode_option(option::EXPORT_NAME, b"missing"),
    );
    assert!(outcome.reply.is_empty());
    assert_eq!(outcome.next, NextStep::Close);
}

#[test]
fn abort_acks_then_closes() {
    let client_flags = open_session(true);
    let outcome = send_option(client_flags, &encode_option(option::ABORT, &[]));
    assert_eq!(outcome.next, NextStep::Close);
    let replies = parse_replies(&outcome.reply);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0.option, option::ABORT);
    assert_eq!(replies[0].0.reply_type, reply::ACK);
}

#[test]
fn unsupported_options_are_error_unsupported_and_continue() {
    let client_flags = open_session(true);
    for code in [
        option::STRUCTURED_REPLY,
        option::STARTTLS,
        option::LIST_META_CONTEXT,
        option::SET_META_CONTEXT,
        option::EXTENDED_HEADERS,
        option::PEEK_EXPORT,
        0xdead_beef,
    ] {
        let outcome = send_option(client_flags, &encode_option(code, &[]));
        assert_eq!(outcome.next, NextStep::Continue, "option {code}");
        let replies = parse_replies(&outcome.reply);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0.option, code);
        assert_eq!(replies[0].0.reply_type, reply::ERROR_UNSUPPORTED);
    }
}

#[test]
fn option_data_not_matching_header_is_refused() {
    let client_flags = open_session(true);
    let header = OptionHeader {
        code: option::GO,
        data_bytes: 10,
    };
    let outcome = answer_option(client_flags, &header, &[0u8; 3], &FakeCatalog::new());
    assert_eq!(outcome.next, NextStep::Continue);
    assert_eq!(
        parse_replies(&outcome.reply)[0].0.reply_type,
        reply::ERROR_INVALID
    );
}

#[test]
fn client_flags_with_unknown_bits_are_refused() {
    assert!(parse_client_flags(&4u32.to_be_bytes()).is_err());
    assert!(parse_client_flags(&0x8000_0001u32.to_be_bytes()).is_err());
    assert_eq!(
        parse_client_flags(&3u32.to_be_bytes()).expect("known flags"),
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        }
    );
}

#[test]
fn option_header_with_bad_magic_is_refused() {
    let mut bytes = [0u8; OPTION_HEADER_BYTES];
    bytes.copy_from_slice(&encode_option(option::GO, &[])[..OPTION_HEADER_BYTES]);
    bytes[0] ^= 0x01;
    assert!(matches!(
        parse_option_header(&bytes),
        Err(Error::NbdMalformed { .. })
    ));
}

#[test]
fn option_header_with_oversized_length_is_refused() {
    let mut bytes = [0u8; OPTION_HEADER_BYTES];
    bytes[0..8].copy_from_slice(&magic::OPTION.to_be_bytes());
    bytes[8..12].copy_from_slice(&option::GO.to_be_bytes());
    bytes[12..16].copy_from_slice(&(OPTION_DATA_BYTES_MAX + 1).to_be_bytes());
    assert!(parse_option_header(&bytes).is_err());
    bytes[12..16].copy_from_slice(&OPTION_DATA_BYTES_MAX.to_be_bytes());
    assert_eq!(
        parse_option_header(&bytes).expect("limit itself is accepted"),
        OptionHeader {
            code: option::GO,
            data_bytes: OPTION_DATA_BYTES_MAX
        }
    );
}

#[test]
fn option_reply_header_with_bad_magic_or_oversized_length_is_refused() {
    let mut bytes = [0u8; OPTION_REPLY_HEADER_BYTES];
    bytes[0..8].copy_from_slice(&magic::OPTION_REPLY.to_be_bytes());
    bytes[16..20].copy_from_slice(&(OPTION_REPLY_DATA_BYTES_MAX + 1).to_be_bytes());
    assert!(parse_option_reply_header(&bytes).is_err());
    bytes[16..20].copy_from_slice(&0u32.to_be_bytes());
    assert!(parse_option_reply_header(&bytes).is_ok());
    bytes[7] ^= 0x80;
    assert!(parse_option_reply_header(&bytes).is_err());
}

#[test]
fn server_greeting_with_bad_magic_is_refused() {
    let mut greeting = server_greeting();
    greeting[9] = b'X';
    assert!(parse_server_greeting(&greeting).is_err());
}

fn request(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 0x0102_0304_0506_0708,
        offset,
        length,
    }
}

#[test]
fn request_header_round_trips() {
    let header = request(Command::Write, command_flag::FUA, 4096, 8192);
    let encoded = encode_request(header);
    assert_eq!(&encoded[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(parse_request_header(&encoded).expect("parses"), header);

    let unknown = request(Command::Unknown(77), 0, 0, 0);
    assert_eq!(
        parse_request_header(&encode_request(unknown)).expect("parses"),
        unknown
    );
}

#[test]
fn request_header_with_bad_magic_is_refused() {
    let mut encoded = encode_request(request(Command::Read, 0, 0, 512));
    encoded[3] = 0x14;
    assert!(parse_request_header(&encoded).is_err());
    encoded[0..4].copy_from_slice(&magic::EXTENDED_REQUEST.to_be_bytes());
    assert!(parse_request_header(&encoded).is_err());
}

fn error_reply(error: u32, discard_payload_bytes: u32) -> RequestCheck {
    RequestCheck::ErrorReply {
        error,
        discard_payload_bytes,
    }
}

#[test]
fn classify_accepts_ordinary_requests() {
    for header in [
        request(Command::Read, 0, 0, 4096),
        request(Command::Read, command_flag::FUA, DISK_BYTES - 512, 512),
        request(Command::Write, command_flag::FUA, 512, 1024 * 1024),
        request(Command::Write, 0, 0, REQUEST_PAYLOAD_BYTES_MAX),
        request(Command::Trim, 0, 0, 8192),
        request(Command::WriteZeroes, command_flag::NO_HOLE, 0, 8192),
        request(Command::Flush, 0, 0, 0),
        request(Command::Disconnect, 0, 0, 0),
    ] {
        assert_eq!(
            classify_request(&header, DISK_BYTES, false),
            RequestCheck::Proceed,
            "{header:?}"
        );
    }
}

#[test]
fn classify_read_past_end_is_einval() {
    let header = request(Command::Read, 0, DISK_BYTES - 512, 1024);
    assert_eq!(
        classify_request(&header, DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
    let overflowing = request(Command::Read, 0, u64::MAX - 511, 1024);
    assert_eq!(
        classify_request(&overflowing, DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
}

#[test]
fn classify_write_past_end_is_enospc_and_discards_payload() {
    let header = request(Command::Write, 0, DISK_BYTES, 4096);
    assert_eq!(
        classify_request(&header, DISK_BYTES, false),
        error_reply(error_value::ENOSPC, 4096)
    );
    let zeroes = request(Command::WriteZeroes, 0, DISK_BYTES - 512, 1024);
    assert_eq!(
        classify_request(&zeroes, DISK_BYTES, false),
        error_reply(error_value::ENOSPC, 0)
    );
    let trim = request(Command::Trim, 0, DISK_BYTES - 512, 1024);
    assert_eq!(
        classify_request(&trim, DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
}

#[test]
fn classify_write_to_read_only_is_eperm() {
    assert_eq!(
        classify_request(&request(Command::Write, 0, 0, 4096), DISK_BYTES, true),
        error_reply(error_value::EPERM, 4096)
    );
    assert_eq!(
        classify_request(&request(Command::Trim, 0, 0, 4096), DISK_BYTES, true),
        error_reply(error_value::EPERM, 0)
    );
    assert_eq!(
        classify_request(&request(Command::WriteZeroes, 0, 0, 4096), DISK_BYTES, true),
        error_reply(error_value::EPERM, 0)
    );
    assert_eq!(
        classify_request(&request(Command::Read, 0, 0, 4096), DISK_BYTES, true),
        RequestCheck::Proceed
    );
    assert_eq!(
        classify_request(&request(Command::Flush, 0, 0, 0), DISK_BYTES, true),
        RequestCheck::Proceed
    );
}

#[test]
fn classify_unknown_command_is_einval() {
    for code in [command::CACHE, command::BLOCK_STATUS, command::RESIZE, 999] {
        let header = request(Command::from_code(code), 0, 0, 4096);
        assert_eq!(
            classify_request(&header, DISK_BYTES, false),
            error_reply(error_value::EINVAL, 0)
        );
    }
}

#[test]
fn classify_unknown_or_misplaced_flags_are_einval() {
    assert_eq!(
        classify_request(
            &request(Command::Read, command_flag::DF, 0, 512),
            DISK_BYTES,
            false
        ),
        error_reply(error_value::EINVAL, 0)
    );
    assert_eq!(
        classify_request(
            &request(Command::Write, command_flag::NO_HOLE, 0, 512),
            DISK_BYTES,
            false
        ),
        error_reply(error_value::EINVAL, 512)
    );
    assert_eq!(
        classify_request(
            &request(Command::WriteZeroes, command_flag::FAST_ZERO, 0, 512),
            DISK_BYTES,
            false
        ),
        error_reply(error_value::EINVAL, 0)
    );
    assert_eq!(
        classify_request(&request(Command::Flush, 0x8000, 0, 0), DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
}

#[test]
fn classify_oversized_write_disconnects_and_oversized_read_is_einval() {
    let write = request(Command::Write, 0, 0, REQUEST_PAYLOAD_BYTES_MAX + 512);
    assert_eq!(
        classify_request(&write, u64::MAX, false),
        RequestCheck::Disconnect
    );
    // Even when other rules would also refuse it: the payload cannot be skipped safely.
    assert_eq!(classify_request(&write, 0, true), RequestCheck::Disconnect);
    let read = request(Command::Read, 0, 0, REQUEST_PAYLOAD_BYTES_MAX + 512);
    assert_eq!(
        classify_request(&read, u64::MAX, false),
        error_reply(error_value::EINVAL, 0)
    );
    // No payload, so large trims and write-zeroes are the storage layer's to split.
    let zeroes = request(Command::WriteZeroes, 0, 0, u32::MAX - 511);
    assert_eq!(
        classify_request(&zeroes, u64::MAX, false),
        RequestCheck::Proceed
    );
}

#[test]
fn classify_unaligned_is_einval() {
    assert_eq!(
        classify_request(&request(Command::Read, 0, 100, 512), DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
    assert_eq!(
        classify_request(&request(Command::Read, 0, 0, 100), DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
    assert_eq!(
        classify_request(&request(Command::Write, 0, 512, 1000), DISK_BYTES, false),
        error_reply(error_value::EINVAL, 1000)
    );
    assert_eq!(
        classify_request(&request(Command::Trim, 0, 1, 512), DISK_BYTES, false),
        error_reply(error_value::EINVAL, 0)
    );
}

#[test]
fn classify_zero_length_within_export_proceeds() {
    for command in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
    ] {
        assert_eq!(
            classify_request(&request(command, 0, DISK_BYTES, 0), DISK_BYTES, false),
            RequestCheck::Proceed
        );
    }
    assert_eq!(
        classify_request(
            &request(Command::Read, 0, DISK_BYTES + 512, 0),
            DISK_BYTES,
            false
        ),
        error_reply(error_value::EINVAL, 0)
    );
}

#[test]
fn disconnect_always_proceeds() {
    let header = request(Command::Disconnect, 0xffff, 12345, 7);
    assert_eq!(
        classify_request(&header, DISK_BYTES, true),
        RequestCheck::Proceed
    );
}

#[test]
fn simple_reply_round_trips() {
    let encoded = encode_simple_reply(error_value::ENOSPC, 0xfeed_f00d_dead_beef);
    assert_eq!(&encoded[0..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(
        parse_simple_reply(&encoded).expect("parses"),
        SimpleReply {
            error: error_value::ENOSPC,
            cookie: 0xfeed_f00d_dead_beef
        }
    );
    let mut structured = encoded;
    structured[0..4].copy_from_slice(&magic::STRUCTURED_REPLY.to_be_bytes());
    assert!(parse_simple_reply(&structured).is_err());
}

#[test]
fn command_codes_round_trip() {
    for code in 0..=20u16 {
        assert_eq!(Command::from_code(code).code(), code);
    }
}

proptest! {
    #[test]
    fn request_parsing_and_classification_never_panic(
        bytes in proptest::array::uniform28(any::<u8>()),
        keep_magic in any::<bool>(),
        export_size_bytes in any::<u64>(),
        read_only in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if keep_magic {
            // Random magics almost never match; most cases should reach classification.
            bytes[0..4].copy_from_slice(&magic::REQUEST.to_be_bytes());
        }
        prop_assert_eq!(parse_request_header(&bytes).is_ok(), bytes[0..4] == magic::REQUEST.to_be_bytes());
        if let Ok(header) = parse_request_header(&bytes) {
            let check = classify_request(&header, export_size_bytes, read_only);
            if let RequestCheck::ErrorReply { discard_payload_bytes, .. } = check {
                prop_assert!(discard_payload_bytes <= REQUEST_PAYLOAD_BYTES_MAX);
                prop_assert_eq!(discard_payload_bytes, header.payload_bytes());
            }
            prop_assert_eq!(encode_request(header), bytes);
        }
    }

    #[test]
    fn proceeding_requests_are_in_range_aligned_and_permitted(
        code in 0..10u16,
        flags in prop_oneof![Just(0u16), Just(command_flag::FUA), Just(command_flag::NO_HOLE), any::<u16>()],
        offset_blocks in 0..(1u64 << 20),
        offset_bytes_extra in prop_oneof![Just(0u64), 1..512u64],
        length in prop_oneof![(0..70_000u32).prop_map(|blocks| blocks * 512), any::<u32>()],
        export_size_bytes in 0..(1u64 << 32),
        read_only in any::<bool>(),
    ) {
        let header = RequestHeader {
            flags,
            command: Command::from_code(code),
            cookie: 1,
            offset: offset_blocks * 512 + offset_bytes_extra,
            length,
        };
        let check = classify_request(&header, export_size_bytes, read_only);
        let ranged = matches!(header.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes);
        if check == RequestCheck::Proceed && ranged {
            prop_assert!(header.offset + u64::from(header.length) <= export_size_bytes);
            prop_assert_eq!(header.offset % 512, 0);
            prop_assert_eq!(header.length % 512, 0);
            prop_assert!(!(read_only && header.command.modifies_export()));
            prop_assert!(header.command == Command::Trim || header.command == Command::WriteZeroes
                || header.length <= REQUEST_PAYLOAD_BYTES_MAX);
        }
        if check == RequestCheck::Disconnect {
            prop_assert_eq!(header.command, Command::Write);
            prop_assert!(header.length > REQUEST_PAYLOAD_BYTES_MAX);
        }
    }

    #[test]
    fn option_answering_never_panics(
        header_bytes in proptest::array::uniform16(any::<u8>()),
        code in prop_oneof![Just(option::EXPORT_NAME), Just(option::GO), Just(option::INFO),
                            Just(option::LIST), Just(option::ABORT), any::<u32>()],
        data in proptest::collection::vec(any::<u8>(), 0..256),
        no_zeroes in any::<bool>(),
    ) {
        let client_flags = ClientFlags { fixed_newstyle: true, no_zeroes };
        let catalog = FakeCatalog::new();
        // Arbitrary header bytes through the parser...
        let _ = parse_option_header(&header_bytes);
        // ...and arbitrary data behind a valid header for each interesting code.
        let header = OptionHeader { code, data_bytes: data.len() as u32 };
        let outcome = answer_option(client_flags, &header, &data, &catalog);
        // Everything but an EXPORT_NAME answer is a well-formed option reply stream.
        if code != option::EXPORT_NAME {
            let replies = parse_replies(&outcome.reply);
            prop_assert!(!replies.is_empty());
            prop_assert!(replies.iter().all(|(reply_header, _)| reply_header.option == code));
        }
    }

    #[test]
    fn go_with_arbitrary_name_never_panics(name in ".{0,40}") {
        let outcome = send_option(ClientFlags::default(), &encode_go(&name));
        let replies = parse_replies(&outcome.reply);
        let last = replies.last().map(|(header, _)| header.reply_type);
        prop_assert!(last == Some(reply::ACK) || last.is_some_and(|reply_type| reply_type & reply::ERROR_BIT != 0));
    }
}

/// Checks the seed corpus of the cargo-fuzz targets in `protocol/fuzz/corpus/` against the
/// generator below; ordinary runs never touch the source tree. Regenerate with
/// `TANDEM_WRITE_FUZZ_CORPUS=1 cargo test -p protocol --lib nbd::tests::fuzz_seed_corpus_is_committed_and_current`.
#[test]
fn fuzz_seed_corpus_is_committed_and_current() {
    use crate::frame::{encode_frame, FrameKind};
    use crate::messages::{Extent, Readiness, Request};

    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    // With TANDEM_WRITE_FUZZ_CORPUS=1 the seeds are (re)written; otherwise the committed
    // seeds must be exactly what this generator makes, so they stay valid inputs.
    let rewrite = std::env::var_os("TANDEM_WRITE_FUZZ_CORPUS").is_some();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let directory = corpus.join(target);
        if rewrite {
            std::fs::create_dir_all(&directory).expect("create corpus directory");
            std::fs::write(directory.join(name), bytes).expect("write seed");
        } else {
            let committed = std::fs::read(directory.join(name))
                .unwrap_or_else(|error| panic!("seed {target}/{name} is missing ({error}); run with TANDEM_WRITE_FUZZ_CORPUS=1"));
            assert_eq!(
                committed, bytes,
                "seed {target}/{name} is stale; run with TANDEM_WRITE_FUZZ_CORPUS=1"
            );
        }
    };

    // nbd_options: one byte of client flags, then one encoded option.
    let option_seeds: [(&str, u8, Vec<u8>); 8] = [
        ("go-disk", 3, encode_go("disk")),
        ("go-unknown", 3, encode_go("missing")),
        ("info-archive", 1, encode_info("archive")),
        ("list", 1, encode_option(option::LIST, &[])),
        (
            "export-name-zeroes",
            1,
            encode_option(option::EXPORT_NAME, b"disk"),
        ),
        (
            "export-name-no-zeroes",
            3,
            encode_option(option::EXPORT_NAME, b"archive"),
        ),
        ("abort", 3, encode_option(option::ABORT, &[])),
        (
            "structured-reply",
            3,
            encode_option(option::STRUCTURED_REPLY, &[]),
        ),
    ];
    for (name, flags, encoded) in option_seeds {
        write("nbd_options", name, &[&[flags][..], &encoded].concat());
    }

    // nbd_requests: a request header, the export size, the read-only byte.
    let disk_size = DISK_BYTES.to_be_bytes();
    let request_seeds = [
        ("read", request(Command::Read, 0, 0, 4096), 0u8),
        (
            "write-fua",
            request(Command::Write, command_flag::FUA, 4096, 65536),
            0,
        ),
        ("write-read-only", request(Command::Write, 0, 0, 512), 1),
        (
            "write-past-end",
            request(Command::Write, 0, DISK_BYTES, 512),
            0,
        ),
        (
            "write-oversized",
            request(Command::Write, 0, 0, REQUEST_PAYLOAD_BYTES_MAX + 512),
            0,
        ),
        ("flush", request(Command::Flush, 0, 0, 0), 0),
        ("trim", request(Command::Trim, 0, 8192, 8192), 0),
        (
            "write-zeroes-no-hole",
            request(Command::WriteZeroes, command_flag::NO_HOLE, 0, 4096),
            0,
        ),
        ("unaligned", request(Command::Read, 0, 100, 7), 0),
        (
            "block-status",
            request(Command::Unknown(command::BLOCK_STATUS), 0, 0, 4096),
            0,
        ),
        ("disconnect", request(Command::Disconnect, 0, 0, 0), 0),
    ];
    for (name, header, read_only) in request_seeds {
        write(
            "nbd_requests",
            name,
            &[&encode_request(header)[..], &disk_size, &[read_only]].concat(),
        );
    }

    // frame_decode: request frames as the CLI sends them.
    let frame_seeds = [
        ("volume-list", Request::VolumeList),
        ("node-status", Request::NodeStatus),
        (
            "volume-create",
            Request::VolumeCreate {
                name: "disk".to_owned(),
                size_bytes: 1 << 30,
                track_size_bytes: 1 << 20,
            },
        ),
        (
            "volume-set-readiness",
            Request::VolumeSetReadiness {
                name: "disk".to_owned(),
                readiness: Readiness::ReadOnly,
            },
        ),
        (
            "snap",
            Request::Snap {
                request_id: 7,
                source: "disk".to_owned(),
                target: "disk-copy".to_owned(),
                extents: vec![Extent { first: 0, last: 7 }, Extent { first: 9, last: 9 }],
                overwrite: false,
            },
        ),
    ];
    for (name, message) in frame_seeds {
        let frame = encode_frame(FrameKind::Request, &message).expect("frame encodes");
        write("frame_decode", name, &frame);
    }
}
