//! The cluster as `tandem node` processes on loopback: kill -9 and SIGSTOP/SIGCONT of
//! real processes, partitions, delays and loss through each node's own fault injection on
//! every node-to-node call (the kernel here has no netem). Every node keeps its QUIC and
//! NBD ports across restarts, so members, hosts and the run find it again.

use crate::client::NodeCaller;
use crate::cluster::{Cluster, NodeSpec};
use crate::Error;
use protocol::cluster::FaultRule;
use protocol::messages::Request;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started cluster may take until every node is registered and up.
pub const CLUSTER_READY_SECONDS: u64 = 60;

/// The lowest port the harness hands out when the kernel's ephemeral range leaves room
/// below it.
const HARNESS_PORT_FIRST: u16 = 10_000;

/// How many candidates [`free_port`] tries before it gives up with port 0.
const FREE_PORT_ATTEMPTS_MAX: u32 = 4_096;

/// A free loopback port, bindable for TCP and for UDP at the moment of the call, that no
/// earlier call of this process returned.
///
/// The port is outside the kernel's ephemeral range (`ip_local_port_range`). A port the
/// kernel hands out for `bind(0)` is released at once and then belongs to nobody: a node
/// started earlier could take it for an outgoing connection or its own metrics port
/// before the node it was chosen for binds it, and that node then exits before its
/// "serving" line (CI's chaos run on 2026-12-07 lost its cluster to that). Ports outside
/// the range are never given to outgoing connections, and a counter shared by the
/// process's threads keeps two tests from receiving the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    /// The range and the next candidate's offset in it, read and chosen once per process.
    struct PortPool {
        first: u16,
        span: u32,
        next_offset: AtomicU32,
    }
    static POOL: std::sync::OnceLock<PortPool> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let (first, last) = harness_port_range();
        let span = u32::from(last - first) + 1;
        PortPool {
            first,
            span,
            // Processes that run side by side (two test binaries, a test and a chaos
            // run) start at different places in the range.
            next_offset: AtomicU32::new(std::process::id().wrapping_mul(7_919) % span),
        }
    });
    for _ in 0..FREE_PORT_ATTEMPTS_MAX {
        let offset = pool.next_offset.fetch_add(1, Ordering::Relaxed) % pool.span;
        let port = pool.first + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    // Port 0 lets the node take any port; a caller that must know it reads it from the
    // node's "serving" line.
    0
}

/// The ports [`free_port`] chooses from: below the ephemeral range when it leaves at
/// least 1,000 ports there, otherwise above it.
fn harness_port_range() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut numbers = text.split_whitespace().map(str::parse::<u16>);
            Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999));
    if ephemeral.0 >= HARNESS_PORT_FIRST + 1_000 {
        (HARNESS_PORT_FIRST, ephemeral.0 - 1)
    } else {
        (ephemeral.1.saturating_add(1).min(64_535), 65_535)
    }
}

/// Polls `condition` every 100 ms until it holds or `seconds` pass; whether it held.
pub fn wait_until(seconds: u64, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `tandem node` process: killed with SIGKILL when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub quic: SocketAddr,
    pub nbd: SocketAddr,
    pub metrics: u16,
}

/// How to start one node process.
#[derive(Debug, Clone)]
pub struct NodeLaunch {
    pub tandem: PathBuf,
    pub certs: PathBuf,
    pub name: String,
    pub data_dir: PathBuf,
    /// 0: any port (only for a node that is never restarted).
    pub quic_port: u16,
    pub nbd_port: u16,
    pub metrics_port: Option<u16>,
    pub extra: Vec<String>,
    /// Arguments before the `node` subcommand (global flags such as the log format).
    pub global: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// Variables taken out of the node's environment (`RUST_LOG`, for one).
    pub environment_removed: Vec<String>,
    /// Appends the node's log (its standard error) to this file; none: discarded.
    pub log: Option<PathBuf>,
}

impl NodeLaunch {
    pub fn new(tandem: &Path, certs: &Path, name: &str, data_dir: &Path) -> NodeLaunch {
        NodeLaunch {
            tandem: tandem.to_path_buf(),
            certs: certs.to_path_buf(),
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            quic_port: 0,
            nbd_port: 0,
            metrics_port: None,
            extra: Vec::new(),
            global: Vec::new(),
            environment: Vec::new(),
            environment_removed: Vec::new(),
            log: None,
        }
    }

