//! A refused command changes nothing, anywhere: a table of refused commands runs through
//! the CLI against two node processes (a member and a plain node) that hold mirrors and
//! clones in every resting state, and after each one the cluster's listings are what they
//! were and every volume's readiness is the same in the catalog and on its node.

use crate::common::{free_port, init, NodeProcess};
use std::path::Path;

/// One refused command: its arguments and a fragment its error must contain.
struct Refused {
    arguments: &'static [&'static str],
    message: &'static str,
}

const fn refused(arguments: &'static [&'static str], message: &'static str) -> Refused {
    Refused { arguments, message }
}

/// Volume, snapshot, clone, mirror and cluster commands that must be refused. The state
/// they meet: `std1` (alpha) mirrored synchronously to `bcv1` (beta); `std2` (alpha) with
/// a split BCV `bcv2` (alpha); `src` (alpha) cloned to `cdst` (beta), created, not
/// activated; `busy` (alpha) holding all 16 session slots with clones; `plain` (alpha) and
/// its snapshot `plain-snap`; `small` (alpha), half the others' size; `spare` (alpha).
const REFUSED: &[Refused] = &[
    // Bad sizes, names and placements.
    refused(
        &["volume", "create", "x", "--node", "alpha", "--size", "0"],
        "size",
    ),
    refused(
        &[
            "volume", "create", "x", "--node", "alpha", "--size", "100KiB",
        ],
        "multiple",
    ),
    refused(
        &[
            "volume",
            "create",
            "x",
            "--node",
            "alpha",
            "--size",
            "1MiB",
            "--track-size",
            "3KiB",
        ],
        "track",
    ),
    refused(
        &[
            "volume",
            "create",
            "x",
            "--node",
            "alpha",
            "--size",
            "1MiB",
            "--track-size",
            "8GiB",
        ],
        "track size",
    ),
    refused(
        &["volume", "create", "x", "--node", "alpha", "--size", "lots"],
        "size",
    ),
    refused(
        &[
            "volume", "create", "bad name", "--node", "alpha", "--size", "1MiB",
        ],
        "volume name",
    ),
    refused(
        &[
            "volume", "create", "a/b", "--node", "alpha", "--size", "1MiB",
        ],
        "volume name",
    ),
    refused(
        &[
            "volume", "create", "std1", "--node", "alpha", "--size", "1MiB",
        ],
        "already exists",
    ),
    refused(
        &[
            "volume", "create", "x", "--node", "nosuch", "--size", "1MiB",
        ],
        "nosuch",
    ),
    refused(
        &[
            "volume", "create", "x", "--node", "alpha", "--size", "100TiB",
        ],
        "does not fit",
    ),
    refused(
        &[
            "volume", "create", "x", "--node", "alpha", "--size", "1000TiB",
        ],
        "exceeds the limit",
    ),
    // Volumes that do not exist, or that a session holds.
    refused(&["volume", "show", "nosuch"], "does not exist"),
    refused(&["volume", "delete", "nosuch"], "does not exist"),
    refused(&["volume", "delete", "std1"], "session"),
    refused(&["volume", "delete", "bcv1"], "session"),
    refused(&["volume", "delete", "cdst"], "session"),
    refused(&["volume", "delete", "busy"], "session"),
    refused(
        &["volume", "readiness", "nosuch", "ready"],
        "does not exist",
    ),
    refused(
        &["volume", "readiness", "plain", "sideways"],
        "invalid value",
    ),
    // Readiness in a session: the node refuses it, so the catalog must too.
    refused(
        &["volume", "readiness", "std1", "read-only"],
        "follows the mirror session",
    ),
    refused(
        &["volume", "readiness", "bcv1", "ready"],
        "mirror split bcv1",
    ),
    refused(
        &["volume", "readiness", "bcv2", "read-only"],
        "follows the mirror session",
    ),
    refused(
        &["volume", "readiness", "cdst", "ready"],
        "clone activate cdst",
    ),
    refused(
        &["volume", "readiness", "src", "not-ready"],
        "follows the clone session",
    ),
    // Snapshots.
    refused(&["snap", "nosuch", "x"], "does not exist"),
    refused(
        &["snap", "plain", "x", "--extent", "0-99999"],
        "does not fit",
    ),
    refused(&["snap", "plain", "x", "--extent", "9-2"], "extent"),
    refused(&["snap", "plain", "bcv1"], "one node"),
    refused(&["snap", "plain", "std1"], "session"),
    // A snap onto a volume that is not the source's snapshot needs --overwrite.
    refused(&["snap", "plain", "spare"], "--overwrite"),
    refused(&["snap", "std2", "plain-snap"], "--overwrite"),
    // Clones.
    refused(&["clone", "create", "nosuch", "x"], "does not exist"),
    refused(&["clone", "create", "src", "nosuch"], "does not exist"),
    refused(&["clone", "create", "plain", "plain"], "same volume"),
    refused(&["clone", "create", "src", "bcv1"], "bcv1"),
    refused(&["clone", "create", "plain", "cdst"], "cdst"),
    refused(&["clone", "create", "plain", "small"], "does not fit"),
    refused(&["clone", "create", "busy", "spare"], "slot"),
    refused(
        &["clone", "create", "plain", "spare", "--extent", "0-99999"],
        "extent",
    ),
    refused(&["clone", "activate", "nosuch"], "no clone session"),
    refused(&["clone", "terminate", "cdst"], "terminate"),
    refused(&["clone", "precopy", "bcv1"], "no clone session"),
    refused(&["clone", "rate", "cdst", "--rate", "0"], "rate"),
    refused(&["clone", "rate", "nosuch", "--rate", "5"], "no session"),
    // Mirrors.
    refused(&["mirror", "establish", "std1", "bcv1"], "establish"),
    refused(&["mirror", "establish", "std2", "bcv1"], "bcv1"),
    refused(&["mirror", "establish", "plain", "cdst"], "cdst"),
    refused(&["mirror", "establish", "plain", "plain"], "same volume"),
    refused(&["mirror", "establish", "plain", "small"], "fewer"),
    refused(
        &[
            "mirror",
            "establish",
            "plain",
            "spare",
            "--mode",
            "sometimes",
        ],
        "invalid value",
    ),
    refused(&["mirror", "split", "bcv2"], "split"),
    refused(&["mirror", "split", "nosuch"], "no mirror session"),
    refused(&["mirror", "reestablish", "bcv1"], "reestablish"),
    refused(&["mirror", "restore", "bcv1"], "restore"),
    refused(&["mirror", "cancel", "cdst"], "no mirror session"),
    refused(&["mirror", "rotate", "plain"], "plain"),
    refused(
        &["mirror", "rate", "bcv1", "--rate", "5", "--default"],
        "cannot be used with",
    ),
    refused(&["clone", "cancel", "bcv1"], "no clone session"),
    refused(&["clone", "cancel", "nosuch"], "no clone session"),
    // The control plane.
    refused(&["cluster", "remove-member", "beta"], "beta"),
    refused(&["cluster", "add-member", "nosuch"], "nosuch"),
    // gsnap: unknown volumes, one volume twice, extents that do not pair or fit, volumes
    // in sessions or on the wrong node, a job that does not exist.
    refused(&["gsnap", "ghost", "ghost-mid", "plain"], "ghost"),
    refused(&["gsnap", "plain", "plain-mid", "ghost"], "ghost"),
    refused(&["gsnap", "plain", "plain", "spare"], "different volumes"),
    refused(
        &[
            "gsnap",
            "plain",
            "plain-mid",
            "spare",
            "--target-intermediate",
            "plain-mid",
        ],
        "different volumes",
    ),
    refused(
        &["gsnap", "plain:0-9", "plain-mid", "spare:0-8"],
        "same number",
    ),
    refused(
        &["gsnap", "plain:0-9", "plain-mid", "small:10-19"],
        "does not fit",
    ),
    refused(&["gsnap", "plain", "plain-mid", "small"], "smaller"),
    refused(&["gsnap", "plain:9-0", "plain-mid", "spare"], "backwards"),
    refused(
        &["gsnap", "plain:0-9,5-12", "plain-mid", "spare:0-17"],
        "increasing",
    ),
    refused(&["gsnap", "plain", "plain-mid", "cdst"], "takes part in"),
    refused(&["gsnap", "plain", "std2", "spare"], "takes part in"),
    refused(&["gsnap", "std1", "std1-mid", "spare"], "takes part in"),
    refused(&["gsnap", "plain", "bcv1", "spare"], "the job needs it on"),
    refused(&["gsnap", "cancel", "99"], "no gsnap job 99"),
    refused(&["gsnap", "forget", "plain", "spare"], "no lineage"),
];

