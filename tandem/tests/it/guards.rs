//! Guards on destructive commands, through the CLI against node processes (issue 10,
//! item 2): a delete of a volume hosts have open, a snap onto a volume that is not the
//! source's snapshot, and the cancel of a clone that was never activated. Each refusal
//! is checked to change nothing.

use crate::common::{wait_until, NodeProcess};
use crate::sessions::{fill, json, read_all, refused, TwoNodes, TRACKS, TRACK_BYTES};
use node::nbd_client::NbdClient;
use std::path::Path;

fn volume_list(node: &NodeProcess, certs: &Path) -> serde_json::Value {
    json(node, certs, &["volume", "list", "--json"])
}

/// The session slots the volume's node says are in use.
fn slots_used(node: &NodeProcess, certs: &Path, volume: &str) -> u64 {
    let shown = json(node, certs, &["volume", "show", volume, "--json"]);
    shown["on_node"]["session_slots_used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no slot count for {volume}: {shown}"))
}

/// The readiness of a volume in the catalog and on its node.
fn readiness(node: &NodeProcess, certs: &Path, volume: &str) -> (String, String) {
    let shown = json(node, certs, &["volume", "show", volume, "--json"]);
    (
        shown["readiness"].as_str().unwrap().to_string(),
        shown["on_node"]["readiness"].as_str().unwrap().to_string(),
    )
}

