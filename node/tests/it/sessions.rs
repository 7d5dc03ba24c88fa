//! Copy sessions on one node, as the seeds tell them: seed 002's FIG. 10 replayed with
//! qemu-io, seed 001's precopy example, a clone activated under host IO, the slot limit,
//! illegal transitions, a restart mid-copy and a cascade.

use crate::common::NodeFixture;
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::rocks::RocksEngine;
use node::engine::{Durability, Engine};
use node::store::{Bits, VolumeStore};
use node::Error;
use protocol::messages::{ErrorCode, Readiness};
use protocol::session::{MirrorMode, SessionCommand, SessionInfo, SessionKind, SessionState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command as Process;

fn memory_sessions() -> Sessions<MemoryEngine> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    Sessions::open(store, 1 << 20, None).unwrap()
}

fn establish(standard: &str, bcv: &str) -> SessionCommand {
    SessionCommand::MirrorEstablish {
        standard: standard.to_string(),
        bcv: bcv.to_string(),
        mode: MirrorMode::Sync,
        strict: false,
        target_timeout_milliseconds: None,
    }
}

fn split(bcv: &str, differential: bool) -> SessionCommand {
    SessionCommand::MirrorSplit {
        bcv: bcv.to_string(),
        differential,
    }
}

fn command<E: Engine>(sessions: &Sessions<E>, command: SessionCommand) -> Option<SessionInfo> {
    sessions
        .command(command.clone())
        .unwrap_or_else(|error| panic!("{command:?} refused: {error}"))
}

fn write_track<E: Engine>(sessions: &Sessions<E>, volume: &str, track: u64, byte: u8) {
    let handle = sessions.store().volume(volume).unwrap();
    let track_bytes = u64::from(handle.track_size_bytes);
    sessions
        .write(
            &handle,
            track * track_bytes,
            track_bytes,
            Some(&vec![byte; track_bytes as usize]),
            Durability::Logged,
        )
        .unwrap();
}

/// A volume's bytes as stored, whatever its readiness (a not-ready BCV too).
fn stored_track<E: Engine>(store: &VolumeStore<E>, volume: &str, track: u64) -> Vec<u8> {
    let handle = store.volume(volume).unwrap();
    let track_bytes = u64::from(handle.track_size_bytes);
    store
        .read(&handle, track * track_bytes, track_bytes)
        .unwrap()
}

fn whole<E: Engine>(store: &VolumeStore<E>, volume: &str) -> Vec<u8> {
    let handle = store.volume(volume).unwrap();
    store.read(&handle, 0, handle.size_bytes).unwrap()
}

fn bit<E: Engine>(store: &VolumeStore<E>, volume: &str, bits: Bits, track: u64) -> bool {
    let handle = store.volume(volume).unwrap();
    store.test_bit(&handle, bits, track).unwrap()
}

