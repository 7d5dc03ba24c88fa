//! A session's other side, behind one trait: [`Target`]. The session logic asks it to
//! store and read tracks, to carry out a command's target operations and to answer
//! queries, and never asks where it lives. Two implementations: [`LocalTarget`], a volume
//! of this node, whose changes land in the command's own batch (and whose track stores
//! carry the source's bits in the same write); [`RemoteTarget`], a volume of another
//! node, reached through the [`TargetLink`], whose changes happen on that node at once
//! and whose acknowledged tracks clear the source's bits afterwards.
//!
//! The target's node serves a [`TargetOperation`] with a [`LocalTarget`] too
//! (`Sessions::serve_target`): one body of code carries out an operation, whichever node
//! asked for it.

use super::remote::{unexpected, TargetLink};
use super::suspend::{release_key, OwedRelease};
use super::Sessions;
use crate::engine::{Durability, Engine, Space};
use crate::store::{BitChange, Bits, Volume, VolumeChanges, VolumeStore};
use crate::{Error, Result};
use protocol::session::{RemoteVolume, SessionId, TargetAnswer, TargetOperation, TrackImage};
use std::sync::Arc;
use std::time::Duration;

/// How a track is stored on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Store only while the track is still invalid on the target.
    pub only_if_invalid: bool,
    /// How durable the source's bit changes (and a target on this node, in the same
    /// batch) are when the store returns.
    pub durability: Durability,
    /// Whether a target on another node syncs its log before it answers. The source
    /// changes a track's bits on that answer, in its own log, which says nothing of the
    /// target's: a copied track whose bit is cleared must outlast a power loss of the
    /// target's machine. Only a sync mirror's host write without FUA leaves it unsynced
    /// (the host asked for no more on its own disk either).
    pub target_synced: bool,
    /// A background copy (the target stores it at low priority), not a host write or a
    /// command waiting for the answer.
    pub background: bool,
    /// How long the answer may take, when something waits on it (a host write, a held
    /// track lock); `None` is the link's own bound.
    pub timeout: Option<Duration>,
}

/// The other side of a session.
pub trait Target {
    /// The target volume when it is on this node: its track locks are taken with the
    /// source's, and its changes can share the source's batch.
    fn here(&self) -> Option<&Arc<Volume>>;

    /// Where the target lives when it is on another node.
    fn remote(&self) -> Option<&RemoteVolume>;

    /// Tracks a copy step moves at once: a remote target gets them on parallel streams.
    fn step_tracks_max(&self) -> usize;

    /// Carries out a command's operation of the target: into `changes` when the target is
    /// here, on its node at once otherwise.
    fn apply<'a>(
        &'a self,
        changes: &mut VolumeChanges<'a>,
        operation: TargetOperation,
    ) -> Result<TargetAnswer>;

    /// Ends the session on the target with `release` (a [`TargetOperation::Release`]):
    /// into `changes` when the target is here; a target on another node is owed it —
    /// stored in `changes` and returned, for the command to deliver once it is committed
    /// and its gates are released (the copier delivers it later if that fails).
    fn end<'a>(
        &'a self,
        changes: &mut VolumeChanges<'a>,
        release: TargetOperation,
    ) -> Result<Option<OwedRelease>>;

    /// The session replaces the target's data: it is no longer a snapshot of anything
    /// (a remote target did that when it registered the session).
    fn take_over<'a>(&'a self, changes: &mut VolumeChanges<'a>) -> Result<()>;

    /// Stores track images, each with the source's bit changes that go with it: in the
    /// same write when the target is here, once the target acknowledged the track
    /// otherwise. Returns per image whether it was stored (`false` when
    /// `only_if_invalid` found the track valid; its source bits change all the same).
    /// The caller holds the tracks' locks on this node.
    fn store(
        &self,
        images: Vec<TrackImage>,
        source_bits: Vec<Vec<BitChange<'_>>>,
        options: StoreOptions,
    ) -> Vec<Result<bool>>;

    /// Reads a track of the target (a restore, copy on first access).
    fn read(&self, track: u64) -> Result<TrackImage>;

    /// Whether the target answers within `timeout` (always, when it is here).
    fn answers(&self, timeout: Duration) -> bool;
}

/// A target volume of this node.
pub struct LocalTarget<'s, E: Engine> {
    pub(super) sessions: &'s Sessions<E>,
    pub(super) volume: Arc<Volume>,
}

