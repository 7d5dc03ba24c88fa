//! Arbitrary bytes as a QUIC request frame: decoding must fail cleanly, never panic or
//! allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = protocol::frame::decode_frame::<protocol::messages::Request>(input);
});
