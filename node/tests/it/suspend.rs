//! Losing a session's remote target (issue 11 item 5): a sync mirror whose BCV does not
//! answer is suspended after one target timeout and host writes go on; it resumes by
//! itself and resynchronizes exactly what was written meanwhile. A strict mirror fails
//! the writes instead. A cancel during the loss ends the session at once and the target
//! releases its volume when it answers again. Async mirrors and clones suspend too.

use node::copy::remote::TargetLink;
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::Durability;
use node::store::VolumeStore;
use protocol::session::{
    MirrorMode, RemoteVolume, SessionCommand, SessionInfo, SessionKind, SessionState, TargetAnswer,
    TargetOperation,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TRACKS: u64 = 64;
const TRACK_BYTES: u64 = 4096;
/// The target timeout the mirrors of these tests are established with.
const TIMEOUT_MILLISECONDS: u64 = 300;

/// The link to the node holding the target: another `Sessions` in this process, and a
/// switch that makes it stop answering. A silent target makes a bounded call wait its
/// whole bound, as a dead node does, and an unbounded one fail.
struct Silenceable {
    target: Arc<Sessions<MemoryEngine>>,
    silent: AtomicBool,
    /// How long a release takes to be answered (a slow but live node), milliseconds.
    release_delay_milliseconds: AtomicU64,
    /// Set when a release reached the link.
    release_started: AtomicBool,
}

impl Silenceable {
    fn serve(&self, operation: TargetOperation) -> node::Result<TargetAnswer> {
        if matches!(operation, TargetOperation::Release { .. }) {
            self.release_started.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(
                self.release_delay_milliseconds.load(Ordering::SeqCst),
            ));
        }
        self.target.serve_target(operation)
    }
}

impl TargetLink for Silenceable {
    fn call(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> node::Result<TargetAnswer> {
        if self.silent.load(Ordering::SeqCst) {
            return Err(node::Error::Remote {
                node: remote.node.clone(),
                detail: "no connection within 2 seconds".to_string(),
            });
        }
        self.serve(operation)
    }

    fn call_within(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
        timeout: Duration,
    ) -> node::Result<TargetAnswer> {
        if self.silent.load(Ordering::SeqCst) {
            std::thread::sleep(timeout);
            return Err(node::Error::TargetUnanswered {
                node: remote.node.clone(),
                volume: remote.volume.clone(),
                timeout_milliseconds: timeout.as_millis() as u64,
            });
        }
        self.serve(operation)
    }

    fn this_node(&self) -> (String, String) {
        ("alpha".to_string(), "127.0.0.1:1".to_string())
    }
}

struct Pair {
    source: Arc<Sessions<MemoryEngine>>,
    target: Arc<Sessions<MemoryEngine>>,
    link: Arc<Silenceable>,
}

fn memory_sessions(link: Option<Arc<dyn TargetLink>>) -> Sessions<MemoryEngine> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    Sessions::open(store, 1 << 20, link).unwrap()
}

