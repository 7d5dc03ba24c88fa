//! What a Prometheus user and a log collector see of a node process: a `# HELP` for every
//! metric, latencies as histograms, counters present at 0, NBD operations by volume, a
//! gauge set per copy session, the error counter by code, the member's Raft gauges, the
//! Grafana dashboard's metrics, and logs without colour escapes or as JSON lines.

use crate::common::{init, tandem, tandem_path, wait_until, NodeProcess};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;

const MEBIBYTE: f64 = 1_048_576.0;

/// The Prometheus text of a node.
pub fn scrape(node: &NodeProcess) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", node.metrics)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// The value of the one series whose line starts with `series` (name and labels, as
/// printed), if the node exports it.
pub fn series(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

/// The names of the metrics a `# KIND` comment line (`# TYPE`, `# HELP`) names.
fn commented(body: &str, kind: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix(kind)?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn qemu_io(node: &NodeProcess, volume: &str, commands: &[&str]) {
    let uri = format!("nbd://{}/{volume}", node.nbd);
    let mut arguments = vec!["-f", "raw", &uri];
    for command in commands {
        arguments.extend(["-c", command]);
    }
    let output = std::process::Command::new("qemu-io")
        .args(&arguments)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "qemu-io {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn json(node: &NodeProcess, certs: &Path, arguments: &[&str]) -> serde_json::Value {
    let text = node.cli_ok(certs, arguments);
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{arguments:?}: {error}: {text}"))
}

#[test]
fn a_node_exports_described_histograms_zero_counters_session_gauges_and_raft_state() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "alpha");
    let node =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);

    // Before any IO: the counters are there at 0, and the member reports itself leader.
    let alpha_up = "tandem_node_up{node=\"alpha\",site=\"site-a\"}";
    wait_until(10, "the member's gauges", || {
        let body = scrape(&node);
        series(&body, "tandem_raft_is_leader") == Some(1.0) && series(&body, alpha_up).is_some()
    });
    let body = scrape(&node);
    for counter in [
        "tandem_copy_tracks_total",
        "tandem_copy_bytes_total",
        "tandem_checksum_errors_total",
        "tandem_copy_checksum_errors_total",
        "tandem_quic_refused_total",
        "tandem_raft_refused_total",
        "tandem_errors_total{code=\"limit-exceeded\"}",
    ] {
        assert_eq!(series(&body, counter), Some(0.0), "{counter}: {body}");
    }
    assert!(
        series(&body, "tandem_raft_term").is_some_and(|term| term >= 1.0),
        "{body}"
    );
    assert!(
        series(&body, "tandem_raft_commit_index").is_some(),
        "{body}"
    );
    assert_eq!(series(&body, alpha_up), Some(1.0), "{body}");
    assert_eq!(series(&body, "tandem_nbd_connections"), Some(0.0), "{body}");

    // Host IO through qemu-io: NBD operations are counted by volume, latencies bucketed.
    for volume in ["src", "dst", "bcv"] {
        node.cli_ok(&certs, &["volume", "create", volume, "--size", "8MiB"]);
    }
    qemu_io(&node, "src", &["write -P 0x5a 0 1M", "read -P 0x5a 0 64k"]);
    let body = scrape(&node);
    assert!(
        series(
            &body,
            "tandem_nbd_operations_total{operation=\"write\",volume=\"src\"}"
        )
        .is_some_and(|count| count >= 1.0),
        "{body}"
    );
    assert_eq!(
        series(
            &body,
            "tandem_nbd_bytes_total{operation=\"read\",volume=\"src\"}"
        ),
        Some(65_536.0),
        "{body}"
    );
    assert_eq!(
        series(
            &body,
            "tandem_nbd_errors_total{operation=\"write\",volume=\"src\"}"
        ),
        Some(0.0),
        "the error counters of a volume in use exist at 0: {body}"
    );
    assert!(
        body.contains("tandem_nbd_seconds_bucket{operation=\"write\",le=\"0.001\"}"),
        "{body}"
    );
    assert!(
        body.contains("tandem_nbd_seconds_bucket{operation=\"write\",le=\"+Inf\"}"),
        "{body}"
    );
    assert!(body.contains("tandem_requests_seconds_bucket{"), "{body}");
    assert!(!body.contains("quantile="), "a summary is left: {body}");

    // A clone at rest and an async mirror copying at 1 MiB/s: each session's gauges.
    let clone = json(&node, &certs, &["clone", "create", "src", "dst", "--json"]);
    let tracks = clone["tracks_remaining"].as_f64().unwrap();
    assert!(tracks > 0.0, "{clone}");
    node.cli_ok(
        &certs,
        &[
            "mirror",
            "establish",
            "src",
            "bcv",
            "--mode",
            "async",
            "--rate",
            "1",
        ],
    );
    let clone_labels = "{kind=\"clone\",source=\"src\",target=\"dst\"}";
    let mirror_labels = "{kind=\"mirror\",source=\"src\",target=\"bcv\"}";
    wait_until(10, "the sessions' gauges", || {
        let body = scrape(&node);
        series(&body, &format!("tandem_session_tracks_total{clone_labels}")).is_some()
            && series(
                &body,
                &format!("tandem_session_tracks_total{mirror_labels}"),
            )
            .is_some()
    });
    let body = scrape(&node);
    assert_eq!(
        series(&body, &format!("tandem_session_tracks_total{clone_labels}")),
        Some(tracks),
        "{body}"
    );
    assert_eq!(
        series(
            &body,
            &format!("tandem_session_tracks_remaining{clone_labels}")
        ),
        Some(tracks),
        "{body}"
    );
    assert_eq!(
        series(&body, &format!("tandem_session_copied_bytes{clone_labels}")),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        series(
            &body,
            "tandem_session_state{kind=\"clone\",source=\"src\",target=\"dst\",state=\"created\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        series(
            &body,
            "tandem_session_state{kind=\"clone\",source=\"src\",target=\"dst\",state=\"copied\"}"
        ),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        series(
            &body,
            &format!("tandem_session_tracks_total{mirror_labels}")
        ),
        Some(tracks),
        "{body}"
    );
    assert!(
        series(&body, &format!("tandem_session_lag_tracks{mirror_labels}")).is_some(),
        "{body}"
    );
    assert!(
        series(&body, &format!("tandem_session_lag_seconds{mirror_labels}")).is_some(),
        "{body}"
    );
    assert!(
        series(&body, &format!("tandem_session_lag_tracks{clone_labels}")).is_none(),
        "a clone has no lag: {body}"
    );
    assert_eq!(series(&body, "tandem_sessions{kind=\"clone\"}"), Some(1.0));
    assert_eq!(series(&body, "tandem_sessions{kind=\"mirror\"}"), Some(1.0));
    assert_eq!(series(&body, "tandem_volumes"), Some(3.0));

    // The rate applied is the mirror's own 1 MiB/s (the clone at rest copies nothing),
    // whatever the default QoS would allow; it follows a rate change.
    assert_eq!(
        series(
            &body,
            &format!("tandem_session_rate_limit_bytes_per_second{mirror_labels}")
        ),
        Some(MEBIBYTE),
        "{body}"
    );
    wait_until(10, "the applied rate of 1 MiB/s", || {
        series(&scrape(&node), "tandem_copy_governed_bytes_per_second") == Some(MEBIBYTE)
    });
    node.cli_ok(&certs, &["mirror", "rate", "bcv", "--rate", "2"]);
    wait_until(10, "the applied rate of 2 MiB/s", || {
        series(&scrape(&node), "tandem_copy_governed_bytes_per_second") == Some(2.0 * MEBIBYTE)
    });

    // A refused command counts under its code.
    let illegal_before = series(
        &scrape(&node),
        "tandem_errors_total{code=\"illegal-state\"}",
    )
    .expect("the illegal-state counter exists from start-up");
    let output = node.cli(&certs, &["clone", "terminate", "dst"]);
    assert!(
        !output.status.success(),
        "terminating a created clone was accepted"
    );
    let illegal_after = series(
        &scrape(&node),
        "tandem_errors_total{code=\"illegal-state\"}",
    )
    .unwrap();
    assert!(
        illegal_after > illegal_before,
        "{illegal_before} -> {illegal_after}: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Every metric is described, and the dashboard shows only metrics the node exports.
    let body = scrape(&node);
    let typed = commented(&body, "# TYPE ");
    let described = commented(&body, "# HELP ");
    let undescribed: Vec<&String> = typed.difference(&described).collect();
    assert!(undescribed.is_empty(), "no # HELP for {undescribed:?}");
    for histogram in ["tandem_nbd_seconds", "tandem_requests_seconds"] {
        assert!(
            body.contains(&format!("# TYPE {histogram} histogram")),
            "{histogram}: {body}"
        );
    }
    let dashboard_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"].as_str().unwrap();
            for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("tandem_") {
                    let name = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| word.strip_suffix(suffix))
                        .unwrap_or(word);
                    queried.insert(name.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let unknown: Vec<&String> = queried.difference(&described).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries {unknown:?}, which the node does not export"
    );

    // A cancelled session's gauges leave the output instead of repeating their last value.
    node.cli_ok(&certs, &["mirror", "cancel", "bcv"]);
    wait_until(30, "the cancelled mirror's gauges to go", || {
        series(
            &scrape(&node),
            &format!("tandem_session_tracks_total{mirror_labels}"),
        )
        .is_none()
    });
    assert!(series(
        &scrape(&node),
        &format!("tandem_session_tracks_total{clone_labels}")
    )
    .is_some());
}

