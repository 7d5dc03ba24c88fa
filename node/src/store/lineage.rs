//! Lineages: what lets a gsnap job send only the tracks changed since the last job of the
//! same P and S.
//!
//! A lineage on a volume is a session slot that host writes mark changed (the live slot)
//! and no session holds. A job rotates it: the live slot is frozen (its bits are the
//! tracks written since the last rotation) and a new live slot takes the writes from then
//! on, in one write under the volume's write lock, so no host write falls between the
//! two. On P the rotation is part of the job's snap (the frozen slot holds exactly the
//! tracks written between the two jobs' snaps); on the volume the pair copies into, it
//! takes the volume from its hosts in the same write (the frozen slot holds the tracks its
//! hosts wrote since the last job gave it back). A succeeded job frees the frozen slot; a
//! failed one folds the frozen slot's tracks back into the live slot when its lineage goes
//! on (the next job sends them again), or frees both, and the next job sends everything.
//!
//! The record of each lineage (`l/<volume id>/<name>`) names its slots, so that start-up's
//! reconciliation of slots counts them as held.

use super::{add_bit_changes, readiness_code, Volume, VolumeState, VolumeStore, WriteMarks};
use crate::bitmap::{BitmapKind, SESSION_SLOTS_MAX};
use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::Bits;
use crate::{Error, Result};
use protocol::messages::{Extent, Readiness, VolumeInfo};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;

const LINEAGE_KEY_PREFIX: &[u8] = b"l/";
const LINEAGE_KEY_END: &[u8] = b"l0";
/// The longest lineage name: two volume names and a separator.
pub const LINEAGE_NAME_BYTES_MAX: usize = 2 * protocol::messages::VOLUME_NAME_BYTES_MAX + 1;

/// The slots of one lineage on one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageRecord {
    /// The slot host writes mark now.
    pub live: Option<u8>,
    /// The slot the last rotation froze: the tracks written before it.
    pub frozen: Option<u8>,
    /// The rotation took the volume from its hosts (the pair's target): settling gives it
    /// back.
    pub held: bool,
}

/// What a rotation does to a volume's slots and marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub slots: u16,
    pub marks: WriteMarks,
    pub record: LineageRecord,
    /// The bits of the first slot are added to the second's before anything is cleared:
    /// a frozen slot no job settled takes the live slot's tracks too.
    pub merge: Option<(u8, u8)>,
    /// Slots whose bits are cleared, after the merge: the live slot merged away, a frozen
    /// one dropped, and the one taken.
    pub cleared: Vec<u8>,
}

/// The rotation of `record` on a volume with `slots` and `marks` (pure; `None` when
/// the volume has no free slot). The live slot
/// is frozen (when the volume still holds it) and a new live slot is taken and marked by
/// host writes. A frozen slot still there (its job's end was not settled, or the
/// rotation is repeated after a crash that lost its remembered answer) keeps its tracks
/// and takes the live slot's too, so a rotation never loses a track written since the
/// last settled job; without a live slot nothing since is known, and the frozen slot is
/// dropped too (the job sends everything).
pub fn rotation(slots: u16, marks: WriteMarks, record: LineageRecord) -> Option<Rotation> {
    let mut slots = slots;
    let mut marks = marks;
    let mut cleared = Vec::new();
    let held = |slots: u16, slot: u8| slots & (1 << slot) != 0;
    let mut release = |slots: &mut u16, marks: &mut WriteMarks, slot: u8| {
        *slots &= !(1 << slot);
        marks.changed &= !(1 << slot);
        marks.pending &= !(1 << slot);
        cleared.push(slot);
    };
    let live = record.live.filter(|slot| held(slots, *slot));
    let frozen = record.frozen.filter(|slot| held(slots, *slot));
    let (frozen, merge) = match (live, frozen) {
        (Some(live), Some(frozen)) => {
            release(&mut slots, &mut marks, live);
            (Some(frozen), Some((live, frozen)))
        }
        (Some(live), None) => {
            marks.changed &= !(1 << live);
            (Some(live), None)
        }
        (None, Some(frozen)) => {
            release(&mut slots, &mut marks, frozen);
            (None, None)
        }
        (None, None) => (None, None),
    };
    let new = (0..SESSION_SLOTS_MAX as u8).find(|slot| !held(slots, *slot))?;
    slots |= 1 << new;
    marks.changed |= 1 << new;
    marks.pending &= !(1 << new);
    if !cleared.contains(&new) {
        cleared.push(new);
    }
    Some(Rotation {
        slots,
        marks,
        record: LineageRecord {
            live: Some(new),
            frozen,
            held: record.held,
        },
        merge,
        cleared,
    })
}

