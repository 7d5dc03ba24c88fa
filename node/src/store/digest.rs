//! Digests of a volume's stored tracks, for a gsnap's verification: each node hashes its
//! own bytes, read through the same path as every read (so each block's header and
//! checksum are verified on the way), and the leader compares the two answers.
//!
//! Tracks are hashed by their position in the extents asked for, not by their number,
//! so P's tracks and S's pair up in order wherever each side's extents start.

use super::{Volume, VolumeStore};
use crate::engine::Engine;
use crate::{Error, Result};
use protocol::gsnap::{extent_tracks, TrackDigests, DIGEST_GROUPS_MAX};
use protocol::messages::Extent;

impl<E: Engine> VolumeStore<E> {
    /// Digests of `extents` of `volume` (the whole volume when empty), one per group of
    /// `group_tracks` tracks in order, and the digest of the group digests.
    pub fn digest(
        &self,
        volume: &Volume,
        extents: &[Extent],
        group_tracks: u64,
    ) -> Result<TrackDigests> {
        let whole = [volume.whole()];
        let extents = if extents.is_empty() {
            &whole[..]
        } else {
            extents
        };
        for extent in extents {
            volume.check_extent(*extent)?;
        }
        let group_tracks = group_tracks.max(1);
        let tracks: u64 = extents.iter().map(Extent::track_count).sum();
        let groups = tracks.div_ceil(group_tracks);
        if groups > DIGEST_GROUPS_MAX {
            return Err(Error::DigestTooLarge {
                volume: volume.name.clone(),
                group_tracks,
                groups,
                groups_max: DIGEST_GROUPS_MAX,
            });
        }
        let track_bytes = u64::from(volume.track_size_bytes);
        let mut digests = Vec::with_capacity(groups as usize);
        let mut group = new_group_hasher(track_bytes);
        let mut in_group = 0;
        for track in extent_tracks(extents) {
            let data = self.read(volume, track * track_bytes, track_bytes)?;
            group.update(&data);
            in_group += 1;
            if in_group == group_tracks {
                digests.push(*group.finalize().as_bytes());
                group = new_group_hasher(track_bytes);
                in_group = 0;
            }
        }
        if in_group > 0 {
            digests.push(*group.finalize().as_bytes());
        }
        Ok(TrackDigests {
            tracks,
            bytes: tracks * track_bytes,
            group_tracks,
            whole: whole_digest(&digests),
            groups: digests,
        })
    }
}

/// A group's hasher starts with the track size, so that equal bytes in tracks of other
/// sizes do not give equal digests.
fn new_group_hasher(track_bytes: u64) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&track_bytes.to_le_bytes());
    hasher
}

/// The digest of the group digests, in order.
fn whole_digest(groups: &[[u8; 32]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for group in groups {
        hasher.update(group);
    }
    *hasher.finalize().as_bytes()
}
