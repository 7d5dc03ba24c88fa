//! The session core: every rule of seeds 000–002 about a session's bits, slots,
//! readiness and state, as pure functions in the manner of openraft's `Engine` and
//! quinn-proto. An event goes in — a command with the facts the driver read for it, a
//! track that reached the target, a target that stopped or started answering — and the
//! effects to carry out come out, in order, with the session's next record. The core does
//! no IO and reads no clock: facts and time are passed in.
//!
//! The driver (`commands.rs`, `mod.rs`) reads the facts a command needs under the gates
//! of the session's volumes, asks the core, and carries out the effects: a change of the
//! source goes into the command's one engine batch, a change of the target goes through
//! the session's [`super::target::Target`] (into the same batch when the target is on
//! this node, to the target's node at once when it is not), and the record is committed
//! with the batch. Nothing here knows whether the target is local or remote.
//!
//! Bits of a session whose source has slot `s` (see `mod.rs`): a clone's `Session(s)` is
//! its to-copy list (seed 001's PB), a precopy's `Session(p)` its precopied list, the
//! destination's `Invalid` its IND list; a mirror's `Session(s)` is seed 002's changed
//! column, `Pending(s)` its moving-mirror bits, the BCV's `TargetChanged` its M4b bits,
//! the standard's `Invalid` what a restore has yet to bring back.

use super::core::Progress;
use super::SessionRecord;
use crate::bitmap::SESSION_SLOTS_MAX;
use crate::store::Bits;
use protocol::messages::{Extent, Readiness};
use protocol::session::{
    next_state, MirrorMode, RemoteVolume, SessionCommand, SessionId, SessionKind, SessionState,
    TargetOperation, Transition, OPERATION_EXTENTS_MAX, TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
};
use std::collections::BTreeSet;

/// One thing a command does, in the order the driver carries them out. Changes of the
/// source land in the command's batch; target operations go to the session's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Copy to the target, synced, every track still pending, before anything else: a
    /// split gives the BCV the standard's image of this instant.
    Drain,
    /// Take this (free) slot of the source, its bits cleared.
    TakeSlot(u8),
    /// Give back a slot of the source, clearing its bits and write marks.
    FreeSlot(u8),
    /// Set or clear the source's `bits` over `extents`.
    SourceBits {
        bits: Bits,
        extents: Vec<Extent>,
        set: bool,
    },
    /// Change which bits of `slot` host writes to the source mark: `Some` sets or clears
    /// the changed or the pending mark, `None` leaves it.
    SourceMarks {
        slot: u8,
        changed: Option<bool>,
        pending: Option<bool>,
    },
    /// The target's data is replaced by the session's: it stops being a snapshot.
    TargetTakeOver,
    /// An operation of the target (mark, readiness, tracking, downstream, release). A
    /// `Release` ends the session there; on another node it is delivered once the
    /// command is committed and its gates are released, or later by the copier.
    Target(TargetOperation),
    /// An operation of the target once the command is committed, that may fail without
    /// undoing it: forgetting what the command took over from the target, which a
    /// retried command must still find when the command's answer was lost.
    TargetAfterCommit(TargetOperation),
}

impl Facts {
    /// The facts of a source of `source_whole` tracks with every slot free, nothing
    /// marked, ready, whose target answers; the driver fills in what it read.
    pub fn new(source_whole: Extent) -> Facts {
        Facts {
            source_whole,
            free_slots: u16::MAX,
            attached_slots: 0,
            source_ready: true,
            changed: Vec::new(),
            pending: Vec::new(),
            target_changed: Vec::new(),
            target_invalid: 0,
            target_answers: true,
            others: Vec::new(),
            split_sequence_max: 0,
        }
    }
}

/// What the driver read for a command, under the gates of the session's volumes.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// The source's tracks.
    pub source_whole: Extent,
    /// The source's slots no session holds (bit `n` is slot `n`).
    pub free_slots: u16,
    /// The source's slots whose host writes mark pending (attached mirrors).
    pub attached_slots: u16,
    /// Whether the source is ready to its hosts.
    pub source_ready: bool,
    /// The source's tracks changed for this session (`Session(slot)`), in order.
    pub changed: Vec<u64>,
    /// The source's tracks still pending for this session (`Pending(slot)`), in order.
    pub pending: Vec<u64>,
    /// The target's tracks its hosts changed since the split, in order.
    pub target_changed: Vec<u64>,
    /// How many tracks of the target are invalid.
    pub target_invalid: u64,
    /// Whether the target answers (always, when it is on this node).
    pub target_answers: bool,
    /// The other sessions whose source is this session's source.
    pub others: Vec<SessionRecord>,
    /// The highest split sequence of this node's sessions.
    pub split_sequence_max: u64,
}

