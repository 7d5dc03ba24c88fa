//! What sessions report of their progress (issue 10, "progress that is always true"): a
//! clone's total stays across precopy and activate, a rotate reports the tracks it
//! resynchronizes, percent and counts come from one reading and say 100 only when done,
//! and a copy's transient error clears when it moves again while the past error stays.

use node::copy::remote::TargetLink;
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::{Durability, Engine};
use node::store::VolumeStore;
use protocol::session::{
    MirrorMode, RemoteVolume, SessionCommand, SessionInfo, SessionKind, SessionState, TargetAnswer,
    TargetOperation, PERCENT_UNFINISHED_MAX,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TRACKS: u64 = 64;
const TRACK_BYTES: u64 = 4096;

fn memory_sessions(link: Option<Arc<dyn TargetLink>>) -> Sessions<MemoryEngine> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    Sessions::open(store, 1 << 20, link).unwrap()
}

fn command<E: Engine>(sessions: &Sessions<E>, command: SessionCommand) -> SessionInfo {
    sessions
        .command(command.clone())
        .unwrap_or_else(|error| panic!("{command:?} refused: {error}"))
        .unwrap_or_else(|| panic!("{command:?} ended the session"))
}

fn write_track<E: Engine>(sessions: &Sessions<E>, volume: &str, track: u64, byte: u8) {
    let handle = sessions.store().volume(volume).unwrap();
    sessions
        .write(
            &handle,
            track * TRACK_BYTES,
            TRACK_BYTES,
            Some(&vec![byte; TRACK_BYTES as usize]),
            Durability::Logged,
        )
        .unwrap();
}

/// The rules every reading must keep, whatever the session does.
fn consistent(info: &SessionInfo) -> &SessionInfo {
    assert_eq!(
        info.tracks_copied + info.tracks_remaining,
        info.tracks_total,
        "counts of one reading: {info:?}"
    );
    assert_eq!(
        info.percent == 100.0,
        info.tracks_remaining == 0,
        "100 % exactly when nothing remains: {info:?}"
    );
    assert!(info.percent <= 100.0, "{info:?}");
    info
}

fn show<E: Engine>(sessions: &Sessions<E>, kind: SessionKind, target: &str) -> SessionInfo {
    let info = sessions.show(kind, target).unwrap();
    consistent(&info);
    info
}

#[test]
fn a_clone_keeps_its_total_across_precopy_and_activate_and_says_100_only_when_done() {
    let sessions = memory_sessions(None);
    let store = sessions.store().clone();
    store.create("source", TRACKS * TRACK_BYTES, 4096).unwrap();
    store.create("clone", TRACKS * TRACK_BYTES, 4096).unwrap();
    for track in 0..TRACKS {
        write_track(&sessions, "source", track, track as u8 + 1);
    }
    let created = command(
        &sessions,
        SessionCommand::CloneCreate {
            source: "source".into(),
            target: "clone".into(),
            precopy: true,
            extents: Vec::new(),
        },
    );
    assert_eq!(
        (
            created.tracks_total,
            created.tracks_remaining,
            created.percent
        ),
        (TRACKS, TRACKS, 0.0)
    );
    // One step of the precopy: a quarter.
    let id = sessions.copying()[0];
    sessions.copy_step(id).unwrap();
    let quarter = show(&sessions, SessionKind::Clone, "clone");
    assert_eq!((quarter.tracks_copied, quarter.percent), (16, 25.0));
    // A host rewrites two precopied tracks: they are to copy again, the percent holds.
    write_track(&sessions, "source", 0, 0xa0);
    write_track(&sessions, "source", 1, 0xa1);
    let requeued = show(&sessions, SessionKind::Clone, "clone");
    assert_eq!(
        (
            requeued.tracks_total,
            requeued.tracks_remaining,
            requeued.percent
        ),
        (TRACKS, TRACKS - 14, 25.0)
    );
    // Activation keeps the clone's total and what the precopy moved.
    let activated = command(
        &sessions,
        SessionCommand::CloneActivate {
            target: "clone".into(),
        },
    );
    consistent(&activated);
    assert_eq!(activated.state, SessionState::Active);
    assert_eq!(activated.tracks_total, TRACKS, "{activated:?}");
    assert_eq!(activated.tracks_remaining, TRACKS - 14, "{activated:?}");
    assert_eq!(activated.percent, 25.0, "{activated:?}");
    sessions.settle().unwrap();
    let copied = show(&sessions, SessionKind::Clone, "clone");
    assert_eq!(copied.state, SessionState::Copied);
    assert_eq!(
        (copied.tracks_total, copied.tracks_copied),
        (TRACKS, TRACKS)
    );
    assert_eq!(copied.percent, 100.0);
}

#[test]
fn a_caught_up_precopy_that_hosts_write_again_is_no_longer_at_100() {
    let sessions = memory_sessions(None);
    let store = sessions.store().clone();
    store.create("source", TRACKS * TRACK_BYTES, 4096).unwrap();
    store.create("clone", TRACKS * TRACK_BYTES, 4096).unwrap();
    command(
        &sessions,
        SessionCommand::CloneCreate {
            source: "source".into(),
            target: "clone".into(),
            precopy: true,
            extents: Vec::new(),
        },
    );
    sessions.settle().unwrap();
    let caught_up = show(&sessions, SessionKind::Clone, "clone");
    assert_eq!((caught_up.percent, caught_up.tracks_remaining), (100.0, 0));
    for track in [3, 30, 33] {
        write_track(&sessions, "source", track, 0x33);
    }
    let behind = show(&sessions, SessionKind::Clone, "clone");
    assert_eq!(behind.tracks_remaining, 3);
    assert_eq!(behind.percent, PERCENT_UNFINISHED_MAX, "{behind:?}");
    assert_eq!(behind.tracks_total, TRACKS);
}

