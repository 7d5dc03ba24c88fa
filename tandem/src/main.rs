//! The `tandem` command: cluster setup, the node process, volume and snapshot commands,
//! and the embedded demo. Command names and flags are a contract outside scripts rely on.

mod demo;
mod gsnap;
mod sessions;
mod size;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use node::config::NodeConfig;
use protocol::cluster::{
    CatalogStatus, ClusterRequest, ClusterResponse, ClusterStatus, FaultRule, VolumeRecord,
};
use protocol::messages::{ErrorCode, Extent, Readiness, Request, Response, VolumeInfo};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Point-in-time copies, mirrors and snapshots of block volumes across sites"
)]
struct Cli {
    /// How log lines on standard error look: `text`, or `json` (one JSON object a line,
    /// for log collectors). Text is coloured only when standard error is a terminal.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TANDEM_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// What a node logs unless RUST_LOG says otherwise: its own info lines, and from openraft
/// only warnings (its info level dumps Raft's internal state at every vote and append).
const NODE_LOG_FILTER_DEFAULT: &str = "info,openraft=warn";
/// What the other commands log unless RUST_LOG says otherwise.
const COMMAND_LOG_FILTER_DEFAULT: &str = "warn";

/// Logs to standard error in the chosen format, without colour escapes when standard error
/// is not a terminal (a file, a pipe, a journal) or NO_COLOR is set.
fn init_logging(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
            builder.with_ansi(colour).init();
        }
        LogFormat::Json => builder.json().init(),
    }
}