/// Why a command is refused; nothing has changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The command does not apply to the session as it is; the text says why and what to
    /// do instead.
    Reason(String),
    /// The source has no free slot (a volume has [`SESSION_SLOTS_MAX`]).
    SlotsExhausted,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::Reason(reason)
    }
}

/// A command's outcome: its effects, in order, and the session's record after them
/// (`None` when the command ends the session).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub effects: Vec<Effect>,
    pub record: Option<SessionRecord>,
}

/// The transition a command on an existing session asks of the state table.
pub fn transition_of(command: &SessionCommand) -> Option<Transition> {
    Some(match command {
        SessionCommand::ClonePrecopy { .. } => Transition::Precopy,
        SessionCommand::CloneActivate { .. } => Transition::Activate,
        SessionCommand::CloneTerminate { .. } => Transition::Terminate,
        SessionCommand::CloneCancel { .. } => Transition::Cancel,
        SessionCommand::MirrorEstablish { .. } => Transition::Establish,
        SessionCommand::MirrorSplit { .. } => Transition::Split,
        SessionCommand::MirrorReestablish { .. } => Transition::Reestablish,
        SessionCommand::MirrorRestore { .. } => Transition::Restore,
        SessionCommand::MirrorCancel { .. } => Transition::Cancel,
        SessionCommand::CloneCreate { .. }
        | SessionCommand::MirrorRotate { .. }
        | SessionCommand::SetRate { .. } => return None,
    })
}

/// The facts a command on an existing session needs read, so that the driver scans no
/// bitmap and asks the target nothing the command does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    pub changed: bool,
    pub pending: bool,
    pub target_changed: bool,
    pub target_invalid: bool,
    pub target_answers: bool,
}

pub fn needs(command: &SessionCommand) -> Needs {
    match command {
        SessionCommand::CloneActivate { .. } => Needs {
            changed: true,
            ..Needs::default()
        },
        SessionCommand::MirrorReestablish { .. } => Needs {
            changed: true,
            pending: true,
            target_changed: true,
            ..Needs::default()
        },
        SessionCommand::MirrorSplit { differential, .. } => Needs {
            changed: *differential,
            ..Needs::default()
        },
        SessionCommand::MirrorRestore { incremental, .. } => Needs {
            changed: *incremental,
            target_changed: *incremental,
            target_invalid: true,
            ..Needs::default()
        },
        SessionCommand::MirrorCancel { .. } => Needs {
            target_answers: true,
            ..Needs::default()
        },
        _ => Needs::default(),
    }
}

fn lowest_free(free_slots: u16) -> Result<u8, Refusal> {
    (0..SESSION_SLOTS_MAX as u8)
        .find(|slot| free_slots & (1 << slot) != 0)
        .ok_or(Refusal::SlotsExhausted)
}

/// The runs of consecutive tracks in `tracks` (sorted, without repeats), as extents: a
/// command marks a run with one bitmap operand per chunk instead of one per track.
pub fn runs(tracks: &[u64]) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for track in tracks {
        match extents.last_mut() {
            Some(run) if run.last + 1 == *track => run.last = *track,
            _ => extents.push(Extent {
                first: *track,
                last: *track,
            }),
        }
    }
    extents
}

fn tracks_in(extents: &[Extent]) -> u64 {
    extents.iter().map(Extent::track_count).sum()
}

