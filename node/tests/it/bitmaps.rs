//! Change bitmaps for copy sessions: 16 slots, every host write marks every allocated
//! slot in the same batch as its data, and the bits survive a restart.

use crate::common::{memory_store, pattern, RocksFixture};
use node::bitmap::SESSION_SLOTS_MAX;
use node::engine::{Durability, Engine};
use node::store::{Bits, VolumeStore};
use node::Error;
use proptest::prelude::*;
use protocol::messages::Extent;
use std::collections::BTreeSet;

const TRACK: u64 = 4096;

fn set_tracks<E: Engine>(store: &VolumeStore<E>, name: &str, bits: Bits) -> Vec<u64> {
    let volume = store.volume(name).unwrap();
    let mut tracks = Vec::new();
    store
        .for_each_set(
            &volume,
            bits,
            Extent {
                first: 0,
                last: volume.track_count() - 1,
            },
            &mut |track| {
                tracks.push(track);
                true
            },
        )
        .unwrap();
    tracks
}

#[test]
fn every_host_write_marks_every_allocated_slot() {
    let store = memory_store();
    let volume = store.create("standard", 64 * TRACK, TRACK as u32).unwrap();
    let slots: Vec<u8> = (0..3)
        .map(|_| store.allocate_session_slot(&volume).unwrap())
        .collect();
    assert_eq!(slots, vec![0, 1, 2]);
    store
        .write(&volume, 5 * TRACK + 512, &[1u8; 512], Durability::Logged)
        .unwrap();
    store
        .write(
            &volume,
            9 * TRACK,
            &pattern(1, 3 * TRACK as usize),
            Durability::Logged,
        )
        .unwrap();
    store
        .write_zeroes(&volume, 40 * TRACK, TRACK, Durability::Logged)
        .unwrap();
    for slot in &slots {
        assert_eq!(
            set_tracks(&store, "standard", Bits::Session(*slot)),
            vec![5, 9, 10, 11, 40]
        );
    }
    // Clearing one slot (a session caught up) leaves the others as they were.
    store
        .change_bits(
            &volume,
            Bits::Session(1),
            Extent { first: 0, last: 63 },
            false,
        )
        .unwrap();
    assert!(set_tracks(&store, "standard", Bits::Session(1)).is_empty());
    assert_eq!(
        set_tracks(&store, "standard", Bits::Session(2)),
        vec![5, 9, 10, 11, 40]
    );
}

#[test]
fn the_seventeenth_session_is_refused_and_a_freed_slot_comes_back_clear() {
    let store = memory_store();
    let volume = store.create("standard", 16 * TRACK, TRACK as u32).unwrap();
    for _ in 0..SESSION_SLOTS_MAX {
        store.allocate_session_slot(&volume).unwrap();
    }
    assert!(matches!(
        store.allocate_session_slot(&volume),
        Err(Error::SessionSlotsExhausted { .. })
    ));
    assert_eq!(volume.info().session_slots_used, 16);
    store
        .write(&volume, 0, &[1u8; 4096], Durability::Logged)
        .unwrap();
    store.free_session_slot(&volume, 7).unwrap();
    assert!(matches!(
        store.free_session_slot(&volume, 7),
        Err(Error::SessionSlotNotAllocated { .. })
    ));
    assert!(matches!(
        store.for_each_set(
            &volume,
            Bits::Session(7),
            Extent { first: 0, last: 0 },
            &mut |_| true
        ),
        Err(Error::SessionSlotNotAllocated { .. })
    ));
    assert_eq!(store.allocate_session_slot(&volume).unwrap(), 7);
    assert!(!store.test_bit(&volume, Bits::Session(7), 0).unwrap());
    assert!(store.test_bit(&volume, Bits::Session(8), 0).unwrap());
}

#[test]
fn target_changed_bits_are_marked_only_while_tracking() {
    let store = memory_store();
    let volume = store.create("bcv", 16 * TRACK, TRACK as u32).unwrap();
    store
        .write(&volume, 0, &[1u8; 4096], Durability::Logged)
        .unwrap();
    store.set_target_tracking(&volume, true).unwrap();
    store
        .write(&volume, 3 * TRACK, &[1u8; 4096], Durability::Logged)
        .unwrap();
    store.set_target_tracking(&volume, false).unwrap();
    store
        .write(&volume, 6 * TRACK, &[1u8; 4096], Durability::Logged)
        .unwrap();
    assert_eq!(set_tracks(&store, "bcv", Bits::TargetChanged), vec![3]);
    store.mark_all(&volume, Bits::TargetChanged).unwrap();
    assert_eq!(set_tracks(&store, "bcv", Bits::TargetChanged).len(), 16);
}

