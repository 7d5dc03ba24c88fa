//! A node's configuration file (TOML), as `tandem init` writes a sample of it.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name; its certificate in `certs` must carry it.
    pub name: String,
    /// The site (data centre) the node belongs to.
    pub site: String,
    /// Where the node keeps its RocksDB database.
    pub data_dir: PathBuf,
    /// QUIC address for the CLI and other nodes.
    pub listen: SocketAddr,
    /// NBD address for hosts.
    pub nbd: SocketAddr,
    /// Prometheus `/metrics` address; no metrics endpoint when absent.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Directory with `ca.pem`, `NAME.pem` and `NAME.key` from `tandem init`.
    pub certs: PathBuf,
    /// Whether this node's process hosts a control-plane member.
    #[serde(default)]
    pub control_plane: bool,
    /// The control-plane members this node registers with and heartbeats to, `HOST:PORT`.
    #[serde(default)]
    pub members: Vec<String>,
    /// The `HOST:PORT` other nodes reach this node's QUIC service at; by default the
    /// `listen` address, which must then not be a wildcard like 0.0.0.0.
    #[serde(default)]
    pub advertise: Option<String>,
    /// How many bytes of volumes this node may hold; by default the size of the file
    /// system under `data_dir`.
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// Lets the admin inject network faults (`tandem debug fault`); for tests only.
    #[serde(default)]
    pub fault_injection: bool,
    /// The copy rate limit of the whole node, over all its sessions, in MiB/s.
    #[serde(default = "default_copy_rate")]
    pub copy_rate_mebibytes_per_second: u32,
    /// Build a Raft snapshot every this many entries and keep no log behind it, so new
    /// members must install a snapshot; for tests only.
    #[serde(default)]
    pub raft_compact_after_entries: Option<u64>,
}

fn default_copy_rate() -> u32 {
    NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND
}

/// The node-wide copy rate when the config sets none.
pub const NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND: u32 = 1024;

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Config {
            detail: format!("cannot read {}: {error}", path.display()),
        })?;
        toml::from_str(&text).map_err(|error| Error::Config {
            detail: format!("{}: {error}", path.display()),
        })
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|error| Error::Config {
            detail: error.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_and_unknown_keys_are_refused() {
        let config = NodeConfig {
            name: "alpha".into(),
            site: "east".into(),
            data_dir: "/var/lib/tandem/alpha".into(),
            listen: "127.0.0.1:7100".parse().unwrap(),
            nbd: "127.0.0.1:10809".parse().unwrap(),
            metrics: Some("127.0.0.1:9100".parse().unwrap()),
            certs: "/etc/tandem/certs".into(),
            control_plane: true,
            members: vec!["127.0.0.1:7100".into()],
            advertise: None,
            capacity_bytes: Some(1 << 40),
            fault_injection: false,
            raft_compact_after_entries: None,
            copy_rate_mebibytes_per_second: NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND,
        };
        let text = config.to_toml().unwrap();
        assert_eq!(toml::from_str::<NodeConfig>(&text).unwrap(), config);
        let with_typo = format!("{text}\nlisten_adress = \"1.2.3.4:5\"\n");
        assert!(toml::from_str::<NodeConfig>(&with_typo).is_err());
    }
}
