//! Copy sessions on one node: clones (seeds 000/001) and mirrors (seed 002, seed 004's
//! rotation), driven around the volume store.
//!
//! The bits live in the store's bitmaps, next to the data, so a host write and the bits it
//! marks are one atomic batch (see `store.rs`). This module decides which bits a command
//! or a host access changes, moves tracks, and keeps the session records. The rules that
//! need no IO — which transitions are legal ([`protocol::session::next_state`]), what a
//! write to a clone source requires, progress and rate — are pure functions in [`core`].
//!
//! Bits of a session whose source is volume `SRC` in slot `s`:
//! - clone: `S(s)` is seed 001's clone PB list (the track is still to be copied); a
//!   precopy's second slot `p` holds `S(p)`, the precopy PB list (copied during precopy and
//!   not written since); the destination's invalid bits are its IND list.
//! - mirror: `S(s)` is seed 002's PB column (changed since the last split); `P(s)` its
//!   moving-mirror bits (still to be copied to the BCV); the BCV's target-changed bits are
//!   its M4b bits; the standard's invalid bits mark the tracks a restore has yet to bring
//!   back from the BCV.
//!
//! Locks, always in this order: the command gates of the volumes involved (one per volume,
//! see [`gates`]: commands exclusive on their session's volumes of this node; host IO
//! shared on its own volume and copy steps on their session's, so a command is atomic
//! with respect to both; taken together, in volume id order), then the track locks of
//! every volume a step may touch (taken together, sorted, so two steps never deadlock),
//! then the store's own locks. The session table's mutex is held only briefly and never
//! while waiting for another lock.

mod commands;
mod copier;
pub mod core;
mod gates;
pub mod governor;
mod observe;
mod record;
pub mod remote;
pub mod session_core;
pub mod suspend;
pub mod target;
pub mod workers;

use self::core::{Progress, RateLimit, RecentRate, SourceWriteStep};
use self::governor::{Governor, LatencyHistogram};
use self::remote::{Registration, TargetLink};
use self::target::{LocalTarget, RemoteTarget, StoreOptions, Target};
use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::{BitChange, Bits, Volume, VolumeStore};
use crate::{Error, Result};
use parking_lot::{Mutex, MutexGuard};
use protocol::messages::{Extent, Readiness};
use protocol::session::{
    next_state, MirrorMode, PastError, RemoteVolume, SessionCommand, SessionId, SessionInfo,
    SessionKind, SessionState, TargetOperation, Transition, CLONE_EXTENTS_MAX,
    TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Track lock stripes: enough that unrelated tracks rarely share one.
const TRACK_LOCK_STRIPES: usize = 65_536;
/// Tracks one copy step moves before it lets commands and other sessions in.
pub const COPY_STEP_TRACKS_MAX: usize = 16;
/// Tracks one step sends to a remote target at once, on parallel streams: 4 MiB of
/// 64 KiB tracks in flight.
pub const REMOTE_STEP_TRACKS_MAX: usize = 64;
/// A rate-limited copy takes at least this many steps a second, so each is short.
const COPY_STEPS_PER_SECOND_MIN: u64 = 50;
/// Copier threads of a node: while one waits for a remote target's acknowledgements, the
/// other reads the next tracks.
pub const COPIER_THREADS: usize = 2;
/// How often a command looks again for the volumes it must hold, should they change while
/// it waits for their gates; the last round goes ahead with what it holds, which the
/// command's own checks then judge.
const COMMAND_GATE_ROUNDS_MAX: usize = 4;
/// How often a running copy writes its progress checkpoint.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

const SESSION_KEY_PREFIX: &[u8] = b"s/";
const SESSION_KEY_END: &[u8] = b"s0";

fn session_key(id: SessionId) -> Vec<u8> {
    let mut key = SESSION_KEY_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn now_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// The durable descriptor of a session (seed 001: "source, target, extents, time stamp,
/// operation, status"), stored with the volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: SessionId,
    pub kind: SessionKind,
    pub source: String,
    pub target: String,
    pub state: SessionState,
    pub mode: MirrorMode,
    pub slot: u8,
    pub precopy_slot: Option<u8>,
    pub extents: Vec<Extent>,
    pub created_unix_seconds: u64,
    pub split_sequence: u64,
    /// Set by rotate: split again as soon as the reestablish has synchronized.
    pub split_when_synchronized: bool,
    /// The current copy's total, stored (synced) before any of its bits is cleared, and
    /// the highest percent reported; the bits say what remains.
    pub progress: Progress,
    pub tracks_copied_last: u64,
    pub rate_limit_mebibytes_per_second: Option<u32>,
    /// The copy's current problem; cleared when it makes progress again.
    pub error: Option<String>,
    /// Where the target lives when it is on another node.
    pub remote: Option<RemoteVolume>,
    /// The last error the copy met, with its time, kept after it recovered.
    pub last_error: Option<PastError>,
    /// Sync mirrors: a host write fails when the BCV does not answer, rather than the
    /// session being suspended.
    pub strict: bool,
    /// How long the remote target may take to answer before the session is suspended.
    pub target_timeout_milliseconds: u64,
    /// A suspended session's state when it was suspended, which it resumes from.
    pub resume_state: Option<SessionState>,
}

impl SessionRecord {
    fn describe(&self) -> String {
        format!("{} {} -> {}", self.kind, self.source, self.target)
    }

    fn in_extents(&self, track: u64) -> bool {
        // The extents are normalized (increasing, apart): the first that does not end
        // before the track is the only one that may hold it.
        let index = self.extents.partition_point(|extent| extent.last < track);
        self.extents
            .get(index)
            .is_some_and(|extent| extent.contains(track))
    }

    /// The state whose rules a host write follows: a suspended session keeps those of
    /// the state it was suspended in (its copy stops, its bits go on being kept).
    fn acting_state(&self) -> SessionState {
        match (self.state, self.resume_state) {
            (SessionState::Suspended, Some(state)) => state,
            (state, _) => state,
        }
    }

    /// Whether the copier has work in this state.
    fn copies(&self) -> bool {
        session_core::copies(self)
    }
}

/// A session and what only this process needs of it.
struct Live {
    record: SessionRecord,
    cursor: u64,
    /// Tracks copy steps are moving right now, so that two copier threads never move the
    /// same track.
    in_flight: std::collections::BTreeSet<u64>,
    limit: RateLimit,
    /// Tracks moved over the last seconds, for the reported rate.
    rate: RecentRate,
    last_checkpoint: Instant,
    lag_since: Option<Instant>,
}

/// What `list` and `show` need of a session, taken under the table's mutex.
struct Glance {
    record: SessionRecord,
    tracks_per_second: f64,
    lag_since: Option<Instant>,
}

struct Table {
    sessions: BTreeMap<SessionId, Live>,
    next_id: SessionId,
}

impl Table {
    fn find_by_target(&self, kind: SessionKind, target: &str) -> Option<&Live> {
        self.sessions
            .values()
            .find(|live| live.record.kind == kind && live.record.target == target)
    }
}

struct TrackLocks {
    stripes: Vec<Mutex<()>>,
}

impl TrackLocks {
    fn stripe(volume: u64, track: u64) -> usize {
        let mixed = volume
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(track)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (mixed >> 32) as usize % TRACK_LOCK_STRIPES
    }

    /// Locks every (volume, track) pair given, in stripe order.
    fn lock(&self, pairs: impl IntoIterator<Item = (u64, u64)>) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = pairs
            .into_iter()
            .map(|(volume, track)| Self::stripe(volume, track))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|stripe| self.stripes[stripe].lock())
            .collect()
    }
}