/// A new clone (seed 001, FIG. 4): its slots, the destination's IND list and the
/// source's to-copy list over `extents` (checked and normalized by the driver).
#[allow(clippy::too_many_arguments)]
pub fn create_clone(
    id: SessionId,
    source: &str,
    target: &str,
    extents: Vec<Extent>,
    precopy: bool,
    remote: Option<RemoteVolume>,
    facts: &Facts,
    now_unix_seconds: u64,
) -> Result<Decision, Refusal> {
    let slot = lowest_free(facts.free_slots)?;
    let precopy_slot = if precopy {
        Some(lowest_free(facts.free_slots & !(1 << slot))?)
    } else {
        None
    };
    // Slots first; the destination's lists before the source's: a copy must never find
    // a source bit whose destination track is not marked missing.
    let mut effects = vec![Effect::TakeSlot(slot)];
    effects.extend(precopy_slot.map(Effect::TakeSlot));
    effects.extend([
        Effect::Target(TargetOperation::MarkInvalid {
            session: id,
            extents: extents.clone(),
        }),
        Effect::Target(TargetOperation::SetReadiness {
            session: id,
            readiness: Readiness::NotReady,
        }),
        Effect::TargetTakeOver,
        Effect::SourceBits {
            bits: Bits::Session(slot),
            extents: extents.clone(),
            set: true,
        },
    ]);
    let record = SessionRecord {
        id,
        kind: SessionKind::Clone,
        source: source.to_string(),
        target: target.to_string(),
        state: if precopy {
            SessionState::Precopying
        } else {
            SessionState::Created
        },
        mode: MirrorMode::default(),
        slot,
        precopy_slot,
        progress: Progress::start(tracks_in(&extents)),
        extents,
        created_unix_seconds: now_unix_seconds,
        split_sequence: 0,
        split_when_synchronized: false,
        tracks_copied_last: 0,
        rate_limit_mebibytes_per_second: None,
        error: None,
        remote,
        last_error: None,
        strict: false,
        target_timeout_milliseconds: TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
        resume_state: None,
    };
    Ok(Decision {
        effects,
        record: Some(record),
    })
}

/// A new mirror pair: it starts as if split with everything changed, so establishing it
/// is the same path as re-establishing a known pair (seed 002, FIG. 4).
#[allow(clippy::too_many_arguments)]
pub fn establish_pair(
    id: SessionId,
    command: &SessionCommand,
    standard: &str,
    bcv: &str,
    mode: MirrorMode,
    strict: bool,
    target_timeout_milliseconds: u64,
    remote: Option<RemoteVolume>,
    facts: &Facts,
    now_unix_seconds: u64,
) -> Result<Decision, Refusal> {
    let slot = lowest_free(facts.free_slots)?;
    let record = SessionRecord {
        id,
        kind: SessionKind::Mirror,
        source: standard.to_string(),
        target: bcv.to_string(),
        state: SessionState::Split,
        mode,
        slot,
        precopy_slot: None,
        extents: vec![facts.source_whole],
        created_unix_seconds: now_unix_seconds,
        split_sequence: 0,
        split_when_synchronized: false,
        progress: Progress::default(),
        tracks_copied_last: 0,
        rate_limit_mebibytes_per_second: None,
        error: None,
        remote,
        last_error: None,
        strict,
        target_timeout_milliseconds,
        resume_state: None,
    };
    let mut decision = decide(command, record, facts)?;
    decision
        .effects
        .splice(0..0, [Effect::TakeSlot(slot), Effect::TargetTakeOver]);
    Ok(decision)
}

/// A mirror attaches its BCV: host writes to the standard mark the session changed and
/// pending, the BCV is not ready to its own hosts, and its own writes are not tracked.
fn attach(effects: &mut Vec<Effect>, record: &SessionRecord) {
    effects.push(Effect::SourceMarks {
        slot: record.slot,
        changed: Some(true),
        pending: Some(true),
    });
    effects.extend(detach(record).map(Effect::Target));
    // The tracks the BCV's hosts changed are the source's to copy now (a re-establish
    // and a restore read them); a new pair does not need those of an earlier one.
    effects.push(Effect::TargetAfterCommit(TargetOperation::ForgetChanges {
        session: record.id,
    }));
}

/// The target operations that take a BCV from its hosts: not ready, its writes no longer
/// tracked. A re-establish or incremental restore whose BCV is on another node carries
/// them out before it reads the tracks the BCV's hosts changed (this node's gates do not
/// hold those hosts off), so that no host write lands after the reading; they come again
/// in the command's effects, where repeating them changes nothing.
pub fn detach(record: &SessionRecord) -> [TargetOperation; 2] {
    [
        TargetOperation::SetReadiness {
            session: record.id,
            readiness: Readiness::NotReady,
        },
        TargetOperation::TrackChanges {
            session: record.id,
            tracking: false,
        },
    ]
}

