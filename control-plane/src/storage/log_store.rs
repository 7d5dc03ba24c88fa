//! The Raft log, the vote and the log pointers, in the `raft_log` and `raft_meta` column
//! families.

use super::{
    any_error, column_family, write_batch, RAFT_LOG_COLUMN_FAMILY, RAFT_META_COLUMN_FAMILY,
};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageIOError};
use protocol::codec;
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

/// The `raft_meta` key of the last vote this member saved.
const VOTE_KEY: &[u8] = b"vote";

/// The `raft_meta` key of the last committed log id openraft reported.
const COMMITTED_KEY: &[u8] = b"committed";

/// The `raft_meta` key of the last log id removed from the front of the log.
const LAST_PURGED_LOG_ID_KEY: &[u8] = b"last_purged_log_id";

/// The Raft log and vote of this member.
///
/// Cloning is cheap and every clone sees the same database, which is how the log store
/// serves as its own log reader for the replication tasks.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    pub(super) fn new(db: Arc<DB>) -> Self {
        Self { db }
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, AnyError> {
        let family = column_family(&self.db, RAFT_META_COLUMN_FAMILY)?;
        match self.db.get_pinned_cf(family, key).map_err(any_error)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(any_error)?)),
            None => Ok(None),
        }
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        sync: bool,
    ) -> Result<(), AnyError> {
        let bytes = codec::encode(value).map_err(any_error)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            column_family(&self.db, RAFT_META_COLUMN_FAMILY)?,
            key,
            bytes,
        );
        write_batch(&self.db, batch, sync).await
    }

    /// The log id of the entry with the highest index, if the log holds any entry.
    fn last_entry_log_id(&self) -> Result<Option<LogId>, AnyError> {
        let family = column_family(&self.db, RAFT_LOG_COLUMN_FAMILY)?;
        let Some(item) = self.db.iterator_cf(family, IteratorMode::End).next() else {
            return Ok(None);
        };
        let (key, value) = item.map_err(any_error)?;
        let entry = decode_entry(index_of_key(&key)?, &value)?;
        Ok(Some(entry.log_id))
    }

    fn read_entries(&self, range: &impl RangeBounds<u64>) -> Result<Vec<Entry>, AnyError> {
        let start = match range.start_bound() {
            Bound::Included(&start) => start,
            Bound::Excluded(&start) => match start.checked_add(1) {
                Some(start) => start,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let family = column_family(&self.db, RAFT_LOG_COLUMN_FAMILY)?;
        let start_key = log_key(start);
        let mut entries = Vec::new();
        for item in self
            .db
            .iterator_cf(family, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (key, value) = item.map_err(any_error)?;
            let index = index_of_key(&key)?;
            // The iteration starts inside the range and goes up, so the first index outside
            // it is past the end.
            if !range.contains(&index) {
                break;
            }
            entries.push(decode_entry(index, &value)?);
        }
        Ok(entries)
    }

    async fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(), AnyError> {
        let family = column_family(&self.db, RAFT_LOG_COLUMN_FAMILY)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(any_error)?;
            batch.put_cf(family, log_key(entry.log_id.index), bytes);
        }
        write_batch(&self.db, batch, true).await
    }
}

/// The `raft_log` key of the entry at `index`: big-endian, so that RocksDB's byte order of
/// keys is the numeric order of indexes.
fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of_key(key: &[u8]) -> Result<u64, AnyError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        AnyError::error(format!(
            "a log key is {} bytes long; log keys are 8 bytes",
            key.len()
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes the entry stored under `index`, refusing one that claims another index: that
/// would be a corrupt log, and handing it to openraft would corrupt the cluster instead.
fn decode_entry(index: u64, value: &[u8]) -> Result<Entry, AnyError> {
    let entry: Entry = codec::decode(value).map_err(any_error)?;
    if entry.log_id.index != index {
        return Err(AnyError::error(format!(
            "the log entry stored at index {index} claims index {}",
            entry.log_id.index
        )));
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(&range)
            .map_err(|error| StorageIOError::read_logs(error).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self
            .read_meta(LAST_PURGED_LOG_ID_KEY)
            .map_err(StorageIOError::read_logs)?;
        // With every entry purged, the log still ends where the purge ended.
        let last_log_id = self
            .last_entry_log_id()
            .map_err(StorageIOError::read_logs)?
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // A vote must survive a crash: a member that forgets whom it voted for could vote
        // twice in one term and let two leaders be elected.
        self.write_meta(VOTE_KEY, vote, true)
            .await
            .map_err(|error| StorageIOError::write_vote(error).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE_KEY)
            .map_err(|error| StorageIOError::read_vote(error).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: a committed log id lost in a crash only means openraft re-applies fewer
        // entries at startup and learns the rest from the leader. It cannot get ahead of the
        // log either, because the write-ahead log is replayed in order and the entries were
        // synced before they could be committed.
        self.write_meta(COMMITTED_KEY, &committed, false)
            .await
            .map_err(|error| StorageIOError::write(error).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = self
            .read_meta(COMMITTED_KEY)
            .map_err(StorageIOError::read)?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The callback tells openraft the entries are durable, which lets it count this member
        // towards a quorum; it is only called once the synced write has returned.
        match self.write_entries(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(StorageIOError::write_logs(error).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = async {
            let family = column_family(&self.db, RAFT_LOG_COLUMN_FAMILY)?;
            let mut batch = WriteBatch::default();
            // A range deletion excludes its end, so the last possible index is deleted on
            // its own.
            batch.delete_range_cf(family, log_key(log_id.index), log_key(u64::MAX));
            batch.delete_cf(family, log_key(u64::MAX));
            // Synced, because entries that conflict with the leader must not come back after
            // a crash: this member could otherwise report a log it has already given up.
            write_batch(&self.db, batch, true).await
        };
        write
            .await
            .map_err(|error| StorageIOError::write_logs(error).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = async {
            let encoded_log_id = codec::encode(&log_id).map_err(any_error)?;
            let meta_family = column_family(&self.db, RAFT_META_COLUMN_FAMILY)?;
            let log_family = column_family(&self.db, RAFT_LOG_COLUMN_FAMILY)?;
            // The purge point is recorded first and in the same atomic, synced batch as the
            // deletion. Were the entries deleted without it, a crash would leave a log whose
            // start openraft cannot know, and with every entry purged it would even take the
            // log for empty and forget its last log id.
            let mut batch = WriteBatch::default();
            batch.put_cf(meta_family, LAST_PURGED_LOG_ID_KEY, encoded_log_id);
            // A range deletion excludes its end, so the purged index itself is deleted on its
            // own.
            batch.delete_range_cf(log_family, log_key(0), log_key(log_id.index));
            batch.delete_cf(log_family, log_key(log_id.index));
            write_batch(&self.db, batch, true).await
        };
        write
            .await
            .map_err(|error| StorageIOError::write_logs(error).into())
    }
}
