//! The clone and mirror commands of issue 4, end to end against a node process: the
//! contracted names and flags, `--json` and `--wait`, clear refusals, and a kill -9 in the
//! middle of a copy that the restarted node finishes.

use crate::common::{free_udp_port, init, wait_until, NodeProcess};
use std::path::Path;

const TRACK_BYTES: u64 = 64 << 10;
const TRACKS: u64 = 128;

fn json(node: &NodeProcess, certs: &Path, arguments: &[&str]) -> serde_json::Value {
    let text = node.cli_ok(certs, arguments);
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{arguments:?}: {error}: {text}"))
}

fn refused(node: &NodeProcess, certs: &Path, arguments: &[&str], message: &str) {
    let output = node.cli(certs, arguments);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{arguments:?} succeeded");
    assert!(stderr.contains(message), "{arguments:?}: {stderr}");
}

/// Fills a volume through NBD with a different byte per track.
fn fill(node: &NodeProcess, volume: &str, salt: u8) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, volume)
            .await
            .unwrap();
        for track in 0..TRACKS {
            let data = vec![(track as u8).wrapping_add(salt); TRACK_BYTES as usize];
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

fn read_all(node: &NodeProcess, volume: &str) -> Vec<u8> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, volume)
            .await
            .unwrap();
        let mut image = Vec::new();
        for track in 0..TRACKS {
            image.extend(
                client
                    .read(track * TRACK_BYTES, TRACK_BYTES as u32)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        client.disconnect().await.unwrap();
        image
    })
}

#[test]
fn clone_and_mirror_commands_through_a_node_process_survive_a_kill_mid_copy() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha");
    let data = directory.path().join("data");
    let port = free_udp_port();
    let mut node =
        NodeProcess::start_with(&certs, "alpha", &data, None, port, &["--control-plane"]);
    node.cli_ok(&certs, &["cluster", "init"]);
    node.wait_registered(&certs, "alpha");
    for volume in ["src", "dst", "bcv"] {
        node.cli_ok(&certs, &["volume", "create", volume, "--size", "8MiB"]);
    }
    fill(&node, "src", 1);

    // Clone: create, activate with --wait, list, show, terminate.
    let created = json(&node, &certs, &["clone", "create", "src", "dst", "--json"]);
    assert_eq!(created["state"], "created");
    assert_eq!(created["tracks_remaining"], TRACKS);
    refused(
        &node,
        &certs,
        &["clone", "terminate", "dst"],
        "never activated",
    );
    let activated = json(
        &node,
        &certs,
        &["clone", "activate", "dst", "--wait", "--json"],
    );
    assert_eq!(activated["state"], "copied", "{activated}");
    assert_eq!(activated["percent"], 100.0);
    assert_eq!(activated["tracks_copied"], TRACKS);
    refused(
        &node,
        &certs,
        &["clone", "activate", "dst"],
        "already active",
    );
    let list = json(&node, &certs, &["clone", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["source"], "src");
    let show = node.cli_ok(&certs, &["clone", "show", "dst"]);
    assert!(show.contains("clone src -> dst is copied"), "{show}");
    assert_eq!(read_all(&node, "dst"), read_all(&node, "src"));
    let ended = json(&node, &certs, &["clone", "terminate", "dst", "--json"]);
    assert_eq!(ended["ended"], true);
    refused(&node, &certs, &["clone", "show", "dst"], "no clone session");
    refused(
        &node,
        &certs,
        &["clone", "create", "src", "nothing"],
        "does not exist",
    );
    refused(
        &node,
        &certs,
        &["clone", "create", "src", "dst", "--extent", "100-200"],
        "does not fit",
    );

    // Mirror: an async establish at a slow rate, refused splits while it syncs, and a
    // kill -9 in the middle of the copy.
    let established = json(
        &node,
        &certs,
        &[
            "mirror",
            "establish",
            "src",
            "bcv",
            "--mode",
            "async",
            "--rate",
            "2",
            "--json",
        ],
    );
    assert_eq!(established["state"], "syncing");
    assert_eq!(established["mode"], "async");
    assert_eq!(established["rate_limit_mebibytes_per_second"], 2);
    refused(
        &node,
        &certs,
        &["mirror", "split", "bcv"],
        "not synchronized",
    );
    refused(
        &node,
        &certs,
        &["mirror", "establish", "src", "bcv"],
        "already established",
    );
    wait_until(20, "the mirror to copy part of the volume", || {
        let show = json(&node, &certs, &["mirror", "show", "bcv", "--json"]);
        show["tracks_copied"].as_u64().unwrap() > 0
    });
    node.kill();
    let mut node =
        NodeProcess::start_with(&certs, "alpha", &data, None, port, &["--control-plane"]);
    let resumed = json(&node, &certs, &["mirror", "show", "bcv", "--json"]);
    assert!(
        resumed["tracks_remaining"].as_u64().unwrap() < TRACKS,
        "the restart lost the copy's progress: {resumed}"
    );
    assert!(
        resumed["tracks_remaining"].as_u64().unwrap() > 0,
        "{resumed}"
    );
    // Lift the rate limit while it runs, and wait for the synchronization.
    let faster = json(
        &node,
        &certs,
        &["mirror", "rate", "bcv", "--rate", "1000", "--json"],
    );
    assert_eq!(faster["rate_limit_mebibytes_per_second"], 1000);
    let split = wait_for_sync_then_split(&node, &certs);
    assert_eq!(split["state"], "split");
    assert_eq!(read_all(&node, "bcv"), read_all(&node, "src"));
    node.cli_ok(&certs, &["mirror", "cancel", "bcv"]);
    let list = json(&node, &certs, &["mirror", "list", "--json"]);
    assert_eq!(list, serde_json::json!([]));
    node.kill();
}

