//! Block IO through the store: alignment, zeros, durability and verification.

use crate::common::{memory_store, pattern, RocksFixture};
use node::engine::{Batch, Durability, Engine, Space};
use node::store::{block_key, VolumeStore};
use node::Error;

fn writes_read_back_at_unaligned_offsets<E: Engine>(store: &VolumeStore<E>) {
    let volume = store.create("data", 1 << 20, 64 << 10).unwrap();
    // Offsets that are sector aligned but not block or track aligned, one crossing a track.
    let writes = [
        (512u64, 1024usize),
        (65536 - 1536, 4096),
        (200_704, 512),
        (4096 * 3, 8192),
    ];
    for (index, (offset, length)) in writes.iter().enumerate() {
        store
            .write(
                &volume,
                *offset,
                &pattern(index as u8, *length),
                Durability::Logged,
            )
            .unwrap();
    }
    let mut model = vec![0u8; 1 << 20];
    for (index, (offset, length)) in writes.iter().enumerate() {
        model[*offset as usize..*offset as usize + length]
            .copy_from_slice(&pattern(index as u8, *length));
    }
    assert_eq!(store.read(&volume, 0, 1 << 20).unwrap(), model);
}

#[test]
fn writes_read_back_at_unaligned_offsets_on_both_engines() {
    writes_read_back_at_unaligned_offsets(&memory_store());
    writes_read_back_at_unaligned_offsets(RocksFixture::new().store());
}