/// A change of one lineage on one volume, written in one batch: the volume's new slots
/// and marks, the lineage's record (`None`: deleted), a merge and the slots cleared
/// after it, and a readiness for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineageChange {
    pub slots: u16,
    pub marks: WriteMarks,
    pub record: Option<LineageRecord>,
    pub merge: Option<(u8, u8)>,
    pub cleared: Vec<u8>,
    pub readiness: Option<Readiness>,
}

impl From<Rotation> for LineageChange {
    fn from(rotation: Rotation) -> LineageChange {
        LineageChange {
            slots: rotation.slots,
            marks: rotation.marks,
            record: Some(rotation.record),
            merge: rotation.merge,
            cleared: rotation.cleared,
            readiness: None,
        }
    }
}

/// How a job's use of a lineage ends on one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The job succeeded: the frozen slot is freed and the volume given back when the
    /// rotation took it from its hosts.
    Settle,
    /// Both slots and the record go; the volume is given back only with `give_back`.
    Drop { give_back: bool },
    /// The frozen slot's tracks go back into the live slot and the frozen slot is freed,
    /// so the lineage goes on from the last settled rotation; the volume is given back
    /// only with `give_back`. Without a live slot nothing since is known: as `Drop`.
    Fold { give_back: bool },
}

/// The end of a job's use of `record` (pure), as `end` says.
pub fn ending(slots: u16, marks: WriteMarks, record: LineageRecord, end: Ending) -> LineageChange {
    let held = |slot: &u8| slots & (1 << slot) != 0;
    let live = record.live.filter(held);
    let frozen = record.frozen.filter(held);
    let end = match (end, live) {
        (Ending::Fold { give_back }, None) => Ending::Drop { give_back },
        (end, _) => end,
    };
    let mut slots = slots;
    let mut marks = marks;
    let mut cleared = Vec::new();
    let freed = match end {
        Ending::Drop { .. } => vec![frozen, live],
        Ending::Settle | Ending::Fold { .. } => vec![frozen],
    };
    for slot in freed.into_iter().flatten() {
        slots &= !(1 << slot);
        marks.changed &= !(1 << slot);
        marks.pending &= !(1 << slot);
        cleared.push(slot);
    }
    let given_back = |give_back: bool| (give_back && record.held).then_some(Readiness::Ready);
    // A lineage this node never rotated keeps no record.
    let (kept, merge, readiness) = match end {
        Ending::Drop { give_back } => (None, None, given_back(give_back)),
        Ending::Settle => (
            live.map(|live| LineageRecord {
                live: Some(live),
                frozen: None,
                held: false,
            }),
            None,
            record.held.then_some(Readiness::Ready),
        ),
        Ending::Fold { give_back } => (
            live.map(|live| LineageRecord {
                live: Some(live),
                frozen: None,
                // Still held from its hosts: the next job's end gives it back.
                held: record.held && !give_back,
            }),
            frozen.zip(live),
            given_back(give_back),
        ),
    };
    LineageChange {
        slots,
        marks,
        record: kept,
        merge,
        cleared,
        readiness,
    }
}

/// [`rotation`] of `record` on `volume` as `state` has it, or the refusal when the
/// volume has no free slot.
fn rotated(volume: &Volume, state: &VolumeState, record: LineageRecord) -> Result<Rotation> {
    rotation(state.session_slots, state.marks, record).ok_or_else(|| Error::SessionSlotsExhausted {
        name: volume.name.clone(),
        slots_max: SESSION_SLOTS_MAX,
    })
}

fn lineage_prefix(volume: u64) -> Vec<u8> {
    let mut key = LINEAGE_KEY_PREFIX.to_vec();
    key.extend_from_slice(&volume.to_be_bytes());
    key.push(b'/');
    key
}

fn lineage_key(volume: u64, name: &str) -> Vec<u8> {
    let mut key = lineage_prefix(volume);
    key.extend_from_slice(name.as_bytes());
    key
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > LINEAGE_NAME_BYTES_MAX {
        return Err(Error::Metadata {
            what: format!("lineage '{name}'"),
            detail: format!("a lineage name has 1 to {LINEAGE_NAME_BYTES_MAX} bytes"),
        });
    }
    Ok(())
}

