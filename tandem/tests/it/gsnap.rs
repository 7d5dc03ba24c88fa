//! gsnap (issue 12, seed 003): one command copies a point-in-time image of a volume to a
//! volume of another node, as a job the cluster drives to its end.

use crate::common::{wait_until, NodeProcess};
use crate::sessions::{fill, json, read_all, refused, TwoNodes, TRACKS, TRACK_BYTES};

/// FIG. 3 (no S'): S ends holding P's image of the instant the job snapped it, although
/// P's host writes during the copy; the job reports each step and succeeds.
#[test]
fn fig_3_a_gsnap_copies_the_image_of_its_instant_to_another_node() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    let before = read_all(&alpha, "p");

    // Bad input changes nothing: the same volume twice, an unknown one.
    refused(
        &alpha,
        &certs,
        &["gsnap", "p", "p", "s"],
        "different volumes",
    );
    refused(&alpha, &certs, &["gsnap", "p", "p-mid", "ghost"], "ghost");
    assert!(json(&alpha, &certs, &["gsnap", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());

    // At most 1 MiB/s, so the host's write below lands while the copy runs.
    let started = json(
        &alpha,
        &certs,
        &["gsnap", "p", "p-mid", "s", "--rate", "1", "--json"],
    );
    let job = started["job"].as_u64().unwrap().to_string();
    wait_until(30, "the job's snap", || {
        let shown = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
        shown["steps"][0]["finished_unix_seconds"].is_u64()
    });
    // The host writes P after the instant: S must not get it.
    fill(&alpha, "p", 9);
    // S is not with its hosts while it is being written (the copy takes about 8 s at
    // 1 MiB/s).
    wait_until(30, "the pair", || {
        let shown = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
        shown["steps"][1]["finished_unix_seconds"].is_u64()
    });
    let readiness = |volume: &str| catalog_record(&alpha, &certs, volume)["readiness"].clone();
    // Read S's readiness first, the job second: a job not activated yet when read
    // second was not activated when S was read.
    let seen = readiness("s");
    let shown = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
    let activation = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["step"] == "activate")
        .unwrap();
    if activation["started_unix_seconds"].is_null() {
        assert_eq!(
            seen, "not-ready",
            "S went to its hosts before the activation"
        );
    }
    let mut percents = Vec::new();
    wait_until(120, "the job to end", || {
        let shown = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
        percents.push(shown["percent"].as_f64().unwrap());
        shown["state"] != "running"
    });
    let report = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
    assert_eq!(report["state"], "succeeded", "{report}");
    assert_eq!(report["percent"], 100.0);
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "progress fell: {percents:?}"
    );
    assert!(percents.iter().all(|percent| *percent <= 100.0));
    for step in report["steps"].as_array().unwrap() {
        assert!(
            step["finished_unix_seconds"].is_u64() || step["skipped"] == true,
            "{step}"
        );
    }
    // The copy is proven: both nodes digested their own stored bytes, and they agree.
    let rounds = report["verification"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{report}");
    assert_eq!(rounds[0]["matched"], true);
    assert_eq!(rounds[0]["source_digest"], rounds[0]["target_digest"]);
    assert_eq!(rounds[0]["source_digest"].as_str().unwrap().len(), 64);
    assert_eq!(rounds[0]["tracks"], TRACKS);
    assert_eq!(
        read_all(&beta, "s"),
        before,
        "S holds P's image of the instant"
    );
    assert_eq!(read_all(&alpha, "p-mid"), before);
    assert_ne!(read_all(&alpha, "p"), before, "P's host wrote on");
    // Nothing is left of the pair, and S is with its hosts.
    assert!(json(&alpha, &certs, &["clone", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(readiness("s"), "ready");
    let listed = json(&alpha, &certs, &["gsnap", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

/// FIG. 4 (with S'): the pair copies into S' on S's node (made by the job, as it did not
/// exist) while S stays with its hosts; at the end only S's named extents hold P's image,
/// and its other tracks keep what its host wrote.
#[test]
fn fig_4_with_s_prime_only_the_named_extents_of_s_change_and_s_stays_online() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    // S' does not exist: the job makes it on S's node.
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    fill(&beta, "s", 77);
    let source = read_all(&alpha, "p");
    let target_before = read_all(&beta, "s");
    let half = (TRACKS / 2 * TRACK_BYTES) as usize;
    let extents = format!("0-{}", TRACKS / 2 - 1);
    let started = json(
        &alpha,
        &certs,
        &[
            "gsnap",
            &format!("p:{extents}"),
            "p-mid",
            &format!("s:{extents}"),
            "--target-intermediate",
            "s-mid",
            "--rate",
            "1",
            "--json",
        ],
    );
    let job = started["job"].as_u64().unwrap().to_string();
    // S serves its hosts during the whole job.
    wait_until(120, "the job to end", || {
        let s = catalog_record(&alpha, &certs, "s");
        assert_eq!(s["readiness"], "ready", "S left its hosts: {s}");
        let shown = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
        shown["state"] != "running"
    });
    let report = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
    assert_eq!(report["state"], "succeeded", "{report}");
    let made = json(&alpha, &certs, &["volume", "show", "s-mid", "--json"]);
    assert_eq!(made["node"], "beta", "{made}");
    let target = read_all(&beta, "s");
    assert_eq!(
        &target[..half],
        &source[..half],
        "S's extents hold P's image"
    );
    assert_eq!(
        &target[half..],
        &target_before[half..],
        "S's other tracks keep what its host wrote"
    );
}

/// The catalog's record of `volume`, as `volume list --json` shows it.
pub(crate) fn catalog_record(
    node: &NodeProcess,
    certs: &std::path::Path,
    volume: &str,
) -> serde_json::Value {
    let volumes = json(node, certs, &["volume", "list", "--json"]);
    volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|record| record["name"] == volume)
        .unwrap_or_else(|| panic!("{volume} is not in {volumes}"))
        .clone()
}

/// The state and the verification rounds of a job once it ended.
pub(crate) fn run_to_end(
    alpha: &NodeProcess,
    certs: &std::path::Path,
    job: &str,
) -> serde_json::Value {
    run_to_end_from(alpha, certs, job, &mut Vec::new())
}

/// [`run_to_end`], checking every percent it reads, after those already read: progress
/// never falls and is 100 only once the job succeeded.
pub(crate) fn run_to_end_from(
    alpha: &NodeProcess,
    certs: &std::path::Path,
    job: &str,
    percents: &mut Vec<f64>,
) -> serde_json::Value {
    let mut shown = serde_json::Value::Null;
    wait_until(120, "the job to end", || {
        shown = json(alpha, certs, &["gsnap", "show", job, "--json"]);
        percents.push(shown["percent"].as_f64().unwrap());
        !matches!(shown["state"].as_str(), Some("running" | "stalled"))
    });
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "progress fell: {percents:?}"
    );
    let (last, before_last) = percents.split_last().unwrap();
    assert!(
        before_last.iter().all(|percent| *percent < 100.0),
        "{percents:?}"
    );
    assert!(*last <= 100.0);
    assert_eq!(*last == 100.0, shown["state"] == "succeeded", "{shown}");
    shown
}

/// Verification: a track the target's disk stores corrupted (a test hook flips one of
/// its bytes after the copy's checksums were checked) is found by the digests of the
/// stored bytes, sent again, and the second round matches; S ends equal to P'.
#[test]
fn verification_finds_a_track_stored_corrupted_and_sends_it_again() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster_with(
        &[("p", "alpha"), ("s", "beta")],
        &[],
        &[],
        &[(
            "FAILPOINTS",
            "node::store::corrupt-copied-track=return(3:once)",
        )],
    );
    fill(&alpha, "p", 5);
    let before = read_all(&alpha, "p");
    let started = json(&alpha, &certs, &["gsnap", "p", "p-mid", "s", "--json"]);
    let job = started["job"].as_u64().unwrap().to_string();
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    let rounds = report["verification"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report}");
    assert_eq!(rounds[0]["matched"], false);
    assert_eq!(rounds[0]["differing"], serde_json::json!([3]));
    assert_eq!(rounds[0]["resent"], true);
    assert_eq!(rounds[1]["matched"], true);
    assert_eq!(rounds[0]["source_digest"], rounds[1]["source_digest"]);
    assert_eq!(read_all(&beta, "s"), before, "S holds P's image");
    // The text report says what was sent again.
    let text = alpha.cli_ok(&certs, &["gsnap", "show", &job]);
    assert!(text.contains("1 tracks differ (3), sent again"), "{text}");
}

/// A track stored corrupted every time it is sent: after the rounds allowed the job
/// fails at its verification with `digest-mismatch`, ends its pair, and S (without S')
/// stays not ready, as a partial copy must.
#[test]
fn a_track_corrupted_every_time_fails_the_job_with_digest_mismatch() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, _beta) = nodes.start_cluster_with(
        &[("p", "alpha"), ("s", "beta")],
        &[],
        &[],
        &[("FAILPOINTS", "node::store::corrupt-copied-track=return(3)")],
    );
    fill(&alpha, "p", 5);
    let started = json(&alpha, &certs, &["gsnap", "p", "p-mid", "s", "--json"]);
    let job = started["job"].as_u64().unwrap().to_string();
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(report["error"]["step"], "verify", "{report}");
    assert_eq!(report["error"]["code"], "digest-mismatch", "{report}");
    let detail = report["error"]["detail"].as_str().unwrap();
    assert!(detail.contains("tracks 3"), "{detail}");
    let rounds = report["verification"].as_array().unwrap();
    assert_eq!(rounds.len(), protocol::gsnap::VERIFY_ROUNDS_MAX, "{report}");
    assert!(rounds.iter().all(|round| round["matched"] == false));
    assert_eq!(rounds.last().unwrap()["resent"], false);
    assert!(json(&alpha, &certs, &["clone", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    let s = catalog_record(&alpha, &certs, "s");
    assert_eq!(
        s["readiness"], "not-ready",
        "a partial S went to its hosts: {s}"
    );
}

/// A partition between the nodes mid-copy: the job shows `stalled` with the reason
/// once it has made no progress for the threshold, and completes when the partition
/// heals, S holding P's image.
#[test]
fn a_gsnap_stalls_while_the_nodes_are_partitioned_and_completes_after() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster_with(
        &[("p", "alpha"), ("s", "beta"), ("q", "alpha"), ("r", "beta")],
        &["--fault-injection"],
        &[],
        &[],
    );
    fill(&alpha, "p", 5);
    let before = read_all(&alpha, "p");
    let started = json(
        &alpha,
        &certs,
        &["gsnap", "p", "p-mid", "s", "--rate", "1", "--json"],
    );
    let job = started["job"].as_u64().unwrap().to_string();
    wait_until(30, "the copy to start", || {
        let shown = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
        shown["tracks_copied"].as_u64().unwrap_or(0) > 0
    });
    alpha.cli_ok(&certs, &["debug", "fault", "--peer", "beta", "--drop"]);
    let mut stalled = serde_json::Value::Null;
    wait_until(
        protocol::gsnap::STALL_AFTER_SECONDS + 60,
        "the job to show stalled",
        || {
            stalled = json(&alpha, &certs, &["gsnap", "show", &job, "--json"]);
            stalled["state"] == "stalled"
        },
    );
    let reason = stalled["stalled"]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("beta") || reason.contains("suspended"),
        "{reason}"
    );
    let text = alpha.cli_ok(&certs, &["gsnap", "list"]);
    assert!(text.contains("stalled: "), "{text}");
    // A new job towards the cut-off node is refused, and nothing is recorded.
    let refused = alpha.cli_env(
        &certs,
        &["gsnap", "q", "q-mid", "r"],
        "TANDEM_RETRY_SECONDS",
        "0",
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a job towards a cut-off node was recorded"
    );
    assert!(stderr.contains("nothing was recorded"), "{stderr}");
    assert_eq!(
        json(&alpha, &certs, &["gsnap", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    alpha.cli_ok(&certs, &["debug", "fault", "--peer", "beta"]);
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    assert!(report["stalled"].is_null());
    assert_eq!(read_all(&beta, "s"), before, "S holds P's image");
}

/// Extents at other offsets: P's tracks land on S's extents in order wherever those
/// start — FIG. 3 (no S') with P's tracks 0-31 on S's 64-95, then FIG. 4 (S' made by
/// the job) with P's tracks 32-47 on S's 100-107 and 120-127. S's other tracks keep what
/// they held; extents of different sizes are refused with nothing made.
#[test]
fn extents_at_other_offsets_land_in_order() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta")]);
    fill(&alpha, "p", 5);
    fill(&beta, "s", 77);
    let source = read_all(&alpha, "p");
    let before = read_all(&beta, "s");
    let track = TRACK_BYTES as usize;

    refused(
        &alpha,
        &certs,
        &["gsnap", "p:0-31", "p-mid", "s:64-94"],
        "same number",
    );
    refused(
        &alpha,
        &certs,
        &["gsnap", "p:0-31", "p-mid", "s:100-131"],
        "does not fit",
    );
    assert!(json(&alpha, &certs, &["gsnap", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(!alpha
        .cli(&certs, &["volume", "show", "p-mid"])
        .status
        .success());

    let started = json(
        &alpha,
        &certs,
        &["gsnap", "p:0-31", "p-mid", "s:64-95", "--json"],
    );
    let job = started["job"].as_u64().unwrap().to_string();
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    let target = read_all(&beta, "s");
    assert_eq!(&target[64 * track..96 * track], &source[..32 * track]);
    assert_eq!(&target[..64 * track], &before[..64 * track]);
    assert_eq!(&target[96 * track..], &before[96 * track..]);

    let started = json(
        &alpha,
        &certs,
        &[
            "gsnap",
            "p:32-47",
            "p-mid",
            "s:100-107,120-127",
            "--target-intermediate",
            "s-mid",
            "--json",
        ],
    );
    let job = started["job"].as_u64().unwrap().to_string();
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    let after = read_all(&beta, "s");
    assert_eq!(
        &after[100 * track..108 * track],
        &source[32 * track..40 * track]
    );
    assert_eq!(
        &after[120 * track..128 * track],
        &source[40 * track..48 * track]
    );
    assert_eq!(&after[..100 * track], &target[..100 * track]);
    assert_eq!(
        &after[108 * track..120 * track],
        &target[108 * track..120 * track]
    );
}

/// Starts a gsnap at 1 MiB/s and waits until its copy has begun; the job's id.
pub(crate) fn a_slow_job_copying(
    alpha: &NodeProcess,
    certs: &std::path::Path,
    arguments: &[&str],
) -> String {
    let mut command = vec!["gsnap"];
    command.extend(arguments);
    command.extend(["--rate", "1", "--json"]);
    let started = json(alpha, certs, &command);
    let job = started["job"].as_u64().unwrap().to_string();
    wait_until(30, "the copy to start", || {
        let shown = json(alpha, certs, &["gsnap", "show", &job, "--json"]);
        shown["tracks_copied"].as_u64().unwrap_or(0) > 0
    });
    job
}

/// `gsnap cancel` mid-copy: the job ends `cancelled`, its pair is gone and P''s slots are
/// free; without S' the partial S stays not ready; with S', S keeps what it held and stays
/// with its hosts. The catalog holds nothing half-done: the next job runs.
#[test]
fn a_cancel_mid_copy_ends_the_pair_and_leaves_nothing_half_done() {
    let nodes = TwoNodes::new();
    let certs = nodes.certs.clone();
    let (alpha, beta) = nodes.start_cluster(&[("p", "alpha"), ("s", "beta"), ("s2", "beta")]);
    fill(&alpha, "p", 5);
    fill(&beta, "s2", 77);
    let s2_before = read_all(&beta, "s2");
    let slots_of = |volume: &str| {
        let shown = json(&alpha, &certs, &["volume", "show", volume, "--json"]);
        shown["on_node"]["session_slots_used"].as_u64().unwrap()
    };

    let job = a_slow_job_copying(&alpha, &certs, &["p", "p-mid", "s"]);
    alpha.cli_ok(&certs, &["gsnap", "cancel", &job]);
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "cancelled", "{report}");
    assert!(json(&alpha, &certs, &["clone", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(slots_of("p-mid"), 0, "P''s slots are free");
    assert_eq!(
        catalog_record(&alpha, &certs, "s")["readiness"],
        "not-ready",
        "a partial S went to its hosts"
    );

    let job = a_slow_job_copying(
        &alpha,
        &certs,
        &["p", "p-mid2", "s2", "--target-intermediate", "s2-mid"],
    );
    alpha.cli_ok(&certs, &["gsnap", "cancel", &job]);
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "cancelled", "{report}");
    assert_eq!(slots_of("p-mid2"), 0);
    assert_eq!(catalog_record(&alpha, &certs, "s2")["readiness"], "ready");
    assert_eq!(read_all(&beta, "s2"), s2_before, "S kept what it held");

    // Nothing half-done is left in the way: a job over the same volumes runs to its end.
    let started = json(&alpha, &certs, &["gsnap", "p", "p-mid", "s", "--json"]);
    let job = started["job"].as_u64().unwrap().to_string();
    let report = run_to_end(&alpha, &certs, &job);
    assert_eq!(report["state"], "succeeded", "{report}");
    assert_eq!(read_all(&beta, "s"), read_all(&alpha, "p-mid"));
}