async fn run(program: &str, arguments: &[&str]) -> String {
    let output = Process::new(program)
        .args(arguments)
        .output()
        .await
        .unwrap_or_else(|error| {
            panic!("cannot run {program} (install qemu-utils and libnbd-bin): {error}")
        });
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Waits until the node's background copier has brought the session to rest.
async fn wait_resting(fixture: &NodeFixture, kind: SessionKind, target: &str) -> SessionInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = fixture.node.sessions.show(kind, target).unwrap();
        let caught_up = info.state != SessionState::Precopying || info.tracks_remaining == 0;
        if info.state.is_resting() && caught_up && info.tracks_remaining == 0 {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{target} never came to rest: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FIG10_TRACK_BYTES: u64 = 64 << 10;
/// The track FIG. 10 follows.
const T: u64 = 3;
/// A track only BCV(1)'s host writes, between its split and its reestablish.
const U: u64 = 9;

struct Fig10 {
    fixture: NodeFixture,
}

impl Fig10 {
    async fn qemu_write(&self, volume: &str, track: u64, byte: u8) {
        let uri = self.fixture.nbd_uri(volume);
        let write = format!(
            "write -P {byte:#04x} {} {FIG10_TRACK_BYTES}",
            track * FIG10_TRACK_BYTES
        );
        run("qemu-io", &["-f", "raw", &uri, "-c", &write]).await;
    }

    async fn qemu_read(&self, volume: &str, track: u64, byte: u8) {
        let uri = self.fixture.nbd_uri(volume);
        let read = format!(
            "read -P {byte:#04x} {} {FIG10_TRACK_BYTES}",
            track * FIG10_TRACK_BYTES
        );
        let output = run("qemu-io", &["-f", "raw", &uri, "-c", &read]).await;
        assert!(
            !output.contains("Pattern verification failed"),
            "{volume} track {track}: {output}"
        );
    }

    fn store(&self) -> &VolumeStore<RocksEngine> {
        &self.fixture.node.store
    }

    fn slot(&self, bcv: &str) -> u8 {
        self.fixture
            .node
            .sessions
            .show(SessionKind::Mirror, bcv)
            .unwrap()
            .slots[0]
    }

    /// Checks the PB bits of both sessions (when they exist) and the M4b bits of both BCVs
    /// for the track involved, and the bytes every volume holds there.
    fn check(&self, event: u32, changed: [Option<bool>; 2], images: [u8; 3]) {
        for (index, bcv) in ["bcv1", "bcv2"].iter().enumerate() {
            if let Some(expected) = changed[index] {
                let slot = self.slot(bcv);
                assert_eq!(
                    bit(self.store(), "std", Bits::Session(slot), T),
                    expected,
                    "event {event}: DDF({}) bit of track {T}",
                    index + 1
                );
            }
        }
        for (volume, byte) in ["std", "bcv1", "bcv2"].iter().zip(images) {
            let stored = stored_track(self.store(), volume, T);
            assert!(
                stored.iter().all(|stored_byte| *stored_byte == byte),
                "event {event}: {volume} track {T} holds {:#04x}.., not {byte:#04x}",
                stored[0]
            );
        }
    }

    fn target_changed(&self, volume: &str, track: u64) -> bool {
        bit(self.store(), volume, Bits::TargetChanged, track)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_fig_10_events_230_to_244_replayed_with_qemu_io() {
    let fixture = NodeFixture::start().await;
    for name in ["std", "bcv1", "bcv2"] {
        fixture
            .node
            .store
            .create(name, 16 * FIG10_TRACK_BYTES, FIG10_TRACK_BYTES as u32)
            .unwrap();
    }
    let fig = Fig10 { fixture };
    let sessions = fig.fixture.node.sessions.clone();

    // 230: a host writes the standard. No session exists yet: a session's bits start at
    // its establish, which marks every track changed (event 233), as the seed's PB
    // column would be by then.
    fig.qemu_write("std", T, 0x30).await;
    fig.check(230, [None, None], [0x30, 0x00, 0x00]);
    // 231, 232: hosts write both BCVs, before any session involves them.
    fig.qemu_write("bcv1", T, 0x31).await;
    fig.check(231, [None, None], [0x30, 0x31, 0x00]);
    fig.qemu_write("bcv2", T, 0x32).await;
    fig.check(232, [None, None], [0x30, 0x31, 0x32]);

    // 233: establish DDF(1); every PB bit of the session is changed; BCV(1) is not ready.
    command(&sessions, establish("std", "bcv1"));
    assert_eq!(
        fig.store().volume("bcv1").unwrap().readiness(),
        Readiness::NotReady
    );
    let info = wait_resting(&fig.fixture, SessionKind::Mirror, "bcv1").await;
    assert_eq!(info.state, SessionState::Synchronized);
    assert_eq!(info.tracks_copied_last, 16, "establish copies every track");
    fig.check(233, [Some(true), None], [0x30, 0x30, 0x32]);

    // 234: full split of DDF(1): its PB bits unchanged, BCV(1)'s M4b valid, BCV(1) ready.
    command(&sessions, split("bcv1", false));
    fig.check(234, [Some(false), None], [0x30, 0x30, 0x32]);
    assert!(!fig.target_changed("bcv1", T));
    fig.qemu_read("bcv1", T, 0x30).await;
    // BCV(1)'s host changes another track after the split (the seed's note on 241).
    fig.qemu_write("bcv1", U, 0x91).await;
    assert!(fig.target_changed("bcv1", U));

    // 235: a host writes the standard: DDF(1) changed.
    fig.qemu_write("std", T, 0x35).await;
    fig.check(235, [Some(true), None], [0x35, 0x30, 0x32]);

    // 236: establish DDF(2); all of its PB bits changed; DDF(1) unaffected.
    command(&sessions, establish("std", "bcv2"));
    let info = wait_resting(&fig.fixture, SessionKind::Mirror, "bcv2").await;
    assert_eq!(info.state, SessionState::Synchronized);
    fig.check(236, [Some(true), Some(true)], [0x35, 0x30, 0x35]);

    // 237: full split of DDF(2).
    command(&sessions, split("bcv2", false));
    fig.check(237, [Some(true), Some(false)], [0x35, 0x30, 0x35]);
    assert!(!fig.target_changed("bcv2", T));

    // 240: a host writes the standard: both sessions changed.
    fig.qemu_write("std", T, 0x40).await;
    fig.check(240, [Some(true), Some(true)], [0x40, 0x30, 0x35]);

    // 241: reestablish DDF(1): the tracks changed on the standard (T) OR on BCV(1) (U)
    // are copied, no others; BCV(1)'s M4b bits valid again.
    command(
        &sessions,
        SessionCommand::MirrorReestablish { bcv: "bcv1".into() },
    );
    let info = wait_resting(&fig.fixture, SessionKind::Mirror, "bcv1").await;
    assert_eq!(
        info.tracks_copied_last, 2,
        "reestablish copies only T and U: {info:?}"
    );
    assert!(!fig.target_changed("bcv1", T) && !fig.target_changed("bcv1", U));
    assert_eq!(
        stored_track(fig.store(), "bcv1", U),
        stored_track(fig.store(), "std", U)
    );
    fig.check(241, [Some(true), Some(true)], [0x40, 0x40, 0x35]);

    // 242: incremental restore from BCV(2): the standard gets BCV(2)'s track back, DDF(2)
    // becomes unchanged and DDF(1) changed, so BCV(1) will get the restored data too.
    let info = command(
        &sessions,
        SessionCommand::MirrorRestore {
            bcv: "bcv2".into(),
            incremental: true,
        },
    )
    .unwrap();
    assert_eq!(
        info.tracks_remaining, 1,
        "only the changed track is restored"
    );
    // The standard serves the restored image at once (a read pulls the track first).
    fig.qemu_read("std", T, 0x35).await;
    let info = wait_resting(&fig.fixture, SessionKind::Mirror, "bcv2").await;
    assert_eq!(info.state, SessionState::Synchronized);
    wait_resting(&fig.fixture, SessionKind::Mirror, "bcv1").await;
    assert!(bit(fig.store(), "std", Bits::Session(fig.slot("bcv1")), T));
    assert!(!bit(fig.store(), "std", Bits::Session(fig.slot("bcv2")), T));
    fig.check(242, [Some(true), Some(false)], [0x35, 0x35, 0x35]);

    // 243: a host writes the standard: every session's bit changed; both BCVs are
    // attached sync mirrors, so both have the write when qemu-io hears back.
    fig.qemu_write("std", T, 0x43).await;
    fig.check(243, [Some(true), Some(true)], [0x43, 0x43, 0x43]);

    // 244: differential split of BCV(2): DDF(2) unchanged, BCV(2) ready with the image.
    command(&sessions, split("bcv2", true));
    fig.check(244, [Some(true), Some(false)], [0x43, 0x43, 0x43]);
    assert!(!fig.target_changed("bcv2", T));
    fig.qemu_read("bcv2", T, 0x43).await;
}

#[test]
fn seed_001_example_activate_after_a_caught_up_precopy_copies_only_the_tracks_rewritten_since() {
    const TRACKS: u64 = 1000;
    const HOT: u64 = 100;
    let sessions = memory_sessions();
    let store = sessions.store().clone();
    store.create("source", TRACKS * 4096, 4096).unwrap();
    store.create("clone", TRACKS * 4096, 4096).unwrap();
    for track in 0..TRACKS {
        write_track(&sessions, "source", track, (track % 200) as u8 + 1);
    }
    command(
        &sessions,
        SessionCommand::CloneCreate {
            source: "source".into(),
            target: "clone".into(),
            precopy: true,
            extents: Vec::new(),
        },
    );
    // The host keeps rewriting its 100 hot tracks while the precopy runs.
    let id = sessions.copying()[0];
    let mut round = 0u8;
    while sessions
        .show(SessionKind::Clone, "clone")
        .unwrap()
        .tracks_remaining
        > HOT
    {
        sessions.copy_step(id).unwrap();
        round = round.wrapping_add(1);
        for track in (0..HOT).filter(|track| track % 7 == u64::from(round) % 7) {
            write_track(&sessions, "source", track * 10, round | 1);
        }
    }
    sessions.settle().unwrap();
    let caught_up = sessions.show(SessionKind::Clone, "clone").unwrap();
    assert_eq!(caught_up.state, SessionState::Precopying);
    assert_eq!(caught_up.tracks_remaining, 0);
    assert!(
        caught_up.tracks_copied_last > TRACKS,
        "rewritten tracks were copied again: {caught_up:?}"
    );
    assert_eq!(caught_up.tracks_total, TRACKS);
    // Since the precopy's last pass the host rewrote 37 of the hot tracks.
    let rewritten: Vec<u64> = (0..37).map(|index| index * 10).collect();
    for &track in &rewritten {
        write_track(&sessions, "source", track, 0xee);
    }
    let image = whole(&store, "source");
    let info = command(
        &sessions,
        SessionCommand::CloneActivate {
            target: "clone".into(),
        },
    )
    .unwrap();
    assert_eq!(info.tracks_remaining, rewritten.len() as u64);
    sessions.settle().unwrap();
    let info = sessions.show(SessionKind::Clone, "clone").unwrap();
    assert_eq!(info.state, SessionState::Copied);
    assert_eq!(
        info.tracks_copied_last,
        rewritten.len() as u64,
        "activate copies exactly the tracks rewritten since the last precopy pass"
    );
    assert_eq!(whole(&store, "clone"), image);
    command(
        &sessions,
        SessionCommand::CloneTerminate {
            target: "clone".into(),
        },
    );
    assert_eq!(store.volume("source").unwrap().info().session_slots_used, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_activated_under_host_io_holds_the_source_image_of_the_instant_of_activation() {
    const TRACK_BYTES: u64 = 64 << 10;
    const TRACKS: u64 = 64;
    let fixture = NodeFixture::start().await;
    let store = fixture.node.store.clone();
    let sessions = fixture.node.sessions.clone();
    store
        .create("source", TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
        .unwrap();
    store
        .create("clone", TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
        .unwrap();
    let source_uri = fixture.nbd_uri("source");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &source_uri,
            "-c",
            &format!("write -P 0x11 0 {}", TRACKS * TRACK_BYTES),
        ],
    )
    .await;
    command(
        &sessions,
        SessionCommand::CloneCreate {
            source: "source".into(),
            target: "clone".into(),
            precopy: false,
            extents: Vec::new(),
        },
    );
    // Slow the background copy so host IO meets tracks that are still pending.
    command(
        &sessions,
        SessionCommand::SetRate {
            target: "clone".into(),
            mebibytes_per_second: Some(1),
        },
    );
    let image = whole(&store, "source");
    command(
        &sessions,
        SessionCommand::CloneActivate {
            target: "clone".into(),
        },
    );
    // Right after activation: writes to the source (copy before write) and to the clone
    // (copy on first access, partial tracks), and reads of pending clone tracks.
    let clone_uri = fixture.nbd_uri("clone");
    let source_writes = [(5u64, 0x55u8), (40, 0x56), (63, 0x57)];
    for (track, byte) in source_writes {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                &source_uri,
                "-c",
                &format!("write -P {byte:#04x} {} 4096", track * TRACK_BYTES + 8192),
            ],
        )
        .await;
    }
    let clone_writes = [(7u64, 0x77u8), (40, 0x78)];
    for (track, byte) in clone_writes {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                &clone_uri,
                "-c",
                &format!("write -P {byte:#04x} {} 512", track * TRACK_BYTES + 1024),
            ],
        )
        .await;
    }
    let info = sessions.show(SessionKind::Clone, "clone").unwrap();
    assert!(
        info.tracks_remaining > 0,
        "the copy should still be running while the host works: {info:?}"
    );
    let output = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &clone_uri,
            "-c",
            &format!("read -P 0x11 {} {}", 50 * TRACK_BYTES, TRACK_BYTES),
        ],
    )
    .await;
    assert!(!output.contains("Pattern verification failed"), "{output}");
    command(
        &sessions,
        SessionCommand::SetRate {
            target: "clone".into(),
            mebibytes_per_second: None,
        },
    );
    let info = wait_resting(&fixture, SessionKind::Clone, "clone").await;
    assert_eq!(info.state, SessionState::Copied);
    let mut expected = image;
    for (track, byte) in clone_writes {
        let at = (track * TRACK_BYTES + 1024) as usize;
        expected[at..at + 512].fill(byte);
    }
    assert_eq!(
        whole(&store, "clone"),
        expected,
        "the clone is the source's image at activation plus its own writes"
    );
    // qemu-img agrees, through NBD, against a raw file of the expected image.
    let raw = fixture.directory.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &clone_uri,
        ],
    )
    .await;
}

