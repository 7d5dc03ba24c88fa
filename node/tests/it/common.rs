//! Shared fixtures: stores on either engine and a node serving on loopback.

use node::config::NodeConfig;
use node::engine::memory::MemoryEngine;
use node::engine::rocks::RocksEngine;
use node::runtime::RunningNode;
use node::store::VolumeStore;
use std::net::SocketAddr;

pub fn memory_store() -> VolumeStore<MemoryEngine> {
    VolumeStore::open(MemoryEngine::new()).unwrap()
}

/// A RocksDB store in a temporary directory, kept alive with it.
pub struct RocksFixture {
    pub directory: tempfile::TempDir,
    pub store: Option<VolumeStore<RocksEngine>>,
}

impl RocksFixture {
    pub fn new() -> RocksFixture {
        let directory = tempfile::tempdir().unwrap();
        let store =
            VolumeStore::open(RocksEngine::open(&directory.path().join("db")).unwrap()).unwrap();
        RocksFixture {
            directory,
            store: Some(store),
        }
    }

    pub fn store(&self) -> &VolumeStore<RocksEngine> {
        self.store.as_ref().unwrap()
    }

    /// Closes the database and opens it again, as a restart would.
    pub fn reopen(&mut self) {
        self.store = None;
        self.store = Some(
            VolumeStore::open(RocksEngine::open(&self.directory.path().join("db")).unwrap())
                .unwrap(),
        );
    }
}

/// A node on loopback with certificates in a temporary directory.
pub struct NodeFixture {
    pub directory: tempfile::TempDir,
    pub node: RunningNode,
}

impl NodeFixture {
    pub async fn start() -> NodeFixture {
        let directory = tempfile::tempdir().unwrap();
        let certs = directory.path().join("certs");
        protocol::pki::init_cluster(&certs, &["test-node".to_string()]).unwrap();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = NodeConfig {
            name: "test-node".to_string(),
            site: "test-site".to_string(),
            data_dir: directory.path().join("data"),
            listen: loopback,
            nbd: loopback,
            metrics: None,
            certs,
            control_plane: false,
            members: Vec::new(),
            advertise: None,
            capacity_bytes: None,
            fault_injection: false,
            raft_compact_after_entries: None,
            copy_rate_mebibytes_per_second:
                node::config::NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND,
        };
        let node = node::runtime::start(&config).await.unwrap();
        NodeFixture { directory, node }
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.node.nbd_address, export)
    }
}

/// Deterministic bytes that differ by seed and position.
pub fn pattern(seed: u8, length: usize) -> Vec<u8> {
    (0..length)
        .map(|index| seed.wrapping_mul(31).wrapping_add((index % 253) as u8))
        .collect()
}
