//! Pointer snapshots (seed 003's internal snap): shared data, copy-on-write after,
//! extents, deletion of either side, and a cost independent of the volume size.

use crate::common::{memory_store, pattern, RocksFixture};
use node::engine::{Durability, Engine, Space};
use node::store::VolumeStore;
use node::Error;
use protocol::messages::Extent;

const TRACK: u64 = 64 << 10;

fn fill<E: Engine>(store: &VolumeStore<E>, name: &str, seed: u8, tracks: u64) {
    let volume = store.volume(name).unwrap();
    for track in 0..tracks {
        store
            .write(
                &volume,
                track * TRACK,
                &pattern(seed.wrapping_add(track as u8), TRACK as usize),
                Durability::Logged,
            )
            .unwrap();
    }
}

fn track_of<E: Engine>(store: &VolumeStore<E>, name: &str, track: u64) -> Vec<u8> {
    let volume = store.volume(name).unwrap();
    store.read(&volume, track * TRACK, TRACK).unwrap()
}

fn old_data_stays_in_the_snapshot_and_the_other_way_round<E: Engine>(store: &VolumeStore<E>) {
    store.create("source", 16 * TRACK, TRACK as u32).unwrap();
    fill(store, "source", 1, 16);
    let (snapshot, created) = store.snap("source", "snapshot", &[]).unwrap();
    assert!(created);
    assert_eq!(snapshot.size_bytes, 16 * TRACK);
    // Rewrite half the source, and a partial block of another track.
    let source = store.volume("source").unwrap();
    for track in 0..8 {
        store
            .write(
                &source,
                track * TRACK,
                &pattern(200, TRACK as usize),
                Durability::Logged,
            )
            .unwrap();
    }
    store
        .write(&source, 12 * TRACK + 512, &[0xee; 512], Durability::Logged)
        .unwrap();
    for track in 0..16 {
        assert_eq!(
            track_of(store, "snapshot", track),
            pattern(1 + track as u8, TRACK as usize),
            "snapshot track {track}"
        );
    }
    // And the other way round: writes to the snapshot do not show in the source.
    store
        .write(
            &snapshot,
            15 * TRACK,
            &pattern(77, TRACK as usize),
            Durability::Logged,
        )
        .unwrap();
    assert_eq!(track_of(store, "source", 15), pattern(16, TRACK as usize));
    assert_eq!(track_of(store, "snapshot", 15), pattern(77, TRACK as usize));
    assert_eq!(track_of(store, "source", 3), pattern(200, TRACK as usize));
    let mut expected = pattern(13, TRACK as usize);
    expected[512..1024].fill(0xee);
    assert_eq!(track_of(store, "source", 12), expected);
}

#[test]
fn old_data_stays_in_the_snapshot_and_the_other_way_round_on_both_engines() {
    old_data_stays_in_the_snapshot_and_the_other_way_round(&memory_store());
    old_data_stays_in_the_snapshot_and_the_other_way_round(RocksFixture::new().store());
}

#[test]
fn an_extent_snap_covers_only_its_extent() {
    let store = memory_store();
    store.create("source", 16 * TRACK, TRACK as u32).unwrap();
    store.create("target", 16 * TRACK, TRACK as u32).unwrap();
    fill(&store, "source", 1, 16);
    fill(&store, "target", 100, 16);
    let (_, created) = store
        .snap(
            "source",
            "target",
            &[
                Extent { first: 2, last: 4 },
                Extent {
                    first: 10,
                    last: 10,
                },
            ],
        )
        .unwrap();
    assert!(!created);
    for track in 0..16 {
        let from_source = (2..=4).contains(&track) || track == 10;
        let seed = if from_source { 1 } else { 100 };
        assert_eq!(
            track_of(&store, "target", track),
            pattern(seed + track as u8, TRACK as usize),
            "target track {track}"
        );
    }
}

#[test]
fn an_extent_snap_of_unwritten_source_tracks_reads_zeros_on_the_target() {
    let store = memory_store();
    store.create("source", 8 * TRACK, TRACK as u32).unwrap();
    store.create("target", 8 * TRACK, TRACK as u32).unwrap();
    fill(&store, "target", 50, 8);
    store
        .snap("source", "target", &[Extent { first: 1, last: 2 }])
        .unwrap();
    assert_eq!(track_of(&store, "target", 1), vec![0u8; TRACK as usize]);
    assert_eq!(track_of(&store, "target", 3), pattern(53, TRACK as usize));
}

