//! Running the real `tandem` binary in tests: init, node processes and CLI calls. The
//! processes are the chaos harness's (`chaos::processes`); this module only adds the
//! tests' conveniences, which fail the test where the harness returns an error.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use chaos::processes::node_health;

pub fn tandem_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

pub fn tandem() -> Command {
    Command::new(tandem_path())
}

/// `tandem init` for the comma-separated `nodes`, into `directory/certs`.
pub fn init(directory: &Path, nodes: &str) -> PathBuf {
    let nodes: Vec<&str> = nodes.split(',').collect();
    chaos::processes::init(&tandem_path(), directory, &nodes).expect("tandem init succeeds")
}

/// A free loopback port for TCP or UDP (see [`chaos::processes::free_port`]).
pub fn free_port() -> u16 {
    chaos::processes::free_port()
}

/// Polls `condition` every 100 ms until it holds, failing the test after `seconds`.
pub fn wait_until(seconds: u64, what: &str, condition: impl FnMut() -> bool) {
    assert!(
        chaos::processes::wait_until(seconds, condition),
        "waited {seconds} s for {what}"
    );
}

/// A `tandem node` process of the harness; killed with SIGKILL when dropped.
pub struct NodeProcess {
    process: chaos::processes::NodeProcess,
}

impl Deref for NodeProcess {
    type Target = chaos::processes::NodeProcess;

    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl DerefMut for NodeProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

impl NodeProcess {
    /// Starts a node as the only member of a new cluster, and waits until it registered.
    pub fn start_cluster_of_one(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        metrics: Option<u16>,
    ) -> NodeProcess {
        let mut launch = Self::launch(certs, name, data_dir, 0, &["--control-plane"]);
        launch.metrics_port = metrics;
        let node = Self::run(launch);
        node.cli_ok(certs, &["cluster", "init"]);
        node.wait_registered(certs, name);
        node
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
        let mut launch = Self::launch(certs, name, data_dir, quic_port, extra);
        launch.metrics_port = metrics;
        Self::run(launch)
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
        let mut launch = Self::launch(certs, name, data_dir, quic_port, extra);
        launch.environment = environment
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        Self::run(launch)
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
        let mut launch = Self::launch(certs, name, data_dir, quic_port, extra);
        launch.log = Some(log.to_path_buf());
        Self::run(launch)
    }

    fn launch(
        certs: &Path,
        name: &str,
        data_dir: &Path,
        quic_port: u16,
        extra: &[&str],
    ) -> chaos::processes::NodeLaunch {
        let mut launch = chaos::processes::NodeLaunch::new(&tandem_path(), certs, name, data_dir);
        launch.quic_port = quic_port;
        launch.extra = extra.iter().map(|argument| argument.to_string()).collect();
        launch
    }

    /// A process the harness started with a launch of the test's own.
    pub fn adopt(process: chaos::processes::NodeProcess) -> NodeProcess {
        NodeProcess { process }
    }

    fn run(launch: chaos::processes::NodeLaunch) -> NodeProcess {
        match launch.start() {
            Ok(process) => NodeProcess { process },
            Err(error) => panic!("node {} did not start: {error}", launch.name),
        }
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
