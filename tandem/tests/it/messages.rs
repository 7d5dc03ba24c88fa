//! Messages that say what to do (issue 10, item 4), against real node processes: a
//! cluster before `cluster init`, init twice, a volume right after init, sessions on taken
//! targets, a node that is down, flags the CLI checks, NBD clients on a volume that is not
//! ready, members that cannot be reached or refuse a certificate, and a removed member.

use crate::common::{free_port, init, node_health, tandem, wait_until, NodeProcess};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// How long an answer that needs no retrying may take, CLI start-up and QUIC handshake
/// included, on a loaded two-core machine.
const PROMPT_ANSWER_SECONDS_MAX: u64 = 2;

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs a command that must fail, promptly, and returns its standard error.
fn refused_promptly(node: &NodeProcess, certs: &Path, arguments: &[&str]) -> String {
    let started = Instant::now();
    let output = node.cli(certs, arguments);
    let elapsed = started.elapsed();
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{arguments:?} succeeded");
    assert!(
        elapsed < Duration::from_secs(PROMPT_ANSWER_SECONDS_MAX),
        "{arguments:?} took {elapsed:?} to fail: {stderr}"
    );
    stderr
}

fn members_argument(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_cluster_before_init_says_so_at_once_and_init_returns_when_its_node_is_registered() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "n1,n2");
    let ports = [free_port(), free_port()];
    let members = members_argument(&ports);
    let start = |index: usize| {
        let name = format!("n{}", index + 1);
        NodeProcess::start_with(
            &certs,
            &name,
            &directory.path().join(&name),
            None,
            ports[index],
            &["--control-plane", "--members", &members],
        )
    };
    let first = start(0);
    let second = start(1);
    // Both members are in no cluster: the CLI's retrying does not apply.
    for (node, arguments) in [
        (&first, ["volume", "list"].as_slice()),
        (&second, ["status"].as_slice()),
        (
            &second,
            ["volume", "create", "v", "--size", "1MiB"].as_slice(),
        ),
    ] {
        let stderr = refused_promptly(node, &certs, arguments);
        assert!(
            stderr.contains(
                "the cluster has no control plane yet: run `tandem cluster init` against the first member"
            ),
            "{arguments:?}: {stderr}"
        );
        assert!(stderr.contains("[not-initialized]"), "{stderr}");
    }
    // Init returns once n1 is registered, so a volume can be placed on it at once.
    first.cli_ok(&certs, &["cluster", "init"]);
    first.cli_ok(
        &certs,
        &["volume", "create", "v", "--node", "n1", "--size", "1MiB"],
    );
    let again = first.cli(&certs, &["cluster", "init"]);
    assert!(!again.status.success());
    let stderr = stderr_of(&again);
    assert!(
        stderr.contains("already initialized (leader n1, term 1)"),
        "{stderr}"
    );
    assert!(!stderr.contains("NotAllowed"), "{stderr}");
}

#[test]
fn a_session_on_a_taken_target_says_what_the_volume_is() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "n1");
    let node = NodeProcess::start_cluster_of_one(&certs, "n1", &directory.path().join("n1"), None);
    for volume in ["vol1", "vol2", "bcv1", "cdst"] {
        node.cli_ok(&certs, &["volume", "create", volume, "--size", "1MiB"]);
    }
    node.cli_ok(&certs, &["mirror", "establish", "vol1", "bcv1"]);
    node.cli_ok(&certs, &["clone", "create", "vol1", "cdst"]);
    wait_until(20, "the mirror to synchronize", || {
        node.cli_ok(&certs, &["mirror", "show", "bcv1", "--json"])
            .contains("\"synchronized\"")
    });
    let stderr = refused_promptly(&node, &certs, &["mirror", "establish", "vol2", "bcv1"]);
    assert!(
        stderr.contains("'bcv1' is already the BCV of a mirror of 'vol1' (state synchronized)"),
        "{stderr}"
    );
    assert!(stderr.contains("tandem mirror cancel bcv1"), "{stderr}");
    assert!(!stderr.contains("split it first"), "{stderr}");
    let stderr = refused_promptly(&node, &certs, &["mirror", "establish", "vol2", "cdst"]);
    assert!(
        stderr.contains("'cdst' is the destination of a clone of 'vol1' (state created)"),
        "{stderr}"
    );
    assert!(stderr.contains("choose another volume"), "{stderr}");
    assert!(!stderr.contains("mirror command"), "{stderr}");
    let stderr = refused_promptly(&node, &certs, &["clone", "create", "vol2", "bcv1"]);
    assert!(
        stderr.contains("'bcv1' is already the BCV of a mirror of 'vol1'"),
        "{stderr}"
    );
    // Nothing changed: the sessions are as they were.
    let mirrors = node.cli_ok(&certs, &["mirror", "list", "--json"]);
    assert!(!mirrors.contains("vol2"), "{mirrors}");
    let clones = node.cli_ok(&certs, &["clone", "list", "--json"]);
    assert!(!clones.contains("vol2"), "{clones}");
}

