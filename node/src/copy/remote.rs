//! Sessions whose target volume lives on another node.
//!
//! The source's node runs the session: it holds the slots, the bits and the copier. The
//! target's node holds the target volume and a registration (the seed's descriptor "with
//! the target too"), and answers [`TargetOperation`]s: store a track (verifying its
//! checksums, under its own address), read one back for a restore, switch readiness and
//! the tracking of its hosts' writes, list those writes, and mark its own downstream
//! mirrors at a split. A source clears a bit only after the target acknowledged the track.

use super::target::{LocalTarget, StoreOptions, Target};
use super::Sessions;
use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::{BitChange, Bits, Volume, VolumeChanges};
use crate::{Error, Result};
use protocol::session::{RemoteVolume, SessionId, SessionKind, TargetAnswer, TargetOperation};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Calls another node's session service; the node runtime implements it over QUIC.
pub trait TargetLink: Send + Sync {
    fn call(&self, remote: &RemoteVolume, operation: TargetOperation) -> Result<TargetAnswer>;

    /// Several operations at once (a copy step's tracks), answers in the same order. The
    /// QUIC link sends them on parallel streams, so a step costs one round trip, not one
    /// per track. Each answer stands alone: a step whose link broke half-way still
    /// clears the bits of the tracks that were acknowledged.
    fn call_many(
        &self,
        remote: &RemoteVolume,
        operations: Vec<TargetOperation>,
    ) -> Vec<Result<TargetAnswer>> {
        operations
            .into_iter()
            .map(|operation| self.call(remote, operation))
            .collect()
    }

    /// This node's name and the address other nodes reach it at, which a clone
    /// destination's node needs to pull tracks back.
    fn this_node(&self) -> (String, String);

    /// [`TargetLink::call`] that gives up after `timeout` with
    /// [`Error::TargetUnanswered`]: what a host write, a probe or a held track lock waits
    /// for. The default waits as `call` does (test doubles answer or fail at once).
    fn call_within(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
        timeout: Duration,
    ) -> Result<TargetAnswer> {
        let _ = timeout;
        self.call(remote, operation)
    }

    /// [`TargetLink::call_many`] that gives up on the answers still missing after
    /// `timeout`. The default asks one operation after the other, each within what is
    /// left of `timeout`.
    fn call_many_within(
        &self,
        remote: &RemoteVolume,
        operations: Vec<TargetOperation>,
        timeout: Duration,
    ) -> Vec<Result<TargetAnswer>> {
        let deadline = std::time::Instant::now() + timeout;
        operations
            .into_iter()
            .map(|operation| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                self.call_within(remote, operation, left)
            })
            .collect()
    }
}

/// A volume of this node that is the target of a session run by another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub session: SessionId,
    pub kind: SessionKind,
    pub source_node: String,
    pub source_address: String,
    pub source: String,
    pub volume: String,
}

const REGISTRATION_KEY_PREFIX: &[u8] = b"t/";
pub(super) const REGISTRATION_KEY_END: &[u8] = b"t0";

fn registration_key(volume: &str) -> Vec<u8> {
    let mut key = REGISTRATION_KEY_PREFIX.to_vec();
    key.extend_from_slice(volume.as_bytes());
    key
}

pub(super) fn load_registrations<E: Engine>(engine: &E) -> Result<Vec<Registration>> {
    let mut registrations = Vec::new();
    let mut failure = None;
    engine.scan(
        Space::Meta,
        REGISTRATION_KEY_PREFIX,
        REGISTRATION_KEY_END,
        &mut |key, value| match protocol::codec::decode::<Registration>(value) {
            Ok(registration) => {
                registrations.push(registration);
                true
            }
            Err(error) => {
                failure = Some(Error::Metadata {
                    what: format!("registration key {key:02x?}"),
                    detail: error.to_string(),
                });
                false
            }
        },
    )?;
    match failure {
        Some(error) => Err(error),
        None => Ok(registrations),
    }
}

impl<E: Engine> Sessions<E> {
    pub(super) fn link(&self) -> Result<&Arc<dyn TargetLink>> {
        self.link.as_ref().ok_or_else(|| Error::Config {
            detail: "this node cannot reach other nodes for copy sessions".to_string(),
        })
    }

