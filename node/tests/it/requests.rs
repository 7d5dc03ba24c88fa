//! Session commands under request ids (issue 11, item 6): a command retried with its
//! request id is carried out once and answered with its first answer, across a restart
//! too; a new id meets the node's state as before; the memory is bounded.

use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::rocks::RocksEngine;
use node::engine::Durability;
use node::engine::{Engine, Space};
use node::requests::{NodeAnswer, NodeCall, NodeRequests, REQUESTS_REMEMBERED_MAX};
use node::store::VolumeStore;
use protocol::messages::ErrorCode;
use protocol::session::{MirrorMode, SessionCommand, SessionInfo, SessionKind, SessionState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TRACKS: u64 = 32;

fn split() -> SessionCommand {
    SessionCommand::MirrorSplit {
        bcv: "bcv".to_string(),
        differential: false,
    }
}

/// Carries `command` out under `request_id`, counting how often the node really did it.
fn carry_out<E: Engine>(
    requests: &NodeRequests<E>,
    sessions: &Sessions<E>,
    carried_out: &AtomicUsize,
    request_id: u128,
    command: SessionCommand,
) -> node::Result<Option<SessionInfo>> {
    requests.carry_out(request_id, &command, || {
        carried_out.fetch_add(1, Ordering::SeqCst);
        sessions.command(command.clone())
    })
}

#[test]
fn a_split_retried_with_its_request_id_is_carried_out_once_and_answers_the_same_across_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let open = || {
        let store = Arc::new(
            VolumeStore::open(RocksEngine::open(&directory.path().join("db")).unwrap()).unwrap(),
        );
        let requests = NodeRequests::open(store.clone()).unwrap();
        (Sessions::open(store, 1 << 20, None).unwrap(), requests)
    };
    let carried_out = AtomicUsize::new(0);
    let (sessions, requests) = open();
    sessions.store().create("std", TRACKS * 4096, 4096).unwrap();
    sessions.store().create("bcv", TRACKS * 4096, 4096).unwrap();
    let establish = SessionCommand::MirrorEstablish {
        standard: "std".to_string(),
        bcv: "bcv".to_string(),
        mode: MirrorMode::Async,
        strict: false,
        target_timeout_milliseconds: None,
    };
    carry_out(&requests, &sessions, &carried_out, 1, establish).unwrap();
    sessions.settle().unwrap();

    let first = carry_out(&requests, &sessions, &carried_out, 2, split())
        .unwrap()
        .expect("a split mirror");
    assert_eq!(first.state, SessionState::Split);
    assert_eq!(carried_out.load(Ordering::SeqCst), 2);

    // The retry (a new leader asking again) gets the first answer, and nothing happens.
    let retried = carry_out(&requests, &sessions, &carried_out, 2, split()).unwrap();
    assert_eq!(retried.as_ref(), Some(&first));
    assert_eq!(
        carried_out.load(Ordering::SeqCst),
        2,
        "the retry was carried out"
    );
    let now = sessions.show(SessionKind::Mirror, "bcv").unwrap();
    assert_eq!(now.split_sequence, first.split_sequence);
    assert_eq!(requests.answer(2), Some(Some(first.clone())));

    // Another request id is a new command and meets the node's state as it always did.
    let error = carry_out(&requests, &sessions, &carried_out, 3, split()).unwrap_err();
    assert_eq!(error.code(), ErrorCode::IllegalState, "{error}");
    assert_eq!(
        requests.answer(3),
        None,
        "a refused command is not remembered"
    );

    // The next command works, and a late retry of the split still changes nothing.
    let reestablish = SessionCommand::MirrorReestablish {
        bcv: "bcv".to_string(),
    };
    let reestablished = carry_out(&requests, &sessions, &carried_out, 4, reestablish.clone())
        .unwrap()
        .unwrap();
    assert_ne!(reestablished.state, SessionState::Split);
    let late = carry_out(&requests, &sessions, &carried_out, 2, split()).unwrap();
    assert_eq!(late, Some(first.clone()));
    assert_ne!(
        sessions.show(SessionKind::Mirror, "bcv").unwrap().state,
        SessionState::Split,
        "a late retry split the mirror again"
    );
    let carried_before_restart = carried_out.load(Ordering::SeqCst);

    // The answers are on disk: a restarted node still knows them.
    drop((sessions, requests));
    let (sessions, requests) = open();
    assert_eq!(
        carry_out(&requests, &sessions, &carried_out, 2, split()).unwrap(),
        Some(first)
    );
    assert_eq!(
        carry_out(&requests, &sessions, &carried_out, 4, reestablish).unwrap(),
        Some(reestablished)
    );
    assert_eq!(carried_out.load(Ordering::SeqCst), carried_before_restart);

    // An id reused for another command is a mistake, refused and never carried out.
    let cancel = SessionCommand::MirrorCancel {
        bcv: "bcv".to_string(),
    };
    let error = carry_out(&requests, &sessions, &carried_out, 2, cancel).unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
    assert!(error.to_string().contains("mirror split"), "{error}");
    assert!(sessions.show(SessionKind::Mirror, "bcv").is_ok());
}