fn refused<E: Engine>(sessions: &Sessions<E>, command: SessionCommand, code: ErrorCode) -> String {
    match sessions.command(command.clone()) {
        Ok(info) => panic!("{command:?} was accepted: {info:?}"),
        Err(error) => {
            assert_eq!(error.code(), code, "{command:?}: {error}");
            error.to_string()
        }
    }
}

/// Everything a refused command must leave as it was.
fn snapshot<E: Engine>(sessions: &Sessions<E>, volumes: &[&str]) -> String {
    let store = sessions.store();
    let mut text = format!(
        "{:?}",
        sessions
            .list(None)
            .unwrap()
            .iter()
            .map(|info| (
                info.id,
                info.state,
                info.slots.clone(),
                info.tracks_remaining
            ))
            .collect::<Vec<_>>()
    );
    for name in volumes {
        let volume = store.volume(name).unwrap();
        text.push_str(&format!(
            " {name}:{:?}:{}",
            volume.readiness(),
            volume.info().session_slots_used
        ));
        for bits in [Bits::TargetChanged, Bits::Invalid] {
            text.push_str(&format!(":{}", store.count_set(&volume, bits).unwrap()));
        }
    }
    text
}

#[test]
fn the_seventeenth_session_and_every_illegal_transition_are_refused_and_change_nothing() {
    let sessions = memory_sessions();
    let store = sessions.store().clone();
    store.create("std", 32 * 4096, 4096).unwrap();
    let mut names = Vec::new();
    for index in 0..17 {
        let name = format!("bcv{index}");
        store.create(&name, 32 * 4096, 4096).unwrap();
        names.push(name);
    }
    for name in &names[..16] {
        command(&sessions, establish("std", name));
    }
    let all: Vec<&str> = std::iter::once("std")
        .chain(names.iter().map(String::as_str))
        .collect();
    let before = snapshot(&sessions, &all);
    let message = refused(
        &sessions,
        establish("std", "bcv16"),
        ErrorCode::LimitExceeded,
    );
    assert!(message.contains("no free session slot"), "{message}");
    assert_eq!(snapshot(&sessions, &all), before);
    assert_eq!(store.volume("bcv16").unwrap().readiness(), Readiness::Ready);

    // Split before the mirror is synchronized (no copy has run yet).
    let message = refused(&sessions, split("bcv0", false), ErrorCode::IllegalState);
    assert!(message.contains("not synchronized"), "{message}");
    // Restore from a BCV that does not hold a complete image yet.
    let message = refused(
        &sessions,
        SessionCommand::MirrorRestore {
            bcv: "bcv0".into(),
            incremental: false,
        },
        ErrorCode::IllegalState,
    );
    assert!(message.contains("complete image"), "{message}");
    // Reestablish what is not split; establish what is established.
    refused(
        &sessions,
        SessionCommand::MirrorReestablish { bcv: "bcv0".into() },
        ErrorCode::IllegalState,
    );
    refused(&sessions, establish("std", "bcv0"), ErrorCode::IllegalState);
    assert_eq!(snapshot(&sessions, &all), before);

    sessions.settle().unwrap();
    command(&sessions, split("bcv0", false));
    refused(&sessions, split("bcv0", false), ErrorCode::IllegalState);
    // A BCV of another standard cannot be established against this one.
    store.create("other", 32 * 4096, 4096).unwrap();
    refused(
        &sessions,
        establish("other", "bcv0"),
        ErrorCode::IllegalState,
    );

    // Clones: activate twice, terminate before copied, precopy after activation, and a
    // destination already in a session.
    for index in 1..16 {
        command(
            &sessions,
            SessionCommand::MirrorCancel {
                bcv: format!("bcv{index}"),
            },
        );
    }
    store.create("clone", 32 * 4096, 4096).unwrap();
    refused(
        &sessions,
        SessionCommand::CloneActivate {
            target: "clone".into(),
        },
        ErrorCode::NotFound,
    );
    command(
        &sessions,
        SessionCommand::CloneCreate {
            source: "std".into(),
            target: "clone".into(),
            precopy: false,
            extents: Vec::new(),
        },
    );
    let all = ["std", "clone", "bcv0"];
    let message = refused(
        &sessions,
        SessionCommand::CloneTerminate {
            target: "clone".into(),
        },
        ErrorCode::IllegalState,
    );
    assert!(message.contains("never activated"), "{message}");
    command(
        &sessions,
        SessionCommand::CloneActivate {
            target: "clone".into(),
        },
    );
    let before = snapshot(&sessions, &all);
    let message = refused(
        &sessions,
        SessionCommand::CloneActivate {
            target: "clone".into(),
        },
        ErrorCode::IllegalState,
    );
    assert!(message.contains("already active"), "{message}");
    let message = refused(
        &sessions,
        SessionCommand::CloneTerminate {
            target: "clone".into(),
        },
        ErrorCode::IllegalState,
    );
    assert!(message.contains("still copying"), "{message}");
    refused(
        &sessions,
        SessionCommand::ClonePrecopy {
            target: "clone".into(),
        },
        ErrorCode::IllegalState,
    );
    refused(
        &sessions,
        SessionCommand::CloneCreate {
            source: "bcv0".into(),
            target: "clone".into(),
            precopy: false,
            extents: Vec::new(),
        },
        ErrorCode::IllegalState,
    );
    // A restore would change the clone's source under it.
    refused(
        &sessions,
        SessionCommand::MirrorRestore {
            bcv: "bcv0".into(),
            incremental: true,
        },
        ErrorCode::IllegalState,
    );
    // An extent outside the volume.
    store.create("clone2", 32 * 4096, 4096).unwrap();
    refused(
        &sessions,
        SessionCommand::CloneCreate {
            source: "std".into(),
            target: "clone2".into(),
            precopy: false,
            extents: vec![protocol::messages::Extent {
                first: 30,
                last: 40,
            }],
        },
        ErrorCode::InvalidArgument,
    );
    assert_eq!(snapshot(&sessions, &all), before);
    assert_eq!(
        store.volume("clone2").unwrap().readiness(),
        Readiness::Ready
    );
}

