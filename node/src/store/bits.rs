//! A volume's session slots, write marks and change bits (see `crate::bitmap` for their
//! layout): taking and freeing slots, choosing what host writes mark, and reading and
//! changing bits one batch at a time. Every change goes through `write_batch`, so the
//! kept counts (`counts.rs`) see it.

use super::{add_bit_changes, BitChange, Bits, Volume, VolumeState, VolumeStore, WriteMarks};
use crate::bitmap::{self, BitmapKind, SESSION_SLOTS_MAX, TRACKS_PER_CHUNK};
use crate::engine::{Batch, Durability, Engine, Space};
use crate::{Error, Result};
use protocol::messages::Extent;

impl<E: Engine> VolumeStore<E> {
    pub(super) fn add_track_bit_changes(
        batch: &mut Batch,
        changes: &[BitChange<'_>],
    ) -> Result<()> {
        for change in changes {
            change.volume.check_extent(Extent {
                first: change.track,
                last: change.track,
            })?;
            if let Some(slot) = change.bits.slot() {
                Self::check_slot(change.volume, &change.volume.state.read(), slot)?;
            }
            let (kind, mask) = change.bits.kind_and_mask();
            add_bit_changes(
                batch,
                change.volume.id,
                kind,
                mask,
                change.track,
                change.track,
                change.set,
            );
        }
        Ok(())
    }

    /// Applies single-track bit changes, on any volumes of this store, in one batch.
    pub fn change_track_bits(
        &self,
        changes: &[BitChange<'_>],
        durability: Durability,
    ) -> Result<()> {
        let mut batch = Batch::default();
        Self::add_track_bit_changes(&mut batch, changes)?;
        if batch.is_empty() {
            return Ok(());
        }
        self.write_batch(batch, durability)
    }

    /// The slot `bits` names (0 for a bitmap of one bit a track), refused when it is not
    /// allocated.
    pub(super) fn checked_slot(volume: &Volume, bits: Bits) -> Result<u8> {
        match bits.slot() {
            Some(slot) => {
                Self::check_slot(volume, &volume.state.read(), slot)?;
                Ok(slot)
            }
            None => Ok(0),
        }
    }

    /// Counts the tracks whose chosen bit is set.
    pub fn count_set(&self, volume: &Volume, bits: Bits) -> Result<u64> {
        let slot = Self::checked_slot(volume, bits)?;
        let (kind, _) = bits.kind_and_mask();
        self.counts
            .count(&self.engine, volume.id, volume.track_count(), kind, slot)
    }

    /// [`VolumeStore::count_set`] by a scan of the whole bitmap, which tests compare the
    /// kept counts with.
    pub fn count_set_by_scan(&self, volume: &Volume, bits: Bits) -> Result<u64> {
        let mut count = 0;
        self.for_each_set(volume, bits, volume.whole(), &mut |_| {
            count += 1;
            true
        })?;
        Ok(count)
    }

    /// The first `limit` tracks at or after `from` whose chosen bit is set, wrapping
    /// around to the start so a copier that keeps a cursor visits every track in turn.
    pub fn next_set(
        &self,
        volume: &Volume,
        bits: Bits,
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>> {
        let mut tracks = Vec::new();
        let last = volume.track_count() - 1;
        let from = from.min(last);
        let mut collect = |track: u64| {
            tracks.push(track);
            tracks.len() < limit
        };
        self.for_each_set(volume, bits, Extent { first: from, last }, &mut collect)?;
        if tracks.len() < limit && from > 0 {
            let mut collect = |track: u64| {
                tracks.push(track);
                tracks.len() < limit
            };
            self.for_each_set(
                volume,
                bits,
                Extent {
                    first: 0,
                    last: from - 1,
                },
                &mut collect,
            )?;
        }
        Ok(tracks)
    }

    /// The session slots of `volume` in use, one bit each.
    pub fn session_slots(&self, volume: &Volume) -> u16 {
        volume.state.read().session_slots
    }

    /// Takes a free session slot of `volume` (the 17th is refused). Its bits start clear.
    pub fn allocate_session_slot(&self, volume: &Volume) -> Result<u8> {
        let mut state = volume.state.write();
        Self::check_live(volume)?;
        let slot = (0..SESSION_SLOTS_MAX as u8)
            .find(|slot| state.session_slots & (1 << slot) == 0)
            .ok_or_else(|| Error::SessionSlotsExhausted {
                name: volume.name.clone(),
                slots_max: SESSION_SLOTS_MAX,
            })?;
        self.change_slot(volume, &mut state, slot, true)?;
        Ok(slot)
    }

    /// Returns a session slot, clearing its bits.
    pub fn free_session_slot(&self, volume: &Volume, slot: u8) -> Result<()> {
        let mut state = volume.state.write();
        Self::check_live(volume)?;
        Self::check_slot(volume, &state, slot)?;
        self.change_slot(volume, &mut state, slot, false)
    }

    /// Gives `slot` to a session or takes it back. Its bits are cleared either way, in the
    /// same synced batch as the volume record, and memory changes only if the batch lands.
    /// A new slot is marked changed by host writes (a mirror's default); a clone's driver
    /// turns that off with [`VolumeStore::set_write_marks`].
    pub(super) fn change_slot(
        &self,
        volume: &Volume,
        state: &mut VolumeState,
        slot: u8,
        allocated: bool,
    ) -> Result<()> {
        let mut batch = Batch::default();
        for kind in [BitmapKind::Sessions, BitmapKind::Pending] {
            add_bit_changes(
                &mut batch,
                volume.id,
                kind,
                1 << slot,
                0,
                volume.track_count() - 1,
                false,
            );
        }
        let previous = (state.session_slots, state.marks);
        if allocated {
            state.session_slots |= 1 << slot;
            state.marks.changed |= 1 << slot;
        } else {
            state.session_slots &= !(1 << slot);
            state.marks.changed &= !(1 << slot);
            state.marks.pending &= !(1 << slot);
        }
        let written = self
            .put_record(&mut batch, volume, state)
            .and_then(|()| self.write_batch(batch, Durability::Synced));
        if written.is_err() {
            (state.session_slots, state.marks) = previous;
        }
        written
    }

    /// Refuses changes to a deleted volume: its record must not be written back. `delete`
    /// sets the flag under the view lock, so checking under the lock cannot race it.
    pub(super) fn check_live(volume: &Volume) -> Result<()> {
        if volume.is_deleted() {
            return Err(Error::VolumeDeleted { volume: volume.id });
        }
        Ok(())
    }

    pub(super) fn check_slot(volume: &Volume, state: &VolumeState, slot: u8) -> Result<()> {
        if slot as usize >= SESSION_SLOTS_MAX || state.session_slots & (1 << slot) == 0 {
            return Err(Error::SessionSlotNotAllocated {
                name: volume.name.clone(),
                slot,
            });
        }
        Ok(())
    }

    /// Turns marking of target-changed bits by host writes on or off.
    pub fn set_target_tracking(&self, volume: &Volume, tracking: bool) -> Result<()> {
        let mut marks = self.write_marks(volume);
        marks.target_changed = tracking;
        self.set_write_marks(volume, marks)
    }

    /// The bits host writes mark now.
    pub fn write_marks(&self, volume: &Volume) -> WriteMarks {
        volume.state.read().marks
    }

    /// Chooses the bits host writes mark. Slot marks must name allocated slots.
    pub fn set_write_marks(&self, volume: &Volume, marks: WriteMarks) -> Result<()> {
        let mut state = volume.state.write();
        Self::check_live(volume)?;
        let unallocated = (marks.changed | marks.pending) & !state.session_slots;
        if unallocated != 0 {
            return Err(Error::SessionSlotNotAllocated {
                name: volume.name.clone(),
                slot: unallocated.trailing_zeros() as u8,
            });
        }
        let previous = std::mem::replace(&mut state.marks, marks);
        let mut batch = Batch::default();
        if let Err(error) = self
            .put_record(&mut batch, volume, &state)
            .and_then(|()| self.write_batch(batch, Durability::Synced))
        {
            state.marks = previous;
            return Err(error);
        }
        Ok(())
    }

    /// Sets (`set` true) or clears the chosen bits over an extent.
    pub fn change_bits(
        &self,
        volume: &Volume,
        bits: Bits,
        extent: Extent,
        set: bool,
    ) -> Result<()> {
        volume.check_extent(extent)?;
        let state = volume.state.read();
        Self::check_live(volume)?;
        if let Some(slot) = bits.slot() {
            Self::check_slot(volume, &state, slot)?;
        }
        let (kind, mask) = bits.kind_and_mask();
        let mut batch = Batch::default();
        add_bit_changes(
            &mut batch,
            volume.id,
            kind,
            mask,
            extent.first,
            extent.last,
            set,
        );
        self.write_batch(batch, Durability::Synced)
    }

    /// Marks every track of the volume in the chosen bits.
    pub fn mark_all(&self, volume: &Volume, bits: Bits) -> Result<()> {
        self.change_bits(volume, bits, volume.whole(), true)
    }

    pub fn test_bit(&self, volume: &Volume, bits: Bits, track: u64) -> Result<bool> {
        let mut result = false;
        self.for_each_set(
            volume,
            bits,
            Extent {
                first: track,
                last: track,
            },
            &mut |_| {
                result = true;
                false
            },
        )?;
        Ok(result)
    }

    /// Visits the tracks of `extent` whose chosen bit is set, in order, until `visit`
    /// returns false.
    pub fn for_each_set(
        &self,
        volume: &Volume,
        bits: Bits,
        extent: Extent,
        visit: &mut dyn FnMut(u64) -> bool,
    ) -> Result<()> {
        volume.check_extent(extent)?;
        let slot = Self::checked_slot(volume, bits)?;
        self.scan_set(volume, bits, slot, extent, visit)
    }

    /// [`VolumeStore::for_each_set`] for a caller that checked the slot and the extent
    /// itself: it takes no lock of the volume (the caller may hold its write lock).
    pub(super) fn scan_set(
        &self,
        volume: &Volume,
        bits: Bits,
        slot: u8,
        extent: Extent,
        visit: &mut dyn FnMut(u64) -> bool,
    ) -> Result<()> {
        let (kind, _) = bits.kind_and_mask();
        for chunk in extent.first / TRACKS_PER_CHUNK..=extent.last / TRACKS_PER_CHUNK {
            let Some(stored) = self
                .engine
                .get(Space::Bitmaps, &bitmap::chunk_key(volume.id, kind, chunk))?
            else {
                continue;
            };
            let first = (chunk * TRACKS_PER_CHUNK).max(extent.first);
            let last = ((chunk + 1) * TRACKS_PER_CHUNK - 1).min(extent.last);
            for track in first..=last {
                if bitmap::test_bit(kind, &stored, (track % TRACKS_PER_CHUNK) as usize, slot)
                    && !visit(track)
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
