//! The Raft log and the catalog state machine, stored in one RocksDB database.
//!
//! One database holds three column families:
//!
//! - `raft_log`: the log entries, keyed by index as a big-endian `u64` so that RocksDB's
//!   byte order is index order, each encoded with [`protocol::codec`].
//! - `raft_meta`: the vote, the committed log id and the last purged log id.
//! - `state_machine`: the current snapshot (its metadata and its data).
//!
//! Keeping them in one database means one write-ahead log: a write batch that touches
//! several column families is atomic, and a synced write also makes every earlier write
//! durable.
//!
//! Durability rules, because a Raft member that forgets what it promised breaks the
//! cluster's safety:
//!
//! - Appended entries and the vote are written with `fsync` before openraft is told they
//!   are stored.
//! - Purging records the last purged log id in the same atomic batch that deletes the
//!   entries, so a crash can never leave the log shorter than the purge point says.
//! - The state machine itself is kept in memory and is not written on every apply, because
//!   commit latency matters more than restart time. After a restart it starts from the last
//!   snapshot, and openraft re-applies the committed entries after it from the log, which is
//!   why the committed log id is stored as well.

mod log_store;
mod state_machine;

pub use log_store::LogStore;
pub use state_machine::{CatalogView, StateMachineSnapshotBuilder, StateMachineStore};

use crate::error::Error;
use openraft::AnyError;
use rocksdb::{ColumnFamily, Options, WriteBatch, WriteOptions, DB};
use std::path::Path;
use std::sync::Arc;

/// The column family holding log entries keyed by big-endian index.
const RAFT_LOG_COLUMN_FAMILY: &str = "raft_log";

/// The column family holding the vote, the committed log id and the last purged log id.
const RAFT_META_COLUMN_FAMILY: &str = "raft_meta";

/// The column family holding the current snapshot.
const STATE_MACHINE_COLUMN_FAMILY: &str = "state_machine";

/// Opens (creating it when missing) the control-plane store at `path` and returns its two
/// halves: the Raft log and the state machine, which share the one database.
///
/// When a snapshot was persisted before, the state machine starts from it.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), Error> {
    let storage_error = |detail: String| Error::Storage {
        path: path.display().to_string(),
        detail,
    };
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let db = DB::open_cf(
        &options,
        path,
        [
            RAFT_LOG_COLUMN_FAMILY,
            RAFT_META_COLUMN_FAMILY,
            STATE_MACHINE_COLUMN_FAMILY,
        ],
    )
    .map_err(|error| storage_error(format!("cannot open the RocksDB database: {error}")))?;
    let db = Arc::new(db);
    let state_machine = StateMachineStore::load(Arc::clone(&db))
        .map_err(|error| storage_error(format!("cannot load the persisted snapshot: {error}")))?;
    Ok((LogStore::new(db), state_machine))
}

/// Looks up a column family of the database.
///
/// [`open`] creates every column family this module uses, so a missing one means the
/// database was opened some other way; that is reported as an error rather than a panic.
fn column_family<'database>(
    db: &'database DB,
    name: &str,
) -> Result<&'database ColumnFamily, AnyError> {
    db.cf_handle(name)
        .ok_or_else(|| AnyError::error(format!("the column family '{name}' does not exist")))
}

/// Wraps any error for openraft's storage errors, which carry their cause as an
/// [`AnyError`] so that they can be serialized and sent to other members.
fn any_error<E: std::error::Error + 'static>(error: E) -> AnyError {
    AnyError::new(&error)
}

/// Writes `batch` atomically, with `fsync` before returning when `sync` is set.
///
/// The write runs on tokio's blocking thread pool because an `fsync` can take milliseconds,
/// and blocking an async worker that long would stall every other task scheduled on it.
/// The caller still waits for the write to finish, so writes stay in the order they were
/// issued, which openraft requires.
async fn write_batch(db: &Arc<DB>, batch: WriteBatch, sync: bool) -> Result<(), AnyError> {
    let db = Arc::clone(db);
    let write = tokio::task::spawn_blocking(move || {
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        db.write_opt(batch, &write_options)
    });
    write.await.map_err(any_error)?.map_err(any_error)
}