/// What must not change: the listings an admin and scripts read. The log position is left
/// out: a command the catalog refuses is still remembered under its request id (so a
/// retry gets the same refusal), which takes a log entry but changes no record.
fn observed(node: &NodeProcess, certs: &Path) -> serde_json::Value {
    let json = |arguments: &[&str]| -> serde_json::Value {
        let text = node.cli_ok(certs, arguments);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{arguments:?}: {error}: {text}"))
    };
    let mut status = json(&["status", "--json"]);
    for volatile in ["last_log_index", "commit_index", "applied_index"] {
        status["cluster"][volatile] = serde_json::Value::Null;
    }
    if let Some(members) = status["cluster"]["members"].as_array_mut() {
        for member in members {
            member["lag_entries"] = serde_json::Value::Null;
        }
    }
    // A session's rate and ETA are measurements of its copy over time, not its state.
    let sessions = |arguments: &[&str]| {
        let mut list = json(arguments);
        for session in list.as_array_mut().unwrap() {
            session["rate_bytes_per_second"] = serde_json::Value::Null;
            session["eta_seconds"] = serde_json::Value::Null;
        }
        list
    };
    serde_json::json!({
        "status": status,
        "volumes": json(&["volume", "list", "--json"]),
        "mirrors": sessions(&["mirror", "list", "--json"]),
        "clones": sessions(&["clone", "list", "--json"]),
        "gsnaps": json(&["gsnap", "list", "--json"]),
    })
}

