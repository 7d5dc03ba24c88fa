//! The README's "Running a cluster" block, run as written against three node processes,
//! so the README cannot drift from the product.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the whole block may take: three nodes start, two copies of 64 MiB run.
const README_BLOCK_SECONDS_MAX: u64 = 240;

/// The first `sh` block after the heading `heading` in `markdown`.
fn sh_block_after(markdown: &str, heading: &str) -> String {
    let section = &markdown[markdown
        .find(heading)
        .unwrap_or_else(|| panic!("README has no heading {heading:?}"))..];
    let start = section.find("```sh\n").expect("no sh block in the section") + "```sh\n".len();
    let length = section[start..].find("```").expect("an unterminated block");
    section[start..start + length].to_string()
}

/// Commands an admin meets on day one: the block must show each of them.
const COMMANDS_SHOWN: [&str; 29] = [
    "tandem init ",
    "tandem node ",
    "tandem cluster init",
    "tandem cluster add-member ",
    "tandem cluster status",
    "tandem volume create ",
    "tandem volume show ",
    "tandem volume list",
    "tandem volume readiness ",
    "tandem volume delete ",
    "tandem snap ",
    "tandem gsnap ",
    "tandem gsnap forget ",
    "tandem status",
    "tandem clone create ",
    "tandem clone rate ",
    "tandem clone activate ",
    "tandem clone show ",
    "tandem clone terminate ",
    "tandem clone cancel ",
    "tandem clone list",
    "tandem mirror establish ",
    "tandem mirror rate ",
    "tandem mirror split ",
    "tandem mirror rotate ",
    "tandem mirror reestablish ",
    "tandem mirror restore ",
    "tandem mirror cancel ",
    "tandem mirror list",
];

#[test]
fn the_readmes_running_a_cluster_block_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let block = sh_block_after(&readme, "## Running a cluster");
    for command in COMMANDS_SHOWN {
        assert!(
            block.contains(command),
            "the README's cluster block does not show `{command}`"
        );
    }
    assert!(
        block.contains("qemu-io "),
        "the block shows no host IO with qemu-io"
    );

    let directory = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_tandem"));
    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Each line must succeed (errexit); the node processes it starts in the background
    // are stopped when the block ends, however it ends.
    let script =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{block}");
    let mut child = Command::new("bash")
        .args(["-x", "-c", &script])
        .current_dir(directory.path())
        .env("PATH", path)
        .env_remove("TANDEM_ENDPOINT")
        .env_remove("TANDEM_CERTS")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both pipes are drained on threads, so neither fills while we wait.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).ok();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).ok();
        text
    });
    let deadline = Instant::now() + Duration::from_secs(README_BLOCK_SECONDS_MAX);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            // Stop the shell's process group: the shell and the nodes it started.
            let _ = Command::new("pkill")
                .args(["-TERM", "-P", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!(
            "the README block ran longer than {README_BLOCK_SECONDS_MAX} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )
    });
    assert!(
        status.success(),
        "the README block failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // What the block says about its own output holds.
    assert!(
        stdout.contains("nbd://127.0.0.1:10810/vol1"),
        "volume show did not give the NBD address the block points qemu-io at\n{stdout}"
    );
    assert!(
        stdout.contains("wrote 1048576/1048576 bytes"),
        "qemu-io's write did not go through\n{stdout}"
    );
}
