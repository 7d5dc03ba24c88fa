//! The NBD export, driven by real hosts' tools and by hostile bytes.

use crate::common::{pattern, NodeFixture};
use node::nbd_client::{NbdClient, NbdErrorValue};
use protocol::messages::Readiness;
use protocol::nbd::transmission::{Command, RequestHeader};
use protocol::nbd::{client as wire, error_value};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command as Process;

async fn run(program: &str, arguments: &[&str]) -> String {
    let output = Process::new(program)
        .args(arguments)
        .output()
        .await
        .unwrap_or_else(|error| {
            panic!("cannot run {program} (install qemu-utils and libnbd-bin): {error}")
        });
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {stdout}\n{stderr}"
    );
    stdout
}

/// The qemu-io commands of the pattern test: offsets neither track nor block aligned,
/// one crossing a track boundary, one not even sector aligned (qemu does the
/// read-modify-write around it, as it does for any 512-byte-sector device).
const QEMU_WRITES: [(&str, u64, u64); 5] = [
    ("0x5a", 512, 3072),
    ("0xa5", 65536 - 1024, 8192),
    ("0x3c", 1_000_000, 70_000),
    ("0xc3", 3_145_728 + 17, 4000),
    ("0x11", 8_388_608 - 4096, 4096),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_read_back_and_qemu_img_compare_matches_a_raw_file() {
    let fixture = NodeFixture::start().await;
    fixture
        .node
        .store
        .create("patterns", 8 << 20, 64 << 10)
        .unwrap();
    let uri = fixture.nbd_uri("patterns");
    let raw = fixture.directory.path().join("same-writes.raw");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    let raw_path = raw.to_str().unwrap();
    for (pattern_byte, offset, length) in QEMU_WRITES {
        let write = format!("write -P {pattern_byte} {offset} {length}");
        run("qemu-io", &["-f", "raw", &uri, "-c", &write]).await;
        run("qemu-io", &["-f", "raw", raw_path, "-c", &write]).await;
    }
    for (pattern_byte, offset, length) in QEMU_WRITES {
        let read = format!("read -P {pattern_byte} {offset} {length}");
        let output = run("qemu-io", &["-f", "raw", &uri, "-c", &read]).await;
        assert!(!output.contains("Pattern verification failed"), "{output}");
    }
    // A pattern that was not written must fail verification: the check can fail.
    let output = Process::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read -P 0x77 512 512"])
        .output()
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "qemu-io accepted a pattern that was never written"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("Pattern verification failed"));
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", raw_path, &uri],
    )
    .await;
    // And compare notices a difference.
    run(
        "qemu-io",
        &["-f", "raw", raw_path, "-c", "write -P 0x01 4096 512"],
    )
    .await;
    let status = Process::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", raw_path, &uri])
        .output()
        .await
        .unwrap()
        .status;
    assert_eq!(
        status.code(),
        Some(1),
        "qemu-img compare must report the difference"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_size_and_read_only_flag() {
    let fixture = NodeFixture::start().await;
    fixture
        .node
        .store
        .create("info", 48 << 20, 64 << 10)
        .unwrap();
    let output = run("nbdinfo", &["--json", &fixture.nbd_uri("info")]).await;
    let info: serde_json::Value = serde_json::from_str(&output).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 48 << 20);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["block_size_minimum"], 512);
    fixture
        .node
        .store
        .set_readiness("info", Readiness::ReadOnly)
        .unwrap();
    let output = run("nbdinfo", &["--json", &fixture.nbd_uri("info")]).await;
    let info: serde_json::Value = serde_json::from_str(&output).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    // LIST shows ready and read-only volumes, never not-ready ones.
    fixture
        .node
        .store
        .create("hidden", 1 << 20, 64 << 10)
        .unwrap();
    fixture
        .node
        .store
        .set_readiness("hidden", Readiness::NotReady)
        .unwrap();
    let output = run(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd://{}", fixture.node.nbd_address),
        ],
    )
    .await;
    assert!(output.contains("\"info\""), "{output}");
    assert!(!output.contains("\"hidden\""), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_moves_a_256_mib_volume_in_and_out_unchanged() {
    let fixture = NodeFixture::start().await;
    fixture
        .node
        .store
        .create("big", 256 << 20, 64 << 10)
        .unwrap();
    let source = fixture.directory.path().join("source.raw");
    let copy = fixture.directory.path().join("copy.raw");
    // Random content, with a hole of zeros, so both data and zero handling are exercised.
    let mut content = vec![0u8; 256 << 20];
    let mut state = 0x9e3779b97f4a7c15u64;
    for chunk in content.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    content[(64 << 20)..(96 << 20)].fill(0);
    std::fs::write(&source, &content).unwrap();
    let uri = fixture.nbd_uri("big");
    run("nbdcopy", &[source.to_str().unwrap(), &uri]).await;
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]).await;
    assert!(
        files_equal(&source, &copy),
        "the copy out differs from what went in"
    );
}

