//! tandem's control plane: a Raft group (openraft 0.9) that records the catalog of sites,
//! nodes and volumes, so that any node or leader can die and the cluster still knows
//! what it was doing.
//!
//! - [`catalog`]: the pure catalog state machine (no IO).
//! - [`types`]: the Raft type configuration.
//! - [`storage`]: the Raft log and state machine on RocksDB.
//! - [`network`]: Raft messages over QUIC, authorization by member identity.
//! - [`caller`]: calls to nodes and members over reused QUIC connections, and the fault
//!   rules (drop, delay per peer) every call between nodes obeys.
//! - [`fail_points`]: named places where a test can end the process (feature `failpoints`).
//! - [`member`]: a member's Raft instance and its leader's duties (the IO shell).

pub mod advice;
pub mod caller;
pub mod catalog;
pub mod error;
pub mod fail_points;
pub mod gsnap;
pub mod member;
pub mod network;
pub mod storage;
pub mod types;

pub use error::Error;
