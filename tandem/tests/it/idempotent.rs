//! Retried session commands (issue 11, item 6): the leader dies right after the source
//! node carried out a split, a restore or an activate (a fail point ends its process
//! before the catalog records it), the CLI retries under the same request id through a
//! new leader, and gets the first answer; catalog and node agree and the next command
//! works. Snaps on the saga (issue 12): a leader dying after the node snapped, or after
//! recording the snap's intent, leaves neither a second snap nor an empty target. Also:
//! the binary these tests run really has its fail points.

use crate::common::{free_port, init, tandem, wait_until, NodeProcess};
use crate::metrics::{scrape, series};
use crate::sessions::{fill, json, read_all};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub(crate) const MEMBERS: [&str; 3] = ["member-a", "member-b", "member-c"];
/// The member that leads first, and dies at the fail point.
pub(crate) const LEADER: &str = MEMBERS[0];
/// The member that holds the volumes (so their node survives the leader) and that the
/// CLI talks to (it forwards to whichever member leads).
pub(crate) const STORAGE: &str = MEMBERS[2];
pub(crate) const FAIL_POINT: &str = "control-plane::session::after-node-call";
/// Where the leader dies once a node answered an intent (a snap), before the answer is
/// committed.
pub(crate) const RESULT_FAIL_POINT: &str = "control-plane::saga::before-result-commit";
/// Where the leader dies once an intent is committed, before its node is called.
pub(crate) const INTENT_FAIL_POINT: &str = "control-plane::saga::after-intent-commit";
const EXIT_STATUS: i32 = 137;

#[test]
fn the_binary_the_tests_spawn_has_fail_points() {
    let armed = tandem()
        .arg("--version")
        .env("FAILPOINTS", "control-plane::fail-points::setup=return")
        .output()
        .unwrap();
    assert_eq!(
        armed.status.code(),
        Some(EXIT_STATUS),
        "the tandem binary under test ignored FAILPOINTS: it was built without the control-plane \
         crate's `failpoints` feature, which the tandem crate's dev-dependencies turn on"
    );
    let unarmed = tandem().arg("--version").output().unwrap();
    assert!(unarmed.status.success());
}

/// Three members on fixed ports; the first leads and has the fail point armed for one
/// command (`return(COMMAND)`).
pub(crate) struct Trio {
    _directory: tempfile::TempDir,
    pub(crate) certs: PathBuf,
    pub(crate) nodes: BTreeMap<&'static str, NodeProcess>,
}

impl Trio {
    fn start(dying_command: &str) -> Trio {
        Trio::start_at(FAIL_POINT, dying_command)
    }

    /// [`Trio::start`] with the leader dying at fail point `place`.
    pub(crate) fn start_at(place: &str, dying_command: &str) -> Trio {
        Trio::start_armed(&format!("{place}=return({dying_command})"))
    }

    /// [`Trio::start_at`] with the leader's `FAILPOINTS` as given (for example
    /// `PLACE=1*off->return(CALL)`, which lets the first evaluation pass).
    pub(crate) fn start_armed(fail_points: &str) -> Trio {
        let directory = tempfile::tempdir().unwrap();
        let certs = init(directory.path(), &MEMBERS.join(","));
        let ports: Vec<u16> = MEMBERS.iter().map(|_| free_port()).collect();
        let members = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = BTreeMap::new();
        for (name, port) in MEMBERS.iter().zip(&ports) {
            let environment: Vec<(&str, &str)> = if *name == LEADER {
                vec![("FAILPOINTS", fail_points)]
            } else {
                Vec::new()
            };
            let node = NodeProcess::start_with_environment(
                &certs,
                name,
                &directory.path().join(name),
                *port,
                &["--control-plane", "--members", &members],
                &environment,
            );
            nodes.insert(*name, node);
            if *name == LEADER {
                nodes[LEADER].cli_ok(&certs, &["cluster", "init"]);
                nodes[LEADER].wait_registered(&certs, LEADER);
            }
        }
        for name in &MEMBERS[1..] {
            nodes[LEADER].wait_registered(&certs, name);
            nodes[LEADER].cli_ok(&certs, &["cluster", "add-member", name]);
        }
        Trio {
            _directory: directory,
            certs,
            nodes,
        }
    }

    pub(crate) fn storage(&self) -> &NodeProcess {
        &self.nodes[STORAGE]
    }

    pub(crate) fn cli_json(&self, arguments: &[&str]) -> serde_json::Value {
        json(self.storage(), &self.certs, arguments)
    }

    fn create_volumes(&self, names: &[&str]) {
        for name in names {
            self.create_volume_on(name, STORAGE);
        }
    }

    pub(crate) fn create_volume_on(&self, name: &str, node: &str) {
        self.storage().cli_ok(
            &self.certs,
            &["volume", "create", name, "--node", node, "--size", "8MiB"],
        );
    }

    /// Runs a session command through the storage member while the leader dies at the
    /// fail point; the CLI's retries carry it to the next leader. Returns its answer.
    fn command_killing_the_leader(&mut self, arguments: &[&str]) -> serde_json::Value {
        let answer = self.cli_json(arguments);
        self.wait_for_the_leader_to_die();
        answer
    }

