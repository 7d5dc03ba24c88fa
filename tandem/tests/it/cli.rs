//! The CLI contract of issue 2, end to end against a real node process.

use crate::common::{free_port, init, tandem, NodeProcess};
use std::io::{Read, Write};

#[test]
fn init_writes_certificates_and_configs_and_refuses_bad_names() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha,beta");
    for file in [
        "ca.pem",
        "ca.key",
        "alpha.pem",
        "alpha.key",
        "beta.pem",
        "admin.pem",
        "admin.key",
        "alpha.toml",
        "beta.toml",
    ] {
        assert!(certs.join(file).exists(), "{file} missing");
    }
    let config = std::fs::read_to_string(certs.join("beta.toml")).unwrap();
    assert!(
        config.contains("name = \"beta\"") && config.contains("nbd = "),
        "{config}"
    );
    // Running it again must not overwrite the CA.
    let again = tandem()
        .args(["init", "--dir", certs.to_str().unwrap(), "--nodes", "alpha"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let bad = tempfile::tempdir().unwrap();
    for nodes in ["admin", "a,a", "bad name"] {
        let output = tandem()
            .args([
                "init",
                "--dir",
                bad.path().join("x").to_str().unwrap(),
                "--nodes",
                nodes,
            ])
            .output()
            .unwrap();
        assert!(!output.status.success(), "init accepted nodes {nodes:?}");
    }
}

#[test]
fn volume_commands_snap_and_metrics_through_a_node_process() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha");
    let metrics_port = free_port();
    let node = NodeProcess::start_cluster_of_one(
        &certs,
        "alpha",
        &directory.path().join("data"),
        Some(metrics_port),
    );

    node.cli_ok(&certs, &["volume", "create", "vol1", "--size", "64MiB"]);
    node.cli_ok(
        &certs,
        &[
            "volume",
            "create",
            "vol2",
            "--size",
            "1GiB",
            "--track-size",
            "256KiB",
        ],
    );
    let list: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&certs, &["volume", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["name"], "vol1");
    assert_eq!(list[0]["size_bytes"], 64 << 20);
    assert_eq!(list[0]["track_size_bytes"], 64 << 10);
    assert_eq!(list[0]["node"], "alpha");
    assert_eq!(list[0]["state"], "ready");
    assert_eq!(list[1]["track_size_bytes"], 256 << 10);
    let show: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&certs, &["volume", "show", "vol1", "--json"])).unwrap();
    assert_eq!(show["readiness"], "ready");

    // Bad input: a clear error, a failing exit status, and nothing changed.
    for (arguments, message) in [
        (
            vec!["volume", "create", "vol1", "--size", "64MiB"],
            "already exists",
        ),
        (
            vec!["volume", "create", "vol3", "--size", "4GB"],
            "not understood",
        ),
        (
            vec!["volume", "create", "vol3", "--size", "100000"],
            "multiple of the track size",
        ),
        (
            vec![
                "volume",
                "create",
                "vol3",
                "--size",
                "1GiB",
                "--track-size",
                "3KiB",
            ],
            "power of two",
        ),
        (vec!["volume", "show", "nothing"], "does not exist"),
        (vec!["snap", "vol1", "vol2"], "sizes differ"),
        (
            vec!["snap", "vol1", "snap1", "--extent", "5-2000"],
            "does not fit volume",
        ),
        (
            vec!["snap", "vol1", "snap1", "--extent", "9-3"],
            "backwards",
        ),
    ] {
        let output = node.cli(&certs, &arguments);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{arguments:?} succeeded");
        assert!(stderr.contains(message), "{arguments:?}: {stderr}");
    }
    let after: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&certs, &["volume", "list", "--json"])).unwrap();
    assert_eq!(after, list);

    let snapped: serde_json::Value = serde_json::from_str(&node.cli_ok(
        &certs,
        &[
            "snap", "vol1", "snap1", "--extent", "0-9", "--extent", "20-29", "--json",
        ],
    ))
    .unwrap();
    assert_eq!(snapped["target"], "snap1");
    assert_eq!(snapped["extents"], serde_json::json!(["0-9", "20-29"]));
    node.cli_ok(&certs, &["volume", "readiness", "snap1", "read-only"]);
    let show: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&certs, &["volume", "show", "snap1", "--json"])).unwrap();
    assert_eq!(show["readiness"], "read-only");
    node.cli_ok(&certs, &["volume", "delete", "snap1"]);
    let status: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&certs, &["status", "--json"])).unwrap();
    assert_eq!(status["volumes"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(status["cluster"]["leader"], "alpha", "{status}");
    assert_eq!(status["sites"]["site-a"][0]["health"], "up", "{status}");

    // Some IO, then the Prometheus text shows it.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, "vol1")
            .await
            .unwrap();
        client.write(0, &[1u8; 4096], false).await.unwrap().unwrap();
        client.read(0, 4096).await.unwrap().unwrap();
        client.disconnect().await.unwrap();
    });
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(
        body.contains("tandem_nbd_operations_total{operation=\"write\",volume=\"vol1\"}"),
        "{body}"
    );
    assert!(body.contains("tandem_nbd_seconds"), "{body}");
}

#[test]
fn a_cli_with_a_certificate_from_another_ca_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha");
    let stranger = tempfile::tempdir().unwrap();
    let foreign_certs = init(stranger.path(), "alpha");
    let node =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);
    let output = node.cli(
        &foreign_certs,
        &["volume", "create", "intruder", "--size", "1MiB"],
    );
    assert!(
        !output.status.success(),
        "a foreign certificate was accepted"
    );
    let list = node.cli_ok(&certs, &["volume", "list", "--json"]);
    assert_eq!(list.trim(), "[]", "the refused request changed something");
}
