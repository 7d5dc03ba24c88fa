//! Crash test in the sled style: under write load through NBD, the node process is
//! killed with SIGKILL at a random point, restarted, and every acknowledged write is
//! checked. Flushed writes are what a host may rely on after a power loss; a process
//! kill loses nothing that was acknowledged at all, since RocksDB has handed the write-
//! ahead log to the kernel before we acknowledge, so that is checked too.

use crate::common::{init, NodeProcess};
use node::nbd_client::NbdClient;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;
const VOLUME_BYTES: u64 = 16 << 20;
const BLOCK: u64 = 4096;

/// What a 4 KiB block of the volume may hold after the crash.
#[derive(Default, Clone)]
struct Expectation {
    /// Content of the last acknowledged write.
    acknowledged: Option<Vec<u8>>,
    /// Content of the write in flight when the node died, if it touched this block.
    in_flight: Option<Vec<u8>>,
    /// Whether `acknowledged` was covered by a later flush or written with FUA.
    durable: bool,
}

fn content(round: usize, sequence: u64, length: usize) -> Vec<u8> {
    let mut data = vec![0u8; length];
    for (index, chunk) in data.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&(round as u64).to_le_bytes());
        chunk[8..].copy_from_slice(&(sequence ^ index as u64).to_le_bytes());
    }
    data
}

#[test]
fn every_acknowledged_write_survives_kill_9_at_random_points() {
    let seed: u64 = std::env::var("TANDEM_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("crash test seed {seed} (set TANDEM_CRASH_SEED to replay)");
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    let directory = tempfile::tempdir().unwrap();
    let certs = init(directory.path(), "crashnode");
    let data_dir = directory.path().join("data");
    let mut expectations: HashMap<u64, Expectation> = HashMap::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut total_acknowledged = 0u64;

    for round in 0..ROUNDS {
        let mut node = if round == 0 {
            NodeProcess::start_cluster_of_one(&certs, "crashnode", &data_dir, None)
        } else {
            NodeProcess::start(&certs, "crashnode", &data_dir, None)
        };
        if round == 0 {
            node.cli_ok(
                &certs,
                &[
                    "volume",
                    "create",
                    "crash",
                    "--size",
                    "16MiB",
                    "--track-size",
                    "64KiB",
                ],
            );
        }
        // Verify everything the previous rounds were promised.
        runtime.block_on(async {
            let mut client = NbdClient::connect(node.nbd, "crash").await.unwrap();
            let image = client.read(0, VOLUME_BYTES as u32).await.unwrap().unwrap();
            for (block, expectation) in expectations.iter_mut() {
                let stored = &image[(*block * BLOCK) as usize..((*block + 1) * BLOCK) as usize];
                let matches_acknowledged = expectation.acknowledged.as_deref() == Some(stored);
                let matches_in_flight = expectation.in_flight.as_deref() == Some(stored);
                assert!(
                    matches_acknowledged || matches_in_flight,
                    "round {round} seed {seed}: block {block} lost an acknowledged{} write",
                    if expectation.durable {
                        " and flushed"
                    } else {
                        ""
                    }
                );
                // The next round starts from what is stored now.
                expectation.acknowledged = Some(stored.to_vec());
                expectation.in_flight = None;
            }
            client.disconnect().await.unwrap();
        });

        let kill_after = Duration::from_millis(random.random_range(50..600));
        let nbd = node.nbd;
        let round_seed: u64 = random.random();
        // The writer runs on the runtime while this thread kills the node.
        let writer = runtime.spawn(async move {
            let mut random = rand::rngs::StdRng::seed_from_u64(round_seed);
            let mut client = NbdClient::connect(nbd, "crash").await.unwrap();
            let mut log: Vec<(u64, u64, Vec<u8>, bool)> = Vec::new();
            let mut sequence = 0u64;
            loop {
                sequence += 1;
                let blocks = random.random_range(1..=4u64);
                let first = random.random_range(0..VOLUME_BYTES / BLOCK - blocks);
                let data = content(round, sequence, (blocks * BLOCK) as usize);
                let fua = random.random_ratio(1, 10);
                // Record the attempt before sending: if the node dies now, it is in flight.
                log.push((first, blocks, data.clone(), false));
                match client.write(first * BLOCK, &data, fua).await {
                    Ok(Ok(())) => {
                        if let Some(entry) = log.last_mut() {
                            entry.3 = true;
                        }
                    }
                    _ => return log,
                }
                if fua {
                    log.push((u64::MAX, 0, Vec::new(), true));
                }
                if random.random_ratio(1, 8) {
                    match client.flush().await {
                        Ok(Ok(())) => log.push((u64::MAX, 0, Vec::new(), true)),
                        _ => return log,
                    }
                }
            }
        });
        let started = Instant::now();
        std::thread::sleep(kill_after);
        node.kill();
        let log = runtime.block_on(writer).unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));

        // Replay the log into the expectations. A flush marker (u64::MAX) makes every
        // acknowledged write before it durable.
        let mut written_since_flush: Vec<u64> = Vec::new();
        for (first, blocks, data, acknowledged) in log {
            if first == u64::MAX {
                for block in written_since_flush.drain(..) {
                    if let Some(expectation) = expectations.get_mut(&block) {
                        expectation.durable = true;
                    }
                }
                continue;
            }
            for index in 0..blocks {
                let block_data =
                    data[(index * BLOCK) as usize..((index + 1) * BLOCK) as usize].to_vec();
                let expectation =
                    expectations
                        .entry(first + index)
                        .or_insert_with(|| Expectation {
                            acknowledged: Some(vec![0u8; BLOCK as usize]),
                            ..Expectation::default()
                        });
                if acknowledged {
                    expectation.acknowledged = Some(block_data);
                    expectation.durable = false;
                    written_since_flush.push(first + index);
                } else {
                    expectation.in_flight = Some(block_data);
                }
            }
            if acknowledged {
                total_acknowledged += 1;
            }
        }
    }
    let durable = expectations
        .values()
        .filter(|expectation| expectation.durable)
        .count();
    println!("{ROUNDS} rounds, {total_acknowledged} acknowledged writes, {} blocks checked, {durable} flushed", expectations.len());
    assert!(
        total_acknowledged > ROUNDS as u64,
        "the load was too light to test anything"
    );
    // A last restart checks the writes of the final round.
    let node = NodeProcess::start(&certs, "crashnode", &data_dir, None);
    runtime.block_on(async {
        let mut client = NbdClient::connect(node.nbd, "crash").await.unwrap();
        let image = client.read(0, VOLUME_BYTES as u32).await.unwrap().unwrap();
        for (block, expectation) in &expectations {
            let stored = &image[(*block * BLOCK) as usize..((*block + 1) * BLOCK) as usize];
            assert!(
                expectation.acknowledged.as_deref() == Some(stored)
                    || expectation.in_flight.as_deref() == Some(stored),
                "final check, seed {seed}: block {block} lost an acknowledged write"
            );
        }
    });
}