/// A command on an existing session: checks it against the state table and the facts,
/// and says what it does. No refusal depends on `facts.target_changed`: the driver asks
/// once without them before it takes a remote BCV from its hosts to read them.
pub fn decide(
    command: &SessionCommand,
    mut record: SessionRecord,
    facts: &Facts,
) -> Result<Decision, Refusal> {
    let transition = transition_of(command).expect("a command on an existing session");
    // A clone suspended before its activation can still be undone: it is judged on the
    // state it was suspended in. Its release must reach the destination's node (the
    // command fails while that node does not answer, and can be retried); a release whose
    // answer was lost finds nothing left to release there, so the retry ends the clone
    // even though the copier, meeting a destination that no longer holds it, suspended it.
    let judged = match (record.kind, transition, record.state) {
        (SessionKind::Clone, Transition::Cancel, SessionState::Suspended) => record.acting_state(),
        _ => record.state,
    };
    let next = next_state(record.kind, judged, transition)?;
    let whole = facts.source_whole;
    let id = record.id;
    let mut effects = Vec::new();
    match command {
        SessionCommand::ClonePrecopy { .. } => {
            if record.precopy_slot.is_none() {
                let slot = lowest_free(facts.free_slots)?;
                effects.push(Effect::TakeSlot(slot));
                record.precopy_slot = Some(slot);
            }
            // The clone's total stays: a precopy moves the tracks it counted.
        }
        SessionCommand::CloneActivate { .. } => {
            if record.precopy_slot.is_some() {
                // A precopy's store whose answer never came (lost, or this node crashed
                // before it) may have cleared the destination's invalid bit of a track
                // still on the clone's list, and a host write to that track since found
                // it not precopied and did not re-queue it. The tracks still owed are
                // marked missing again: the copy after activation stores only missing
                // tracks, and would otherwise leave the stale image.
                for extents in runs(&facts.changed).chunks(OPERATION_EXTENTS_MAX) {
                    effects.push(Effect::Target(TargetOperation::MarkInvalid {
                        session: id,
                        extents: extents.to_vec(),
                    }));
                }
            }
            // Seed 001 FIG. 8: a precopied track needs no further copy.
            if let Some(slot) = record.precopy_slot {
                effects.push(Effect::SourceBits {
                    bits: Bits::Session(slot),
                    extents: vec![whole],
                    set: false,
                });
            }
            effects.push(Effect::Target(TargetOperation::SetReadiness {
                session: id,
                readiness: Readiness::Ready,
            }));
            record.tracks_copied_last = 0;
        }
        SessionCommand::CloneTerminate { .. } | SessionCommand::CloneCancel { .. } => {
            // A cancel ends a clone never activated: its destination never went to
            // hosts. Its invalid bits stood for tracks this clone owed it; owed by nobody
            // now, they are cleared, so no later session takes them for missing tracks.
            let cancel = matches!(command, SessionCommand::CloneCancel { .. });
            effects.push(Effect::Target(TargetOperation::Release {
                session: id,
                clear_invalid: if cancel {
                    record.extents.clone()
                } else {
                    Vec::new()
                },
                readiness: None,
            }));
            effects.push(Effect::FreeSlot(record.slot));
            effects.extend(record.precopy_slot.map(Effect::FreeSlot));
            return Ok(Decision {
                effects,
                record: None,
            });
        }
        SessionCommand::MirrorEstablish { .. } => {
            // Seed 002 step 114: every track changed; step 110: every track to copy.
            for bits in [Bits::Session(record.slot), Bits::Pending(record.slot)] {
                effects.push(Effect::SourceBits {
                    bits,
                    extents: vec![whole],
                    set: true,
                });
            }
            attach(&mut effects, &record);
            record.progress = Progress::start(whole.track_count());
            record.tracks_copied_last = 0;
            record.split_when_synchronized = false;
        }
        SessionCommand::MirrorReestablish { .. } => {
            // Seed 002 FIG. 6: copy what changed on either side. A track the BCV's hosts
            // changed also counts as changed since the split, so a cascade below the BCV
            // gets it at the next differential split.
            let bcv_changed: Vec<u64> = facts
                .target_changed
                .iter()
                .copied()
                .filter(|track| *track <= whole.last)
                .collect();
            let changed: BTreeSet<u64> =
                facts.changed.iter().chain(&bcv_changed).copied().collect();
            let pending: BTreeSet<u64> = facts.pending.iter().chain(&changed).copied().collect();
            effects.push(Effect::SourceBits {
                bits: Bits::Session(record.slot),
                extents: runs(&bcv_changed),
                set: true,
            });
            effects.push(Effect::SourceBits {
                bits: Bits::Pending(record.slot),
                extents: runs(&changed.into_iter().collect::<Vec<_>>()),
                set: true,
            });
            attach(&mut effects, &record);
            // Host IO is held off: these are exactly the tracks this copy moves.
            record.progress = Progress::start(pending.len() as u64);
            record.tracks_copied_last = 0;
            record.split_when_synchronized = false;
        }
        SessionCommand::MirrorSplit { differential, .. } => {
            if let Some(restoring) = facts
                .others
                .iter()
                .find(|other| other.state == SessionState::Restoring)
            {
                return Err(Refusal::Reason(format!(
                    "{} is restoring the standard; split once it is done",
                    restoring.describe()
                )));
            }
            // Seed 002 FIG. 5: detach the BCV with the image of this instant, mark its
            // own downstream sessions (all tracks, or those changed since the last split),
            // clear the changed bits and give the BCV to its hosts.
            effects.extend([
                Effect::Drain,
                Effect::Target(TargetOperation::MarkDownstream {
                    session: id,
                    tracks: differential.then(|| facts.changed.clone()),
                }),
                Effect::SourceBits {
                    bits: Bits::Session(record.slot),
                    extents: vec![whole],
                    set: false,
                },
                Effect::SourceMarks {
                    slot: record.slot,
                    changed: None,
                    pending: Some(false),
                },
                Effect::Target(TargetOperation::TrackChanges {
                    session: id,
                    tracking: true,
                }),
                Effect::Target(TargetOperation::SetReadiness {
                    session: id,
                    readiness: Readiness::Ready,
                }),
            ]);
            record.split_sequence = facts.split_sequence_max + 1;
            record.split_when_synchronized = false;
        }
        SessionCommand::MirrorRestore { incremental, .. } => {
            let total = restore(&mut effects, &record, facts, *incremental)?;
            record.progress = Progress::start(total);
            record.tracks_copied_last = 0;
        }
        SessionCommand::MirrorCancel { .. } => {
            // A synchronized BCV holds the standard's whole image: it goes to its hosts.
            // Otherwise it keeps the readiness it has; so does one whose node does not
            // answer now (it lacks the writes since the loss), which releases it when it
            // answers again.
            let synchronized = record.state == SessionState::Synchronized;
            effects.push(Effect::Target(TargetOperation::Release {
                session: id,
                clear_invalid: Vec::new(),
                readiness: (synchronized && facts.target_answers).then_some(Readiness::Ready),
            }));
            effects.push(Effect::FreeSlot(record.slot));
            return Ok(Decision {
                effects,
                record: None,
            });
        }
        SessionCommand::CloneCreate { .. }
        | SessionCommand::MirrorRotate { .. }
        | SessionCommand::SetRate { .. } => unreachable!("transition_of refused it"),
    }
    record.state = next.expect("only terminate and cancel end a session");
    record.error = None;
    Ok(Decision {
        effects,
        record: Some(record),
    })
}