    /// Waits for the leader to end at its fail point.
    pub(crate) fn wait_for_the_leader_to_die(&mut self) {
        let leader = self.nodes.get_mut(LEADER).unwrap();
        let mut status = None;
        wait_until(10, "the leader to end at the fail point", || {
            status = leader.child.try_wait().unwrap();
            status.is_some()
        });
        assert_eq!(
            status.unwrap().code(),
            Some(EXIT_STATUS),
            "the leader ended otherwise than at the fail point"
        );
    }

    /// The catalog's record of a volume (not the node's view).
    fn catalog_volume(&self, name: &str) -> serde_json::Value {
        let volumes = self.cli_json(&["volume", "list", "--json"]);
        volumes
            .as_array()
            .unwrap()
            .iter()
            .find(|volume| volume["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in {volumes}"))
            .clone()
    }

    fn wait_for_state(&self, kind: &str, target: &str, state: &str) {
        wait_until(60, &format!("the {kind} of {target} to be {state}"), || {
            self.cli_json(&[kind, "show", target, "--json"])["state"] == state
        });
    }
}

/// A synchronized mirror std -> bcv on the storage member, std holding data.
fn synchronized_mirror(trio: &Trio) {
    trio.create_volumes(&["std", "bcv"]);
    fill(trio.storage(), "std", 11);
    trio.cli_json(&["mirror", "establish", "std", "bcv", "--json"]);
    trio.wait_for_state("mirror", "bcv", "synchronized");
}

#[test]
fn a_split_whose_leader_died_before_recording_it_answers_its_first_answer_on_retry() {
    let mut trio = Trio::start("mirror split");
    synchronized_mirror(&trio);
    let split = trio.command_killing_the_leader(&["mirror", "split", "bcv", "--json"]);
    assert_eq!(split["state"], "split", "{split}");
    // The node split once, and the catalog records it: the BCV went to its hosts.
    let shown = trio.cli_json(&["mirror", "show", "bcv", "--json"]);
    assert_eq!(shown["state"], "split", "{shown}");
    assert_eq!(shown["split_sequence"], split["split_sequence"]);
    assert_eq!(trio.catalog_volume("bcv")["readiness"], "ready");
    assert_eq!(
        read_all(trio.storage(), "bcv"),
        read_all(trio.storage(), "std")
    );
    // The next command is judged against a catalog that agrees with the node.
    trio.storage()
        .cli_ok(&trio.certs, &["mirror", "reestablish", "bcv"]);
    trio.wait_for_state("mirror", "bcv", "synchronized");
    assert_eq!(trio.catalog_volume("bcv")["readiness"], "not-ready");
}

#[test]
fn a_restore_whose_leader_died_before_recording_it_answers_its_first_answer_on_retry() {
    let mut trio = Trio::start("mirror restore");
    synchronized_mirror(&trio);
    let split = trio.cli_json(&["mirror", "split", "bcv", "--json"]);
    assert_eq!(split["state"], "split");
    let image = read_all(trio.storage(), "bcv");
    fill(trio.storage(), "std", 99);
    let restore = trio.command_killing_the_leader(&["mirror", "restore", "bcv", "--json"]);
    assert!(
        restore["state"] == "restoring" || restore["state"] == "synchronized",
        "{restore}"
    );
    trio.wait_for_state("mirror", "bcv", "synchronized");
    assert_eq!(
        read_all(trio.storage(), "std"),
        image,
        "the restore brought back the BCV"
    );
    assert_eq!(trio.catalog_volume("bcv")["readiness"], "not-ready");
    // The next command works: the catalog knows the mirror is synchronized.
    let again = trio.cli_json(&["mirror", "split", "bcv", "--json"]);
    assert_eq!(again["state"], "split", "{again}");
    assert_eq!(trio.catalog_volume("bcv")["readiness"], "ready");
}