#[test]
fn a_copy_interrupted_by_a_restart_resumes_from_its_bits_and_sends_only_what_is_missing() {
    const TRACKS: u64 = 64;
    let directory = tempfile::tempdir().unwrap();
    let open = || {
        let store = Arc::new(
            VolumeStore::open(RocksEngine::open(&directory.path().join("db")).unwrap()).unwrap(),
        );
        Sessions::open(store, 1 << 20, None).unwrap()
    };
    let sessions = open();
    sessions.store().create("std", TRACKS * 4096, 4096).unwrap();
    sessions.store().create("bcv", TRACKS * 4096, 4096).unwrap();
    for track in 0..TRACKS {
        write_track(&sessions, "std", track, track as u8 + 1);
    }
    command(&sessions, establish("std", "bcv"));
    let id = sessions.copying()[0];
    sessions.copy_step(id).unwrap();
    sessions.copy_step(id).unwrap();
    let before = sessions.show(SessionKind::Mirror, "bcv").unwrap();
    assert_eq!(before.tracks_remaining, TRACKS - 32);
    drop(sessions);

    let sessions = open();
    let resumed = sessions.show(SessionKind::Mirror, "bcv").unwrap();
    assert_eq!(resumed.state, SessionState::Syncing);
    assert_eq!(
        resumed.tracks_remaining,
        TRACKS - 32,
        "the bits survived the restart"
    );
    // Progress comes from the total stored when the copy started and the bits now: the
    // restart changes neither.
    assert_eq!(resumed.tracks_total, before.tracks_total);
    assert_eq!(resumed.tracks_copied, before.tracks_copied);
    assert!(resumed.percent >= before.percent, "{resumed:?} {before:?}");
    let moved_before = resumed.tracks_copied_last;
    sessions.settle().unwrap();
    let after = sessions.show(SessionKind::Mirror, "bcv").unwrap();
    assert_eq!(after.state, SessionState::Synchronized);
    assert_eq!(
        after.tracks_copied_last - moved_before,
        TRACKS - 32,
        "only the missing tracks were sent after the restart"
    );
    assert!(after.percent >= resumed.percent);
    assert_eq!(
        whole(sessions.store(), "bcv"),
        whole(sessions.store(), "std")
    );
}

