//! The seeds' rules for copy sessions as a plain in-memory model, shared by the model-based
//! property tests: `sessions_model` (every target on the source's node) and
//! `sessions_model_remote` (every target on another node, reached through a faulty link).
//!
//! The configuration is seed 002's FIG. 9: one standard volume (`std`, volume 0) and three
//! others (`bcv1`..`bcv3`, volumes 1 to 3) that may become its clones or BCVs. The model
//! holds what a host reading each volume must see, every volume's readiness, every mirror's
//! changed bits and every BCV's target-changed bits, and says which commands the seeds
//! refuse. It knows nothing of nodes: both tests drive it the same way.

use proptest::prelude::*;
use protocol::messages::{Extent, Readiness};
use protocol::session::{MirrorMode, SessionCommand, SessionState};

pub const TRACK_BYTES: u64 = 4096;
pub const TARGETS: [&str; 3] = ["bcv1", "bcv2", "bcv3"];
pub const STANDARD: &str = "std";
/// The standard and the three targets.
pub const VOLUMES: usize = 4;

#[derive(Debug, Clone)]
pub enum Operation {
    Write {
        volume: usize,
        track: u64,
        byte: u8,
    },
    /// One host write over several tracks (`first..=last`), all filled with `byte`.
    WriteRange {
        volume: usize,
        first: u64,
        last: u64,
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
    /// Undoes a clone that was never activated.
    CloneCancel {
        target: usize,
    },
    Establish {
        target: usize,
        /// An async mirror ships host writes in the background instead of before their
        /// acknowledgement; the seeds' rules are the same at rest.
        asynchronous: bool,
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
    /// The copier asks the targets of suspended sessions whether they answer again (and
    /// delivers the releases owed to targets of ended sessions).
    Probe,
}

/// Which operations a test draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repertoire {
    /// The operations of the test with every target on the standard's node.
    Local,
    /// Those, and also clone cancels, async mirrors, writes over several tracks and probes
    /// of suspended sessions. A write over many tracks is likely to meet the one track a
    /// lost answer left in an odd state, which a single track rarely is.
    Remote,
}

pub fn operation(tracks: u64, repertoire: Repertoire) -> BoxedStrategy<Operation> {
    // Volume 0 is the standard; 1..=3 the targets.
    let volume = 0usize..VOLUMES;
    let target = 0usize..TARGETS.len();
    let common = prop_oneof![
        6 => (volume.clone(), 0..tracks, 1u8..=255).prop_map(|(volume, track, byte)| Operation::Write { volume, track, byte }),
        3 => (volume, 0..tracks).prop_map(|(volume, track)| Operation::Read { volume, track }),
        4 => (0usize..3).prop_map(|session| Operation::Step { session }),
        2 => (target.clone(), any::<bool>(), proptest::option::of((0..tracks, 0..tracks)))
            .prop_map(|(target, precopy, extent)| Operation::CloneCreate {
                target,
                precopy,
                extent: extent.map(|(a, b)| (a.min(b), a.max(b))),
            }),
        1 => target.clone().prop_map(|target| Operation::ClonePrecopy { target }),
        2 => target.clone().prop_map(|target| Operation::CloneActivate { target }),
        1 => target.clone().prop_map(|target| Operation::CloneTerminate { target }),
        2 => target.clone().prop_map(|target| Operation::Establish { target, asynchronous: false }),
        2 => (target.clone(), any::<bool>()).prop_map(|(target, differential)| Operation::Split { target, differential }),
        2 => target.clone().prop_map(|target| Operation::Reestablish { target }),
        1 => (target.clone(), any::<bool>()).prop_map(|(target, incremental)| Operation::Restore { target, incremental }),
        1 => target.clone().prop_map(|target| Operation::Cancel { target }),
        1 => Just(Operation::Rotate),
    ];
    match repertoire {
        Repertoire::Local => common.boxed(),
        Repertoire::Remote => prop_oneof![
            28 => common,
            1 => target.clone().prop_map(|target| Operation::CloneCancel { target }),
            // More host writes to the standard: every session reads from it, so that is
            // where a write meets a copy in every state.
            3 => (0..tracks, 1u8..=255).prop_map(|(track, byte)| Operation::Write { volume: 0, track, byte }),
            2 => (0usize..VOLUMES, 0..tracks, 0..tracks, 1u8..=255).prop_map(|(volume, a, b, byte)| {
                Operation::WriteRange { volume, first: a.min(b), last: a.max(b), byte }
            }),
            2 => (0..tracks, 0..tracks, 1u8..=255).prop_map(|(a, b, byte)| {
                Operation::WriteRange { volume: 0, first: a.min(b), last: a.max(b), byte }
            }),
            1 => target.prop_map(|target| Operation::Establish { target, asynchronous: true }),
            2 => Just(Operation::Probe),
        ]
        .boxed(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelKind {
    Clone,
    Mirror,
}

#[derive(Debug, Clone)]
pub struct ModelSession {
    pub kind: ModelKind,
    pub target: usize,
    pub state: SessionState,
    pub extent: (u64, u64),
    /// Mirror: seed 002's PB column, "changed since the last split".
    pub changed: Vec<bool>,
    pub split_sequence: u64,
}

/// The seeds' rules over plain vectors.
pub struct Model {
    pub tracks: u64,
    /// What a host reading each volume must see, track by track (one fill byte a track);
    /// `None` where any content is right (a cancelled clone left the destination's
    /// tracks half copied).
    pub images: [Vec<Option<u8>>; VOLUMES],
    pub readiness: [Readiness; VOLUMES],
    /// Whether host writes to the volume mark its target-changed bits: a split BCV's do.
    pub tracking: [bool; VOLUMES],
    /// BCV target-changed bits (seed 002's M4b), per volume.
    pub target_changed: [Vec<bool>; VOLUMES],
    pub sessions: Vec<ModelSession>,
    pub split_counter: u64,
}

impl Model {
    pub fn new(tracks: u64) -> Model {
        Model {
            tracks,
            images: std::array::from_fn(|_| vec![Some(0); tracks as usize]),
            readiness: [Readiness::Ready; VOLUMES],
            tracking: [false; VOLUMES],
            target_changed: std::array::from_fn(|_| vec![false; tracks as usize]),
            sessions: Vec::new(),
            split_counter: 0,
        }
    }

    pub fn session_of(&self, target: usize, kind: ModelKind) -> Option<usize> {
        self.sessions
            .iter()
            .position(|session| session.target == target && session.kind == kind)
    }

    pub fn any_session_of(&self, target: usize) -> Option<usize> {
        self.sessions
            .iter()
            .position(|session| session.target == target)
    }

    /// A host write: refused on a volume that is not ready, otherwise it lands and marks
    /// every mirror of the standard changed (FIG. 10, event 230) or the split BCV's
    /// target-changed bit (event 231).
    pub fn write(&mut self, volume: usize, track: u64, byte: u8) -> bool {
        if self.readiness[volume] != Readiness::Ready {
            return false;
        }
        self.images[volume][track as usize] = Some(byte);
        if volume == 0 {
            for session in &mut self.sessions {
                if session.kind == ModelKind::Mirror {
                    session.changed[track as usize] = true;
                }
            }
        } else if self.tracking[volume] {
            self.target_changed[volume][track as usize] = true;
        }
        true
    }

    /// A BCV stops tracking its hosts' writes, which clears what it tracked.
    fn stop_tracking(&mut self, volume: usize) {
        self.tracking[volume] = false;
        self.target_changed[volume] = vec![false; self.tracks as usize];
    }

    /// Applies a command; false when the seeds refuse it (nothing changes then).
    pub fn command(&mut self, operation: &Operation) -> bool {
        let tracks = self.tracks;
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
                    extent: extent.unwrap_or((0, tracks - 1)),
                    changed: vec![false; tracks as usize],
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
            Operation::CloneCancel { target } => {
                let volume = volume_of(target);
                let Some(index) = self.session_of(volume, ModelKind::Clone) else {
                    return false;
                };
                if !matches!(
                    self.sessions[index].state,
                    SessionState::Created | SessionState::Precopying
                ) {
                    return false;
                }
                // The destination was never given to its hosts and stays not ready; a
                // precopy may have brought any of its tracks in the extents.
                let (first, last) = self.sessions[index].extent;
                for track in first..=last {
                    self.images[volume][track as usize] = None;
                }
                self.sessions.remove(index);
                true
            }
            Operation::Establish { target, .. } => {
                let volume = volume_of(target);
                match self.any_session_of(volume) {
                    Some(index) => {
                        let session = &mut self.sessions[index];
                        if session.kind != ModelKind::Mirror || session.state != SessionState::Split
                        {
                            return false;
                        }
                        session.state = SessionState::Synchronized;
                        session.changed = vec![true; tracks as usize];
                    }
                    None => self.sessions.push(ModelSession {
                        kind: ModelKind::Mirror,
                        target: volume,
                        state: SessionState::Synchronized,
                        extent: (0, tracks - 1),
                        changed: vec![true; tracks as usize],
                        split_sequence: 0,
                    }),
                }
                self.readiness[volume] = Readiness::NotReady;
                self.stop_tracking(volume);
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
                incremental,
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
                let restored: Vec<bool> = (0..tracks as usize)
                    .map(|track| {
                        self.images[0][track] != self.images[volume][track]
                            || self.sessions[index].changed[track]
                            || self.target_changed[volume][track]
                    })
                    .collect();
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
                session.changed = vec![false; tracks as usize];
                session.state = SessionState::Synchronized;
                self.readiness[volume] = Readiness::NotReady;
                self.stop_tracking(volume);
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
                self.stop_tracking(volume);
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
            Operation::Write { .. }
            | Operation::WriteRange { .. }
            | Operation::Read { .. }
            | Operation::Step { .. }
            | Operation::Probe => {
                unreachable!("not a command")
            }
        }
    }

    fn reestablish(&mut self, index: usize) {
        let volume = self.sessions[index].target;
        for track in 0..self.tracks as usize {
            if self.target_changed[volume][track] {
                self.sessions[index].changed[track] = true;
            }
        }
        self.stop_tracking(volume);
        self.sessions[index].state = SessionState::Synchronized;
        self.readiness[volume] = Readiness::NotReady;
    }

    fn split(&mut self, index: usize) {
        let volume = self.sessions[index].target;
        self.images[volume] = self.images[0].clone();
        self.split_counter += 1;
        let session = &mut self.sessions[index];
        session.changed = vec![false; self.tracks as usize];
        session.state = SessionState::Split;
        session.split_sequence = self.split_counter;
        self.readiness[volume] = Readiness::Ready;
        self.tracking[volume] = true;
        self.target_changed[volume] = vec![false; self.tracks as usize];
    }
}

pub fn name(volume: usize) -> &'static str {
    if volume == 0 {
        STANDARD
    } else {
        TARGETS[volume - 1]
    }
}

/// The volume a command names as its target (clone destination or BCV), if it names one.
pub fn target_volume(operation: &Operation) -> Option<usize> {
    match *operation {
        Operation::CloneCreate { target, .. }
        | Operation::ClonePrecopy { target }
        | Operation::CloneActivate { target }
        | Operation::CloneTerminate { target }
        | Operation::CloneCancel { target }
        | Operation::Establish { target, .. }
        | Operation::Split { target, .. }
        | Operation::Reestablish { target }
        | Operation::Restore { target, .. }
        | Operation::Cancel { target } => Some(target + 1),
        Operation::Rotate
        | Operation::Write { .. }
        | Operation::WriteRange { .. }
        | Operation::Read { .. }
        | Operation::Step { .. }
        | Operation::Probe => None,
    }
}

pub fn to_command(operation: &Operation) -> SessionCommand {
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
        Operation::CloneCancel { target: index } => SessionCommand::CloneCancel {
            target: target(index),
        },
        Operation::Establish {
            target: index,
            asynchronous,
        } => SessionCommand::MirrorEstablish {
            standard: STANDARD.to_string(),
            bcv: target(index),
            mode: if asynchronous {
                MirrorMode::Async
            } else {
                MirrorMode::Sync
            },
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
        Operation::Write { .. }
        | Operation::WriteRange { .. }
        | Operation::Read { .. }
        | Operation::Step { .. }
        | Operation::Probe => {
            unreachable!("not a command")
        }
    }
}

pub fn track_bytes(byte: u8) -> Vec<u8> {
    vec![byte; TRACK_BYTES as usize]
}

/// Whether a track holds what the model expects (anything, where it expects nothing in
/// particular).
pub fn holds(expected: Option<u8>, read: &[u8]) -> bool {
    expected.is_none_or(|expected| read.iter().all(|byte| *byte == expected))
}

/// Compares one volume of a node with the model: its readiness, what a host reads of
/// `tracks` when it is ready, and their target-changed bits.
pub fn check_volume(
    sessions: &node::copy::Sessions<node::engine::memory::MemoryEngine>,
    model: &Model,
    volume: usize,
    tracks: &[u64],
) -> Result<(), TestCaseError> {
    let store = sessions.store();
    let handle = store.volume(name(volume)).unwrap();
    prop_assert_eq!(
        handle.readiness(),
        model.readiness[volume],
        "readiness of {}",
        name(volume)
    );
    if model.readiness[volume] != Readiness::NotReady {
        for &track in tracks {
            let read = sessions.read(&handle, track * TRACK_BYTES, TRACK_BYTES);
            prop_assert!(read.is_ok(), "{} track {}: {:?}", name(volume), track, read);
            let read = read.unwrap();
            let expected = model.images[volume][track as usize];
            prop_assert!(
                holds(expected, &read),
                "{} track {} holds {:#04x}.., not {:02x?}",
                name(volume),
                track,
                read[0],
                expected
            );
        }
    }
    // The counts `list` and `show` read are kept as bits change; they must equal a scan.
    let slots = store.session_slots(&handle);
    let counted = [node::store::Bits::TargetChanged, node::store::Bits::Invalid]
        .into_iter()
        .chain(
            (0..16u8)
                .filter(|slot| slots & (1 << slot) != 0)
                .flat_map(|slot| {
                    [
                        node::store::Bits::Session(slot),
                        node::store::Bits::Pending(slot),
                    ]
                }),
        );
    for bits in counted {
        prop_assert_eq!(
            store.count_set(&handle, bits).unwrap(),
            store.count_set_by_scan(&handle, bits).unwrap(),
            "kept count of {:?} of {}",
            bits,
            name(volume)
        );
    }
    for &track in tracks {
        prop_assert_eq!(
            store
                .test_bit(&handle, node::store::Bits::TargetChanged, track)
                .unwrap(),
            model.target_changed[volume][track as usize],
            "target-changed bit of {} track {}",
            name(volume),
            track
        );
    }
    Ok(())
}
