//! Scripts read tandem's answers: every command that changes something takes `--json` and
//! answers one JSON document on standard output.

use crate::common::{init, tandem, NodeProcess};

/// The subcommands `tandem PATH --help` lists, without `help` itself.
fn subcommands(path: &[String]) -> Vec<String> {
    let output = tandem().args(path).arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    let Some(section) = help.split("Commands:\n").nth(1) else {
        return Vec::new();
    };
    section
        .lines()
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command with no subcommands of its own, as the words that name it.
fn leaf_commands(path: Vec<String>) -> Vec<Vec<String>> {
    let children = subcommands(&path);
    if children.is_empty() {
        return vec![path];
    }
    children
        .into_iter()
        .flat_map(|child| {
            let mut longer = path.clone();
            longer.push(child);
            leaf_commands(longer)
        })
        .collect()
}

/// Commands that run until stopped rather than answer.
const LONG_RUNNING: [&str; 2] = ["node", "demo"];

#[test]
fn every_command_but_the_long_running_ones_takes_json() {
    let leaves = leaf_commands(Vec::new());
    assert!(
        leaves.len() >= 30,
        "found only {} commands: {leaves:?}",
        leaves.len()
    );
    let missing: Vec<String> = leaves
        .iter()
        .filter(|words| !LONG_RUNNING.contains(&words[0].as_str()))
        .filter(|words| {
            let output = tandem().args(words.iter()).arg("--help").output().unwrap();
            !String::from_utf8_lossy(&output.stdout).contains("--json")
        })
        .map(|words| words.join(" "))
        .collect();
    assert!(missing.is_empty(), "commands without --json: {missing:?}");
}

#[test]
fn changing_commands_answer_one_json_document() {
    let directory = tempfile::tempdir().unwrap();
    let certs_directory = directory.path().join("json-certs");
    let output = tandem()
        .args([
            "init",
            "--dir",
            certs_directory.to_str().unwrap(),
            "--nodes",
            "alpha",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let written: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(written["nodes"][0]["name"], "alpha");

    let certs = init(directory.path(), "alpha");
    let node =
        NodeProcess::start_cluster_of_one(&certs, "alpha", &directory.path().join("data"), None);
    let changes: [&[&str]; 12] = [
        &[
            "volume", "create", "a", "--node", "alpha", "--size", "1MiB", "--json",
        ],
        &[
            "volume", "create", "b", "--node", "alpha", "--size", "1MiB", "--json",
        ],
        &[
            "volume", "create", "c", "--node", "alpha", "--size", "1MiB", "--json",
        ],
        &["volume", "readiness", "a", "read-only", "--json"],
        &["volume", "readiness", "a", "ready", "--json"],
        &["snap", "a", "a-snap", "--json"],
        &["clone", "create", "a", "b", "--json"],
        &["clone", "activate", "b", "--wait", "--json"],
        &["clone", "terminate", "b", "--json"],
        &["mirror", "establish", "a", "c", "--wait", "--json"],
        &["mirror", "rate", "c", "--rate", "5", "--json"],
        &["mirror", "split", "c", "--json"],
    ];
    for arguments in changes {
        let text = node.cli_ok(&certs, arguments);
        let answer: Result<serde_json::Value, _> = serde_json::from_str(text.trim());
        assert!(
            answer.as_ref().is_ok_and(serde_json::Value::is_object),
            "{arguments:?} answered {text:?}"
        );
    }
    let text = node.cli_ok(&certs, &["mirror", "cancel", "c", "--json"]);
    serde_json::from_str::<serde_json::Value>(text.trim()).unwrap();
    let text = node.cli_ok(&certs, &["volume", "delete", "a-snap", "--json"]);
    let deleted: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(deleted["deleted"], "a-snap");
}
