//! A model-based property test of copy sessions: random interleavings of host writes,
//! host reads, partial copy steps and session commands against a plain in-memory model of
//! the seeds' rules (what every host sees, every mirror's changed bits, every BCV's
//! target-changed bits, every volume's readiness, and which commands are refused).
//!
//! The configuration is seed 002's FIG. 9: one standard volume (`std`) and three others
//! that may become its clones or BCVs. Before a command the copies are allowed to finish
//! (the seeds' commands are issued against resting sessions); after it, host IO
//! interleaves with partial copy steps, which is where copy before write, copy on first
//! access and pulls of restored tracks must keep every host's view exact.

use node::copy::Sessions;
use node::engine::memory::MemoryEngine;
use node::engine::Durability;
use node::store::{Bits, VolumeStore};
use proptest::prelude::*;
use protocol::messages::{Extent, Readiness};
use protocol::session::{MirrorMode, SessionCommand, SessionKind, SessionState};
use std::sync::Arc;

const TRACK_BYTES: u64 = 4096;
/// More tracks than one copy step moves, so steps leave copies half done.
const TRACKS: u64 = 40;
const TARGETS: [&str; 3] = ["bcv1", "bcv2", "bcv3"];
const STANDARD: &str = "std";

#[derive(Debug, Clone)]
enum Operation {
    Write {
        volume: usize,
        track: u64,
        byte: u8,
    },
    Read {
        volume: usize,
        track: u64,
    },
    Step {
        session: usize,
    },
    CloneCreate {
        target: usize,
        precopy: bool,
        extent: Option<(u64, u64)>,
    },
    ClonePrecopy {
        target: usize,
    },
    CloneActivate {
        target: usize,
    },
    CloneTerminate {
        target: usize,
    },
    Establish {
        target: usize,
    },
    Split {
        target: usize,
        differential: bool,
    },
    Reestablish {
        target: usize,
    },
    Restore {
        target: usize,
        incremental: bool,
    },
    Cancel {
        target: usize,
    },
    Rotate,
}

