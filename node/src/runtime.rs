//! Starting a node: open the store, bind QUIC, NBD and metrics, serve until dropped.

use crate::config::NodeConfig;
use crate::copy::remote::TargetLink;
use crate::copy::workers::BackgroundWorkers;
use crate::copy::Sessions;
use crate::engine::rocks::RocksEngine;
use crate::engine::Engine;
use crate::requests::NodeRequests;
use crate::service::{self, Identity, Service};
use crate::store::VolumeStore;
use crate::{nbd, Error, Result};
use control_plane::caller::Caller;
use control_plane::member::ControlPlane;
use protocol::cluster::NodeReport;
use protocol::messages::{ErrorCode, Request, Response};
use protocol::session::{RemoteVolume, TargetAnswer, TargetOperation};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// A node serving on its addresses; dropping it stops the listeners.
pub struct RunningNode {
    pub name: String,
    pub quic_address: SocketAddr,
    pub nbd_address: SocketAddr,
    pub store: Arc<VolumeStore<RocksEngine>>,
    pub sessions: Arc<Sessions<RocksEngine>>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    copier_stop: Arc<AtomicBool>,
    control_plane: Option<Arc<ControlPlane>>,
}

impl RunningNode {
    /// Stops the control-plane member this process hosts (so Raft ends its tasks in
    /// order instead of finding its channels closed), then stops serving.
    pub async fn stop(&mut self) {
        if let Some(control_plane) = self.control_plane.take() {
            control_plane.shutdown().await;
        }
        self.shutdown();
    }

    /// Stops serving: closes QUIC connections and the NBD listener.
    pub fn shutdown(&mut self) {
        self.endpoint.close(0u32.into(), b"node shutting down");
        self.copier_stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the Prometheus exporter once per process (see [`crate::metrics`]).
pub fn install_metrics(address: SocketAddr) -> Result<()> {
    crate::metrics::install(address)
}

pub async fn start(config: &NodeConfig) -> Result<RunningNode> {
    let identity = protocol::pki::Identity::load(&config.certs, &config.name)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|error| Error::Config {
        detail: format!(
            "cannot create data_dir {}: {error}",
            config.data_dir.display()
        ),
    })?;
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || {
        let engine = RocksEngine::open(&data_dir.join("db"))?;
        VolumeStore::open(engine)
    })
    .await
    .map_err(|join_error| Error::Engine {
        detail: join_error.to_string(),
    })??;
    let store = Arc::new(store);

    let nbd_listener = tokio::net::TcpListener::bind(config.nbd)
        .await
        .map_err(|error| Error::Config {
            detail: format!("cannot listen for NBD on {}: {error}", config.nbd),
        })?;
    let nbd_address = nbd_listener.local_addr()?;
    let endpoint = protocol::transport::server_endpoint(config.listen, &identity)?;
    let quic_address = endpoint.local_addr()?;
    if let Some(metrics_address) = config.metrics {
        install_metrics(metrics_address)?;
    }