/// Starts a node as the only member of a new cluster with its log captured in `log` (the
/// common helper sends it to /dev/null), `global` arguments before `node`, and RUST_LOG
/// as given (unset: the node's default filter).
fn start_logging(
    certs: &Path,
    name: &str,
    data_dir: &Path,
    global: &[&str],
    rust_log: Option<&str>,
    log: &Path,
) -> NodeProcess {
    let _ = std::fs::remove_file(log);
    let mut launch = chaos::processes::NodeLaunch::new(&tandem_path(), certs, name, data_dir);
    launch.global = global.iter().map(|argument| argument.to_string()).collect();
    launch.extra = vec!["--control-plane".to_string()];
    launch.environment_removed = vec!["RUST_LOG".to_string(), "NO_COLOR".to_string()];
    if let Some(filter) = rust_log {
        launch.environment = vec![("RUST_LOG".to_string(), filter.to_string())];
    }
    launch.log = Some(log.to_path_buf());
    let node = NodeProcess::adopt(launch.start().expect("the node starts"));
    node.cli_ok(certs, &["cluster", "init"]);
    node.wait_registered(certs, name);
    node
}

/// A clone created and terminated: the session commands a node must log.
fn run_a_session(node: &NodeProcess, certs: &Path) {
    for volume in ["src", "dst"] {
        node.cli_ok(certs, &["volume", "create", volume, "--size", "1MiB"]);
    }
    qemu_io(node, "src", &["write -P 0x11 0 64k"]);
    node.cli_ok(certs, &["clone", "create", "src", "dst"]);
    node.cli_ok(certs, &["clone", "activate", "dst", "--wait"]);
    node.cli_ok(certs, &["clone", "terminate", "dst"]);
}