fn operation() -> impl Strategy<Value = Operation> {
    // Volume 0 is the standard; 1..=3 the targets.
    let volume = 0usize..4;
    let target = 0usize..3;
    prop_oneof![
        6 => (volume.clone(), 0..TRACKS, 1u8..=255).prop_map(|(volume, track, byte)| Operation::Write { volume, track, byte }),
        3 => (volume, 0..TRACKS).prop_map(|(volume, track)| Operation::Read { volume, track }),
        4 => (0usize..3).prop_map(|session| Operation::Step { session }),
        2 => (target.clone(), any::<bool>(), proptest::option::of((0..TRACKS, 0..TRACKS)))
            .prop_map(|(target, precopy, extent)| Operation::CloneCreate {
                target,
                precopy,
                extent: extent.map(|(a, b)| (a.min(b), a.max(b))),
            }),
        1 => target.clone().prop_map(|target| Operation::ClonePrecopy { target }),
        2 => target.clone().prop_map(|target| Operation::CloneActivate { target }),
        1 => target.clone().prop_map(|target| Operation::CloneTerminate { target }),
        2 => target.clone().prop_map(|target| Operation::Establish { target }),
        2 => (target.clone(), any::<bool>()).prop_map(|(target, differential)| Operation::Split { target, differential }),
        2 => target.clone().prop_map(|target| Operation::Reestablish { target }),
        1 => (target.clone(), any::<bool>()).prop_map(|(target, incremental)| Operation::Restore { target, incremental }),
        1 => target.prop_map(|target| Operation::Cancel { target }),
        1 => Just(Operation::Rotate),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ModelKind {
    Clone,
    Mirror,
}

#[derive(Debug, Clone)]
struct ModelSession {
    kind: ModelKind,
    target: usize,
    state: SessionState,
    extent: (u64, u64),
    /// Mirror: seed 002's PB column, "changed since the last split".
    changed: Vec<bool>,
    split_sequence: u64,
}

/// The seeds' rules over plain vectors.
struct Model {
    /// What a host reading each volume must see, track by track (one fill byte a track).
    images: [Vec<u8>; 4],
    readiness: [Readiness; 4],
    /// BCV target-changed bits (seed 002's M4b), per volume.
    target_changed: [Vec<bool>; 4],
    sessions: Vec<ModelSession>,
    split_counter: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            images: std::array::from_fn(|_| vec![0; TRACKS as usize]),
            readiness: [Readiness::Ready; 4],
            target_changed: std::array::from_fn(|_| vec![false; TRACKS as usize]),
            sessions: Vec::new(),
            split_counter: 0,
        }
    }

    fn session_of(&self, target: usize, kind: ModelKind) -> Option<usize> {
        self.sessions
            .iter()
            .position(|session| session.target == target && session.kind == kind)
    }

    fn any_session_of(&self, target: usize) -> Option<usize> {
        self.sessions
            .iter()
            .position(|session| session.target == target)
    }

    fn split_tracked(&self, volume: usize) -> bool {
        self.sessions.iter().any(|session| {
            session.kind == ModelKind::Mirror
                && session.target == volume
                && session.state == SessionState::Split
        })
    }

    /// A host write: refused on a volume that is not ready, otherwise it lands and marks
    /// every mirror of the standard changed (FIG. 10, event 230) or the split BCV's
    /// target-changed bit (event 231).
    fn write(&mut self, volume: usize, track: u64, byte: u8) -> bool {
        if self.readiness[volume] != Readiness::Ready {
            return false;
        }
        self.images[volume][track as usize] = byte;
        if volume == 0 {
            for session in &mut self.sessions {
                if session.kind == ModelKind::Mirror {
                    session.changed[track as usize] = true;
                }
            }
        } else if self.split_tracked(volume) {
            self.target_changed[volume][track as usize] = true;
        }
        true
    }

    /// Applies a command; false when the seeds refuse it (nothing changes then).
    fn command(&mut self, operation: &Operation) -> bool {
        let volume_of = |target: usize| target + 1;
        match *operation {
            Operation::CloneCreate {
                target,
                precopy,
                extent,
            } => {
                let volume = volume_of(target);
                if self.any_session_of(volume).is_some() {
                    return false;
                }
                self.readiness[volume] = Readiness::NotReady;
                self.sessions.push(ModelSession {
                    kind: ModelKind::Clone,
                    target: volume,
                    state: if precopy {
                        SessionState::Precopying
                    } else {
                        SessionState::Created
                    },
                    extent: extent.unwrap_or((0, TRACKS - 1)),
                    changed: vec![false; TRACKS as usize],
                    split_sequence: 0,
                });
                true
            }
            Operation::ClonePrecopy { target } => {
                let Some(index) = self.session_of(volume_of(target), ModelKind::Clone) else {
                    return false;
                };
                if self.sessions[index].state != SessionState::Created {
                    return false;
                }
                self.sessions[index].state = SessionState::Precopying;
                true
            }
            Operation::CloneActivate { target } => {
                let volume = volume_of(target);
                let Some(index) = self.session_of(volume, ModelKind::Clone) else {
                    return false;
                };
                let session = &mut self.sessions[index];
                if !matches!(
                    session.state,
                    SessionState::Created | SessionState::Precopying
                ) {
                    return false;
                }
                // The point in time is now; the copy finishes before the next command.
                session.state = SessionState::Copied;
                let (first, last) = session.extent;
                for track in first..=last {
                    self.images[volume][track as usize] = self.images[0][track as usize];
                }
                self.readiness[volume] = Readiness::Ready;
                true
            }
            Operation::CloneTerminate { target } => {
                let Some(index) = self.session_of(volume_of(target), ModelKind::Clone) else {
                    return false;
                };
                if self.sessions[index].state != SessionState::Copied {
                    return false;
                }
                self.sessions.remove(index);
                true
            }
            Operation::Establish { target } => {
                let volume = volume_of(target);
                match self.any_session_of(volume) {
                    Some(index) => {
                        let session = &mut self.sessions[index];
                        if session.kind != ModelKind::Mirror || session.state != SessionState::Split
                        {
                            return false;
                        }
                        session.state = SessionState::Synchronized;
                        session.changed = vec![true; TRACKS as usize];
                    }
                    None => self.sessions.push(ModelSession {
                        kind: ModelKind::Mirror,
                        target: volume,
                        state: SessionState::Synchronized,
                        extent: (0, TRACKS - 1),
                        changed: vec![true; TRACKS as usize],
                        split_sequence: 0,
                    }),
                }
                self.readiness[volume] = Readiness::NotReady;
                self.target_changed[volume] = vec![false; TRACKS as usize];
                true
            }
            Operation::Split { target, .. } => {
                let volume = volume_of(target);
                let Some(index) = self.session_of(volume, ModelKind::Mirror) else {
                    return false;
                };
                if self.sessions[index].state != SessionState::Synchronized {
                    return false;
                }
                self.split(index);
                true
            }
            Operation::Reestablish { target } => {
                let volume = volume_of(target);
                let Some(index) = self.session_of(volume, ModelKind::Mirror) else {
                    return false;
                };
                if self.sessions[index].state != SessionState::Split {
                    return false;
                }
                self.reestablish(index);
                true
            }
            Operation::Restore {
                target,
                incremental: _,
            } => {
                let volume = volume_of(target);
                let Some(index) = self.session_of(volume, ModelKind::Mirror) else {
                    return false;
                };
                if self.sessions[index].state != SessionState::Split {
                    return false;
                }
                if self.sessions.iter().any(|session| {
                    session.kind == ModelKind::Clone && session.state != SessionState::Copied
                }) {
                    return false;
                }
                // Full and incremental restores leave the same image: a track neither side
                // changed since the split is already equal (seed 002, FIG. 8).
                let restored: Vec<bool> = (0..TRACKS as usize)
                    .map(|track| {
                        self.images[0][track] != self.images[volume][track]
                            || self.sessions[index].changed[track]
                            || self.target_changed[volume][track]
                    })
                    .collect();
                let Operation::Restore { incremental, .. } = *operation else {
                    unreachable!()
                };
                self.images[0] = self.images[volume].clone();
                for (other_index, other) in self.sessions.iter_mut().enumerate() {
                    if other_index != index && other.kind == ModelKind::Mirror {
                        for (changed, restored) in other.changed.iter_mut().zip(&restored) {
                            if !incremental || *restored {
                                *changed = true;
                            }
                        }
                    }
                }
                let session = &mut self.sessions[index];
                session.changed = vec![false; TRACKS as usize];
                session.state = SessionState::Synchronized;
                self.readiness[volume] = Readiness::NotReady;
                self.target_changed[volume] = vec![false; TRACKS as usize];
                true
            }
            Operation::Cancel { target } => {
                let volume = volume_of(target);
                let Some(index) = self.session_of(volume, ModelKind::Mirror) else {
                    return false;
                };
                if self.sessions[index].state == SessionState::Synchronized {
                    self.images[volume] = self.images[0].clone();
                    self.readiness[volume] = Readiness::Ready;
                }
                self.target_changed[volume] = vec![false; TRACKS as usize];
                self.sessions.remove(index);
                true
            }
            Operation::Rotate => {
                let Some(index) = self
                    .sessions
                    .iter()
                    .enumerate()
                    .filter(|(_, session)| {
                        session.kind == ModelKind::Mirror && session.state == SessionState::Split
                    })
                    .min_by_key(|(_, session)| session.split_sequence)
                    .map(|(index, _)| index)
                else {
                    return false;
                };
                self.reestablish(index);
                self.split(index);
                true
            }
            Operation::Write { .. } | Operation::Read { .. } | Operation::Step { .. } => {
                unreachable!("not a command")
            }
        }
    }

    fn reestablish(&mut self, index: usize) {
        let volume = self.sessions[index].target;
        for track in 0..TRACKS as usize {
            if self.target_changed[volume][track] {
                self.sessions[index].changed[track] = true;
            }
        }
        self.target_changed[volume] = vec![false; TRACKS as usize];
        self.sessions[index].state = SessionState::Synchronized;
        self.readiness[volume] = Readiness::NotReady;
    }

    fn split(&mut self, index: usize) {
        let volume = self.sessions[index].target;
        self.images[volume] = self.images[0].clone();
        self.split_counter += 1;
        let session = &mut self.sessions[index];
        session.changed = vec![false; TRACKS as usize];
        session.state = SessionState::Split;
        session.split_sequence = self.split_counter;
        self.readiness[volume] = Readiness::Ready;
        self.target_changed[volume] = vec![false; TRACKS as usize];
    }
}

