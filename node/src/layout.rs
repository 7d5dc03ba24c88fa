//! How a volume's tracks map onto storage layers: the pointer table of seed 003.
//!
//! A volume's *view* is an ordered list of layer references. The first is the volume's
//! own writable top layer, covering every track. A read of a track walks the view from
//! the top and takes the first layer that holds the block; a `Zero` reference stops the
//! walk with zeros, so data below it cannot show through.
//!
//! A pointer snapshot SRC → DST freezes SRC's top layer, gives SRC a fresh top and stacks
//! SRC's old references (limited to the snapped extents) onto DST over a zero barrier.
//! Its cost depends on the number of references, never on the number of tracks, so a
//! 4 GiB volume snaps as fast as a 4 MiB one. Layers are shared by reference count (the
//! number of references to them across all views); a layer nobody references any more is
//! deleted. This module is pure: it computes views, the store persists them.

use protocol::messages::Extent;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A view longer than this is refused: each reference costs a lookup on cold reads.
pub const VIEW_REFERENCES_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReferenceKind {
    /// Blocks of the layer show through for the covered tracks.
    Data { layer: u64 },
    /// The covered tracks read as zeros; nothing below shows through.
    Zero,
    /// Blocks of the layer show through `shift` tracks away: view track `t` reads the
    /// layer's track `t + shift` (a snap that lands a source's tracks at other track
    /// numbers, as a gsnap with extents at other offsets does). The shift is the same
    /// for every covered track, so trimming a reference keeps it. Appended last, so
    /// volume records stored before it still decode.
    DataShifted { layer: u64, shift: i64 },
}

impl ReferenceKind {
    /// This kind seen from `by` tracks further on: a reference moved from view track `t`
    /// to `t + by` still reads the same layer tracks.
    fn moved(self, by: i64) -> ReferenceKind {
        let (layer, shift) = match self {
            ReferenceKind::Zero => return ReferenceKind::Zero,
            ReferenceKind::Data { layer } => (layer, 0),
            ReferenceKind::DataShifted { layer, shift } => (layer, shift),
        };
        match shift - by {
            0 => ReferenceKind::Data { layer },
            shift => ReferenceKind::DataShifted { layer, shift },
        }
    }
}

/// Source tracks `source_first..source_first + tracks` land on target tracks
/// `target_first..target_first + tracks`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackMap {
    pub source_first: u64,
    pub target_first: u64,
    pub tracks: u64,
}

/// Each extent onto the same tracks.
pub fn identity_map(extents: &[Extent]) -> Vec<TrackMap> {
    extents
        .iter()
        .map(|extent| TrackMap {
            source_first: extent.first,
            target_first: extent.first,
            tracks: extent.track_count(),
        })
        .collect()
}

/// The source's tracks in the order of its extents onto the target's in the order of
/// its extents, split where either list's extents end; `None` when the two lists hold
/// different numbers of tracks.
pub fn map_extents(source: &[Extent], target: &[Extent]) -> Option<Vec<TrackMap>> {
    let total = |extents: &[Extent]| extents.iter().map(Extent::track_count).sum::<u64>();
    if total(source) != total(target) {
        return None;
    }
    let mut map = Vec::new();
    let (mut sources, mut targets) = (source.iter(), target.iter());
    let (mut source_next, mut target_next) = (sources.next().copied(), targets.next().copied());
    while let (Some(from), Some(to)) = (source_next, target_next) {
        let tracks = from.track_count().min(to.track_count());
        map.push(TrackMap {
            source_first: from.first,
            target_first: to.first,
            tracks,
        });
        source_next = if tracks == from.track_count() {
            sources.next().copied()
        } else {
            Some(Extent {
                first: from.first + tracks,
                last: from.last,
            })
        };
        target_next = if tracks == to.track_count() {
            targets.next().copied()
        } else {
            Some(Extent {
                first: to.first + tracks,
                last: to.last,
            })
        };
    }
    Some(map)
}

/// One entry of a view: tracks `first_track..=last_track` resolve through `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerReference {
    pub kind: ReferenceKind,
    pub first_track: u64,
    pub last_track: u64,
}

impl LayerReference {
    pub fn data(layer: u64, first_track: u64, last_track: u64) -> LayerReference {
        LayerReference {
            kind: ReferenceKind::Data { layer },
            first_track,
            last_track,
        }
    }

    pub fn zero(first_track: u64, last_track: u64) -> LayerReference {
        LayerReference {
            kind: ReferenceKind::Zero,
            first_track,
            last_track,
        }
    }

    pub fn covers(&self, track: u64) -> bool {
        self.first_track <= track && track <= self.last_track
    }

    pub fn layer(&self) -> Option<u64> {
        match self.kind {
            ReferenceKind::Data { layer } | ReferenceKind::DataShifted { layer, .. } => Some(layer),
            ReferenceKind::Zero => None,
        }
    }
}