/// Node alpha with volume `std` (filled), node beta with `bcv`.
fn pair() -> Pair {
    let target = Arc::new(memory_sessions(None));
    target
        .store()
        .create("bcv", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    let link = Arc::new(Silenceable {
        target: target.clone(),
        silent: AtomicBool::new(false),
        release_delay_milliseconds: AtomicU64::new(0),
        release_started: AtomicBool::new(false),
    });
    let source = Arc::new(memory_sessions(Some(link.clone())));
    source
        .store()
        .create("std", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    for track in 0..TRACKS {
        write(&source, track, track as u8 + 1).unwrap();
    }
    Pair {
        source,
        target,
        link,
    }
}

/// [`pair`] with a clone destination `dst` on beta too.
fn pair_with_destination() -> Pair {
    let pair = pair();
    pair.target
        .store()
        .create("dst", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    pair
}

fn beta(volume: &str) -> RemoteVolume {
    RemoteVolume {
        node: "beta".into(),
        address: "127.0.0.1:2".into(),
        volume: volume.into(),
    }
}

fn write(sessions: &Sessions<MemoryEngine>, track: u64, byte: u8) -> node::Result<()> {
    let handle = sessions.store().volume("std").unwrap();
    sessions.write(
        &handle,
        track * TRACK_BYTES,
        TRACK_BYTES,
        Some(&vec![byte; TRACK_BYTES as usize]),
        Durability::Logged,
    )
}

fn establish(pair: &Pair, mode: MirrorMode, strict: bool) -> SessionInfo {
    let info = pair
        .source
        .command_with(
            SessionCommand::MirrorEstablish {
                standard: "std".into(),
                bcv: "bcv".into(),
                mode,
                strict,
                target_timeout_milliseconds: Some(TIMEOUT_MILLISECONDS),
            },
            Some(beta("bcv")),
        )
        .unwrap()
        .unwrap();
    pair.source.settle().unwrap();
    let synchronized = show(pair);
    assert_eq!(synchronized.state, SessionState::Synchronized);
    info
}

fn show(pair: &Pair) -> SessionInfo {
    pair.source.show(SessionKind::Mirror, "bcv").unwrap()
}

fn image(sessions: &Sessions<MemoryEngine>, volume: &str) -> Vec<u8> {
    let store = sessions.store();
    let handle = store.volume(volume).unwrap();
    store.read(&handle, 0, TRACKS * TRACK_BYTES).unwrap()
}

#[test]
fn a_sync_mirror_whose_bcv_stops_answering_is_suspended_once_and_resyncs_what_was_written() {
    let pair = pair();
    let established = establish(&pair, MirrorMode::Sync, false);
    assert_eq!(
        established.target_timeout_milliseconds,
        TIMEOUT_MILLISECONDS
    );
    assert!(!established.strict);
    write(&pair.source, 1, 0x11).unwrap();
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));

    pair.link.silent.store(true, Ordering::SeqCst);
    // The first write waits one target timeout, then is acknowledged.
    let started = Instant::now();
    write(&pair.source, 5, 0x55).unwrap();
    let first = started.elapsed();
    assert!(
        first >= Duration::from_millis(TIMEOUT_MILLISECONDS),
        "the write did not wait for the BCV: {first:?}"
    );
    assert!(
        first < Duration::from_millis(TIMEOUT_MILLISECONDS * 3),
        "{first:?}"
    );
    let suspended = show(&pair);
    assert_eq!(suspended.state, SessionState::Suspended);
    let reason = suspended.error.clone().expect("the reason is shown");
    assert!(
        reason.contains("node beta") && reason.contains("did not answer"),
        "{reason}"
    );
    assert_eq!(suspended.last_error.unwrap().message, reason);
    // Later writes do not wait: they only mark the session's bits.
    let started = Instant::now();
    for (track, byte) in [(6, 0x66), (7, 0x77), (5, 0x5a), (40, 0x40)] {
        write(&pair.source, track, byte).unwrap();
    }
    let later = started.elapsed();
    assert!(
        later < Duration::from_millis(TIMEOUT_MILLISECONDS),
        "writes during the loss waited {later:?}"
    );
    let written_meanwhile = 4; // tracks 5, 6, 7 and 40
    assert_eq!(show(&pair).tracks_remaining, written_meanwhile);
    // Split is refused with the reason and the way out; probing a silent target changes
    // nothing.
    let refusal = pair
        .source
        .command(SessionCommand::MirrorSplit {
            bcv: "bcv".into(),
            differential: false,
        })
        .unwrap_err()
        .to_string();
    assert!(
        refusal.contains("suspended") && refusal.contains("tandem mirror cancel"),
        "{refusal}"
    );
    assert_eq!(pair.source.probe_targets().unwrap(), Vec::<u64>::new());
    assert_eq!(show(&pair).state, SessionState::Suspended);

    // The BCV answers again: the session resyncs exactly the tracks written meanwhile.
    pair.link.silent.store(false, Ordering::SeqCst);
    assert_eq!(pair.source.probe_targets().unwrap(), vec![established.id]);
    let resyncing = show(&pair);
    assert_eq!(resyncing.state, SessionState::Syncing);
    assert_eq!(
        (resyncing.tracks_total, resyncing.tracks_remaining),
        (written_meanwhile, written_meanwhile)
    );
    assert_eq!(resyncing.error, None);
    pair.source.settle().unwrap();
    let synchronized = show(&pair);
    assert_eq!(synchronized.state, SessionState::Synchronized);
    assert_eq!(
        (synchronized.tracks_total, synchronized.tracks_copied),
        (written_meanwhile, written_meanwhile)
    );
    assert_eq!(synchronized.tracks_copied_last, written_meanwhile);
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));
    // Synchronous again: a write reaches the BCV before it is acknowledged.
    write(&pair.source, 9, 0x99).unwrap();
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));
}