fn name(volume: usize) -> &'static str {
    if volume == 0 {
        STANDARD
    } else {
        TARGETS[volume - 1]
    }
}

fn to_command(operation: &Operation) -> SessionCommand {
    let target = |index: usize| TARGETS[index].to_string();
    match *operation {
        Operation::CloneCreate {
            target: index,
            precopy,
            extent,
        } => SessionCommand::CloneCreate {
            source: STANDARD.to_string(),
            target: target(index),
            precopy,
            extents: extent
                .map(|(first, last)| vec![Extent { first, last }])
                .unwrap_or_default(),
        },
        Operation::ClonePrecopy { target: index } => SessionCommand::ClonePrecopy {
            target: target(index),
        },
        Operation::CloneActivate { target: index } => SessionCommand::CloneActivate {
            target: target(index),
        },
        Operation::CloneTerminate { target: index } => SessionCommand::CloneTerminate {
            target: target(index),
        },
        Operation::Establish { target: index } => SessionCommand::MirrorEstablish {
            standard: STANDARD.to_string(),
            bcv: target(index),
            mode: MirrorMode::Sync,
            strict: false,
            target_timeout_milliseconds: None,
        },
        Operation::Split {
            target: index,
            differential,
        } => SessionCommand::MirrorSplit {
            bcv: target(index),
            differential,
        },
        Operation::Reestablish { target: index } => {
            SessionCommand::MirrorReestablish { bcv: target(index) }
        }
        Operation::Restore {
            target: index,
            incremental,
        } => SessionCommand::MirrorRestore {
            bcv: target(index),
            incremental,
        },
        Operation::Cancel { target: index } => SessionCommand::MirrorCancel { bcv: target(index) },
        Operation::Rotate => SessionCommand::MirrorRotate {
            standard: STANDARD.to_string(),
        },
        Operation::Write { .. } | Operation::Read { .. } | Operation::Step { .. } => {
            unreachable!("not a command")
        }
    }
}

