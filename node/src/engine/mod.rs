//! The key-value engine the volume store is written against.
//!
//! Like TiKV's engine traits, the store sees only this small interface; [`rocks`] is the
//! production implementation and [`memory`] a plain in-memory one that makes the store's
//! property tests fast and lets them compare against RocksDB behaviour exactly.

pub mod memory;
pub mod rocks;

use crate::Result;

/// The separate key spaces of a node (RocksDB column families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Volume descriptors, the name index, layer descriptors and node counters.
    Meta,
    /// Stored blocks, keyed by layer and block number.
    Blocks,
    /// Change bitmap chunks, changed only through merge operands.
    Bitmaps,
}

impl Space {
    pub const ALL: [Space; 3] = [Space::Meta, Space::Blocks, Space::Bitmaps];

    pub fn name(self) -> &'static str {
        match self {
            Space::Meta => "meta",
            Space::Blocks => "blocks",
            Space::Bitmaps => "bitmaps",
        }
    }
}

/// One change inside an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Put {
        space: Space,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        space: Space,
        key: Vec<u8>,
    },
    /// Deletes every key in `from..to`.
    DeleteRange {
        space: Space,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// Applies a bitmap merge operand (see [`crate::bitmap`]).
    MergeBitmap {
        key: Vec<u8>,
        operand: Vec<u8>,
    },
}

/// Changes applied all together or not at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    pub operations: Vec<Operation>,
}

impl Batch {
    pub fn put(&mut self, space: Space, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.operations.push(Operation::Put {
            space,
            key: key.into(),
            value,
        });
    }

    pub fn delete(&mut self, space: Space, key: impl Into<Vec<u8>>) {
        self.operations.push(Operation::Delete {
            space,
            key: key.into(),
        });
    }

    pub fn delete_range(&mut self, space: Space, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.operations.push(Operation::DeleteRange {
            space,
            from: from.into(),
            to: to.into(),
        });
    }

    pub fn merge_bitmap(&mut self, key: impl Into<Vec<u8>>, operand: Vec<u8>) {
        self.operations.push(Operation::MergeBitmap {
            key: key.into(),
            operand,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }
}

/// How durable a batch must be when `write` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the write-ahead log, which survives a process crash (kill -9) but not a power
    /// loss until the next [`Engine::sync`].
    Logged,
    /// In the write-ahead log and synced to stable storage (FUA, metadata changes).
    Synced,
}

/// Sees one answer of [`Engine::multi_get`]: the key's index and its value, if stored.
pub type ValueVisitor<'a> = dyn FnMut(usize, Option<&[u8]>) -> Result<()> + 'a;

/// The storage engine under the volume store.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Looks up many keys of one space at once and shows each answer to `visit` with the
    /// key's index, in the order asked, without copying it out of the engine.
    fn multi_get(&self, space: Space, keys: &[Vec<u8>], visit: &mut ValueVisitor<'_>)
        -> Result<()>;

    /// Visits keys in `from..to` in order until `visit` returns false.
    fn scan(
        &self,
        space: Space,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;

    fn write(&self, batch: Batch, durability: Durability) -> Result<()>;

    /// Makes every write that returned so far durable on stable storage.
    fn sync(&self) -> Result<()>;

    /// Approximate bytes stored in a space, for capacity reporting and tests of space use.
    fn approximate_bytes(&self, space: Space) -> Result<u64>;
}