#[test]
fn a_differential_split_sends_down_a_cascade_only_what_changed_since_the_last_split() {
    const TRACKS: u64 = 48;
    let sessions = memory_sessions();
    let store = sessions.store().clone();
    for name in ["std", "bcv", "bcv2"] {
        store.create(name, TRACKS * 4096, 4096).unwrap();
    }
    for track in 0..TRACKS {
        write_track(&sessions, "std", track, 1);
    }
    command(&sessions, establish("std", "bcv"));
    sessions.settle().unwrap();
    command(&sessions, split("bcv", false));
    // The cascade below the BCV: BCV -> BCV2, synchronized.
    command(&sessions, establish("bcv", "bcv2"));
    sessions.settle().unwrap();
    assert_eq!(whole(&store, "bcv2"), whole(&store, "bcv"));
    let copied = |sessions: &Sessions<MemoryEngine>| {
        sessions
            .show(SessionKind::Mirror, "bcv2")
            .unwrap()
            .tracks_copied_last
    };

    // Five tracks change on the standard; the BCV is refreshed and split differentially:
    // exactly those five go down to BCV2.
    for track in [2, 3, 17, 30, 47] {
        write_track(&sessions, "std", track, 2);
    }
    command(
        &sessions,
        SessionCommand::MirrorReestablish { bcv: "bcv".into() },
    );
    sessions.settle().unwrap();
    let before = copied(&sessions);
    command(&sessions, split("bcv", true));
    sessions.settle().unwrap();
    assert_eq!(copied(&sessions) - before, 5);
    assert_eq!(whole(&store, "bcv2"), whole(&store, "std"));

    // Three more change; a full split sends every track down.
    for track in [4, 5, 6] {
        write_track(&sessions, "std", track, 3);
    }
    command(
        &sessions,
        SessionCommand::MirrorReestablish { bcv: "bcv".into() },
    );
    sessions.settle().unwrap();
    let before = copied(&sessions);
    command(&sessions, split("bcv", false));
    sessions.settle().unwrap();
    assert_eq!(copied(&sessions) - before, TRACKS);
    assert_eq!(whole(&store, "bcv2"), whole(&store, "std"));
}