fn track_bytes(byte: u8) -> Vec<u8> {
    vec![byte; TRACK_BYTES as usize]
}

/// Compares everything the model predicts with the real sessions and store.
fn check(
    sessions: &Sessions<MemoryEngine>,
    model: &Model,
    tracks: &[u64],
    settled: bool,
) -> Result<(), TestCaseError> {
    let store = sessions.store();
    for volume in 0..4 {
        let handle = store.volume(name(volume)).unwrap();
        prop_assert_eq!(
            handle.readiness(),
            model.readiness[volume],
            "readiness of {}",
            name(volume)
        );
        if model.readiness[volume] != Readiness::NotReady {
            for &track in tracks {
                let read = sessions
                    .read(&handle, track * TRACK_BYTES, TRACK_BYTES)
                    .unwrap();
                let expected = model.images[volume][track as usize];
                prop_assert!(
                    read.iter().all(|byte| *byte == expected),
                    "{} track {} holds {:#04x}.., not {:#04x}",
                    name(volume),
                    track,
                    read[0],
                    expected
                );
            }
        }
        for &track in tracks {
            prop_assert_eq!(
                store.test_bit(&handle, Bits::TargetChanged, track).unwrap(),
                model.target_changed[volume][track as usize],
                "target-changed bit of {} track {}",
                name(volume),
                track
            );
        }
    }
    let standard = store.volume(STANDARD).unwrap();
    let real = sessions.list(None).unwrap();
    prop_assert_eq!(real.len(), model.sessions.len(), "session count");
    for session in &model.sessions {
        let kind = match session.kind {
            ModelKind::Clone => SessionKind::Clone,
            ModelKind::Mirror => SessionKind::Mirror,
        };
        let info = sessions.show(kind, name(session.target)).unwrap();
        // Unsettled, a copy may still be on its way to the resting state the model holds.
        let on_its_way = !settled
            && matches!(
                (info.state, session.state),
                (SessionState::Active, SessionState::Copied)
                    | (SessionState::Syncing, SessionState::Synchronized)
                    | (SessionState::Restoring, SessionState::Synchronized)
            );
        if !on_its_way {
            prop_assert_eq!(
                info.state,
                session.state,
                "state of {}",
                name(session.target)
            );
        }
        prop_assert!(info.percent <= 100.0);
        if session.kind == ModelKind::Mirror {
            for &track in tracks {
                prop_assert_eq!(
                    store
                        .test_bit(&standard, Bits::Session(info.slots[0]), track)
                        .unwrap(),
                    session.changed[track as usize],
                    "changed bit of {} track {}",
                    name(session.target),
                    track
                );
            }
        }
        // A created clone copies nothing until a precopy or its activation.
        if settled && session.state != SessionState::Created {
            prop_assert_eq!(info.tracks_remaining, 0, "{} settled", name(session.target));
        }
    }
    Ok(())
}