#[test]
fn a_delete_of_an_open_volume_is_refused_and_changes_nothing_and_force_closes_the_connections() {
    let directory = tempfile::tempdir().unwrap();
    let certs = crate::common::init(directory.path(), "alpha");
    let node =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);
    node.cli_ok(&certs, &["volume", "create", "vol", "--size", "8MiB"]);
    node.cli_ok(&certs, &["volume", "create", "idle", "--size", "8MiB"]);
    fill(&node, "vol", 5);
    let image = read_all(&node, "vol");

    // Two hosts keep the export open.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut first = runtime
        .block_on(NbdClient::connect(node.nbd, "vol"))
        .unwrap();
    let second = runtime
        .block_on(NbdClient::connect(node.nbd, "vol"))
        .unwrap();
    let before = volume_list(&node, &certs);
    let output = node.cli(&certs, &["volume", "delete", "vol"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the delete went through");
    assert!(
        stderr.contains("volume 'vol' is open by 2 NBD connections (127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(
        volume_list(&node, &certs),
        before,
        "the refusal changed the catalog"
    );
    // The hosts carry on: their connections still read the volume.
    let track = runtime
        .block_on(first.read(3 * TRACK_BYTES, TRACK_BYTES as u32))
        .unwrap()
        .unwrap();
    assert_eq!(
        track,
        image[(3 * TRACK_BYTES) as usize..(4 * TRACK_BYTES) as usize]
    );
    assert_eq!(read_all(&node, "vol"), image);

    // One host goes: the message counts the one left.
    runtime.block_on(second.disconnect()).unwrap();
    wait_until(10, "the node to see the host go", || {
        let output = node.cli(&certs, &["volume", "delete", "vol"]);
        String::from_utf8_lossy(&output.stderr).contains("is open by 1 NBD connection (")
    });
    assert_eq!(volume_list(&node, &certs), before);

    // A volume no host has open is deleted as before, without --force.
    node.cli_ok(&certs, &["volume", "delete", "idle"]);

    // --force closes the connection cleanly (no EIO reply: the connection is gone), then
    // deletes.
    node.cli_ok(&certs, &["volume", "delete", "vol", "--force"]);
    let list = volume_list(&node, &certs);
    assert_eq!(list, serde_json::json!([]), "{list}");
    let after = runtime.block_on(first.read(0, TRACK_BYTES as u32));
    assert!(
        after.is_err(),
        "the host's connection is still open after a forced delete: {:?}",
        after.map(|reply| reply.map(|data| data.len()))
    );
}

#[test]
fn a_snap_onto_a_volume_that_is_not_the_sources_snapshot_is_refused_unless_overwritten() {
    let directory = tempfile::tempdir().unwrap();
    let certs = crate::common::init(directory.path(), "alpha");
    let node =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);
    for volume in ["src", "other"] {
        node.cli_ok(&certs, &["volume", "create", volume, "--size", "8MiB"]);
    }
    fill(&node, "src", 1);
    fill(&node, "other", 2);
    let other_image = read_all(&node, "other");
    let before = volume_list(&node, &certs);

    let output = node.cli(&certs, &["snap", "src", "other"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the snap went through");
    assert!(stderr.contains("'other' already exists"), "{stderr}");
    assert!(stderr.contains("not a snapshot"), "{stderr}");
    assert!(stderr.contains("pass --overwrite"), "{stderr}");
    assert_eq!(
        read_all(&node, "other"),
        other_image,
        "the refusal changed the data"
    );
    assert_eq!(volume_list(&node, &certs), before);

    // A snap creates its target; a later snap of the same source refreshes it.
    node.cli_ok(&certs, &["snap", "src", "copy"]);
    fill(&node, "src", 40);
    node.cli_ok(&certs, &["snap", "src", "copy"]);
    assert_eq!(read_all(&node, "copy"), read_all(&node, "src"));
    // Another source may not take it over silently.
    let copy_image = read_all(&node, "copy");
    refused(
        &node,
        &certs,
        &["snap", "other", "copy"],
        "a snapshot of 'src'",
    );
    assert_eq!(read_all(&node, "copy"), copy_image);

    // --overwrite replaces the data; the target is then the source's snapshot.
    let snapped = json(
        &node,
        &certs,
        &["snap", "src", "other", "--overwrite", "--json"],
    );
    assert_eq!(snapped["target"], "other");
    assert_eq!(read_all(&node, "other"), read_all(&node, "src"));
    node.cli_ok(&certs, &["snap", "src", "other"]);
}

#[test]
fn a_clone_that_was_never_activated_is_cancelled_and_its_destination_stays_not_ready() {
    let directory = tempfile::tempdir().unwrap();
    let certs = crate::common::init(directory.path(), "alpha");
    let node =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);
    for volume in ["src", "dst"] {
        node.cli_ok(&certs, &["volume", "create", volume, "--size", "8MiB"]);
    }
    fill(&node, "src", 3);

    // A precopying clone, cancelled with --json.
    let created = json(
        &node,
        &certs,
        &["clone", "create", "src", "dst", "--precopy", "--json"],
    );
    assert_eq!(created["state"], "precopying");
    assert_eq!(slots_used(&node, &certs, "src"), 2);
    let cancelled = json(&node, &certs, &["clone", "cancel", "dst", "--json"]);
    assert_eq!(cancelled["ended"], true, "{cancelled}");
    assert_eq!(cancelled["source"], "src", "{cancelled}");
    assert_eq!(cancelled["target_readiness"], "not-ready", "{cancelled}");
    assert_eq!(
        json(&node, &certs, &["clone", "list", "--json"]),
        serde_json::json!([])
    );
    assert_eq!(slots_used(&node, &certs, "src"), 0);
    assert_eq!(
        readiness(&node, &certs, "dst"),
        ("not-ready".to_string(), "not-ready".to_string())
    );
    assert!(
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(NbdClient::connect(node.nbd, "dst"))
            .is_err(),
        "a not-ready destination is no export"
    );
    refused(
        &node,
        &certs,
        &["clone", "cancel", "dst"],
        "no clone session",
    );

    // The destination takes a new clone; cancelled while created, in words.
    let again = json(&node, &certs, &["clone", "create", "src", "dst", "--json"]);
    assert_eq!(again["state"], "created");
    let said = node.cli_ok(&certs, &["clone", "cancel", "dst"]);
    assert!(said.contains("partial contents"), "{said}");
    assert!(said.contains("stays not-ready"), "{said}");
    assert!(said.contains("'src'"), "{said}");
    assert_eq!(slots_used(&node, &certs, "src"), 0);
    assert_eq!(
        json(&node, &certs, &["clone", "list", "--json"]),
        serde_json::json!([])
    );

    // Once activated, a clone cannot be cancelled: the refusal changes nothing, and
    // terminate ends it after the copy.
    json(
        &node,
        &certs,
        &["clone", "create", "src", "dst", "--rate", "1", "--json"],
    );
    json(&node, &certs, &["clone", "activate", "dst", "--json"]);
    let list_before = json(&node, &certs, &["clone", "list", "--json"]);
    assert_eq!(list_before[0]["state"], "active", "{list_before}");
    refused(
        &node,
        &certs,
        &["clone", "cancel", "dst"],
        "already the point-in-time image",
    );
    let list_after = json(&node, &certs, &["clone", "list", "--json"]);
    assert_eq!(list_after[0]["state"], "active", "{list_after}");
    assert_eq!(list_after[0]["slots"], list_before[0]["slots"]);
    assert_eq!(slots_used(&node, &certs, "src"), 1);
    json(
        &node,
        &certs,
        &["clone", "rate", "dst", "--rate", "1000", "--json"],
    );
    wait_until(60, "the clone to copy", || {
        json(&node, &certs, &["clone", "show", "dst", "--json"])["state"] == "copied"
    });
    let copied = json(&node, &certs, &["clone", "show", "dst", "--json"]);
    assert_eq!(copied["state"], "copied");
    refused(
        &node,
        &certs,
        &["clone", "cancel", "dst"],
        "clone terminate",
    );
    node.cli_ok(&certs, &["clone", "terminate", "dst"]);
    assert_eq!(read_all(&node, "dst"), read_all(&node, "src"));
}

#[test]
fn a_clone_into_another_node_is_cancelled_there_too() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("src", "alpha"), ("dst", "beta")]);
    fill(&alpha, "src", 11);

    let created = json(
        &alpha,
        &certs,
        &["clone", "create", "src", "dst", "--precopy", "--json"],
    );
    assert_eq!(created["state"], "precopying");
    let cancelled = json(&alpha, &certs, &["clone", "cancel", "dst", "--json"]);
    assert_eq!(cancelled["ended"], true, "{cancelled}");
    assert_eq!(
        json(&alpha, &certs, &["clone", "list", "--json"]),
        serde_json::json!([])
    );
    assert_eq!(slots_used(&alpha, &certs, "src"), 0);
    assert_eq!(
        readiness(&beta, &certs, "dst"),
        ("not-ready".to_string(), "not-ready".to_string())
    );
    // Beta released the destination: a new clone takes it, and copies the whole image.
    json(&alpha, &certs, &["clone", "create", "src", "dst", "--json"]);
    let activated = json(
        &alpha,
        &certs,
        &["clone", "activate", "dst", "--wait", "--json"],
    );
    assert_eq!(activated["state"], "copied", "{activated}");
    assert_eq!(activated["tracks_copied"], TRACKS);
    assert_eq!(read_all(&beta, "dst"), read_all(&alpha, "src"));
    alpha.cli_ok(&certs, &["clone", "terminate", "dst"]);
}