impl<E: Engine> LocalTarget<'_, E> {
    fn store_one(
        &self,
        store: &VolumeStore<E>,
        image: &TrackImage,
        source_bits: &[BitChange<'_>],
        options: StoreOptions,
    ) -> Result<bool> {
        let volume = &*self.volume;
        let invalid = store.test_bit(volume, Bits::Invalid, image.track)?;
        if options.only_if_invalid && !invalid {
            store.change_track_bits(source_bits, options.durability)?;
            return Ok(false);
        }
        let mut bits = source_bits.to_vec();
        if invalid {
            bits.push(BitChange {
                volume,
                bits: Bits::Invalid,
                track: image.track,
                set: false,
            });
        }
        store.write_track_image(volume, image, &bits, options.durability)?;
        metrics::counter!("tandem_copy_tracks_total").increment(1);
        metrics::counter!("tandem_copy_bytes_total").increment(image.data.len() as u64);
        Ok(true)
    }
}

impl<E: Engine> Target for LocalTarget<'_, E> {
    fn here(&self) -> Option<&Arc<Volume>> {
        Some(&self.volume)
    }

    fn remote(&self) -> Option<&RemoteVolume> {
        None
    }

    fn step_tracks_max(&self) -> usize {
        super::COPY_STEP_TRACKS_MAX
    }

    fn end<'a>(
        &'a self,
        changes: &mut VolumeChanges<'a>,
        release: TargetOperation,
    ) -> Result<Option<OwedRelease>> {
        self.apply(changes, release).map(|_| None)
    }

    fn apply<'a>(
        &'a self,
        changes: &mut VolumeChanges<'a>,
        operation: TargetOperation,
    ) -> Result<TargetAnswer> {
        let volume = &*self.volume;
        match operation {
            // A clone's destination: marked when the clone is created (seed 001's IND),
            // cleared when a clone never activated is cancelled.
            TargetOperation::MarkInvalid { extents, .. } => {
                change_invalid(changes, volume, extents, true)?
            }
            // The end of the session. A target here holds no registration: a session of
            // this node ends with its record, in this batch.
            TargetOperation::Release {
                clear_invalid,
                readiness,
                ..
            } => {
                changes.set_target_tracking(volume, false)?;
                changes.forget_target_changes(volume)?;
                change_invalid(changes, volume, clear_invalid, false)?;
                if let Some(readiness) = readiness {
                    changes.set_readiness(volume, readiness)?;
                }
            }
            TargetOperation::SetReadiness { readiness, .. } => {
                changes.set_readiness(volume, readiness)?
            }
            TargetOperation::TrackChanges { tracking, .. } => {
                changes.set_target_tracking(volume, tracking)?
            }
            TargetOperation::MarkDownstream { tracks, .. } => {
                self.sessions
                    .mark_downstream_into(changes, volume, tracks.as_deref())?
            }
            TargetOperation::ForgetChanges { .. } => changes.forget_target_changes(volume)?,
            TargetOperation::ChangedTracks { .. } => {
                return Ok(TargetAnswer::Tracks(
                    self.sessions.tracks_with(volume, Bits::TargetChanged)?,
                ))
            }
            TargetOperation::CountInvalid { .. } => {
                return Ok(TargetAnswer::Count(
                    self.sessions.store.count_set(volume, Bits::Invalid)?,
                ))
            }
            TargetOperation::Probe { .. } => {}
            operation @ (TargetOperation::Register { .. }
            | TargetOperation::PullTrack { .. }
            | TargetOperation::Pulled { .. }
            | TargetOperation::PutTrack { .. }
            | TargetOperation::GetTrack { .. }) => {
                return Err(Error::Engine {
                    detail: format!("{operation:?} is not a command's operation of a target"),
                })
            }
        }
        Ok(TargetAnswer::Done)
    }

    fn take_over<'a>(&'a self, changes: &mut VolumeChanges<'a>) -> Result<()> {
        changes.forget_snapshot_origin(&self.volume)
    }

    fn store(
        &self,
        images: Vec<TrackImage>,
        source_bits: Vec<Vec<BitChange<'_>>>,
        options: StoreOptions,
    ) -> Vec<Result<bool>> {
        let store = &self.sessions.store;
        images
            .iter()
            .enumerate()
            .map(|(index, image)| {
                let bits = source_bits.get(index).map_or(&[][..], Vec::as_slice);
                self.store_one(store, image, bits, options)
            })
            .collect()
    }

    fn read(&self, track: u64) -> Result<TrackImage> {
        self.sessions.store.read_track_image(&self.volume, track)
    }

    fn answers(&self, _timeout: Duration) -> bool {
        true
    }
}

/// Sets or clears a target's invalid bits over `extents`, each checked against the
/// volume first.
fn change_invalid<'a>(
    changes: &mut VolumeChanges<'a>,
    volume: &'a Volume,
    extents: Vec<protocol::messages::Extent>,
    set: bool,
) -> Result<()> {
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
        changes.change_bits(volume, Bits::Invalid, extent, set)?;
    }
    Ok(())
}