    /// Starts the process and waits for its "serving" line.
    pub fn start(&self) -> Result<NodeProcess, Error> {
        let failed = |detail: String| Error::Start {
            node: self.name.clone(),
            detail,
        };
        let config = self.certs.join(format!("{}.toml", self.name));
        let metrics = self.metrics_port.unwrap_or_else(free_port);
        let mut command = Command::new(&self.tandem);
        command.args(&self.global);
        command.args([
            "node",
            "--config",
            &config.to_string_lossy(),
            "--listen",
            &format!("127.0.0.1:{}", self.quic_port),
            "--nbd",
            &format!("127.0.0.1:{}", self.nbd_port),
            "--data-dir",
            &self.data_dir.to_string_lossy(),
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]);
        command.args(&self.extra);
        for variable in &self.environment_removed {
            command.env_remove(variable);
        }
        command.envs(self.environment.iter().map(|(key, value)| (key, value)));
        let stderr = match &self.log {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?
                .into(),
            None => Stdio::null(),
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|error| failed(format!("cannot run {}: {error}", self.tandem.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        // "node NAME serving: quic ADDRESS nbd ADDRESS"
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() != 7 || words[2] != "serving:" {
            let _ = child.kill();
            let status = child
                .wait()
                .map(|status| status.to_string())
                .unwrap_or_else(|error| error.to_string());
            // The node's own words say why it did not serve; the log goes with the
            // cluster's temporary directory, so they travel in the error.
            let log_tail = self
                .log
                .as_deref()
                .map(log_tail)
                .unwrap_or_else(|| "(no log kept)".into());
            return Err(failed(format!(
                "unexpected first line {line:?} ({status}); its log ends:\n{log_tail}"
            )));
        }
        let parse = |word: &str| {
            word.parse::<SocketAddr>()
                .map_err(|error| failed(format!("bad address {word}: {error}")))
        };
        Ok(NodeProcess {
            quic: parse(words[4])?,
            nbd: parse(words[6])?,
            metrics,
            child,
        })
    }
}

/// The last lines of the log at `path`, at most [`LOG_TAIL_LINES_MAX`].
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let first = lines.len().saturating_sub(LOG_TAIL_LINES_MAX);
            lines[first..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// How many lines of a node's log a start failure quotes.
const LOG_TAIL_LINES_MAX: usize = 20;

impl NodeProcess {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of a child this process started and has not waited
        // for, so the pid still names that child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// A counter of this process from its Prometheus endpoint (see [`counter`]).
    pub fn metric(&self, name: &str) -> f64 {
        counter(self.metrics, name)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// A counter from the Prometheus endpoint on loopback port `port`: the sum over its
/// label sets, 0 before it was first incremented or when nothing answers.
pub fn counter(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `tandem init` into `directory/certs` for `nodes`; the certificates directory.
pub fn init(tandem: &Path, directory: &Path, nodes: &[&str]) -> Result<PathBuf, Error> {
    let certs = directory.join("certs");
    let output = Command::new(tandem)
        .args([
            "init",
            "--dir",
            &certs.to_string_lossy(),
            "--nodes",
            &nodes.join(","),
        ])
        .output()?;
    if !output.status.success() {
        return Err(Error::Command {
            command: "tandem init".into(),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(certs)
}

/// Runs one CLI command against `endpoint`, waiting for it (the set-up's commands).
pub fn cli(
    tandem: &Path,
    certs: &Path,
    endpoint: SocketAddr,
    arguments: &[&str],
) -> Result<String, Error> {
    let output = Command::new(tandem)
        .args(arguments)
        .env("TANDEM_ENDPOINT", endpoint.to_string())
        .env("TANDEM_CERTS", certs)
        .output()?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("tandem {}", arguments.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The health `tandem status --json` reports for a node, if it lists it.
pub fn node_health(status: &serde_json::Value, name: &str) -> Option<String> {
    status["sites"].as_object()?.values().find_map(|nodes| {
        nodes.as_array()?.iter().find_map(|node| {
            (node["name"] == name).then(|| node["health"].as_str().unwrap_or_default().to_string())
        })
    })
}

struct Member {
    spec: NodeSpec,
    launch: NodeLaunch,
    process: Option<NodeProcess>,
    paused: bool,
}

/// The processes backend: `site-a` with three members that are also nodes, `site-b`
/// with plain nodes, all on loopback, in a directory removed when the cluster is dropped
/// (kept with `keep`).
pub struct ProcessCluster {
    nodes: Vec<NodeSpec>,
    members: Vec<Member>,
    certs: PathBuf,
    directory: tempfile::TempDir,
    /// The fault rules set now, by (node, peer): set again on a node that restarts, since
    /// a node keeps its rules in memory.
    rules: HashMap<(String, String), FaultRule>,
    runtime: tokio::runtime::Runtime,
    caller: NodeCaller,
}

impl ProcessCluster {
    /// Starts `site_a_members` members at site-a (a1, a2, …) and `site_b_nodes` nodes at
    /// site-b (b1, …), makes the members one control plane and waits until every node is
    /// up. `environment` goes to every node process (`FAILPOINTS`, for one).
    pub fn start(
        tandem: &Path,
        site_a_members: usize,
        site_b_nodes: usize,
        environment: &[(String, String)],
    ) -> Result<ProcessCluster, Error> {
        let directory = tempfile::Builder::new().prefix("tandem-chaos-").tempdir()?;
        let mut names: Vec<String> = (1..=site_a_members)
            .map(|index| format!("a{index}"))
            .collect();
        names.extend((1..=site_b_nodes).map(|index| format!("b{index}")));
        let name_list: Vec<&str> = names.iter().map(String::as_str).collect();
        let certs = init(tandem, directory.path(), &name_list)?;
        let quic_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let member_addresses: Vec<String> = quic_ports[..site_a_members]
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let mut members = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let member = index < site_a_members;
            let site = if member { "site-a" } else { "site-b" };
            let mut launch = NodeLaunch::new(tandem, &certs, name, &directory.path().join(name));
            launch.quic_port = quic_ports[index];
            launch.nbd_port = free_port();
            launch.log = Some(directory.path().join(format!("{name}.log")));
            launch.environment = environment.to_vec();
            launch.extra = vec!["--site".into(), site.into(), "--fault-injection".into()];
            if member {
                launch.extra.push("--control-plane".into());
            }
            // Every node, the first member too: without the flag a node takes the
            // members `tandem init` wrote into its config (the default ports 7100-7102),
            // and once another member leads it forwards requests and heartbeats there.
            launch.extra.push("--members".into());
            launch.extra.push(member_addresses.join(","));
            members.push(Member {
                spec: NodeSpec {
                    name: name.clone(),
                    site: site.into(),
                    member,
                },
                launch,
                process: None,
                paused: false,
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut cluster = ProcessCluster {
            nodes: members.iter().map(|member| member.spec.clone()).collect(),
            members,
            certs: certs.clone(),
            directory,
            rules: HashMap::new(),
            runtime,
            caller: NodeCaller::new(&certs),
        };
        cluster.members[0].process = Some(cluster.members[0].launch.start()?);
        let first = cluster.endpoint(&names[0])?;
        cli(tandem, &cluster.certs, first, &["cluster", "init"])?;
        for index in 1..cluster.members.len() {
            cluster.members[index].process = Some(cluster.members[index].launch.start()?);
        }
        for name in &names[1..site_a_members] {
            cli(
                tandem,
                &cluster.certs,
                first,
                &["cluster", "add-member", name],
            )?;
        }
        cluster.wait_all_up(CLUSTER_READY_SECONDS)?;
        Ok(cluster)
    }

    fn member(&self, node: &str) -> Result<&Member, Error> {
        self.members
            .iter()
            .find(|member| member.spec.name == node)
            .ok_or_else(|| Error::UnknownNode { node: node.into() })
    }

    fn member_mut(&mut self, node: &str) -> Result<&mut Member, Error> {
        self.members
            .iter_mut()
            .find(|member| member.spec.name == node)
            .ok_or_else(|| Error::UnknownNode { node: node.into() })
    }

    /// The node process, while it runs.
    pub fn process(&self, node: &str) -> Option<&NodeProcess> {
        self.member(node).ok()?.process.as_ref()
    }

    pub fn tandem(&self) -> &Path {
        &self.members[0].launch.tandem
    }

    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    /// Waits until `tandem status` lists every node up.
    pub fn wait_all_up(&self, seconds: u64) -> Result<(), Error> {
        let names: Vec<String> = self.nodes.iter().map(|node| node.name.clone()).collect();
        let mut last = String::new();
        let up = wait_until(seconds, || {
            let Some(endpoint) = self
                .members
                .iter()
                .filter(|member| member.spec.member && member.process.is_some() && !member.paused)
                .find_map(|member| member.process.as_ref().map(|process| process.quic))
            else {
                return false;
            };
            match cli(self.tandem(), &self.certs, endpoint, &["status", "--json"]) {
                Ok(output) => {
                    let status: serde_json::Value =
                        serde_json::from_str(&output).unwrap_or_default();
                    let down: Vec<&String> = names
                        .iter()
                        .filter(|name| node_health(&status, name).as_deref() != Some("up"))
                        .collect();
                    last = format!("not up: {down:?}");
                    down.is_empty()
                }
                Err(error) => {
                    last = error.to_string();
                    false
                }
            }
        });
        if up {
            Ok(())
        } else {
            Err(Error::NotReady { detail: last })
        }
    }

    fn set_rule(&mut self, node: &str, peer: &str, rule: FaultRule) -> Result<(), Error> {
        let key = (node.to_string(), peer.to_string());
        if rule == FaultRule::default() {
            self.rules.remove(&key);
        } else {
            self.rules.insert(key, rule.clone());
        }
        if !self.answering(node) {
            // Set when the node restarts or resumes.
            return Ok(());
        }
        let address = self.endpoint(node)?;
        let request = Request::SetFault {
            peer: peer.to_string(),
            rule,
        };
        self.runtime
            .block_on(self.caller.call(node, address, request))
            .map(|_| ())
    }

    /// Brings `node`'s rules to what the run has recorded, for every peer: after a restart
    /// (a new process has none) and after a resume. A rule cleared while the node was
    /// paused is cleared here too: it was only dropped from the record then, and the node
    /// kept dropping a peer's calls for the rest of the round (found by the schedule: a
    /// mirror stayed `syncing` after its faults healed, seed 10733251767405921080 round 62).
    fn reapply_rules(&mut self, node: &str) -> Result<(), Error> {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .map(|spec| spec.name.clone())
            .filter(|peer| peer != node)
            .collect();
        for peer in peers {
            let rule = self
                .rules
                .get(&(node.to_string(), peer.clone()))
                .cloned()
                .unwrap_or_default();
            self.set_rule(node, &peer, rule)?;
        }
        Ok(())
    }

    fn rule_both_ways(
        &mut self,
        node: &str,
        peers: &[String],
        rule: FaultRule,
    ) -> Result<(), Error> {
        for peer in peers {
            self.set_rule(node, peer, rule.clone())?;
            self.set_rule(peer, node, rule.clone())?;
        }
        Ok(())
    }
}

impl Cluster for ProcessCluster {
    fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    fn certs(&self) -> &Path {
        &self.certs
    }

    fn endpoint(&self, node: &str) -> Result<SocketAddr, Error> {
        let member = self.member(node)?;
        Ok(SocketAddr::from(([127, 0, 0, 1], member.launch.quic_port)))
    }

    fn nbd(&self, node: &str) -> Result<SocketAddr, Error> {
        let member = self.member(node)?;
        Ok(SocketAddr::from(([127, 0, 0, 1], member.launch.nbd_port)))
    }

    fn kill(&mut self, node: &str) -> Result<(), Error> {
        let member = self.member_mut(node)?;
        if let Some(mut process) = member.process.take() {
            process.kill();
        }
        member.paused = false;
        Ok(())
    }

    fn restart(&mut self, node: &str) -> Result<(), Error> {
        let member = self.member_mut(node)?;
        if member.process.is_none() {
            member.process = Some(member.launch.start()?);
            self.reapply_rules(node)?;
        }
        Ok(())
    }

    fn pause(&mut self, node: &str) -> Result<(), Error> {
        let member = self.member_mut(node)?;
        if let Some(process) = &member.process {
            process.pause();
            member.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self, node: &str) -> Result<(), Error> {
        let member = self.member_mut(node)?;
        let was_paused = member.paused;
        if let Some(process) = &member.process {
            process.resume();
        }
        member.paused = false;
        if was_paused {
            self.reapply_rules(node)?;
        }
        Ok(())
    }

    fn partition(&mut self, node: &str, peers: &[String]) -> Result<(), Error> {
        let rule = FaultRule {
            drop: true,
            ..FaultRule::default()
        };
        self.rule_both_ways(node, peers, rule)
    }

    fn reconnect(&mut self, node: &str, peers: &[String]) -> Result<(), Error> {
        self.rule_both_ways(node, peers, FaultRule::default())
    }

    fn degrade(
        &mut self,
        node: &str,
        peers: &[String],
        delay_milliseconds: u64,
        loss_percent: u8,
    ) -> Result<(), Error> {
        let rule = FaultRule {
            drop: false,
            delay_milliseconds,
            loss_percent,
        };
        self.rule_both_ways(node, peers, rule)
    }

    fn heal(&mut self) -> Result<(), Error> {
        let names: Vec<String> = self.nodes.iter().map(|node| node.name.clone()).collect();
        // Every node and rule is healed, also after one failed (that failure is the
        // answer): one node's trouble must not leave the others paused or cut off.
        let mut first_failure = None;
        for name in &names {
            if let Err(error) = self.resume(name).and_then(|()| self.restart(name)) {
                first_failure.get_or_insert(error);
            }
        }
        let rules: Vec<(String, String)> = self.rules.keys().cloned().collect();
        for (node, peer) in rules {
            if let Err(error) = self.set_rule(&node, &peer, FaultRule::default()) {
                first_failure.get_or_insert(error);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    fn answering(&self, node: &str) -> bool {
        self.member(node)
            .is_ok_and(|member| member.process.is_some() && !member.paused)
    }

    fn keep_files(&mut self) -> Option<PathBuf> {
        self.directory.disable_cleanup(true);
        Some(self.directory.path().to_path_buf())
    }
}