    pub(super) fn remote_call(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> Result<TargetAnswer> {
        self.link()?.call(remote, operation)
    }

    /// Takes `remote` as the target of a new session of this node; returns its track
    /// size and track count.
    pub(super) fn register_remote(
        &self,
        session: SessionId,
        kind: SessionKind,
        source: &Volume,
        remote: &RemoteVolume,
    ) -> Result<(u32, u64)> {
        let (source_node, source_address) = self.link()?.this_node();
        let answer = self.remote_call(
            remote,
            TargetOperation::Register {
                session,
                kind,
                source_node,
                source_address,
                source: source.name.clone(),
                volume: remote.volume.clone(),
            },
        )?;
        match answer {
            TargetAnswer::Registered {
                track_size_bytes,
                track_count,
            } => Ok((track_size_bytes, track_count)),
            answer => Err(unexpected(remote, &answer)),
        }
    }

    /// Sends a mirror's pending `tracks` to its target at once (on parallel streams to
    /// another node) and clears their pending bits in `slot` with them (in the same write
    /// when the target is here, once it acknowledged otherwise). Returns the bytes sent.
    /// Something waits on this (a host write, a split's drain): bounded by the session's
    /// target timeout.
    pub(super) fn ship(
        &self,
        session: SessionId,
        source: &Volume,
        target: &dyn Target,
        slot: u8,
        tracks: &[u64],
        durability: Durability,
    ) -> Result<u64> {
        let images = tracks
            .iter()
            .map(|track| self.store.read_track_image(source, *track))
            .collect::<Result<Vec<_>>>()?;
        let bytes = images.iter().map(|image| image.data.len() as u64).sum();
        let bits = tracks
            .iter()
            .map(|track| {
                vec![BitChange {
                    volume: source,
                    bits: Bits::Pending(slot),
                    track: *track,
                    set: false,
                }]
            })
            .collect();
        let options = StoreOptions {
            only_if_invalid: false,
            durability,
            target_synced: durability == Durability::Synced,
            background: false,
            timeout: Some(self.target_timeout(session)),
        };
        for stored in target.store(images, bits, options) {
            stored?;
        }
        Ok(bytes)
    }

    /// Sends `tracks` of the clone whose destination is `target` again, from its source
    /// here (a gsnap's verification found them differing on the destination). Only the
    /// tracks are stored, synced, with no bit of the session changed: storing the same
    /// image again changes nothing, so a retry is harmless. Tracks outside the session's
    /// extents are refused before anything is sent. Returns the tracks and bytes sent.
    pub fn resend(&self, target: &str, tracks: &[u64]) -> Result<(u64, u64)> {
        let record = self
            .table
            .lock()
            .find_by_target(SessionKind::Clone, target)
            .map(|live| live.record.clone())
            .ok_or_else(|| Error::SessionNotFound {
                kind: "clone".to_string(),
                volume: target.to_string(),
                role: "destination".to_string(),
            })?;
        let source = self.store.volume(&record.source)?;
        let covered = |track: u64| {
            record.extents.is_empty()
                || record
                    .extents
                    .iter()
                    .any(|extent| (extent.first..=extent.last).contains(&track))
        };
        if let Some(track) = tracks.iter().find(|track| !covered(**track)) {
            return Err(Error::ExtentOutOfRange {
                name: record.target.clone(),
                extent: protocol::messages::Extent {
                    first: *track,
                    last: *track,
                },
                last_track: source.track_count().saturating_sub(1),
            });
        }
        let target = self.target_of(&record)?;
        let options = StoreOptions {
            only_if_invalid: false,
            durability: Durability::Synced,
            target_synced: true,
            background: false,
            timeout: Some(self.target_timeout(record.id)),
        };
        let mut bytes = 0;
        for group in tracks.chunks(target.step_tracks_max()) {
            let images = group
                .iter()
                .map(|track| self.store.read_track_image(&source, *track))
                .collect::<Result<Vec<_>>>()?;
            bytes += images
                .iter()
                .map(|image| image.data.len() as u64)
                .sum::<u64>();
            let no_bits = images.iter().map(|_| Vec::new()).collect();
            for stored in target.store(images, no_bits, options) {
                stored?;
            }
        }
        tracing::info!(session = record.id, target = %record.target, tracks = tracks.len(), bytes, "tracks sent again");
        Ok((tracks.len() as u64, bytes))
    }

    pub(super) fn registered(&self, volume: &str) -> Option<Registration> {
        self.registrations.lock().get(volume).cloned()
    }

    /// Serves a session source's request for a volume of this node.
    pub fn serve_target(&self, operation: TargetOperation) -> Result<TargetAnswer> {
        match operation {
            TargetOperation::Register {
                session,
                kind,
                source_node,
                source_address,
                source,
                volume,
            } => {
                return self.register_target(Registration {
                    session,
                    kind,
                    source_node,
                    source_address,
                    source,
                    volume,
                })
            }
            // Asked of the clone source's node by the destination's.
            TargetOperation::PullTrack { session, track } => {
                return self.serve_pull(session, track)
            }
            TargetOperation::Pulled { session, tracks } => {
                return self.serve_pulled(session, &tracks)
            }
            _ => {}
        }
        let session = match &operation {
            TargetOperation::Probe { session }
            | TargetOperation::Release { session, .. }
            | TargetOperation::PutTrack { session, .. }
            | TargetOperation::GetTrack { session, .. }
            | TargetOperation::SetReadiness { session, .. }
            | TargetOperation::TrackChanges { session, .. }
            | TargetOperation::ChangedTracks { session }
            | TargetOperation::ForgetChanges { session }
            | TargetOperation::CountInvalid { session }
            | TargetOperation::MarkInvalid { session, .. }
            | TargetOperation::MarkDownstream { session, .. } => *session,
            TargetOperation::Register { .. }
            | TargetOperation::PullTrack { .. }
            | TargetOperation::Pulled { .. } => unreachable!("served above"),
        };
        let registration = self
            .registrations
            .lock()
            .values()
            .find(|registration| registration.session == session)
            .cloned();
        let Some(registration) = registration else {
            // A release whose answer was lost, sent again: it was carried out whole.
            if matches!(operation, TargetOperation::Release { .. }) {
                return Ok(TargetAnswer::Done);
            }
            return Err(Error::SessionNotFound {
                kind: "remote".to_string(),
                volume: format!("session {session}"),
                role: "target on this node".to_string(),
            });
        };
        let volume = self.store.volume(&registration.volume)?;
        // The same code as a session whose target is on its own node: a `LocalTarget`.
        let target = LocalTarget {
            sessions: self,
            volume: volume.clone(),
        };
        match operation {
            // The registration is here and the volume readable: the session can resume.
            TargetOperation::Probe { .. } => Ok(TargetAnswer::Done),
            TargetOperation::PutTrack {
                image,
                only_if_invalid,
                synced,
                ..
            } => {
                metrics::counter!("tandem_target_tracks_received_total").increment(1);
                // No gate: a copy into a target is atomic under its track lock, and none of
                // this node's commands depend on it. Waiting for the gate would close a
                // cycle across nodes: a command here holding the gate waits for the other
                // node, whose copier waits for this answer while holding its own gate.
                let _track = self.locks.lock([(volume.id, image.track)]);
                let options = StoreOptions {
                    only_if_invalid,
                    durability: if synced {
                        Durability::Synced
                    } else {
                        Durability::Logged
                    },
                    target_synced: synced,
                    background: true,
                    timeout: None,
                };
                let stored = target
                    .store(vec![image], Vec::new(), options)
                    .pop()
                    .expect("one answer per image")?;
                Ok(TargetAnswer::Stored(stored))
            }
            TargetOperation::GetTrack { track, .. } => {
                // No gate, for the same reason as a copy into the target.
                let _track = self.locks.lock([(volume.id, track)]);
                Ok(TargetAnswer::Track(target.read(track)?))
            }
            // The session's end on the target and the registration's removal in one
            // write: a crash leaves either the session whole or the release whole.
            operation @ TargetOperation::Release { .. } => {
                let _gate = self.gates.exclusive([volume.id]);
                let mut changes = VolumeChanges::new();
                target.apply(&mut changes, operation)?;
                changes.delete(Space::Meta, registration_key(&registration.volume));
                self.store.commit(changes)?;
                self.registrations.lock().remove(&registration.volume);
                tracing::info!(session, volume = %registration.volume, "remote session target released");
                Ok(TargetAnswer::Done)
            }
            // A command's operation: carried out and committed under the volume's gate,
            // as a command of this node would.
            operation => {
                let _gate = self.gates.exclusive([volume.id]);
                let mut changes = VolumeChanges::new();
                let answer = target.apply(&mut changes, operation)?;
                self.store.commit(changes)?;
                Ok(answer)
            }
        }
    }

    fn remote_clone(&self, session: SessionId) -> Result<(super::SessionRecord, Arc<Volume>)> {
        let record = self
            .table
            .lock()
            .sessions
            .get(&session)
            .map(|live| live.record.clone())
            .filter(|record| record.kind == SessionKind::Clone && record.remote.is_some())
            .ok_or_else(|| Error::SessionNotFound {
                kind: "clone".to_string(),
                volume: format!("session {session}"),
                role: "source on this node".to_string(),
            })?;
        let source = self.store.volume(&record.source)?;
        Ok((record, source))
    }

    /// Copy on first access across nodes, the source's half: the point-in-time image of
    /// a track the destination still lacks. The track's bit stays until the destination
    /// says it stored the image (`Pulled`); until then a host write here copies first as
    /// usual, which the destination ignores once it holds the track.
    ///
    /// Only once the clone is activated: before, the source has no point-in-time image to
    /// give (a host write here does not copy first yet). A destination that is ready
    /// before its activation committed (the answer to making it ready was lost, and the
    /// activation is retried) gets a refusal instead of a track older than the instant.
    fn serve_pull(&self, session: SessionId, track: u64) -> Result<TargetAnswer> {
        let (_, source) = self.remote_clone(session)?;
        let _gate = self.gates.shared([source.id]);
        // Read again under the gate, which an activation holds while it commits.
        let (record, _) = self.remote_clone(session)?;
        if !super::core::clone_target_access_pulls(record.acting_state(), true) {
            return Err(Error::SessionRefused {
                command: "pull".to_string(),
                session: record.describe(),
                reason: format!(
                    "the clone is {}, not activated: its destination has no point-in-time image before the activation",
                    record.acting_state()
                ),
            });
        }
        let _track = self.locks.lock([(source.id, track)]);
        if track >= source.track_count()
            || !self
                .store
                .test_bit(&source, Bits::Session(record.slot), track)?
        {
            return Ok(TargetAnswer::NothingToPull);
        }
        Ok(TargetAnswer::Track(
            self.store.read_track_image(&source, track)?,
        ))
    }

    /// The destination stored pulled tracks: they leave the clone list.
    fn serve_pulled(&self, session: SessionId, tracks: &[u64]) -> Result<TargetAnswer> {
        let (record, source) = self.remote_clone(session)?;
        let _gate = self.gates.shared([source.id]);
        let tracks: Vec<u64> = tracks
            .iter()
            .copied()
            .filter(|track| *track < source.track_count())
            .collect();
        let _tracks = self
            .locks
            .lock(tracks.iter().map(|track| (source.id, *track)));
        let mut changes = Vec::new();
        for track in &tracks {
            if self
                .store
                .test_bit(&source, Bits::Session(record.slot), *track)?
            {
                changes.push(BitChange {
                    volume: &source,
                    bits: Bits::Session(record.slot),
                    track: *track,
                    set: false,
                });
            }
        }
        self.store.change_track_bits(&changes, Durability::Logged)?;
        self.count_copied(session, changes.len() as u64);
        Ok(TargetAnswer::Done)
    }

    /// Copy on first access across nodes, the destination's half: brings the tracks among
    /// `first..=last` that `volume` still lacks from the clone source's node.
    ///
    /// It holds no track lock of its own while it waits, because the source's node may
    /// hold its lock on the same track while it copies the track here (a host write there
    /// copies first). Once pulled, a track is stored under its lock only if still
    /// invalid: a copy that arrived meanwhile carried the same point-in-time image.
    pub(super) fn pull_from_source(
        &self,
        volume: &Volume,
        registration: &Registration,
        first: u64,
        last: u64,
    ) -> Result<()> {
        let mut missing = Vec::new();
        for track in first..=last {
            if self.store.test_bit(volume, Bits::Invalid, track)? {
                missing.push(track);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let source = RemoteVolume {
            node: registration.source_node.clone(),
            address: registration.source_address.clone(),
            volume: registration.source.clone(),
        };
        let session = registration.session;
        let answers = self.link()?.call_many(
            &source,
            missing
                .iter()
                .map(|track| TargetOperation::PullTrack {
                    session,
                    track: *track,
                })
                .collect(),
        );
        let tracks_guard = self
            .locks
            .lock(missing.iter().map(|track| (volume.id, *track)));
        let mut stored = Vec::new();
        for (track, answer) in missing.iter().zip(answers) {
            let clear_invalid = [BitChange {
                volume,
                bits: Bits::Invalid,
                track: *track,
                set: false,
            }];
            if !self.store.test_bit(volume, Bits::Invalid, *track)? {
                continue;
            }
            match answer? {
                TargetAnswer::Track(image) if image.track == *track => {
                    self.store.write_track_image(
                        volume,
                        &image,
                        &clear_invalid,
                        Durability::Logged,
                    )?;
                    metrics::counter!("tandem_clone_pulled_tracks_total").increment(1);
                    stored.push(*track);
                }
                // The source no longer holds a point-in-time image apart from what it
                // sent: the track here is it.
                TargetAnswer::NothingToPull => {
                    self.store
                        .change_track_bits(&clear_invalid, Durability::Logged)?;
                }
                answer => return Err(unexpected(&source, &answer)),
            }
        }
        drop(tracks_guard);
        if !stored.is_empty() {
            // Only saves the source sending these again; the destination already holds
            // them, so a lost notice costs bandwidth, not data.
            self.store.flush()?;
            if let Err(error) = self.remote_call(
                &source,
                TargetOperation::Pulled {
                    session,
                    tracks: stored,
                },
            ) {
                tracing::warn!(session, %error, "could not tell the clone source about pulled tracks");
            }
        }
        Ok(())
    }

    /// Registers `volume` as the target of a session run by another node.
    pub fn register_target(&self, registration: Registration) -> Result<TargetAnswer> {
        let volume = self.store.volume(&registration.volume)?;
        let _gate = self.gates.exclusive([volume.id]);
        if let Some(existing) = self.registered(&volume.name) {
            // The same source node registering a new session for the volume has ended the
            // old one (it refuses a second session into one target itself): its release
            // was lost, for example a cancel while this node was down.
            let replaced = existing.session != registration.session
                && existing.source_node == registration.source_node;
            if replaced {
                tracing::info!(old = existing.session, new = registration.session, volume = %volume.name, source_node = %registration.source_node, "registration replaced by a new session of the same source node");
            }
            if existing.session != registration.session && !replaced {
                return Err(Error::SessionRefused {
                    command: "register".to_string(),
                    session: format!("{} from {}", registration.kind, registration.source_node),
                    reason: format!(
                        "'{}' is already the target of session {} from {}",
                        volume.name, existing.session, existing.source_node
                    ),
                });
            }
        } else if let Some(local) = self
            .table
            .lock()
            .sessions
            .values()
            .find(|live| live.record.target == volume.name)
        {
            return Err(Error::SessionRefused {
                command: "register".to_string(),
                session: format!("{} from {}", registration.kind, registration.source_node),
                reason: format!(
                    "'{}' is already the target of {}",
                    volume.name,
                    local.record.describe()
                ),
            });
        }
        if registration.kind == SessionKind::Clone && self.involves_as_source(&volume.name) {
            return Err(Error::SessionRefused {
                command: "register".to_string(),
                session: format!("{} from {}", registration.kind, registration.source_node),
                reason: format!(
                    "'{}' is the source of another session and cannot be overwritten",
                    volume.name
                ),
            });
        }
        let mut batch = Batch::default();
        batch.put(
            Space::Meta,
            registration_key(&volume.name),
            protocol::codec::encode(&registration)?,
        );
        self.store.engine().write(batch, Durability::Synced)?;
        // The session replaces the volume's data: it is no longer a snapshot of anything.
        self.store.forget_snapshot_origin(&volume)?;
        self.registrations
            .lock()
            .insert(volume.name.clone(), registration);
        Ok(TargetAnswer::Registered {
            track_size_bytes: volume.track_size_bytes,
            track_count: volume.track_count(),
        })
    }
}

pub(super) fn unexpected(remote: &RemoteVolume, answer: &TargetAnswer) -> Error {
    Error::Engine {
        detail: format!(
            "node {} answered {answer:?} for volume {}",
            remote.node, remote.volume
        ),
    }
}