fn run_case(operations: Vec<Operation>, probe: Vec<u64>) -> Result<(), TestCaseError> {
    let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
    for volume in 0..4 {
        store
            .create(name(volume), TRACKS * TRACK_BYTES, TRACK_BYTES as u32)
            .unwrap();
    }
    let sessions = Sessions::open(store.clone(), 1 << 20, None).unwrap();
    let mut model = Model::new();
    for operation in &operations {
        match *operation {
            Operation::Write {
                volume,
                track,
                byte,
            } => {
                let handle = store.volume(name(volume)).unwrap();
                let accepted = model.write(volume, track, byte);
                let result = sessions.write(
                    &handle,
                    track * TRACK_BYTES,
                    TRACK_BYTES,
                    Some(&track_bytes(byte)),
                    Durability::Logged,
                );
                prop_assert_eq!(
                    result.is_ok(),
                    accepted,
                    "write {:?}: {:?}",
                    operation,
                    result
                );
                check(&sessions, &model, &[track], false)?;
            }
            Operation::Read { volume, track } => {
                check(&sessions, &model, &[track], false)?;
                let _ = volume;
            }
            Operation::Step { session } => {
                let ids = sessions.copying();
                if let Some(id) = ids.get(session % ids.len().max(1)) {
                    sessions.copy_step(*id).unwrap();
                }
                check(&sessions, &model, &probe, false)?;
            }
            _ => {
                sessions.settle().unwrap();
                let accepted = model.command(operation);
                let result = sessions.command(to_command(operation));
                prop_assert_eq!(
                    result.is_ok(),
                    accepted,
                    "{:?} gave {:?}",
                    operation,
                    result
                );
                // A rotation splits once its reestablish has synchronized, so it is let
                // finish; every other command leaves its copy running, for host IO and
                // copy steps to meet.
                let settled = matches!(operation, Operation::Rotate);
                if settled {
                    sessions.settle().unwrap();
                }
                // Reading a track pulls it, so checking every track here would copy the
                // whole clone at once and leave nothing for host writes to race with.
                check(&sessions, &model, &probe, settled)?;
            }
        }
    }
    sessions.settle().unwrap();
    let all: Vec<u64> = (0..TRACKS).collect();
    check(&sessions, &model, &all, true)
}

fn cases() -> u32 {
    std::env::var("TANDEM_MODEL_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn sessions_follow_the_seeds_rules_under_any_interleaving(
        operations in proptest::collection::vec(operation(), 1..40),
        probe in proptest::collection::vec(0..TRACKS, 3),
    ) {
        run_case(operations, probe)?;
    }
}
