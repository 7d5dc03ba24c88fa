//! Volumes on top of an [`Engine`]: catalog, block IO through layer views, pointer
//! snapshots and change bitmaps.
//!
//! Locking, in the only order it is ever taken: the catalog mutex (administrative
//! operations), then a volume's block stripes (a write's blocks, so read-modify-write of
//! a partial block cannot lose a neighbour's write), then the volume's view lock (shared
//! by reads and writes, exclusive for a snapshot, which so waits for in-flight writes and
//! holds new ones for its instant).

mod bits;
mod changes;
mod counts;
mod digest;
pub mod lineage;
pub use changes::VolumeChanges;

use crate::bitmap::{self, BitmapKind};
use crate::engine::{Batch, Durability, Engine, Space};
use crate::layout::{self, LayerReference, ReferenceKind, VIEW_REFERENCES_MAX};
use crate::nbd_hosts::HostConnections;
use crate::track::{self, BlockAddress, BlockContent, BLOCK_BYTES};
use crate::{Error, Result};
use parking_lot::{Mutex, RwLock};
use protocol::messages::{Extent, Readiness, VolumeInfo, VOLUME_NAME_BYTES_MAX};
pub use protocol::session::TrackImage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Host IO is aligned to sectors, as block devices are.
pub const SECTOR_BYTES: u64 = 512;
pub use protocol::messages::{TRACK_BYTES_MAX, TRACK_BYTES_MIN, VOLUME_BYTES_MAX};
pub const TRACK_BYTES_DEFAULT: u32 = 64 << 10;
/// Write locks per volume; a write holds the stripes of the regions it touches.
const WRITE_STRIPES: usize = 256;
/// Blocks per striped region (64 KiB): a 1 MiB write takes 16 stripes, not all of them,
/// so large writes to different places of one volume run side by side.
const STRIPE_REGION_BLOCKS: u64 = 16;
/// Blocks per engine batch when zeroing a large range, to keep batches bounded.
const ZERO_BATCH_BLOCKS_MAX: u64 = 16 << 10;
/// Generations are reserved in durable steps of this size, so they grow across restarts
/// without a synced write per block.
const GENERATION_RESERVATION: u64 = 1 << 20;

const KEY_NEXT_VOLUME: &[u8] = b"c/next-volume";
const KEY_NEXT_LAYER: &[u8] = b"c/next-layer";
const KEY_GENERATION: &[u8] = b"c/generation";

fn volume_key(id: u64) -> Vec<u8> {
    let mut key = b"v/".to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The key under which a snap target records its source: the volume ids of the pair, so
/// that a later snap of the same source may refresh it without `--overwrite`. Ids are never
/// reused, so a source deleted and created again is another volume.
fn snapshot_origin_key(target: u64) -> Vec<u8> {
    let mut key = SNAPSHOT_ORIGIN_KEY_PREFIX.to_vec();
    key.extend_from_slice(&target.to_be_bytes());
    key
}

const SNAPSHOT_ORIGIN_KEY_PREFIX: &[u8] = b"o/";
const SNAPSHOT_ORIGIN_KEY_END: &[u8] = b"o0";

fn name_key(name: &str) -> Vec<u8> {
    let mut key = b"n/".to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// The engine key of a stored block: layer, then block number, big-endian so a layer's
/// blocks sort together and a layer can be deleted as one range.
pub fn block_key(layer: u64, block: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&layer.to_be_bytes());
    key.extend_from_slice(&block.to_be_bytes());
    key
}

/// The durable descriptor of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeRecord {
    id: u64,
    name: String,
    size_bytes: u64,
    track_size_bytes: u32,
    readiness: Readiness,
    view: Vec<LayerReference>,
    /// Bit `n` set: session slot `n` is allocated.
    session_slots: u16,
    /// Which bits a host write marks on the tracks it touches.
    marks: WriteMarks,
    created_unix_seconds: u64,
}

/// The bits a host write marks, in the same batch as its data. Copy sessions choose them:
/// a mirror's slot is marked changed always and pending while the mirror is attached; a
/// clone's slots are not marked by writes at all (its driver moves their bits itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteMarks {
    /// Slots whose changed bit a write sets.
    pub changed: u16,
    /// Slots whose pending bit a write sets.
    pub pending: u16,
    /// Whether a write sets the target-changed bit (a split BCV, seed 002's M4b).
    pub target_changed: bool,
}

/// Selects one of a volume's change bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    /// A session slot's changed bits.
    Session(u8),
    /// A session slot's pending bits.
    Pending(u8),
    /// The target-changed bits.
    TargetChanged,
    /// The invalid (indirect) bits.
    Invalid,
}

impl Bits {
    fn kind_and_mask(self) -> (BitmapKind, u16) {
        match self {
            Bits::Session(slot) => (BitmapKind::Sessions, 1 << slot),
            Bits::Pending(slot) => (BitmapKind::Pending, 1 << slot),
            Bits::TargetChanged => (BitmapKind::TargetChanged, 1),
            Bits::Invalid => (BitmapKind::Invalid, 1),
        }
    }

    fn slot(self) -> Option<u8> {
        match self {
            Bits::Session(slot) | Bits::Pending(slot) => Some(slot),
            Bits::TargetChanged | Bits::Invalid => None,
        }
    }
}

/// One bit of one track to set or clear, for [`VolumeStore::change_track_bits`].
#[derive(Clone, Copy)]
pub struct BitChange<'a> {
    pub volume: &'a Volume,
    pub bits: Bits,
    pub track: u64,
    pub set: bool,
}

/// The mutable part of a volume, behind its view lock.
struct VolumeState {
    view: Vec<LayerReference>,
    session_slots: u16,
    marks: WriteMarks,
}

/// A live volume. Handles stay valid while NBD connections use them; a deleted volume's
/// handle answers every IO with an error.
pub struct Volume {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub track_size_bytes: u32,
    created_unix_seconds: u64,
    readiness: AtomicU8,
    deleted: AtomicBool,
    state: RwLock<VolumeState>,
    stripes: [Mutex<()>; WRITE_STRIPES],
}

