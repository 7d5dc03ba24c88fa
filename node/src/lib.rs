//! A tandem storage node: volumes in RocksDB with self-verifying blocks, pointer
//! snapshots, change bitmaps for copy sessions, an NBD export for hosts, and a QUIC
//! service for the CLI and other nodes.
//!
//! Pure cores ([`track`], [`bitmap`], [`layout`]) do no IO; [`store`] runs them against an
//! [`engine::Engine`]; [`nbd`] and [`service`] are thin tokio drivers around the store.

pub mod bitmap;
pub mod copy;
pub mod engine;
pub mod error;
pub mod failpoints;
pub mod layout;
pub mod log_limit;
pub mod store;
pub mod track;

pub use error::{Error, Result};
pub mod config;
pub mod metrics;
pub mod nbd;
pub mod nbd_client;
pub mod nbd_hosts;
pub mod requests;
pub mod runtime;
pub mod service;
