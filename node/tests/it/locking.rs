//! The command gates are per volume and their order is fixed: host IO on a volume no
//! command involves never waits for that command, even while it waits on another node;
//! two nodes whose sessions run in both directions can command them at once; and no mix
//! of host IO, copies and commands ever leaves threads waiting for each other in a cycle
//! (parking_lot's deadlock detection, compiled into the tests, watches every lock).

use node::copy::remote::TargetLink;
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::Durability;
use node::store::VolumeStore;
use protocol::session::{
    MirrorMode, RemoteVolume, SessionCommand, SessionKind, SessionState, TargetAnswer,
    TargetOperation,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const TRACKS: u64 = 32;
const TRACK_BYTES: u64 = 4096;

fn memory_sessions(link: Option<Arc<dyn TargetLink>>) -> Sessions<MemoryEngine> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    Sessions::open(store, 1 << 20, link).unwrap()
}

fn create(sessions: &Sessions<MemoryEngine>, names: &[&str]) {
    for name in names {
        sessions
            .store()
            .create(name, TRACKS * TRACK_BYTES, 4096)
            .unwrap();
    }
}

fn write(sessions: &Sessions<MemoryEngine>, volume: &str, track: u64, byte: u8) -> Duration {
    let handle = sessions.store().volume(volume).unwrap();
    let started = Instant::now();
    sessions
        .write(
            &handle,
            (track % TRACKS) * TRACK_BYTES,
            TRACK_BYTES,
            Some(&vec![byte; TRACK_BYTES as usize]),
            Durability::Logged,
        )
        .unwrap();
    started.elapsed()
}

/// The link to another node in this process, each call taking `delay` first as a slow
/// network would.
struct SlowLink {
    name: &'static str,
    target: OnceLock<Arc<Sessions<MemoryEngine>>>,
    delay_milliseconds: AtomicU64,
}

impl SlowLink {
    fn new(name: &'static str) -> Arc<SlowLink> {
        Arc::new(SlowLink {
            name,
            target: OnceLock::new(),
            delay_milliseconds: AtomicU64::new(0),
        })
    }
}