/// A target volume of another node.
pub struct RemoteTarget<'s, E: Engine> {
    pub(super) sessions: &'s Sessions<E>,
    pub(super) remote: RemoteVolume,
    pub(super) session: SessionId,
    /// How long a command's operation may take: the session's target timeout, so that a
    /// command on a session whose target's node is lost returns within it.
    pub(super) timeout: Duration,
}

impl<E: Engine> RemoteTarget<'_, E> {
    fn link(&self) -> Result<&Arc<dyn TargetLink>> {
        self.sessions.link()
    }
}

impl<E: Engine> Target for RemoteTarget<'_, E> {
    fn here(&self) -> Option<&Arc<Volume>> {
        None
    }

    fn remote(&self) -> Option<&RemoteVolume> {
        Some(&self.remote)
    }

    fn step_tracks_max(&self) -> usize {
        super::REMOTE_STEP_TRACKS_MAX
    }

    fn apply<'a>(
        &'a self,
        _changes: &mut VolumeChanges<'a>,
        operation: TargetOperation,
    ) -> Result<TargetAnswer> {
        crate::failpoints::hit("node::session::target-operation")?;
        self.link()?
            .call_within(&self.remote, operation, self.timeout)
    }

    fn end<'a>(
        &'a self,
        changes: &mut VolumeChanges<'a>,
        release: TargetOperation,
    ) -> Result<Option<OwedRelease>> {
        let owed = OwedRelease {
            session: self.session,
            remote: self.remote.clone(),
            release,
        };
        changes.put(Space::Meta, release_key(self.session), owed.encode()?);
        Ok(Some(owed))
    }

    fn take_over<'a>(&'a self, _changes: &mut VolumeChanges<'a>) -> Result<()> {
        Ok(())
    }

    fn store(
        &self,
        images: Vec<TrackImage>,
        source_bits: Vec<Vec<BitChange<'_>>>,
        options: StoreOptions,
    ) -> Vec<Result<bool>> {
        if images.is_empty() {
            return Vec::new();
        }
        let link = match self.link() {
            Ok(link) => link,
            Err(error) => {
                let detail = error.to_string();
                return images
                    .iter()
                    .map(|_| {
                        Err(Error::Config {
                            detail: detail.clone(),
                        })
                    })
                    .collect();
            }
        };
        let bytes: Vec<u64> = images.iter().map(|image| image.data.len() as u64).collect();
        let operations = images
            .into_iter()
            .map(|image| TargetOperation::PutTrack {
                session: self.session,
                image,
                only_if_invalid: options.only_if_invalid,
                synced: options.target_synced,
                background: options.background,
            })
            .collect();
        let answers = match options.timeout {
            Some(timeout) => link.call_many_within(&self.remote, operations, timeout),
            None => link.call_many(&self.remote, operations),
        };
        answers
            .into_iter()
            .enumerate()
            .map(|(index, answer)| {
                let stored = match answer? {
                    TargetAnswer::Stored(stored) => stored,
                    answer => return Err(unexpected(&self.remote, &answer)),
                };
                // Only now, with the track acknowledged, may the source's bits change.
                let bits = source_bits.get(index).map_or(&[][..], Vec::as_slice);
                self.sessions
                    .store
                    .change_track_bits(bits, options.durability)?;
                if stored {
                    metrics::counter!("tandem_copy_tracks_total").increment(1);
                    metrics::counter!("tandem_copy_bytes_total").increment(bytes[index]);
                }
                Ok(stored)
            })
            .collect()
    }

    fn read(&self, track: u64) -> Result<TrackImage> {
        let answer = self.link()?.call(
            &self.remote,
            TargetOperation::GetTrack {
                session: self.session,
                track,
            },
        )?;
        match answer {
            TargetAnswer::Track(image) if image.track == track => Ok(image),
            answer => Err(unexpected(&self.remote, &answer)),
        }
    }

    fn answers(&self, timeout: Duration) -> bool {
        self.link().is_ok_and(|link| {
            link.call_within(
                &self.remote,
                TargetOperation::Probe {
                    session: self.session,
                },
                timeout,
            )
            .is_ok()
        })
    }
}

/// Reads what a query of the target answered, or says what came instead.
pub(super) fn tracks_answer(target: &dyn Target, answer: TargetAnswer) -> Result<Vec<u64>> {
    match answer {
        TargetAnswer::Tracks(tracks) => Ok(tracks),
        answer => Err(wrong_answer(target, &answer)),
    }
}

pub(super) fn count_answer(target: &dyn Target, answer: TargetAnswer) -> Result<u64> {
    match answer {
        TargetAnswer::Count(count) => Ok(count),
        answer => Err(wrong_answer(target, &answer)),
    }
}

fn wrong_answer(target: &dyn Target, answer: &TargetAnswer) -> Error {
    match target.remote() {
        Some(remote) => unexpected(remote, answer),
        None => Error::Engine {
            detail: format!("a target on this node answered {answer:?}"),
        },
    }
}