/// The tracks one copy step took; they are free again when it ends, however it ends.
struct Reservation<'a, E: Engine> {
    sessions: &'a Sessions<E>,
    id: SessionId,
    tracks: &'a [u64],
}

impl<E: Engine> Drop for Reservation<'_, E> {
    fn drop(&mut self) {
        if let Some(live) = self.sessions.table.lock().sessions.get_mut(&self.id) {
            for track in self.tracks {
                live.in_flight.remove(track);
            }
        }
    }
}

/// What one copy step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepOutcome {
    pub tracks_copied: u64,
    pub bytes_copied: u64,
    /// The session has nothing left to copy now.
    pub idle: bool,
    /// How long to wait before the next step, for the rate limit.
    pub wait: Duration,
}

/// The copy sessions of one node.
pub struct Sessions<E: Engine> {
    store: Arc<VolumeStore<E>>,
    gates: gates::Gates,
    table: Mutex<Table>,
    locks: TrackLocks,
    epoch: Instant,
    node_limit: Mutex<RateLimit>,
    /// How this node reaches the nodes holding its sessions' remote targets.
    link: Option<Arc<dyn TargetLink>>,
    /// Volumes of this node that are targets of sessions other nodes run.
    registrations: Mutex<BTreeMap<String, Registration>>,
    /// Host write latencies of the current governor window.
    host_latency: LatencyHistogram,
    /// The default QoS: the rate of copies without their own limit.
    governor: Mutex<Governor>,
    /// Sessions whose owed release the command that ended them is delivering.
    in_hand: Mutex<std::collections::BTreeSet<SessionId>>,
}

fn refused(command: &SessionCommand, session: &str, reason: impl Into<String>) -> Error {
    Error::SessionRefused {
        command: command.name().to_string(),
        session: session.to_string(),
        reason: reason.into(),
    }
}

/// The kind of session a command is for (a rate change names its session by target and
/// is looked up among both kinds).
fn command_kind(command: &SessionCommand) -> SessionKind {
    match command {
        SessionCommand::CloneCreate { .. }
        | SessionCommand::ClonePrecopy { .. }
        | SessionCommand::CloneActivate { .. }
        | SessionCommand::CloneTerminate { .. }
        | SessionCommand::CloneCancel { .. } => SessionKind::Clone,
        _ => SessionKind::Mirror,
    }
}

/// A host write to a suspended clone's source that would have to send the point-in-time
/// image (or re-queue a precopied track) to a destination that does not answer: it fails
/// at once rather than wait for the destination on every write.
fn suspended_clone_write(record: &SessionRecord, track: u64) -> Error {
    Error::SessionRefused {
        command: "host write".to_string(),
        session: record.describe(),
        reason: format!(
            "track {track} must reach the clone's destination first, whose node does not answer (the clone is suspended); retry once it answers"
        ),
    }
}

/// Refuses a mirror's options that cannot work together, before anything changes.
fn check_mirror_options(
    command: &SessionCommand,
    session: &str,
    mode: MirrorMode,
    strict: bool,
    target_timeout_milliseconds: u64,
) -> Result<()> {
    use protocol::session::{TARGET_TIMEOUT_MILLISECONDS_MAX, TARGET_TIMEOUT_MILLISECONDS_MIN};
    if strict && mode != MirrorMode::Sync {
        return Err(refused(
            command,
            session,
            "--strict applies to sync mirrors only (an async mirror never makes a host write wait for its BCV): drop --strict or use --mode sync",
        ));
    }
    if !(TARGET_TIMEOUT_MILLISECONDS_MIN..=TARGET_TIMEOUT_MILLISECONDS_MAX)
        .contains(&target_timeout_milliseconds)
    {
        return Err(refused(
            command,
            session,
            format!(
                "a target timeout of {target_timeout_milliseconds} ms is outside {TARGET_TIMEOUT_MILLISECONDS_MIN} ms to {TARGET_TIMEOUT_MILLISECONDS_MAX} ms: give one within, for example 2s"
            ),
        ));
    }
    Ok(())
}

fn mebibytes(rate: u32) -> u64 {
    u64::from(rate) << 20
}