#[test]
fn commands_for_a_node_that_is_down_fail_at_once() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "n1,n2");
    let member =
        NodeProcess::start_cluster_of_one(&certs, "n1", &directory.path().join("n1"), None);
    let member_address = member.quic.to_string();
    let mut plain = NodeProcess::start_with(
        &certs,
        "n2",
        &directory.path().join("n2"),
        None,
        0,
        &["--members", &member_address],
    );
    member.wait_registered(&certs, "n2");
    for volume in ["data", "copy"] {
        member.cli_ok(
            &certs,
            &["volume", "create", volume, "--node", "n2", "--size", "1MiB"],
        );
    }
    plain.kill();
    wait_until(20, "n2 to be marked down", || {
        member
            .status(&certs)
            .is_some_and(|status| node_health(&status, "n2").as_deref() == Some("down"))
    });
    for arguments in [
        ["volume", "readiness", "data", "read-only"].as_slice(),
        ["clone", "create", "data", "copy"].as_slice(),
        ["volume", "delete", "data"].as_slice(),
        ["snap", "data", "snap1"].as_slice(),
    ] {
        let stderr = refused_promptly(&member, &certs, arguments);
        assert!(
            stderr.contains("node 'n2' is down since ") && stderr.contains(" UTC ("),
            "{arguments:?}: {stderr}"
        );
    }
    // The refusals changed nothing.
    let volumes = member.cli_ok(&certs, &["volume", "list", "--json"]);
    let volumes: serde_json::Value = serde_json::from_str(&volumes).unwrap();
    let names: Vec<&str> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|volume| volume["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["copy", "data"]);
    assert!(volumes
        .as_array()
        .unwrap()
        .iter()
        .all(|volume| volume["readiness"] == "ready" && volume["state"] == "ready"));
}