fn clear_slot(batch: &mut Batch, volume: &Volume, slot: u8) {
    for kind in [BitmapKind::Sessions, BitmapKind::Pending] {
        add_bit_changes(
            batch,
            volume.id,
            kind,
            1 << slot,
            0,
            volume.track_count() - 1,
            false,
        );
    }
}

impl<E: Engine> VolumeStore<E> {
    /// The lineage `name` of `volume` (empty when the volume keeps none by that name).
    pub fn lineage(&self, volume: &Volume, name: &str) -> Result<LineageRecord> {
        check_name(name)?;
        match self
            .engine()
            .get(Space::Meta, &lineage_key(volume.id, name))?
        {
            Some(bytes) => Ok(protocol::codec::decode(&bytes)?),
            None => Ok(LineageRecord::default()),
        }
    }

    /// Every lineage record, by volume id: what start-up's reconciliation of slots counts
    /// as held.
    pub fn lineage_records(&self) -> Result<Vec<(u64, String, LineageRecord)>> {
        let mut records = Vec::new();
        let mut failure = None;
        self.engine().scan(
            Space::Meta,
            LINEAGE_KEY_PREFIX,
            LINEAGE_KEY_END,
            &mut |key, value| {
                let rest = &key[LINEAGE_KEY_PREFIX.len()..];
                let parsed = rest
                    .get(..8)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(u64::from_be_bytes)
                    .zip(
                        rest.get(9..)
                            .map(|name| String::from_utf8_lossy(name).into_owned()),
                    );
                match (parsed, protocol::codec::decode::<LineageRecord>(value)) {
                    (Some((volume, name)), Ok(record)) => records.push((volume, name, record)),
                    (_, Err(error)) => {
                        failure = Some(Error::from(error));
                        return false;
                    }
                    (None, _) => {}
                }
                true
            },
        )?;
        match failure {
            Some(error) => Err(error),
            None => Ok(records),
        }
    }

    /// The slots the lineages hold, by volume id, read once at start-up; the records of
    /// lineages whose volume no longer exists (deleted while a record stayed) are dropped.
    pub fn held_lineage_slots(&self) -> Result<std::collections::HashMap<u64, u16>> {
        let known: std::collections::HashSet<u64> = self
            .catalog
            .lock()
            .by_name
            .values()
            .map(|volume| volume.id)
            .collect();
        let mut held = std::collections::HashMap::new();
        let mut batch = Batch::default();
        for (volume, name, record) in self.lineage_records()? {
            if !known.contains(&volume) {
                tracing::info!(volume, lineage = %name, "forgetting the lineage of a deleted volume");
                batch.delete(Space::Meta, lineage_key(volume, &name));
                continue;
            }
            let slots = held.entry(volume).or_insert(0u16);
            for slot in record.live.into_iter().chain(record.frozen) {
                *slots |= 1 << slot;
            }
        }
        if !batch.is_empty() {
            self.write_batch(batch, Durability::Synced)?;
        }
        Ok(held)
    }

    /// The tracks whose bit of session slot `slot` is set, as runs in increasing order,
    /// without taking the volume's locks (the caller checked the slot, or holds the
    /// volume's write lock).
    fn slot_runs(&self, volume: &Volume, slot: u8) -> Result<Vec<Extent>> {
        let mut tracks = Vec::new();
        self.scan_set(
            volume,
            Bits::Session(slot),
            slot,
            volume.whole(),
            &mut |track| {
                tracks.push(track);
                true
            },
        )?;
        Ok(protocol::gsnap::extents_of_tracks(&tracks))
    }

    /// The tracks lineage `name` of `volume` froze at its last rotation, as runs in
    /// increasing order; `None` when no rotation froze any (no live slot was kept).
    pub fn lineage_frozen_tracks(
        &self,
        volume: &Volume,
        name: &str,
    ) -> Result<Option<Vec<Extent>>> {
        let record = self.lineage(volume, name)?;
        let Some(frozen) = record.frozen else {
            return Ok(None);
        };
        if volume.state.read().session_slots & (1 << frozen) == 0 {
            return Ok(None);
        }
        let extents = self.slot_runs(volume, frozen)?;
        Ok(Some(extents))
    }

    /// Adds the rotation of lineage `name` to a batch that rewrites `volume`'s record
    /// from `state` (a snap's): `state` takes the new slots and marks; the caller puts
    /// the volume's record after this and restores `state` if the batch fails.
    pub(super) fn rotate_lineage_in(
        &self,
        batch: &mut Batch,
        volume: &Volume,
        state: &mut VolumeState,
        name: &str,
    ) -> Result<()> {
        let record = self.lineage(volume, name)?;
        let change = LineageChange::from(rotated(volume, state, record)?);
        self.add_lineage_change(batch, volume, name, &change)?;
        state.session_slots = change.slots;
        state.marks = change.marks;
        Ok(())
    }