/// Negotiates `volume` by hand (NBD_OPT_EXPORT_NAME) and sends a request header with a bad
/// magic, so that the node ends the connection with an error; returns the client's address.
fn send_a_malformed_request(node: &NodeProcess, volume: &str) -> std::net::SocketAddr {
    use protocol::nbd::{
        client, option, ClientFlags, EXPORT_NAME_REPLY_BYTES, REQUEST_HEADER_BYTES,
        SERVER_GREETING_BYTES,
    };
    let mut stream = std::net::TcpStream::connect(node.nbd).unwrap();
    let mut greeting = [0u8; SERVER_GREETING_BYTES];
    stream.read_exact(&mut greeting).unwrap();
    stream
        .write_all(&client::encode_client_flags(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        }))
        .unwrap();
    stream
        .write_all(&client::encode_option(
            option::EXPORT_NAME,
            volume.as_bytes(),
        ))
        .unwrap();
    let mut reply = [0u8; EXPORT_NAME_REPLY_BYTES];
    stream.read_exact(&mut reply).unwrap();
    stream.write_all(&[0xff; REQUEST_HEADER_BYTES]).unwrap();
    let client = stream.local_addr().unwrap();
    // The node closes the connection.
    let _ = stream.read(&mut [0u8; 1]);
    client
}