fn wait_for_sync_then_split(node: &NodeProcess, certs: &Path) -> serde_json::Value {
    wait_until(60, "the mirror to synchronize", || {
        json(node, certs, &["mirror", "show", "bcv", "--json"])["state"] == "synchronized"
    });
    json(node, certs, &["mirror", "split", "bcv", "--json"])
}

fn write_tracks(node: &NodeProcess, volume: &str, tracks: &[u64], byte: u8) -> Vec<bool> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, volume)
            .await
            .unwrap();
        let mut acknowledged = Vec::new();
        for track in tracks {
            let data = vec![byte; TRACK_BYTES as usize];
            let result = client
                .write(track * TRACK_BYTES, &data, false)
                .await
                .unwrap();
            acknowledged.push(result.is_ok());
        }
        let _ = client.disconnect().await;
        acknowledged
    })
}

fn show(node: &NodeProcess, certs: &Path) -> serde_json::Value {
    json(node, certs, &["mirror", "show", "bcv", "--json"])
}

#[test]
fn a_mirror_across_nodes_survives_kill_9_of_either_side_and_keeps_every_acknowledged_sync_write() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha,beta");
    let (alpha_data, beta_data) = (
        directory.path().join("alpha"),
        directory.path().join("beta"),
    );
    let (alpha_port, beta_port) = (free_udp_port(), free_udp_port());
    let start_alpha = || {
        NodeProcess::start_with(
            &certs,
            "alpha",
            &alpha_data,
            None,
            alpha_port,
            &["--control-plane"],
        )
    };
    let mut alpha = start_alpha();
    alpha.cli_ok(&certs, &["cluster", "init"]);
    alpha.wait_registered(&certs, "alpha");
    let members = alpha.quic.to_string();
    let start_beta = || {
        NodeProcess::start_with(
            &certs,
            "beta",
            &beta_data,
            None,
            beta_port,
            &["--members", &members],
        )
    };
    let mut beta = start_beta();
    alpha.wait_registered(&certs, "beta");
    alpha.cli_ok(
        &certs,
        &[
            "volume", "create", "std", "--node", "alpha", "--size", "8MiB",
        ],
    );
    alpha.cli_ok(
        &certs,
        &[
            "volume", "create", "bcv", "--node", "beta", "--size", "8MiB",
        ],
    );
    fill(&alpha, "std", 7);

    // The standard on alpha, its BCV on beta: tracks go over QUIC between the nodes.
    let established = json(
        &alpha,
        &certs,
        &["mirror", "establish", "std", "bcv", "--rate", "2", "--json"],
    );
    assert_eq!(established["state"], "syncing");
    refused(
        &beta,
        &certs,
        &["volume", "delete", "bcv"],
        "takes part in the mirror session",
    );
    wait_until(20, "part of the copy to reach beta", || {
        show(&alpha, &certs)["tracks_copied"].as_u64().unwrap() > 0
    });
    // kill -9 the target mid-copy: the source keeps its bits and retries.
    beta.kill();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let remaining_while_down = show(&alpha, &certs)["tracks_remaining"].as_u64().unwrap();
    assert!(remaining_while_down > 0 && remaining_while_down < TRACKS);
    beta = start_beta();
    wait_until(30, "the copy to move on after beta came back", || {
        show(&alpha, &certs)["tracks_remaining"].as_u64().unwrap() < remaining_while_down
    });
    // kill -9 the source mid-copy: the bits on alpha's disk say what is still missing.
    alpha.kill();
    alpha = start_alpha();
    let resumed = show(&alpha, &certs);
    assert!(
        resumed["tracks_remaining"].as_u64().unwrap() < remaining_while_down,
        "{resumed}"
    );
    json(
        &alpha,
        &certs,
        &["mirror", "rate", "bcv", "--rate", "1000", "--json"],
    );
    wait_until(60, "the mirror to synchronize", || {
        show(&alpha, &certs)["state"] == "synchronized"
    });

    // Sync mode: every write the host saw acknowledged is on beta, even when beta dies
    // right after; a write while beta is down is not acknowledged.
    let acknowledged = write_tracks(&alpha, "std", &[1, 2, 3, 60, 127], 0xa1);
    assert!(acknowledged.iter().all(|ok| *ok));
    beta.kill();
    let while_down = write_tracks(&alpha, "std", &[5], 0xb2);
    assert_eq!(
        while_down,
        vec![false],
        "a sync mirror acknowledged a write its BCV never got"
    );
    beta = start_beta();
    alpha.wait_registered(&certs, "beta");
    let split = wait_for_sync_then_split(&alpha, &certs);
    assert_eq!(split["state"], "split");
    assert_eq!(
        read_all(&beta, "bcv"),
        read_all(&alpha, "std"),
        "the BCV on beta is not the standard's image at the split"
    );
    // Reestablish moves only the tracks changed since the split.
    write_tracks(&alpha, "std", &[10, 11], 0xc3);
    alpha.cli_ok(&certs, &["mirror", "reestablish", "bcv"]);
    wait_until(30, "the reestablish", || {
        show(&alpha, &certs)["state"] == "synchronized"
    });
    assert_eq!(show(&alpha, &certs)["tracks_copied_last"], 2);
    alpha.cli_ok(&certs, &["mirror", "cancel", "bcv"]);
    beta.cli_ok(&certs, &["volume", "delete", "bcv"]);
    alpha.kill();
    beta.kill();
}

