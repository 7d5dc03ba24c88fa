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
            ReferenceKind::Data { layer } => Some(layer),
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
        for extent in extents {
            let first = reference.first_track.max(extent.first);
            let last = reference.last_track.min(extent.last);
            if first <= last {
                new_target.push(LayerReference {
                    kind: reference.kind,
                    first_track: first,
                    last_track: last,
                });
            }
        }
    }
    for extent in extents {
        new_target.push(LayerReference::zero(extent.first, extent.last));
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
                ReferenceKind::Data { .. } => {}
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
