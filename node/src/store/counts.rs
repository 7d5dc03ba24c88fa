//! How many bits of each volume's bitmaps are set, for `list`, `show`, the metrics and
//! the totals a command counts, without scanning a bitmap on every reading.
//!
//! Bits change only through merge operands, blindly (a host write marks its tracks
//! without reading them first), so no writer knows whether it changed a count. Instead
//! every batch that carries bitmap operands marks the chunks it touched *after* it
//! landed, and a reading re-counts just those chunks, keeping a count per chunk and a
//! total. Each reading takes the marks before it reads the chunks, so a change that
//! landed before the reading's marks were taken is in its counts, and one that lands
//! later is marked for the next reading: a count is never behind a write the host has
//! heard the answer to. The first reading of a bitmap counts every chunk once.
//!
//! Writers take only the short `dirty` mutex, and only when their batch changes bits;
//! readers take `counted` (which no writer takes) while they read chunks.

use crate::bitmap::{self, BitmapKind, SESSION_SLOTS_MAX, TRACKS_PER_CHUNK};
use crate::engine::{Batch, Engine, Operation, Space};
use crate::Result;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};

/// One volume's bitmap of one kind.
type BitmapId = (u64, BitmapKind);

/// The counts of one bitmap: per chunk and their sums, per slot.
struct Counted {
    per_chunk: Vec<[u32; SESSION_SLOTS_MAX]>,
    total: [u64; SESSION_SLOTS_MAX],
}

#[derive(Default)]
pub(super) struct BitCounts {
    /// Chunks changed by a landed batch since their count was last taken.
    dirty: Mutex<HashMap<BitmapId, BTreeSet<u64>>>,
    counted: Mutex<HashMap<BitmapId, Counted>>,
}

impl BitCounts {
    /// The chunks a batch's bitmap operands touch, gathered before the batch goes to the
    /// engine (empty, and not allocated, for a batch that changes no bits).
    pub(super) fn chunks_of(batch: &Batch) -> Vec<(u64, BitmapKind, u64)> {
        batch
            .operations
            .iter()
            .filter_map(|operation| match operation {
                Operation::MergeBitmap { key, .. } => bitmap::parse_chunk_key(key),
                _ => None,
            })
            .collect()
    }

    /// Marks chunks for the next reading to re-count; called once their batch landed
    /// (or failed: a chunk re-counted for nothing costs one read).
    pub(super) fn touched(&self, chunks: &[(u64, BitmapKind, u64)]) {
        if chunks.is_empty() {
            return;
        }
        let mut dirty = self.dirty.lock();
        for (volume, kind, chunk) in chunks {
            dirty.entry((*volume, *kind)).or_default().insert(*chunk);
        }
    }

    /// Forgets a deleted volume's counts.
    pub(super) fn forget(&self, volume: u64) {
        self.dirty.lock().retain(|(id, _), _| *id != volume);
        self.counted.lock().retain(|(id, _), _| *id != volume);
    }

    /// The set bits of `slot` (0 for a single-bit kind) in a volume's bitmap of `kind`.
    pub(super) fn count<E: Engine>(
        &self,
        engine: &E,
        volume: u64,
        track_count: u64,
        kind: BitmapKind,
        slot: u8,
    ) -> Result<u64> {
        let mut counted = self.counted.lock();
        // The marks first: whatever landed before them is in the chunks read below.
        let dirty = self
            .dirty
            .lock()
            .remove(&(volume, kind))
            .unwrap_or_default();
        let chunk_count = track_count.div_ceil(TRACKS_PER_CHUNK) as usize;
        let entry = match counted.entry((volume, kind)) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(vacant) => {
                let mut entry = Counted {
                    per_chunk: vec![[0; SESSION_SLOTS_MAX]; chunk_count],
                    total: [0; SESSION_SLOTS_MAX],
                };
                for chunk in 0..chunk_count as u64 {
                    Self::recount(engine, volume, kind, chunk, &mut entry)?;
                }
                vacant.insert(entry)
            }
        };
        for (index, chunk) in dirty.iter().enumerate() {
            if let Err(error) = Self::recount(engine, volume, kind, *chunk, entry) {
                // The chunks not re-counted stay marked for the next reading.
                let chunks: Vec<_> = dirty
                    .iter()
                    .skip(index)
                    .map(|chunk| (volume, kind, *chunk))
                    .collect();
                self.touched(&chunks);
                return Err(error);
            }
        }
        Ok(entry.total[usize::from(slot) % SESSION_SLOTS_MAX])
    }

    fn recount<E: Engine>(
        engine: &E,
        volume: u64,
        kind: BitmapKind,
        chunk: u64,
        entry: &mut Counted,
    ) -> Result<()> {
        let Some(old) = entry.per_chunk.get_mut(chunk as usize) else {
            return Ok(());
        };
        let new = match engine.get(Space::Bitmaps, &bitmap::chunk_key(volume, kind, chunk))? {
            Some(stored) => bitmap::count_chunk(kind, &stored),
            None => [0; SESSION_SLOTS_MAX],
        };
        for slot in 0..SESSION_SLOTS_MAX {
            entry.total[slot] = entry.total[slot] - u64::from(old[slot]) + u64::from(new[slot]);
        }
        *old = new;
        Ok(())
    }
}