#[test]
fn a_differential_split_sends_down_a_cascade_on_another_node_only_what_changed() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha,beta");
    let alpha = NodeProcess::start_with(
        &certs,
        "alpha",
        &directory.path().join("alpha"),
        None,
        0,
        &["--control-plane"],
    );
    alpha.cli_ok(&certs, &["cluster", "init"]);
    alpha.wait_registered(&certs, "alpha");
    let members = alpha.quic.to_string();
    let beta = NodeProcess::start_with(
        &certs,
        "beta",
        &directory.path().join("beta"),
        None,
        0,
        &["--members", &members],
    );
    alpha.wait_registered(&certs, "beta");
    // STD on alpha -> BCV on beta -> BCV2 back on alpha: both hops cross nodes.
    alpha.cli_ok(
        &certs,
        &[
            "volume", "create", "std", "--node", "alpha", "--size", "8MiB",
        ],
    );
    alpha.cli_ok(
        &certs,
        &[
            "volume", "create", "bcv", "--node", "beta", "--size", "8MiB",
        ],
    );
    alpha.cli_ok(
        &certs,
        &[
            "volume", "create", "bcv2", "--node", "alpha", "--size", "8MiB",
        ],
    );
    fill(&alpha, "std", 11);
    alpha.cli_ok(
        &certs,
        &[
            "mirror",
            "establish",
            "std",
            "bcv",
            "--rate",
            "1000",
            "--wait",
        ],
    );
    alpha.cli_ok(&certs, &["mirror", "split", "bcv"]);
    alpha.cli_ok(
        &certs,
        &[
            "mirror",
            "establish",
            "bcv",
            "bcv2",
            "--rate",
            "1000",
            "--wait",
        ],
    );
    let downstream = |node: &NodeProcess| -> u64 {
        json(node, &certs, &["mirror", "show", "bcv2", "--json"])["tracks_copied"]
            .as_u64()
            .unwrap()
    };
    let settle = || {
        wait_until(30, "the cascade to settle", || {
            let show = json(&alpha, &certs, &["mirror", "show", "bcv2", "--json"]);
            show["state"] == "synchronized" && show["tracks_remaining"] == 0
        })
    };
    settle();

    // Five tracks change on the standard; a differential split of BCV sends exactly those
    // five down to BCV2.
    write_tracks(&alpha, "std", &[2, 3, 17, 30, 127], 0x5d);
    alpha.cli_ok(&certs, &["mirror", "reestablish", "bcv", "--wait"]);
    let before = downstream(&alpha);
    alpha.cli_ok(&certs, &["mirror", "split", "bcv", "--differential"]);
    settle();
    assert_eq!(
        downstream(&alpha) - before,
        5,
        "a differential split sent more than what changed"
    );

    // Three more; a full split sends every track.
    write_tracks(&alpha, "std", &[4, 5, 6], 0x6e);
    alpha.cli_ok(&certs, &["mirror", "reestablish", "bcv", "--wait"]);
    let before = downstream(&alpha);
    alpha.cli_ok(&certs, &["mirror", "split", "bcv"]);
    settle();
    assert_eq!(downstream(&alpha) - before, TRACKS);
    alpha.cli_ok(&certs, &["mirror", "split", "bcv2"]);
    assert_eq!(read_all(&alpha, "bcv2"), read_all(&alpha, "std"));
    assert_eq!(read_all(&beta, "bcv"), read_all(&alpha, "std"));
}