#[test]
fn a_retry_arriving_while_the_first_attempt_runs_waits_for_its_answer() {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    let requests = Arc::new(NodeRequests::open(store).unwrap());
    let carried_out = Arc::new(AtomicUsize::new(0));
    let attempt = |delay: Duration| {
        let requests = requests.clone();
        let carried_out = carried_out.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            requests
                .carry_out(7, &split(), || {
                    carried_out.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(None)
                })
                .unwrap()
        })
    };
    let first = attempt(Duration::ZERO);
    let retry = attempt(Duration::from_millis(50));
    assert_eq!(first.join().unwrap(), None);
    assert_eq!(retry.join().unwrap(), None);
    assert_eq!(carried_out.load(Ordering::SeqCst), 1);
}

#[test]
fn the_remembered_answers_are_bounded_and_the_oldest_goes_first() {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    let requests = NodeRequests::open(store.clone()).unwrap();
    let command = SessionCommand::MirrorCancel {
        bcv: "bcv".to_string(),
    };
    for request_id in 0..=REQUESTS_REMEMBERED_MAX as u128 {
        requests
            .carry_out(request_id, &command, || Ok(None))
            .unwrap();
    }
    assert_eq!(requests.remembered_count(), REQUESTS_REMEMBERED_MAX);
    assert_eq!(requests.answer(0), None, "the oldest answer was kept");
    assert_eq!(requests.answer(1), Some(None));
    let mut stored = 0;
    store
        .engine()
        .scan(Space::Meta, b"r/", b"r0", &mut |_, _| {
            stored += 1;
            true
        })
        .unwrap();
    assert_eq!(
        stored, REQUESTS_REMEMBERED_MAX,
        "evicted answers stay on disk"
    );
    // Reopened, the node knows the same answers.
    let reopened = NodeRequests::open(store.clone()).unwrap();
    assert_eq!(reopened.remembered_count(), REQUESTS_REMEMBERED_MAX);
    assert_eq!(reopened.answer(0), None);
}

#[test]
fn a_snap_retried_with_its_request_id_keeps_the_image_of_its_first_instant_across_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let open = || {
        let store = Arc::new(
            VolumeStore::open(RocksEngine::open(&directory.path().join("db")).unwrap()).unwrap(),
        );
        let requests = NodeRequests::open(store.clone()).unwrap();
        (store, requests)
    };
    let (store, requests) = open();
    let source = store.create("src", TRACKS * 4096, 4096).unwrap();
    store
        .write(&source, 0, &[0xaa; 4096], Durability::Synced)
        .unwrap();
    let call = NodeCall::Snap {
        source: "src".to_string(),
        target: "snap".to_string(),
        extents: Vec::new(),
        overwrite: false,
    };
    let carried_out = AtomicUsize::new(0);
    let snap = |requests: &NodeRequests<RocksEngine>, store: &VolumeStore<RocksEngine>| {
        requests.carry_out_call(9, &call, || {
            carried_out.fetch_add(1, Ordering::SeqCst);
            let (target, _) = store.snap_guarded("src", "snap", &[], false)?;
            Ok(NodeAnswer::Snapped {
                target_info: target.info(),
                elapsed_micros: 0,
            })
        })
    };
    let first = snap(&requests, &store).unwrap();
    // The host writes on; a new leader asks again under the same id.
    store
        .write(&source, 0, &[0xbb; 4096], Durability::Synced)
        .unwrap();
    assert_eq!(snap(&requests, &store).unwrap(), first);
    drop((store, requests));
    let (store, requests) = open();
    assert_eq!(snap(&requests, &store).unwrap(), first);
    assert_eq!(carried_out.load(Ordering::SeqCst), 1, "snapped again");
    let target = store.volume("snap").unwrap();
    assert_eq!(
        store.read(&target, 0, 4096).unwrap(),
        vec![0xaa; 4096],
        "the snap holds the image of its first instant"
    );
    // The id cannot be taken for a session command.
    let error = requests
        .carry_out(9, &split(), || unreachable!("refused before"))
        .unwrap_err();
    assert!(error.to_string().contains("snap"), "{error}");
}