/// Every volume's readiness as the catalog records it and as its node applies it.
fn readiness_disagreements(node: &NodeProcess, certs: &Path) -> Vec<String> {
    let volumes: serde_json::Value =
        serde_json::from_str(&node.cli_ok(certs, &["volume", "list", "--json"])).unwrap();
    let mut disagreements = Vec::new();
    for volume in volumes.as_array().unwrap() {
        let name = volume["name"].as_str().unwrap();
        let shown: serde_json::Value =
            serde_json::from_str(&node.cli_ok(certs, &["volume", "show", name, "--json"])).unwrap();
        if shown["readiness"] != shown["on_node"]["readiness"] {
            disagreements.push(format!(
                "{name}: catalog {} node {}",
                shown["readiness"], shown["on_node"]["readiness"]
            ));
        }
    }
    disagreements
}

#[test]
fn every_refused_command_changes_nothing_in_the_catalog_or_on_the_nodes() {
    assert!(REFUSED.len() >= 40, "the table has {} rows", REFUSED.len());
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha,beta");
    let alpha_port = free_port();
    let alpha = NodeProcess::start_with(
        &certs,
        "alpha",
        &directory.path().join("alpha"),
        None,
        alpha_port,
        &["--control-plane"],
    );
    alpha.cli_ok(&certs, &["cluster", "init"]);
    alpha.wait_registered(&certs, "alpha");
    let members = format!("127.0.0.1:{alpha_port}");
    let beta = NodeProcess::start_with(
        &certs,
        "beta",
        &directory.path().join("beta"),
        None,
        0,
        &["--members", &members],
    );
    alpha.wait_registered(&certs, "beta");

    let create = |name: &str, node: &str, size: &str| {
        alpha.cli_ok(
            &certs,
            &["volume", "create", name, "--node", node, "--size", size],
        );
    };
    for (name, node) in [
        ("std1", "alpha"),
        ("bcv1", "beta"),
        ("std2", "alpha"),
        ("bcv2", "alpha"),
        ("src", "alpha"),
        ("cdst", "beta"),
        ("busy", "alpha"),
        ("plain", "alpha"),
        ("spare", "alpha"),
    ] {
        create(name, node, "2MiB");
    }
    create("small", "alpha", "1MiB");
    alpha.cli_ok(&certs, &["mirror", "establish", "std1", "bcv1", "--wait"]);
    alpha.cli_ok(&certs, &["mirror", "establish", "std2", "bcv2", "--wait"]);
    alpha.cli_ok(&certs, &["mirror", "split", "bcv2"]);
    alpha.cli_ok(&certs, &["clone", "create", "src", "cdst"]);
    for slot in 0..16 {
        let destination = format!("busy-{slot}");
        create(&destination, "alpha", "2MiB");
        alpha.cli_ok(&certs, &["clone", "create", "busy", &destination]);
    }
    alpha.cli_ok(&certs, &["snap", "plain", "plain-snap"]);

    let before = observed(&alpha, &certs);
    assert_eq!(
        readiness_disagreements(&alpha, &certs),
        Vec::<String>::new(),
        "catalog and nodes disagree before any refusal"
    );
    let mut failures = Vec::new();
    for row in REFUSED {
        let output = alpha.cli_env(&certs, row.arguments, "TANDEM_RETRY_SECONDS", "0");
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            failures.push(format!(
                "{:?} was not refused: {}",
                row.arguments,
                String::from_utf8_lossy(&output.stdout)
            ));
        } else if !stderr.contains(row.message) {
            failures.push(format!(
                "{:?}: the refusal does not mention {:?}: {stderr}",
                row.arguments, row.message
            ));
        }
        let after = observed(&alpha, &certs);
        if after != before {
            failures.push(format!(
                "{:?} changed the cluster:\nbefore {before}\nafter  {after}",
                row.arguments
            ));
        }
        let disagreements = readiness_disagreements(&alpha, &certs);
        if !disagreements.is_empty() {
            failures.push(format!(
                "after {:?} catalog and nodes disagree: {disagreements:?}",
                row.arguments
            ));
        }
    }
    drop(beta);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_cancel_at_once_after_a_rotate_leaves_catalog_and_node_agreeing_on_the_bcv() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha");
    let alpha =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);
    for round in 0..3 {
        let bcv = format!("bcv-{round}");
        let standard = format!("std-{round}");
        for name in [&standard, &bcv] {
            alpha.cli_ok(
                &certs,
                &[
                    "volume", "create", name, "--node", "alpha", "--size", "4MiB",
                ],
            );
        }
        alpha.cli_ok(&certs, &["mirror", "establish", &standard, &bcv, "--wait"]);
        alpha.cli_ok(&certs, &["mirror", "split", &bcv]);
        // The rotation's copy is small and finishes (and splits) a moment after the
        // command answers, while the catalog still records the mirror as syncing.
        alpha.cli_ok(&certs, &["mirror", "rotate", &standard]);
        alpha.cli_ok(&certs, &["mirror", "cancel", &bcv]);
        assert_eq!(
            readiness_disagreements(&alpha, &certs),
            Vec::<String>::new(),
            "round {round}"
        );
    }
}