/// The layer a volume writes into: always the first reference of its view.
pub fn top_layer(view: &[LayerReference]) -> u64 {
    match view.first().map(|reference| reference.kind) {
        Some(ReferenceKind::Data { layer }) => layer,
        // Views are built only by this module, which always puts a data top first.
        _ => unreachable!("a view always starts with its data top layer"),
    }
}

/// The view of a new, empty volume.
pub fn new_view(top: u64, track_count: u64) -> Vec<LayerReference> {
    vec![LayerReference::data(top, 0, track_count - 1)]
}

/// Sorts extents and merges overlapping or adjacent ones.
pub fn normalize_extents(extents: &[Extent]) -> Vec<Extent> {
    let mut sorted = extents.to_vec();
    sorted.sort_by_key(|extent| extent.first);
    let mut merged: Vec<Extent> = Vec::with_capacity(sorted.len());
    for extent in sorted {
        match merged.last_mut() {
            Some(previous) if extent.first <= previous.last.saturating_add(1) => {
                previous.last = previous.last.max(extent.last);
            }
            _ => merged.push(extent),
        }
    }
    merged
}

/// The two views after a snapshot of `source` into `target` over `extents` (normalized,
/// within both volumes), with fresh top layers for both.
pub fn snap_views(
    source: &[LayerReference],
    target: &[LayerReference],
    extents: &[Extent],
    new_source_top: u64,
    new_target_top: u64,
    source_track_count: u64,
    target_track_count: u64,
) -> (Vec<LayerReference>, Vec<LayerReference>) {
    snap_views_mapped(
        source,
        target,
        &identity_map(extents),
        new_source_top,
        new_target_top,
        source_track_count,
        target_track_count,
    )
}

/// [`snap_views`] with the source's tracks landing where `map` says on the target (every
/// segment within both volumes, the target's segments not overlapping): the target's
/// references to the source's layers are moved to the target's track numbers.
pub fn snap_views_mapped(
    source: &[LayerReference],
    target: &[LayerReference],
    map: &[TrackMap],
    new_source_top: u64,
    new_target_top: u64,
    source_track_count: u64,
    target_track_count: u64,
) -> (Vec<LayerReference>, Vec<LayerReference>) {
    let mut new_source = Vec::with_capacity(source.len() + 1);
    new_source.push(LayerReference::data(
        new_source_top,
        0,
        source_track_count - 1,
    ));
    new_source.extend_from_slice(source);

    // The target's top covers the target's own tracks, which may be more than the
    // source has when only extents are snapped.
    let mut new_target = vec![LayerReference::data(
        new_target_top,
        0,
        target_track_count - 1,
    )];
    for reference in source {
        for segment in map {
            let source_last = segment.source_first + segment.tracks - 1;
            let first = reference.first_track.max(segment.source_first);
            let last = reference.last_track.min(source_last);
            if first <= last {
                // Track numbers fit in i64: volumes hold far fewer than 2^63 tracks.
                let by = segment.target_first as i64 - segment.source_first as i64;
                new_target.push(LayerReference {
                    kind: reference.kind.moved(by),
                    first_track: first.wrapping_add_signed(by),
                    last_track: last.wrapping_add_signed(by),
                });
            }
        }
    }
    for segment in map {
        new_target.push(LayerReference::zero(
            segment.target_first,
            segment.target_first + segment.tracks - 1,
        ));
    }
    new_target.extend_from_slice(target);
    (new_source, prune(new_target))
}

/// Drops or trims references whose tracks are all hidden under zero references above
/// them, and merges zero references, so repeated snapshots onto one target do not grow
/// its view without bound.
pub fn prune(view: Vec<LayerReference>) -> Vec<LayerReference> {
    // Track intervals already hidden by zero references higher in the view, kept sorted
    // and disjoint.
    let mut hidden: Vec<(u64, u64)> = Vec::new();
    let mut kept = Vec::with_capacity(view.len());
    for (position, reference) in view.into_iter().enumerate() {
        let visible = subtract(reference.first_track, reference.last_track, &hidden);
        // The top layer stays whole whatever lies above it: it is where writes go.
        if position == 0 {
            kept.push(reference);
        } else {
            for (first, last) in &visible {
                kept.push(LayerReference {
                    kind: reference.kind,
                    first_track: *first,
                    last_track: *last,
                });
            }
        }
        if reference.kind == ReferenceKind::Zero {
            hidden = union(&hidden, reference.first_track, reference.last_track);
        }
    }
    // Zero references with nothing below them change no read: unheld tracks read as
    // zeros anyway.
    while kept.len() > 1
        && kept
            .last()
            .is_some_and(|reference| reference.kind == ReferenceKind::Zero)
    {
        kept.pop();
    }
    kept
}