#[test]
fn a_rotate_reports_the_tracks_it_resynchronizes_and_keeps_them_through_its_split() {
    let sessions = memory_sessions(None);
    let store = sessions.store().clone();
    for name in ["std", "h1", "h2"] {
        store.create(name, TRACKS * TRACK_BYTES, 4096).unwrap();
    }
    for bcv in ["h1", "h2"] {
        command(
            &sessions,
            SessionCommand::MirrorEstablish {
                standard: "std".into(),
                bcv: bcv.into(),
                mode: MirrorMode::Sync,
                strict: false,
                target_timeout_milliseconds: None,
            },
        );
        let syncing = show(&sessions, SessionKind::Mirror, bcv);
        assert_eq!(syncing.tracks_total, TRACKS);
        sessions.settle().unwrap();
        command(
            &sessions,
            SessionCommand::MirrorSplit {
                bcv: bcv.into(),
                differential: false,
            },
        );
    }
    let changed = [2, 7, 11, 40, 63];
    for track in changed {
        write_track(&sessions, "std", track, 0x77);
    }
    let rotated = command(
        &sessions,
        SessionCommand::MirrorRotate {
            standard: "std".into(),
        },
    );
    consistent(&rotated);
    assert_eq!(rotated.target, "h1", "the oldest split BCV");
    assert_eq!(rotated.state, SessionState::Syncing);
    assert_eq!(rotated.tracks_total, changed.len() as u64, "{rotated:?}");
    assert_eq!(rotated.tracks_remaining, changed.len() as u64);
    assert!(rotated.percent < 100.0, "{rotated:?}");
    // Rotate splits again once synchronized: the total of its copy stays.
    sessions.settle().unwrap();
    let split = show(&sessions, SessionKind::Mirror, "h1");
    assert_eq!(split.state, SessionState::Split);
    assert_eq!(split.tracks_total, changed.len() as u64, "{split:?}");
    assert_eq!(split.tracks_copied, changed.len() as u64);
    assert_eq!(split.percent, 100.0);
}

/// The link to the node holding the BCV: another `Sessions` in this process, and a switch
/// that makes every call fail as a lost connection would.
struct Loopback {
    target: Arc<Sessions<MemoryEngine>>,
    broken: AtomicBool,
}

impl TargetLink for Loopback {
    fn call(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> node::Result<TargetAnswer> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(node::Error::Remote {
                node: remote.node.clone(),
                detail: "the connection was lost".to_string(),
            });
        }
        self.target.serve_target(operation)
    }

    fn this_node(&self) -> (String, String) {
        ("alpha".to_string(), "127.0.0.1:1".to_string())
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_transient_copy_error_clears_when_the_copy_moves_again_and_stays_as_the_last_error() {
    let target = Arc::new(memory_sessions(None));
    target
        .store()
        .create("bcv", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    let link = Arc::new(Loopback {
        target,
        broken: AtomicBool::new(false),
    });
    let sessions = Arc::new(memory_sessions(Some(link.clone())));
    sessions
        .store()
        .create("std", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    for track in 0..TRACKS {
        write_track(&sessions, "std", track, track as u8 + 1);
    }
    let remote = RemoteVolume {
        node: "beta".into(),
        address: "127.0.0.1:2".into(),
        volume: "bcv".into(),
    };
    sessions
        .command_with(
            SessionCommand::MirrorEstablish {
                standard: "std".into(),
                bcv: "bcv".into(),
                mode: MirrorMode::Async,
                strict: false,
                target_timeout_milliseconds: None,
            },
            Some(remote),
        )
        .unwrap();
    link.broken.store(true, Ordering::SeqCst);
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stop = Arc::new(AtomicBool::new(false));
    let copier = {
        let sessions = sessions.clone();
        let stop = stop.clone();
        std::thread::spawn(move || sessions.run_copier(stop, true))
    };
    wait_for("the copy step to fail", || {
        show(&sessions, SessionKind::Mirror, "bcv").error.is_some()
    });
    let failing = show(&sessions, SessionKind::Mirror, "bcv");
    assert_eq!(failing.tracks_remaining, TRACKS, "{failing:?}");
    let error = failing.error.clone().unwrap();
    assert!(error.contains("the connection was lost"), "{error}");
    let past = failing
        .last_error
        .clone()
        .expect("the error is also the last one");
    assert_eq!(past.message, error);
    assert!(past.unix_seconds >= before, "{past:?}");
    // The link comes back: once the copy moves, the error is past.
    link.broken.store(false, Ordering::SeqCst);
    wait_for("the mirror to synchronize", || {
        show(&sessions, SessionKind::Mirror, "bcv").state == SessionState::Synchronized
    });
    stop.store(true, Ordering::SeqCst);
    copier.join().unwrap();
    let recovered = show(&sessions, SessionKind::Mirror, "bcv");
    assert_eq!(recovered.error, None, "{recovered:?}");
    let last = recovered
        .last_error
        .clone()
        .expect("the past error is kept");
    assert_eq!(last.message, past.message);
    assert!(last.unix_seconds >= past.unix_seconds, "{last:?}");
    assert_eq!((recovered.tracks_total, recovered.percent), (TRACKS, 100.0));
}