#[test]
fn deleting_either_side_keeps_the_other_whole_and_frees_what_nothing_references() {
    for delete_source in [true, false] {
        let store = memory_store();
        store.create("source", 8 * TRACK, TRACK as u32).unwrap();
        fill(&store, "source", 1, 8);
        store.snap("source", "snapshot", &[]).unwrap();
        let source = store.volume("source").unwrap();
        store
            .write(&source, 0, &pattern(99, TRACK as usize), Durability::Logged)
            .unwrap();
        let shared_bytes = store.engine().approximate_bytes(Space::Blocks).unwrap();
        let (deleted, kept) = if delete_source {
            ("source", "snapshot")
        } else {
            ("snapshot", "source")
        };
        store.delete(deleted).unwrap();
        for track in 1..8 {
            assert_eq!(
                track_of(&store, kept, track),
                pattern(1 + track as u8, TRACK as usize)
            );
        }
        let expected_track_zero = if delete_source {
            pattern(1, TRACK as usize)
        } else {
            pattern(99, TRACK as usize)
        };
        assert_eq!(track_of(&store, kept, 0), expected_track_zero);
        if delete_source {
            // The source's own rewrite of track 0 is referenced by nothing now.
            assert!(store.engine().approximate_bytes(Space::Blocks).unwrap() < shared_bytes);
        }
        store.delete(kept).unwrap();
        assert_eq!(store.engine().approximate_bytes(Space::Blocks).unwrap(), 0);
    }
}

#[test]
fn snapshots_survive_a_restart() {
    let mut fixture = RocksFixture::new();
    fixture
        .store()
        .create("source", 4 * TRACK, TRACK as u32)
        .unwrap();
    fill(fixture.store(), "source", 5, 4);
    fixture.store().snap("source", "snapshot", &[]).unwrap();
    let source = fixture.store().volume("source").unwrap();
    fixture
        .store()
        .write(&source, 0, &pattern(60, TRACK as usize), Durability::Synced)
        .unwrap();
    fixture.reopen();
    assert_eq!(
        track_of(fixture.store(), "snapshot", 0),
        pattern(5, TRACK as usize)
    );
    assert_eq!(
        track_of(fixture.store(), "source", 0),
        pattern(60, TRACK as usize)
    );
}

#[test]
fn bad_snap_requests_are_refused_and_change_nothing() {
    let store = memory_store();
    store.create("source", 8 * TRACK, TRACK as u32).unwrap();
    store.create("small", 4 * TRACK, TRACK as u32).unwrap();
    store.create("other-tracks", 8 * TRACK, 4096).unwrap();
    fill(&store, "source", 1, 8);
    let before = store.list();
    assert!(matches!(
        store.snap("source", "source", &[]),
        Err(Error::SnapRefused { .. })
    ));
    assert!(matches!(
        store.snap("missing", "x", &[]),
        Err(Error::VolumeNotFound { .. })
    ));
    assert!(matches!(
        store.snap("source", "small", &[]),
        Err(Error::SnapRefused { .. })
    ));
    assert!(matches!(
        store.snap("source", "other-tracks", &[]),
        Err(Error::SnapRefused { .. })
    ));
    assert!(matches!(
        store.snap("source", "small", &[Extent { first: 3, last: 5 }]),
        Err(Error::ExtentOutOfRange { .. })
    ));
    assert!(matches!(
        store.snap("source", "new", &[Extent { first: 0, last: 8 }]),
        Err(Error::ExtentOutOfRange { .. })
    ));
    assert!(matches!(
        store.snap("source", "bad name", &[]),
        Err(Error::VolumeNameInvalid { .. })
    ));
    assert_eq!(store.list(), before);
}

#[test]
fn snapping_touches_no_tracks_so_a_big_volume_snaps_like_a_small_one() {
    // The work of a snapshot is counted in engine operations: it must not depend on how
    // many tracks the volume has or holds.
    let fixture_small = RocksFixture::new();
    let fixture_big = RocksFixture::new();
    let small = fixture_small.store();
    let big = fixture_big.store();
    small.create("v", 64 * TRACK, TRACK as u32).unwrap();
    big.create("v", 4096 * TRACK, TRACK as u32).unwrap();
    fill(small, "v", 1, 64);
    fill(big, "v", 1, 1024);
    let meta_before = (
        small.engine().approximate_bytes(Space::Blocks).unwrap(),
        big.engine().approximate_bytes(Space::Blocks).unwrap(),
    );
    small.snap("v", "s", &[]).unwrap();
    big.snap("v", "s", &[]).unwrap();
    let meta_after = (
        small.engine().approximate_bytes(Space::Blocks).unwrap(),
        big.engine().approximate_bytes(Space::Blocks).unwrap(),
    );
    // No block was copied or rewritten by either snapshot.
    assert_eq!(meta_before, meta_after);
    assert_eq!(
        small.volume("s").unwrap().info().layer_depth,
        big.volume("s").unwrap().info().layer_depth
    );
}

