//! Losing the BCV's node (issue 11 item 5), with node processes: kill -9 the node holding
//! a sync mirror's BCV under host writes, and production goes on. The mirror is
//! suspended after one target timeout, resyncs exactly the tracks written meanwhile when
//! the node returns, and ends byte-identical; a cancel during the outage ends it at once.

use crate::common::{wait_until, NodeProcess};
use crate::sessions::{fill, json, read_all, refused, TwoNodes, TRACK_BYTES};
use std::path::Path;
use std::time::{Duration, Instant};

/// The target timeout these mirrors are established with.
const TARGET_TIMEOUT: Duration = Duration::from_secs(1);

/// Writes each track through NBD, one after another, and returns how long each took to
/// be acknowledged (a failed write fails the test).
fn timed_writes(node: &NodeProcess, volume: &str, tracks: &[u64], byte: u8) -> Vec<Duration> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, volume)
            .await
            .unwrap();
        let mut latencies = Vec::new();
        for track in tracks {
            let data = vec![byte; TRACK_BYTES as usize];
            let started = Instant::now();
            client
                .write(track * TRACK_BYTES, &data, false)
                .await
                .unwrap()
                .unwrap_or_else(|error| panic!("the write to track {track} failed: {error:?}"));
            latencies.push(started.elapsed());
        }
        client.flush().await.unwrap().unwrap();
        client.disconnect().await.unwrap();
        latencies
    })
}

fn mirror_show(node: &NodeProcess, certs: &Path) -> serde_json::Value {
    json(node, certs, &["mirror", "show", "bcv", "--json"])
}

/// Alpha (the control plane) with `std`, filled, and beta with `bcv`, mirrored in sync
/// mode and synchronized.
fn synchronized_mirror(nodes: &TwoNodes) -> (NodeProcess, NodeProcess) {
    let certs = &nodes.certs;
    let alpha = nodes.start_alpha();
    alpha.cli_ok(certs, &["cluster", "init"]);
    alpha.wait_registered(certs, "alpha");
    let beta = nodes.start_beta();
    alpha.wait_registered(certs, "beta");
    for (volume, node) in [("std", "alpha"), ("bcv", "beta")] {
        alpha.cli_ok(
            certs,
            &["volume", "create", volume, "--node", node, "--size", "8MiB"],
        );
    }
    fill(&alpha, "std", 7);
    let established = json(
        &alpha,
        certs,
        &[
            "mirror",
            "establish",
            "std",
            "bcv",
            "--target-timeout",
            "1s",
            "--json",
        ],
    );
    assert_eq!(established["target_timeout_milliseconds"], 1000);
    assert_eq!(established["strict"], false);
    wait_until(60, "the mirror to synchronize", || {
        mirror_show(&alpha, certs)["state"] == "synchronized"
    });
    (alpha, beta)
}

#[test]
fn kill_9_of_the_bcvs_node_suspends_a_sync_mirror_writes_go_on_and_it_resyncs_exactly_what_was_written(
) {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, mut beta) = synchronized_mirror(&nodes);
    beta.kill();

    // Writes go on: the first waits at most one target timeout, the others do not wait.
    let written = [3, 9, 27, 64, 100, 127];
    let latencies = timed_writes(&alpha, "std", &written, 0xd1);
    let margin = Duration::from_secs(3);
    assert!(
        latencies[0] < TARGET_TIMEOUT + margin,
        "the first write waited {:?}",
        latencies[0]
    );
    for (track, latency) in written.iter().zip(&latencies).skip(1) {
        assert!(
            *latency < TARGET_TIMEOUT,
            "the write to track {track} waited {latency:?} after the mirror was suspended"
        );
    }
    let suspended = mirror_show(&alpha, &certs);
    assert_eq!(suspended["state"], "suspended", "{suspended}");
    let reason = suspended["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("node beta") && reason.contains("did not answer"),
        "{suspended}"
    );
    assert_eq!(suspended["tracks_remaining"], written.len());
    let listed = json(&alpha, &certs, &["mirror", "list", "--json"]);
    assert_eq!(listed[0]["state"], "suspended", "{listed}");
    refused(
        &alpha,
        &certs,
        &["mirror", "split", "bcv"],
        "tandem mirror cancel",
    );

    // Beta returns: the mirror resyncs the tracks written meanwhile, no others, and is
    // synchronized again by itself.
    beta = nodes.start_beta();
    wait_until(60, "the mirror to resynchronize", || {
        mirror_show(&alpha, &certs)["state"] == "synchronized"
    });
    let resynced = mirror_show(&alpha, &certs);
    assert_eq!(resynced["tracks_total"], written.len(), "{resynced}");
    assert_eq!(resynced["tracks_copied"], written.len(), "{resynced}");
    assert_eq!(resynced["tracks_copied_last"], written.len(), "{resynced}");
    assert_eq!(resynced["error"], serde_json::Value::Null, "{resynced}");
    let split = json(&alpha, &certs, &["mirror", "split", "bcv", "--json"]);
    assert_eq!(split["state"], "split");
    assert!(
        read_all(&beta, "bcv") == read_all(&alpha, "std"),
        "the BCV is not the standard's image after the resync"
    );
    alpha.cli_ok(&certs, &["mirror", "cancel", "bcv"]);
}

#[test]
fn a_mirror_cancelled_while_the_bcvs_node_is_down_frees_its_slot_and_the_node_releases_the_bcv_when_it_returns(
) {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, mut beta) = synchronized_mirror(&nodes);
    let slots = |alpha: &NodeProcess| {
        json(alpha, &certs, &["volume", "show", "std", "--json"])["on_node"]["session_slots_used"]
            .clone()
    };
    assert_eq!(slots(&alpha), 1);
    beta.kill();
    timed_writes(&alpha, "std", &[5], 0xe2);
    assert_eq!(mirror_show(&alpha, &certs)["state"], "suspended");

    let started = Instant::now();
    alpha.cli_ok(&certs, &["mirror", "cancel", "bcv"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(
        slots(&alpha),
        0,
        "the cancelled mirror's slot is still taken"
    );
    assert_eq!(
        json(&alpha, &certs, &["mirror", "list", "--json"]),
        serde_json::json!([])
    );

    // Beta returns: it releases the BCV (it can be given readiness by hand again, which
    // a volume in a session refuses) and the BCV serves a new mirror.
    beta = nodes.start_beta();
    alpha.wait_registered(&certs, "beta");
    wait_until(30, "beta to release the BCV", || {
        alpha
            .cli(&certs, &["volume", "readiness", "bcv", "not-ready"])
            .status
            .success()
    });
    json(
        &alpha,
        &certs,
        &["mirror", "establish", "std", "bcv", "--json"],
    );
    wait_until(60, "the new mirror to synchronize", || {
        mirror_show(&alpha, &certs)["state"] == "synchronized"
    });
    alpha.cli_ok(&certs, &["mirror", "split", "bcv"]);
    assert!(
        read_all(&beta, "bcv") == read_all(&alpha, "std"),
        "the new mirror's BCV is not the standard's image"
    );
}
