//! The RocksDB engine: one database per node, one column family per [`Space`].

use super::{Batch, Durability, Engine, Operation, Space, ValueVisitor};
use crate::bitmap;
use crate::{Error, Result};
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use std::path::Path;

/// Block cache shared by all column families; reads of hot tracks come from here.
const BLOCK_CACHE_BYTES: usize = 256 << 20;
/// Memtable size per column family before it is flushed to an SST file.
const WRITE_BUFFER_BYTES: usize = 128 << 20;
/// Memtables a column family may hold while older ones are flushed, so a burst of
/// sequential writes does not wait on a flush (writes slow down at one less).
const WRITE_BUFFERS_MAX: i32 = 6;
/// Stored blocks of at least this size live in blob files, outside the LSM tree.
const BLOB_VALUE_BYTES_MIN: u64 = 1024;
/// Merge operands of one bitmap chunk the memtable keeps before it folds them.
const BITMAP_SUCCESSIVE_MERGES_MAX: usize = 16;
/// Write-ahead log bytes after which the column families that still need the oldest log
/// file are flushed. The meta and bitmaps families take few writes and would otherwise
/// keep every log file of a sequential write alive (6 GiB of them, measured).
const WAL_BYTES_MAX: u64 = 512 << 20;
/// The write rate RocksDB first slows writers to when flushes fall behind (it adapts from
/// there). Its default, 16 MiB/s, made a stall a wall: 260 ms at the 99th percentile.
const DELAYED_WRITE_BYTES_PER_SECOND: u64 = 512 << 20;
/// Log files kept for reuse: writing into a file's cached pages costs a fraction of
/// writing a new file (5.4 GB/s against 0.4–1.3 GB/s for `dd` here).
const WAL_FILES_RECYCLED: usize = 4;
/// Size of one blob file.
const BLOB_FILE_BYTES: u64 = 256 << 20;

pub struct RocksEngine {
    database: DB,
}

fn engine_error(error: rocksdb::Error) -> Error {
    Error::Engine {
        detail: error.into_string(),
    }
}

impl RocksEngine {
    /// Opens (or creates) the node's database in `path`.
    pub fn open(path: &Path) -> Result<RocksEngine> {
        // The crate has no setter for the write rate a stall starts at: it comes from an
        // options string, before anything else is set (the result keeps nothing else).
        let mut database_options = Options::default()
            .get_options_from_string(format!(
                "delayed_write_rate={DELAYED_WRITE_BYTES_PER_SECOND}"
            ))
            .map_err(engine_error)?;
        database_options.create_if_missing(true);
        database_options.create_missing_column_families(true);
        // Parallel flush and compaction on the two cores we are given; eight jobs give two
        // flush threads (a quarter), so a memtable flushes while the next one does.
        database_options.increase_parallelism(2);
        database_options.set_max_background_jobs(8);
        // Smooth writeback of SST and blob files instead of bursts at sync time.
        database_options.set_bytes_per_sync(1 << 20);
        // RocksDB refuses writes without the log when it recycles log files; the chaos
        // tests' deliberate bug that acknowledges a flush before the log sync writes so.
        if !crate::failpoints::deliberate_bug(crate::failpoints::DeliberateBug::AckFlushBeforeSync)
        {
            database_options.set_recycle_log_file_num(WAL_FILES_RECYCLED);
        }
        database_options.set_max_total_wal_size(WAL_BYTES_MAX);
        // Compactions are background work: at the lowest CPU priority they run in the time
        // host IO leaves (and still get a share when it leaves none). Flushes are not: host
        // writes wait for them once the memtables are full, and at the lowest priority
        // they fell behind under sequential writes and stalled them.
        let mut environment = rocksdb::Env::new().map_err(engine_error)?;
        environment.lower_thread_pool_cpu_priority();
        database_options.set_env(&environment);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let descriptors = Space::ALL.map(|space| {
            let mut options = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            // Bloom filters make lookups of blocks a layer does not hold cheap, which is
            // what reads through a stack of snapshot layers do most.
            table.set_bloom_filter(10.0, false);
            options.set_block_based_table_factory(&table);
            options.set_write_buffer_size(WRITE_BUFFER_BYTES);
            options.set_max_write_buffer_number(WRITE_BUFFERS_MAX);
            if space == Space::Blocks {
                // Blocks are 4 KiB values: kept in the LSM tree, every compaction would
                // rewrite them, which stalled sequential writes. In blob files only their
                // small keys are compacted; garbage collection reclaims overwritten blocks.
                options.set_enable_blob_files(true);
                options.set_min_blob_size(BLOB_VALUE_BYTES_MIN);
                options.set_blob_file_size(BLOB_FILE_BYTES);
                options.set_enable_blob_gc(true);
            }
            if space == Space::Bitmaps {
                options.set_merge_operator(
                    "tandem-bitmap-v1",
                    |key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands| {
                        bitmap::full_merge(key, existing, operands.iter())
                    },
                    |_key: &[u8], _existing: Option<&[u8]>, operands: &rocksdb::MergeOperands| {
                        bitmap::partial_merge(operands.iter())
                    },
                );
                // Every host write adds an operand to its chunk, and a copier reads the
                // chunk again and again: without this, each read would apply every operand
                // since the last flush. With it, the memtable folds a chunk's operands
                // into a value once there are this many.
                options.set_max_successive_merges(BITMAP_SUCCESSIVE_MERGES_MAX);
            }
            ColumnFamilyDescriptor::new(space.name(), options)
        });
        let database =
            DB::open_cf_descriptors(&database_options, path, descriptors).map_err(engine_error)?;
        Ok(RocksEngine { database })
    }

