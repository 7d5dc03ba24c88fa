//! The one error type of the control-plane crate.

/// Everything that can go wrong in the control plane outside of Raft's own storage
/// interface, which reports through [`openraft::StorageError`] instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The RocksDB store holding the Raft log and state machine could not be opened or its
    /// contents could not be read back. The detail says which.
    #[error("control-plane store at {path}: {detail}")]
    Storage { path: String, detail: String },
    /// Raft could not be configured or started on this member.
    #[error("Raft: {detail}")]
    Raft { detail: String },
}
