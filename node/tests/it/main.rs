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
mod seed_model;
mod sessions;
mod sessions_model;
mod sessions_model_remote;
mod snapshots;
mod store;
mod suspend;
