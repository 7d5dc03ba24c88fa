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
    pub metrics: u16,
}

/// A free loopback UDP port, for a QUIC address that must stay the same across restarts.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` every 100 ms until it holds, failing the test after `seconds`.
pub fn wait_until(seconds: u64, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {seconds} s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl NodeProcess {
    /// Starts a node from the config `tandem init` wrote, on ephemeral ports.
    pub fn start(certs: &Path, name: &str, data_dir: &Path, metrics: Option<u16>) -> NodeProcess {
        Self::start_with(certs, name, data_dir, metrics, 0, &[])
    }

    /// Starts a node as the only member of a new cluster, and waits until it registered.
    pub fn start_cluster_of_one(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        metrics: Option<u16>,
    ) -> NodeProcess {
        let node = Self::start_with(certs, name, data_dir, metrics, 0, &["--control-plane"]);
        node.cli_ok(certs, &["cluster", "init"]);
        node.wait_registered(certs, name);
        node
    }

    /// Waits until `tandem status` through this node lists `name` as an up node.
    pub fn wait_registered(&self, certs: &Path, name: &str) {
        wait_until(30, &format!("node {name} to register"), || {
            self.status(certs)
                .is_some_and(|status| node_health(&status, name).as_deref() == Some("up"))
        });
    }

    /// `tandem status --json` through this node, when it answers.
    pub fn status(&self, certs: &Path) -> Option<serde_json::Value> {
        let output = self.cli(certs, &["status", "--json"]);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Starts a node on a fixed QUIC port (0: any) with extra `tandem node` arguments.
    pub fn start_with(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        metrics: Option<u16>,
        quic_port: u16,
        extra: &[&str],
    ) -> NodeProcess {
        Self::spawn(
            certs,
            name,
            data_dir,
            metrics,
            quic_port,
            extra,
            Stdio::null(),
            &[],
        )
    }

    /// [`NodeProcess::start_with`] with environment variables set for the node process
    /// (`FAILPOINTS`, for one).
    pub fn start_with_environment(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        quic_port: u16,
        extra: &[&str],
        environment: &[(&str, &str)],
    ) -> NodeProcess {
        Self::spawn(
            certs,
            name,
            data_dir,
            None,
            quic_port,
            extra,
            Stdio::null(),
            environment,
        )
    }

    /// [`NodeProcess::start_with`], with the node's log (its standard error) appended to
    /// the file `log`.
    pub fn start_logging(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        quic_port: u16,
        extra: &[&str],
        log: &Path,
    ) -> NodeProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Self::spawn(
            certs,
            name,
            data_dir,
            None,
            quic_port,
            extra,
            file.into(),
            &[],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        metrics: Option<u16>,
        quic_port: u16,
        extra: &[&str],
        stderr: Stdio,
        environment: &[(&str, &str)],
    ) -> NodeProcess {
        let config = certs.join(format!("{name}.toml"));
        let listen = format!("127.0.0.1:{quic_port}");
        let mut command = tandem();
        command.args([
            "node",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &listen,
            "--nbd",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]);
        command.args(extra);
        command.envs(environment.iter().copied());
        let metrics = metrics.unwrap_or_else(free_port);
        command.args(["--metrics", &format!("127.0.0.1:{metrics}")]);
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
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
            metrics,
            child,
        }
    }

    /// A counter of this process from its Prometheus endpoint: the sum over its label
    /// sets, 0 before it was first incremented.
    pub fn metric(&self, name: &str) -> f64 {
        chaos::processes::counter(self.metrics, name)
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

    /// Runs a CLI command with one environment variable set.
    pub fn cli_env(&self, certs: &Path, arguments: &[&str], key: &str, value: &str) -> Output {
        tandem()
            .args(arguments)
            .env("TANDEM_ENDPOINT", self.quic.to_string())
            .env("TANDEM_CERTS", certs)
            .env(key, value)
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

pub use chaos::processes::node_health;
