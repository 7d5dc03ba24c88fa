//! Changes to several volumes of one store that land in one engine batch, or not at all:
//! a session command's slots, write marks, readiness and bits, and the session's own
//! record, so that a crash at any instant leaves the command done or not done.
//!
//! A [`VolumeChanges`] is built without touching the store, from the volumes' state when
//! each is first named; [`VolumeStore::commit`] checks that no slot changed hands since,
//! writes everything synced, and only then changes the volumes in memory. The caller holds
//! the command gates of every volume it names, so nothing else changes their slots, marks
//! or readiness meanwhile.

use super::{
    readiness_code, snapshot_origin_key, BitChange, Bits, Volume, VolumeStore, WriteMarks,
};
use crate::bitmap::{BitmapKind, SESSION_SLOTS_MAX};
use crate::engine::{Batch, Durability, Engine, Space};
use crate::{Error, Result};
use protocol::messages::{Extent, Readiness};
use std::sync::atomic::Ordering;

/// What a command does to one volume's descriptor.
struct Edit<'a> {
    volume: &'a Volume,
    /// The slots and marks the volume had when the command first named it.
    slots_before: u16,
    marks_before: WriteMarks,
    slots: u16,
    marks: WriteMarks,
    readiness: Readiness,
    forget_snapshot_origin: bool,
}

/// The changes of one command, to commit at once with [`VolumeStore::commit`].
#[derive(Default)]
pub struct VolumeChanges<'a> {
    batch: Batch,
    edits: Vec<Edit<'a>>,
}

impl<'a> VolumeChanges<'a> {
    pub fn new() -> VolumeChanges<'a> {
        VolumeChanges::default()
    }

    fn edit(&mut self, volume: &'a Volume) -> Result<&mut Edit<'a>> {
        if volume.is_deleted() {
            return Err(Error::VolumeDeleted { volume: volume.id });
        }
        let index = match self
            .edits
            .iter()
            .position(|edit| edit.volume.id == volume.id)
        {
            Some(index) => index,
            None => {
                let state = volume.state.read();
                self.edits.push(Edit {
                    volume,
                    slots_before: state.session_slots,
                    marks_before: state.marks,
                    slots: state.session_slots,
                    marks: state.marks,
                    readiness: volume.readiness(),
                    forget_snapshot_origin: false,
                });
                self.edits.len() - 1
            }
        };
        Ok(&mut self.edits[index])
    }

    fn check_slot(edit: &Edit<'_>, slot: u8) -> Result<()> {
        if slot as usize >= SESSION_SLOTS_MAX || edit.slots & (1 << slot) == 0 {
            return Err(Error::SessionSlotNotAllocated {
                name: edit.volume.name.clone(),
                slot,
            });
        }
        Ok(())
    }

    /// Takes the lowest free session slot of `volume` (the 17th is refused), with its
    /// bits cleared. Host writes mark it neither changed nor pending until the command
    /// says so with [`VolumeChanges::set_marks`].
    pub fn allocate_slot(&mut self, volume: &'a Volume) -> Result<u8> {
        let edit = self.edit(volume)?;
        let slot = (0..SESSION_SLOTS_MAX as u8)
            .find(|slot| edit.slots & (1 << slot) == 0)
            .ok_or_else(|| Error::SessionSlotsExhausted {
                name: volume.name.clone(),
                slots_max: SESSION_SLOTS_MAX,
            })?;
        edit.slots |= 1 << slot;
        edit.marks.changed &= !(1 << slot);
        edit.marks.pending &= !(1 << slot);
        self.clear_slot_bits(volume, slot);
        Ok(slot)
    }

    /// Takes the session slot `slot` of `volume`, which must be free, with its bits
    /// cleared (the session core chose it from the free slots the driver read).
    pub fn take_slot(&mut self, volume: &'a Volume, slot: u8) -> Result<()> {
        let edit = self.edit(volume)?;
        if slot as usize >= SESSION_SLOTS_MAX || edit.slots & (1 << slot) != 0 {
            return Err(Error::Metadata {
                what: format!("volume {}", volume.name),
                detail: format!("session slot {slot} is not free"),
            });
        }
        edit.slots |= 1 << slot;
        edit.marks.changed &= !(1 << slot);
        edit.marks.pending &= !(1 << slot);
        self.clear_slot_bits(volume, slot);
        Ok(())
    }

    /// Returns a session slot of `volume`, clearing its bits and marks.
    pub fn free_slot(&mut self, volume: &'a Volume, slot: u8) -> Result<()> {
        let edit = self.edit(volume)?;
        Self::check_slot(edit, slot)?;
        edit.slots &= !(1 << slot);
        edit.marks.changed &= !(1 << slot);
        edit.marks.pending &= !(1 << slot);
        self.clear_slot_bits(volume, slot);
        Ok(())
    }

    fn clear_slot_bits(&mut self, volume: &Volume, slot: u8) {
        for kind in [BitmapKind::Sessions, BitmapKind::Pending] {
            super::add_bit_changes(
                &mut self.batch,
                volume.id,
                kind,
                1 << slot,
                0,
                volume.track_count() - 1,
                false,
            );
        }
    }

    /// The bits host writes to `volume` will mark once the changes are committed.
    pub fn marks(&mut self, volume: &'a Volume) -> Result<WriteMarks> {
        Ok(self.edit(volume)?.marks)
    }

    /// Chooses the bits host writes to `volume` mark; slot marks must name its slots.
    pub fn set_marks(&mut self, volume: &'a Volume, marks: WriteMarks) -> Result<()> {
        let edit = self.edit(volume)?;
        let unallocated = (marks.changed | marks.pending) & !edit.slots;
        if unallocated != 0 {
            return Err(Error::SessionSlotNotAllocated {
                name: volume.name.clone(),
                slot: unallocated.trailing_zeros() as u8,
            });
        }
        edit.marks = marks;
        Ok(())
    }

    pub fn set_readiness(&mut self, volume: &'a Volume, readiness: Readiness) -> Result<()> {
        self.edit(volume)?.readiness = readiness;
        Ok(())
    }

    /// Turns the marking of target-changed bits by host writes (seed 002's M4b bits of
    /// a BCV) on, starting from none, or off, keeping what they hold: the source of a
    /// re-establish or restore that turned them off reads them, and when its command did
    /// not hear the answer it reads them again on the retry.
    pub fn set_target_tracking(&mut self, volume: &'a Volume, tracking: bool) -> Result<()> {
        let mut marks = self.marks(volume)?;
        marks.target_changed = tracking;
        self.set_marks(volume, marks)?;
        if tracking {
            self.change_bits(volume, Bits::TargetChanged, volume.whole(), false)?;
        }
        Ok(())
    }

    /// Clears the target-changed bits: the tracks the volume's hosts changed have been
    /// taken over by its session's source, or the session ended.
    pub fn forget_target_changes(&mut self, volume: &'a Volume) -> Result<()> {
        self.change_bits(volume, Bits::TargetChanged, volume.whole(), false)
    }

    /// The volume is no longer a snapshot of anything: a session replaces its data.
    pub fn forget_snapshot_origin(&mut self, volume: &'a Volume) -> Result<()> {
        self.edit(volume)?.forget_snapshot_origin = true;
        Ok(())
    }

    /// Sets (`set` true) or clears the chosen bits of `volume` over an extent.
    pub fn change_bits(
        &mut self,
        volume: &'a Volume,
        bits: Bits,
        extent: Extent,
        set: bool,
    ) -> Result<()> {
        volume.check_extent(extent)?;
        let edit = self.edit(volume)?;
        if let Some(slot) = bits.slot() {
            Self::check_slot(edit, slot)?;
        }
        let (kind, mask) = bits.kind_and_mask();
        super::add_bit_changes(
            &mut self.batch,
            volume.id,
            kind,
            mask,
            extent.first,
            extent.last,
            set,
        );
        Ok(())
    }

    /// Sets or clears single tracks' bits, on any volumes.
    pub fn change_track_bits(&mut self, changes: &[BitChange<'a>]) -> Result<()> {
        for change in changes {
            self.change_bits(
                change.volume,
                change.bits,
                Extent {
                    first: change.track,
                    last: change.track,
                },
                change.set,
            )?;
        }
        Ok(())
    }

    /// Stores a value beside the volumes in the same batch (a session's record).
    pub fn put(&mut self, space: Space, key: Vec<u8>, value: Vec<u8>) {
        self.batch.put(space, key, value);
    }

    pub fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.batch.delete(space, key);
    }
}

