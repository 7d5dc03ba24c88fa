//! `tandem-chaos`: runs seeded fault schedules against a cluster of real `tandem`
//! processes (or the docker-compose cluster), checks the history, prints one summary
//! line, and fails on any finding. `docs/CHAOS.md` says how to read and replay a run.

use anyhow::{bail, Context, Result};
use chaos::round::{RunConfig, Runner};
use chaos::schedule::{CopyKind, FaultKind, ScheduleConfig};
use clap::{Parser, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// `tandem node` processes on loopback.
    Processes,
    /// The containers of `docker-compose.yml`.
    Compose,
}

#[derive(Parser)]
#[command(
    name = "tandem-chaos",
    about = "Seeded fault schedules against a tandem cluster, with history checkers"
)]
struct Arguments {
    #[arg(long, value_enum, default_value = "processes")]
    backend: Backend,
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// The run's seed (default: drawn and printed, so the run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Start at this round of the seed's schedule (replays one round with --rounds 1).
    #[arg(long, default_value_t = 0)]
    first_round: u64,
    /// How long each round's faults last, in milliseconds.
    #[arg(long, default_value_t = ROUND_MILLISECONDS_DEFAULT)]
    round_milliseconds: u64,
    /// Fault kinds to draw from, comma separated (default: every kind the backend has).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Copy kinds to draw from, comma separated (default: every kind).
    #[arg(long, value_delimiter = ',')]
    copies: Vec<String>,
    /// Where the history of a failing run is written (JSON lines).
    #[arg(long, default_value = "chaos-history.jsonl")]
    history: PathBuf,
    /// The `tandem` binary (default: the one beside this program).
    #[arg(long)]
    tandem: Option<PathBuf>,
    /// Keep the cluster's directory (data, certificates, node logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Print each round's plan and findings.
    #[arg(long)]
    verbose: bool,
    /// Print each round's plan and exit without starting a cluster (what a replay of a
    /// seed's rounds will inject, read before running it).
    #[arg(long)]
    plan: bool,
}

const ROUND_MILLISECONDS_DEFAULT: u64 = 3000;

fn main() -> Result<()> {
    let arguments = Arguments::parse();
    let tandem = match arguments.tandem {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .join("tandem"),
    };
    if !tandem.exists() {
        bail!(
            "no tandem binary at {}: build it (cargo build --release -p tandem) or pass --tandem",
            tandem.display()
        );
    }
    let seed = arguments.seed.unwrap_or_else(rand::random);
    let backend_kinds = match arguments.backend {
        Backend::Processes => FaultKind::ALL.to_vec(),
        Backend::Compose => chaos::compose::fault_kinds(),
    };
    let kinds = if arguments.faults.is_empty() {
        backend_kinds
    } else {
        let mut kinds = Vec::new();
        for name in &arguments.faults {
            let Some(kind) = FaultKind::from_name(name) else {
                let known: Vec<&str> = FaultKind::ALL.iter().map(|kind| kind.name()).collect();
                bail!("unknown fault kind {name:?}; known: {}", known.join(", "));
            };
            if !backend_kinds.contains(&kind) {
                bail!(
                    "the {} backend cannot inject {name}",
                    backend_name(arguments.backend)
                );
            }
            kinds.push(kind);
        }
        kinds
    };
    let mut copies = Vec::new();
    for name in &arguments.copies {
        let Some(kind) = CopyKind::ALL.into_iter().find(|kind| kind.name() == name) else {
            let known: Vec<&str> = CopyKind::ALL.iter().map(|kind| kind.name()).collect();
            bail!("unknown copy kind {name:?}; known: {}", known.join(", "));
        };
        copies.push(kind);
    }
    if copies.is_empty() {
        copies = CopyKind::ALL.to_vec();
    }
    // A replay draws from the same kinds, or its plans differ.
    let mut choices = String::new();
    if !arguments.faults.is_empty() {
        choices.push_str(&format!(" --faults {}", arguments.faults.join(",")));
    }
    if !arguments.copies.is_empty() {
        choices.push_str(&format!(" --copies {}", arguments.copies.join(",")));
    }
    if arguments.round_milliseconds != ROUND_MILLISECONDS_DEFAULT {
        choices.push_str(&format!(
            " --round-milliseconds {}",
            arguments.round_milliseconds
        ));
    }
    let config = RunConfig {
        seed,
        rounds: arguments.rounds,
        first_round: arguments.first_round,
        schedule: ScheduleConfig {
            kinds,
            copies,
            round_milliseconds: arguments.round_milliseconds,
            ..ScheduleConfig::default()
        },
        ..RunConfig::default()
    };
    println!(
        "chaos: seed {seed} on {} (replay: tandem-chaos --backend {} --seed {seed} --rounds {} --first-round {}{choices})",
        backend_name(arguments.backend),
        backend_name(arguments.backend),
        arguments.rounds,
        arguments.first_round
    );
    if arguments.plan {
        let last = config.first_round.saturating_add(config.rounds);
        for round in config.first_round..last {
            println!("{}", chaos::schedule::plan(seed, round, &config.schedule));
        }
        return Ok(());
    }
    let started = std::time::Instant::now();
    let cluster: Box<dyn chaos::cluster::Cluster> = match arguments.backend {
        Backend::Processes => {
            Box::new(chaos::processes::ProcessCluster::start(&tandem, 3, 1, &[])?)
        }
        Backend::Compose => Box::new(chaos::compose::ComposeCluster::start(&tandem)?),
    };
    let mut runner = Runner::new(cluster, tandem, config)?;
    runner.verbose = arguments.verbose;
    runner.history_path = Some(arguments.history.clone());
    let summary = runner.run()?.clone();
    println!("{summary}; {} s", started.elapsed().as_secs());
    println!("chaos: time per round: {}", summary.phases());
    if arguments.keep && summary.failures() == 0 {
        if let Some(kept) = runner.cluster().keep_files() {
            println!("chaos: the cluster's files are kept in {}", kept.display());
        }
    }
    if summary.failures() > 0 {
        for (round, finding) in &summary.findings {
            if *round == u64::MAX {
                println!("  {finding}");
            } else {
                println!("  round {round}: {finding}");
            }
        }
        let kept = runner.cluster().keep_files();
        println!(
            "chaos: the history is in {}; node logs in {}",
            arguments.history.display(),
            kept.map_or("(none)".into(), |kept| kept.display().to_string())
        );
        // `exit` runs no destructors: the cluster is dropped first, so its node processes
        // stop (their files are kept) instead of running on after the run.
        drop(runner);
        std::process::exit(1);
    }
    Ok(())
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Processes => "processes",
        Backend::Compose => "compose",
    }
}
