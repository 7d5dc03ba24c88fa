//! Commands on a mirror whose BCV is on another node, while that node's hosts keep
//! writing the BCV: this node's gates do not hold them off, so a re-establish must take
//! the BCV from its hosts before it reads the tracks they changed, or a write landing
//! between the reading and the command would be missing from the resync and the
//! "synchronized" BCV would differ from its standard.

use node::copy::remote::TargetLink;
use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::Durability;
use node::store::VolumeStore;
use protocol::session::{
    MirrorMode, RemoteVolume, SessionCommand, SessionKind, SessionState, TargetAnswer,
    TargetOperation,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRACKS: u64 = 16;
const TRACK_BYTES: u64 = 4096;

/// What the BCV's host does right after node beta answered a query of its changed
/// tracks: the worst moment for a write the re-establish must not lose.
type AfterChangedTracks = Box<dyn Fn(&Sessions<MemoryEngine>) + Send>;

/// The link to node beta: its `Sessions`, called directly, and the host action to run
/// once it answered `ChangedTracks`.
struct RacingLink {
    beta: Arc<Sessions<MemoryEngine>>,
    after_changed_tracks: Mutex<Option<AfterChangedTracks>>,
}

impl RacingLink {
    fn serve(&self, operation: TargetOperation) -> node::Result<TargetAnswer> {
        let changed_tracks = matches!(operation, TargetOperation::ChangedTracks { .. });
        let answer = self.beta.serve_target(operation);
        if changed_tracks {
            if let Some(host) = self.after_changed_tracks.lock().unwrap().take() {
                host(&self.beta);
            }
        }
        answer
    }
}

impl TargetLink for RacingLink {
    fn call(
        &self,
        _remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> node::Result<TargetAnswer> {
        self.serve(operation)
    }

    fn call_within(
        &self,
        _remote: &RemoteVolume,
        operation: TargetOperation,
        _timeout: Duration,
    ) -> node::Result<TargetAnswer> {
        self.serve(operation)
    }

    fn this_node(&self) -> (String, String) {
        ("alpha".to_string(), "127.0.0.1:1".to_string())
    }
}

fn memory_sessions(link: Option<Arc<dyn TargetLink>>) -> Sessions<MemoryEngine> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    Sessions::open(store, 1 << 20, link).unwrap()
}

fn write(
    sessions: &Sessions<MemoryEngine>,
    volume: &str,
    track: u64,
    byte: u8,
) -> node::Result<()> {
    let handle = sessions.store().volume(volume).unwrap();
    sessions.write(
        &handle,
        track * TRACK_BYTES,
        TRACK_BYTES,
        Some(&vec![byte; TRACK_BYTES as usize]),
        Durability::Logged,
    )
}

fn image(sessions: &Sessions<MemoryEngine>, volume: &str) -> Vec<u8> {
    let store = sessions.store();
    let handle = store.volume(volume).unwrap();
    store.read(&handle, 0, TRACKS * TRACK_BYTES).unwrap()
}

fn on_beta(command: SessionCommand, alpha: &Sessions<MemoryEngine>) {
    alpha
        .command_with(
            command,
            Some(RemoteVolume {
                node: "beta".into(),
                address: "127.0.0.1:2".into(),
                volume: "bcv".into(),
            }),
        )
        .unwrap();
    alpha.settle().unwrap();
}

#[test]
fn a_bcv_host_write_racing_a_reestablish_is_refused_or_resynchronized() {
    let beta = Arc::new(memory_sessions(None));
    beta.store()
        .create("bcv", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    let link = Arc::new(RacingLink {
        beta: beta.clone(),
        after_changed_tracks: Mutex::new(None),
    });
    let alpha = memory_sessions(Some(link.clone()));
    alpha
        .store()
        .create("std", TRACKS * TRACK_BYTES, 4096)
        .unwrap();
    for track in 0..TRACKS {
        write(&alpha, "std", track, 1).unwrap();
    }
    on_beta(
        SessionCommand::MirrorEstablish {
            standard: "std".into(),
            bcv: "bcv".into(),
            mode: MirrorMode::Sync,
            strict: false,
            target_timeout_milliseconds: None,
        },
        &alpha,
    );
    on_beta(
        SessionCommand::MirrorSplit {
            bcv: "bcv".into(),
            differential: false,
        },
        &alpha,
    );
    // The BCV's host writes track 3 while split (tracked), then track 9 at the moment the
    // re-establish has just read the changed tracks.
    write(&beta, "bcv", 3, 7).unwrap();
    let racing_write: Arc<Mutex<Option<node::Result<()>>>> = Arc::default();
    let outcome = racing_write.clone();
    *link.after_changed_tracks.lock().unwrap() = Some(Box::new(move |beta| {
        *outcome.lock().unwrap() = Some(write(beta, "bcv", 9, 8));
    }));
    on_beta(
        SessionCommand::MirrorReestablish { bcv: "bcv".into() },
        &alpha,
    );
    let racing_write = racing_write.lock().unwrap().take();
    assert!(
        racing_write.is_some(),
        "the re-establish read the BCV's changed tracks"
    );
    assert!(
        racing_write.unwrap().is_err(),
        "the BCV was taken from its hosts before its changed tracks were read, so the write is refused"
    );
    let info = alpha.show(SessionKind::Mirror, "bcv").unwrap();
    assert_eq!(info.state, SessionState::Synchronized);
    assert!(
        image(&alpha, "std") == image(&beta, "bcv"),
        "a synchronized BCV holds its standard's image"
    );
}
