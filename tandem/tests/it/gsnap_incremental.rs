//! Incremental gsnap (issue 12): after a job of P and S succeeded, the next job of the
//! same two sends only the tracks P's hosts wrote since that job's snap and those S's
//! (or S''s) hosts wrote since it ended; `--full` sends everything; `gsnap forget` drops
//! the lineage; a job that fails or is cancelled leaves it to the next.

use crate::common::NodeProcess;
use crate::gsnap::{a_slow_job_copying, catalog_record, run_to_end};
use crate::sessions::{fill, json, read_all, refused, TwoNodes, TRACKS, TRACK_BYTES};
use std::path::Path;

/// Writes one track of `volume` through NBD, every byte `byte`, and flushes.
pub(crate) fn write_track(node: &NodeProcess, volume: &str, track: u64, byte: u8) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node::nbd_client::NbdClient::connect(node.nbd, volume)
            .await
            .unwrap();
        client
            .write(
                track * TRACK_BYTES,
                &vec![byte; TRACK_BYTES as usize],
                false,
            )
            .await
            .unwrap()
            .unwrap();
        client.flush().await.unwrap().unwrap();
        client.disconnect().await.unwrap();
    });
}

/// Runs a gsnap to its end and returns its report; it must succeed.
fn gsnap(alpha: &NodeProcess, certs: &Path, arguments: &[&str]) -> serde_json::Value {
    let mut command = vec!["gsnap"];
    command.extend(arguments);
    command.push("--json");
    let started = json(alpha, certs, &command);
    let job = started["job"].as_u64().unwrap().to_string();
    let report = run_to_end(alpha, certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    report
}

/// The send of a report: mode, tracks from each side, tracks sent.
fn send_of(report: &serde_json::Value) -> (String, u64, u64, u64) {
    let send = &report["send"];
    (
        send["mode"].as_str().unwrap_or_default().to_string(),
        send["source_changed_tracks"].as_u64().unwrap_or(0),
        send["target_changed_tracks"].as_u64().unwrap_or(0),
        send["tracks"].as_u64().unwrap(),
    )
}

/// The tracks the pair copied and the verification digested: exactly those sent.
fn tracks_moved(report: &serde_json::Value) -> (u64, u64) {
    let verified = report["verification"]
        .as_array()
        .unwrap()
        .first()
        .map_or(0, |round| round["tracks"].as_u64().unwrap());
    (report["tracks_total"].as_u64().unwrap(), verified)
}

fn slots_of(alpha: &NodeProcess, certs: &Path, volume: &str) -> u64 {
    let shown = json(alpha, certs, &["volume", "show", volume, "--json"]);
    shown["on_node"]["session_slots_used"].as_u64().unwrap()
}

/// FIG. 3's pair of volumes (no S'): the first job sends everything; after two of P's
/// tracks change, the second sends exactly those two; a track S's host wrote is caught and
/// sent again; nothing changed sends nothing; `--full` and `gsnap forget` send everything.
#[test]
fn a_second_gsnap_sends_only_the_tracks_changed_on_either_side() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta"), ("x", "alpha")]);
    fill(&alpha, "p", 5);

    let first = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    let (mode, _, _, tracks) = send_of(&first);
    assert_eq!(mode, "full", "{first}");
    assert!(
        first["send"]["reason"]
            .as_str()
            .unwrap()
            .contains("no earlier job"),
        "{first}"
    );
    assert_eq!(tracks, TRACKS);
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p"));
    // P keeps one slot for the lineage, and nothing else.
    assert_eq!(slots_of(&alpha, &certs, "p"), 1);

    // Two of P's 128 tracks change: the next job sends exactly those two.
    write_track(&alpha, "p", 10, 0xa1);
    write_track(&alpha, "p", 70, 0xa2);
    let second = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(
        send_of(&second),
        ("incremental".into(), 2, 0, 2),
        "{second}"
    );
    assert_eq!(second["send"]["since_job"], first["job"]);
    assert_eq!(tracks_moved(&second), (2, 2), "{second}");
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p"));
    assert_eq!(
        slots_of(&alpha, &certs, "p"),
        1,
        "the frozen slot was freed"
    );

    // S's host writes one track, P's host another: both are sent, and S is P again.
    write_track(&beta, "s", 20, 0xb1);
    write_track(&alpha, "p", 30, 0xa3);
    let third = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(send_of(&third), ("incremental".into(), 1, 1, 2), "{third}");
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p"));

    // Nothing changed: nothing is sent, and S is with its hosts at the end.
    let fourth = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(
        send_of(&fourth),
        ("incremental".into(), 0, 0, 0),
        "{fourth}"
    );
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p"));
    let shown = json(&alpha, &certs, &["volume", "show", "s", "--json"]);
    assert_eq!(shown["on_node"]["readiness"], "ready", "{shown}");

    // While the lineage exists, only hosts may change P and S.
    refused(&alpha, &certs, &["snap", "x", "p"], "gsnap forget p s");
    refused(
        &alpha,
        &certs,
        &["volume", "delete", "s"],
        "gsnap forget p s",
    );

    // --full sends everything, and the lineage goes on.
    write_track(&alpha, "p", 99, 0xa4);
    let full = gsnap(&alpha, &certs, &["p", "p-mid", "s", "--full"]);
    assert_eq!(send_of(&full).0, "full");
    assert_eq!(full["send"]["reason"], "--full asks for every track");
    assert_eq!(tracks_moved(&full), (TRACKS, TRACKS));
    write_track(&alpha, "p", 100, 0xa5);
    let after_full = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(send_of(&after_full), ("incremental".into(), 1, 0, 1));
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p"));

    // Forgetting the lineage frees P's slot; the next job sends everything.
    refused(
        &alpha,
        &certs,
        &["gsnap", "forget", "p", "ghost"],
        "no lineage",
    );
    alpha.cli_ok(&certs, &["gsnap", "forget", "p", "s"]);
    assert_eq!(slots_of(&alpha, &certs, "p"), 0);
    alpha.cli_ok(&certs, &["volume", "delete", "x"]);
    let after_forget = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(send_of(&after_forget).0, "full", "{after_forget}");
}