#[test]
fn a_strict_sync_mirror_fails_writes_while_its_bcv_does_not_answer() {
    let pair = pair();
    let established = establish(&pair, MirrorMode::Sync, true);
    assert!(established.strict);
    pair.link.silent.store(true, Ordering::SeqCst);
    for track in [3, 4] {
        let started = Instant::now();
        let error = write(&pair.source, track, 0x33).unwrap_err();
        assert!(error.to_string().contains("did not answer"), "{error}");
        assert!(
            started.elapsed() < Duration::from_millis(TIMEOUT_MILLISECONDS * 3),
            "a strict write waits one target timeout, not the link's own"
        );
    }
    assert_eq!(show(&pair).state, SessionState::Synchronized);
    pair.link.silent.store(false, Ordering::SeqCst);
    pair.source.settle().unwrap();
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));
    // --strict is for sync mirrors only.
    let refusal = pair
        .source
        .command_with(
            SessionCommand::MirrorEstablish {
                standard: "std".into(),
                bcv: "other".into(),
                mode: MirrorMode::Async,
                strict: true,
                target_timeout_milliseconds: None,
            },
            Some(beta("other")),
        )
        .unwrap_err()
        .to_string();
    assert!(
        refusal.contains("--strict applies to sync mirrors only"),
        "{refusal}"
    );
}

#[test]
fn a_mirror_cancelled_while_its_bcv_does_not_answer_ends_at_once_and_the_bcv_is_released_later() {
    let pair = pair();
    establish(&pair, MirrorMode::Sync, false);
    let standard = pair.source.store().volume("std").unwrap();
    assert_eq!(standard.info().session_slots_used, 1);
    pair.link.silent.store(true, Ordering::SeqCst);
    write(&pair.source, 2, 0x22).unwrap();
    assert_eq!(show(&pair).state, SessionState::Suspended);

    let ended = pair
        .source
        .command(SessionCommand::MirrorCancel { bcv: "bcv".into() })
        .unwrap();
    assert_eq!(ended, None);
    assert!(pair.source.show(SessionKind::Mirror, "bcv").is_err());
    assert_eq!(standard.info().session_slots_used, 0, "the slot is free");
    assert_eq!(pair.source.owed_releases().unwrap().len(), 1);
    assert!(
        pair.target.involves("bcv"),
        "beta has not heard of the cancel"
    );

    // Beta answers again: the release is delivered, once.
    pair.link.silent.store(false, Ordering::SeqCst);
    pair.source.probe_targets().unwrap();
    assert!(
        !pair.target.involves("bcv"),
        "beta still holds the registration"
    );
    assert!(pair.source.owed_releases().unwrap().is_empty());
    // The BCV serves a new session.
    establish(&pair, MirrorMode::Sync, false);
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));
}

