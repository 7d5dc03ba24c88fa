//! Fault injection on every node-to-node call (issue 11, item 7): a rule that drops the
//! calls between a mirror's standard node and its BCV's node stops the copy as a
//! partition would, and the copy resumes once the rule is removed.

use crate::common::{free_port, init, wait_until, NodeProcess};
use crate::sessions::{fill, json, read_all, TRACKS};
use std::time::Duration;

#[test]
fn an_async_mirror_stops_while_a_fault_rule_partitions_its_bcv_node_and_resumes_after() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha,beta");
    let alpha_port = free_port();
    let alpha = NodeProcess::start_with(
        &certs,
        "alpha",
        &directory.path().join("alpha"),
        None,
        alpha_port,
        &["--control-plane", "--fault-injection"],
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
    for (volume, node) in [("std", "alpha"), ("bcv", "beta")] {
        alpha.cli_ok(
            &certs,
            &["volume", "create", volume, "--node", node, "--size", "8MiB"],
        );
    }
    fill(&alpha, "std", 3);
    json(
        &alpha,
        &certs,
        &[
            "mirror",
            "establish",
            "std",
            "bcv",
            "--mode",
            "async",
            "--json",
        ],
    );
    let show = || json(&alpha, &certs, &["mirror", "show", "bcv", "--json"]);
    wait_until(60, "the mirror to synchronize", || {
        show()["state"] == "synchronized"
    });

    // Alpha drops every call to and from beta: the copy's calls get no answer.
    alpha.cli_ok(&certs, &["debug", "fault", "--peer", "beta", "--drop"]);
    fill(&alpha, "std", 77);
    let remaining = show()["tracks_remaining"].as_u64().unwrap();
    assert!(remaining > 0, "the writes left nothing to copy");
    std::thread::sleep(Duration::from_secs(3));
    let later = show();
    assert_eq!(
        later["tracks_remaining"].as_u64().unwrap(),
        remaining,
        "tracks reached the BCV through the partition: {later}"
    );

    // The partition heals: the copy moves on by itself and the BCV catches up.
    alpha.cli_ok(&certs, &["debug", "fault", "--peer", "beta"]);
    wait_until(60, "the copy to resume after the partition", || {
        let shown = show();
        shown["tracks_remaining"] == 0 && shown["state"] == "synchronized"
    });
    alpha.wait_registered(&certs, "beta");
    let split = json(&alpha, &certs, &["mirror", "split", "bcv", "--json"]);
    assert_eq!(split["state"], "split");
    assert_eq!(read_all(&beta, "bcv"), read_all(&alpha, "std"));
    assert_eq!(
        read_all(&alpha, "std").len() as u64,
        TRACKS * crate::sessions::TRACK_BYTES
    );
}