/// Seed 002 FIGS. 7 and 8: the standard's tracks to restore become invalid (a host access
/// pulls them from the BCV first), this session's changed bits clear, and every other
/// mirror of the standard gets the restored tracks marked changed. Returns the number of
/// tracks to restore.
fn restore(
    effects: &mut Vec<Effect>,
    record: &SessionRecord,
    facts: &Facts,
    incremental: bool,
) -> Result<u64, Refusal> {
    if facts.target_invalid > 0 {
        return Err(Refusal::Reason(format!(
            "the BCV has {} invalid tracks (it is still being filled by a clone); restore from a complete BCV",
            facts.target_invalid
        )));
    }
    if !facts.source_ready {
        return Err(Refusal::Reason(
            "the standard volume is not ready; make it ready first".to_string(),
        ));
    }
    if let Some(clone) = facts
        .others
        .iter()
        .find(|other| other.kind == SessionKind::Clone && other.state != SessionState::Copied)
    {
        return Err(Refusal::Reason(format!(
            "the standard is the source of {}, which still needs its point-in-time data; let it finish first",
            clone.describe()
        )));
    }
    if let Some(restoring) = facts
        .others
        .iter()
        .find(|other| other.state == SessionState::Restoring)
    {
        return Err(Refusal::Reason(format!(
            "the standard is already being restored by {}",
            restoring.describe()
        )));
    }
    let whole = facts.source_whole;
    let extents = if incremental {
        // Seed 002 FIG. 8, steps 202-203: changed on the BCV or on the standard.
        let tracks: BTreeSet<u64> = facts
            .target_changed
            .iter()
            .copied()
            .filter(|track| *track <= whole.last)
            .chain(facts.changed.iter().copied())
            .collect();
        runs(&tracks.into_iter().collect::<Vec<_>>())
    } else {
        vec![whole]
    };
    // No track of a ready standard is invalid, so these are the tracks to restore.
    let total = tracks_in(&extents);
    effects.push(Effect::SourceBits {
        bits: Bits::Invalid,
        extents: extents.clone(),
        set: true,
    });
    for other in facts
        .others
        .iter()
        .filter(|other| other.kind == SessionKind::Mirror)
    {
        effects.push(Effect::SourceBits {
            bits: Bits::Session(other.slot),
            extents: extents.clone(),
            set: true,
        });
        if facts.attached_slots & (1 << other.slot) != 0 {
            effects.push(Effect::SourceBits {
                bits: Bits::Pending(other.slot),
                extents: extents.clone(),
                set: true,
            });
        }
    }
    // The changed bit of this session stays clear after the restore (seed: the restored
    // session is "unchanged"), but host writes during the restore set it.
    effects.push(Effect::SourceBits {
        bits: Bits::Session(record.slot),
        extents: vec![whole],
        set: false,
    });
    // The BCV goes back to being the standard's mirror.
    attach(effects, record);
    Ok(total)
}