    fn family(&self, space: Space) -> Result<&rocksdb::ColumnFamily> {
        self.database
            .cf_handle(space.name())
            .ok_or_else(|| Error::Engine {
                detail: format!("column family {} is missing", space.name()),
            })
    }
}

impl Engine for RocksEngine {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.database
            .get_cf(self.family(space)?, key)
            .map_err(engine_error)
    }

    fn multi_get(
        &self,
        space: Space,
        keys: &[Vec<u8>],
        visit: &mut ValueVisitor<'_>,
    ) -> Result<()> {
        let family = self.family(space)?;
        // Keys are asked in sorted order (blocks of a layer ascend), which lets RocksDB
        // batch its lookups; the pinned values are shown in place, never copied here.
        let answers = self.database.batched_multi_get_cf(family, keys, true);
        for (index, answer) in answers.into_iter().enumerate() {
            let value = answer.map_err(engine_error)?;
            visit(index, value.as_deref())?;
        }
        Ok(())
    }

    fn scan(
        &self,
        space: Space,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let mut read_options = rocksdb::ReadOptions::default();
        read_options.set_iterate_upper_bound(to.to_vec());
        let iterator = self.database.iterator_cf_opt(
            self.family(space)?,
            read_options,
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        for item in iterator {
            let (key, value) = item.map_err(engine_error)?;
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: Batch, durability: Durability) -> Result<()> {
        let mut write_batch = WriteBatch::default();
        for operation in batch.operations {
            match operation {
                Operation::Put { space, key, value } => {
                    write_batch.put_cf(self.family(space)?, key, value)
                }
                Operation::Delete { space, key } => write_batch.delete_cf(self.family(space)?, key),
                Operation::DeleteRange { space, from, to } => {
                    write_batch.delete_range_cf(self.family(space)?, from, to)
                }
                Operation::MergeBitmap { key, operand } => {
                    write_batch.merge_cf(self.family(Space::Bitmaps)?, key, operand)
                }
            }
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(durability == Durability::Synced);
        if durability == Durability::Logged
            && crate::failpoints::deliberate_bug(
                crate::failpoints::DeliberateBug::AckFlushBeforeSync,
            )
        {
            write_options.disable_wal(true);
        }
        self.database
            .write_opt(write_batch, &write_options)
            .map_err(engine_error)
    }

    fn sync(&self) -> Result<()> {
        self.database.flush_wal(true).map_err(engine_error)
    }

    fn approximate_bytes(&self, space: Space) -> Result<u64> {
        let family = self.family(space)?;
        // Live SST data, memtables not yet flushed, and blob files (where blocks go).
        let mut total = 0;
        for property in [
            "rocksdb.estimate-live-data-size",
            "rocksdb.cur-size-all-mem-tables",
            "rocksdb.live-blob-file-size",
        ] {
            total += self
                .database
                .property_int_value_cf(family, property)
                .map_err(engine_error)?
                .unwrap_or(0);
        }
        Ok(total)
    }
}