    let advertise = advertised_address(config, quic_address)?;
    let capacity_bytes = match config.capacity_bytes {
        Some(capacity_bytes) => capacity_bytes,
        None => fs4::total_space(&config.data_dir).map_err(|error| Error::Config {
            detail: format!(
                "cannot read the size of the file system under {}: {error}; set capacity_bytes in the config",
                config.data_dir.display()
            ),
        })?,
    };
    let caller = Arc::new(Caller::new(endpoint.clone()));
    let sessions = {
        let store = store.clone();
        let rate = config.copy_rate_mebibytes_per_second;
        let link: Arc<dyn TargetLink> = Arc::new(QuicTargetLink {
            caller: caller.clone(),
            runtime: tokio::runtime::Handle::current(),
            node: (config.name.clone(), advertise.clone()),
        });
        tokio::task::spawn_blocking(move || Sessions::open(store, rate, Some(link)))
            .await
            .map_err(|join_error| Error::Engine {
                detail: join_error.to_string(),
            })??
    };
    let sessions = Arc::new(sessions);
    let requests = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || NodeRequests::open(store))
            .await
            .map_err(|join_error| Error::Engine {
                detail: join_error.to_string(),
            })??
    };
    let control_plane = if config.control_plane {
        Some(
            ControlPlane::start(
                &config.name,
                &advertise,
                &config.data_dir,
                caller.clone(),
                config.raft_compact_after_entries,
            )
            .await?,
        )
    } else {
        None
    };
    let hosted_control_plane = control_plane.clone();
    let service = Arc::new(Service {
        store: store.clone(),
        sessions: sessions.clone(),
        requests: Arc::new(requests),
        background: BackgroundWorkers::start("tandem-store-copy", BACKGROUND_STORE_THREADS)?,
        identity: Identity {
            name: config.name.clone(),
            site: config.site.clone(),
            nbd_address: nbd_address.to_string(),
        },
        control_plane,
        members: config.members.clone(),
        caller,
        fault_injection: config.fault_injection,
        own_address: advertise.clone(),
        preferred_member: AtomicUsize::new(0),
    });
    let report = NodeReport {
        name: config.name.clone(),
        site: config.site.clone(),
        address: advertise.clone(),
        nbd_address: nbd_address.to_string(),
        capacity_bytes,
        control_plane: config.control_plane,
    };
    let mut tasks = vec![
        tokio::spawn(nbd::serve(nbd_listener, sessions.clone())),
        tokio::spawn(heartbeat(service.clone(), report)),
    ];
    if config.metrics.is_some() {
        tasks.push(tokio::spawn(crate::metrics::publish(
            store.clone(),
            sessions.clone(),
            service.control_plane.clone(),
        )));
    }
    let copier_stop = Arc::new(AtomicBool::new(false));
    for index in 0..crate::copy::COPIER_THREADS {
        let sessions = sessions.clone();
        let stop = copier_stop.clone();
        std::thread::Builder::new()
            .name(format!("tandem-copier-{index}"))
            .spawn(move || {
                crate::copy::lower_thread_priority();
                sessions.run_copier(stop, index == 0);
            })?;
    }
    let accept_endpoint = endpoint.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(incoming) = accept_endpoint.accept().await {
            let service = service.clone();
            let peer_address = incoming.remote_address().to_string();
            tokio::spawn(async move {
                let connection = match incoming.await {
                    Ok(connection) => {
                        crate::log_limit::peer_recovered(REFUSED_HANDSHAKE, &peer_address);
                        connection
                    }
                    Err(error) => {
                        // Peers without a certificate from the cluster CA end here.
                        crate::log_limit::warn_peer(
                            REFUSED_HANDSHAKE,
                            &peer_address,
                            &format!("{error} (a peer needs a certificate from this cluster's CA, made by `tandem init`)"),
                        );
                        metrics::counter!(crate::metrics::QUIC_REFUSED_TOTAL).increment(1);
                        return;
                    }
                };
                protocol::transport::serve_connection(connection, move |peer, request| {
                    service::handle(service.clone(), peer, request)
                })
                .await;
            });
        }
    }));
    tracing::info!(name = %config.name, site = %config.site, %quic_address, %nbd_address, "node serving");
    Ok(RunningNode {
        name: config.name.clone(),
        quic_address,
        nbd_address,
        store,
        sessions,
        endpoint,
        tasks,
        copier_stop,
        control_plane: hosted_control_plane,
    })
}

/// What the log says of a peer whose QUIC handshake failed.
const REFUSED_HANDSHAKE: &str = "refused a QUIC handshake from";

/// Threads that store the tracks of remote copiers: enough to keep a copy's parallel
/// streams busy on two cores.
const BACKGROUND_STORE_THREADS: usize = 4;

/// How often a node tells the control plane it is alive. Well under the leader's
/// `NODE_DOWN_AFTER_MILLISECONDS`, so a lost heartbeat or two never marks a node down.
pub const HEARTBEAT_INTERVAL_MILLISECONDS: u64 = 500;