impl Volume {
    pub fn readiness(&self) -> Readiness {
        match self.readiness.load(Ordering::Acquire) {
            0 => Readiness::Ready,
            1 => Readiness::ReadOnly,
            _ => Readiness::NotReady,
        }
    }

    /// The layer this volume writes into now.
    pub fn top_layer(&self) -> u64 {
        layout::top_layer(&self.state.read().view)
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub fn track_count(&self) -> u64 {
        self.size_bytes / u64::from(self.track_size_bytes)
    }

    fn blocks_per_track(&self) -> u64 {
        u64::from(self.track_size_bytes) / BLOCK_BYTES as u64
    }

    pub fn info(&self) -> VolumeInfo {
        let state = self.state.read();
        VolumeInfo {
            name: self.name.clone(),
            id: self.id,
            size_bytes: self.size_bytes,
            track_size_bytes: self.track_size_bytes,
            track_count: self.track_count(),
            readiness: self.readiness(),
            session_slots_used: state.session_slots.count_ones() as u8,
            layer_depth: state.view.len() as u32,
            created_unix_seconds: self.created_unix_seconds,
        }
    }

    fn record(&self, state: &VolumeState) -> VolumeRecord {
        VolumeRecord {
            id: self.id,
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            track_size_bytes: self.track_size_bytes,
            readiness: self.readiness(),
            view: state.view.clone(),
            session_slots: state.session_slots,
            marks: state.marks,
            created_unix_seconds: self.created_unix_seconds,
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if self.is_deleted() {
            return Err(Error::VolumeDeleted { volume: self.id });
        }
        if !offset.is_multiple_of(SECTOR_BYTES) || !length.is_multiple_of(SECTOR_BYTES) {
            return Err(Error::Unaligned {
                volume: self.id,
                offset,
                length,
            });
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(Error::OutOfRange {
                volume: self.id,
                offset,
                length,
                size_bytes: self.size_bytes,
            });
        }
        Ok(())
    }

    fn check_extent(&self, extent: Extent) -> Result<()> {
        // Extents arrive from the network too, past `Extent::new`'s check.
        if extent.first > extent.last || extent.last >= self.track_count() {
            return Err(Error::ExtentOutOfRange {
                name: self.name.clone(),
                extent,
                last_track: self.track_count() - 1,
            });
        }
        Ok(())
    }

    pub fn whole(&self) -> Extent {
        Extent {
            first: 0,
            last: self.track_count() - 1,
        }
    }
}

fn readiness_code(readiness: Readiness) -> u8 {
    match readiness {
        Readiness::Ready => 0,
        Readiness::ReadOnly => 1,
        Readiness::NotReady => 2,
    }
}

/// Adds to `batch` the merge operands that set or clear one bitmap's `mask` bits over
/// `first_track..=last_track` of a volume.
fn add_bit_changes(
    batch: &mut Batch,
    volume: u64,
    kind: BitmapKind,
    mask: u16,
    first_track: u64,
    last_track: u64,
    set: bool,
) {
    for (chunk, change) in bitmap::changes_by_chunk(first_track, last_track, set, mask) {
        batch.merge_bitmap(
            bitmap::chunk_key(volume, kind, chunk).to_vec(),
            bitmap::encode_changes(&[change]),
        );
    }
}

/// Hands out monotonically growing generations, durable across restarts.
struct GenerationClock {
    next: AtomicU64,
    reserved_until: Mutex<u64>,
}

struct Catalog {
    by_name: HashMap<String, Arc<Volume>>,
    next_volume: u64,
    next_layer: u64,
    /// For each volume that is the target of a snap: the id of the volume it was snapped
    /// from last.
    snapshot_origins: HashMap<u64, u64>,
}

impl Catalog {
    fn find(&self, name: &str) -> Result<Arc<Volume>> {
        self.by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound {
                name: name.to_string(),
            })
    }
}

/// The volumes of one node.
pub struct VolumeStore<E: Engine> {
    engine: E,
    catalog: Mutex<Catalog>,
    generations: GenerationClock,
    /// The NBD connections hosts have open to these volumes.
    hosts: Arc<HostConnections>,
    /// How many bits each bitmap has set, re-counted only where batches changed them.
    counts: counts::BitCounts,
}

fn now_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

fn decode_u64(bytes: Option<Vec<u8>>, what: &str) -> Result<Option<u64>> {
    match bytes {
        None => Ok(None),
        Some(bytes) => {
            let array: [u8; 8] = bytes.as_slice().try_into().map_err(|_| Error::Metadata {
                what: what.to_string(),
                detail: format!("{} bytes instead of 8", bytes.len()),
            })?;
            Ok(Some(u64::from_be_bytes(array)))
        }
    }
}

/// Which volume each snap target was snapped from, as stored by [`VolumeStore::snap`].
fn load_snapshot_origins<E: Engine>(engine: &E) -> Result<HashMap<u64, u64>> {
    let mut origins = HashMap::new();
    let mut failure = None;
    engine.scan(
        Space::Meta,
        SNAPSHOT_ORIGIN_KEY_PREFIX,
        SNAPSHOT_ORIGIN_KEY_END,
        &mut |key, value| {
            let target = key
                .get(SNAPSHOT_ORIGIN_KEY_PREFIX.len()..)
                .and_then(|id| <[u8; 8]>::try_from(id).ok());
            let source = <[u8; 8]>::try_from(value).ok();
            match (target, source) {
                (Some(target), Some(source)) => {
                    origins.insert(u64::from_be_bytes(target), u64::from_be_bytes(source));
                    true
                }
                _ => {
                    failure = Some(Error::Metadata {
                        what: format!("snapshot origin key {key:02x?}"),
                        detail: format!("{} bytes of value instead of 8", value.len()),
                    });
                    false
                }
            }
        },
    )?;
    match failure {
        Some(error) => Err(error),
        None => Ok(origins),
    }
}

/// Checks a volume name: it becomes an NBD export name and appears in scripts.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| {
        Err(Error::VolumeNameInvalid {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > VOLUME_NAME_BYTES_MAX {
        return invalid(&format!("it is longer than {VOLUME_NAME_BYTES_MAX} bytes"));
    }
    let mut characters = name.chars();
    if !characters
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
    {
        return invalid("it must start with a letter or digit");
    }
    if !characters.all(|character| character.is_ascii_alphanumeric() || "._-".contains(character)) {
        return invalid("use only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn validate_geometry(name: &str, size_bytes: u64, track_size_bytes: u32) -> Result<()> {
    protocol::messages::check_geometry(size_bytes, track_size_bytes).map_err(|reason| {
        Error::VolumeSizeInvalid {
            name: name.to_string(),
            reason,
        }
    })
}

impl<E: Engine> VolumeStore<E> {
    /// Opens the store, loading every volume descriptor.
    pub fn open(engine: E) -> Result<VolumeStore<E>> {
        let mut records = Vec::new();
        let mut failure = None;
        engine.scan(Space::Meta, b"v/", b"v0", &mut |key, value| {
            match protocol::codec::decode::<VolumeRecord>(value) {
                Ok(record) => records.push(record),
                Err(error) => {
                    failure = Some(Error::Metadata {
                        what: format!("volume key {key:02x?}"),
                        detail: error.to_string(),
                    });
                    return false;
                }
            }
            true
        })?;
        if let Some(error) = failure {
            return Err(error);
        }
        let snapshot_origins = load_snapshot_origins(&engine)?;
        let next_volume =
            decode_u64(engine.get(Space::Meta, KEY_NEXT_VOLUME)?, "next volume id")?.unwrap_or(1);
        let next_layer =
            decode_u64(engine.get(Space::Meta, KEY_NEXT_LAYER)?, "next layer id")?.unwrap_or(1);
        let generation =
            decode_u64(engine.get(Space::Meta, KEY_GENERATION)?, "generation")?.unwrap_or(1);
        // Everything below the stored reservation may have been handed out before a
        // crash, so this run starts above it.
        let reserved_until = generation + GENERATION_RESERVATION;
        let mut batch = Batch::default();
        batch.put(
            Space::Meta,
            KEY_GENERATION,
            reserved_until.to_be_bytes().to_vec(),
        );
        engine.write(batch, Durability::Synced)?;

        let by_name = records
            .into_iter()
            .map(|record| {
                let volume = Arc::new(Volume {
                    id: record.id,
                    name: record.name.clone(),
                    size_bytes: record.size_bytes,
                    track_size_bytes: record.track_size_bytes,
                    created_unix_seconds: record.created_unix_seconds,
                    readiness: AtomicU8::new(readiness_code(record.readiness)),
                    deleted: AtomicBool::new(false),
                    state: RwLock::new(VolumeState {
                        view: record.view,
                        session_slots: record.session_slots,
                        marks: record.marks,
                    }),
                    stripes: std::array::from_fn(|_| Mutex::new(())),
                });
                (record.name, volume)
            })
            .collect();
        Ok(VolumeStore {
            engine,
            catalog: Mutex::new(Catalog {
                by_name,
                next_volume,
                next_layer,
                snapshot_origins,
            }),
            generations: GenerationClock {
                next: AtomicU64::new(generation),
                reserved_until: Mutex::new(reserved_until),
            },
            hosts: Arc::new(HostConnections::default()),
            counts: counts::BitCounts::default(),
        })
    }

    /// The NBD connections hosts have open to this node's volumes.
    pub fn hosts(&self) -> &Arc<HostConnections> {
        &self.hosts
    }

    /// Forgets which volume `volume` was snapped from: its data is being replaced by
    /// something else (a copy session), so a later snap onto it needs `--overwrite` again.
    pub fn forget_snapshot_origin(&self, volume: &Volume) -> Result<()> {
        let mut catalog = self.catalog.lock();
        if !catalog.snapshot_origins.contains_key(&volume.id) {
            return Ok(());
        }
        let mut batch = Batch::default();
        batch.delete(Space::Meta, snapshot_origin_key(volume.id));
        self.write_batch(batch, Durability::Synced)?;
        catalog.snapshot_origins.remove(&volume.id);
        Ok(())
    }

    /// Writes a batch, then marks the bitmap chunks it changed for the counts to
    /// re-count. Every batch of this store that may carry bitmap operands goes through
    /// here (the operands are made only in this module).
    fn write_batch(&self, batch: Batch, durability: Durability) -> Result<()> {
        let chunks = counts::BitCounts::chunks_of(&batch);
        let written = self.engine.write(batch, durability);
        self.counts.touched(&chunks);
        written
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    fn next_generation(&self) -> Result<u64> {
        let generation = self.generations.next.fetch_add(1, Ordering::Relaxed);
        let mut reserved_until = self.generations.reserved_until.lock();
        if generation >= *reserved_until {
            let new_reservation = generation + GENERATION_RESERVATION;
            let mut batch = Batch::default();
            batch.put(
                Space::Meta,
                KEY_GENERATION,
                new_reservation.to_be_bytes().to_vec(),
            );
            self.write_batch(batch, Durability::Synced)?;
            *reserved_until = new_reservation;
        }
        Ok(generation)
    }

    pub fn volume(&self, name: &str) -> Result<Arc<Volume>> {
        self.catalog.lock().find(name)
    }

    /// How many volumes the node holds.
    pub fn volume_count(&self) -> usize {
        self.catalog.lock().by_name.len()
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        let mut volumes: Vec<VolumeInfo> = self
            .catalog
            .lock()
            .by_name
            .values()
            .map(|volume| volume.info())
            .collect();
        volumes.sort_by(|left, right| left.name.cmp(&right.name));
        volumes
    }

    pub fn create(
        &self,
        name: &str,
        size_bytes: u64,
        track_size_bytes: u32,
    ) -> Result<Arc<Volume>> {
        validate_volume_name(name)?;
        validate_geometry(name, size_bytes, track_size_bytes)?;
        let mut catalog = self.catalog.lock();
        if catalog.by_name.contains_key(name) {
            return Err(Error::VolumeExists {
                name: name.to_string(),
            });
        }
        let id = catalog.next_volume;
        let top = catalog.next_layer;
        let volume = Arc::new(Volume {
            id,
            name: name.to_string(),
            size_bytes,
            track_size_bytes,
            created_unix_seconds: now_unix_seconds(),
            readiness: AtomicU8::new(readiness_code(Readiness::Ready)),
            deleted: AtomicBool::new(false),
            state: RwLock::new(VolumeState {
                view: layout::new_view(top, size_bytes / u64::from(track_size_bytes)),
                session_slots: 0,
                marks: WriteMarks::default(),
            }),
            stripes: std::array::from_fn(|_| Mutex::new(())),
        });
        let mut batch = Batch::default();
        self.put_record(&mut batch, &volume, &volume.state.read())?;
        batch.put(Space::Meta, name_key(name), id.to_be_bytes().to_vec());
        batch.put(
            Space::Meta,
            KEY_NEXT_VOLUME,
            (id + 1).to_be_bytes().to_vec(),
        );
        batch.put(
            Space::Meta,
            KEY_NEXT_LAYER,
            (top + 1).to_be_bytes().to_vec(),
        );
        self.write_batch(batch, Durability::Synced)?;
        catalog.next_volume = id + 1;
        catalog.next_layer = top + 1;
        catalog.by_name.insert(name.to_string(), volume.clone());
        tracing::info!(
            volume = id,
            name,
            size_bytes,
            track_size_bytes,
            "volume created"
        );
        Ok(volume)
    }

    fn put_record(&self, batch: &mut Batch, volume: &Volume, state: &VolumeState) -> Result<()> {
        batch.put(
            Space::Meta,
            volume_key(volume.id),
            protocol::codec::encode(&volume.record(state))?,
        );
        Ok(())
    }

    /// Layer reference counts over every volume but those named in `except`.
    fn counts_except(catalog: &Catalog, except: &[u64]) -> BTreeMap<u64, u64> {
        let states: Vec<_> = catalog
            .by_name
            .values()
            .filter(|volume| !except.contains(&volume.id))
            .map(|volume| volume.state.read().view.clone())
            .collect();
        layout::reference_counts(states.iter().map(Vec::as_slice))
    }

    /// Adds deletions for layers that the old views referenced and nothing references now.
    fn release_layers(
        batch: &mut Batch,
        others: &BTreeMap<u64, u64>,
        old: &[&[LayerReference]],
        new: &[&[LayerReference]],
    ) -> usize {
        let before = layout::reference_counts(old.iter().copied());
        let after = layout::reference_counts(new.iter().copied());
        let mut released = 0;
        for layer in before.keys() {
            if !after.contains_key(layer) && !others.contains_key(layer) {
                batch.delete_range(
                    Space::Blocks,
                    block_key(*layer, 0),
                    block_key(*layer + 1, 0),
                );
                released += 1;
            }
        }
        released
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let mut catalog = self.catalog.lock();
        let volume = catalog.find(name)?;
        let state = volume.state.write();
        let others = Self::counts_except(&catalog, &[volume.id]);
        let mut batch = Batch::default();
        let released = Self::release_layers(&mut batch, &others, &[state.view.as_slice()], &[]);
        batch.delete(Space::Meta, volume_key(volume.id));
        batch.delete(Space::Meta, name_key(name));
        batch.delete(Space::Meta, snapshot_origin_key(volume.id));
        let (from, to) = bitmap::volume_key_range(volume.id);
        batch.delete_range(Space::Bitmaps, from.to_vec(), to.to_vec());
        self.write_batch(batch, Durability::Synced)?;
        volume.deleted.store(true, Ordering::Release);
        self.counts.forget(volume.id);
        catalog.by_name.remove(name);
        catalog.snapshot_origins.remove(&volume.id);
        tracing::info!(
            volume = volume.id,
            name,
            released_layers = released,
            "volume deleted"
        );
        Ok(())
    }

    pub fn set_readiness(&self, name: &str, readiness: Readiness) -> Result<Arc<Volume>> {
        let catalog = self.catalog.lock();
        let volume = catalog.find(name)?;
        let state = volume.state.write();
        let previous = volume
            .readiness
            .swap(readiness_code(readiness), Ordering::AcqRel);
        let mut batch = Batch::default();
        self.put_record(&mut batch, &volume, &state)?;
        if let Err(error) = self.write_batch(batch, Durability::Synced) {
            volume.readiness.store(previous, Ordering::Release);
            return Err(error);
        }
        tracing::info!(volume = volume.id, name, %readiness, "readiness changed");
        drop(state);
        Ok(volume)
    }

    /// Takes a pointer snapshot of `source` into `target`, creating `target` with the
    /// source's geometry when it does not exist. Without extents the whole volume is
    /// snapped. Returns the target and whether it was created. An existing target's data
    /// is replaced whatever it holds (see [`VolumeStore::snap_guarded`]).
    pub fn snap(
        &self,
        source: &str,
        target: &str,
        extents: &[Extent],
    ) -> Result<(Arc<Volume>, bool)> {
        self.snap_guarded(source, target, extents, true)
    }

    /// [`VolumeStore::snap`], which without `overwrite` refuses an existing target that
    /// is not a snapshot of `source` (it would silently lose its data).
    pub fn snap_guarded(
        &self,
        source: &str,
        target: &str,
        extents: &[Extent],
        overwrite: bool,
    ) -> Result<(Arc<Volume>, bool)> {
        self.snap_mapped(source, target, extents, &[], overwrite, None)
    }

    /// [`VolumeStore::snap_guarded`] with the source's `extents` landing, in order, on the
    /// target's `target_extents` (empty: the same tracks), and a target made by the snap
    /// `target_size_bytes` large (default: the source's size). Each list must be in
    /// increasing track order without overlaps when the two differ.
    pub fn snap_mapped(
        &self,
        source: &str,
        target: &str,
        extents: &[Extent],
        target_extents: &[Extent],
        overwrite: bool,
        target_size_bytes: Option<u64>,
    ) -> Result<(Arc<Volume>, bool)> {
        self.snap_with_lineage(
            source,
            target,
            extents,
            target_extents,
            overwrite,
            target_size_bytes,
            None,
        )
    }

    /// [`VolumeStore::snap_mapped`] that also rotates the source's lineage `lineage` in
    /// the snap's own write, under the source's write lock (see [`lineage`]): the tracks
    /// written before the snap are in the frozen slot, those after it in the new live one.
    #[allow(clippy::too_many_arguments)]
    pub fn snap_with_lineage(
        &self,
        source: &str,
        target: &str,
        extents: &[Extent],
        target_extents: &[Extent],
        overwrite: bool,
        target_size_bytes: Option<u64>,
        lineage: Option<&str>,
    ) -> Result<(Arc<Volume>, bool)> {
        let refuse = |reason: String| Error::SnapRefused {
            source_name: source.to_string(),
            target: target.to_string(),
            reason,
        };
        if source == target {
            return Err(refuse("a volume cannot be snapped onto itself".to_string()));
        }
        validate_volume_name(target)?;
        let mut catalog = self.catalog.lock();
        let source_volume = catalog.find(source)?;
        let existing_target = catalog.by_name.get(target).cloned();
        if let Some(target_volume) = &existing_target {
            if target_volume.track_size_bytes != source_volume.track_size_bytes {
                return Err(refuse(format!(
                    "track sizes differ ({} and {} bytes)",
                    source_volume.track_size_bytes, target_volume.track_size_bytes
                )));
            }
            if extents.is_empty() && target_volume.size_bytes != source_volume.size_bytes {
                return Err(refuse(format!(
                    "sizes differ ({} and {} bytes); name extents to snap part of it",
                    source_volume.size_bytes, target_volume.size_bytes
                )));
            }
        }
        let mapped = !target_extents.is_empty() && target_extents != extents;
        let target_size_bytes = match &existing_target {
            Some(volume) => volume.size_bytes,
            None => target_size_bytes.unwrap_or(source_volume.size_bytes),
        };
        if existing_target.is_none()
            && extents.is_empty()
            && target_size_bytes != source_volume.size_bytes
        {
            return Err(refuse(format!(
                "sizes differ ({} and {target_size_bytes} bytes); name extents to snap part of it",
                source_volume.size_bytes
            )));
        }
        if existing_target.is_none() {
            protocol::messages::check_geometry(target_size_bytes, source_volume.track_size_bytes)
                .map_err(|detail| Error::VolumeSizeInvalid {
                name: target.to_string(),
                reason: detail,
            })?;
        }
        let target_track_count = target_size_bytes / u64::from(source_volume.track_size_bytes);
        let fits_target = |extent: &Extent| {
            if extent.first > extent.last || extent.last >= target_track_count {
                return Err(Error::ExtentOutOfRange {
                    name: target.to_string(),
                    extent: *extent,
                    last_track: target_track_count.saturating_sub(1),
                });
            }
            Ok(())
        };
        for extent in extents {
            source_volume.check_extent(*extent)?;
            if !mapped {
                fits_target(extent)?;
            }
        }
        if mapped {
            if extents.is_empty() {
                return Err(refuse(
                    "name the source's extents to land them on other tracks".to_string(),
                ));
            }
            for extent in target_extents {
                fits_target(extent)?;
            }
            for (what, list) in [("source's", extents), ("target's", target_extents)] {
                if list.windows(2).any(|pair| pair[1].first <= pair[0].last) {
                    return Err(refuse(format!(
                        "the {what} extents must be in increasing track order without overlaps"
                    )));
                }
            }
        }
        // Checked once the pair is known to fit: a snap onto an existing volume replaces
        // its data, which is what a refresh of the source's own snapshot is for, and a
        // mistake otherwise.
        if let Some(target_volume) = &existing_target {
            let origin = catalog.snapshot_origins.get(&target_volume.id).copied();
            if !overwrite && origin != Some(source_volume.id) {
                let origin_name = origin.and_then(|origin| {
                    catalog
                        .by_name
                        .values()
                        .find(|volume| volume.id == origin)
                        .map(|volume| volume.name.clone())
                });
                let what = match (origin, origin_name) {
                    (None, _) => "a volume of its own, not a snapshot".to_string(),
                    (Some(_), Some(name)) => format!("a snapshot of '{name}'"),
                    (Some(_), None) => "a snapshot of a volume deleted since".to_string(),
                };
                return Err(Error::SnapTargetExists {
                    source_name: source.to_string(),
                    target: target.to_string(),
                    what: format!("{what}, of {} bytes", target_volume.size_bytes),
                });
            }
        }
        let map = if mapped {
            layout::map_extents(extents, target_extents).ok_or_else(|| {
                refuse(
                    "the source's and the target's extents hold different numbers of tracks"
                        .to_string(),
                )
            })?
        } else if extents.is_empty() {
            layout::identity_map(&[source_volume.whole()])
        } else {
            layout::identity_map(&layout::normalize_extents(extents))
        };

        let started = Instant::now();
        let new_source_top = catalog.next_layer;
        let new_target_top = catalog.next_layer + 1;
        let next_layer = catalog.next_layer + 2;
        let (target_volume, created) = match existing_target {
            Some(volume) => (volume, false),
            None => {
                // A new target has no layers of its own: the snap below gives it its view.
                let volume = Arc::new(Volume {
                    id: catalog.next_volume,
                    name: target.to_string(),
                    size_bytes: target_size_bytes,
                    track_size_bytes: source_volume.track_size_bytes,
                    created_unix_seconds: now_unix_seconds(),
                    readiness: AtomicU8::new(readiness_code(Readiness::Ready)),
                    deleted: AtomicBool::new(false),
                    state: RwLock::new(VolumeState {
                        view: Vec::new(),
                        session_slots: 0,
                        marks: WriteMarks::default(),
                    }),
                    stripes: std::array::from_fn(|_| Mutex::new(())),
                });
                (volume, true)
            }
        };
        let others = Self::counts_except(&catalog, &[source_volume.id, target_volume.id]);
        // Both views change together; lock them in id order so two snaps cannot deadlock.
        let (mut source_state, mut target_state) = if source_volume.id < target_volume.id {
            let first = source_volume.state.write();
            (first, target_volume.state.write())
        } else {
            let first = target_volume.state.write();
            (source_volume.state.write(), first)
        };
        let (new_source_view, new_target_view) = layout::snap_views_mapped(
            &source_state.view,
            &target_state.view,
            &map,
            new_source_top,
            new_target_top,
            source_volume.track_count(),
            target_volume.track_count(),
        );
        for (volume, view) in [
            (&source_volume, &new_source_view),
            (&target_volume, &new_target_view),
        ] {
            if view.len() > VIEW_REFERENCES_MAX {
                return Err(Error::TooManyLayers {
                    name: volume.name.clone(),
                    references: view.len(),
                    references_max: VIEW_REFERENCES_MAX,
                });
            }
        }
        let mut batch = Batch::default();
        Self::release_layers(
            &mut batch,
            &others,
            &[source_state.view.as_slice(), target_state.view.as_slice()],
            &[new_source_view.as_slice(), new_target_view.as_slice()],
        );
        let old_source_view = std::mem::replace(&mut source_state.view, new_source_view);
        let old_target_view = std::mem::replace(&mut target_state.view, new_target_view);
        let (old_source_slots, old_source_marks) = (source_state.session_slots, source_state.marks);
        let restore = |source_state: &mut VolumeState, target_state: &mut VolumeState| {
            source_state.view = old_source_view.clone();
            target_state.view = old_target_view.clone();
            source_state.session_slots = old_source_slots;
            source_state.marks = old_source_marks;
        };
        if let Some(name) = lineage {
            if let Err(error) =
                self.rotate_lineage_in(&mut batch, &source_volume, &mut source_state, name)
            {
                restore(&mut source_state, &mut target_state);
                return Err(error);
            }
        }
        let encoded = self
            .put_record(&mut batch, &source_volume, &source_state)
            .and_then(|()| self.put_record(&mut batch, &target_volume, &target_state));
        if let Err(error) = encoded {
            restore(&mut source_state, &mut target_state);
            return Err(error);
        }
        if created {
            batch.put(
                Space::Meta,
                name_key(target),
                target_volume.id.to_be_bytes().to_vec(),
            );
            batch.put(
                Space::Meta,
                KEY_NEXT_VOLUME,
                (target_volume.id + 1).to_be_bytes().to_vec(),
            );
        }
        batch.put(
            Space::Meta,
            KEY_NEXT_LAYER,
            next_layer.to_be_bytes().to_vec(),
        );
        batch.put(
            Space::Meta,
            snapshot_origin_key(target_volume.id),
            source_volume.id.to_be_bytes().to_vec(),
        );
        if let Err(error) = self.write_batch(batch, Durability::Synced) {
            restore(&mut source_state, &mut target_state);
            return Err(error);
        }
        catalog.next_layer = next_layer;
        catalog
            .snapshot_origins
            .insert(target_volume.id, source_volume.id);
        if created {
            catalog.next_volume = target_volume.id + 1;
            catalog
                .by_name
                .insert(target.to_string(), target_volume.clone());
        }
        drop(source_state);
        drop(target_state);
        metrics::histogram!("tandem_snap_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            source,
            target,
            created,
            extents = extents.len(),
            mapped,
            "snapshot taken"
        );
        Ok((target_volume, created))
    }

    /// Reads `length` bytes at `offset`; every stored block is verified first.
    pub fn read(&self, volume: &Volume, offset: u64, length: u64) -> Result<Vec<u8>> {
        volume.check_range(offset, length)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let first_block = offset / BLOCK_BYTES as u64;
        let last_block = (offset + length - 1) / BLOCK_BYTES as u64;
        let state = volume.state.read();
        let blocks = self.read_blocks(volume, &state.view, first_block, last_block)?;
        drop(state);
        let start = (offset - first_block * BLOCK_BYTES as u64) as usize;
        if start == 0 && blocks.len() == length as usize {
            return Ok(blocks);
        }
        Ok(blocks[start..start + length as usize].to_vec())
    }

    /// Reads whole blocks `first..=last` through a view into one buffer.
    fn read_blocks(
        &self,
        volume: &Volume,
        view: &[LayerReference],
        first: u64,
        last: u64,
    ) -> Result<Vec<u8>> {
        let count = (last - first + 1) as usize;
        let mut buffer = vec![0u8; count * BLOCK_BYTES];
        let mut pending: Vec<u64> = (first..=last).collect();
        let blocks_per_track = volume.blocks_per_track();
        for reference in view {
            if pending.is_empty() {
                break;
            }
            let (covered, rest): (Vec<u64>, Vec<u64>) = pending
                .iter()
                .partition(|block| reference.covers(*block / blocks_per_track));
            if covered.is_empty() {
                continue;
            }
            let (layer, shift) = match reference.kind {
                // Zeros are already in the buffer; these blocks are settled.
                ReferenceKind::Zero => {
                    pending = rest;
                    continue;
                }
                ReferenceKind::Data { layer } => (layer, 0),
                ReferenceKind::DataShifted { layer, shift } => (layer, shift),
            };
            // The block of the layer this view block reads: whole tracks away.
            let layer_block =
                |block: u64| block.wrapping_add_signed(shift * blocks_per_track as i64);
            let keys: Vec<Vec<u8>> = covered
                .iter()
                .map(|block| block_key(layer, layer_block(*block)))
                .collect();
            let mut still_pending = rest;
            self.engine
                .multi_get(Space::Blocks, &keys, &mut |index, value| {
                    let block = covered[index];
                    let Some(stored) = value else {
                        still_pending.push(block);
                        return Ok(());
                    };
                    let address = BlockAddress {
                        layer,
                        track: layer_block(block) / blocks_per_track,
                        block_in_track: (block % blocks_per_track) as u32,
                    };
                    match track::verify(stored, address) {
                        Ok((_, BlockContent::Zero)) => Ok(()),
                        Ok((_, BlockContent::Data(data))) => {
                            let at = (block - first) as usize * BLOCK_BYTES;
                            buffer[at..at + BLOCK_BYTES].copy_from_slice(data);
                            Ok(())
                        }
                        Err(defect) => {
                            metrics::counter!("tandem_checksum_errors_total").increment(1);
                            tracing::error!(
                                volume = volume.id,
                                name = %volume.name,
                                layer,
                                track = address.track,
                                block = address.block_in_track,
                                %defect,
                                "stored block failed verification"
                            );
                            Err(Error::Corrupt {
                                volume: volume.id,
                                track: address.track,
                                detail: format!(
                                    "layer {layer} block {}: {defect}",
                                    address.block_in_track
                                ),
                            })
                        }
                    }
                })?;
            still_pending.sort_unstable();
            pending = still_pending;
        }
        Ok(buffer)
    }

    /// Writes `data` at `offset`, marking the written tracks in every allocated session
    /// slot (and the target-changed bits when tracked) in the same atomic batch.
    pub fn write(
        &self,
        volume: &Volume,
        offset: u64,
        data: &[u8],
        durability: Durability,
    ) -> Result<()> {
        self.write_or_zero(
            volume,
            offset,
            data.len() as u64,
            Some(data),
            durability,
            true,
        )
    }

    /// Writes `data` at `offset` as a copy session's data mover does: the bytes land, but
    /// no bits are marked, because a copy is not a host write (seed 002 marks a cascade's
    /// downstream sessions at the split instead).
    pub fn write_unmarked(
        &self,
        volume: &Volume,
        offset: u64,
        data: &[u8],
        durability: Durability,
    ) -> Result<()> {
        self.write_or_zero(
            volume,
            offset,
            data.len() as u64,
            Some(data),
            durability,
            false,
        )
    }

    /// Makes a range read as zeros (NBD WRITE_ZEROES and TRIM). Zeroed blocks take no
    /// space in a volume without snapshot layers below, and a small marker otherwise.
    pub fn write_zeroes(
        &self,
        volume: &Volume,
        offset: u64,
        length: u64,
        durability: Durability,
    ) -> Result<()> {
        volume.check_range(offset, length)?;
        // Large ranges go in bounded batches, each atomic on its own, as a host cannot
        // expect more of a zeroing that spans gigabytes.
        let step = ZERO_BATCH_BLOCKS_MAX * BLOCK_BYTES as u64;
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let next = ((at / step) + 1) * step;
            let chunk_end = next.min(end);
            let last = chunk_end >= end;
            let chunk_durability = if last { durability } else { Durability::Logged };
            self.write_or_zero(volume, at, chunk_end - at, None, chunk_durability, true)?;
            at = chunk_end;
        }
        Ok(())
    }

    fn write_or_zero(
        &self,
        volume: &Volume,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
        durability: Durability,
        marks_enabled: bool,
    ) -> Result<()> {
        self.write_with_bits(volume, offset, length, data, durability, marks_enabled, &[])
    }

    /// Writes (or zeroes) a range and applies `bit_changes` in the same atomic batch.
    #[allow(clippy::too_many_arguments)]
    fn write_with_bits(
        &self,
        volume: &Volume,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
        durability: Durability,
        marks_enabled: bool,
        bit_changes: &[BitChange<'_>],
    ) -> Result<()> {
        volume.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        // The bit changes are checked and encoded before the volume's locks are taken: they
        // may name this volume, whose view lock must not be taken twice.
        let mut bits_batch = Batch::default();
        Self::add_track_bit_changes(&mut bits_batch, bit_changes)?;
        let block_bytes = BLOCK_BYTES as u64;
        let first_block = offset / block_bytes;
        let last_block = (offset + length - 1) / block_bytes;

        let mut stripe_indexes: Vec<usize> = (first_block / STRIPE_REGION_BLOCKS
            ..=last_block / STRIPE_REGION_BLOCKS)
            .map(|region| (region % WRITE_STRIPES as u64) as usize)
            .collect();
        stripe_indexes.sort_unstable();
        stripe_indexes.dedup();
        let _stripes: Vec<_> = stripe_indexes
            .iter()
            .map(|index| volume.stripes[*index].lock())
            .collect();
        let state = volume.state.read();
        if volume.is_deleted() {
            return Err(Error::VolumeDeleted { volume: volume.id });
        }
        let top = layout::top_layer(&state.view);
        let only_layer = state.view.len() == 1;
        let blocks_per_track = volume.blocks_per_track();

        // Partial blocks at either end keep the bytes around the written range.
        let head_partial = !offset.is_multiple_of(block_bytes)
            || (first_block == last_block && !length.is_multiple_of(block_bytes));
        let tail_partial = !(offset + length).is_multiple_of(block_bytes);
        let mut head = None;
        let mut tail = None;
        if head_partial {
            head = Some(self.read_blocks(volume, &state.view, first_block, first_block)?);
        }
        if tail_partial && (last_block != first_block || !head_partial) {
            tail = Some(self.read_blocks(volume, &state.view, last_block, last_block)?);
        }

        let mut batch = Batch::default();
        let mut zero_block = None;
        // Zeroing whole blocks of a volume with nothing below its top layer is one range
        // deletion, however large the range: discards from mkfs or qemu-img cost O(1).
        let mut whole_blocks_deleted = None;
        if data.is_none() && only_layer {
            let first_whole = if head.is_some() {
                first_block + 1
            } else {
                first_block
            };
            let last_whole = if tail.is_some() || (head_partial && first_block == last_block) {
                last_block.saturating_sub(1)
            } else {
                last_block
            };
            if first_whole <= last_whole && last_whole <= last_block {
                batch.delete_range(
                    Space::Blocks,
                    block_key(top, first_whole),
                    block_key(top, last_whole + 1),
                );
                whole_blocks_deleted = Some((first_whole, last_whole));
            }
        }
        for block in first_block..=last_block {
            if whole_blocks_deleted.is_some_and(|(first, last)| first <= block && block <= last) {
                continue;
            }
            let block_start = block * block_bytes;
            let mut content: Option<Vec<u8>> = if block == first_block && head.is_some() {
                head.take()
            } else if block == last_block && tail.is_some() {
                tail.take()
            } else {
                None
            };
            let copy_from = block_start.max(offset);
            let copy_to = (block_start + block_bytes).min(offset + length);
            let full_block_value: Option<&[u8]> = match (&mut content, data) {
                (Some(existing), Some(data)) => {
                    existing[(copy_from - block_start) as usize..(copy_to - block_start) as usize]
                        .copy_from_slice(
                            &data[(copy_from - offset) as usize..(copy_to - offset) as usize],
                        );
                    None
                }
                (Some(existing), None) => {
                    existing[(copy_from - block_start) as usize..(copy_to - block_start) as usize]
                        .fill(0);
                    None
                }
                (None, Some(data)) => {
                    Some(&data[(copy_from - offset) as usize..(copy_to - offset) as usize])
                }
                (None, None) => Some(
                    zero_block
                        .get_or_insert_with(|| vec![0u8; BLOCK_BYTES])
                        .as_slice(),
                ),
            };
            let block_data: &[u8] = match (&content, full_block_value) {
                (Some(existing), _) => existing,
                (None, Some(value)) => value,
                (None, None) => unreachable!("a block is either patched or written whole"),
            };
            let address = BlockAddress {
                layer: top,
                track: block / blocks_per_track,
                block_in_track: (block % blocks_per_track) as u32,
            };
            let key = block_key(top, block);
            if block_data.iter().all(|byte| *byte == 0) {
                // A zero block takes no space when nothing below could show through.
                if only_layer {
                    batch.delete(Space::Blocks, key);
                } else {
                    batch.put(
                        Space::Blocks,
                        key,
                        track::encode_zero(address, volume.id, self.next_generation()?),
                    );
                }
            } else {
                batch.put(
                    Space::Blocks,
                    key,
                    track::encode_data(address, volume.id, self.next_generation()?, block_data),
                );
            }
        }

        let first_track = first_block / blocks_per_track;
        let last_track = last_block / blocks_per_track;
        if marks_enabled {
            Self::add_write_marks(&mut batch, volume.id, state.marks, first_track, last_track);
        }
        batch.operations.append(&mut bits_batch.operations);
        self.write_batch(batch, durability)?;
        Ok(())
    }

    fn add_write_marks(
        batch: &mut Batch,
        volume: u64,
        marks: WriteMarks,
        first_track: u64,
        last_track: u64,
    ) {
        if marks.changed != 0 {
            add_bit_changes(
                batch,
                volume,
                BitmapKind::Sessions,
                marks.changed,
                first_track,
                last_track,
                true,
            );
        }
        if marks.pending != 0 {
            add_bit_changes(
                batch,
                volume,
                BitmapKind::Pending,
                marks.pending,
                first_track,
                last_track,
                true,
            );
        }
        if marks.target_changed {
            add_bit_changes(
                batch,
                volume,
                BitmapKind::TargetChanged,
                1,
                first_track,
                last_track,
                true,
            );
        }
    }

    /// Reads one whole track for a copy: its bytes and, per 4 KiB block, the data checksum
    /// the block was verified against, which travels with it to the target.
    pub fn read_track_image(&self, volume: &Volume, track: u64) -> Result<TrackImage> {
        let track_bytes = u64::from(volume.track_size_bytes);
        let data = self.read(volume, track * track_bytes, track_bytes)?;
        let checksums = data.chunks(BLOCK_BYTES).map(crc32c::crc32c).collect();
        Ok(TrackImage {
            track,
            data,
            checksums,
        })
    }

    /// Stores a copied track at the same track of `volume`, as the target of a copy: every
    /// block's data must match the checksum that came with it (the target proves it stores
    /// what the source sent); the blocks are written with this volume's own address
    /// (seed 004 claim 2); host-write bits are not marked; `bit_changes` land in the same
    /// atomic batch, so a track is never stored without its bits or the reverse.
    pub fn write_track_image(
        &self,
        volume: &Volume,
        image: &TrackImage,
        bit_changes: &[BitChange<'_>],
        durability: Durability,
    ) -> Result<()> {
        let track_bytes = u64::from(volume.track_size_bytes);
        if image.data.len() as u64 != track_bytes
            || image.checksums.len() != image.data.len() / BLOCK_BYTES
        {
            return Err(Error::CopyRejected {
                volume: volume.id,
                track: image.track,
                detail: format!(
                    "a track of {} bytes with {} checksums does not fit tracks of {track_bytes} bytes",
                    image.data.len(),
                    image.checksums.len()
                ),
            });
        }
        for (index, (block, expected)) in image
            .data
            .chunks(BLOCK_BYTES)
            .zip(&image.checksums)
            .enumerate()
        {
            let computed = crc32c::crc32c(block);
            if computed != *expected {
                metrics::counter!("tandem_copy_checksum_errors_total").increment(1);
                return Err(Error::CopyRejected {
                    volume: volume.id,
                    track: image.track,
                    detail: format!(
                        "block {index}: data checksum {computed:#010x} does not match the {expected:#010x} sent with it"
                    ),
                });
            }
        }
        // A test stores a copied track with one byte flipped, as a disk might, to show
        // that a gsnap's verification finds it (compiled in only for the tests).
        let corrupted = crate::failpoints::corrupt_copied_track(image.track).then(|| {
            let mut data = image.data.clone();
            data[0] ^= 0xff;
            data
        });
        self.write_with_bits(
            volume,
            image.track * track_bytes,
            track_bytes,
            Some(corrupted.as_deref().unwrap_or(&image.data)),
            durability,
            false,
            bit_changes,
        )
    }

    /// Makes every acknowledged write durable (NBD FLUSH).
    pub fn flush(&self) -> Result<()> {
        self.engine.sync()
    }
}