#[test]
fn logs_have_no_colour_off_a_terminal_and_are_json_lines_with_log_format_json() {
    let directory = tempfile::tempdir().unwrap();

    // Text, with the node's default filter: no escapes, no openraft state dumps, and each
    // session command logged with its session and volumes.
    let text_log = directory.path().join("text.log");
    let certs = init(&directory.path().join("text"), "alpha");
    let mut node = start_logging(
        &certs,
        "alpha",
        &directory.path().join("alpha"),
        &[],
        None,
        &text_log,
    );
    run_a_session(&node, &certs);
    let client = send_a_malformed_request(&node, "src");
    let output = node.cli_env(&certs, &["volume", "show", "nothing"], "RUST_LOG", "debug");
    assert!(!output.status.success());
    let cli_stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        cli_stderr.lines().count() > 1,
        "no debug lines: {cli_stderr}"
    );
    assert!(
        !cli_stderr.contains("\x1b["),
        "colour escapes: {cli_stderr:?}"
    );
    node.kill();
    let text = std::fs::read_to_string(&text_log).unwrap();
    assert!(!text.contains("\x1b["), "colour escapes: {text:?}");
    assert!(text.contains("node serving"), "{text}");
    assert!(
        !text.contains("openraft"),
        "openraft's info lines by default: {text}"
    );
    assert!(
        text.lines()
            .any(|line| line.contains("NBD connection closed")
                && line.contains("volume=\"src\"")
                && line.contains(&format!("peer={client}"))),
        "the NBD error does not name the volume and the client {client}: {text}"
    );
    for command in ["clone create", "clone activate", "clone terminate"] {
        assert!(
            text.lines()
                .any(|line| line.contains("session command carried out")
                    && line.contains(&format!("command=\"{command}\""))
                    && line.contains("session=")
                    && line.contains("source=src")
                    && line.contains("target=dst")),
            "{command} not logged with its session: {text}"
        );
    }

    // JSON, with everything at info: every line is one JSON object.
    let json_log = directory.path().join("json.log");
    let certs = init(&directory.path().join("json"), "beta");
    let mut node = start_logging(
        &certs,
        "beta",
        &directory.path().join("beta"),
        &["--log-format", "json"],
        Some("info"),
        &json_log,
    );
    run_a_session(&node, &certs);
    let output = tandem()
        .args(["--log-format", "json", "volume", "show", "nothing"])
        .env("TANDEM_ENDPOINT", node.quic.to_string())
        .env("TANDEM_CERTS", &certs)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(!output.status.success());
    node.kill();
    let cli_stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let node_log = std::fs::read_to_string(&json_log).unwrap();
    for (what, text) in [("the CLI", &cli_stderr), ("the node", &node_log)] {
        let lines: Vec<&str> = text.lines().filter(|line| !line.is_empty()).collect();
        assert!(lines.len() > 3, "{what} logged too little: {text}");
        for line in lines {
            let parsed: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("{what}: not JSON ({error}): {line}"));
            assert!(parsed["level"].is_string(), "{what}: {line}");
        }
    }
    assert!(
        cli_stderr.contains("does not exist") || cli_stderr.contains("nothing"),
        "the CLI's error is in its JSON log: {cli_stderr}"
    );
    let session_lines: Vec<serde_json::Value> = node_log
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|line| line["fields"]["message"] == "session command carried out")
        .collect();
    let mut commands = BTreeSet::new();
    for line in session_lines {
        assert_eq!(line["fields"]["source"], "src", "{line}");
        assert_eq!(line["fields"]["target"], "dst", "{line}");
        assert!(line["fields"]["session"].is_u64(), "{line}");
        commands.insert(line["fields"]["command"].as_str().unwrap().to_string());
    }
    assert_eq!(
        commands,
        BTreeSet::from(["clone create", "clone activate", "clone terminate"].map(String::from)),
        "{node_log}"
    );
}