#[test]
fn bad_ranges_are_refused_and_change_nothing() {
    let store = memory_store();
    let volume = store.create("data", 1 << 20, 64 << 10).unwrap();
    store
        .write(&volume, 0, &[7u8; 4096], Durability::Logged)
        .unwrap();
    let before = store.engine().approximate_bytes(Space::Blocks).unwrap();
    assert!(matches!(
        store.write(&volume, 100, &[1u8; 512], Durability::Logged),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        store.write(&volume, (1 << 20) - 512, &[1u8; 1024], Durability::Logged),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        store.read(&volume, u64::MAX - 511, 512),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(
        store.engine().approximate_bytes(Space::Blocks).unwrap(),
        before
    );
    assert_eq!(store.read(&volume, 0, 4096).unwrap(), vec![7u8; 4096]);
}

#[test]
fn volume_geometry_and_names_are_validated() {
    let store = memory_store();
    assert!(matches!(
        store.create("bad name", 1 << 20, 65536),
        Err(Error::VolumeNameInvalid { .. })
    ));
    assert!(matches!(
        store.create("", 1 << 20, 65536),
        Err(Error::VolumeNameInvalid { .. })
    ));
    assert!(matches!(
        store.create("v", 0, 65536),
        Err(Error::VolumeSizeInvalid { .. })
    ));
    assert!(matches!(
        store.create("v", 100_000, 65536),
        Err(Error::VolumeSizeInvalid { .. })
    ));
    assert!(matches!(
        store.create("v", 1 << 20, 3000),
        Err(Error::VolumeSizeInvalid { .. })
    ));
    assert!(matches!(
        store.create("v", 4 << 20, 2 << 20),
        Err(Error::VolumeSizeInvalid { .. })
    ));
    store.create("v", 1 << 20, 4096).unwrap();
    assert!(matches!(
        store.create("v", 1 << 20, 4096),
        Err(Error::VolumeExists { .. })
    ));
    assert_eq!(store.list().len(), 1);
}

#[test]
fn unwritten_and_zeroed_tracks_read_as_zeros_and_take_no_space() {
    let store = memory_store();
    let volume = store.create("data", 4 << 20, 64 << 10).unwrap();
    assert_eq!(store.read(&volume, 0, 1 << 20).unwrap(), vec![0u8; 1 << 20]);
    assert_eq!(store.engine().approximate_bytes(Space::Blocks).unwrap(), 0);
    store
        .write(&volume, 0, &pattern(3, 1 << 20), Durability::Logged)
        .unwrap();
    assert!(store.engine().approximate_bytes(Space::Blocks).unwrap() >= 1 << 20);
    store
        .write_zeroes(&volume, 0, 1 << 20, Durability::Logged)
        .unwrap();
    assert_eq!(store.read(&volume, 0, 1 << 20).unwrap(), vec![0u8; 1 << 20]);
    assert_eq!(store.engine().approximate_bytes(Space::Blocks).unwrap(), 0);
    // Writing zeros as data frees the space as well.
    store
        .write(&volume, 8192, &pattern(4, 4096), Durability::Logged)
        .unwrap();
    store
        .write(&volume, 8192, &[0u8; 4096], Durability::Logged)
        .unwrap();
    assert_eq!(store.engine().approximate_bytes(Space::Blocks).unwrap(), 0);
}

#[test]
fn a_block_corrupted_on_disk_reads_back_as_an_error_not_as_data() {
    let mut fixture = RocksFixture::new();
    let volume = fixture.store().create("data", 1 << 20, 64 << 10).unwrap();
    fixture
        .store()
        .write(&volume, 65536, &pattern(9, 65536), Durability::Synced)
        .unwrap();
    fixture.reopen();
    let store = fixture.store();
    let volume = store.volume("data").unwrap();
    // The test hook: flip one bit of a stored block's data inside the database, as rot
    // on the disk under RocksDB would.
    let layer = volume.top_layer();
    let key = block_key(layer, 16 + 3);
    let mut stored = store
        .engine()
        .get(Space::Blocks, &key)
        .unwrap()
        .expect("block stored");
    let last = stored.len() - 1;
    stored[last] ^= 0x10;
    let mut batch = Batch::default();
    batch.put(Space::Blocks, key, stored);
    store.engine().write(batch, Durability::Synced).unwrap();

    match store.read(&volume, 65536, 65536) {
        Err(Error::Corrupt { track, .. }) => assert_eq!(track, 1),
        other => panic!(
            "a corrupt block was served: {:?}",
            other.map(|data| data.len())
        ),
    }
    // The other tracks still read, and the corrupt one can be rewritten.
    assert_eq!(store.read(&volume, 0, 65536).unwrap(), vec![0u8; 65536]);
    store
        .write(&volume, 65536, &pattern(10, 65536), Durability::Synced)
        .unwrap();
    assert_eq!(
        store.read(&volume, 65536, 65536).unwrap(),
        pattern(10, 65536)
    );
}

#[test]
fn a_block_stored_under_another_address_is_refused() {
    let store = memory_store();
    let volume = store.create("data", 1 << 20, 64 << 10).unwrap();
    store
        .write(&volume, 0, &pattern(1, 4096), Durability::Logged)
        .unwrap();
    let layer = volume.top_layer();
    let stored = store
        .engine()
        .get(Space::Blocks, &block_key(layer, 0))
        .unwrap()
        .unwrap();
    // A misdirected write: block 0's bytes land at block 5.
    let mut batch = Batch::default();
    batch.put(Space::Blocks, block_key(layer, 5), stored);
    store.engine().write(batch, Durability::Logged).unwrap();
    assert!(matches!(
        store.read(&volume, 5 * 4096, 4096),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn synced_and_logged_writes_survive_a_reopen() {
    let mut fixture = RocksFixture::new();
    let volume = fixture.store().create("data", 1 << 20, 4096).unwrap();
    fixture
        .store()
        .write(&volume, 0, &pattern(1, 8192), Durability::Synced)
        .unwrap();
    fixture
        .store()
        .write(&volume, 8192, &pattern(2, 8192), Durability::Logged)
        .unwrap();
    fixture.store().flush().unwrap();
    fixture.reopen();
    let volume = fixture.store().volume("data").unwrap();
    assert_eq!(
        fixture.store().read(&volume, 0, 8192).unwrap(),
        pattern(1, 8192)
    );
    assert_eq!(
        fixture.store().read(&volume, 8192, 8192).unwrap(),
        pattern(2, 8192)
    );
    assert_eq!(volume.track_size_bytes, 4096);
}

#[test]
fn a_deleted_volume_frees_its_space_and_its_name() {
    let store = memory_store();
    let volume = store.create("data", 1 << 20, 64 << 10).unwrap();
    store
        .write(&volume, 0, &pattern(1, 1 << 20), Durability::Logged)
        .unwrap();
    store.delete("data").unwrap();
    assert_eq!(store.engine().approximate_bytes(Space::Blocks).unwrap(), 0);
    assert!(matches!(
        store.read(&volume, 0, 512),
        Err(Error::VolumeDeleted { .. })
    ));
    assert!(matches!(
        store.delete("data"),
        Err(Error::VolumeNotFound { .. })
    ));
    let again = store.create("data", 1 << 20, 64 << 10).unwrap();
    assert_eq!(store.read(&again, 0, 4096).unwrap(), vec![0u8; 4096]);
}
