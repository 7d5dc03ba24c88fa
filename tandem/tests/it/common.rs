//! Running the real `tandem` binary: init, node processes and CLI calls.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

pub fn init(directory: &Path, nodes: &str) -> PathBuf {
    let certs = directory.join("certs");
    let output = tandem()
        .args(["init", "--dir", certs.to_str().unwrap(), "--nodes", nodes])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    certs
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `tandem node` process; killed with SIGKILL when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub quic: SocketAddr,
    pub nbd: SocketAddr,
}

impl NodeProcess {
    /// Starts a node from the config `tandem init` wrote, on ephemeral ports.
    pub fn start(certs: &Path, name: &str, data_dir: &Path, metrics: Option<u16>) -> NodeProcess {
        let config = certs.join(format!("{name}.toml"));
        let mut command = tandem();
        command.args([
            "node",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--nbd",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]);
        let metrics = metrics.unwrap_or_else(free_port);
        command.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        // "node NAME serving: quic ADDRESS nbd ADDRESS"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words.len() == 7 && words[2] == "serving:",
            "unexpected node output: {line:?}"
        );
        NodeProcess {
            quic: words[4].parse().unwrap(),
            nbd: words[6].parse().unwrap(),
            child,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn cli(&self, certs: &Path, arguments: &[&str]) -> Output {
        tandem()
            .args(arguments)
            .env("TANDEM_ENDPOINT", self.quic.to_string())
            .env("TANDEM_CERTS", certs)
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed and returns its standard output.
    pub fn cli_ok(&self, certs: &Path, arguments: &[&str]) -> String {
        let output = self.cli(certs, arguments);
        assert!(
            output.status.success(),
            "tandem {arguments:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
