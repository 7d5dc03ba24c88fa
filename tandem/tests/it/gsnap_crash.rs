//! gsnap jobs whose leader dies at each boundary of their node calls (issue 12): after an
//! intent is committed and before its node is called, after the node carried a call out
//! and before its answer is committed — for the job's snap and for each command of its
//! pair. The next leader resumes the job from the catalog with no CLI retry; the job
//! succeeds, S holds P's image of the job's instant, and no node call ran twice with an
//! effect (the node's counters of calls carried out and answered from memory say so).
//! And kill -9 of P's node (with the leader) and of S's node in the middle of the copy.

use crate::gsnap::{a_slow_job_copying, run_to_end};
use crate::gsnap_incremental::write_track;
use crate::idempotent::{Trio, FAIL_POINT, INTENT_FAIL_POINT, MEMBERS, RESULT_FAIL_POINT, STORAGE};
use crate::metrics::{scrape, series};
use crate::sessions::{fill, json, read_all, TwoNodes};

/// P's node: a member that does not lead first, so it outlives the leader.
const SOURCE_NODE: &str = MEMBERS[1];

/// Runs a gsnap P (on member-b) → S (on member-c) while the first leader dies at fail
/// point `place` for the node call `call`, and checks the job's end.
fn a_job_outlives_its_leader_dying_at(place: &str, call: &str) {
    let mut trio = Trio::start_at(place, call);
    trio.create_volume_on("p", SOURCE_NODE);
    trio.create_volume_on("s", STORAGE);
    let source = &trio.nodes[SOURCE_NODE];
    fill(source, "p", 21);
    let image = read_all(source, "p");
    let started = trio.cli_json(&["gsnap", "p", "p-mid", "s", "--json"]);
    let job = started["job"].as_u64().unwrap().to_string();
    trio.wait_for_the_leader_to_die();
    let report = run_to_end(trio.storage(), &trio.certs, &job);
    assert_eq!(report["state"], "succeeded", "{place} ({call}): {report}");
    let source = &trio.nodes[SOURCE_NODE];
    assert_eq!(
        read_all(source, "p-mid"),
        image,
        "P' holds P's image of the job's instant"
    );
    assert_eq!(read_all(trio.storage(), "s"), image, "S holds P's image");
    // The call the leader died at was carried out once on P's node; a new leader that
    // asked again got the remembered answer.
    let metrics = scrape(source);
    let carried_out = format!(r#"tandem_node_calls_carried_out_total{{call="{call}"}}"#);
    assert_eq!(
        series(&metrics, &carried_out),
        Some(1.0),
        "{place} ({call}): the node carried the call out other than once"
    );
    // A snap's intent is driven again by the next leader, which gets the remembered
    // answer. A pair's command may instead be learnt from the node's session as the
    // supervisor polls it: either way it is not carried out twice.
    if place == RESULT_FAIL_POINT {
        let replayed = format!(r#"tandem_node_calls_replayed_total{{call="{call}"}}"#);
        assert_eq!(
            series(&metrics, &replayed),
            Some(1.0),
            "{place} ({call}): the next leader did not get the remembered answer"
        );
    }
}

#[test]
fn a_job_whose_leader_died_after_recording_its_snap_is_finished_by_the_next_leader() {
    a_job_outlives_its_leader_dying_at(INTENT_FAIL_POINT, "snap");
}

#[test]
fn a_job_whose_leader_died_after_its_node_snapped_does_not_snap_again() {
    a_job_outlives_its_leader_dying_at(RESULT_FAIL_POINT, "snap");
}

#[test]
fn a_job_whose_leader_died_after_its_pair_was_created_does_not_create_it_again() {
    a_job_outlives_its_leader_dying_at(FAIL_POINT, "clone create");
}

#[test]
fn a_job_whose_leader_died_after_its_pair_was_activated_does_not_activate_it_again() {
    a_job_outlives_its_leader_dying_at(FAIL_POINT, "clone activate");
}

#[test]
fn a_job_whose_leader_died_after_its_pair_was_terminated_does_not_terminate_it_again() {
    a_job_outlives_its_leader_dying_at(FAIL_POINT, "clone terminate");
}

/// kill -9 of S's node mid-copy: the pair is suspended while it is away, and when it is
/// back the job goes on to a verified success with S equal to P's image.
#[test]
fn a_job_outlives_its_target_node_killed_mid_copy() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, mut beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    let image = read_all(&alpha, "p");
    let job = a_slow_job_copying(&alpha, &certs, &["p", "p-mid", "s"]);
    beta.kill();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let beta = nodes.start_beta();
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    assert_eq!(
        report["verification"].as_array().unwrap().last().unwrap()["matched"],
        true
    );
    assert_eq!(read_all(&beta, "s"), image, "S holds P's image");
}

/// kill -9 of P's node mid-copy (here also the one member, so the leader dies with it):
/// restarted, the node resumes the pair from its stored bits and the new leader the job
/// from the catalog; the job succeeds with S equal to P's image of the job's instant.
#[test]
fn a_job_outlives_its_source_node_and_leader_killed_mid_copy() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (mut alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    let image = read_all(&alpha, "p");
    let job = a_slow_job_copying(&alpha, &certs, &["p", "p-mid", "s"]);
    fill(&alpha, "p", 6);
    let before = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
    let mut percents = vec![before["percent"].as_f64().unwrap()];
    alpha.kill();
    let alpha = nodes.start_alpha();
    // Progress read after the restart never falls below what was read before it.
    let report = crate::gsnap::run_to_end_from(&alpha, &certs, &job, &mut percents);
    assert_eq!(report["state"], "succeeded", "{report}");
    assert_eq!(
        read_all(&alpha, "p-mid"),
        image,
        "P' kept the job's instant"
    );
    assert_eq!(
        read_all(&beta, "s"),
        image,
        "S holds P's image of the job's instant"
    );
    assert_ne!(read_all(&alpha, "p"), image, "P's host wrote on");
}

/// An incremental job whose leader dies at `place` (armed to let its first evaluation,
/// the first job's, pass): the next leader finishes it, it sends exactly the tracks
/// written since the first job on either side, S equals P, and the node call the leader
/// died after was answered from memory, not carried out again.
fn an_incremental_job_outlives_its_leader_dying_at(place: &str, call: &str, node_of_call: &str) {
    let mut trio = Trio::start_armed(&format!("{place}=1*off->return({call})"));
    trio.create_volume_on("p", SOURCE_NODE);
    trio.create_volume_on("s", STORAGE);
    fill(&trio.nodes[SOURCE_NODE], "p", 21);
    let first = trio.cli_json(&["gsnap", "p", "p-mid", "s", "--json"]);
    let report = run_to_end(trio.storage(), &trio.certs, &first["job"].to_string());
    assert_eq!(report["state"], "succeeded", "{report}");
    write_track(&trio.nodes[SOURCE_NODE], "p", 7, 0x71);
    write_track(trio.storage(), "s", 90, 0x72);

    let second = trio.cli_json(&["gsnap", "p", "p-mid", "s", "--json"]);
    trio.wait_for_the_leader_to_die();
    let report = run_to_end(trio.storage(), &trio.certs, &second["job"].to_string());
    assert_eq!(report["state"], "succeeded", "{place} ({call}): {report}");
    let send = &report["send"];
    assert_eq!(send["mode"], "incremental", "{report}");
    assert_eq!(send["source_changed_tracks"], 1, "{report}");
    assert_eq!(send["target_changed_tracks"], 1, "{report}");
    assert_eq!(send["tracks"], 2, "{report}");
    assert_eq!(
        read_all(trio.storage(), "s"),
        read_all(&trio.nodes[SOURCE_NODE], "p"),
        "S equals P after the incremental job"
    );
    let metrics = scrape(&trio.nodes[node_of_call]);
    let replayed = format!(r#"tandem_node_calls_replayed_total{{call="{call}"}}"#);
    assert_eq!(
        series(&metrics, &replayed),
        Some(1.0),
        "{place} ({call}): the next leader did not get the remembered answer"
    );
}

#[test]
fn an_incremental_job_whose_leader_died_after_p_snapped_and_rotated_sends_exactly_the_changes() {
    an_incremental_job_outlives_its_leader_dying_at(RESULT_FAIL_POINT, "snap", SOURCE_NODE);
}

#[test]
fn an_incremental_job_whose_leader_died_after_the_target_rotated_sends_exactly_the_changes() {
    an_incremental_job_outlives_its_leader_dying_at(
        "control-plane::gsnap::after-lineage-rotate",
        "lineage",
        STORAGE,
    );
}