impl<E: Engine> VolumeStore<E> {
    /// Writes `changes` in one synced batch; the volumes change in memory only once it
    /// landed. Refused, changing nothing, when a volume's slots changed since the
    /// changes named it or it was deleted.
    pub fn commit(&self, changes: VolumeChanges<'_>) -> Result<()> {
        self.commit_with(changes, Durability::Synced)
    }

    /// [`VolumeStore::commit`] with the given durability: a host write's own changes of
    /// bits (a precopied track re-queued) are logged like the write, not synced apart.
    pub fn commit_with(&self, changes: VolumeChanges<'_>, durability: Durability) -> Result<()> {
        let VolumeChanges {
            mut batch,
            mut edits,
        } = changes;
        edits.sort_by_key(|edit| edit.volume.id);
        // The catalog first, as every administrative operation takes it.
        let mut catalog = self.catalog.lock();
        let mut states: Vec<_> = edits.iter().map(|edit| edit.volume.state.write()).collect();
        for (edit, state) in edits.iter().zip(&states) {
            if edit.volume.is_deleted() {
                return Err(Error::VolumeDeleted {
                    volume: edit.volume.id,
                });
            }
            // A command writes the marks it read back: a change made meanwhile (a gsnap
            // lineage's rotation) would be lost.
            if state.session_slots != edit.slots_before || state.marks != edit.marks_before {
                return Err(Error::Metadata {
                    what: format!("volume {}", edit.volume.name),
                    detail: "its session slots changed while a command prepared its changes"
                        .to_string(),
                });
            }
        }
        for (edit, state) in edits.iter().zip(&states) {
            let mut record = edit.volume.record(state);
            record.session_slots = edit.slots;
            record.marks = edit.marks;
            record.readiness = edit.readiness;
            batch.put(
                Space::Meta,
                super::volume_key(edit.volume.id),
                protocol::codec::encode(&record)?,
            );
            if edit.forget_snapshot_origin && catalog.snapshot_origins.contains_key(&edit.volume.id)
            {
                batch.delete(Space::Meta, snapshot_origin_key(edit.volume.id));
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.write_batch(batch, durability)?;
        for (edit, state) in edits.iter().zip(states.iter_mut()) {
            state.session_slots = edit.slots;
            state.marks = edit.marks;
            let previous = edit
                .volume
                .readiness
                .swap(readiness_code(edit.readiness), Ordering::AcqRel);
            if previous != readiness_code(edit.readiness) {
                tracing::info!(volume = edit.volume.id, name = %edit.volume.name, readiness = %edit.readiness, "readiness changed");
            }
            if edit.forget_snapshot_origin {
                catalog.snapshot_origins.remove(&edit.volume.id);
            }
        }
        Ok(())
    }
}