fn files_equal(left: &Path, right: &Path) -> bool {
    std::fs::read(left).unwrap() == std::fs::read(right).unwrap()
}

async fn raw_session(fixture: &NodeFixture, export: &str) -> tokio::net::TcpStream {
    NbdClient::connect(fixture.node.nbd_address, export)
        .await
        .unwrap()
        .into_stream()
}

async fn send(
    stream: &mut tokio::net::TcpStream,
    command: Command,
    flags: u16,
    offset: u64,
    length: u32,
) {
    let header = RequestHeader {
        flags,
        command,
        cookie: 42,
        offset,
        length,
    };
    stream
        .write_all(&wire::encode_request(header))
        .await
        .unwrap();
}

async fn reply_error(stream: &mut tokio::net::TcpStream) -> u32 {
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).await.unwrap();
    let reply = wire::parse_simple_reply(&reply).unwrap();
    assert_eq!(reply.cookie, 42);
    reply.error
}

/// Another client that must keep being served whatever the hostile one did.
async fn still_serves(fixture: &NodeFixture) {
    let mut client = NbdClient::connect(fixture.node.nbd_address, "good")
        .await
        .unwrap();
    client
        .write(4096, &pattern(5, 4096), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        client.read(4096, 4096).await.unwrap().unwrap(),
        pattern(5, 4096)
    );
    client.disconnect().await.unwrap();
}

