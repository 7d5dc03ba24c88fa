//! The runner: one round after another against one cluster. A round creates its volumes
//! on a healthy cluster, starts a host writer and its copy, injects the round's faults on
//! the plan's timeline, heals everything, waits for the copy to settle, reads the volumes
//! back, runs the checkers, and cleans up so the next round starts from an empty
//! cluster (which the catalog checker confirms).

use crate::check::{self, CatalogVolume, Checker, Finding, NodeVolume, VolumeWrites};
use crate::client::{Cli, NodeCaller};
use crate::cluster::Cluster;
use crate::history::{spans, History, Operation, Outcome, Span};
use crate::schedule::{self, CopyKind, Fault, FaultKind, RoundPlan, ScheduleConfig};
use crate::workload::{fill_volume, poll_progress, read_volume, Watched, Writer};
use crate::Error;
use protocol::messages::{Request, Response};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the poller reads a copy's progress.
pub const POLL_MILLISECONDS: u64 = 250;
/// The copy rate of a round's clone and mirror, in MiB/s: slow enough that a 4 MiB copy
/// spans the round's faults and host writes.
pub const COPY_RATE_MEBIBYTES_PER_SECOND: &str = "2";

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    pub rounds: u64,
    /// The first round's number (a replay of one round of an earlier run starts there).
    pub first_round: u64,
    pub schedule: ScheduleConfig,
    pub volume_bytes: u64,
    /// A CLI command that takes longer is a hang.
    pub command_seconds_max: u64,
    /// After the faults healed, the cluster and the round's copy must settle within this.
    pub settle_seconds_max: u64,
    /// The writer's pause between operations.
    pub write_pause_milliseconds: u64,
}

