//! An in-memory engine with the same semantics as the RocksDB one, for fast tests.

use super::{Batch, Durability, Engine, Operation, Space, ValueVisitor};
use crate::bitmap;
use crate::Result;
use parking_lot::RwLock;
use std::collections::BTreeMap;

/// The keys and values of one space, in key order.
type SpaceMap = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemoryEngine {
    spaces: RwLock<BTreeMap<Space, SpaceMap>>,
}

impl MemoryEngine {
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }
}

impl Engine for MemoryEngine {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .spaces
            .read()
            .get(&space)
            .and_then(|map| map.get(key).cloned()))
    }

    fn multi_get(
        &self,
        space: Space,
        keys: &[Vec<u8>],
        visit: &mut ValueVisitor<'_>,
    ) -> Result<()> {
        let spaces = self.spaces.read();
        let map = spaces.get(&space);
        for (index, key) in keys.iter().enumerate() {
            visit(index, map.and_then(|map| map.get(key)).map(Vec::as_slice))?;
        }
        Ok(())
    }

    fn scan(
        &self,
        space: Space,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let spaces = self.spaces.read();
        if let Some(map) = spaces.get(&space) {
            for (key, value) in map.range(from.to_vec()..to.to_vec()) {
                if !visit(key, value) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn write(&self, batch: Batch, _durability: Durability) -> Result<()> {
        let mut spaces = self.spaces.write();
        // Merges are checked before anything changes, so a bad batch changes nothing,
        // as RocksDB's atomic batches guarantee. The check runs against an overlay of the
        // batch's own earlier changes, so it costs the batch's size, not the map's.
        let mut overlay: BTreeMap<(Space, Vec<u8>), Option<Vec<u8>>> = BTreeMap::new();
        let mut ranges_deleted: Vec<(Space, Vec<u8>, Vec<u8>)> = Vec::new();
        for operation in &batch.operations {
            match operation {
                Operation::Put { space, key, value } => {
                    overlay.insert((*space, key.clone()), Some(value.clone()));
                }
                Operation::Delete { space, key } => {
                    overlay.insert((*space, key.clone()), None);
                }
                Operation::DeleteRange { space, from, to } => {
                    for ((overlay_space, key), value) in overlay.iter_mut() {
                        if overlay_space == space && key >= from && key < to {
                            *value = None;
                        }
                    }
                    ranges_deleted.push((*space, from.clone(), to.clone()));
                }
                Operation::MergeBitmap { key, operand } => {
                    let existing = match overlay.get(&(Space::Bitmaps, key.clone())) {
                        Some(value) => value.clone(),
                        None if ranges_deleted.iter().any(|(space, from, to)| {
                            *space == Space::Bitmaps && key >= from && key < to
                        }) =>
                        {
                            None
                        }
                        None => spaces
                            .get(&Space::Bitmaps)
                            .and_then(|map| map.get(key).cloned()),
                    };
                    let merged = bitmap::full_merge(key, existing.as_deref(), [operand.as_slice()])
                        .ok_or_else(|| crate::Error::Engine {
                            detail: format!("bitmap merge failed for key {key:02x?}"),
                        })?;
                    overlay.insert((Space::Bitmaps, key.clone()), Some(merged));
                }
            }
        }
        for operation in batch.operations {
            match operation {
                Operation::Put { space, key, value } => {
                    spaces.entry(space).or_default().insert(key, value);
                }
                Operation::Delete { space, key } => {
                    spaces.entry(space).or_default().remove(&key);
                }
                Operation::DeleteRange { space, from, to } => {
                    let map = spaces.entry(space).or_default();
                    let doomed: Vec<Vec<u8>> =
                        map.range(from..to).map(|(key, _)| key.clone()).collect();
                    for key in doomed {
                        map.remove(&key);
                    }
                }
                Operation::MergeBitmap { key, .. } => {
                    // Checked above: the overlay holds the merged value.
                    if let Some(Some(merged)) = overlay.remove(&(Space::Bitmaps, key.clone())) {
                        spaces
                            .entry(Space::Bitmaps)
                            .or_default()
                            .insert(key, merged);
                    }
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn approximate_bytes(&self, space: Space) -> Result<u64> {
        Ok(self
            .spaces
            .read()
            .get(&space)
            .map(|map| {
                map.iter()
                    .map(|(key, value)| (key.len() + value.len()) as u64)
                    .sum()
            })
            .unwrap_or(0))
    }
}
