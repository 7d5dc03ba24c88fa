//! Integration tests of the node crate, one binary (see DEVELOPERS.md).

mod bitmaps;
mod common;
mod guards;
mod nbd;
mod progress;
mod sessions;
mod sessions_model;
mod snapshots;
mod store;
mod suspend;