/// How long a heartbeat waits for one member before it tries the next: a dead member in
/// the list must not delay heartbeats past the leader's `NODE_DOWN_AFTER_MILLISECONDS`.
pub const HEARTBEAT_PATIENCE: Duration = Duration::from_millis(1_000);

/// The address other processes reach this node at.
fn advertised_address(config: &NodeConfig, quic_address: SocketAddr) -> Result<String> {
    if let Some(advertise) = &config.advertise {
        return Ok(advertise.clone());
    }
    if quic_address.ip().is_unspecified() && (config.control_plane || !config.members.is_empty()) {
        return Err(Error::Config {
            detail: format!(
                "listen address {quic_address} is a wildcard, which other nodes cannot connect to: set advertise = \"HOST:PORT\" in the config"
            ),
        });
    }
    Ok(quic_address.to_string())
}

/// Registers with the control plane and heartbeats for as long as the node runs.
async fn heartbeat<E: Engine>(service: Arc<Service<E>>, report: NodeReport) {
    if service.control_plane.is_none() && service.members.is_empty() {
        tracing::info!("no control-plane members configured; this node runs on its own");
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MILLISECONDS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = false;
    loop {
        ticker.tick().await;
        // A member that knows its leader passes the heartbeat on itself; otherwise the
        // node sends it, from its own certificate, to the configured members.
        let response = match &service.control_plane {
            // Bounded like the calls to the configured members: a forward to the leader
            // whose call was lost would otherwise hold this loop for the call's whole
            // timeout, and the leader would mark this node down meanwhile (found by the
            // chaos schedule: one lost heartbeat kept a member down for 10 s after the
            // loss had healed).
            Some(control_plane) if control_plane.knows_leader() => tokio::time::timeout(
                HEARTBEAT_PATIENCE,
                control_plane.serve_heartbeat(report.clone(), 0),
            )
            .await
            .unwrap_or_else(|_| Response::Error {
                code: ErrorCode::Unavailable,
                message: format!(
                    "the leader did not take the heartbeat within {} ms",
                    HEARTBEAT_PATIENCE.as_millis()
                ),
            }),
            _ => {
                let request = Request::Heartbeat {
                    report: report.clone(),
                    hops: 0,
                };
                let to_members = service::to_members(&service, request, HEARTBEAT_PATIENCE);
                match &service.control_plane {
                    // A member that learns its leader meanwhile (`cluster init` here) stops
                    // waiting for the configured members, so it registers at once.
                    Some(control_plane) => tokio::select! {
                        response = to_members => response,
                        () = control_plane.leader_known() => {
                            control_plane.serve_heartbeat(report.clone(), 0).await
                        }
                    },
                    None => to_members.await,
                }
            }
        };
        match response {
            Response::Error { code, message } => {
                if reported {
                    tracing::warn!(%code, %message, "heartbeat not accepted; will keep trying");
                } else {
                    crate::log_limit::info_once_per_interval(
                        "heartbeat",
                        &format!("not registered with the control plane yet ({code}): {message}; will keep trying"),
                    );
                }
                reported = false;
            }
            _ => {
                if !reported {
                    tracing::info!("registered with the control plane");
                }
                reported = true;
            }
        }
    }
}

/// Reaches the nodes holding remote session targets over the node's QUIC connections.
/// Session code runs on blocking threads, so a call blocks on the runtime's handle.
struct QuicTargetLink {
    caller: Arc<Caller>,
    runtime: tokio::runtime::Handle,
    /// This node's name and advertised address.
    node: (String, String),
}

fn target_answer(
    remote: &RemoteVolume,
    response: std::result::Result<Response, String>,
) -> Result<TargetAnswer> {
    let response = response.map_err(|reason| Error::Remote {
        node: remote.node.clone(),
        detail: reason,
    })?;
    match response {
        Response::Target(answer) => Ok(answer),
        Response::Error { message, .. } => Err(Error::Remote {
            node: remote.node.clone(),
            detail: message,
        }),
        other => Err(Error::Remote {
            node: remote.node.clone(),
            detail: format!("unexpected answer {other:?}"),
        }),
    }
}

/// The error of a call that got no answer within its bound.
fn unanswered(remote: &RemoteVolume, timeout: std::time::Duration) -> Error {
    Error::TargetUnanswered {
        node: remote.node.clone(),
        volume: remote.volume.clone(),
        timeout_milliseconds: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

impl QuicTargetLink {
    /// Several calls at once on parallel streams; with `timeout`, the answers still
    /// missing when it passes are [`Error::TargetUnanswered`] (the caller's own bounds,
    /// 2 s to connect and 10 s a call, apply otherwise).
    fn call_many_bounded(
        &self,
        remote: &RemoteVolume,
        operations: Vec<TargetOperation>,
        timeout: Option<std::time::Duration>,
    ) -> Vec<Result<TargetAnswer>> {
        let count = operations.len();
        let caller = self.caller.clone();
        let remote = remote.clone();
        self.runtime.block_on(async move {
            let mut calls = tokio::task::JoinSet::new();
            for (index, operation) in operations.into_iter().enumerate() {
                let caller = caller.clone();
                let remote = remote.clone();
                calls.spawn(async move {
                    let request = Request::Target { operation };
                    let response = caller
                        .call(&remote.address, Some(&remote.node), &request)
                        .await;
                    (index, target_answer(&remote, response))
                });
            }
            let mut answers: Vec<Result<TargetAnswer>> = (0..count)
                .map(|_| {
                    Err(Error::Engine {
                        detail: "copy call did not finish".to_string(),
                    })
                })
                .collect();
            let collect = async {
                while let Some(joined) = calls.join_next().await {
                    if let Ok((index, answer)) = joined {
                        answers[index] = answer;
                    }
                }
            };
            let complete = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, collect).await.is_ok(),
                None => {
                    collect.await;
                    true
                }
            };
            if let (false, Some(timeout)) = (complete, timeout) {
                // The calls still out are dropped with the set; their answers are lost.
                for answer in answers.iter_mut() {
                    if matches!(answer, Err(Error::Engine { .. })) {
                        *answer = Err(unanswered(&remote, timeout));
                    }
                }
            }
            answers
        })
    }
}

impl TargetLink for QuicTargetLink {
    fn call_many(
        &self,
        remote: &RemoteVolume,
        operations: Vec<TargetOperation>,
    ) -> Vec<Result<TargetAnswer>> {
        self.call_many_bounded(remote, operations, None)
    }

    fn call_many_within(
        &self,
        remote: &RemoteVolume,
        operations: Vec<TargetOperation>,
        timeout: std::time::Duration,
    ) -> Vec<Result<TargetAnswer>> {
        self.call_many_bounded(remote, operations, Some(timeout))
    }

    fn call_within(
        &self,
        remote: &RemoteVolume,
        operation: TargetOperation,
        timeout: std::time::Duration,
    ) -> Result<TargetAnswer> {
        let request = Request::Target { operation };
        // The timer is made inside the runtime: copier threads are not in its context.
        let response = self.runtime.block_on(async {
            tokio::time::timeout(
                timeout,
                self.caller
                    .call(&remote.address, Some(&remote.node), &request),
            )
            .await
        });
        match response {
            Ok(response) => target_answer(remote, response),
            Err(_) => Err(unanswered(remote, timeout)),
        }
    }

    fn this_node(&self) -> (String, String) {
        self.node.clone()
    }

    fn call(&self, remote: &RemoteVolume, operation: TargetOperation) -> Result<TargetAnswer> {
        let request = Request::Target { operation };
        let response = self.runtime.block_on(self.caller.call(
            &remote.address,
            Some(&remote.node),
            &request,
        ));
        target_answer(remote, response)
    }
}
