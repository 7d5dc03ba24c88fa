//! tandem's chaos harness: seeded fault schedules against a real cluster, a history of
//! everything its clients did and saw, and checkers that read that history.
//!
//! The pure parts do no IO: [`schedule`] (seed → plans), [`history`] (events),
//! [`check`] (history and bytes → findings) and [`block`] (what writes write). The IO
//! parts drive a cluster: [`cluster::Cluster`] with its two backends, [`processes`] and
//! [`compose`], the [`client`], the [`workload`]s and the [`round`] runner.

pub mod block;
pub mod check;
pub mod client;
pub mod cluster;
pub mod compose;
mod error;
pub mod history;
pub mod processes;
pub mod round;
pub mod schedule;
pub mod workload;

pub use error::Error;
