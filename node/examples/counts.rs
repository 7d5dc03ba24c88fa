//! Benchmark: what `list` and `show` pay to count a session's remaining tracks, kept
//! counts (`VolumeStore::count_set`, which re-reads only the bitmap chunks changed since
//! the last reading) against a scan of the whole bitmap (`count_set_by_scan`, what every
//! reading did before), on RocksDB, while host writes keep changing bits between readings
//! as a running copy's do.
//!
//! Run with `bash bench/counts.sh` (it prints one table row per volume size).

use node::engine::rocks::RocksEngine;
use node::engine::Durability;
use node::store::{Bits, VolumeStore};
use std::time::{Duration, Instant};

const TRACK_BYTES: u64 = 64 << 10;
/// Readings timed per method and size.
const READINGS: u32 = 200;
/// Host writes (one track each, spread over the volume) between two readings: about what
/// a half-second poll sees of a busy host.
const WRITES_BETWEEN_READINGS: u64 = 32;

fn main() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store =
        VolumeStore::open(RocksEngine::open(&directory.path().join("db")).expect("RocksDB opens"))
            .expect("the store opens");
    println!(
        "| volume | tracks | scan µs per reading | kept counts µs per reading | scan ÷ kept |"
    );
    println!("|---|---|---|---|---|");
    for gibibytes in [16u64, 256, 1024] {
        let name = format!("volume-{gibibytes}");
        let volume = store
            .create(&name, gibibytes << 30, TRACK_BYTES as u32)
            .expect("a sparse volume");
        let slot = store.allocate_session_slot(&volume).expect("a slot");
        // A full establish's work: every track pending.
        store
            .mark_all(&volume, Bits::Session(slot))
            .expect("every track marked");
        let tracks = volume.track_count();
        let data = vec![7u8; 4096];
        let mut next_track = 0u64;
        let mut time = |kept: bool| -> Duration {
            let mut total = Duration::ZERO;
            for _ in 0..READINGS {
                for _ in 0..WRITES_BETWEEN_READINGS {
                    next_track = (next_track + 7919) % tracks;
                    store
                        .write(&volume, next_track * TRACK_BYTES, &data, Durability::Logged)
                        .expect("a host write");
                }
                let started = Instant::now();
                let count = if kept {
                    store.count_set(&volume, Bits::Session(slot))
                } else {
                    store.count_set_by_scan(&volume, Bits::Session(slot))
                }
                .expect("a count");
                total += started.elapsed();
                assert_eq!(count, tracks, "every track stays marked");
            }
            total / READINGS
        };
        // The first kept reading counts every chunk once; it is not part of the figure.
        store
            .count_set(&volume, Bits::Session(slot))
            .expect("a first count");
        let scan = time(false);
        let kept = time(true);
        println!(
            "| {gibibytes} GiB | {tracks} | {} | {} | {:.0}× |",
            scan.as_micros(),
            kept.as_micros(),
            scan.as_secs_f64() / kept.as_secs_f64().max(1e-9)
        );
        store.delete(&name).expect("the volume goes");
    }
}
