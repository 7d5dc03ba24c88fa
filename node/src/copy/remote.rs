//! Sessions whose target volume lives on another node.
//!
//! The source's node runs the session: it holds the slots, the bits and the copier. The
//! target's node holds the target volume and a registration (the seed's descriptor "with
//! the target too"), and answers [`TargetOperation`]s: store a track (verifying its
//! checksums, under its own address), read one back for a restore, switch readiness and
//! the tracking of its hosts' writes, list those writes, and mark its own downstream
//! mirrors at a split. A source clears a bit only after the target acknowledged the track.

use super::Sessions;
use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::{BitChange, Bits, Volume, VolumeChanges};
use crate::{Error, Result};
use protocol::messages::Extent;
use protocol::session::{
    RemoteVolume, SessionId, SessionKind, TargetAnswer, TargetOperation, TrackImage,
};
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
    /// `timeout`.
    fn call_many_within(
        &self,
        remote: &RemoteVolume,
        operations: Vec<TargetOperation>,
        timeout: Duration,
    ) -> Vec<Result<TargetAnswer>> {
        let _ = timeout;
        self.call_many(remote, operations)
    }
}

/// The other volume of a session, seen from the node that runs it.
#[derive(Clone)]
pub enum Partner {
    Local(Arc<Volume>),
    Remote(RemoteVolume),
}

