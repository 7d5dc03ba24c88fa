//! Guards on destructive commands, on one node: a clone that was never activated can be
//! cancelled (its slots freed, its destination left not-ready with no invalid marks), and
//! a snap onto an existing volume is refused unless it is an earlier snapshot of the same
//! source or the caller says to overwrite, a rule that survives a restart.

use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::rocks::RocksEngine;
use node::engine::Durability;
use node::store::{Bits, VolumeStore};
use node::Error;
use protocol::messages::{ErrorCode, Readiness};
use protocol::session::{SessionCommand, SessionKind, SessionState};
use std::sync::Arc;

const TRACKS: u64 = 32;
const TRACK_BYTES: u64 = 4096;

fn memory_sessions() -> Sessions<MemoryEngine> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    Sessions::open(store, 1 << 20, None).unwrap()
}

fn fill<E: node::engine::Engine>(sessions: &Sessions<E>, volume: &str, salt: u8) {
    let handle = sessions.store().volume(volume).unwrap();
    for track in 0..handle.track_count() {
        sessions
            .write(
                &handle,
                track * TRACK_BYTES,
                TRACK_BYTES,
                Some(&vec![
                    (track as u8).wrapping_add(salt);
                    TRACK_BYTES as usize
                ]),
                Durability::Logged,
            )
            .unwrap();
    }
}

fn whole<E: node::engine::Engine>(store: &VolumeStore<E>, volume: &str) -> Vec<u8> {
    let handle = store.volume(volume).unwrap();
    store.read(&handle, 0, handle.size_bytes).unwrap()
}

fn clone_create(source: &str, target: &str, precopy: bool) -> SessionCommand {
    SessionCommand::CloneCreate {
        source: source.to_string(),
        target: target.to_string(),
        precopy,
        extents: Vec::new(),
    }
}

fn cancel(target: &str) -> SessionCommand {
    SessionCommand::CloneCancel {
        target: target.to_string(),
    }
}

fn slots_used<E: node::engine::Engine>(sessions: &Sessions<E>, volume: &str) -> u8 {
    sessions
        .store()
        .volume(volume)
        .unwrap()
        .info()
        .session_slots_used
}

fn invalid_tracks<E: node::engine::Engine>(sessions: &Sessions<E>, volume: &str) -> u64 {
    let store = sessions.store();
    store
        .count_set(&store.volume(volume).unwrap(), Bits::Invalid)
        .unwrap()
}