/// Whether a host access to a volume of the session (its source when `on_source`) must
/// first pull the volume's invalid tracks: a clone's destination once it is ready (copy
/// on first access, seed 001), a standard being restored (seed 002 FIG. 7).
pub fn access_pulls(record: &SessionRecord, on_source: bool) -> bool {
    match record.kind {
        SessionKind::Clone => {
            !on_source && super::core::clone_target_access_pulls(record.state, true)
        }
        SessionKind::Mirror => on_source && record.state == SessionState::Restoring,
    }
}

/// Whether a host write to the session's source reaches the target before the host
/// hears of it: a synchronized sync mirror's.
pub fn host_write_ships(record: &SessionRecord) -> bool {
    record.kind == SessionKind::Mirror
        && record.state == SessionState::Synchronized
        && record.mode == MirrorMode::Sync
}

/// Which way a session's copy moves tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the source to the target.
    ToTarget,
    /// From the target back into the source (a restore).
    FromTarget,
}

/// The session's remaining work: which of the source's bitmaps lists it and which way it
/// moves, or `None` when the state has none. The one place this rule is written: the
/// copier scans it, `show` counts it, a step clears it.
pub fn work(record: &SessionRecord) -> Option<(Bits, Direction)> {
    use SessionState as S;
    match (record.kind, record.acting_state()) {
        (SessionKind::Clone, S::Created | S::Precopying | S::Active) => {
            Some((Bits::Session(record.slot), Direction::ToTarget))
        }
        (SessionKind::Mirror, S::Restoring) => Some((Bits::Invalid, Direction::FromTarget)),
        (SessionKind::Mirror, S::Syncing | S::Synchronized) => {
            Some((Bits::Pending(record.slot), Direction::ToTarget))
        }
        _ => None,
    }
}

/// Whether the copier moves tracks in this state (a suspended session's copy waits).
pub fn copies(record: &SessionRecord) -> bool {
    record.state != SessionState::Suspended
        && record.state != SessionState::Created
        && work(record).is_some()
}