async fn closed(stream: &mut tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_error_and_the_server_serves_others() {
    let fixture = NodeFixture::start().await;
    fixture
        .node
        .store
        .create("good", 1 << 20, 64 << 10)
        .unwrap();
    fixture
        .node
        .store
        .create("readonly", 1 << 20, 64 << 10)
        .unwrap();
    fixture
        .node
        .store
        .set_readiness("readonly", Readiness::ReadOnly)
        .unwrap();
    fixture
        .node
        .store
        .create("offline", 1 << 20, 64 << 10)
        .unwrap();

    // Bad magic in the handshake: the connection is dropped.
    let mut stream = tokio::net::TcpStream::connect(fixture.node.nbd_address)
        .await
        .unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.unwrap();
    stream.write_all(&[0, 0, 0, 3]).await.unwrap();
    stream.write_all(&[0xde; 16]).await.unwrap();
    assert!(closed(&mut stream).await);
    still_serves(&fixture).await;

    // Bad magic in a request: the connection is dropped.
    let mut stream = raw_session(&fixture, "good").await;
    stream.write_all(&[0xab; 28]).await.unwrap();
    assert!(closed(&mut stream).await);
    still_serves(&fixture).await;

    // A write longer than any request may be: dropped without reading 4 GiB.
    let mut stream = raw_session(&fixture, "good").await;
    send(&mut stream, Command::Write, 0, 0, !511u32).await;
    assert!(closed(&mut stream).await);
    still_serves(&fixture).await;

    // Read past the end, an unknown command, an unaligned read: errors, session goes on.
    let mut stream = raw_session(&fixture, "good").await;
    send(&mut stream, Command::Read, 0, (1 << 20) - 512, 1024).await;
    assert_eq!(reply_error(&mut stream).await, error_value::EINVAL);
    send(&mut stream, Command::Unknown(77), 0, 0, 512).await;
    assert_eq!(reply_error(&mut stream).await, error_value::EINVAL);
    send(&mut stream, Command::Read, 0, 100, 512).await;
    assert_eq!(reply_error(&mut stream).await, error_value::EINVAL);
    // A write past the end has its payload skipped, and the stream stays in step.
    send(&mut stream, Command::Write, 0, 1 << 20, 4096).await;
    stream.write_all(&[9u8; 4096]).await.unwrap();
    assert_eq!(reply_error(&mut stream).await, error_value::ENOSPC);
    send(&mut stream, Command::Read, 0, 0, 512).await;
    assert_eq!(reply_error(&mut stream).await, 0);
    let mut data = [0u8; 512];
    stream.read_exact(&mut data).await.unwrap();
    drop(stream);
    still_serves(&fixture).await;

    // A read-only export refuses writes with EPERM and still serves reads.
    let mut client = NbdClient::connect(fixture.node.nbd_address, "readonly")
        .await
        .unwrap();
    assert_eq!(
        client.write(0, &[1u8; 512], false).await.unwrap(),
        Err(NbdErrorValue(error_value::EPERM))
    );
    assert_eq!(
        client.write_zeroes(0, 4096).await.unwrap(),
        Err(NbdErrorValue(error_value::EPERM))
    );
    assert_eq!(client.read(0, 512).await.unwrap().unwrap(), vec![0u8; 512]);

    // A not-ready volume is not offered, and an open connection gets errors once the
    // volume stops being ready.
    fixture
        .node
        .store
        .set_readiness("offline", Readiness::NotReady)
        .unwrap();
    assert!(NbdClient::connect(fixture.node.nbd_address, "offline")
        .await
        .is_err());
    let mut client = NbdClient::connect(fixture.node.nbd_address, "good")
        .await
        .unwrap();
    fixture
        .node
        .store
        .set_readiness("good", Readiness::NotReady)
        .unwrap();
    assert_eq!(
        client.read(0, 512).await.unwrap(),
        Err(NbdErrorValue(error_value::EIO))
    );
    assert_eq!(
        client.write(0, &[1u8; 512], false).await.unwrap(),
        Err(NbdErrorValue(error_value::EIO))
    );
    fixture
        .node
        .store
        .set_readiness("good", Readiness::Ready)
        .unwrap();
    assert!(client.read(0, 512).await.unwrap().is_ok());
    still_serves(&fixture).await;
    // An unknown export is refused at the handshake.
    assert!(
        NbdClient::connect(fixture.node.nbd_address, "no-such-volume")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroing_larger_than_the_in_flight_budget_completes_and_reads_zeros() {
    let fixture = NodeFixture::start().await;
    fixture
        .node
        .store
        .create("wide", 1 << 30, 64 << 10)
        .unwrap();
    let mut client = NbdClient::connect(fixture.node.nbd_address, "wide")
        .await
        .unwrap();
    client
        .write(512 << 20, &pattern(8, 8192), false)
        .await
        .unwrap()
        .unwrap();
    client
        .write((1 << 30) - 4096, &pattern(9, 4096), false)
        .await
        .unwrap()
        .unwrap();
    // 1 GiB less one sector, so the last block is zeroed by read-modify-write.
    client
        .write_zeroes(0, (1 << 30) - 512)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        client.read(512 << 20, 8192).await.unwrap().unwrap(),
        vec![0u8; 8192]
    );
    let mut last_block = vec![0u8; 4096];
    last_block[4096 - 512..].copy_from_slice(&pattern(9, 4096)[4096 - 512..]);
    assert_eq!(
        client.read((1 << 30) - 4096, 4096).await.unwrap().unwrap(),
        last_block
    );
    client.disconnect().await.unwrap();
}
