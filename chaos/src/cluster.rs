//! What a chaos run needs of a cluster, whatever runs it: where each node answers, and
//! the faults (kill -9, pause, partition, delay, loss, restart). The runner speaks to the
//! nodes through [`crate::client`]; a backend only starts, stops and cuts processes.

use crate::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One node of the cluster as the run sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub site: String,
    /// Hosts a control-plane member.
    pub member: bool,
}

/// A running cluster a chaos run can break and heal.
pub trait Cluster: Send {
    /// Every node, members first.
    fn nodes(&self) -> &[NodeSpec];
    /// The certificates directory with the admin identity.
    fn certs(&self) -> &Path;
    /// Where the node's QUIC service answers.
    fn endpoint(&self, node: &str) -> Result<SocketAddr, Error>;
    /// Where the node's NBD server answers.
    fn nbd(&self, node: &str) -> Result<SocketAddr, Error>;
    /// kill -9 of the node's process.
    fn kill(&mut self, node: &str) -> Result<(), Error>;
    /// Starts a killed node again on the same addresses and data.
    fn restart(&mut self, node: &str) -> Result<(), Error>;
    /// SIGSTOP (or `docker pause`) of the node.
    fn pause(&mut self, node: &str) -> Result<(), Error>;
    fn resume(&mut self, node: &str) -> Result<(), Error>;
    /// Cuts every call between `node` and each of `peers` (both directions).
    fn partition(&mut self, node: &str, peers: &[String]) -> Result<(), Error>;
    /// Ends what [`Cluster::partition`] and [`Cluster::degrade`] set between `node` and
    /// each of `peers`.
    fn reconnect(&mut self, node: &str, peers: &[String]) -> Result<(), Error>;
    /// Delays every call between `node` and each of `peers`, or loses `loss_percent` of
    /// them. Backends that cannot say so.
    fn degrade(
        &mut self,
        node: &str,
        peers: &[String],
        delay_milliseconds: u64,
        loss_percent: u8,
    ) -> Result<(), Error>;
    /// Ends every partition, delay and loss, resumes every paused node and starts every
    /// killed one.
    fn heal(&mut self) -> Result<(), Error>;
    /// Whether the node's process runs and is not paused (a CLI call to it can answer).
    fn answering(&self, node: &str) -> bool;
    /// Keeps what a failing run needs to be read (node logs, data) after the cluster is
    /// gone; where it is.
    fn keep_files(&mut self) -> Option<PathBuf>;
}