impl Partner {
    pub fn local(&self) -> Option<&Arc<Volume>> {
        match self {
            Partner::Local(volume) => Some(volume),
            Partner::Remote(_) => None,
        }
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

    /// A call a host write (or a held track lock) waits for: bounded by the session's
    /// target timeout.
    pub(super) fn remote_call_for(
        &self,
        session: SessionId,
        remote: &RemoteVolume,
        operation: TargetOperation,
    ) -> Result<TargetAnswer> {
        let timeout = self.target_timeout(session);
        self.link()?.call_within(remote, operation, timeout)
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

    /// Sends a track to the target and, once it is stored there, applies `source_bits`
    /// here. Returns the bytes sent.
    pub(super) fn ship(
        &self,
        session: SessionId,
        source: &Volume,
        target: &Partner,
        track: u64,
        source_bits: &[BitChange<'_>],
        durability: Durability,
    ) -> Result<u64> {
        match target {
            Partner::Local(target) => {
                self.copy_track(source, target, track, source_bits, durability)
            }
            Partner::Remote(remote) => {
                let image = self.store.read_track_image(source, track)?;
                let bytes = image.data.len() as u64;
                let answer = self.remote_call_for(
                    session,
                    remote,
                    TargetOperation::PutTrack {
                        session,
                        image,
                        only_if_invalid: false,
                        synced: durability == Durability::Synced,
                        background: false,
                    },
                )?;
                if !matches!(answer, TargetAnswer::Stored(true)) {
                    return Err(unexpected(remote, &answer));
                }
                // Only now, with the track acknowledged, may its bits go.
                self.store.change_track_bits(source_bits, durability)?;
                metrics::counter!("tandem_copy_tracks_total").increment(1);
                metrics::counter!("tandem_copy_bytes_total").increment(bytes);
                Ok(bytes)
            }
        }
    }

    /// Sends already-read track images to a remote target at once and waits for every
    /// answer. Returns, per image in order, whether the target stored it (`false` when
    /// `only_if_invalid` found the track already valid there), or the error of that one
    /// track.
    pub(super) fn send_images(
        &self,
        session: SessionId,
        remote: &RemoteVolume,
        images: Vec<TrackImage>,
        only_if_invalid: bool,
        timeout: Option<Duration>,
    ) -> Result<Vec<Result<bool>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let operations = images
            .into_iter()
            .map(|image| TargetOperation::PutTrack {
                session,
                image,
                only_if_invalid,
                synced: false,
                background: true,
            })
            .collect();
        let answers = match timeout {
            Some(timeout) => self.link()?.call_many_within(remote, operations, timeout),
            None => self.link()?.call_many(remote, operations),
        };
        Ok(answers
            .into_iter()
            .map(|answer| match answer? {
                TargetAnswer::Stored(stored) => Ok(stored),
                answer => Err(unexpected(remote, &answer)),
            })
            .collect())
    }

    /// Brings a track from the target back into `into` (a restore), with `into_bits`.
    pub(super) fn fetch(
        &self,
        session: SessionId,
        target: &Partner,
        into: &Volume,
        track: u64,
        into_bits: &[BitChange<'_>],
        durability: Durability,
    ) -> Result<u64> {
        match target {
            Partner::Local(target) => self.copy_track(target, into, track, into_bits, durability),
            Partner::Remote(remote) => {
                let answer =
                    self.remote_call(remote, TargetOperation::GetTrack { session, track })?;
                let TargetAnswer::Track(image) = answer else {
                    return Err(unexpected(remote, &answer));
                };
                self.store
                    .write_track_image(into, &image, into_bits, durability)?;
                Ok(image.data.len() as u64)
            }
        }
    }

    pub(super) fn partner_changed_tracks(
        &self,
        session: SessionId,
        target: &Partner,
    ) -> Result<Vec<u64>> {
        match target {
            Partner::Local(volume) => self.changed_tracks(volume),
            Partner::Remote(remote) => {
                match self.remote_call(remote, TargetOperation::ChangedTracks { session })? {
                    TargetAnswer::Tracks(tracks) => Ok(tracks),
                    answer => Err(unexpected(remote, &answer)),
                }
            }
        }
    }

    fn changed_tracks(&self, volume: &Volume) -> Result<Vec<u64>> {
        self.tracks_with(volume, Bits::TargetChanged)
    }

    pub(super) fn partner_invalid_count(
        &self,
        session: SessionId,
        target: &Partner,
    ) -> Result<u64> {
        match target {
            Partner::Local(volume) => self.store.count_set(volume, Bits::Invalid),
            Partner::Remote(remote) => {
                match self.remote_call(remote, TargetOperation::CountInvalid { session })? {
                    TargetAnswer::Count(count) => Ok(count),
                    answer => Err(unexpected(remote, &answer)),
                }
            }
        }
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
            | TargetOperation::Unregister { session }
            | TargetOperation::PutTrack { session, .. }
            | TargetOperation::GetTrack { session, .. }
            | TargetOperation::SetReadiness { session, .. }
            | TargetOperation::TrackChanges { session, .. }
            | TargetOperation::ChangedTracks { session }
            | TargetOperation::CountInvalid { session }
            | TargetOperation::MarkInvalid { session, .. }
            | TargetOperation::ClearInvalid { session, .. }
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
            if matches!(operation, TargetOperation::Unregister { .. }) {
                return Ok(TargetAnswer::Done);
            }
            return Err(Error::SessionNotFound {
                kind: "remote".to_string(),
                volume: format!("session {session}"),
                role: "target on this node".to_string(),
            });
        };
        let volume = self.store.volume(&registration.volume)?;
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
                let invalid = self.store.test_bit(&volume, Bits::Invalid, image.track)?;
                if only_if_invalid && !invalid {
                    return Ok(TargetAnswer::Stored(false));
                }
                let durability = if synced {
                    Durability::Synced
                } else {
                    Durability::Logged
                };
                let clear_invalid = [BitChange {
                    volume: &volume,
                    bits: Bits::Invalid,
                    track: image.track,
                    set: false,
                }];
                let bits: &[BitChange<'_>] = if invalid { &clear_invalid } else { &[] };
                self.store
                    .write_track_image(&volume, &image, bits, durability)?;
                Ok(TargetAnswer::Stored(true))
            }
            TargetOperation::GetTrack { track, .. } => {
                // No gate, for the same reason as a copy into the target.
                let _track = self.locks.lock([(volume.id, track)]);
                let image: TrackImage = self.store.read_track_image(&volume, track)?;
                Ok(TargetAnswer::Track(image))
            }
            TargetOperation::SetReadiness { readiness, .. } => {
                let _gate = self.gates.exclusive([volume.id]);
                self.store.set_readiness(&volume.name, readiness)?;
                Ok(TargetAnswer::Done)
            }
            TargetOperation::TrackChanges { tracking, .. } => {
                let _gate = self.gates.exclusive([volume.id]);
                let mut changes = VolumeChanges::new();
                changes.set_target_tracking(&volume, tracking)?;
                self.store.commit(changes)?;
                Ok(TargetAnswer::Done)
            }
            TargetOperation::ChangedTracks { .. } => {
                Ok(TargetAnswer::Tracks(self.changed_tracks(&volume)?))
            }
            TargetOperation::CountInvalid { .. } => Ok(TargetAnswer::Count(
                self.store.count_set(&volume, Bits::Invalid)?,
            )),
            TargetOperation::MarkDownstream { tracks, .. } => {
                let _gate = self.gates.exclusive([volume.id]);
                let mut changes = VolumeChanges::new();
                self.mark_downstream_into(&mut changes, &volume, tracks.as_deref())?;
                self.store.commit(changes)?;
                Ok(TargetAnswer::Done)
            }
            TargetOperation::Unregister { .. } => {
                let _gate = self.gates.exclusive([volume.id]);
                let mut batch = Batch::default();
                batch.delete(Space::Meta, registration_key(&registration.volume));
                self.store.engine().write(batch, Durability::Synced)?;
                self.registrations.lock().remove(&registration.volume);
                tracing::info!(session, volume = %registration.volume, "remote session target released");
                Ok(TargetAnswer::Done)
            }
            // A clone destination's invalid bits: marked when a clone is created (seed
            // 001's IND), cleared when a clone that was never activated is cancelled.
            TargetOperation::MarkInvalid { extents, .. } => {
                self.change_invalid(&volume, extents, true)
            }
            TargetOperation::ClearInvalid { extents, .. } => {
                self.change_invalid(&volume, extents, false)
            }
            TargetOperation::Register { .. }
            | TargetOperation::PullTrack { .. }
            | TargetOperation::Pulled { .. } => unreachable!("served above"),
        }
    }

    /// The clone session `session` of this node, whose destination is on another node.
    /// Sets or clears a target volume's invalid bits over `extents`, after checking every
    /// extent against the volume, under the volume's gate, shared.
    fn change_invalid(
        &self,
        volume: &Volume,
        extents: Vec<Extent>,
        set: bool,
    ) -> Result<TargetAnswer> {
        let _gate = self.gates.shared([volume.id]);
        if let Some(extent) = extents
            .iter()
            .find(|extent| extent.first > extent.last || extent.last >= volume.track_count())
        {
            return Err(Error::ExtentOutOfRange {
                name: volume.name.clone(),
                extent: *extent,
                last_track: volume.track_count() - 1,
            });
        }
        for extent in extents {
            self.store.change_bits(volume, Bits::Invalid, extent, set)?;
        }
        Ok(TargetAnswer::Done)
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
    fn serve_pull(&self, session: SessionId, track: u64) -> Result<TargetAnswer> {
        let (record, source) = self.remote_clone(session)?;
        let _gate = self.gates.shared([source.id]);
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
