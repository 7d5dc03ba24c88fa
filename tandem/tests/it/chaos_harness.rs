//! The chaos harness against the real binary (issue 13): a short seeded schedule on a
//! cluster of processes finds nothing, and each deliberate bug of the node is reported by
//! the checker that guards its promise. `tandem-chaos` runs the long schedules in CI.

use chaos::check::Checker;
use chaos::processes::ProcessCluster;
use chaos::round::{RunConfig, Runner, Summary};
use chaos::schedule::{CopyKind, FaultKind, ScheduleConfig};
use std::path::PathBuf;

fn tandem() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// Runs `rounds` rounds of a schedule drawn from `kinds` and `copies` on a new cluster of
/// three members at site-a and one node at site-b, with `bug` turned on in every node.
fn run(
    seed: u64,
    rounds: u64,
    kinds: &[FaultKind],
    copies: &[CopyKind],
    bug: Option<&str>,
) -> Summary {
    run_from(seed, 0, rounds, kinds, copies, bug)
}

fn run_from(
    seed: u64,
    first_round: u64,
    rounds: u64,
    kinds: &[FaultKind],
    copies: &[CopyKind],
    bug: Option<&str>,
) -> Summary {
    let config = RunConfig {
        seed,
        rounds,
        first_round,
        schedule: ScheduleConfig {
            kinds: kinds.to_vec(),
            copies: copies.to_vec(),
            ..ScheduleConfig::default()
        },
        ..RunConfig::default()
    };
    run_config(config, bug)
}

fn run_config(config: RunConfig, bug: Option<&str>) -> Summary {
    let environment: Vec<(String, String)> = bug
        .map(|bug| vec![("TANDEM_DELIBERATE_BUG".to_string(), bug.to_string())])
        .unwrap_or_default();
    let cluster = ProcessCluster::start(&tandem(), 3, 1, &environment).expect("the cluster starts");
    let mut runner = Runner::new(Box::new(cluster), tandem(), config).expect("the runner starts");
    runner.verbose = true;
    let summary = runner.run().expect("the run completes").clone();
    println!("{summary}");
    for (round, finding) in &summary.findings {
        println!("  round {round}: {finding}");
    }
    summary
}

fn seed() -> u64 {
    let seed = std::env::var("TANDEM_CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos seed {seed} (set TANDEM_CHAOS_SEED to replay)");
    seed
}

#[test]
fn a_short_schedule_of_every_fault_and_copy_finds_nothing() {
    let summary = run(seed(), 6, &FaultKind::ALL, &CopyKind::ALL, None);
    assert_eq!(summary.rounds, 6);
    assert!(summary.acknowledged_writes_checked > 0, "{summary}");
    assert!(summary.copies_checked > 0, "{summary}");
    assert_eq!(summary.failures(), 0, "{summary}: {:?}", summary.findings);
}

/// Found by the schedule (seed 17823139598536073894, round 5: an async mirror syncing
/// while the leader was cut off from the other members): `mirror show` went from 32.8 %
/// back to 25 %, the catalog's older checkpoint shown while the node did not answer the
/// leader. The member now never shows less of one copy than it showed before.
#[test]
fn progress_shown_while_the_leader_is_cut_off_from_the_node_does_not_go_back() {
    let summary = run_from(
        17823139598536073894,
        5,
        1,
        &FaultKind::ALL,
        &CopyKind::ALL,
        None,
    );
    assert_eq!(
        summary.count(Checker::Progress),
        0,
        "{summary}: {:?}",
        summary.findings
    );
    assert!(summary.progress_readings > 0, "{summary}");
}

#[test]
fn a_flush_acknowledged_before_the_log_sync_is_reported_as_lost_writes() {
    let summary = run(
        seed(),
        2,
        &[FaultKind::KillSourceNode],
        &[CopyKind::Snap],
        Some("ack-flush-before-sync"),
    );
    assert!(summary.count(Checker::Writes) > 0, "{summary}");
}

#[test]
fn a_host_write_without_copy_before_write_is_reported_as_a_copy_mismatch() {
    let summary = run(
        seed(),
        2,
        &[],
        &[CopyKind::Clone],
        Some("skip-copy-before-write"),
    );
    assert!(summary.count(Checker::Copies) > 0, "{summary}");
}

#[test]
fn progress_that_counts_every_track_twice_is_reported_above_100() {
    let summary = run(
        seed(),
        2,
        &[],
        &[CopyKind::AsyncMirror],
        Some("progress-counts-resend-twice"),
    );
    assert!(summary.count(Checker::Progress) > 0, "{summary}");
}

#[test]
fn a_session_bit_cleared_before_the_target_acknowledged_is_reported_as_a_copy_mismatch() {
    // Calls to the target's node are lost while a mirror copies: the tracks of the calls
    // it never answered lose their bits, so the split BCV misses them. (A target killed
    // and restarted within a round does not show it: the link's calls wait for the node
    // to come back and then succeed, so no step fails.) Whether a round shows it depends
    // on the timing of its losses against the copy's steps, and on whether the writer
    // rewrote the track afterwards: one seed's 4 rounds missed it once in CI's suite, so
    // the test runs 8.
    let config = RunConfig {
        seed: seed(),
        rounds: 8,
        schedule: ScheduleConfig {
            kinds: vec![FaultKind::LoseCalls],
            copies: vec![CopyKind::SyncMirror, CopyKind::AsyncMirror],
            ..ScheduleConfig::default()
        },
        ..RunConfig::default()
    };
    let summary = run_config(config, Some("clear-bit-before-acknowledged"));
    assert!(summary.count(Checker::Copies) > 0, "{summary}");
}

/// The crash test in the sled style, on the harness: under NBD writes with FLUSH and FUA
/// the node holding the volume is killed with SIGKILL at the schedule's points and
/// restarted, and every acknowledged write reads back (a process kill loses nothing that
/// was acknowledged at all: RocksDB handed the write-ahead log to the kernel first).
#[test]
fn every_acknowledged_write_survives_kill_9_of_its_node() {
    let summary = run(
        seed(),
        6,
        &[FaultKind::KillSourceNode, FaultKind::RestartCluster],
        &[CopyKind::Snap],
        None,
    );
    let kills: u64 = summary.faults.values().sum();
    assert!(kills >= 3, "too few kills to test anything: {summary}");
    assert!(summary.acknowledged_writes_checked > 100, "{summary}");
    assert!(summary.durable_writes > 0, "{summary}");
    assert_eq!(summary.failures(), 0, "{summary}: {:?}", summary.findings);
}
