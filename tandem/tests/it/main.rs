//! Integration tests of the `tandem` binary, one test binary (see DEVELOPERS.md).

mod chaos_harness;
mod cli;
mod cluster;
mod common;
mod gsnap;
mod gsnap_crash;
mod gsnap_incremental;
mod guards;
mod idempotent;
mod json;
mod messages;
mod metrics;
mod partition;
mod progress;
mod readme;
mod refusals;
mod sessions;
mod suspend;