/// Where the cluster is and how to prove who we are.
#[derive(Args, Clone)]
struct Connection {
    /// A node's QUIC address, HOST:PORT.
    #[arg(long, env = "TANDEM_ENDPOINT", default_value = "127.0.0.1:7100")]
    endpoint: String,
    /// The directory `tandem init` wrote (ca.pem, admin.pem, admin.key).
    #[arg(long, env = "TANDEM_CERTS", default_value = "tandem-certs")]
    certs: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Make a cluster CA, node and admin certificates, and a sample config per node.
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Node names, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Site written into the sample configs.
        #[arg(long, default_value = "site-a")]
        site: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a storage node.
    Node(NodeArguments),
    /// Run the embedded demo: a node on loopback, a volume, NBD IO and a snapshot.
    Demo,
    /// Create, list, show and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Take a pointer snapshot of SRC into DST (created if missing). An existing DST
    /// that is not an earlier snapshot of SRC is refused unless --overwrite is given.
    Snap {
        source: String,
        target: String,
        /// Tracks FIRST-LAST to snap; repeat for several. Default: the whole volume.
        #[arg(long = "extent")]
        extents: Vec<Extent>,
        /// Replace the data of an existing DST that is not a snapshot of SRC.
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Clone sessions: point-in-time copies of a volume (create, precopy, activate,
    /// terminate, cancel).
    #[command(subcommand)]
    Clone(sessions::CloneCommand),
    /// Copy a point-in-time image of SRC to TARGET on another node, as a job the
    /// cluster finishes whatever fails (seed 003's global snap); `gsnap list`, `show`,
    /// `cancel` follow it.
    Gsnap(gsnap::GsnapArguments),
    /// Mirror sessions: BCVs of a standard volume (establish, split, reestablish,
    /// restore, cancel, rotate).
    #[command(subcommand)]
    Mirror(sessions::MirrorCommand),
    /// Show the cluster: members and leader, nodes by site with health, volumes.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Manage the control plane's members.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Tools for tests: network fault injection on nodes that enable it.
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start a cluster with the node at the endpoint as its first member.
    Init {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Make a node (with `control_plane = true`) a member; waits for it to register.
    AddMember {
        node: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove a member; the node stays in the cluster as a plain node.
    RemoveMember {
        node: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show leader, term, members, commit index and each member's lag.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Drop or delay every call between the node at the endpoint and PEER (Raft, cluster
    /// requests, heartbeats, session commands, copy traffic); no flags clear the rule.
    Fault {
        /// The peer's node name.
        #[arg(long)]
        peer: String,
        /// Drop every call to and from the peer, as a partition would (no answer).
        #[arg(long)]
        drop: bool,
        /// Delay every call to the peer by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Drop this percent of the calls to and from the peer, each on its own.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        loss_percent: u8,
        #[command(flatten)]
        connection: Connection,
    },
    /// Commit COUNT no-op catalog commands one after another and print latencies as JSON
    /// (milliseconds from the first attempt to the answer, retries included).
    Noop {
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Args)]
struct NodeArguments {
    /// TOML config with name, site, data_dir, listen, nbd, metrics, certs.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    nbd: Option<SocketAddr>,
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Host a control-plane member in this process.
    #[arg(long)]
    control_plane: bool,
    /// Control-plane members to report to, HOST:PORT, comma separated.
    #[arg(long, value_delimiter = ',')]
    members: Vec<String>,
    /// The HOST:PORT other nodes reach this node at (default: the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Let the admin inject network faults (for tests).
    #[arg(long)]
    fault_injection: bool,
    /// Snapshot the catalog every N Raft entries and keep no log behind it (for tests).
    #[arg(long, hide = true)]
    raft_compact_after_entries: Option<u64>,
}

/// The number of control-plane members `tandem init` writes into sample configs: three
/// tolerate the loss of one, the usual deployment.
const SAMPLE_MEMBERS_MAX: usize = 3;

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume on a node; names are unique across the cluster.
    Create {
        name: String,
        /// The node that holds the volume; by default the node at the endpoint.
        #[arg(long)]
        node: Option<String>,
        /// Size, e.g. 4GiB; a multiple of the track size.
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        /// Track size, a power of two from 4KiB to 1MiB.
        #[arg(long, value_parser = size::parse_track_size, default_value = "64KiB")]
        track_size: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// List volumes.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one volume.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a volume; snapshots that share its data keep theirs. Refused while hosts
    /// have it open over NBD unless --force is given.
    Delete {
        name: String,
        /// Close the NBD connections hosts have open to the volume, then delete it.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Set a volume's readiness to its hosts: ready, read-only or not-ready.
    Readiness {
        name: String,
        readiness: Readiness,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

fn main() -> std::process::ExitCode {
    // Tests arm named places to end the process at through FAILPOINTS; a build without the
    // `failpoints` feature (every `cargo build`) ignores it.
    let _fail_points = control_plane::fail_points::setup();
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Node(_) => NODE_LOG_FILTER_DEFAULT,
        _ => COMMAND_LOG_FILTER_DEFAULT,
    };
    let log_format = cli.log_format;
    init_logging(log_format, default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // With JSON logs, every line on standard error is JSON, the last one too.
            if log_format == LogFormat::Json {
                tracing::error!(error = format!("{error:#}"), "command failed");
            } else {
                eprintln!("error: {error:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            dir,
            nodes,
            site,
            json,
        } => init(dir, nodes, site, json),
        Command::Node(arguments) => run_node(arguments).await,
        Command::Demo => demo::run().await,
        Command::Volume(command) => volume(command).await,
        Command::Snap {
            source,
            target,
            extents,
            overwrite,
            json,
            connection,
        } => {
            let response = cluster_call(
                &connection,
                ClusterRequest::Snap {
                    request_id: rand::random(),
                    source,
                    target,
                    extents,
                    overwrite,
                },
            )
            .await?;
            let Response::Snapped {
                source,
                target,
                extents,
                elapsed_micros,
                target_info,
            } = response
            else {
                bail!("unexpected answer from the node: {response:?}");
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "source": source,
                        "target": target,
                        "extents": extents.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "elapsed_micros": elapsed_micros,
                        "target_volume": volume_json(&target_info),
                    })
                );
            } else {
                let scope = if extents.is_empty() {
                    "whole volume".to_string()
                } else {
                    format!(
                        "extents {}",
                        extents
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                println!("snapped {source} -> {target} ({scope}) in {elapsed_micros} µs");
            }
            Ok(())
        }
        Command::Status { json, connection } => {
            let response = cluster_call(&connection, ClusterRequest::Status).await?;
            let Response::Cluster(ClusterResponse::Status(status)) = response else {
                bail!("unexpected answer from the cluster: {response:?}");
            };
            print_status(&status, json);
            Ok(())
        }
        Command::Cluster(command) => cluster(command).await,
        Command::Clone(command) => sessions::clone(command).await,
        Command::Gsnap(arguments) => gsnap::run(arguments).await,
        Command::Mirror(command) => sessions::mirror(command).await,
        Command::Debug(DebugCommand::Noop { count, connection }) => {
            // One connection for all commands, so the figures are the cluster's, not the
            // QUIC handshake's.
            let session = Session::open(&connection).await?;
            let mut latencies = Vec::new();
            for _ in 0..count {
                let started = std::time::Instant::now();
                session
                    .cluster(ClusterRequest::Noop {
                        request_id: rand::random(),
                    })
                    .await?;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            session.close().await;
            let mut sorted = latencies.clone();
            sorted.sort_by(f64::total_cmp);
            let percentile = |fraction: f64| {
                sorted
                    [((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
            };
            println!(
                "{}",
                serde_json::json!({
                    "count": count,
                    "first_ms": latencies[0],
                    "p50_ms": percentile(0.50),
                    "p99_ms": percentile(0.99),
                    "max_ms": sorted[sorted.len() - 1],
                })
            );
            Ok(())
        }
        Command::Debug(DebugCommand::Fault {
            peer,
            drop,
            delay_ms,
            loss_percent,
            connection,
        }) => {
            let rule = FaultRule {
                drop,
                delay_milliseconds: delay_ms,
                loss_percent,
            };
            call(
                &connection,
                Request::SetFault {
                    peer: peer.clone(),
                    rule: rule.clone(),
                },
            )
            .await?;
            if rule == FaultRule::default() {
                println!("cleared faults towards {peer}");
            } else {
                println!(
                    "faults towards {peer}: drop {drop}, delay {delay_ms} ms, loss {loss_percent} %"
                );
            }
            Ok(())
        }
    }
}

async fn cluster(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Init { json, connection } => {
            call(
                &connection,
                Request::Cluster {
                    request: ClusterRequest::Init,
                    hops: 0,
                },
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "initialized": true, "first_member": connection.endpoint })
                );
            } else {
                println!(
                    "cluster initialized with the node at {} as its first member; add members with `tandem cluster add-member NODE`",
                    connection.endpoint
                );
            }
        }
        ClusterCommand::AddMember {
            node,
            json,
            connection,
        } => {
            let request = ClusterRequest::AddMember { node: node.clone() };
            let outcome = format!("{node} is a member");
            change_membership(&connection, request, &outcome, json).await?;
        }
        ClusterCommand::RemoveMember {
            node,
            json,
            connection,
        } => {
            let request = ClusterRequest::RemoveMember { node: node.clone() };
            let outcome = format!("{node} is no longer a member");
            change_membership(&connection, request, &outcome, json).await?;
        }
        ClusterCommand::Status { json, connection } => {
            let status =
                cluster_status_of(cluster_call(&connection, ClusterRequest::ClusterStatus).await?)?;
            if json {
                println!("{}", cluster_status_json(&status));
            } else {
                print_cluster_status(&status);
            }
        }
    }
    Ok(())
}

/// Sends a membership change and shows the membership it left.
async fn change_membership(
    connection: &Connection,
    request: ClusterRequest,
    outcome: &str,
    json: bool,
) -> Result<()> {
    let status = cluster_status_of(cluster_call(connection, request).await?)?;
    if json {
        println!("{}", cluster_status_json(&status));
    } else {
        println!("{outcome}");
        print_cluster_status(&status);
    }
    Ok(())
}

fn cluster_status_of(response: Response) -> Result<ClusterStatus> {
    match response {
        Response::Cluster(ClusterResponse::ClusterStatus(status)) => Ok(status),
        other => bail!("unexpected answer from the cluster: {other:?}"),
    }
}

fn cluster_status_json(status: &ClusterStatus) -> serde_json::Value {
    serde_json::json!({
        "answered_by": status.answered_by,
        "leader": status.leader,
        "term": status.term,
        "members": status.members.iter().map(|member| serde_json::json!({
            "name": member.name, "address": member.address, "lag_entries": member.lag_entries,
        })).collect::<Vec<_>>(),
        "learners": status.learners,
        "last_log_index": status.last_log_index,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
    })
}

fn print_cluster_status(status: &ClusterStatus) {
    let index =
        |value: Option<u64>| value.map_or_else(|| "-".to_string(), |value| value.to_string());
    println!(
        "leader: {}   term: {}   commit index: {}   applied: {}   (answered by {})",
        status.leader.as_deref().unwrap_or("none"),
        status.term,
        index(status.commit_index),
        index(status.applied_index),
        status.answered_by
    );
    println!("{:<20} {:<24} {:>10}", "MEMBER", "ADDRESS", "LAG");
    for member in &status.members {
        let role = if status.leader.as_deref() == Some(member.name.as_str()) {
            " (leader)"
        } else {
            ""
        };
        println!(
            "{:<20} {:<24} {:>10}",
            format!("{}{role}", member.name),
            member.address,
            index(member.lag_entries)
        );
    }
    for learner in &status.learners {
        println!("{learner:<20} (learner, catching up)");
    }
}

fn print_status(status: &CatalogStatus, json: bool) {
    if json {
        let sites: serde_json::Map<String, serde_json::Value> = status
            .sites
            .iter()
            .map(|(site, nodes)| {
                (
                    site.clone(),
                    serde_json::Value::Array(
                        nodes
                            .iter()
                            .map(|node| {
                                serde_json::json!({
                                    "name": node.name, "address": node.address,
                                    "nbd": node.nbd_address, "health": node.health.to_string(),
                                    "capacity_bytes": node.capacity_bytes,
                                    "control_plane": node.control_plane,
                                })
                            })
                            .collect(),
                    ),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "cluster": cluster_status_json(&status.cluster),
                "sites": sites,
                "volumes": status.volumes.iter().map(record_json).collect::<Vec<_>>(),
            })
        );
        return;
    }
    print_cluster_status(&status.cluster);
    for (site, nodes) in &status.sites {
        println!();
        println!("site {site}");
        for node in nodes {
            println!(
                "  {:<20} {:<5} quic {:<22} nbd {:<22} capacity {}",
                node.name,
                node.health.to_string(),
                node.address,
                node.nbd_address,
                size::format_size(node.capacity_bytes)
            );
        }
    }
    println!();
    print_records(&status.volumes);
}

fn init(dir: PathBuf, nodes: Vec<String>, site: String, json: bool) -> Result<()> {
    let files = protocol::pki::init_cluster(&dir, &nodes)?;
    let certs =
        std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let members: Vec<String> = (0..nodes.len().min(SAMPLE_MEMBERS_MAX))
        .map(|index| format!("127.0.0.1:{}", 7100 + index))
        .collect();
    for (index, name) in nodes.iter().enumerate() {
        let offset = index as u16;
        let config = NodeConfig {
            control_plane: index < SAMPLE_MEMBERS_MAX,
            members: members.clone(),
            advertise: None,
            capacity_bytes: None,
            fault_injection: false,
            raft_compact_after_entries: None,
            copy_rate_mebibytes_per_second:
                node::config::NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND,
            name: name.clone(),
            site: site.clone(),
            data_dir: certs.join("data").join(name),
            listen: SocketAddr::from(([127, 0, 0, 1], 7100 + offset)),
            nbd: SocketAddr::from(([127, 0, 0, 1], 10809 + offset)),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9100 + offset))),
            certs: certs.clone(),
        };
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config.to_toml()?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "directory": certs,
                "ca_certificate": files.ca_certificate,
                "nodes": files.nodes.iter().map(|node| serde_json::json!({
                    "name": node.name,
                    "certificate": node.certificate,
                    "key": node.key,
                    "config": certs.join(format!("{}.toml", node.name)),
                })).collect::<Vec<_>>(),
                "admin_certificate": files.admin.certificate,
                "admin_key": files.admin.key,
            })
        );
        return Ok(());
    }
    println!("cluster CA and certificates written to {}", dir.display());
    println!("  CA:    {}", files.ca_certificate.display());
    for name in &nodes {
        println!("  node {name}: {name}.pem, {name}.key, sample config {name}.toml");
    }
    println!(
        "  admin: admin.pem, admin.key (for the CLI: --certs {})",
        dir.display()
    );
    println!(
        "start each node with `tandem node --config DIR/NAME.toml`, then `tandem cluster init` on the first and `tandem cluster add-member NAME` for the other members."
    );
    println!("keep ca.key offline once every node has its certificate.");
    Ok(())
}

async fn run_node(arguments: NodeArguments) -> Result<()> {
    let mut config = match &arguments.config {
        Some(path) => Some(NodeConfig::load(path)?),
        None => None,
    };
    let missing = |field: &str| {
        anyhow::anyhow!("node setting '{field}' is missing: give --config FILE (see `tandem init`) or --{field}")
    };
    let config = match config.take() {
        Some(mut config) => {
            if let Some(name) = arguments.name {
                config.name = name;
            }
            if let Some(site) = arguments.site {
                config.site = site;
            }
            if let Some(data_dir) = arguments.data_dir {
                config.data_dir = data_dir;
            }
            if let Some(listen) = arguments.listen {
                config.listen = listen;
            }
            if let Some(nbd) = arguments.nbd {
                config.nbd = nbd;
            }
            if arguments.metrics.is_some() {
                config.metrics = arguments.metrics;
            }
            if let Some(certs) = arguments.certs {
                config.certs = certs;
            }
            config.control_plane |= arguments.control_plane;
            if !arguments.members.is_empty() {
                config.members = arguments.members;
            }
            if arguments.advertise.is_some() {
                config.advertise = arguments.advertise;
            }
            config.fault_injection |= arguments.fault_injection;
            if arguments.raft_compact_after_entries.is_some() {
                config.raft_compact_after_entries = arguments.raft_compact_after_entries;
            }
            config
        }
        None => NodeConfig {
            name: arguments.name.ok_or_else(|| missing("name"))?,
            site: arguments.site.ok_or_else(|| missing("site"))?,
            data_dir: arguments.data_dir.ok_or_else(|| missing("data-dir"))?,
            listen: arguments.listen.ok_or_else(|| missing("listen"))?,
            nbd: arguments.nbd.ok_or_else(|| missing("nbd"))?,
            metrics: arguments.metrics,
            certs: arguments.certs.ok_or_else(|| missing("certs"))?,
            control_plane: arguments.control_plane,
            members: arguments.members,
            advertise: arguments.advertise,
            capacity_bytes: None,
            fault_injection: arguments.fault_injection,
            raft_compact_after_entries: arguments.raft_compact_after_entries,
            copy_rate_mebibytes_per_second:
                node::config::NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND,
        },
    };
    let mut running = node::runtime::start(&config).await?;
    // Scripts and tests wait for this line to know the node is serving.
    println!(
        "node {} serving: quic {} nbd {}",
        running.name, running.quic_address, running.nbd_address
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    running.stop().await;
    // Make everything acknowledged durable before the process goes.
    running.store.flush()?;
    Ok(())
}

async fn resolve(endpoint: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(endpoint)
        .await
        .with_context(|| format!("cannot resolve endpoint '{endpoint}' (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("endpoint '{endpoint}' resolves to no address"))
}

/// Sends one request to the node at the endpoint and turns an error answer into an error.
async fn call(connection: &Connection, request: Request) -> Result<Response> {
    let session = Session::open(connection).await?;
    let response = protocol::transport::call(&session.connection, &request).await;
    session.close().await;
    let response: Response = response?;
    if let Response::Error { code, message } = response {
        bail!("{message} [{code}]");
    }
    Ok(response)
}

/// How long the CLI keeps retrying a cluster command the cluster cannot answer yet (no
/// leader during an election, a leader change mid-command). The request keeps its id, so
/// a retry of a command that was in fact applied is not applied again.
const CLUSTER_RETRY_SECONDS: u64 = 15;
const CLUSTER_RETRY_PAUSE_MILLISECONDS: u64 = 20;

/// A QUIC connection to the node at the endpoint, with the admin certificate.
struct Session {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl Session {
    async fn open(connection: &Connection) -> Result<Session> {
        let identity = protocol::pki::Identity::load(&connection.certs, protocol::pki::ADMIN_NAME)
            .with_context(|| {
                "the CLI needs the admin certificate from `tandem init` (set --certs or TANDEM_CERTS)"
            })?;
        let address = resolve(&connection.endpoint).await?;
        let endpoint = protocol::transport::client_endpoint(&identity)?;
        let connection = protocol::transport::connect(&endpoint, address).await?;
        Ok(Session {
            endpoint,
            connection,
        })
    }

    /// Sends a cluster request, retrying while the cluster answers "unavailable".
    async fn cluster(&self, request: ClusterRequest) -> Result<Response> {
        // TANDEM_RETRY_SECONDS shortens or lengthens the retrying, e.g. 0 in scripts that
        // want the first answer.
        let retry_seconds = std::env::var("TANDEM_RETRY_SECONDS")
            .ok()
            .and_then(|seconds| seconds.parse().ok())
            .unwrap_or(CLUSTER_RETRY_SECONDS);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(retry_seconds);
        let message = Request::Cluster { request, hops: 0 };
        let response = loop {
            let response: Response = protocol::transport::call(&self.connection, &message).await?;
            match &response {
                Response::Error {
                    code: ErrorCode::Unavailable,
                    message,
                } if std::time::Instant::now() < deadline => {
                    tracing::info!(%message, "cluster unavailable; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(
                        CLUSTER_RETRY_PAUSE_MILLISECONDS,
                    ))
                    .await;
                }
                _ => break response,
            }
        };
        if let Response::Error { code, message } = response {
            bail!("{message} [{code}]");
        }
        Ok(response)
    }

    async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        // The close goes out at once; waiting for the whole draining period (three probe
        // timeouts, about 80 ms on loopback) would only answer retransmissions that a
        // clean close does not cause, and it was most of a short command's time.
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// How long a command waits for its connection's close to reach the node.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Sends one cluster request through the node at the endpoint (see [`Session::cluster`]).
async fn cluster_call(connection: &Connection, request: ClusterRequest) -> Result<Response> {
    let session = Session::open(connection).await?;
    let response = session.cluster(request).await;
    session.close().await;
    response
}

fn volume_json(info: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": info.name,
        "id": info.id,
        "size_bytes": info.size_bytes,
        "track_size_bytes": info.track_size_bytes,
        "track_count": info.track_count,
        "readiness": info.readiness.to_string(),
        "session_slots_used": info.session_slots_used,
        "layer_depth": info.layer_depth,
        "created_unix_seconds": info.created_unix_seconds,
    })
}

fn record_json(record: &VolumeRecord) -> serde_json::Value {
    serde_json::json!({
        "name": record.name,
        "node": record.node,
        "size_bytes": record.size_bytes,
        "track_size_bytes": record.track_size_bytes,
        "state": record.state.to_string(),
        "readiness": record.readiness.to_string(),
    })
}

fn print_record(record: &VolumeRecord, json: bool) {
    if json {
        println!("{}", record_json(record));
    } else {
        println!("name:        {}", record.name);
        println!("node:        {}", record.node);
        println!(
            "size:        {} ({} bytes)",
            size::format_size(record.size_bytes),
            record.size_bytes
        );
        println!(
            "track size:  {}",
            size::format_size(u64::from(record.track_size_bytes))
        );
        println!("state:       {}", record.state);
        println!("readiness:   {}", record.readiness);
    }
}

fn print_records(records: &[VolumeRecord]) {
    if records.is_empty() {
        println!(
            "no volumes (create one with `tandem volume create NAME --node NODE --size 1GiB`)"
        );
        return;
    }
    println!(
        "{:<24} {:<16} {:>12} {:>8} {:<9} {:<10}",
        "NAME", "NODE", "SIZE", "TRACK", "STATE", "READINESS"
    );
    for record in records {
        println!(
            "{:<24} {:<16} {:>12} {:>8} {:<9} {:<10}",
            record.name,
            record.node,
            size::format_size(record.size_bytes),
            size::format_size(u64::from(record.track_size_bytes)),
            record.state.to_string(),
            record.readiness.to_string()
        );
    }
}

fn volume_of(response: Response) -> Result<VolumeRecord> {
    match response {
        Response::Cluster(ClusterResponse::Volume(record)) => Ok(record),
        other => bail!("unexpected answer from the cluster: {other:?}"),
    }
}

async fn volume(command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            node,
            size,
            track_size,
            json,
            connection,
        } => {
            let track_size_bytes = track_size;
            let record = volume_of(
                cluster_call(
                    &connection,
                    ClusterRequest::VolumeCreate {
                        request_id: rand::random(),
                        name,
                        node,
                        size_bytes: size,
                        track_size_bytes,
                    },
                )
                .await?,
            )?;
            print_record(&record, json);
        }
        VolumeCommand::List { json, connection } => {
            let response = cluster_call(&connection, ClusterRequest::VolumeList).await?;
            let Response::Cluster(ClusterResponse::Volumes(records)) = response else {
                bail!("unexpected answer from the cluster: {response:?}");
            };
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(records.iter().map(record_json).collect())
                );
            } else {
                print_records(&records);
            }
        }
        VolumeCommand::Show {
            name,
            json,
            connection,
        } => {
            let response = cluster_call(&connection, ClusterRequest::VolumeShow { name }).await?;
            let Response::Cluster(ClusterResponse::VolumeDetail {
                record,
                node_info,
                nbd_address,
            }) = response
            else {
                bail!("unexpected answer from the cluster: {response:?}");
            };
            let nbd_url = nbd_address
                .as_ref()
                .map(|address| format!("nbd://{address}/{}", record.name));
            if json {
                let mut value = record_json(&record);
                value["nbd_address"] = serde_json::json!(nbd_address);
                value["nbd_url"] = serde_json::json!(nbd_url);
                value["on_node"] = node_info
                    .as_ref()
                    .map_or(serde_json::Value::Null, volume_json);
                println!("{value}");
            } else {
                print_record(&record, false);
                if let Some(url) = &nbd_url {
                    println!("nbd:         {url}");
                }
                match node_info {
                    Some(info) => {
                        println!("id on node:  {}", info.id);
                        println!("tracks:      {}", info.track_count);
                        println!("sessions:    {} of 16 slots", info.session_slots_used);
                        println!("layers:      {}", info.layer_depth);
                    }
                    None => println!("on node:     (node '{}' did not answer)", record.node),
                }
            }
        }
        VolumeCommand::Delete {
            name,
            force,
            json,
            connection,
        } => {
            cluster_call(
                &connection,
                ClusterRequest::VolumeDelete {
                    request_id: rand::random(),
                    name: name.clone(),
                    force,
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::json!({ "deleted": name }));
            } else {
                println!("deleted volume {name}");
            }
        }
        VolumeCommand::Readiness {
            name,
            readiness,
            json,
            connection,
        } => {
            let record = volume_of(
                cluster_call(
                    &connection,
                    ClusterRequest::VolumeSetReadiness {
                        request_id: rand::random(),
                        name,
                        readiness,
                    },
                )
                .await?,
            )?;
            print_record(&record, json);
        }
    }
    Ok(())
}