#[test]
fn rotate_refreshes_the_oldest_split_bcv_so_n_bcvs_hold_the_last_n_points_in_time() {
    let sessions = memory_sessions();
    let store = sessions.store().clone();
    for name in ["std", "h1", "h2", "h3"] {
        store.create(name, 8 * 4096, 4096).unwrap();
    }
    for (index, bcv) in ["h1", "h2", "h3"].iter().enumerate() {
        write_track(&sessions, "std", 0, index as u8 + 1);
        command(&sessions, establish("std", bcv));
        sessions.settle().unwrap();
        command(&sessions, split(bcv, false));
    }
    // Points in time 4 and 5 replace the oldest (h1, then h2).
    for point in 4u8..=5 {
        write_track(&sessions, "std", 0, point);
        command(
            &sessions,
            SessionCommand::MirrorRotate {
                standard: "std".into(),
            },
        );
        sessions.settle().unwrap();
    }
    let first_byte = |name: &str| stored_track(&store, name, 0)[0];
    assert_eq!(
        (first_byte("h1"), first_byte("h2"), first_byte("h3")),
        (4, 5, 3)
    );
    for name in ["h1", "h2", "h3"] {
        let info = sessions.show(SessionKind::Mirror, name).unwrap();
        assert_eq!(info.state, SessionState::Split);
        assert_eq!(store.volume(name).unwrap().readiness(), Readiness::Ready);
    }
    match sessions.command(SessionCommand::MirrorRotate {
        standard: "h1".into(),
    }) {
        Err(Error::SessionRefused { reason, .. }) => {
            assert!(reason.contains("no split BCV"), "{reason}")
        }
        other => panic!("rotate without BCVs: {other:?}"),
    }
}