impl TargetLink for SlowLink {
    fn call(
        &self,
        _remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> node::Result<TargetAnswer> {
        std::thread::sleep(Duration::from_millis(
            self.delay_milliseconds.load(Ordering::SeqCst),
        ));
        self.target.get().expect("linked").serve_target(operation)
    }

    fn this_node(&self) -> (String, String) {
        (self.name.to_string(), format!("{}:1", self.name))
    }
}

fn remote(node: &str, volume: &str) -> RemoteVolume {
    RemoteVolume {
        node: node.to_string(),
        address: format!("{node}:1"),
        volume: volume.to_string(),
    }
}

fn establish(standard: &str, bcv: &str, mode: MirrorMode) -> SessionCommand {
    SessionCommand::MirrorEstablish {
        standard: standard.to_string(),
        bcv: bcv.to_string(),
        mode,
        strict: false,
        target_timeout_milliseconds: None,
    }
}

/// Panics if threads of this process wait for each other in a cycle.
fn assert_no_deadlock() {
    let deadlocks = parking_lot::deadlock::check_deadlock();
    assert!(
        deadlocks.is_empty(),
        "{} cycles of threads waiting for each other: {:?}",
        deadlocks.len(),
        deadlocks
            .iter()
            .map(|threads| threads
                .iter()
                .map(|thread| format!("{:?}", thread.backtrace()))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
}

#[test]
fn host_writes_to_an_unrelated_volume_do_not_wait_for_a_command_that_waits_on_another_node() {
    let link = SlowLink::new("alpha");
    let alpha = Arc::new(memory_sessions(Some(link.clone())));
    let beta = Arc::new(memory_sessions(None));
    let _ = link.target.set(beta.clone());
    create(&alpha, &["std", "other"]);
    create(&beta, &["bcv"]);
    alpha
        .command_with(
            establish("std", "bcv", MirrorMode::Async),
            Some(remote("beta", "bcv")),
        )
        .unwrap();
    alpha.settle().unwrap();
    // Each call to beta now takes 400 ms; a split makes several.
    link.delay_milliseconds.store(400, Ordering::SeqCst);
    let splitting = {
        let alpha = alpha.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            alpha
                .command(SessionCommand::MirrorSplit {
                    bcv: "bcv".into(),
                    differential: false,
                })
                .unwrap();
            started.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut slowest = Duration::ZERO;
    for track in 0..20 {
        slowest = slowest.max(write(&alpha, "other", track, 7));
        std::thread::sleep(Duration::from_millis(20));
    }
    let split_took = splitting.join().unwrap();
    assert!(
        split_took >= Duration::from_millis(800),
        "the split did wait on beta ({split_took:?}), so the writes ran while it waited"
    );
    assert!(
        slowest < Duration::from_millis(200),
        "a write to a volume the split does not involve took {slowest:?}"
    );
    assert_eq!(
        alpha.show(SessionKind::Mirror, "bcv").unwrap().state,
        SessionState::Split
    );
}

#[test]
fn two_nodes_command_their_sessions_in_both_directions_at_once() {
    let alpha_link = SlowLink::new("alpha");
    let beta_link = SlowLink::new("beta");
    let alpha = Arc::new(memory_sessions(Some(alpha_link.clone())));
    let beta = Arc::new(memory_sessions(Some(beta_link.clone())));
    let _ = alpha_link.target.set(beta.clone());
    let _ = beta_link.target.set(alpha.clone());
    // alpha's std mirrors to beta's a-bcv; beta's std mirrors to alpha's b-bcv.
    create(&alpha, &["std", "b-bcv"]);
    create(&beta, &["std", "a-bcv"]);
    alpha
        .command_with(
            establish("std", "a-bcv", MirrorMode::Sync),
            Some(remote("beta", "a-bcv")),
        )
        .unwrap();
    beta.command_with(
        establish("std", "b-bcv", MirrorMode::Sync),
        Some(remote("alpha", "b-bcv")),
    )
    .unwrap();
    alpha.settle().unwrap();
    beta.settle().unwrap();
    alpha_link.delay_milliseconds.store(5, Ordering::SeqCst);
    beta_link.delay_milliseconds.store(5, Ordering::SeqCst);
    let rounds = |sessions: Arc<Sessions<MemoryEngine>>, bcv: &'static str| {
        std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            for round in 0..5u8 {
                for command in [
                    SessionCommand::MirrorSplit {
                        bcv: bcv.into(),
                        differential: round % 2 == 0,
                    },
                    SessionCommand::MirrorReestablish { bcv: bcv.into() },
                ] {
                    let started = Instant::now();
                    sessions.command(command).unwrap();
                    slowest = slowest.max(started.elapsed());
                    write(&sessions, "std", u64::from(round), round);
                    sessions.settle().unwrap();
                }
            }
            slowest
        })
    };
    let alpha_rounds = rounds(alpha.clone(), "a-bcv");
    let beta_rounds = rounds(beta.clone(), "b-bcv");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(alpha_rounds.is_finished() && beta_rounds.is_finished()) {
        assert_no_deadlock();
        assert!(Instant::now() < deadline, "the commands did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    for slowest in [alpha_rounds.join().unwrap(), beta_rounds.join().unwrap()] {
        assert!(
            slowest < Duration::from_secs(4),
            "a command took {slowest:?} (2 × the default target timeout at most)"
        );
    }
    for (sessions, bcv) in [(&alpha, "a-bcv"), (&beta, "b-bcv")] {
        assert_eq!(
            sessions.show(SessionKind::Mirror, bcv).unwrap().state,
            SessionState::Synchronized
        );
    }
}

#[test]
fn host_io_copies_and_commands_on_many_threads_never_wait_for_each_other_in_a_cycle() {
    let sessions = Arc::new(memory_sessions(None));
    create(&sessions, &["std", "bcv", "src", "dst", "other"]);
    sessions
        .command(establish("std", "bcv", MirrorMode::Sync))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for volume in ["std", "src", "other"] {
        let (sessions, stop, writes) = (sessions.clone(), stop.clone(), writes.clone());
        threads.push(std::thread::spawn(move || {
            let mut track = 0;
            while !stop.load(Ordering::Relaxed) {
                write(&sessions, volume, track, track as u8);
                track += 1;
                writes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..2 {
        let (sessions, stop) = (sessions.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for id in sessions.copying() {
                    let _ = sessions.copy_step(id);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    let commands = {
        let (sessions, stop) = (sessions.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut done = 0;
            while !stop.load(Ordering::Relaxed) {
                // A mirror split and re-established while its standard is written, and a
                // clone made and ended while its source is written.
                let _ = sessions.command(SessionCommand::MirrorSplit {
                    bcv: "bcv".into(),
                    differential: false,
                });
                let _ = sessions.command(SessionCommand::MirrorReestablish { bcv: "bcv".into() });
                sessions
                    .command(SessionCommand::CloneCreate {
                        source: "src".into(),
                        target: "dst".into(),
                        precopy: true,
                        extents: Vec::new(),
                    })
                    .unwrap();
                sessions
                    .command(SessionCommand::CloneActivate {
                        target: "dst".into(),
                    })
                    .unwrap();
                while sessions
                    .command(SessionCommand::CloneTerminate {
                        target: "dst".into(),
                    })
                    .is_err()
                {
                    if stop.load(Ordering::Relaxed) {
                        return done;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                done += 1;
            }
            done
        })
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_no_deadlock();
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = commands.join().unwrap();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_no_deadlock();
    assert!(rounds > 0, "the commands made progress");
    assert!(
        writes.load(Ordering::Relaxed) > 100,
        "host writes made progress"
    );
}
