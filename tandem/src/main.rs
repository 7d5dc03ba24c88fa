//! The `tandem` command: cluster setup, the node process, volume and snapshot commands,
//! and the embedded demo. Command names and flags are a contract outside scripts rely on.

mod demo;
mod size;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use node::config::NodeConfig;
use protocol::messages::{Extent, Readiness, Request, Response, VolumeInfo};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Point-in-time copies, mirrors and snapshots of block volumes across sites"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    },
    /// Run a storage node.
    Node(NodeArguments),
    /// Run the embedded demo: a node on loopback, a volume, NBD IO and a snapshot.
    Demo,
    /// Create, list, show and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Take a pointer snapshot of SRC into DST (created if missing).
    Snap {
        source: String,
        target: String,
        /// Tracks FIRST-LAST to snap; repeat for several. Default: the whole volume.
        #[arg(long = "extent")]
        extents: Vec<Extent>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the status of the node at the endpoint.
    Status {
        #[arg(long)]
        json: bool,
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
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Size, e.g. 4GiB; a multiple of the track size.
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        /// Track size, a power of two from 4KiB to 1MiB.
        #[arg(long, value_parser = size::parse_size, default_value = "64KiB")]
        track_size: u64,
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
    /// Delete a volume; snapshots that share its data keep theirs.
    Delete {
        name: String,
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
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Node(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
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
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { dir, nodes, site } => init(dir, nodes, site),
        Command::Node(arguments) => run_node(arguments).await,
        Command::Demo => demo::run().await,
        Command::Volume(command) => volume(command).await,
        Command::Snap {
            source,
            target,
            extents,
            json,
            connection,
        } => {
            let response = call(
                &connection,
                Request::Snap {
                    source,
                    target,
                    extents,
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
            let response = call(&connection, Request::NodeStatus).await?;
            let Response::NodeStatus(status) = response else {
                bail!("unexpected answer from the node: {response:?}");
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": status.name, "site": status.site, "nbd": status.nbd_address,
                        "volumes": status.volume_count, "version": status.version,
                    })
                );
            } else {
                println!(
                    "node {} (site {}), NBD at {}, {} volumes, tandem {}",
                    status.name,
                    status.site,
                    status.nbd_address,
                    status.volume_count,
                    status.version
                );
            }
            Ok(())
        }
    }
}

fn init(dir: PathBuf, nodes: Vec<String>, site: String) -> Result<()> {
    let files = protocol::pki::init_cluster(&dir, &nodes)?;
    let certs =
        std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    for (index, name) in nodes.iter().enumerate() {
        let offset = index as u16;
        let config = NodeConfig {
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
    println!("cluster CA and certificates written to {}", dir.display());
    println!("  CA:    {}", files.ca_certificate.display());
    for name in &nodes {
        println!("  node {name}: {name}.pem, {name}.key, sample config {name}.toml");
    }
    println!(
        "  admin: admin.pem, admin.key (for the CLI: --certs {})",
        dir.display()
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
    running.shutdown();
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
    let identity = protocol::pki::Identity::load(&connection.certs, protocol::pki::ADMIN_NAME)
        .with_context(|| {
            "the CLI needs the admin certificate from `tandem init` (set --certs or TANDEM_CERTS)"
        })?;
    let address = resolve(&connection.endpoint).await?;
    let endpoint = protocol::transport::client_endpoint(&identity)?;
    let quic = protocol::transport::connect(&endpoint, address).await?;
    let response: Response = protocol::transport::call(&quic, &request).await?;
    quic.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    if let Response::Error { code, message } = response {
        bail!("{message} [{code}]");
    }
    Ok(response)
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

fn print_volume(info: &VolumeInfo, json: bool) {
    if json {
        println!("{}", volume_json(info));
    } else {
        println!("name:        {}", info.name);
        println!("id:          {}", info.id);
        println!(
            "size:        {} ({} bytes)",
            size::format_size(info.size_bytes),
            info.size_bytes
        );
        println!(
            "track size:  {}",
            size::format_size(u64::from(info.track_size_bytes))
        );
        println!("tracks:      {}", info.track_count);
        println!("readiness:   {}", info.readiness);
        println!("sessions:    {} of 16 slots", info.session_slots_used);
        println!("layers:      {}", info.layer_depth);
    }
}

async fn volume(command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            track_size,
            json,
            connection,
        } => {
            let track_size_bytes =
                u32::try_from(track_size).context("track size is too large: at most 1MiB")?;
            let response = call(
                &connection,
                Request::VolumeCreate {
                    name,
                    size_bytes: size,
                    track_size_bytes,
                },
            )
            .await?;
            let Response::Volume(info) = response else {
                bail!("unexpected answer from the node: {response:?}");
            };
            print_volume(&info, json);
        }
        VolumeCommand::List { json, connection } => {
            let response = call(&connection, Request::VolumeList).await?;
            let Response::Volumes(volumes) = response else {
                bail!("unexpected answer from the node: {response:?}");
            };
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(volumes.iter().map(volume_json).collect())
                );
            } else if volumes.is_empty() {
                println!("no volumes (create one with `tandem volume create NAME --size 1GiB`)");
            } else {
                println!(
                    "{:<24} {:>12} {:>8} {:<10} {:>6}",
                    "NAME", "SIZE", "TRACK", "READINESS", "LAYERS"
                );
                for info in &volumes {
                    println!(
                        "{:<24} {:>12} {:>8} {:<10} {:>6}",
                        info.name,
                        size::format_size(info.size_bytes),
                        size::format_size(u64::from(info.track_size_bytes)),
                        info.readiness.to_string(),
                        info.layer_depth
                    );
                }
            }
        }
        VolumeCommand::Show {
            name,
            json,
            connection,
        } => {
            let response = call(&connection, Request::VolumeShow { name }).await?;
            let Response::Volume(info) = response else {
                bail!("unexpected answer from the node: {response:?}");
            };
            print_volume(&info, json);
        }
        VolumeCommand::Delete { name, connection } => {
            call(&connection, Request::VolumeDelete { name: name.clone() }).await?;
            println!("deleted volume {name}");
        }
        VolumeCommand::Readiness {
            name,
            readiness,
            json,
            connection,
        } => {
            let response =
                call(&connection, Request::VolumeSetReadiness { name, readiness }).await?;
            let Response::Volume(info) = response else {
                bail!("unexpected answer from the node: {response:?}");
            };
            print_volume(&info, json);
        }
    }
    Ok(())
}