impl<E: Engine> Sessions<E> {
    /// Loads the sessions stored with the volumes; copies resume from their bits.
    pub fn open(
        store: Arc<VolumeStore<E>>,
        node_rate_mebibytes_per_second: u32,
        link: Option<Arc<dyn TargetLink>>,
    ) -> Result<Self> {
        let mut records = Vec::new();
        let mut failure = None;
        store.engine().scan(
            Space::Meta,
            SESSION_KEY_PREFIX,
            SESSION_KEY_END,
            &mut |key, value| {
                match record::decode(value) {
                    Ok(record) => records.push(record),
                    Err(error) => {
                        failure = Some(Error::Metadata {
                            what: format!("session key {key:02x?}"),
                            detail: error.to_string(),
                        });
                        return false;
                    }
                }
                true
            },
        )?;
        if let Some(error) = failure {
            return Err(error);
        }
        // A record stored before totals were kept gets its total from the count it had
        // then and the bits now (a source that cannot be read now fails `show` itself).
        // A checkpointed error was the problem of the process that stopped: this one's
        // copier finds its own (`last_error` keeps the old one).
        let records: Vec<SessionRecord> = records
            .into_iter()
            .map(|(mut record, legacy_copied)| {
                if let Some(copied) = legacy_copied {
                    let remaining = Self::remaining(&store, &record).unwrap_or(0);
                    record.progress.tracks_total = copied + remaining;
                }
                // A suspended session keeps its reason until it resumes.
                if record.state != SessionState::Suspended {
                    record.error = None;
                }
                record
            })
            .collect();
        reconcile_slots(&store, &records)?;
        let registrations = remote::load_registrations(store.engine())?
            .into_iter()
            .map(|registration| (registration.volume.clone(), registration))
            .collect();
        let epoch = Instant::now();
        let next_id = records
            .iter()
            .map(|record| record.id + 1)
            .max()
            .unwrap_or(1);
        let governor = Governor::new(mebibytes(node_rate_mebibytes_per_second));
        let sessions = records
            .into_iter()
            .map(|record| (record.id, Self::live(record, epoch, governor.rate())))
            .collect();
        Ok(Sessions {
            store,
            gates: gates::Gates::default(),
            table: Mutex::new(Table { sessions, next_id }),
            locks: TrackLocks {
                stripes: (0..TRACK_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            },
            epoch,
            node_limit: Mutex::new(RateLimit::new(
                mebibytes(node_rate_mebibytes_per_second),
                Duration::ZERO,
            )),
            link,
            registrations: Mutex::new(registrations),
            host_latency: LatencyHistogram::default(),
            governor: Mutex::new(governor),
            in_hand: Mutex::new(std::collections::BTreeSet::new()),
        })
    }

    fn live(record: SessionRecord, epoch: Instant, governed_rate: u64) -> Live {
        let rate = record
            .rate_limit_mebibytes_per_second
            .map_or(governed_rate, mebibytes);
        Live {
            limit: RateLimit::new(rate, epoch.elapsed()),
            record,
            cursor: 0,
            in_flight: std::collections::BTreeSet::new(),
            rate: RecentRate::new(epoch.elapsed()),
            last_checkpoint: Instant::now(),
            lag_since: None,
        }
    }

    pub fn store(&self) -> &Arc<VolumeStore<E>> {
        &self.store
    }

    fn persist(&self, record: &SessionRecord) -> Result<()> {
        let mut batch = Batch::default();
        batch.put(Space::Meta, session_key(record.id), record::encode(record)?);
        self.store.engine().write(batch, Durability::Synced)
    }

    /// The sessions a volume takes part in, with the other side of each: the session's
    /// target when the volume is its source, the source (here) when it is its target.
    #[allow(clippy::type_complexity)]
    fn related(&self, volume: &Volume) -> Result<Vec<(SessionRecord, Box<dyn Target + '_>)>> {
        let records: Vec<SessionRecord> = self
            .table
            .lock()
            .sessions
            .values()
            .filter(|live| live.record.source == volume.name || live.record.target == volume.name)
            .map(|live| live.record.clone())
            .collect();
        records
            .into_iter()
            .map(|record| {
                let other = if record.source == volume.name {
                    self.target_of(&record)?
                } else {
                    self.local_target(self.store.volume(&record.source)?)
                };
                Ok((record, other))
            })
            .collect()
    }

    /// The session's target, here or on another node: the one place that tells them
    /// apart.
    fn target_of(&self, record: &SessionRecord) -> Result<Box<dyn Target + '_>> {
        Ok(match &record.remote {
            Some(remote) => Box::new(RemoteTarget {
                sessions: self,
                remote: remote.clone(),
                session: record.id,
                timeout: Duration::from_millis(record.target_timeout_milliseconds),
            }),
            None => self.local_target(self.store.volume(&record.target)?),
        })
    }

