//! Integration tests of the node crate, one binary (see DEVELOPERS.md).

mod bitmaps;
mod common;
mod crashes;
mod guards;
mod locking;
mod nbd;
mod progress;
mod remote_commands;
mod requests;
mod sessions;
mod sessions_model;
mod snapshots;
mod store;
mod suspend;
