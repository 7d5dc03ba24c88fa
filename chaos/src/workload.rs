//! What the hosts and the operator do during a round: a writer that writes, flushes and
//! writes with FUA over NBD, recording every operation; a poller that reads a copy's
//! progress. Both run until told to stop and survive their node's death by reconnecting.

use crate::block::{write_content, BLOCK_BYTES};
use crate::client::Cli;
use crate::history::{History, Operation, Outcome};
use node::nbd_client::NbdClient;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long one NBD operation may take before its outcome is unknown and the writer
/// reconnects (a paused or partitioned node answers late or never).
pub const NBD_OPERATION_TIMEOUT_MILLISECONDS: u64 = 3_000;
/// Blocks one write covers at most.
pub const WRITE_BLOCKS_MAX: u64 = 8;
/// The hot part of the volume is this fraction of it (its first eighth)...
pub const HOT_PART_OF_VOLUME: u64 = 8;
/// ...and one write in this many goes anywhere in the volume instead.
pub const COLD_WRITE_ONE_IN: u32 = 128;
/// Write ids are unique over a run: each writer takes its ids from one shared counter.
static NEXT_WRITE_ID: AtomicU64 = AtomicU64::new(1);

/// A writer's settings: where, how much, how often it flushes.
#[derive(Debug, Clone)]
pub struct Writer {
    pub client: String,
    pub volume: String,
    /// Where the volume's node serves NBD; read again at each reconnect, since a volume's
    /// node keeps its address across restarts.
    pub address: SocketAddr,
    pub volume_bytes: u64,
    pub seed: u64,
    /// A pause between operations, so a round's writes stay countable.
    pub pause_milliseconds: u64,
}

/// What a writer did.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterCounts {
    pub writes: u64,
    pub acknowledged: u64,
    pub unknown: u64,
    pub reconnects: u64,
}