#[test]
fn bits_of_acknowledged_writes_survive_a_restart() {
    let mut fixture = RocksFixture::new();
    let volume = fixture
        .store()
        .create("standard", 10_000 * TRACK, TRACK as u32)
        .unwrap();
    let slot = fixture.store().allocate_session_slot(&volume).unwrap();
    fixture.store().set_target_tracking(&volume, true).unwrap();
    // Tracks on both sides of a bitmap chunk boundary (4096 tracks a chunk).
    for track in [1u64, 4095, 4096, 9999] {
        fixture
            .store()
            .write(&volume, track * TRACK, &[3u8; 4096], Durability::Logged)
            .unwrap();
    }
    fixture.store().flush().unwrap();
    fixture.reopen();
    assert_eq!(
        set_tracks(fixture.store(), "standard", Bits::Session(slot)),
        vec![1, 4095, 4096, 9999]
    );
    assert_eq!(
        set_tracks(fixture.store(), "standard", Bits::TargetChanged),
        vec![1, 4095, 4096, 9999]
    );
    let reopened = fixture.store().volume("standard").unwrap();
    assert_eq!(
        fixture
            .store()
            .count_set(&reopened, Bits::Session(slot))
            .unwrap(),
        4,
        "the counts start from what is stored"
    );
    assert_eq!(
        fixture
            .store()
            .volume("standard")
            .unwrap()
            .info()
            .session_slots_used,
        1
    );
}

#[derive(Debug, Clone)]
enum Step {
    Allocate,
    Free(u8),
    Write { track: u64, tracks: u64 },
    Mark { slot: u8, first: u64, last: u64 },
    Clear { slot: u8, first: u64, last: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    const TRACKS: u64 = 9000;
    prop_oneof![
        2 => Just(Step::Allocate),
        1 => (0u8..16).prop_map(Step::Free),
        4 => (0..TRACKS, 1u64..40).prop_map(|(track, tracks)| Step::Write { track, tracks: tracks.min(TRACKS - track) }),
        1 => (0u8..16, 0..TRACKS, 0..TRACKS).prop_map(|(slot, a, b)| Step::Mark { slot, first: a.min(b), last: a.max(b) }),
        1 => (0u8..16, 0..TRACKS, 0..TRACKS).prop_map(|(slot, a, b)| Step::Clear { slot, first: a.min(b), last: a.max(b) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The store's bitmaps against a plain model: a set of marked tracks per slot.
    #[test]
    fn bitmaps_match_a_plain_model(steps in proptest::collection::vec(step(), 1..40)) {
        let store = memory_store();
        let volume = store.create("standard", 9000 * TRACK, TRACK as u32).unwrap();
        let mut model: Vec<Option<BTreeSet<u64>>> = vec![None; 16];
        for step in steps {
            match step {
                Step::Allocate => {
                    let expected = model.iter().position(Option::is_none);
                    match (store.allocate_session_slot(&volume), expected) {
                        (Ok(slot), Some(free)) => {
                            prop_assert_eq!(slot as usize, free);
                            model[free] = Some(BTreeSet::new());
                        }
                        (Err(Error::SessionSlotsExhausted { .. }), None) => {}
                        (other, _) => prop_assert!(false, "allocate gave {:?}", other.map_err(|error| error.to_string())),
                    }
                }
                Step::Free(slot) => {
                    let result = store.free_session_slot(&volume, slot);
                    prop_assert_eq!(result.is_ok(), model[slot as usize].is_some());
                    model[slot as usize] = None;
                }
                Step::Write { track, tracks } => {
                    store.write(&volume, track * TRACK, &vec![1u8; (tracks * TRACK) as usize], Durability::Logged).unwrap();
                    for set in model.iter_mut().flatten() {
                        set.extend(track..track + tracks);
                    }
                }
                Step::Mark { slot, first, last } | Step::Clear { slot, first, last } => {
                    let set_bits = matches!(step, Step::Mark { .. });
                    let result = store.change_bits(&volume, Bits::Session(slot), Extent { first, last }, set_bits);
                    prop_assert_eq!(result.is_ok(), model[slot as usize].is_some());
                    if let Some(set) = model[slot as usize].as_mut() {
                        for track in first..=last {
                            if set_bits { set.insert(track); } else { set.remove(&track); }
                        }
                    }
                }
            }
            // The kept counts follow every step, across chunk boundaries.
            for (slot, expected) in model.iter().enumerate() {
                if let Some(expected) = expected {
                    prop_assert_eq!(store.count_set(&volume, Bits::Session(slot as u8)).unwrap(), expected.len() as u64, "count of slot {}", slot);
                }
            }
        }
        for (slot, expected) in model.iter().enumerate() {
            if let Some(expected) = expected {
                let actual: BTreeSet<u64> = set_tracks(&store, "standard", Bits::Session(slot as u8)).into_iter().collect();
                prop_assert_eq!(&actual, expected, "slot {}", slot);
            }
        }
    }
}
