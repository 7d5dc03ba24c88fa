//! The `tandem-chaos` binary's contract with the scripts that run it: bad input gets a
//! clear error and a failing status before any cluster starts, and a history it saved is
//! read back by the checkers as it was written.

use chaos::history::{History, Operation, Outcome};
use std::process::Command;

fn tandem_chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem-chaos"))
}

#[test]
fn an_unknown_fault_kind_is_refused_with_the_known_ones_before_anything_starts() {
    let output = tandem_chaos()
        .args(["--faults", "kill-source,meteor", "--tandem", "/bin/true"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown fault kind \"meteor\""), "{stderr}");
    assert!(stderr.contains("kill-leader"), "{stderr}");
    // Delay and loss need the node's own fault injection, which compose nodes lack.
    let output = tandem_chaos()
        .args([
            "--backend",
            "compose",
            "--faults",
            "delay",
            "--tandem",
            "/bin/true",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot inject delay"));
}

#[test]
fn a_missing_tandem_binary_is_named_with_how_to_build_it() {
    let output = tandem_chaos()
        .args(["--tandem", "/nonexistent/tandem"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cargo build --release -p tandem"),
        "{stderr}"
    );
}

#[test]
fn a_saved_history_reads_back_as_it_was_written() {
    let history = History::new();
    let write = history.invoke(
        "writer",
        Operation::Write {
            volume: "p".into(),
            first_block: 3,
            blocks: 2,
            write_id: 9,
            fua: true,
        },
    );
    history.end(write, Outcome::Unknown, Some("connection reset".into()));
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("history.jsonl");
    history.save(&path).unwrap();
    assert_eq!(History::load(&path).unwrap(), history.events());
}