#[test]
fn the_cli_checks_track_sizes_and_conflicting_rate_flags() {
    let output = tandem()
        .args([
            "volume",
            "create",
            "v",
            "--size",
            "16GiB",
            "--track-size",
            "8GiB",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("a power of two from 4KiB to 1MiB"),
        "{stderr}"
    );
    assert!(!stderr.contains("integral"), "{stderr}");
    for kind in ["mirror", "clone"] {
        let output = tandem()
            .args([kind, "rate", "target", "--rate", "5", "--default"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{kind} rate was accepted");
        let stderr = stderr_of(&output);
        assert!(stderr.contains("cannot be used with"), "{stderr}");
    }
}

/// Runs an NBD client program and returns what it printed, both streams.
fn nbd_client(program: &str, arguments: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("{program} is needed for this test: {error}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn nbd_clients_hear_that_a_volume_exists_but_is_not_ready() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "n1");
    let node = NodeProcess::start_cluster_of_one(&certs, "n1", &directory.path().join("n1"), None);
    node.cli_ok(&certs, &["volume", "create", "resting", "--size", "1MiB"]);
    node.cli_ok(&certs, &["volume", "readiness", "resting", "not-ready"]);
    let url = |volume: &str| format!("nbd://{}/{volume}", node.nbd);
    // libnbd reports the reply's error class; the server's text is in its debug output.
    let (ok, text) = nbd_client("nbdinfo", &[&url("resting")]);
    assert!(!ok, "nbdinfo read a not-ready volume: {text}");
    assert!(!text.contains("No such file"), "nbdinfo: {text}");
    let output = std::process::Command::new("nbdinfo")
        .arg(url("resting"))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("volume 'resting' exists but is not ready"),
        "nbdinfo: {text}"
    );
    let (ok, text) = nbd_client(
        "qemu-io",
        &["-f", "raw", "-r", &url("resting"), "-c", "read 0 4096"],
    );
    assert!(!ok || !text.contains("read 4096/4096"), "qemu-io: {text}");
    assert!(
        text.contains("volume 'resting' exists but is not ready"),
        "qemu-io: {text}"
    );
    // A volume that does not exist is still "no such export", not "not ready".
    let (ok, text) = nbd_client("nbdinfo", &[&url("missing")]);
    assert!(!ok);
    assert!(text.contains("No such file"), "nbdinfo: {text}");
    let (ok, text) = nbd_client(
        "qemu-io",
        &["-f", "raw", "-r", &url("missing"), "-c", "read 0 4096"],
    );
    assert!(!ok || !text.contains("read 4096/4096"), "qemu-io: {text}");
    assert!(!text.contains("not ready"), "qemu-io: {text}");
}

/// Reads a log file until it contains `needle`, failing after `seconds`.
fn wait_for_log(log: &Path, needle: &str, seconds: u64) {
    wait_until(seconds, &format!("'{needle}' in {}", log.display()), || {
        std::fs::read_to_string(log).is_ok_and(|text| text.contains(needle))
    });
}

#[test]
fn unreachable_members_and_refused_certificates_are_logged_with_their_address() {
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "n1,n2");
    // A member no one runs: the node says so from its first heartbeat.
    let nobody = format!("127.0.0.1:{}", free_port());
    let lonely_log = directory.path().join("lonely.log");
    let _lonely = NodeProcess::start_logging(
        &certs,
        "n2",
        &directory.path().join("n2"),
        0,
        &["--members", &nobody],
        &lonely_log,
    );
    wait_for_log(
        &lonely_log,
        &format!("cannot reach control-plane member {nobody}"),
        10,
    );

    // A node whose certificate comes from another cluster's CA: both sides log it.
    let member_log = directory.path().join("member.log");
    let member = NodeProcess::start_logging(
        &certs,
        "n1",
        &directory.path().join("n1"),
        0,
        &["--control-plane"],
        &member_log,
    );
    member.cli_ok(&certs, &["cluster", "init"]);
    let strangers = tempfile::tempdir().unwrap();
    let stranger_certs = init(strangers.path(), "s1");
    let stranger_log = directory.path().join("stranger.log");
    let stranger = NodeProcess::start_logging(
        &stranger_certs,
        "s1",
        &strangers.path().join("s1"),
        0,
        &["--members", &member.quic.to_string()],
        &stranger_log,
    );
    wait_for_log(
        &member_log,
        &format!("refused a QUIC handshake from {}", stranger.quic),
        10,
    );
    wait_for_log(
        &stranger_log,
        &format!("cannot reach control-plane member {}", member.quic),
        10,
    );
    // Rate-limited: over a few seconds of heartbeats (two a second) the member logs the
    // stranger once.
    std::thread::sleep(Duration::from_secs(3));
    let text = std::fs::read_to_string(&member_log).unwrap();
    let lines = text
        .lines()
        .filter(|line| line.contains("refused a QUIC handshake from"))
        .count();
    assert_eq!(lines, 1, "{text}");
}

/// Three members on fixed ports, started with each other as `members`.
struct Members {
    directory: tempfile::TempDir,
    certs: PathBuf,
    ports: Vec<u16>,
    nodes: Vec<Option<NodeProcess>>,
}

const NAMES: [&str; 3] = ["m1", "m2", "m3"];

impl Members {
    fn start() -> Members {
        let directory = tempfile::tempdir().unwrap();
        let certs = init(directory.path(), &NAMES.join(","));
        let ports = NAMES.iter().map(|_| free_port()).collect();
        let mut members = Members {
            directory,
            certs,
            ports,
            nodes: Vec::new(),
        };
        for index in 0..NAMES.len() {
            let node = members.start_node(index);
            members.nodes.push(Some(node));
        }
        let first = members.node(0);
        first.cli_ok(&members.certs, &["cluster", "init"]);
        for name in &NAMES[1..] {
            first.wait_registered(&members.certs, name);
            first.cli_ok(&members.certs, &["cluster", "add-member", name]);
        }
        members
    }

    fn start_node(&self, index: usize) -> NodeProcess {
        let members = members_argument(&self.ports);
        NodeProcess::start_with(
            &self.certs,
            NAMES[index],
            &self.directory.path().join(NAMES[index]),
            None,
            self.ports[index],
            &[
                "--control-plane",
                "--fault-injection",
                "--members",
                &members,
            ],
        )
    }

    /// Cuts member `index` off from the other members, both ways (`cut = false` heals).
    fn cut_off(&self, index: usize, cut: bool) {
        for other in (0..NAMES.len()).filter(|other| *other != index) {
            for (at, peer) in [(index, other), (other, index)] {
                let mut arguments = vec!["debug", "fault", "--peer", NAMES[peer]];
                if cut {
                    arguments.push("--drop");
                }
                self.node(at).cli_ok(&self.certs, &arguments);
            }
        }
    }

    fn node(&self, index: usize) -> &NodeProcess {
        self.nodes[index].as_ref().unwrap()
    }

    /// Waits until member `index` answers that it was removed from the control plane;
    /// its refusal.
    fn wait_until_removed(&self, index: usize) -> String {
        let mut refusal = String::new();
        wait_until(
            20,
            &format!("{} to know it was removed", NAMES[index]),
            || {
                let output = self
                    .node(index)
                    .cli(&self.certs, &["cluster", "status", "--json"]);
                refusal = stderr_of(&output);
                !output.status.success() && refusal.contains("is not a control-plane member")
            },
        );
        assert!(refusal.contains("[not-member]"), "{refusal}");
        refusal
    }

    fn cluster_status(&self, index: usize) -> serde_json::Value {
        let text = self
            .node(index)
            .cli_ok(&self.certs, &["cluster", "status", "--json"]);
        serde_json::from_str(&text).unwrap()
    }
}

/// The term a removed member reports in its refusal ("its Raft stopped at term N").
fn stopped_term(stderr: &str) -> u64 {
    let rest = stderr
        .split("its Raft stopped at term ")
        .nth(1)
        .unwrap_or_else(|| panic!("no stopped term in: {stderr}"));
    rest.split(|character: char| !character.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_removed_member_stops_campaigning_and_can_be_added_again_after_a_restart() {
    let mut members = Members::start();
    let term_before = members.cluster_status(0)["term"].as_u64().unwrap();
    assert_eq!(members.cluster_status(0)["leader"], "m1");
    members
        .node(0)
        .cli_ok(&members.certs, &["cluster", "remove-member", "m3"]);

    // m3 learns that it was removed, stops its Raft and says so when asked.
    let refusal = members.wait_until_removed(2);
    let stopped_at = stopped_term(&refusal);
    std::thread::sleep(Duration::from_secs(2));
    let later = stderr_of(
        &members
            .node(2)
            .cli(&members.certs, &["cluster", "status", "--json"]),
    );
    assert_eq!(stopped_term(&later), stopped_at, "m3 went on campaigning");
    let status = members.cluster_status(0);
    assert_eq!(status["term"].as_u64().unwrap(), term_before, "{status}");
    assert_eq!(status["members"].as_array().unwrap().len(), 2, "{status}");
    // The removed node still serves as a plain node: commands through it reach the leader.
    members
        .node(2)
        .cli_ok(&members.certs, &["volume", "list", "--json"]);

    // Adding it back while its member is stopped is refused with what to do.
    let stderr = refused_promptly(
        members.node(0),
        &members.certs,
        &["cluster", "add-member", "m3"],
    );
    assert!(stderr.contains("restart the node"), "{stderr}");

    // After a restart it is a fresh member, and adding it again leaves the term alone.
    members.nodes[2].take().unwrap().kill();
    let restarted = members.start_node(2);
    members.nodes[2] = Some(restarted);
    members.node(0).wait_registered(&members.certs, "m3");
    members
        .node(0)
        .cli_ok(&members.certs, &["cluster", "add-member", "m3"]);
    let status = members.cluster_status(0);
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(status["term"].as_u64().unwrap(), term_before, "{status}");
    assert_eq!(status["leader"], "m1", "{status}");
}

/// A leader cut off from the other members long enough for them to elect a new one, and
/// removed by that new leader meanwhile, learns that it was removed once the cut heals.
/// The others refuse its messages as a non-member's, so it never hears of the newer term:
/// it went on leading a cluster of its own, and every request sent to it waited for
/// commits that could not come (found by the chaos schedule).
#[test]
fn a_leader_removed_while_cut_off_stops_as_removed_when_the_cut_heals() {
    let members = Members::start();
    assert_eq!(members.cluster_status(0)["leader"], "m1");
    members.cut_off(0, true);
    let mut new_leader = String::new();
    wait_until(30, "m2 or m3 to lead while m1 is cut off", || {
        let output = members
            .node(1)
            .cli(&members.certs, &["cluster", "status", "--json"]);
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
            return false;
        };
        new_leader = status["leader"].as_str().unwrap_or_default().to_string();
        new_leader == "m2" || new_leader == "m3"
    });
    members
        .node(1)
        .cli_ok(&members.certs, &["cluster", "remove-member", "m1"]);
    members.cut_off(0, false);

    members.wait_until_removed(0);
    let status = members.cluster_status(1);
    assert_eq!(status["leader"], new_leader.as_str(), "{status}");
    let names: Vec<&str> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|member| member["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{status}");
    assert!(!names.contains(&"m1"), "{status}");
}