/// FIG. 4's volumes (with S'): a host write to S' between two jobs is caught by S''s
/// lineage and its track sent again with P's changed track; S's named extents hold P's
/// image after each job.
#[test]
fn a_write_to_s_prime_between_jobs_is_caught_and_sent_again() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    fill(&beta, "s", 77);
    let half = (TRACKS / 2 * TRACK_BYTES) as usize;
    let extents = format!("0-{}", TRACKS / 2 - 1);
    let arguments = [
        &format!("p:{extents}") as &str,
        "p-mid",
        &format!("s:{extents}"),
        "--target-intermediate",
        "s-mid",
    ];
    let first = gsnap(&alpha, &certs, &arguments);
    assert_eq!(send_of(&first).0, "full");
    assert_eq!(read_all(&beta, "s")[..half], read_all(&alpha, "p")[..half]);

    write_track(&beta, "s-mid", 5, 0xc1);
    write_track(&alpha, "p", 40, 0xc2);
    // Outside the extents: not the job's to send.
    write_track(&alpha, "p", 100, 0xc3);
    let second = gsnap(&alpha, &certs, &arguments);
    assert_eq!(
        send_of(&second),
        ("incremental".into(), 1, 1, 2),
        "{second}"
    );
    assert_eq!(tracks_moved(&second), (2, 2), "{second}");
    let source = read_all(&alpha, "p");
    assert_eq!(read_all(&beta, "s")[..half], source[..half]);
    assert_eq!(read_all(&beta, "s-mid")[..half], source[..half]);
}

/// A cancelled incremental job leaves the lineage as the last succeeded job left it: its
/// nodes fold the frozen tracks back in, and the next job sends the tracks changed since
/// that job (the cancelled job's, which it wrote to S in part, and the newer ones).
#[test]
fn a_cancelled_job_leaves_the_lineage_and_the_next_sends_what_it_did_not_finish() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    let first = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(send_of(&first).0, "full");

    // 64 tracks change (4 MiB): at 1 MiB/s the next job is still copying when cancelled.
    for track in 0..64 {
        write_track(&alpha, "p", track, 0x80 + track as u8);
    }
    let job = a_slow_job_copying(&alpha, &certs, &["p", "p-mid", "s"]);
    alpha.cli_ok(&certs, &["gsnap", "cancel", &job]);
    let cancelled = run_to_end(&alpha, &certs, &job);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(send_of(&cancelled), ("incremental".into(), 64, 0, 64));
    assert_eq!(
        catalog_record(&alpha, &certs, "s")["readiness"],
        "not-ready",
        "S holds part of the cancelled job's tracks"
    );
    // The frozen slot was folded into the live one and freed.
    assert_eq!(slots_of(&alpha, &certs, "p"), 1);

    write_track(&alpha, "p", 100, 0xe1);
    let next = gsnap(&alpha, &certs, &["p", "p-mid", "s"]);
    assert_eq!(send_of(&next), ("incremental".into(), 65, 0, 65), "{next}");
    assert_eq!(next["send"]["since_job"], first["job"]);
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p"));
    assert_eq!(catalog_record(&alpha, &certs, "s")["readiness"], "ready");
    assert_eq!(slots_of(&alpha, &certs, "p"), 1);
}