    fn local_target(&self, volume: Arc<Volume>) -> Box<dyn Target + '_> {
        Box::new(LocalTarget {
            sessions: self,
            volume,
        })
    }

    /// Whether an access to `volume` must first pull invalid tracks for this session.
    fn pulls_for(record: &SessionRecord, volume: &Volume) -> bool {
        session_core::access_pulls(record, record.source == volume.name)
    }

    fn tracks_of(volume: &Volume, offset: u64, length: u64) -> (u64, u64) {
        let track_bytes = u64::from(volume.track_size_bytes);
        let first = offset / track_bytes;
        let last = (offset + length.max(1) - 1) / track_bytes;
        (first, last.min(volume.track_count().saturating_sub(1)))
    }

    fn lock_tracks(
        &self,
        volume: &Volume,
        related: &[(SessionRecord, Box<dyn Target + '_>)],
        first: u64,
        last: u64,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut pairs = Vec::new();
        for track in first..=last {
            pairs.push((volume.id, track));
            // A remote target is locked by its own node when it stores the track.
            for other in related.iter().filter_map(|(_, other)| other.here()) {
                pairs.push((other.id, track));
            }
        }
        self.locks.lock(pairs)
    }

    /// Pulls the invalid tracks among `first..=last` of `volume` from `other` (copy on
    /// first access from a clone's source, and a restore's reads from the BCV). Track
    /// locks must be held.
    fn pull_invalid(
        &self,
        record: &SessionRecord,
        volume: &Volume,
        other: &dyn Target,
        first: u64,
        last: u64,
    ) -> Result<()> {
        for track in first..=last {
            if !self.store.test_bit(volume, Bits::Invalid, track)? {
                continue;
            }
            let mut changes = vec![BitChange {
                volume,
                bits: Bits::Invalid,
                track,
                set: false,
            }];
            // A clone's destination pulls from its source here: the track leaves the
            // clone's to-copy list in the same write.
            if let (SessionKind::Clone, Some(source)) = (record.kind, other.here()) {
                changes.push(BitChange {
                    volume: source,
                    bits: Bits::Session(record.slot),
                    track,
                    set: false,
                });
            }
            let image = other.read(track)?;
            self.store
                .write_track_image(volume, &image, &changes, Durability::Logged)?;
            metrics::counter!("tandem_copy_tracks_total").increment(1);
            metrics::counter!("tandem_copy_bytes_total").increment(image.data.len() as u64);
            self.count_copied(record.id, 1);
        }
        Ok(())
    }

    fn count_copied(&self, id: SessionId, tracks: u64) {
        let now = self.epoch.elapsed();
        if let Some(live) = self.table.lock().sessions.get_mut(&id) {
            live.record.tracks_copied_last += tracks;
            live.rate.record(tracks, now);
        }
    }

    /// Readiness checked under the gate: a command that takes a volume from its hosts
    /// holds the gate exclusively, so no host IO checked before it lands after it.
    fn check_ready(volume: &Volume, write: bool) -> Result<()> {
        let readiness = volume.readiness();
        if readiness == Readiness::NotReady || (write && readiness == Readiness::ReadOnly) {
            return Err(Error::VolumeNotReady {
                name: volume.name.clone(),
                readiness,
            });
        }
        Ok(())
    }

    /// A destination of a clone run by another node pulls the tracks of a host access it
    /// does not hold yet, before the access takes the gate and its track locks (see
    /// [`Sessions::pull_from_source`]). Its invalid bits only clear once it is ready, so
    /// what was pulled stays valid for the access.
    fn pull_for_remote_clone(&self, volume: &Volume, offset: u64, length: u64) -> Result<()> {
        if length == 0 || volume.readiness() == Readiness::NotReady {
            return Ok(());
        }
        let Some(registration) = self
            .registered(&volume.name)
            .filter(|registration| registration.kind == SessionKind::Clone)
        else {
            return Ok(());
        };
        let (first, last) = Self::tracks_of(volume, offset, length);
        self.pull_from_source(volume, &registration, first, last)
    }

    /// A host write took `latency` as its host saw it (the NBD driver measures from the
    /// request to its reply, queueing included): the default QoS watches these.
    pub fn record_host_write(&self, latency: Duration) {
        self.host_latency.record(latency);
    }

    /// A host read: pulls what the volume does not hold yet, then reads.
    pub fn read(&self, volume: &Arc<Volume>, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.pull_for_remote_clone(volume, offset, length)?;
        let _gate = self.gates.shared([volume.id]);
        Self::check_ready(volume, false)?;
        let related: Vec<_> = self
            .related(volume)?
            .into_iter()
            .filter(|(record, _)| Self::pulls_for(record, volume))
            .collect();
        if !related.is_empty() && length > 0 {
            let (first, last) = Self::tracks_of(volume, offset, length);
            let _tracks = self.lock_tracks(volume, &related, first, last);
            for (record, other) in &related {
                self.pull_invalid(record, volume, &**other, first, last)?;
            }
        }
        self.store.read(volume, offset, length)
    }

    /// A host write (`data`) or zeroing (`None`), with every rule of the sessions the
    /// volume takes part in applied around it.
    pub fn write(
        &self,
        volume: &Arc<Volume>,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
        durability: Durability,
    ) -> Result<()> {
        self.pull_for_remote_clone(volume, offset, length)?;
        let _gate = self.gates.shared([volume.id]);
        Self::check_ready(volume, true)?;
        let related = self.related(volume)?;
        let store_write = || match data {
            Some(data) => self.store.write(volume, offset, data, durability),
            None => self.store.write_zeroes(volume, offset, length, durability),
        };
        if related.is_empty() || length == 0 {
            return store_write();
        }
        let (first, last) = Self::tracks_of(volume, offset, length);
        let _tracks = self.lock_tracks(volume, &related, first, last);
        // The volume's own tracks must be valid before part of them is overwritten.
        for (record, other) in &related {
            if Self::pulls_for(record, volume) {
                self.pull_invalid(record, volume, &**other, first, last)?;
            }
        }
        // Clone sources: seed 001's rules for a write to a source track.
        for (record, target) in &related {
            if record.kind != SessionKind::Clone || record.source != volume.name {
                continue;
            }
            for track in first..=last {
                if !record.in_extents(track) {
                    continue;
                }
                let pending = self
                    .store
                    .test_bit(volume, Bits::Session(record.slot), track)?;
                let precopied = match record.precopy_slot {
                    Some(slot) => self.store.test_bit(volume, Bits::Session(slot), track)?,
                    None => false,
                };
                let step = core::clone_source_write(record.acting_state(), pending, precopied);
                if step != SourceWriteStep::Nothing && record.state == SessionState::Suspended {
                    return Err(suspended_clone_write(record, track));
                }
                match step {
                    SourceWriteStep::Nothing => {}
                    SourceWriteStep::Requeue => self.requeue(record, volume, &**target, track)?,
                    SourceWriteStep::CopyFirst
                        if crate::failpoints::deliberate_bug(
                            crate::failpoints::DeliberateBug::SkipCopyBeforeWrite,
                        ) => {}
                    SourceWriteStep::CopyFirst => {
                        if self.copy_clone_track(record, volume, &**target, track)? {
                            self.count_copied(record.id, 1);
                        }
                    }
                }
            }
        }
        store_write()?;
        // Synchronized sync mirrors: the BCV has the write before the host hears of it
        // (or the session is suspended; see `suspend.rs`).
        for (record, bcv) in &related {
            if record.source == volume.name && session_core::host_write_ships(record) {
                self.ship_host_write(record.id, volume, &**bcv, first, last, durability)?;
            }
        }
        Ok(())
    }

    /// Seed 001: a precopied track the host rewrites goes back on the clone list, and the
    /// destination no longer holds it. A destination on another node forgets the track
    /// first: a crash between the two leaves it invalid with the precopied image that
    /// still is the source's (the host write comes after both), which a pull then
    /// confirms.
    fn requeue(
        &self,
        record: &SessionRecord,
        source: &Volume,
        target: &dyn Target,
        track: u64,
    ) -> Result<()> {
        let precopy_slot = record.precopy_slot.expect("precopied implies a slot");
        let mut changes = crate::store::VolumeChanges::new();
        target.apply(
            &mut changes,
            TargetOperation::MarkInvalid {
                session: record.id,
                extents: vec![Extent::new(track, track).expect("a single track")],
            },
        )?;
        let track_extent = Extent::new(track, track).expect("a single track");
        changes.change_bits(source, Bits::Session(record.slot), track_extent, true)?;
        changes.change_bits(source, Bits::Session(precopy_slot), track_extent, false)?;
        self.store.commit_with(changes, Durability::Logged)
    }

    /// Copy before write: moves a clone's track to its destination unless a host has
    /// written it there since (then the destination's data is newer and only the lists
    /// are updated). Returns whether the track was stored. A host write waits for this:
    /// bounded by the session's target timeout.
    fn copy_clone_track(
        &self,
        record: &SessionRecord,
        source: &Volume,
        target: &dyn Target,
        track: u64,
    ) -> Result<bool> {
        let image = self.store.read_track_image(source, track)?;
        let bits = session_core::moved(record)
            .into_iter()
            .map(|(bits, set)| BitChange {
                volume: source,
                bits,
                track,
                set,
            })
            .collect();
        let options = StoreOptions {
            only_if_invalid: true,
            durability: Durability::Logged,
            target_synced: true,
            background: false,
            timeout: Some(self.target_timeout(record.id)),
        };
        target
            .store(vec![image], vec![bits], options)
            .pop()
            .expect("one answer per image")
    }

    /// One step of a session's background copy: up to [`COPY_STEP_TRACKS_MAX`] tracks
    /// (or [`REMOTE_STEP_TRACKS_MAX`] to another node), whatever the rate limits say; the
    /// outcome tells how long the limits want the caller to wait.
    pub fn copy_step(&self, id: SessionId) -> Result<StepOutcome> {
        let outcome = self.step(id, false);
        if let Err(error) = &outcome {
            self.suspend_after_step(id, error);
        }
        outcome
    }

    /// A copy step that first waits out the session's and the node's rate limits: when
    /// either is in debt it moves nothing and says how long to wait.
    fn paced_step(&self, id: SessionId) -> Result<StepOutcome> {
        self.step(id, true)
    }

    fn step(&self, id: SessionId, paced: bool) -> Result<StepOutcome> {
        let idle = StepOutcome {
            idle: true,
            ..StepOutcome::default()
        };
        let Some(record) = self.copying_record(id) else {
            return Ok(idle);
        };
        // The session's volumes here, then the session as it is under their gates: a
        // command may have changed it while this step waited.
        let source = self.store.volume(&record.source)?;
        let target = self.target_of(&record)?;
        let _gates = self
            .gates
            .shared(std::iter::once(source.id).chain(target.here().map(|target| target.id)));
        let (record, cursor) = match self.table.lock().sessions.get(&id) {
            Some(live) if live.record.copies() => (live.record.clone(), live.cursor),
            _ => return Ok(idle),
        };
        // Which bits list the work, and which way it moves.
        let Some((work_bits, direction)) = session_core::work(&record) else {
            return Ok(idle);
        };
        // A restore fetches track by track.
        let step_tracks_max = match direction {
            session_core::Direction::ToTarget => target.step_tracks_max(),
            session_core::Direction::FromTarget => COPY_STEP_TRACKS_MAX,
        };
        // A slow copy moves in small steps, evenly spread: a burst of a whole step's
        // tracks would hold the processor and the disk from host IO for its length.
        let rate = record
            .rate_limit_mebibytes_per_second
            .map_or_else(|| self.governor.lock().rate(), mebibytes)
            .min(self.node_limit.lock().bytes_per_second());
        // Unpaced steps (tests, settle) move as much as a step may.
        let step_tracks = if paced {
            usize::try_from(rate / COPY_STEPS_PER_SECOND_MIN / u64::from(source.track_size_bytes))
                .unwrap_or(usize::MAX)
                .clamp(1, step_tracks_max)
        } else {
            step_tracks_max
        };
        // Another copier thread may be moving the tracks after the cursor: this step takes
        // the next ones nobody has taken.
        let candidates = self
            .store
            .next_set(&source, work_bits, cursor, step_tracks * 2)?;
        let track_bytes = u64::from(source.track_size_bytes);
        let tracks: Vec<u64> = {
            let mut table = self.table.lock();
            let Some(live) = table.sessions.get_mut(&id) else {
                return Ok(StepOutcome {
                    idle: true,
                    ..StepOutcome::default()
                });
            };
            let now = self.epoch.elapsed();
            let mut node_limit = self.node_limit.lock();
            if paced {
                let wait = live.limit.wait(now).max(node_limit.wait(now));
                if !wait.is_zero() {
                    return Ok(StepOutcome {
                        wait,
                        ..StepOutcome::default()
                    });
                }
            }
            let tracks: Vec<u64> = candidates
                .into_iter()
                .filter(|track| !live.in_flight.contains(track))
                .take(step_tracks)
                .collect();
            live.in_flight.extend(tracks.iter().copied());
            if let Some(last) = tracks.last() {
                live.cursor = last + 1;
            }
            // The step's share is charged before it moves anything, so that a parallel
            // copier thread sees it; what it does not move comes back at the end.
            let charge = tracks.len() as u64 * track_bytes;
            live.limit.take(charge, now);
            node_limit.take(charge, now);
            tracks
        };
        let charge = tracks.len() as u64 * track_bytes;
        let _reservation = Reservation {
            sessions: self,
            id,
            tracks: &tracks,
        };
        let (tracks_copied, bytes_copied) = match direction {
            session_core::Direction::ToTarget => {
                self.send_step(&record, &source, &*target, work_bits, &tracks)?
            }
            session_core::Direction::FromTarget => {
                self.fetch_step(&record, &source, &*target, &tracks)?
            }
        };
        // A test kills the target's node here, this step acknowledged (`sleep` holds it).
        crate::failpoints::hit("node::copy::after-step")?;
        let mut outcome = StepOutcome {
            tracks_copied,
            bytes_copied,
            ..StepOutcome::default()
        };
        let now = self.epoch.elapsed();
        let mut table = self.table.lock();
        let Some(live) = table.sessions.get_mut(&id) else {
            return Ok(outcome);
        };
        live.record.tracks_copied_last += outcome.tracks_copied;
        live.rate.record(outcome.tracks_copied, now);
        if !tracks.is_empty() {
            // The copy moves again: a problem it had is past (`last_error` keeps it).
            live.record.error = None;
        }
        let others_in_flight = live
            .in_flight
            .iter()
            .any(|track| tracks.binary_search(track).is_err());
        if tracks.is_empty() && others_in_flight {
            // The rest is in flight on another copier thread, which finishes the pass.
            live.cursor = 0;
            outcome.idle = true;
        } else if tracks.is_empty() {
            live.cursor = 0;
            outcome.idle = true;
            live.lag_since = None;
            // The copy is done; the session moves to its resting state.
            let next = next_state(record.kind, live.record.state, Transition::CopyDone)
                .map_err(|reason| Error::SessionRefused {
                    command: "copy".to_string(),
                    session: record.describe(),
                    reason,
                })?
                .unwrap_or(live.record.state);
            if next != live.record.state {
                // The new state may have work of its own (an attached mirror ships the
                // writes made during its restore), so this step does not count as idle.
                outcome.idle = false;
                live.record.state = next;
                live.record.error = None;
                let record = live.record.clone();
                drop(table);
                tracing::info!(session = record.id, state = %record.state, "copy finished");
                self.persist(&record)?;
                return Ok(outcome);
            }
        } else if live.lag_since.is_none() {
            live.lag_since = Some(Instant::now());
        }
        let unused = charge.saturating_sub(outcome.bytes_copied);
        live.limit.give_back(unused);
        let session_wait = live.limit.wait(now);
        let checkpoint = (live.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL).then(|| {
            live.last_checkpoint = Instant::now();
            live.record.clone()
        });
        drop(table);
        let node_wait = {
            let mut node_limit = self.node_limit.lock();
            node_limit.give_back(unused);
            node_limit.wait(now)
        };
        outcome.wait = session_wait.max(node_wait);
        if let Some(record) = checkpoint {
            self.persist(&record)?;
        }
        Ok(outcome)
    }

    /// A restore's step: brings the standard's invalid tracks back from the BCV, one by
    /// one under the tracks' locks (a host access pulls the same way).
    fn fetch_step(
        &self,
        record: &SessionRecord,
        source: &Volume,
        target: &dyn Target,
        tracks: &[u64],
    ) -> Result<(u64, u64)> {
        let (mut copied, mut bytes) = (0, 0);
        for track in tracks {
            let mut pairs = vec![(source.id, *track)];
            pairs.extend(target.here().map(|target| (target.id, *track)));
            let _tracks = self.locks.lock(pairs);
            if !self.store.test_bit(source, Bits::Invalid, *track)? {
                continue;
            }
            let image = target.read(*track)?;
            let changes: Vec<BitChange<'_>> = session_core::moved(record)
                .into_iter()
                .map(|(bits, set)| BitChange {
                    volume: source,
                    bits,
                    track: *track,
                    set,
                })
                .collect();
            self.store
                .write_track_image(source, &image, &changes, Durability::Logged)?;
            metrics::counter!("tandem_copy_tracks_total").increment(1);
            metrics::counter!("tandem_copy_bytes_total").increment(image.data.len() as u64);
            copied += 1;
            bytes += image.data.len() as u64;
        }
        Ok((copied, bytes))
    }

    /// A copy step towards the target: the step's tracks go out together (on parallel
    /// streams to another node), and a track's bits change only once the target stored
    /// it (also when another track of the step failed). Returns the tracks and bytes
    /// stored there.
    ///
    /// When the session's rules say so ([`session_core::send`]) or the target is here, the
    /// source's track locks are held until the target answered. Otherwise the copier is
    /// the target's only writer: the tracks are read under their locks, sent without
    /// them, and a bit is cleared only if the track still holds what was sent; a host
    /// write in between leaves it pending for the next pass.
    fn send_step(
        &self,
        record: &SessionRecord,
        source: &Volume,
        target: &dyn Target,
        work_bits: Bits,
        tracks: &[u64],
    ) -> Result<(u64, u64)> {
        let send = session_core::send(record);
        let hold = send.holds_track_locks || target.here().is_some();
        let lock_pairs = |tracks: &mut dyn Iterator<Item = u64>| {
            let mut pairs = Vec::new();
            for track in tracks {
                pairs.push((source.id, track));
                pairs.extend(target.here().map(|target| (target.id, track)));
            }
            pairs
        };
        let mut tracks_guard = Some(self.locks.lock(lock_pairs(&mut tracks.iter().copied())));
        let mut images = Vec::new();
        for track in tracks {
            if self.store.test_bit(source, work_bits, *track)?
                && !session_core::skips(record, self.store.test_bit(source, Bits::Invalid, *track)?)
            {
                images.push(self.store.read_track_image(source, *track)?);
            }
        }
        if !hold {
            tracks_guard = None;
        }
        let sent: Vec<(u64, Vec<u8>)> = images
            .iter()
            .map(|image| {
                (
                    image.track,
                    if hold { Vec::new() } else { image.data.clone() },
                )
            })
            .collect();
        let moved = session_core::moved(record);
        let bits_of = |track: u64| -> Vec<BitChange<'_>> {
            moved
                .iter()
                .map(|(bits, set)| BitChange {
                    volume: source,
                    bits: *bits,
                    track,
                    set: *set,
                })
                .collect()
        };
        // Held bits change with the store; otherwise they wait for the check below.
        let source_bits = sent
            .iter()
            .map(|(track, _)| if hold { bits_of(*track) } else { Vec::new() })
            .collect();
        let options = StoreOptions {
            only_if_invalid: send.only_if_invalid,
            durability: Durability::Logged,
            target_synced: true,
            background: true,
            // Host writes wait on held track locks: the round trip is bounded by the
            // session's target timeout then. A background copy gets the link's own bound.
            timeout: hold.then(|| self.target_timeout(record.id)),
        };
        let answers = target.store(images, source_bits, options);
        if tracks_guard.is_none() {
            tracks_guard = Some(
                self.locks
                    .lock(lock_pairs(&mut sent.iter().map(|(track, _)| *track))),
            );
        }
        let track_bytes = u64::from(source.track_size_bytes);
        let mut unheld_changes = Vec::new();
        let mut failure = None;
        let (mut copied, mut bytes) = (0, 0);
        for ((track, data), answer) in sent.iter().zip(answers) {
            let stored = match answer {
                Ok(stored) => stored,
                Err(error) => {
                    failure.get_or_insert(error);
                    if crate::failpoints::deliberate_bug(
                        crate::failpoints::DeliberateBug::ClearBitBeforeAcknowledged,
                    ) {
                        // The deliberate bug: the track counts as copied though the
                        // target never acknowledged it, so no later pass sends it.
                        unheld_changes.extend(bits_of(*track));
                    }
                    continue;
                }
            };
            if stored {
                copied += 1;
                bytes += track_bytes;
            }
            if !hold && self.store.read(source, track * track_bytes, track_bytes)? == *data {
                unheld_changes.extend(bits_of(*track));
            }
        }
        self.store
            .change_track_bits(&unheld_changes, Durability::Logged)?;
        drop(tracks_guard);
        match failure {
            Some(error) => {
                // The acknowledged tracks count; the rest stay marked for the next try.
                self.count_copied(record.id, copied);
                Err(error)
            }
            None => Ok((copied, bytes)),
        }
    }

    /// The gates of session `id`'s volumes on this node, exclusive: for the changes of
    /// state the copier makes by itself (suspend, resume) with host IO held off.
    fn session_gates(&self, id: SessionId) -> gates::Held {
        let names: Vec<String> = self
            .table
            .lock()
            .sessions
            .get(&id)
            .map(|live| vec![live.record.source.clone(), live.record.target.clone()])
            .unwrap_or_default();
        let local = names
            .iter()
            .filter_map(|name| self.store.volume(name).ok())
            .map(|volume| volume.id);
        self.gates.exclusive(local.collect::<Vec<_>>())
    }

    /// The record of session `id` if its state has copy work.
    fn copying_record(&self, id: SessionId) -> Option<SessionRecord> {
        self.table
            .lock()
            .sessions
            .get(&id)
            .filter(|live| live.record.copies())
            .map(|live| live.record.clone())
    }

    fn record_error(&self, id: SessionId, error: String) {
        if let Some(live) = self.table.lock().sessions.get_mut(&id) {
            live.record.last_error = Some(PastError {
                message: error.clone(),
                unix_seconds: now_unix_seconds(),
            });
            live.record.error = Some(error);
        }
    }

    /// The tracks the session's current copy still has to move: its bits now.
    fn remaining(store: &VolumeStore<E>, record: &SessionRecord) -> Result<u64> {
        let source = store.volume(&record.source)?;
        match session_core::work(record) {
            Some((bits, _)) => store.count_set(&source, bits),
            None => Ok(0),
        }
    }

    /// Reports one session as `list` and `show` print it.
    ///
    /// It reads the store's kept counts of bits (which may read the chunks changed since
    /// the last reading), so it runs on a [`Glance`] taken under the table's mutex and
    /// released: host IO needs that mutex, and must not wait for engine reads.
    fn info(&self, glance: Glance) -> Result<SessionInfo> {
        let Glance {
            mut record,
            tracks_per_second,
            lag_since,
        } = glance;
        let source = self.store.volume(&record.source)?;
        // One reading: the counts and the percent all come from the bits counted here.
        let remaining = Self::remaining(&self.store, &record)?;
        // The highest percent reported is kept in the live record, so that the next
        // reading never falls below it; the table's mutex is held just for that.
        let reading = match self.table.lock().sessions.get_mut(&record.id) {
            Some(live) => live.record.progress.read(remaining),
            None => record.progress.read(remaining),
        };
        let track_bytes = u64::from(source.track_size_bytes);
        let rate = (tracks_per_second * track_bytes as f64) as u64;
        let record = &record;
        let eta_seconds = if remaining == 0 {
            Some(0)
        } else {
            (remaining * track_bytes).checked_div(rate)
        };
        let lag = record.kind == SessionKind::Mirror
            && record.mode == MirrorMode::Async
            && record.state == SessionState::Synchronized;
        Ok(SessionInfo {
            id: record.id,
            kind: record.kind,
            source: record.source.clone(),
            target: record.target.clone(),
            state: record.state,
            mode: (record.kind == SessionKind::Mirror).then_some(record.mode),
            slots: std::iter::once(record.slot)
                .chain(record.precopy_slot)
                .collect(),
            extents: record.extents.clone(),
            tracks_total: reading.tracks_total,
            tracks_copied: reading.tracks_copied,
            tracks_remaining: reading.tracks_remaining,
            percent: reading.percent,
            rate_bytes_per_second: rate,
            eta_seconds,
            rate_limit_mebibytes_per_second: record.rate_limit_mebibytes_per_second,
            tracks_copied_last: record.tracks_copied_last,
            lag_tracks: if lag { remaining } else { 0 },
            lag_seconds: if lag {
                lag_since.map_or(0, |since| since.elapsed().as_secs())
            } else {
                0
            },
            error: record.error.clone(),
            created_unix_seconds: record.created_unix_seconds,
            split_sequence: record.split_sequence,
            last_error: record.last_error.clone(),
            strict: record.strict,
            target_timeout_milliseconds: record.target_timeout_milliseconds,
        })
    }

    /// Every session of one kind (or all), in id order.
    pub fn list(&self, kind: Option<SessionKind>) -> Result<Vec<SessionInfo>> {
        let glances: Vec<Glance> = {
            let table = self.table.lock();
            table
                .sessions
                .values()
                .filter(|live| kind.is_none_or(|kind| live.record.kind == kind))
                .map(|live| self.glance(live))
                .collect()
        };
        glances
            .into_iter()
            .map(|glance| self.info(glance))
            .collect()
    }

    fn glance(&self, live: &Live) -> Glance {
        Glance {
            record: live.record.clone(),
            tracks_per_second: live.rate.per_second(self.epoch.elapsed()),
            lag_since: live.lag_since,
        }
    }

    /// The session of `kind` whose target (destination or BCV) is `target`.
    pub fn show(&self, kind: SessionKind, target: &str) -> Result<SessionInfo> {
        let glance = self
            .table
            .lock()
            .find_by_target(kind, target)
            .map(|live| self.glance(live))
            .ok_or_else(|| Error::SessionNotFound {
                kind: kind.to_string(),
                volume: target.to_string(),
                role: match kind {
                    SessionKind::Clone => "destination",
                    SessionKind::Mirror => "BCV",
                }
                .to_string(),
            })?;
        self.info(glance)
    }

    /// Whether a volume takes part in any session (a volume in a session cannot be
    /// deleted), also as the target of a session another node runs.
    /// A snap whose source's gsnap lineage `lineage` rotates in the same write (see
    /// [`VolumeStore::snap_with_lineage`]), under the source's command gate: a session
    /// command on the source prepares its slots and marks under that gate and writes them
    /// back, which must not fall across the rotation.
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
        let _gate = match lineage {
            Some(_) => Some(self.gates.exclusive([self.store.volume(source)?.id])),
            None => None,
        };
        self.store.snap_with_lineage(
            source,
            target,
            extents,
            target_extents,
            overwrite,
            target_size_bytes,
            lineage,
        )
    }

    /// A gsnap lineage step on `volume` (see [`crate::store::lineage`]). A rotation here
    /// is the pair's target's: it takes the volume from its hosts in the same write, under
    /// the volume's command gate, so no host write is under way while it happens.
    pub fn lineage_step(
        &self,
        volume: &str,
        lineage: &str,
        step: protocol::gsnap::LineageStep,
    ) -> Result<protocol::messages::VolumeInfo> {
        use crate::store::lineage::Ending;
        use protocol::gsnap::LineageStep;
        let volume = self.store.volume(volume)?;
        let _gate = self.gates.exclusive([volume.id]);
        let end = match step {
            LineageStep::Rotate => return self.store.rotate_and_hold(&volume, lineage),
            LineageStep::Settle => Ending::Settle,
            LineageStep::Drop => Ending::Drop { give_back: false },
            LineageStep::Release => Ending::Drop { give_back: true },
            LineageStep::Fold => Ending::Fold { give_back: false },
            LineageStep::FoldRelease => Ending::Fold { give_back: true },
        };
        self.store.end_lineage(&volume, lineage, end)
    }

    pub fn involves(&self, name: &str) -> bool {
        self.registered(name).is_some()
            || self
                .table
                .lock()
                .sessions
                .values()
                .any(|live| live.record.source == name || live.record.target == name)
    }

    /// Whether a session of this node has `name` as its target (here or remote).
    pub fn has_target(&self, name: &str) -> bool {
        self.table
            .lock()
            .sessions
            .values()
            .any(|live| live.record.target == name)
    }
}

