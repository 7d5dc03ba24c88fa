//! Integration tests of the node crate, one binary (see DEVELOPERS.md).

mod bitmaps;
mod common;
mod nbd;
mod snapshots;
mod store;
mod sessions;
mod sessions_model;