fn subtract(first: u64, last: u64, hidden: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut visible = Vec::new();
    let mut cursor = first;
    for &(hidden_first, hidden_last) in hidden {
        if hidden_last < cursor || hidden_first > last {
            continue;
        }
        if hidden_first > cursor {
            visible.push((cursor, hidden_first - 1));
        }
        if hidden_last >= last {
            return visible;
        }
        cursor = hidden_last + 1;
    }
    visible.push((cursor, last));
    visible
}

fn union(hidden: &[(u64, u64)], first: u64, last: u64) -> Vec<(u64, u64)> {
    let extents: Vec<Extent> = hidden
        .iter()
        .map(|&(first, last)| Extent { first, last })
        .chain(std::iter::once(Extent { first, last }))
        .collect();
    normalize_extents(&extents)
        .into_iter()
        .map(|extent| (extent.first, extent.last))
        .collect()
}

/// How many references each layer has in a set of views.
pub fn reference_counts<'a>(
    views: impl IntoIterator<Item = &'a [LayerReference]>,
) -> BTreeMap<u64, u64> {
    let mut counts = BTreeMap::new();
    for view in views {
        for reference in view {
            if let Some(layer) = reference.layer() {
                *counts.entry(layer).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves a track the way the store reads: the first covering reference whose layer
    /// holds the track wins; `holds` says which layers hold which tracks.
    fn resolve(
        view: &[LayerReference],
        track: u64,
        holds: &dyn Fn(u64, u64) -> bool,
    ) -> Option<u64> {
        for reference in view.iter().filter(|reference| reference.covers(track)) {
            match reference.kind {
                ReferenceKind::Zero => return None,
                ReferenceKind::Data { layer } if holds(layer, track) => return Some(layer),
                ReferenceKind::Data { .. } | ReferenceKind::DataShifted { .. } => {}
            }
        }
        None
    }

    #[test]
    fn a_whole_snap_shares_the_source_and_hides_the_old_target() {
        let source = new_view(1, 100);
        let target = new_view(2, 100);
        let (new_source, new_target) = snap_views(
            &source,
            &target,
            &[Extent { first: 0, last: 99 }],
            3,
            4,
            100,
            100,
        );
        assert_eq!(top_layer(&new_source), 3);
        assert_eq!(top_layer(&new_target), 4);
        // Everything held by layer 1 before the snap resolves to layer 1 on both sides.
        let holds = |layer: u64, _track: u64| layer == 1 || layer == 2;
        assert_eq!(resolve(&new_source, 50, &holds), Some(1));
        assert_eq!(resolve(&new_target, 50, &holds), Some(1));
        // The old target layer 2 is gone from the target's view entirely.
        assert!(new_target
            .iter()
            .all(|reference| reference.layer() != Some(2)));
    }

    #[test]
    fn an_extent_snap_changes_only_its_extent() {
        let source = new_view(1, 100);
        let target = new_view(2, 100);
        let extent = Extent {
            first: 10,
            last: 19,
        };
        let (_, new_target) = snap_views(&source, &target, &[extent], 3, 4, 100, 100);
        let only_target_holds = |layer: u64, _track: u64| layer == 2;
        // Outside the extent the old target data still shows; inside it is hidden and,
        // since the source holds nothing there, reads zeros.
        assert_eq!(resolve(&new_target, 5, &only_target_holds), Some(2));
        assert_eq!(resolve(&new_target, 15, &only_target_holds), None);
        let only_source_holds = |layer: u64, _track: u64| layer == 1;
        assert_eq!(resolve(&new_target, 15, &only_source_holds), Some(1));
        assert_eq!(resolve(&new_target, 25, &only_source_holds), None);
    }

    #[test]
    fn repeated_snaps_onto_one_target_keep_its_view_bounded() {
        let mut source = new_view(1, 64);
        let mut target = new_view(2, 64);
        let mut next_layer = 3;
        for _ in 0..50 {
            let (new_source, new_target) = snap_views(
                &source,
                &target,
                &[Extent { first: 0, last: 63 }],
                next_layer,
                next_layer + 1,
                64,
                64,
            );
            source = new_source;
            target = new_target;
            next_layer += 2;
        }
        // The source grows by one frozen layer a snap; the target never holds more than
        // its top and the source's layers (the zero barrier at the bottom hides nothing).
        assert_eq!(source.len(), 51);
        assert_eq!(target.len(), source.len());
        assert!(target
            .iter()
            .all(|reference| reference.kind != ReferenceKind::Zero));
    }

    #[test]
    fn extents_are_sorted_and_merged() {
        let merged = normalize_extents(&[
            Extent {
                first: 20,
                last: 30,
            },
            Extent { first: 0, last: 5 },
            Extent { first: 6, last: 8 },
            Extent {
                first: 25,
                last: 40,
            },
        ]);
        assert_eq!(
            merged,
            vec![
                Extent { first: 0, last: 8 },
                Extent {
                    first: 20,
                    last: 40
                }
            ]
        );
    }

    #[test]
    fn extents_pair_in_order_split_where_either_ends() {
        let extent = |first, last| Extent { first, last };
        assert_eq!(
            map_extents(&[extent(0, 9)], &[extent(100, 103), extent(200, 205)]),
            Some(vec![
                TrackMap {
                    source_first: 0,
                    target_first: 100,
                    tracks: 4
                },
                TrackMap {
                    source_first: 4,
                    target_first: 200,
                    tracks: 6
                },
            ])
        );
        assert_eq!(map_extents(&[extent(0, 9)], &[extent(0, 8)]), None);
    }

    /// The layer track a view track reads through its first covering reference.
    fn layer_track(view: &[LayerReference], track: u64) -> Option<(u64, u64)> {
        view.iter()
            .find(|reference| reference.covers(track))
            .and_then(|reference| match reference.kind {
                ReferenceKind::Zero => None,
                ReferenceKind::Data { layer } => Some((layer, track)),
                ReferenceKind::DataShifted { layer, shift } => {
                    Some((layer, track.wrapping_add_signed(shift)))
                }
            })
    }

    #[test]
    fn a_mapped_snap_lands_the_source_tracks_at_the_target_offset_and_composes() {
        // Source tracks 10-19 land on target tracks 50-59 of a larger target.
        let source = new_view(1, 100);
        let target = new_view(2, 200);
        let map = [TrackMap {
            source_first: 10,
            target_first: 50,
            tracks: 10,
        }];
        let (_, target_view) = snap_views_mapped(&source, &target, &map, 3, 4, 100, 200);
        // Under the target's top (4): track 55 reads the source's old layer 1 at track 15.
        let below_top = &target_view[1..];
        assert_eq!(layer_track(below_top, 55), Some((1, 15)));
        assert_eq!(layer_track(below_top, 50), Some((1, 10)));
        assert_eq!(
            layer_track(below_top, 60),
            Some((2, 60)),
            "outside, the old target"
        );
        // Snapped on again at another offset (50 → 0), the shift composes: track 5 reads
        // layer 1's track 15.
        let further = new_view(5, 200);
        let back = [TrackMap {
            source_first: 50,
            target_first: 0,
            tracks: 10,
        }];
        let (_, composed) = snap_views_mapped(&target_view, &further, &back, 6, 7, 200, 200);
        assert_eq!(
            layer_track(&composed[1..], 5),
            Some((4, 55)),
            "the target's own top first"
        );
        let without_top: Vec<LayerReference> = composed[1..]
            .iter()
            .filter(|reference| reference.layer() != Some(4))
            .copied()
            .collect();
        assert_eq!(layer_track(&without_top, 5), Some((1, 15)));
    }

    #[test]
    fn a_shifted_reference_partly_hidden_by_a_later_snap_keeps_its_shift() {
        // Source tracks 10-19 land on target tracks 50-59 (shift -40)...
        let source = new_view(1, 100);
        let target = new_view(2, 200);
        let map = [TrackMap {
            source_first: 10,
            target_first: 50,
            tracks: 10,
        }];
        let (_, target_view) = snap_views_mapped(&source, &target, &map, 3, 4, 100, 200);
        // ...then another volume's tracks 55-57 land on the same target tracks, hiding the
        // middle of that reference: prune trims it into 50-54 and 58-59.
        let other = new_view(5, 200);
        let (_, again) = snap_views(
            &other,
            &target_view,
            &[Extent {
                first: 55,
                last: 57,
            }],
            6,
            7,
            200,
            200,
        );
        let without_tops: Vec<LayerReference> = again
            .iter()
            .filter(|reference| !matches!(reference.layer(), Some(4 | 7)))
            .copied()
            .collect();
        assert_eq!(layer_track(&without_tops, 54), Some((1, 14)));
        assert_eq!(layer_track(&without_tops, 56), Some((5, 56)));
        assert_eq!(layer_track(&without_tops, 58), Some((1, 18)));
        assert!(again
            .iter()
            .filter(|reference| reference.layer() == Some(1))
            .all(|reference| !reference.covers(56)));
    }

    #[test]
    fn reference_counts_count_every_view() {
        let source = new_view(1, 10);
        let target = new_view(2, 10);
        let (new_source, new_target) = snap_views(
            &source,
            &target,
            &[Extent { first: 0, last: 9 }],
            3,
            4,
            10,
            10,
        );
        let counts = reference_counts([new_source.as_slice(), new_target.as_slice()]);
        assert_eq!(counts.get(&1), Some(&2));
        assert_eq!(counts.get(&2), None);
        assert_eq!(counts.get(&3), Some(&1));
        assert_eq!(counts.get(&4), Some(&1));
    }
}
