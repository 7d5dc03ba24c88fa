//! Integration tests of the `tandem` binary, one test binary (see DEVELOPERS.md).

mod cli;
mod cluster;
mod common;
mod crash;
mod messages;
mod sessions;