#[test]
fn a_precopying_or_created_clone_is_cancelled_its_slots_freed_and_its_destination_left_not_ready() {
    let sessions = memory_sessions();
    for volume in ["src", "dst"] {
        sessions
            .store()
            .create(volume, TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
            .unwrap();
    }
    fill(&sessions, "src", 1);
    fill(&sessions, "dst", 100);

    // A precopying clone, part-way through its copy.
    let created = sessions
        .command(clone_create("src", "dst", true))
        .unwrap()
        .unwrap();
    assert_eq!(created.state, SessionState::Precopying);
    assert_eq!(slots_used(&sessions, "src"), 2);
    sessions.copy_step(created.id).unwrap();
    assert!(invalid_tracks(&sessions, "dst") > 0);
    assert!(invalid_tracks(&sessions, "dst") < TRACKS);
    let ended = sessions.command(cancel("dst")).unwrap();
    assert!(ended.is_none(), "cancel ends the session");
    assert!(sessions.list(None).unwrap().is_empty());
    assert_eq!(slots_used(&sessions, "src"), 0);
    assert_eq!(
        sessions.store().volume("dst").unwrap().readiness(),
        Readiness::NotReady
    );
    assert_eq!(invalid_tracks(&sessions, "dst"), 0);
    assert!(!sessions.involves("src") && !sessions.involves("dst"));

    // The same destination takes a new clone at once; cancelled while merely created.
    let again = sessions
        .command(clone_create("src", "dst", false))
        .unwrap()
        .unwrap();
    assert_eq!(again.state, SessionState::Created);
    assert_eq!(slots_used(&sessions, "src"), 1);
    assert!(sessions.command(cancel("dst")).unwrap().is_none());
    assert_eq!(slots_used(&sessions, "src"), 0);
    assert_eq!(
        sessions.store().volume("dst").unwrap().readiness(),
        Readiness::NotReady
    );

    // A third clone, activated and copied through, gives the destination the source's
    // image: nothing the cancelled ones left behind gets in its way.
    sessions.command(clone_create("src", "dst", true)).unwrap();
    sessions
        .command(SessionCommand::CloneActivate {
            target: "dst".to_string(),
        })
        .unwrap();
    sessions.settle().unwrap();
    assert_eq!(
        whole(sessions.store(), "dst"),
        whole(sessions.store(), "src")
    );
}

#[test]
fn an_active_or_copied_clone_cannot_be_cancelled_and_the_refusal_changes_nothing() {
    let sessions = memory_sessions();
    for volume in ["src", "dst"] {
        sessions
            .store()
            .create(volume, TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
            .unwrap();
    }
    fill(&sessions, "src", 3);
    sessions.command(clone_create("src", "dst", false)).unwrap();
    sessions
        .command(SessionCommand::CloneActivate {
            target: "dst".to_string(),
        })
        .unwrap();
    let before = sessions.show(SessionKind::Clone, "dst").unwrap();
    let error = sessions.command(cancel("dst")).unwrap_err();
    assert_eq!(error.code(), ErrorCode::IllegalState, "{error}");
    assert!(error.to_string().contains("point-in-time image"), "{error}");
    let after = sessions.show(SessionKind::Clone, "dst").unwrap();
    assert_eq!(
        (after.state, after.slots.clone(), after.tracks_remaining),
        (before.state, before.slots.clone(), before.tracks_remaining)
    );
    assert_eq!(
        sessions.store().volume("dst").unwrap().readiness(),
        Readiness::Ready
    );
    sessions.settle().unwrap();
    let error = sessions.command(cancel("dst")).unwrap_err();
    assert!(error.to_string().contains("clone terminate"), "{error}");
    assert_eq!(
        sessions.show(SessionKind::Clone, "dst").unwrap().state,
        SessionState::Copied
    );
    let error = sessions.command(cancel("nothing")).unwrap_err();
    assert_eq!(error.code(), ErrorCode::NotFound, "{error}");
}

/// A snap without overwrite that must be refused; its error.
fn refused_snap<E: node::engine::Engine>(
    store: &VolumeStore<E>,
    source: &str,
    target: &str,
) -> Error {
    match store.snap_guarded(source, target, &[], false) {
        Ok(_) => panic!("the snap {source} -> {target} went through"),
        Err(error) => error,
    }
}

#[test]
fn a_snap_onto_a_volume_that_is_not_its_snapshot_is_refused_unless_overwritten_even_after_a_restart(
) {
    let directory = tempfile::tempdir().unwrap();
    let open = || {
        let store = Arc::new(
            VolumeStore::open(RocksEngine::open(&directory.path().join("db")).unwrap()).unwrap(),
        );
        Sessions::open(store, 1 << 20, None).unwrap()
    };
    let sessions = open();
    for volume in ["src", "other", "own"] {
        sessions
            .store()
            .create(volume, TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
            .unwrap();
    }
    fill(&sessions, "src", 1);
    fill(&sessions, "other", 2);
    fill(&sessions, "own", 3);
    let store = sessions.store().clone();
    let own_before = whole(&store, "own");

    // A volume of its own is refused, and keeps its data.
    let error = refused_snap(&store, "src", "own");
    assert!(matches!(error, Error::SnapTargetExists { .. }), "{error}");
    assert_eq!(error.code(), ErrorCode::AlreadyExists);
    assert!(error.to_string().contains("not a snapshot"), "{error}");
    assert!(error.to_string().contains("--overwrite"), "{error}");
    assert_eq!(whole(&store, "own"), own_before);

    // A new target is the source's snapshot; a later snap of the same source refreshes it.
    store.snap_guarded("src", "copy", &[], false).unwrap();
    fill(&sessions, "src", 9);
    store.snap_guarded("src", "copy", &[], false).unwrap();
    assert_eq!(whole(&store, "copy"), whole(&store, "src"));
    // Another source may not replace it.
    let copy_before = whole(&store, "copy");
    let error = refused_snap(&store, "other", "copy");
    assert!(error.to_string().contains("a snapshot of 'src'"), "{error}");
    assert_eq!(whole(&store, "copy"), copy_before);
    drop(store);
    drop(sessions);

    // The relation survives a restart.
    let sessions = open();
    let store = sessions.store().clone();
    fill(&sessions, "src", 20);
    store.snap_guarded("src", "copy", &[], false).unwrap();
    assert_eq!(whole(&store, "copy"), whole(&store, "src"));
    assert!(store.snap_guarded("other", "copy", &[], false).is_err());
    // With overwrite the data is replaced, and the target becomes the new source's.
    store.snap_guarded("other", "own", &[], true).unwrap();
    assert_eq!(whole(&store, "own"), whole(&store, "other"));
    store.snap_guarded("other", "own", &[], false).unwrap();

    // A clone replaces a snapshot's data: it is no longer the source's snapshot.
    sessions
        .command(clone_create("other", "copy", false))
        .unwrap();
    sessions.command(cancel("copy")).unwrap();
    let error = refused_snap(&store, "src", "copy");
    assert!(error.to_string().contains("not a snapshot"), "{error}");
    // A deleted target leaves no relation behind for a volume of the same name.
    store.delete("own").unwrap();
    store
        .create("own", TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
        .unwrap();
    assert!(store.snap_guarded("other", "own", &[], false).is_err());
}