#[test]
fn a_new_session_of_the_same_source_node_replaces_a_registration_whose_release_was_lost() {
    let pair = pair();
    establish(&pair, MirrorMode::Async, false);
    pair.link.silent.store(true, Ordering::SeqCst);
    pair.source
        .command(SessionCommand::MirrorCancel { bcv: "bcv".into() })
        .unwrap();
    pair.link.silent.store(false, Ordering::SeqCst);
    // Before the copier delivered the release, the same node establishes again.
    let again = establish(&pair, MirrorMode::Sync, false);
    assert_eq!(again.state, SessionState::Syncing);
    // The stale release must not take the new session's registration.
    pair.source.probe_targets().unwrap();
    assert!(pair.target.involves("bcv"));
    write(&pair.source, 3, 0x3c).unwrap();
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));
}

#[test]
fn async_mirrors_and_clones_whose_target_stops_answering_report_suspended_and_resume() {
    let pair = pair_with_destination();
    pair.source
        .command_with(
            SessionCommand::MirrorEstablish {
                standard: "std".into(),
                bcv: "bcv".into(),
                mode: MirrorMode::Async,
                strict: false,
                target_timeout_milliseconds: None,
            },
            Some(beta("bcv")),
        )
        .unwrap();
    let clone = pair
        .source
        .command_with(
            SessionCommand::CloneCreate {
                source: "std".into(),
                target: "dst".into(),
                precopy: true,
                extents: Vec::new(),
            },
            Some(beta("dst")),
        )
        .unwrap()
        .unwrap();
    pair.link.silent.store(true, Ordering::SeqCst);
    for id in pair.source.copying() {
        assert!(pair.source.copy_step(id).is_err());
    }
    let mirror = show(&pair);
    let cloned = pair.source.show(SessionKind::Clone, "dst").unwrap();
    for info in [&mirror, &cloned] {
        assert_eq!(info.state, SessionState::Suspended, "{info:?}");
        assert!(
            info.error.as_deref().unwrap().contains("node beta"),
            "{info:?}"
        );
        assert_eq!(info.tracks_remaining, TRACKS, "{info:?}");
    }
    assert!(
        pair.source.copying().is_empty(),
        "a suspended copy does not step"
    );
    // A suspended clone cannot be activated: its destination's node would not hear it.
    let refusal = pair
        .source
        .command(SessionCommand::CloneActivate {
            target: "dst".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(refusal.contains("suspended"), "{refusal}");

    pair.link.silent.store(false, Ordering::SeqCst);
    let mut resumed = pair.source.probe_targets().unwrap();
    resumed.sort_unstable();
    assert_eq!(resumed, vec![mirror.id, clone.id]);
    assert_eq!(show(&pair).state, SessionState::Syncing);
    assert_eq!(
        pair.source.show(SessionKind::Clone, "dst").unwrap().state,
        SessionState::Precopying
    );
    pair.source.settle().unwrap();
    assert_eq!(show(&pair).state, SessionState::Synchronized);
    assert_eq!(image(&pair.target, "bcv"), image(&pair.source, "std"));
    let precopied = pair.source.show(SessionKind::Clone, "dst").unwrap();
    assert_eq!(precopied.tracks_remaining, 0, "{precopied:?}");
}

#[test]
fn host_writes_to_the_standard_do_not_wait_for_a_cancel_asking_whether_its_bcv_answers() {
    let pair = Arc::new(pair());
    establish(&pair, MirrorMode::Async, false);
    let standard = pair.source.store().volume("std").unwrap();
    // The BCV's node stops answering before any write notices: the mirror is still
    // synchronized, so the cancel must ask the BCV's node, which takes one target
    // timeout.
    pair.link.silent.store(true, Ordering::SeqCst);
    assert_eq!(show(&pair).state, SessionState::Synchronized);
    let cancelling = {
        let pair = pair.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let ended = pair
                .source
                .command(SessionCommand::MirrorCancel { bcv: "bcv".into() });
            (ended, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(TIMEOUT_MILLISECONDS / 3));
    // The cancel asks before it takes the standard's gate: a host write meanwhile goes
    // through at once (an async mirror's write only marks its bits).
    let started = Instant::now();
    write(&pair.source, 6, 0x66).unwrap();
    let waited = started.elapsed();
    let (ended, took) = cancelling.join().unwrap();
    assert_eq!(ended.unwrap(), None, "the cancel ends the mirror");
    assert!(
        took >= Duration::from_millis(TIMEOUT_MILLISECONDS),
        "the cancel asked the BCV's node: {took:?}"
    );
    assert!(
        waited < Duration::from_millis(TIMEOUT_MILLISECONDS / 2),
        "a host write waited {waited:?} for a cancel asking the network"
    );
    assert_eq!(standard.info().session_slots_used, 0, "the slot is free");
    assert_eq!(pair.source.owed_releases().unwrap().len(), 1);
}

#[test]
fn a_cancel_releases_its_bcv_with_the_standards_writes_let_through() {
    const RELEASE_DELAY_MILLISECONDS: u64 = 1_000;
    let pair = Arc::new(pair());
    establish(&pair, MirrorMode::Async, false);
    assert_eq!(show(&pair).state, SessionState::Synchronized);
    // The BCV's node answers, slowly: the release is a long round trip.
    pair.link
        .release_delay_milliseconds
        .store(RELEASE_DELAY_MILLISECONDS, Ordering::SeqCst);
    let cancelling = {
        let pair = pair.clone();
        std::thread::spawn(move || {
            pair.source
                .command(SessionCommand::MirrorCancel { bcv: "bcv".into() })
        })
    };
    while !pair.link.release_started.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The session has ended here and its release is on the way: a host write on the
    // standard does not wait for that round trip.
    let started = Instant::now();
    write(&pair.source, 6, 0x66).unwrap();
    let waited = started.elapsed();
    assert!(
        !cancelling.is_finished(),
        "the release was still on its way during the write"
    );
    assert!(
        waited < Duration::from_millis(RELEASE_DELAY_MILLISECONDS / 2),
        "a host write waited {waited:?} for a cancel's release"
    );
    assert_eq!(cancelling.join().unwrap().unwrap(), None);
    // Delivered by the command itself, with the readiness of a synchronized BCV.
    assert!(pair.source.owed_releases().unwrap().is_empty());
    assert!(!pair.target.involves("bcv"));
    assert_eq!(
        pair.target.store().volume("bcv").unwrap().readiness(),
        protocol::messages::Readiness::Ready
    );
}

#[test]
fn a_clone_suspended_before_its_activation_is_cancelled_while_its_destination_does_not_answer() {
    let pair = pair_with_destination();
    pair.source
        .command_with(
            SessionCommand::CloneCreate {
                source: "std".into(),
                target: "dst".into(),
                extents: Vec::new(),
                precopy: true,
            },
            Some(beta("dst")),
        )
        .unwrap();
    pair.link.silent.store(true, Ordering::SeqCst);
    // The copier meets the silent destination and suspends the clone.
    let _ = pair.source.settle();
    let clone = pair.source.show(SessionKind::Clone, "dst").unwrap();
    assert_eq!(clone.state, SessionState::Suspended, "{clone:?}");
    let ended = pair
        .source
        .command(SessionCommand::CloneCancel {
            target: "dst".into(),
        })
        .unwrap();
    assert_eq!(ended, None);
    let owed = pair.source.owed_releases().unwrap();
    assert_eq!(
        owed.len(),
        1,
        "the destination's release waits for its node"
    );
    assert_eq!(
        pair.source
            .store()
            .volume("std")
            .unwrap()
            .info()
            .session_slots_used,
        0,
        "both slots are free"
    );
    // The destination's node answers again: it releases the volume and forgets the
    // tracks the cancelled clone owed it.
    pair.link.silent.store(false, Ordering::SeqCst);
    pair.source.probe_targets().unwrap();
    assert!(pair.source.owed_releases().unwrap().is_empty());
    assert!(!pair.target.involves("dst"));
    let destination = pair.target.store().volume("dst").unwrap();
    assert_eq!(
        pair.target
            .store()
            .count_set(&destination, node::store::Bits::Invalid)
            .unwrap(),
        0
    );
}