/// A track a copy step is about to move to the target, and what must hold for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    /// The target stores the track only while it is still invalid there: an active
    /// clone's destination may have been written by its hosts since (they pulled the
    /// track first), and keeps what it has.
    pub only_if_invalid: bool,
    /// The step holds the source's track locks until the target answered: a clone's
    /// source must still hold the point-in-time image when a host write comes (it waits
    /// to copy first), and a synchronized sync mirror's host writes ship themselves.
    /// Otherwise the copier is the target's only writer and a pending bit is cleared
    /// only if the track still holds what was sent.
    pub holds_track_locks: bool,
}

pub fn send(record: &SessionRecord) -> Send {
    let clone = record.kind == SessionKind::Clone;
    Send {
        only_if_invalid: clone && record.state != SessionState::Precopying,
        holds_track_locks: clone
            || (record.state == SessionState::Synchronized && record.mode == MirrorMode::Sync),
    }
}

/// Whether a track is skipped by a copy to the target: a mirror's standard track that a
/// restore has not brought back yet is not the standard's image; it goes out once the
/// restore has it.
pub fn skips(record: &SessionRecord, source_invalid: bool) -> bool {
    record.kind == SessionKind::Mirror && source_invalid
}

/// A track reached its destination (the target, or the source for a restore): the
/// source's bits that change with it, in the same batch when the target is on this node,
/// once the target acknowledged it otherwise. The destination's invalid bit clears with
/// the store itself.
pub fn moved(record: &SessionRecord) -> Vec<(Bits, bool)> {
    let Some((work_bits, _)) = work(record) else {
        return Vec::new();
    };
    let mut bits = vec![(work_bits, false)];
    if let (SessionKind::Clone, SessionState::Precopying, Some(slot)) =
        (record.kind, record.acting_state(), record.precopy_slot)
    {
        // Seed 001 FIG. 6: copied during precopy and not written since.
        bits.push((Bits::Session(slot), true));
    }
    bits
}

/// The state a session rests in once its copy found nothing left, when it changes.
pub fn copy_done(record: &SessionRecord) -> Result<Option<SessionState>, String> {
    let next = next_state(record.kind, record.state, Transition::CopyDone)?.unwrap_or(record.state);
    Ok((next != record.state).then_some(next))
}

/// The session's target did not answer within its target timeout: the record of the
/// suspended session, or `None` when it is not suspended (a strict mirror, a target on
/// this node, or a state that does not depend on the target).
pub fn suspend(
    record: &SessionRecord,
    error: &str,
    now_unix_seconds: u64,
) -> Option<SessionRecord> {
    let remote = record.remote.as_ref()?;
    if record.strict {
        return None;
    }
    let next = next_state(record.kind, record.state, Transition::Suspend).ok()??;
    let reason = format!(
        "suspended: node {} holding '{}' did not answer ({error}); host writes are kept here and marked, and the {} resumes by itself when that node answers",
        remote.node, remote.volume, record.kind
    );
    let mut record = record.clone();
    record.resume_state = Some(record.state);
    record.state = next;
    record.error = Some(reason.clone());
    record.last_error = Some(protocol::session::PastError {
        message: reason,
        unix_seconds: now_unix_seconds,
    });
    Some(record)
}

/// The target of a suspended session answers again: the record it resumes with. A
/// mirror that was synchronized resynchronizes what hosts wrote meanwhile (`pending`
/// tracks), a new copy with its own progress; a mirror suspended in the middle of a copy
/// (syncing, restoring) and a clone go on with the copy they had, so its percent, which
/// never goes back within a copy, holds (found by the chaos schedule: a mirror shown
/// syncing at 40.6 % came back syncing at 20.3 %).
pub fn resume(record: &SessionRecord, pending: u64) -> Result<SessionRecord, String> {
    let was = record.resume_state.unwrap_or(match record.kind {
        SessionKind::Mirror => SessionState::Syncing,
        SessionKind::Clone => SessionState::Active,
    });
    let next = next_state(record.kind, record.state, Transition::Resume(was))?
        .expect("a resume keeps the session");
    let mut record = record.clone();
    if record.kind == SessionKind::Mirror && was == SessionState::Synchronized {
        record.progress = Progress::start(pending);
        record.tracks_copied_last = 0;
    }
    record.state = next;
    record.resume_state = None;
    record.error = None;
    Ok(record)
}

#[cfg(test)]
mod tests;