#[test]
fn an_extent_snap_into_a_larger_target_keeps_the_targets_later_tracks_writable() {
    let store = memory_store();
    store.create("source", 16 * TRACK, TRACK as u32).unwrap();
    store.create("target", 64 * TRACK, TRACK as u32).unwrap();
    fill(&store, "source", 1, 16);
    fill(&store, "target", 100, 64);
    store
        .snap("source", "target", &[Extent { first: 2, last: 4 }])
        .unwrap();
    let target = store.volume("target").unwrap();
    // Tracks beyond the source's size were invisible to writes when the target's new top
    // was sized by the source.
    store
        .write(
            &target,
            40 * TRACK,
            &pattern(7, TRACK as usize),
            Durability::Logged,
        )
        .unwrap();
    store
        .write(&target, 50 * TRACK + 512, &[0xab; 512], Durability::Logged)
        .unwrap();
    assert_eq!(track_of(&store, "target", 40), pattern(7, TRACK as usize));
    let mut expected = pattern(100 + 50, TRACK as usize);
    expected[512..1024].fill(0xab);
    assert_eq!(track_of(&store, "target", 50), expected);
    assert_eq!(track_of(&store, "target", 3), pattern(4, TRACK as usize));
}

#[test]
fn backwards_extents_from_the_network_are_refused() {
    let store = memory_store();
    store.create("source", 8 * TRACK, TRACK as u32).unwrap();
    // Extent's fields are public and arrive decoded from frames, past Extent::new.
    let backwards = Extent { first: 5, last: 2 };
    assert!(matches!(
        store.snap("source", "copy", &[backwards]),
        Err(Error::ExtentOutOfRange { .. })
    ));
    assert!(store.volume("copy").is_err());
}

/// A snap whose source extents land on other tracks of the target (a gsnap with extents
/// at other offsets): source tracks 2-3 and 6 land, in order, on target tracks 10-12 of
/// a larger target it makes; the target's other tracks read zeros; the source writes on
/// without the target seeing it; a second mapped snap of the target composes the
/// offsets; all of it survives a restart.
#[test]
fn a_mapped_snap_lands_tracks_at_an_offset_and_survives_restart() {
    let mut fixture = RocksFixture::new();
    let store = fixture.store();
    store.create("source", 8 * TRACK, TRACK as u32).unwrap();
    fill(store, "source", 7, 8);
    let extent = |first, last| Extent { first, last };
    let (target, created) = store
        .snap_mapped(
            "source",
            "target",
            &[extent(2, 3), extent(6, 6)],
            &[extent(10, 12)],
            false,
            Some(16 * TRACK),
        )
        .unwrap();
    assert!(created);
    assert_eq!(target.size_bytes, 16 * TRACK);
    let source = store.volume("source").unwrap();
    store
        .write(
            &source,
            2 * TRACK,
            &pattern(99, TRACK as usize),
            Durability::Synced,
        )
        .unwrap();
    // Composed: target tracks 11-12 (source 3 and 6) land on tracks 0-1 of another.
    store
        .snap_mapped(
            "target",
            "again",
            &[extent(11, 12)],
            &[extent(0, 1)],
            false,
            None,
        )
        .unwrap();
    let check = |store: &VolumeStore<_>| {
        assert_eq!(
            track_of(store, "target", 10),
            pattern(7 + 2, TRACK as usize)
        );
        assert_eq!(
            track_of(store, "target", 11),
            pattern(7 + 3, TRACK as usize)
        );
        assert_eq!(
            track_of(store, "target", 12),
            pattern(7 + 6, TRACK as usize)
        );
        assert_eq!(track_of(store, "target", 2), vec![0; TRACK as usize]);
        assert_eq!(track_of(store, "again", 0), pattern(7 + 3, TRACK as usize));
        assert_eq!(track_of(store, "again", 1), pattern(7 + 6, TRACK as usize));
        assert_eq!(track_of(store, "source", 2), pattern(99, TRACK as usize));
    };
    check(fixture.store());
    fixture.reopen();
    check(fixture.store());
    // Lists that pair no tracks in order are refused and change nothing.
    let store = fixture.store();
    assert!(store
        .snap_mapped(
            "source",
            "bad",
            &[extent(0, 1)],
            &[extent(0, 2)],
            false,
            Some(8 * TRACK)
        )
        .is_err());
    assert!(store
        .snap_mapped(
            "source",
            "bad",
            &[extent(3, 4), extent(0, 1)],
            &[extent(0, 3)],
            false,
            Some(8 * TRACK)
        )
        .is_err());
    assert!(store
        .snap_mapped(
            "source",
            "bad",
            &[extent(0, 1)],
            &[extent(7, 8)],
            false,
            Some(8 * TRACK)
        )
        .is_err());
    assert!(store.volume("bad").is_err());
}