/// A gsnap lineage: the snap of P freezes the tracks its hosts wrote since the last snap
/// and starts a new live slot in the same write; the target's rotation takes its volume
/// from its hosts; settling frees the frozen slot and gives the target back; the slots
/// survive a restart (start-up frees only slots nobody holds); dropping frees them all.
#[test]
fn a_lineage_freezes_the_tracks_written_between_two_snaps_and_survives_a_restart() {
    use protocol::gsnap::LineageStep;
    use protocol::messages::Extent;
    const TRACKS: u64 = 32;
    let directory = tempfile::tempdir().unwrap();
    let open = || {
        let store = Arc::new(
            VolumeStore::open(RocksEngine::open(&directory.path().join("db")).unwrap()).unwrap(),
        );
        Sessions::open(store, 1 << 20, None).unwrap()
    };
    let sessions = open();
    let store = sessions.store().clone();
    store.create("p", TRACKS * 4096, 4096).unwrap();
    store.create("s", TRACKS * 4096, 4096).unwrap();
    let snap = |store: &VolumeStore<RocksEngine>| {
        store
            .snap_with_lineage("p", "p-mid", &[], &[], true, None, Some("p>s"))
            .unwrap();
    };
    let frozen = |store: &VolumeStore<RocksEngine>, volume: &str| {
        store
            .lineage_frozen_tracks(&store.volume(volume).unwrap(), "p>s")
            .unwrap()
    };
    write_track(&sessions, "p", 1, 1);
    snap(&store);
    assert_eq!(
        frozen(&store, "p"),
        None,
        "a first rotation freezes nothing"
    );
    write_track(&sessions, "p", 3, 3);
    write_track(&sessions, "p", 4, 4);
    snap(&store);
    let run = |first, last| Extent { first, last };
    assert_eq!(frozen(&store, "p"), Some(vec![run(3, 4)]));
    write_track(&sessions, "p", 9, 9);

    // The target side: its first rotation freezes nothing and takes it from its hosts.
    sessions
        .lineage_step("s", "p>s", LineageStep::Rotate)
        .unwrap();
    let target = store.volume("s").unwrap();
    assert_eq!(target.readiness(), Readiness::NotReady);
    assert_eq!(frozen(&store, "s"), None);
    let info = sessions
        .lineage_step("s", "p>s", LineageStep::Settle)
        .unwrap();
    assert_eq!(info.readiness, Readiness::Ready);
    write_track(&sessions, "s", 7, 7);
    assert_eq!(store.volume("p").unwrap().info().session_slots_used, 2);
    drop(sessions);
    drop(store);

    // A restart keeps every slot and record.
    let sessions = open();
    let store = sessions.store().clone();
    assert_eq!(store.volume("p").unwrap().info().session_slots_used, 2);
    assert_eq!(frozen(&store, "p"), Some(vec![run(3, 4)]));
    sessions
        .lineage_step("p", "p>s", LineageStep::Settle)
        .unwrap();
    assert_eq!(store.volume("p").unwrap().info().session_slots_used, 1);
    // The live slot kept marking writes across the restart and the settle.
    write_track(&sessions, "p", 10, 10);
    snap(&store);
    assert_eq!(frozen(&store, "p"), Some(vec![run(9, 10)]));
    sessions
        .lineage_step("s", "p>s", LineageStep::Rotate)
        .unwrap();
    assert_eq!(frozen(&store, "s"), Some(vec![run(7, 7)]));

    // Dropping frees every slot; the next rotation starts afresh.
    for volume in ["p", "s"] {
        sessions
            .lineage_step(volume, "p>s", LineageStep::Drop)
            .unwrap();
        assert_eq!(store.volume(volume).unwrap().info().session_slots_used, 0);
    }
    assert_eq!(
        store.volume("s").unwrap().readiness(),
        Readiness::NotReady,
        "a dropped target keeps the readiness its job left"
    );
    snap(&store);
    assert_eq!(frozen(&store, "p"), None);

    // A rotation repeated before any settle (a retry whose remembered answer was lost)
    // loses nothing: the frozen slot keeps its tracks and takes the live slot's.
    write_track(&sessions, "p", 20, 20);
    snap(&store);
    write_track(&sessions, "p", 21, 21);
    snap(&store);
    assert_eq!(frozen(&store, "p"), Some(vec![run(20, 21)]));
    assert_eq!(store.volume("p").unwrap().info().session_slots_used, 2);
    // A target released after a failed job goes back to its hosts.
    sessions
        .lineage_step("s", "p>s", LineageStep::Rotate)
        .unwrap();
    let info = sessions
        .lineage_step("s", "p>s", LineageStep::Release)
        .unwrap();
    assert_eq!(info.readiness, Readiness::Ready);
    assert_eq!(info.session_slots_used, 0);
}
