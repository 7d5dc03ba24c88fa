//! Progress that is always true, against a node process (issue 10): a kill -9 of the
//! source's node in the middle of a clone neither shrinks the clone's total nor lowers
//! its percent, and every reading says 100 % only when no track remains.

use crate::common::{free_port, init, wait_until, NodeProcess};
use std::path::Path;

const TRACK_BYTES: u64 = 64 << 10;
const TRACKS: u64 = 128;

fn clone_show(node: &NodeProcess, certs: &Path) -> serde_json::Value {
    let text = node.cli_ok(certs, &["clone", "show", "dst", "--json"]);
    let info: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{error}: {text}"));
    let count = |name: &str| {
        info[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {info}"))
    };
    assert_eq!(
        count("tracks_copied") + count("tracks_remaining"),
        count("tracks_total"),
        "one reading: {info}"
    );
    assert_eq!(
        info["percent"].as_f64().unwrap() == 100.0,
        count("tracks_remaining") == 0,
        "100 % exactly when nothing remains: {info}"
    );
    info
}

fn fill(node: &NodeProcess, volume: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, volume)
            .await
            .unwrap();
        for track in 0..TRACKS {
            let data = vec![track as u8 ^ 0x5a; TRACK_BYTES as usize];
            client
                .write(track * TRACK_BYTES, &data, false)
                .await
                .unwrap()
                .unwrap();
        }
        client.flush().await.unwrap().unwrap();
        client.disconnect().await.unwrap();
    });
}

#[test]
fn a_clone_keeps_its_total_and_percent_across_kill_9_of_its_node_and_ends_at_100_with_0_left() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha");
    let data = directory.path().join("data");
    let port = free_port();
    let start =
        || NodeProcess::start_with(&certs, "alpha", &data, None, port, &["--control-plane"]);
    let mut node = start();
    node.cli_ok(&certs, &["cluster", "init"]);
    node.wait_registered(&certs, "alpha");
    for volume in ["src", "dst"] {
        node.cli_ok(&certs, &["volume", "create", volume, "--size", "8MiB"]);
    }
    fill(&node, "src");

    // At 1 MiB/s the clone moves 16 tracks a second: eight seconds for the volume.
    node.cli_ok(&certs, &["clone", "create", "src", "dst", "--rate", "1"]);
    let activated: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&certs, &["clone", "activate", "dst", "--json"]))
            .unwrap();
    assert_eq!(activated["tracks_total"], TRACKS, "{activated}");
    assert!(
        activated["percent"].as_f64().unwrap() < 100.0,
        "{activated}"
    );
    let mut before = clone_show(&node, &certs);
    wait_until(30, "a third of the clone to be copied", || {
        before = clone_show(&node, &certs);
        before["tracks_copied"].as_u64().unwrap() >= TRACKS / 3
    });
    assert_eq!(before["state"], "active", "{before}");
    assert_eq!(before["tracks_total"], TRACKS, "{before}");
    // kill -9 at once: whatever the node last checkpointed lags behind its bits.
    node.kill();
    node = start();
    let after = clone_show(&node, &certs);
    assert_eq!(
        after["tracks_total"], before["tracks_total"],
        "the restart changed the clone's total: before {before}, after {after}"
    );
    assert!(
        after["percent"].as_f64().unwrap() >= before["percent"].as_f64().unwrap(),
        "the percent fell across the restart: before {before}, after {after}"
    );
    assert!(
        after["tracks_remaining"].as_u64().unwrap() <= before["tracks_remaining"].as_u64().unwrap(),
        "before {before}, after {after}"
    );
    // To the end, every reading keeps the rules (checked in `clone_show`), and the percent
    // never falls.
    let mut last_percent = after["percent"].as_f64().unwrap();
    let mut finished = after.clone();
    wait_until(60, "the clone to finish", || {
        finished = clone_show(&node, &certs);
        let percent = finished["percent"].as_f64().unwrap();
        assert!(
            percent >= last_percent,
            "{percent} after {last_percent}: {finished}"
        );
        last_percent = percent;
        finished["state"] == "copied"
    });
    assert_eq!(finished["tracks_total"], TRACKS, "{finished}");
    assert_eq!(finished["tracks_copied"], TRACKS, "{finished}");
    assert_eq!(finished["tracks_remaining"], 0, "{finished}");
    assert_eq!(finished["percent"], 100.0, "{finished}");
    node.cli_ok(&certs, &["clone", "terminate", "dst"]);
    node.kill();
}