#[test]
fn an_activate_whose_leader_died_before_recording_it_answers_its_first_answer_on_retry() {
    let mut trio = Trio::start("clone activate");
    trio.create_volumes(&["src", "dst"]);
    fill(trio.storage(), "src", 23);
    let created = trio.cli_json(&["clone", "create", "src", "dst", "--json"]);
    assert_eq!(created["state"], "created");
    assert_eq!(trio.catalog_volume("dst")["readiness"], "not-ready");
    let activated = trio.command_killing_the_leader(&["clone", "activate", "dst", "--json"]);
    assert!(
        activated["state"] == "active" || activated["state"] == "copied",
        "{activated}"
    );
    // The destination went to its hosts on the node, and in the catalog.
    assert_eq!(trio.catalog_volume("dst")["readiness"], "ready");
    trio.wait_for_state("clone", "dst", "copied");
    trio.storage()
        .cli_ok(&trio.certs, &["clone", "terminate", "dst"]);
    assert_eq!(
        read_all(trio.storage(), "dst"),
        read_all(trio.storage(), "src")
    );
    let listed = trio.cli_json(&["clone", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

#[test]
fn a_snap_whose_leader_died_after_the_node_snapped_is_not_taken_again_on_retry() {
    let mut trio = Trio::start_at(RESULT_FAIL_POINT, "snap");
    trio.create_volumes(&["src"]);
    fill(trio.storage(), "src", 11);
    let snapped = trio.command_killing_the_leader(&["snap", "src", "copy", "--json"]);
    assert_eq!(snapped["target"], "copy", "{snapped}");
    // The node snapped once; the retry through the next leader got the first answer (a
    // second snap would have taken the image of a later instant).
    let metrics = scrape(trio.storage());
    assert_eq!(
        series(
            &metrics,
            r#"tandem_node_calls_carried_out_total{call="snap"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, r#"tandem_node_calls_replayed_total{call="snap"}"#),
        Some(1.0)
    );
    // The target the first attempt created is the one the catalog knows, ready, holding
    // the source's image.
    let copy = trio.catalog_volume("copy");
    assert_eq!(copy["state"], "ready", "{copy}");
    assert_eq!(
        read_all(trio.storage(), "copy"),
        read_all(trio.storage(), "src")
    );
}

#[test]
fn a_snap_whose_leader_died_after_recording_it_is_finished_by_the_next_leader_without_a_retry() {
    let mut trio = Trio::start_at(INTENT_FAIL_POINT, "snap");
    trio.create_volumes(&["src"]);
    fill(trio.storage(), "src", 13);
    // The CLI gives up at once: nobody retries the snap.
    let output = trio.storage().cli_env(
        &trio.certs,
        &["snap", "src", "copy", "--json"],
        "TANDEM_RETRY_SECONDS",
        "0",
    );
    assert!(!output.status.success(), "the leader died mid-snap");
    trio.wait_for_the_leader_to_die();
    // The next leader's supervisor finds the recorded snap and finishes it: the target
    // the intent recorded is not left empty or half-made.
    wait_until(30, "the snap's target to be ready", || {
        let volumes = trio.cli_json(&["volume", "list", "--json"]);
        volumes
            .as_array()
            .unwrap()
            .iter()
            .any(|volume| volume["name"] == "copy" && volume["state"] == "ready")
    });
    assert_eq!(
        read_all(trio.storage(), "copy"),
        read_all(trio.storage(), "src")
    );
    let metrics = scrape(trio.storage());
    assert_eq!(
        series(
            &metrics,
            r#"tandem_node_calls_carried_out_total{call="snap"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn a_volume_create_whose_leader_died_after_the_node_made_it_is_not_made_again_on_retry() {
    let mut trio = Trio::start_at(RESULT_FAIL_POINT, "volume create");
    let created = trio.command_killing_the_leader(&[
        "volume", "create", "vol", "--node", STORAGE, "--size", "8MiB", "--json",
    ]);
    assert_eq!(created["name"], "vol", "{created}");
    // The node made the volume once; the retry through the next leader was answered
    // from the node's memory of the intent's id, not with "already exists".
    let metrics = scrape(trio.storage());
    assert_eq!(
        series(
            &metrics,
            r#"tandem_node_calls_carried_out_total{call="volume create"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        series(
            &metrics,
            r#"tandem_node_calls_replayed_total{call="volume create"}"#
        ),
        Some(1.0)
    );
    let volume = trio.catalog_volume("vol");
    assert_eq!(volume["state"], "ready", "{volume}");
    fill(trio.storage(), "vol", 5);
}

#[test]
fn a_volume_delete_whose_leader_died_after_recording_it_is_finished_by_the_next_leader_without_a_retry(
) {
    let mut trio = Trio::start_at(INTENT_FAIL_POINT, "volume delete");
    trio.create_volumes(&["gone", "kept"]);
    // The CLI gives up at once: nobody retries the delete.
    let output = trio.storage().cli_env(
        &trio.certs,
        &["volume", "delete", "gone", "--json"],
        "TANDEM_RETRY_SECONDS",
        "0",
    );
    assert!(!output.status.success(), "the leader died mid-delete");
    trio.wait_for_the_leader_to_die();
    // The next leader's supervisor finds the recorded delete and finishes it on the node.
    wait_until(30, "the delete to be finished", || {
        let volumes = trio.cli_json(&["volume", "list", "--json"]);
        let names: Vec<&str> = volumes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|volume| volume["name"].as_str())
            .collect();
        names == ["kept"]
    });
    let shown = trio
        .storage()
        .cli(&trio.certs, &["volume", "show", "gone", "--json"]);
    assert!(!shown.status.success(), "the catalog forgot 'gone'");
    let metrics = scrape(trio.storage());
    assert_eq!(
        series(
            &metrics,
            r#"tandem_node_calls_carried_out_total{call="volume delete"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    // The node no longer holds it: a new volume of the name is made afresh.
    trio.create_volumes(&["gone"]);
    assert_eq!(trio.catalog_volume("gone")["state"], "ready");
}