    /// Rotates lineage `name` of `volume` and takes the volume from its hosts, in one
    /// write (the pair's target, before the pair). The caller holds the volume's command
    /// gate, so no host write is under way.
    pub fn rotate_and_hold(&self, volume: &Volume, name: &str) -> Result<VolumeInfo> {
        let record = LineageRecord {
            held: true,
            ..self.lineage(volume, name)?
        };
        self.change_lineage(volume, name, |state| {
            Ok(LineageChange {
                readiness: Some(Readiness::NotReady),
                ..rotated(volume, state, record)?.into()
            })
        })
    }

    /// Ends a job's use of lineage `name` (see [`ending`]): the frozen slot is freed (and
    /// a volume taken from its hosts is given back), or with `drop` both slots and the
    /// record go — the volume's readiness staying as the job left it (a target it wrote
    /// in part stays not ready) unless `give_back` (a job that failed before it wrote it).
    pub fn end_lineage(&self, volume: &Volume, name: &str, end: Ending) -> Result<VolumeInfo> {
        let record = self.lineage(volume, name)?;
        self.change_lineage(volume, name, |state| {
            Ok(ending(state.session_slots, state.marks, record, end))
        })
    }

    /// Adds `change`'s bits and lineage record to `batch`: the merge first (read now: the
    /// caller holds the volume's write lock, so no write marks the merged slot meanwhile),
    /// then the slots cleared.
    fn add_lineage_change(
        &self,
        batch: &mut Batch,
        volume: &Volume,
        name: &str,
        change: &LineageChange,
    ) -> Result<()> {
        if let Some((from, into)) = change.merge {
            for run in self.slot_runs(volume, from)? {
                add_bit_changes(
                    batch,
                    volume.id,
                    BitmapKind::Sessions,
                    1 << into,
                    run.first,
                    run.last,
                    true,
                );
            }
        }
        for slot in &change.cleared {
            clear_slot(batch, volume, *slot);
        }
        match &change.record {
            Some(record) => batch.put(
                Space::Meta,
                lineage_key(volume.id, name),
                protocol::codec::encode(record)?,
            ),
            None => batch.delete(Space::Meta, lineage_key(volume.id, name)),
        }
        Ok(())
    }