impl Writer {
    /// Writes until `stop` is set; every write and flush goes into `history`.
    pub async fn run(self, history: History, stop: Arc<AtomicBool>) -> WriterCounts {
        let mut random = ChaCha8Rng::seed_from_u64(self.seed);
        let mut counts = WriterCounts::default();
        let blocks_total = self.volume_bytes / BLOCK_BYTES;
        let timeout = Duration::from_millis(NBD_OPERATION_TIMEOUT_MILLISECONDS);
        let mut connection: Option<NbdClient> = None;
        while !stop.load(Ordering::Relaxed) {
            let client = match connection.as_mut() {
                Some(client) => client,
                None => match tokio::time::timeout(
                    timeout,
                    NbdClient::connect(self.address, &self.volume),
                )
                .await
                {
                    Ok(Ok(client)) => connection.insert(client),
                    _ => {
                        counts.reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (operation, write) = if random.random_ratio(1, 8) {
                (
                    Operation::Flush {
                        volume: self.volume.clone(),
                    },
                    None,
                )
            } else {
                let blocks = random.random_range(1..=WRITE_BLOCKS_MAX.min(blocks_total));
                // Hosts have hot spots: most writes go to the volume's first part, a few
                // anywhere. A copy's tracks in the cold part are then written once by the
                // copy and rarely again, so a track the copy lost is not hidden by a
                // later host write that sends it once more.
                let span = if random.random_ratio(1, COLD_WRITE_ONE_IN) {
                    blocks_total
                } else {
                    (blocks_total / HOT_PART_OF_VOLUME).max(blocks)
                };
                let first_block = random.random_range(0..=span - blocks);
                let write_id = NEXT_WRITE_ID.fetch_add(1, Ordering::Relaxed);
                let fua = random.random_ratio(1, 10);
                (
                    Operation::Write {
                        volume: self.volume.clone(),
                        first_block,
                        blocks,
                        write_id,
                        fua,
                    },
                    Some((first_block, blocks, write_id, fua)),
                )
            };
            let id = history.invoke(&self.client, operation);
            let result = match write {
                Some((first_block, blocks, write_id, fua)) => {
                    counts.writes += 1;
                    let data = write_content(write_id, first_block, blocks);
                    tokio::time::timeout(
                        timeout,
                        client.write(first_block * BLOCK_BYTES, &data, fua),
                    )
                    .await
                }
                None => tokio::time::timeout(timeout, client.flush()).await,
            };
            match result {
                Ok(Ok(Ok(()))) => {
                    history.end(id, Outcome::Ok, None);
                    if write.is_some() {
                        counts.acknowledged += 1;
                    }
                }
                Ok(Ok(Err(error))) => {
                    // The node answered with an error: the write may have been applied
                    // in part, so the checkers treat it like an unknown one.
                    history.end(id, Outcome::Fail, Some(format!("NBD error {}", error.0)));
                    counts.unknown += 1;
                }
                Ok(Err(error)) => {
                    history.end(id, Outcome::Unknown, Some(error.to_string()));
                    counts.unknown += 1;
                    connection = None;
                }
                Err(_) => {
                    history.end(id, Outcome::Unknown, Some("no answer in time".into()));
                    counts.unknown += 1;
                    connection = None;
                }
            }
            if self.pause_milliseconds > 0 {
                tokio::time::sleep(Duration::from_millis(self.pause_milliseconds)).await;
            }
        }
        if let Some(client) = connection {
            let _ = tokio::time::timeout(timeout, client.disconnect()).await;
        }
        counts
    }
}

/// Writes the whole volume once and flushes (the round's set-up, on a healthy cluster):
/// a volume holds data, so a copy has every track to move, not only the writer's hot
/// spot. Every write is recorded like the writer's.
pub async fn fill_volume(
    client_name: &str,
    address: SocketAddr,
    volume: &str,
    volume_bytes: u64,
    history: &History,
) -> Result<(), String> {
    let timeout = Duration::from_millis(NBD_OPERATION_TIMEOUT_MILLISECONDS);
    let mut client = tokio::time::timeout(timeout, NbdClient::connect(address, volume))
        .await
        .map_err(|_| format!("no NBD connection to {volume} at {address} in time"))?
        .map_err(|error| format!("cannot open {volume} over NBD at {address}: {error}"))?;
    let blocks_total = volume_bytes / BLOCK_BYTES;
    let mut first_block = 0;
    while first_block < blocks_total {
        let blocks = WRITE_BLOCKS_MAX.min(blocks_total - first_block);
        let write_id = NEXT_WRITE_ID.fetch_add(1, Ordering::Relaxed);
        let id = history.invoke(
            client_name,
            Operation::Write {
                volume: volume.to_string(),
                first_block,
                blocks,
                write_id,
                fua: false,
            },
        );
        let data = write_content(write_id, first_block, blocks);
        let result = tokio::time::timeout(
            timeout,
            client.write(first_block * BLOCK_BYTES, &data, false),
        )
        .await;
        match result {
            Ok(Ok(Ok(()))) => history.end(id, Outcome::Ok, None),
            other => {
                history.end(id, Outcome::Unknown, Some(format!("{other:?}")));
                return Err(format!(
                    "filling {volume}: the write at block {first_block} failed: {other:?}"
                ));
            }
        }
        first_block += blocks;
    }
    let id = history.invoke(
        client_name,
        Operation::Flush {
            volume: volume.to_string(),
        },
    );
    match tokio::time::timeout(timeout, client.flush()).await {
        Ok(Ok(Ok(()))) => history.end(id, Outcome::Ok, None),
        other => {
            history.end(id, Outcome::Unknown, Some(format!("{other:?}")));
            return Err(format!("filling {volume}: the flush failed: {other:?}"));
        }
    }
    let _ = tokio::time::timeout(timeout, client.disconnect()).await;
    Ok(())
}

/// Reads a volume whole over NBD (after the writers stopped), in 1 MiB reads.
pub async fn read_volume(
    address: SocketAddr,
    volume: &str,
    size_bytes: u64,
) -> Result<Vec<u8>, String> {
    const READ_BYTES: u64 = 1 << 20;
    let mut client = NbdClient::connect(address, volume)
        .await
        .map_err(|error| format!("cannot open {volume} over NBD at {address}: {error}"))?;
    let mut image = Vec::with_capacity(size_bytes as usize);
    let mut offset = 0;
    while offset < size_bytes {
        let length = READ_BYTES.min(size_bytes - offset);
        let bytes = client
            .read(offset, length as u32)
            .await
            .map_err(|error| format!("reading {volume} at {offset}: {error}"))?
            .map_err(|error| format!("reading {volume} at {offset}: NBD error {}", error.0))?;
        image.extend_from_slice(&bytes);
        offset += length;
    }
    let _ = client.disconnect().await;
    Ok(image)
}

/// What a poller reads: a session by its kind and target, or a gsnap job.
#[derive(Debug, Clone)]
pub enum Watched {
    Session { kind: &'static str, target: String },
    Job { id: u64 },
}

/// Polls `watched`'s progress every `every` until `stop`, recording each reading. A
/// mirror that is synchronized reports its lag (it leaves 100 % when a host write comes
/// and returns when it is shipped), not a copy: those readings are not progress.
pub async fn poll_progress(
    cli: Cli,
    endpoints: Vec<SocketAddr>,
    watched: Watched,
    every: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let endpoint = endpoints[turn % endpoints.len()];
        let shown = match &watched {
            Watched::Session { kind, target } => {
                cli.json(endpoint, &[kind, "show", target, "--json"]).await
            }
            Watched::Job { id } => {
                cli.json(endpoint, &["gsnap", "show", &id.to_string(), "--json"])
                    .await
            }
        };
        if let Ok(shown) = shown {
            let (subject, epoch) = match &watched {
                Watched::Session { kind, target } => (
                    format!("{kind} {target}"),
                    format!(
                        "session {} {}",
                        shown["id"],
                        shown["state"].as_str().unwrap_or_default()
                    ),
                ),
                Watched::Job { id } => (format!("gsnap job {id}"), "job".to_string()),
            };
            let synchronized = shown["state"] == "synchronized";
            if let (Some(percent), false) = (shown["percent"].as_f64(), synchronized) {
                cli.history.record(
                    "poller",
                    Operation::Progress {
                        subject,
                        epoch,
                        percent,
                    },
                );
            }
        }
        tokio::time::sleep(every).await;
    }
}