impl Default for RunConfig {
    fn default() -> RunConfig {
        RunConfig {
            seed: 0,
            rounds: 10,
            first_round: 0,
            schedule: ScheduleConfig::default(),
            volume_bytes: 4 << 20,
            command_seconds_max: 45,
            settle_seconds_max: 90,
            write_pause_milliseconds: 2,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rounds: u64,
    pub faults: BTreeMap<FaultKind, u64>,
    pub acknowledged_writes_checked: u64,
    pub durable_writes: u64,
    pub copies_checked: u64,
    pub progress_readings: u64,
    /// Every finding, with the round it came from.
    pub findings: Vec<(u64, Finding)>,
    /// Seconds spent in each phase of the rounds, to see where a run's time goes.
    pub phase_seconds: BTreeMap<&'static str, f64>,
}

impl Summary {
    pub fn count(&self, checker: Checker) -> usize {
        self.findings
            .iter()
            .filter(|(_, finding)| finding.checker == checker)
            .count()
    }

    /// Every finding, of every checker: a run with any fails.
    pub fn failures(&self) -> usize {
        self.findings.len()
    }

    /// Where the time went, per round: "setup 0.4 s, faults 3.0 s, ...".
    pub fn phases(&self) -> String {
        let rounds = self.rounds.max(1) as f64;
        self.phase_seconds
            .iter()
            .map(|(phase, seconds)| format!("{phase} {:.1} s", seconds / rounds))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        write!(
            formatter,
            "chaos: rounds {}; faults {} ({}); acknowledged writes checked {} ({} flushed); copies checked {}; progress readings {}; lost writes {}; mismatches {}; progress violations {}; hangs {}; catalog disagreements {}",
            self.rounds,
            self.faults.values().sum::<u64>(),
            faults.join(", "),
            self.acknowledged_writes_checked,
            self.durable_writes,
            self.copies_checked,
            self.progress_readings,
            self.count(Checker::Writes),
            self.count(Checker::Copies),
            self.count(Checker::Progress),
            self.count(Checker::Liveness),
            self.count(Checker::Catalog),
        )
    }
}

/// The volumes of one round.
struct Names {
    source: String,
    target: String,
    intermediate: String,
}

impl Names {
    fn new(round: u64) -> Names {
        Names {
            source: format!("r{round}-p"),
            target: format!("r{round}-s"),
            intermediate: format!("r{round}-pi"),
        }
    }
}

/// A fault in force, and how to end it.
enum Healing {
    Restart(Vec<String>),
    Resume(String),
    Reconnect(Vec<(String, Vec<String>)>),
    AddMember(String),
    Nothing,
}

pub struct Runner {
    cluster: Box<dyn Cluster>,
    cli: Cli,
    history: History,
    runtime: tokio::runtime::Runtime,
    /// Direct calls to the nodes, on `runtime`.
    caller: NodeCaller,
    config: RunConfig,
    pub summary: Summary,
    /// Where a failing run's history is written.
    pub history_path: Option<PathBuf>,
    /// Called with each round's plan before it runs and its findings after.
    pub verbose: bool,
}

impl Runner {
    pub fn new(
        cluster: Box<dyn Cluster>,
        tandem: PathBuf,
        config: RunConfig,
    ) -> Result<Runner, Error> {
        let history = History::new();
        let cli = Cli {
            tandem,
            certs: cluster.certs().to_path_buf(),
            history: history.clone(),
            timeout: Duration::from_secs(config.command_seconds_max + 15),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Runner {
            caller: NodeCaller::new(cluster.certs()),
            cluster,
            cli,
            history,
            runtime,
            config,
            summary: Summary::default(),
            history_path: None,
            verbose: false,
        })
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn cluster(&mut self) -> &mut dyn Cluster {
        self.cluster.as_mut()
    }

    /// Runs every round of the config; the summary holds what they found.
    pub fn run(&mut self) -> Result<&Summary, Error> {
        for round in self.config.first_round..self.config.first_round + self.config.rounds {
            let plan = schedule::plan(self.config.seed, round, &self.config.schedule);
            if self.verbose {
                println!("{plan}");
            }
            let before = self.summary.findings.len();
            self.round(&plan)?;
            self.summary.rounds += 1;
            if self.verbose {
                for (_, finding) in &self.summary.findings[before..] {
                    println!("  {finding}");
                }
            }
        }
        // Liveness and progress are read from the whole history at the end.
        let spans = spans(&self.history.events());
        let (readings, findings) = check::check_progress(&spans);
        self.summary.progress_readings = readings;
        let liveness = check::check_liveness(&spans, self.config.command_seconds_max * 1_000_000);
        for finding in findings.into_iter().chain(liveness) {
            self.summary.findings.push((u64::MAX, finding));
        }
        if !self.summary.findings.is_empty() {
            if let Some(path) = &self.history_path {
                self.history.save(path)?;
            }
        }
        Ok(&self.summary)
    }

    /// Adds the time since `since` to `phase` and restarts the clock.
    fn phase_done(&mut self, phase: &'static str, since: &mut Instant) {
        *self.summary.phase_seconds.entry(phase).or_default() += since.elapsed().as_secs_f64();
        *since = Instant::now();
    }

    fn find(&mut self, round: u64, checker: Checker, message: String) {
        self.summary
            .findings
            .push((round, Finding { checker, message }));
    }

    /// Members that answer now, for CLI calls.
    fn member_endpoints(&self) -> Vec<SocketAddr> {
        let endpoints: Vec<SocketAddr> = self
            .cluster
            .nodes()
            .iter()
            .filter(|node| node.member && self.cluster.answering(&node.name))
            .filter_map(|node| self.cluster.endpoint(&node.name).ok())
            .collect();
        if endpoints.is_empty() {
            // Nothing answers: the command is tried on the first member and fails.
            self.cluster
                .nodes()
                .iter()
                .filter_map(|node| self.cluster.endpoint(&node.name).ok())
                .take(1)
                .collect()
        } else {
            endpoints
        }
    }

    fn command(&self, arguments: &[&str]) -> Result<String, String> {
        let endpoint = self.member_endpoints()[0];
        self.runtime.block_on(self.cli.run(endpoint, arguments))
    }

    /// Runs independent commands at once (each is its own process and connection, so a
    /// round's set-up takes one command's time instead of several).
    fn commands(&self, commands: &[Vec<&str>]) -> Vec<Result<String, String>> {
        let endpoint = self.member_endpoints()[0];
        let tasks: Vec<_> = commands
            .iter()
            .map(|arguments| {
                let cli = self.cli.clone();
                let arguments: Vec<String> = arguments.iter().map(|a| a.to_string()).collect();
                self.runtime.spawn(async move {
                    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
                    cli.run(endpoint, &arguments).await
                })
            })
            .collect();
        tasks
            .into_iter()
            .map(|task| {
                self.runtime
                    .block_on(task)
                    .unwrap_or_else(|error| Err(format!("the command's task failed: {error}")))
            })
            .collect()
    }

    /// A command on the healed cluster, retried once when it was refused because a node
    /// counted as down: right after a partition heals, a node whose heartbeats were cut
    /// can be reported down for a moment more, and the refusal itself says to wait for the
    /// node and retry. A node still down after the settle bound fails the command.
    fn command_when_up(&self, arguments: &[&str]) -> Result<String, String> {
        match self.command(arguments) {
            Err(error) if error.contains("is down") => {
                self.cluster_up();
                self.command(arguments)
            }
            result => result,
        }
    }

    fn json(&self, arguments: &[&str]) -> Result<serde_json::Value, String> {
        let endpoint = self.member_endpoints()[0];
        self.runtime.block_on(self.cli.json(endpoint, arguments))
    }

    /// The leader now, as a member that answers says.
    fn leader(&self) -> Option<String> {
        let status = self.json(&["cluster", "status", "--json"]).ok()?;
        status["leader"].as_str().map(str::to_string)
    }

    fn names_where(&self, keep: impl Fn(&crate::cluster::NodeSpec) -> bool) -> Vec<String> {
        self.cluster
            .nodes()
            .iter()
            .filter(|node| keep(node))
            .map(|node| node.name.clone())
            .collect()
    }

    /// Polls `done` until it holds or the settle bound passes, recorded as a settle
    /// operation of `subject` (the liveness checker reports one that did not settle).
    fn settle(&self, subject: &str, mut done: impl FnMut(&Runner) -> Result<bool, String>) -> bool {
        let operation = self.history.invoke(
            "runner",
            Operation::Settle {
                subject: subject.to_string(),
            },
        );
        let deadline = Instant::now() + Duration::from_secs(self.config.settle_seconds_max);
        let mut last = String::from("not checked");
        loop {
            match done(self) {
                Ok(true) => {
                    self.history.end(operation, Outcome::Ok, None);
                    return true;
                }
                Ok(false) => {}
                Err(error) => last = error,
            }
            if Instant::now() >= deadline {
                self.history.end(
                    operation,
                    Outcome::Fail,
                    Some(format!(
                        "not within {} s (last: {last})",
                        self.config.settle_seconds_max
                    )),
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn cluster_up(&self) -> bool {
        let names = self.names_where(|_| true);
        self.settle("the cluster (every node up)", |runner| {
            let status = runner.json(&["status", "--json"])?;
            let down: Vec<&String> = names
                .iter()
                .filter(|name| {
                    crate::processes::node_health(&status, name).as_deref() != Some("up")
                })
                .collect();
            if down.is_empty() {
                Ok(true)
            } else {
                Err(format!("not up: {down:?}"))
            }
        })
    }

    fn start_fault(&mut self, fault: &Fault, source: &str, target: &str) -> Healing {
        let started = Instant::now();
        let healing = self.inject(fault, source, target);
        *self
            .summary
            .phase_seconds
            .entry("(of which injecting)")
            .or_default() += started.elapsed().as_secs_f64();
        healing
    }

    fn inject(&mut self, fault: &Fault, source: &str, target: &str) -> Healing {
        let all = self.names_where(|_| true);
        let pick =
            |candidates: &[String]| candidates[fault.pick as usize % candidates.len()].clone();
        let others = |node: &str| -> Vec<String> {
            all.iter().filter(|name| *name != node).cloned().collect()
        };
        let members = self.names_where(|node| node.member);
        let leader = match fault.kind {
            FaultKind::KillLeader
            | FaultKind::PauseLeader
            | FaultKind::PartitionLeader
            | FaultKind::KillFollowerMember
            | FaultKind::ChangeMembership => self.leader(),
            _ => None,
        };
        let needs_leader = matches!(
            fault.kind,
            FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::PartitionLeader
        );
        if needs_leader && leader.is_none() {
            // No leader now (an election runs): the fault has nothing to act on.
            return Healing::Nothing;
        }
        let followers: Vec<String> = members
            .iter()
            .filter(|name| Some(*name) != leader.as_ref())
            .cloned()
            .collect();
        let result: Result<(Vec<String>, Healing), Error> = (|| match fault.kind {
            FaultKind::KillSourceNode | FaultKind::KillTargetNode => {
                let node = if fault.kind == FaultKind::KillSourceNode {
                    source
                } else {
                    target
                };
                self.cluster.kill(node)?;
                Ok((
                    vec![node.to_string()],
                    Healing::Restart(vec![node.to_string()]),
                ))
            }
            FaultKind::KillLeader => {
                let node = leader.clone().unwrap_or_default();
                self.cluster.kill(&node)?;
                Ok((vec![node.clone()], Healing::Restart(vec![node])))
            }
            FaultKind::KillFollowerMember => {
                let node = pick(&followers);
                self.cluster.kill(&node)?;
                Ok((vec![node.clone()], Healing::Restart(vec![node])))
            }
            FaultKind::PauseNode | FaultKind::PauseLeader => {
                let node = if fault.kind == FaultKind::PauseLeader {
                    leader.clone().unwrap_or_default()
                } else {
                    pick(&all)
                };
                self.cluster.pause(&node)?;
                Ok((vec![node.clone()], Healing::Resume(node)))
            }
            FaultKind::PartitionNode => {
                let node = pick(&all);
                let peers = others(&node);
                self.cluster.partition(&node, &peers)?;
                Ok((vec![node.clone()], Healing::Reconnect(vec![(node, peers)])))
            }
            FaultKind::PartitionSites => {
                let site_a = self.names_where(|node| node.site == "site-a");
                let site_b = self.names_where(|node| node.site != "site-a");
                let mut cuts = Vec::new();
                for node in &site_b {
                    self.cluster.partition(node, &site_a)?;
                    cuts.push((node.clone(), site_a.clone()));
                }
                Ok((site_b, Healing::Reconnect(cuts)))
            }
            FaultKind::PartitionLeader => {
                let node = leader.clone().unwrap_or_default();
                let peers: Vec<String> = followers.clone();
                self.cluster.partition(&node, &peers)?;
                Ok((vec![node.clone()], Healing::Reconnect(vec![(node, peers)])))
            }
            FaultKind::DelayCalls | FaultKind::LoseCalls => {
                // On the copy's own nodes (every call of the node, Raft's too): a node the
                // round's copy does not touch would leave its copy path untested.
                let mut copy_nodes = vec![source.to_string()];
                if target != source {
                    copy_nodes.push(target.to_string());
                }
                let node = pick(&copy_nodes);
                let peers = others(&node);
                let (delay, loss) = if fault.kind == FaultKind::DelayCalls {
                    (u64::from(fault.amount), 0)
                } else {
                    (0, fault.amount.min(100) as u8)
                };
                self.cluster.degrade(&node, &peers, delay, loss)?;
                Ok((vec![node.clone()], Healing::Reconnect(vec![(node, peers)])))
            }
            FaultKind::RestartCluster => {
                for node in &all {
                    self.cluster.kill(node)?;
                }
                Ok((all.clone(), Healing::Restart(all.clone())))
            }
            FaultKind::ChangeMembership => {
                let node = pick(&followers);
                match self.command(&["cluster", "remove-member", &node]) {
                    Ok(_) => Ok((vec![node.clone()], Healing::AddMember(node))),
                    // Refused (the member is needed for a majority now): nothing to undo.
                    Err(_) => Ok((vec![node], Healing::Nothing)),
                }
            }
        })();
        match result {
            Ok((nodes, healing)) => {
                *self.summary.faults.entry(fault.kind).or_default() += 1;
                self.history.record(
                    "nemesis",
                    Operation::Fault {
                        kind: fault.kind,
                        nodes,
                    },
                );
                healing
            }
            Err(error) => {
                self.find(
                    u64::MAX,
                    Checker::Liveness,
                    format!("fault {} could not be injected: {error}", fault.kind),
                );
                Healing::Nothing
            }
        }
    }

    fn heal_fault(&mut self, healing: Healing) {
        let started = Instant::now();
        self.heal(healing);
        *self
            .summary
            .phase_seconds
            .entry("(of which healing)")
            .or_default() += started.elapsed().as_secs_f64();
    }

    fn heal(&mut self, healing: Healing) {
        let result: Result<(), Error> = match healing {
            Healing::Restart(nodes) => nodes.iter().try_for_each(|node| self.cluster.restart(node)),
            Healing::Resume(node) => self.cluster.resume(&node),
            Healing::Reconnect(cuts) => cuts
                .iter()
                .try_for_each(|(node, peers)| self.cluster.reconnect(node, peers)),
            Healing::AddMember(node) => {
                // Added back once the cluster can: a failed attempt is retried at the end.
                self.add_member(&node);
                Ok(())
            }
            Healing::Nothing => Ok(()),
        };
        if let Err(error) = result {
            self.find(
                u64::MAX,
                Checker::Liveness,
                format!("healing failed: {error}"),
            );
        }
    }

    /// Adds `node` back as a control-plane member. A member that found itself removed
    /// has stopped its Raft, and adding it is refused until its node restarts (the
    /// refusal says so): it is restarted then, as the refusal tells an operator, and added
    /// again once every node shows up.
    fn add_member(&mut self, node: &str) {
        match self.command(&["cluster", "add-member", node]) {
            Err(error) if error.contains("restart the node") => {
                let restarted = self
                    .cluster
                    .kill(node)
                    .and_then(|()| self.cluster.restart(node));
                if let Err(error) = restarted {
                    self.find(
                        u64::MAX,
                        Checker::Liveness,
                        format!("removed member {node} could not be restarted: {error}"),
                    );
                    return;
                }
                if self.cluster_up() {
                    let _ = self.command(&["cluster", "add-member", node]);
                }
            }
            _ => {}
        }
    }

    /// Every member the cluster should have is a member again.
    fn members_back(&mut self) {
        let members = self.names_where(|node| node.member);
        let Ok(status) = self.json(&["cluster", "status", "--json"]) else {
            return;
        };
        let present: Vec<String> = status["members"]
            .as_array()
            .map(|members| {
                members
                    .iter()
                    .filter_map(|member| member["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for member in members {
            if !present.contains(&member) {
                self.add_member(&member);
            }
        }
    }

    fn round(&mut self, plan: &RoundPlan) -> Result<(), Error> {
        let round = plan.round;
        let names = Names::new(round);
        let site_a = self.names_where(|node| node.site == "site-a");
        let site_b = self.names_where(|node| node.site != "site-a");
        let source_node = site_a[plan.source_pick as usize % site_a.len()].clone();
        let target_node = match plan.copy {
            CopyKind::Snap => source_node.clone(),
            CopyKind::Gsnap if !site_b.is_empty() => {
                site_b[plan.target_pick as usize % site_b.len()].clone()
            }
            _ => {
                let others = self.names_where(|node| node.name != source_node);
                others[plan.target_pick as usize % others.len()].clone()
            }
        };
        let size = format!("{}B", self.config.volume_bytes);
        let size = size.as_str();
        let mut clock = Instant::now();

        // Set-up, on a healthy cluster.
        let mut setup = vec![vec![
            "volume",
            "create",
            &names.source,
            "--node",
            &source_node,
            "--size",
            size,
        ]];
        if plan.copy != CopyKind::Snap {
            setup.push(vec![
                "volume",
                "create",
                &names.target,
                "--node",
                &target_node,
                "--size",
                size,
            ]);
        }
        for (arguments, result) in setup.iter().zip(self.commands(&setup)) {
            if let Err(error) = result {
                self.find(
                    round,
                    Checker::Liveness,
                    format!(
                        "set-up `tandem {}` failed on a healthy cluster: {error}",
                        arguments.join(" ")
                    ),
                );
                return self.cleanup(round, plan.copy, &names);
            }
        }

        // The source holds data everywhere before its copy starts.
        let source_address = self.cluster.nbd(&source_node)?;
        let filled = self.runtime.block_on(fill_volume(
            &format!("filler-{round}"),
            source_address,
            &names.source,
            self.config.volume_bytes,
            &self.history,
        ));
        if let Err(error) = filled {
            self.find(
                round,
                Checker::Liveness,
                format!("set-up: {error} on a healthy cluster"),
            );
            return self.cleanup(round, plan.copy, &names);
        }

        // The host writes for the whole round.
        let stop_writer = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            client: format!("writer-{round}"),
            volume: names.source.clone(),
            address: self.cluster.nbd(&source_node)?,
            volume_bytes: self.config.volume_bytes,
            seed: plan.writer_seed,
            pause_milliseconds: self.config.write_pause_milliseconds,
        };
        let writer = self
            .runtime
            .spawn(writer.run(self.history.clone(), stop_writer.clone()));
        self.phase_done("setup", &mut clock);

        // The timeline: the copy's start and each fault's start and end.
        let started = Instant::now();
        let mut events: Vec<(u64, usize, bool)> = Vec::new();
        for (index, fault) in plan.faults.iter().enumerate() {
            events.push((fault.at_milliseconds, index, true));
            events.push((
                fault.at_milliseconds + fault.duration_milliseconds,
                index,
                false,
            ));
        }
        events.sort_by_key(|(at, index, starts)| (*at, !*starts, *index));
        let mut copy_started = false;
        let mut copy_task = None;
        let mut healings: HashMap<usize, Healing> = HashMap::new();
        let mut timeline = events.into_iter().peekable();
        loop {
            let next_fault = timeline.peek().map(|(at, _, _)| *at);
            let next = match (copy_started, next_fault) {
                (false, Some(at)) if at < plan.copy_at_milliseconds => at,
                (false, _) => plan.copy_at_milliseconds,
                (true, Some(at)) => at,
                (true, None) => break,
            };
            let wait = Duration::from_millis(next).saturating_sub(started.elapsed());
            std::thread::sleep(wait);
            if !copy_started
                && next == plan.copy_at_milliseconds
                && next_fault.is_none_or(|at| at >= next)
            {
                copy_started = true;
                copy_task = Some(self.start_copy(plan.copy, &names));
                continue;
            }
            let (_, index, starts) = timeline.next().expect("peeked");
            if starts {
                let healing = self.start_fault(&plan.faults[index], &source_node, &target_node);
                healings.insert(index, healing);
            } else if let Some(healing) = healings.remove(&index) {
                self.heal_fault(healing);
            }
        }
        std::thread::sleep(
            Duration::from_millis(self.config.schedule.round_milliseconds)
                .saturating_sub(started.elapsed()),
        );
        for (_, healing) in healings.drain() {
            self.heal_fault(healing);
        }
        if let Err(error) = self.cluster.heal() {
            self.find(round, Checker::Liveness, format!("healing failed: {error}"));
        }
        self.phase_done("faults", &mut clock);
        let up = self.cluster_up();
        self.members_back();
        stop_writer.store(true, Ordering::Relaxed);
        let _ = self.runtime.block_on(writer);
        let copy_started = copy_task
            .map(|task| self.runtime.block_on(task).unwrap_or(CopyStart::Failed))
            .unwrap_or(CopyStart::Failed);
        if !up {
            self.find(
                round,
                Checker::Liveness,
                "the cluster did not come back after the faults healed".into(),
            );
            return self.cleanup(round, plan.copy, &names);
        }

        self.phase_done("recovery", &mut clock);
        // The source holds every acknowledged write.
        let spans = spans(&self.history.events());
        let writes = VolumeWrites::from_spans(&spans, &names.source);
        match self.read(&source_node, &names.source) {
            Ok(image) => {
                let (checked, findings) = writes.check_final(&names.source, &image);
                self.summary.acknowledged_writes_checked += checked;
                self.summary.durable_writes += writes.acknowledged().1;
                for finding in findings {
                    self.summary.findings.push((round, finding));
                }
            }
            Err(error) => self.find(round, Checker::Liveness, error),
        }

        self.phase_done("writes check", &mut clock);
        // The copy equals the source's image at its instant.
        self.finish_copy(
            plan.copy,
            round,
            &names,
            &source_node,
            &target_node,
            copy_started,
            &writes,
        );
        self.phase_done("copy", &mut clock);
        let cleaned = self.cleanup(round, plan.copy, &names);
        self.phase_done("cleanup", &mut clock);
        cleaned
    }

    /// Starts the round's copy in the background: its first command, which may fail under
    /// the faults (the copy is started again after they healed).
    fn start_copy(&self, copy: CopyKind, names: &Names) -> tokio::task::JoinHandle<CopyStart> {
        let cli = self.cli.clone();
        let endpoints = self.member_endpoints();
        let source = names.source.clone();
        let target = names.target.clone();
        let intermediate = names.intermediate.clone();
        self.runtime.spawn(async move {
            let endpoint = endpoints[0];
            let result = match copy {
                CopyKind::Snap => cli.run(endpoint, &["snap", &source, &target]).await,
                CopyKind::Clone => {
                    match cli
                        .run(
                            endpoint,
                            &[
                                "clone",
                                "create",
                                &source,
                                &target,
                                "--rate",
                                COPY_RATE_MEBIBYTES_PER_SECOND,
                            ],
                        )
                        .await
                    {
                        Ok(_) => cli.run(endpoint, &["clone", "activate", &target]).await,
                        Err(error) => Err(error),
                    }
                }
                CopyKind::SyncMirror | CopyKind::AsyncMirror => {
                    let mode = if copy == CopyKind::SyncMirror {
                        "sync"
                    } else {
                        "async"
                    };
                    cli.run(
                        endpoint,
                        &[
                            "mirror",
                            "establish",
                            &source,
                            &target,
                            "--mode",
                            mode,
                            "--rate",
                            COPY_RATE_MEBIBYTES_PER_SECOND,
                        ],
                    )
                    .await
                }
                CopyKind::Gsnap => {
                    match cli
                        .json(
                            endpoint,
                            &["gsnap", &source, &intermediate, &target, "--json"],
                        )
                        .await
                    {
                        Ok(job) => {
                            return job["job"]
                                .as_u64()
                                .map_or(CopyStart::Failed, CopyStart::Job)
                        }
                        Err(error) => Err(error),
                    }
                }
            };
            match result {
                Ok(_) => CopyStart::Started,
                Err(_) => CopyStart::Failed,
            }
        })
    }

    fn read(&self, node: &str, volume: &str) -> Result<Vec<u8>, String> {
        let address = self.cluster.nbd(node).map_err(|error| error.to_string())?;
        self.runtime
            .block_on(read_volume(address, volume, self.config.volume_bytes))
    }

    /// The window of the last successful command whose arguments start with `prefix`.
    fn command_window(&self, prefix: &[&str]) -> Option<(u64, u64)> {
        spans(&self.history.events())
            .iter()
            .rev()
            .find(|span| span.outcome() == Outcome::Ok && is_command(span, prefix))
            .and_then(|span| Some((span.invoked_at, span.ended_at()?)))
    }

    /// When the first command whose arguments start with `prefix` was invoked, whatever
    /// its outcome.
    fn first_invoke(&self, prefix: &[&str]) -> Option<u64> {
        spans(&self.history.events())
            .iter()
            .find(|span| is_command(span, prefix))
            .map(|span| span.invoked_at)
    }

    /// Polls the progress of session `kind` of `target` while it settles into `state`;
    /// whether it did within the settle bound.
    fn settle_session(&self, kind: &'static str, target: &str, state: &str) -> bool {
        let stop = Arc::new(AtomicBool::new(false));
        let poller = self.runtime.spawn(poll_progress(
            self.cli.clone(),
            self.member_endpoints(),
            Watched::Session {
                kind,
                target: target.to_string(),
            },
            Duration::from_millis(POLL_MILLISECONDS),
            stop.clone(),
        ));
        let settled = self.settle(&format!("{kind} {target}"), |runner| {
            Ok(runner.session_state(kind, target)? == state)
        });
        stop.store(true, Ordering::Relaxed);
        let _ = self.runtime.block_on(poller);
        settled
    }

    fn session_state(&self, kind: &str, target: &str) -> Result<String, String> {
        let shown = self.json(&[kind, "show", target, "--json"])?;
        Ok(shown["state"].as_str().unwrap_or_default().to_string())
    }

    fn check_copy_image(
        &mut self,
        round: u64,
        node: &str,
        copy: &str,
        writes: &VolumeWrites,
        window: (u64, u64),
    ) {
        match self.read(node, copy) {
            Ok(image) => {
                self.summary.copies_checked += 1;
                for finding in writes.check_copy(copy, &image, window.0, window.1) {
                    self.summary.findings.push((round, finding));
                }
            }
            Err(error) => self.find(
                round,
                Checker::Copies,
                format!("cannot read copy {copy}: {error}"),
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_copy(
        &mut self,
        copy: CopyKind,
        round: u64,
        names: &Names,
        source_node: &str,
        target_node: &str,
        started: CopyStart,
        writes: &VolumeWrites,
    ) {
        let (source, target) = (names.source.as_str(), names.target.as_str());
        match copy {
            CopyKind::Snap => {
                if started == CopyStart::Failed
                    && self.command_when_up(&["snap", source, target]).is_err()
                {
                    self.find(
                        round,
                        Checker::Liveness,
                        format!("snap {source} {target} failed after the faults healed"),
                    );
                    return;
                }
                let Some(window) = self.command_window(&["snap", source, target]) else {
                    return;
                };
                self.check_copy_image(round, target_node, target, writes, window);
            }
            CopyKind::Clone => {
                let state = self.session_state("clone", target).unwrap_or_default();
                if state.is_empty() {
                    let _ = self.command(&[
                        "clone",
                        "create",
                        source,
                        target,
                        "--rate",
                        COPY_RATE_MEBIBYTES_PER_SECOND,
                    ]);
                }
                if state.is_empty() || state == "created" {
                    let _ = self.command(&["clone", "activate", target]);
                }
                // An activate whose answer was lost under the faults may still have taken
                // effect: then the clone's instant lies between the first attempt and now.
                let window = self
                    .command_window(&["clone", "activate", target])
                    .or_else(|| {
                        let state = self.session_state("clone", target).ok()?;
                        if state != "active" && state != "copied" {
                            return None;
                        }
                        let first = self.first_invoke(&["clone", "activate", target])?;
                        Some((first, self.history.now_microseconds()))
                    });
                let Some(window) = window else {
                    self.find(
                        round,
                        Checker::Liveness,
                        format!("clone {target} was never activated"),
                    );
                    return;
                };
                let copied = self.settle_session("clone", target, "copied");
                self.check_copy_image(round, target_node, target, writes, window);
                if copied {
                    let _ = self.command(&["clone", "terminate", target]);
                }
            }
            CopyKind::SyncMirror | CopyKind::AsyncMirror => {
                if self.session_state("mirror", target).is_err() {
                    let mode = if copy == CopyKind::SyncMirror {
                        "sync"
                    } else {
                        "async"
                    };
                    let _ = self.command(&[
                        "mirror",
                        "establish",
                        source,
                        target,
                        "--mode",
                        mode,
                        "--rate",
                        COPY_RATE_MEBIBYTES_PER_SECOND,
                    ]);
                }
                let synchronized = self.settle_session("mirror", target, "synchronized");
                if !synchronized {
                    return;
                }
                if let Err(error) = self.command_when_up(&["mirror", "split", target]) {
                    self.find(
                        round,
                        Checker::Liveness,
                        format!("mirror split {target} failed on a healed cluster: {error}"),
                    );
                    return;
                }
                if let Some(window) = self.command_window(&["mirror", "split", target]) {
                    self.check_copy_image(round, target_node, target, writes, window);
                }
                let _ = self.command(&["mirror", "cancel", target]);
            }
            CopyKind::Gsnap => {
                let job = match started {
                    CopyStart::Job(job) => Some(job),
                    _ => self.find_job(source, target).or_else(|| {
                        self.json(&["gsnap", source, &names.intermediate, target, "--json"])
                            .ok()
                            .and_then(|job| job["job"].as_u64())
                    }),
                };
                let Some(job) = job else {
                    self.find(round, Checker::Liveness, format!("gsnap {source} -> {target} could not be started after the faults healed"));
                    return;
                };
                self.finish_job(round, job, names, target_node, writes);
                // An incremental job after a few more writes, on the healed cluster.
                let more = Writer {
                    client: format!("writer-{round}-incremental"),
                    volume: source.to_string(),
                    address: match self.cluster.nbd(source_node) {
                        Ok(address) => address,
                        Err(_) => return,
                    },
                    volume_bytes: self.config.volume_bytes,
                    seed: round ^ 0x5eed,
                    pause_milliseconds: 0,
                };
                let stop = Arc::new(AtomicBool::new(false));
                let task = self
                    .runtime
                    .spawn(more.run(self.history.clone(), stop.clone()));
                std::thread::sleep(Duration::from_millis(30));
                stop.store(true, Ordering::Relaxed);
                let _ = self.runtime.block_on(task);
                let writes = VolumeWrites::from_spans(&spans(&self.history.events()), source);
                let incremental = self
                    .command_when_up(&["gsnap", source, &names.intermediate, target, "--json"])
                    .and_then(|output| {
                        serde_json::from_str::<serde_json::Value>(&output)
                            .map_err(|error| format!("gsnap printed no JSON: {error}"))
                    });
                match incremental {
                    Ok(job) => {
                        if let Some(job) = job["job"].as_u64() {
                            self.finish_job(round, job, names, target_node, &writes);
                        }
                    }
                    Err(error) => self.find(round, Checker::Liveness, format!("the incremental gsnap {source} -> {target} was refused on a healed cluster: {error}")),
                }
            }
        }
    }

    fn find_job(&self, source: &str, target: &str) -> Option<u64> {
        let jobs = self.json(&["gsnap", "list", "--json"]).ok()?;
        jobs.as_array()?
            .iter()
            .rev()
            .find(|job| {
                job["source"] == source && job["target"] == target && job["state"] == "running"
            })
            .and_then(|job| job["job"].as_u64())
    }

    fn finish_job(
        &mut self,
        round: u64,
        job: u64,
        names: &Names,
        target_node: &str,
        writes: &VolumeWrites,
    ) {
        let target = names.target.as_str();
        let stop = Arc::new(AtomicBool::new(false));
        let task = self.runtime.spawn(poll_progress(
            self.cli.clone(),
            self.member_endpoints(),
            Watched::Job { id: job },
            Duration::from_millis(POLL_MILLISECONDS),
            stop.clone(),
        ));
        let mut shown = serde_json::Value::Null;
        let ended = self.settle(&format!("gsnap job {job}"), |runner| {
            shown = runner.json(&["gsnap", "show", &job.to_string(), "--json"])?;
            Ok(shown["state"] != "running" && shown["state"] != "stalled")
        });
        stop.store(true, Ordering::Relaxed);
        let _ = self.runtime.block_on(task);
        if !ended {
            return;
        }
        if shown["state"] != "succeeded" {
            self.find(
                round,
                Checker::Copies,
                format!(
                    "gsnap job {job} ended {} on a healed cluster: {}",
                    shown["state"], shown["error"]
                ),
            );
            return;
        }
        // The instant lies between the command and the end of the job's snap step (the
        // leader's clock, whole seconds).
        let Some(invoked) = spans(&self.history.events())
            .iter()
            .rev()
            .find(|span| matches!(&span.operation, Operation::Command { arguments } if arguments.first().map(String::as_str) == Some("gsnap") && arguments.get(3).map(String::as_str) == Some(target)))
            .map(|span| span.invoked_at)
        else {
            return;
        };
        let snapped = shown["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|step| step["step"] == "snap"))
            .and_then(|step| step["finished_unix_seconds"].as_u64());
        let until = snapped
            .map(|seconds| self.history.microseconds_of_unix_seconds(seconds + 1))
            .unwrap_or_else(|| self.history.now_microseconds());
        self.check_copy_image(
            round,
            target_node,
            target,
            writes,
            (invoked, until.max(invoked)),
        );
    }

    /// Ends the round's sessions, checks that catalog and nodes agree and no slot is
    /// held, deletes the round's volumes and checks that nothing is left.
    /// Only what the round's copy kind can have made is ended and deleted: every CLI
    /// command costs a process and a connection, and a round makes only its own.
    fn cleanup(&mut self, round: u64, copy: CopyKind, names: &Names) -> Result<(), Error> {
        let (source, target) = (names.source.as_str(), names.target.as_str());
        match copy {
            CopyKind::Gsnap => {
                let _ = self.command(&["gsnap", "forget", source, target]);
            }
            CopyKind::Clone => {
                if let Ok(state) = self.session_state("clone", target) {
                    let end = if state == "copied" {
                        "terminate"
                    } else {
                        "cancel"
                    };
                    let _ = self.command(&["clone", end, target]);
                }
            }
            CopyKind::SyncMirror | CopyKind::AsyncMirror => {
                if self.session_state("mirror", target).is_ok() {
                    let _ = self.command(&["mirror", "cancel", target]);
                }
            }
            CopyKind::Snap => {}
        }
        self.check_catalog(round);
        let mut volumes = vec![target, source];
        if copy == CopyKind::Gsnap {
            volumes.insert(1, names.intermediate.as_str());
        }
        // One after another: a snapshot goes before the volume it shares data with.
        let deleted: Vec<&str> = volumes
            .into_iter()
            .filter(|volume| self.command(&["volume", "delete", volume]).is_ok())
            .collect();
        // A delete that answered ok is finished: the catalog read right after it no
        // longer lists the volume in any state. (A failed one may be finished later by
        // the leader; `check_catalog` waits for that.)
        let prefix = format!("r{round}-");
        if let Ok(listed) = self.catalog_volumes(&prefix) {
            for volume in listed
                .iter()
                .filter(|volume| deleted.contains(&volume.name.as_str()))
            {
                self.find(
                    round,
                    Checker::Catalog,
                    format!(
                        "volume {} is listed {} after its delete answered ok",
                        volume.name, volume.state
                    ),
                );
            }
        }
        self.check_catalog(round);
        Ok(())
    }

    /// Catalog and every node agree on the round's volumes, and none of them has a slot
    /// in use (its sessions and lineages are ended by now). Volumes of other rounds are
    /// left to their own round's check, so one leak is reported once.
    fn check_catalog(&mut self, round: u64) {
        let prefix = format!("r{round}-");
        // A volume command that failed under the faults (its answer lost, its leader
        // gone) may have left its intent open with the volume `creating` or `deleting`;
        // the leader's supervisor finishes such an intent within a few ticks. What the
        // check holds is that it is finished, so it waits for that before it compares,
        // and a volume still half-way after the settle bound is reported.
        let mut catalog = Err(String::from("not read"));
        self.settle(
            &format!("the volumes of round {round} (none half-way)"),
            |runner| {
                catalog = runner.catalog_volumes(&prefix);
                catalog
                    .as_ref()
                    .map(|volumes| volumes.iter().all(|volume| volume.state == "ready"))
                    .map_err(Clone::clone)
            },
        );
        let catalog = match catalog {
            Ok(catalog) => catalog,
            Err(error) => {
                self.find(
                    round,
                    Checker::Catalog,
                    format!("volume list failed: {error}"),
                );
                return;
            }
        };
        let mut stored = Vec::new();
        for node in self.names_where(|_| true) {
            let Ok(address) = self.cluster.endpoint(&node) else {
                continue;
            };
            let call = self.caller.call(&node, address, Request::VolumeList);
            match self.runtime.block_on(call) {
                Ok(Response::Volumes(volumes)) => {
                    stored.extend(volumes.into_iter().map(|volume| NodeVolume {
                        node: node.clone(),
                        name: volume.name,
                        size_bytes: volume.size_bytes,
                        slots_used: volume.session_slots_used,
                    }))
                }
                Ok(other) => self.find(
                    round,
                    Checker::Catalog,
                    format!("node {node} answered {other:?} to a volume list"),
                ),
                Err(error) => self.find(
                    round,
                    Checker::Catalog,
                    format!("node {node} did not list its volumes: {error}"),
                ),
            }
        }
        stored.retain(|volume| volume.name.starts_with(&prefix));
        for finding in check::check_catalog(&catalog, &stored, &HashMap::new()) {
            self.summary.findings.push((round, finding));
        }
    }

    /// The catalog's volumes whose names start with `prefix`.
    fn catalog_volumes(&self, prefix: &str) -> Result<Vec<CatalogVolume>, String> {
        let list = self.json(&["volume", "list", "--json"])?;
        Ok(list
            .as_array()
            .map(|volumes| {
                volumes
                    .iter()
                    .map(|volume| CatalogVolume {
                        name: volume["name"].as_str().unwrap_or_default().to_string(),
                        node: volume["node"].as_str().unwrap_or_default().to_string(),
                        size_bytes: volume["size_bytes"].as_u64().unwrap_or_default(),
                        state: volume["state"].as_str().unwrap_or_default().to_string(),
                    })
                    .filter(|volume| volume.name.starts_with(prefix))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// How the copy's first command went under the faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyStart {
    Started,
    Job(u64),
    Failed,
}

/// Whether `span` is a CLI command whose arguments start with `prefix`.
fn is_command(span: &Span, prefix: &[&str]) -> bool {
    matches!(&span.operation, Operation::Command { arguments }
        if arguments.len() >= prefix.len()
            && arguments.iter().zip(prefix).all(|(argument, wanted)| argument == wanted))
}