    /// Writes the lineage change of `volume` that `decide` makes from its state, with the
    /// volume's record, in one synced batch under the volume's write lock.
    fn change_lineage(
        &self,
        volume: &Volume,
        name: &str,
        decide: impl FnOnce(&VolumeState) -> Result<LineageChange>,
    ) -> Result<VolumeInfo> {
        check_name(name)?;
        let catalog = self.catalog.lock();
        let mut state = volume.state.write();
        if volume.is_deleted() {
            return Err(Error::VolumeDeleted { volume: volume.id });
        }
        let change = decide(&state)?;
        let LineageChange {
            slots,
            marks,
            readiness,
            ..
        } = change;
        let mut batch = Batch::default();
        self.add_lineage_change(&mut batch, volume, name, &change)?;
        let mut stored = volume.record(&state);
        stored.session_slots = slots;
        stored.marks = marks;
        if let Some(readiness) = readiness {
            stored.readiness = readiness;
        }
        batch.put(
            Space::Meta,
            super::volume_key(volume.id),
            protocol::codec::encode(&stored)?,
        );
        self.write_batch(batch, Durability::Synced)?;
        state.session_slots = slots;
        state.marks = marks;
        if let Some(readiness) = readiness {
            volume
                .readiness
                .store(readiness_code(readiness), Ordering::Release);
        }
        drop(state);
        drop(catalog);
        tracing::info!(volume = %volume.name, lineage = name, record = ?change.record, "lineage changed");
        Ok(volume.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_freezes_the_live_slot_and_an_unsettled_frozen_slot_takes_its_tracks() {
        // Slot 0 is a session's; a first rotation takes slot 1 as the live slot.
        let session = WriteMarks {
            changed: 1,
            pending: 1,
            target_changed: false,
        };
        let first = rotation(0b1, session, LineageRecord::default()).unwrap();
        assert_eq!(first.slots, 0b11);
        assert_eq!(first.marks.changed, 0b11);
        assert_eq!(first.record.live, Some(1));
        assert_eq!(first.record.frozen, None);
        assert_eq!(first.cleared, vec![1]);
        assert_eq!(first.merge, None);
        // The next one freezes slot 1 (no longer marked) and takes slot 2.
        let second = rotation(first.slots, first.marks, first.record).unwrap();
        assert_eq!(second.slots, 0b111);
        assert_eq!(second.marks.changed, 0b101);
        assert_eq!(second.record.frozen, Some(1));
        assert_eq!(second.record.live, Some(2));
        // Again without a settle (a repeated rotation): frozen slot 1 keeps its tracks and
        // takes live slot 2's, and slot 2, cleared, is the new live slot.
        let third = rotation(second.slots, second.marks, second.record).unwrap();
        assert_eq!(third.merge, Some((2, 1)));
        assert_eq!(third.record.frozen, Some(1));
        assert_eq!(third.record.live, Some(2));
        assert_eq!(third.slots, 0b111);
        assert_eq!(third.marks.changed, 0b101);
        assert_eq!(third.cleared, vec![2]);
        // A frozen slot without its live slot knows nothing since: both go.
        let orphan = rotation(
            0b11,
            session,
            LineageRecord {
                live: Some(4),
                frozen: Some(1),
                held: false,
            },
        )
        .unwrap();
        assert_eq!(orphan.record.frozen, None);
        assert_eq!(orphan.record.live, Some(1));
        assert_eq!(orphan.slots, 0b11);
        // A live slot the volume no longer holds is not frozen: the job sends everything.
        let lost = rotation(
            0b1,
            session,
            LineageRecord {
                live: Some(5),
                frozen: None,
                held: false,
            },
        )
        .unwrap();
        assert_eq!(lost.record.frozen, None);
        assert!(rotation(u16::MAX, WriteMarks::default(), LineageRecord::default()).is_none());
    }

    #[test]
    fn a_failed_job_folds_its_frozen_tracks_back_a_succeeded_one_frees_them() {
        // Slot 0 is a session's; the lineage's live slot is 2, its frozen slot 1, on a
        // target the rotation took from its hosts.
        let marks = WriteMarks {
            changed: 0b101,
            pending: 0b1,
            target_changed: false,
        };
        let record = LineageRecord {
            live: Some(2),
            frozen: Some(1),
            held: true,
        };
        // Folded: slot 1's tracks go into slot 2, slot 1 is freed, the volume stays
        // held (the job wrote it in part) until a job's end gives it back.
        let folded = ending(0b111, marks, record, Ending::Fold { give_back: false });
        assert_eq!(folded.merge, Some((1, 2)));
        assert_eq!(folded.cleared, vec![1]);
        assert_eq!(folded.slots, 0b101);
        assert_eq!(folded.marks.changed, 0b101);
        assert_eq!(
            folded.record,
            Some(LineageRecord {
                live: Some(2),
                frozen: None,
                held: true,
            })
        );
        assert_eq!(folded.readiness, None);
        // Folded before anything was written: the volume goes back to its hosts.
        let released = ending(0b111, marks, record, Ending::Fold { give_back: true });
        assert_eq!(released.merge, Some((1, 2)));
        assert_eq!(released.readiness, Some(Readiness::Ready));
        assert!(!released.record.unwrap().held);
        // A job that failed before it rotated has nothing to merge.
        let unrotated = LineageRecord {
            live: Some(2),
            frozen: None,
            held: false,
        };
        let kept = ending(0b101, marks, unrotated, Ending::Fold { give_back: false });
        assert_eq!((kept.merge, kept.cleared.len()), (None, 0));
        assert_eq!(kept.record, Some(unrotated));
        // Without its live slot the lineage cannot go on: it is dropped.
        let lost = ending(0b011, marks, record, Ending::Fold { give_back: false });
        assert_eq!(lost.record, None);
        assert_eq!(lost.cleared, vec![1]);
        assert_eq!(lost.merge, None);
        // Settled: the frozen slot is freed without a merge, the volume given back.
        let settled = ending(0b111, marks, record, Ending::Settle);
        assert_eq!((settled.merge, settled.cleared), (None, vec![1]));
        assert_eq!(settled.readiness, Some(Readiness::Ready));
        // Dropped: both slots and the record go.
        let dropped = ending(0b111, marks, record, Ending::Drop { give_back: false });
        assert_eq!(dropped.cleared, vec![1, 2]);
        assert_eq!(dropped.slots, 0b1);
        assert_eq!((dropped.record, dropped.readiness), (None, None));
    }
}