/// Frees the session slots no stored session holds. A command's slots and its session's
/// record are written in one batch, so this finds none unless a node of an older version
/// stopped in the middle of a command; such a slot would otherwise be lost for good (a
/// volume has 16).
fn reconcile_slots<E: Engine>(store: &VolumeStore<E>, records: &[SessionRecord]) -> Result<()> {
    let lineage_slots = store.held_lineage_slots()?;
    for info in store.list() {
        let volume = store.volume(&info.name)?;
        let held = records
            .iter()
            .filter(|record| record.source == volume.name)
            .flat_map(|record| std::iter::once(record.slot).chain(record.precopy_slot))
            .fold(0u16, |slots, slot| slots | (1 << slot));
        let held = held | lineage_slots.get(&volume.id).copied().unwrap_or(0);
        let orphans = store.session_slots(&volume) & !held;
        if orphans == 0 {
            continue;
        }
        let mut changes = crate::store::VolumeChanges::new();
        for slot in
            (0..crate::bitmap::SESSION_SLOTS_MAX as u8).filter(|slot| orphans & (1 << slot) != 0)
        {
            tracing::warn!(volume = %volume.name, slot, "freeing a session slot that no session holds (left by a command interrupted before this version)");
            changes.free_slot(&volume, slot)?;
        }
        store.commit(changes)?;
    }
    Ok(())
}

/// Gives the calling thread the lowest scheduling priority (nice 19): a copier then runs
/// in the time host IO leaves, and a host request that wakes up preempts it at once. It
/// still gets a share under full load, so copies never starve.
pub fn lower_thread_priority() {
    let result = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
    if let Err(error) = result {
        tracing::warn!(
            %error,
            "could not lower the copier's priority; copies compete with host IO"
        );
    }
}
