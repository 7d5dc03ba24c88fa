//! The node's QUIC service. Storage requests are answered from the volume store (a thin
//! driver: validation lives in the store); cluster requests go to the control plane, in
//! this process when it hosts a member, else to a member named in the config.

use crate::copy::workers::BackgroundWorkers;
use crate::copy::Sessions;
use crate::engine::Engine;
use crate::requests::{wrong_answer, NodeAnswer, NodeCall, NodeRequests};
use crate::store::VolumeStore;
use crate::{Error, Result};
use control_plane::advice::NOT_INITIALIZED_MESSAGE;
use control_plane::caller::Caller;
use control_plane::member::ControlPlane;
use protocol::cluster::{ClusterRequest, ClusterResponse, NodeReport, CLUSTER_REQUEST_HOPS_MAX};
use protocol::messages::{ErrorCode, NodeStatus, Request, Response};
use protocol::session::{RemoteVolume, SessionCommand, TargetOperation};
use protocol::transport::{Peer, PeerRole};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a node tells about itself in a status answer.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub site: String,
    pub nbd_address: String,
}

/// Everything a request handler needs, shared by all connections of a node.
pub struct Service<E: Engine> {
    pub store: Arc<VolumeStore<E>>,
    pub sessions: Arc<Sessions<E>>,
    /// The answers given to session commands, by request id, so a retry is not carried
    /// out twice.
    pub requests: Arc<NodeRequests<E>>,
    /// Low-priority threads that store the tracks remote copiers send here.
    pub background: BackgroundWorkers,
    pub identity: Identity,
    /// The control-plane member this process hosts, when its config says `control_plane = true`.
    pub control_plane: Option<Arc<ControlPlane>>,
    /// The control-plane members this node reports to, `HOST:PORT` each.
    pub members: Vec<String>,
    /// The process's connection pool; its fault rules apply to the calls served here too.
    pub caller: Arc<Caller>,
    /// Whether the admin may set fault rules on this node; off unless the config enables it.
    pub fault_injection: bool,
    /// The address other nodes reach this one at; skipped in `members`.
    pub own_address: String,
    /// The index (among the other members) of the member that answered last.
    pub preferred_member: AtomicUsize,
}

/// How long a call from a peer whose calls are dropped is held without an answer: the
/// ordinary call timeout, after which the caller has given up (one with more patience,
/// like a forwarded cluster request, then gets "unavailable" and moves on as after a
/// lost connection).
const DROPPED_CALL_HOLD: Duration =
    Duration::from_secs(control_plane::caller::CALL_TIMEOUT_SECONDS);

fn refuse(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

pub async fn handle<E: Engine>(service: Arc<Service<E>>, peer: Peer, request: Request) -> Response {
    let started = Instant::now();
    let kind = request_kind(&request);
    let response = route(service, &peer, request).await;
    metrics::histogram!(crate::metrics::REQUESTS_SECONDS, "request" => kind)
        .record(started.elapsed().as_secs_f64());
    if let Response::Error { code, message } = &response {
        metrics::counter!(crate::metrics::REQUEST_ERRORS_TOTAL, "request" => kind).increment(1);
        crate::metrics::count_error(*code);
        tracing::info!(request = kind, caller = %peer.role, %code, %message, "request refused");
    }
    response
}

async fn route<E: Engine>(service: Arc<Service<E>>, peer: &Peer, request: Request) -> Response {
    let from_node = matches!(peer.role, PeerRole::Node(_));
    if let PeerRole::Node(name) = &peer.role {
        if service.caller.faults().drops(name) {
            // A partition answers nothing: the caller gives up after its own timeout.
            tokio::time::sleep(DROPPED_CALL_HOLD).await;
            return refuse(
                ErrorCode::Unavailable,
                format!("call from {name} dropped by fault injection"),
            );
        }
    }
    match request {
        Request::Raft(bytes) => match &service.control_plane {
            Some(control_plane) => control_plane.serve_raft(peer, &bytes).await,
            None => refuse(
                ErrorCode::Forbidden,
                format!(
                    "node {} is not a control-plane member",
                    service.identity.name
                ),
            ),
        },
        Request::Cluster { request, hops } => serve_cluster(&service, request, hops).await,
        Request::Heartbeat { report, hops } => serve_heartbeat(&service, peer, report, hops).await,
        Request::SetFault { peer: target, rule } => {
            if peer.role != PeerRole::Admin || !service.fault_injection {
                return refuse(
                    ErrorCode::Forbidden,
                    "fault injection needs the admin certificate and `fault_injection = true` in the node's config".into(),
                );
            }
            tracing::warn!(peer = %target, ?rule, "fault injection rule set");
            service.caller.faults().set(&target, rule);
            Response::Deleted { name: target }
        }
        Request::VolumeCreate { .. }
        | Request::VolumeDelete { .. }
        | Request::VolumeCreateOnce { .. }
        | Request::VolumeDeleteOnce { .. }
        | Request::VolumeSetReadiness { .. }
        | Request::Snap { .. }
        | Request::SnapAt { .. }
        | Request::SnapLineage { .. }
        | Request::Lineage { .. }
            if !from_node =>
        {
            // Volumes change through the catalog only, so that it stays the truth.
            refuse(
                ErrorCode::Forbidden,
                "volumes are changed through the control plane: use `tandem volume ...`, which sends cluster commands".into(),
            )
        }
        Request::Target { .. } if !from_node => refuse(
            ErrorCode::Forbidden,
            "session targets are driven by the session's source node only".into(),
        ),
        Request::Target { operation } => {
            let sessions = service.sessions.clone();
            let background = matches!(
                operation,
                TargetOperation::PutTrack {
                    background: true,
                    ..
                }
            );
            if background {
                // A remote copier's track: stored at low priority, after host IO.
                service
                    .background
                    .run(move || sessions.serve_target(operation))
                    .await
                    .map(Response::Target)
                    .unwrap_or_else(|error| refuse(error.code(), error.to_string()))
            } else {
                blocking(move || sessions.serve_target(operation).map(Response::Target)).await
            }
        }
        Request::Digest { .. } | Request::Resend { .. } | Request::LineageTracks { .. }
            if !from_node =>
        {
            refuse(
            ErrorCode::Forbidden,
            "digests, re-sends and lineages are a gsnap's, which the control plane's leader drives: use `tandem gsnap`".into(),
            )
        }
        Request::LineageTracks { volume, lineage } => {
            let sessions = service.sessions.clone();
            blocking(move || {
                let store = sessions.store();
                let frozen = store.lineage_frozen_tracks(&*store.volume(&volume)?, &lineage)?;
                Ok(Response::LineageTracks(protocol::gsnap::LineageTracks {
                    volume,
                    lineage,
                    frozen,
                }))
            })
            .await
        }
        Request::Lineage {
            request_id,
            volume,
            lineage,
            step,
        } => {
            let sessions = service.sessions.clone();
            let requests = service.requests.clone();
            let call = NodeCall::Lineage {
                volume: volume.clone(),
                lineage: lineage.clone(),
                step,
            };
            blocking(move || {
                let answer = requests.carry_out_call(request_id, &call, || {
                    sessions
                        .lineage_step(&volume, &lineage, step)
                        .map(NodeAnswer::Lineage)
                })?;
                match answer {
                    NodeAnswer::Lineage(info) => Ok(Response::Lineage(info)),
                    answer => Err(wrong_answer(request_id, &call, &answer)),
                }
            })
            .await
        }
        Request::Digest {
            volume,
            extents,
            group_tracks,
        } => {
            // Reading every track of a volume is background work: after host IO.
            let sessions = service.sessions.clone();
            service
                .background
                .run(move || {
                    let store = sessions.store();
                    store.digest(&*store.volume(&volume)?, &extents, group_tracks)
                })
                .await
                .map(Response::Digests)
                .unwrap_or_else(|error| refuse(error.code(), error.to_string()))
        }
        Request::Resend { target, tracks } => {
            let sessions = service.sessions.clone();
            blocking(move || {
                let (tracks, bytes) = sessions.resend(&target, &tracks)?;
                Ok(Response::Resent { tracks, bytes })
            })
            .await
        }
        Request::Session { .. } if !from_node => refuse(
            ErrorCode::Forbidden,
            "session commands go through the control plane, which records them: use `tandem clone ...` or `tandem mirror ...`".into(),
        ),
        Request::Session {
            request_id,
            command,
        } => {
            // A retry of a command carried out before is answered from memory, so where its
            // target lives need not be looked up again.
            let remote = if service.requests.answer(request_id).is_some() {
                None
            } else {
                match remote_target_of(&service, &command).await {
                    Ok(remote) => remote,
                    Err(response) => return response,
                }
            };
            let sessions = service.sessions.clone();
            let requests = service.requests.clone();
            let named = sessions.named_session(&command);
            let logged = command.clone();
            let response = blocking(move || {
                requests
                    .carry_out(request_id, &command, || {
                        sessions.command_with(command.clone(), remote)
                    })
                    .map(Response::Session)
            })
            .await;
            log_session_command(&logged, named, &response);
            response
        }
        Request::Snap {
            request_id,
            source,
            target,
            extents,
            overwrite,
        } => {
            let call = NodeCall::Snap {
                source: source.clone(),
                target: target.clone(),
                extents: extents.clone(),
                overwrite,
            };
            let order = SnapOrder {
                source,
                target,
                extents,
                target_extents: Vec::new(),
                overwrite,
                target_size_bytes: None,
                lineage: None,
            };
            serve_snap(&service, request_id, call, order).await
        }
        Request::SnapAt {
            request_id,
            source,
            target,
            extents,
            target_extents,
            overwrite,
            target_size_bytes,
        } => {
            let call = NodeCall::SnapAt {
                source: source.clone(),
                target: target.clone(),
                extents: extents.clone(),
                target_extents: target_extents.clone(),
                overwrite,
                target_size_bytes,
            };
            let order = SnapOrder {
                source,
                target,
                extents,
                target_extents,
                overwrite,
                target_size_bytes,
                lineage: None,
            };
            serve_snap(&service, request_id, call, order).await
        }
        Request::SnapLineage {
            request_id,
            source,
            target,
            extents,
            target_extents,
            overwrite,
            target_size_bytes,
            lineage,
        } => {
            let call = NodeCall::SnapLineage {
                source: source.clone(),
                target: target.clone(),
                extents: extents.clone(),
                target_extents: target_extents.clone(),
                overwrite,
                target_size_bytes,
                lineage: lineage.clone(),
            };
            let order = SnapOrder {
                source,
                target,
                extents,
                target_extents,
                overwrite,
                target_size_bytes,
                lineage: Some(lineage),
            };
            serve_snap(&service, request_id, call, order).await
        }
        Request::VolumeCreateOnce {
            request_id,
            name,
            size_bytes,
            track_size_bytes,
        } => {
            let sessions = service.sessions.clone();
            let requests = service.requests.clone();
            let call = NodeCall::VolumeCreate {
                name: name.clone(),
                size_bytes,
                track_size_bytes,
            };
            blocking(move || {
                let answer = requests.carry_out_call(request_id, &call, || {
                    let store = sessions.store();
                    Ok(NodeAnswer::Volume(
                        store.create(&name, size_bytes, track_size_bytes)?.info(),
                    ))
                })?;
                match answer {
                    NodeAnswer::Volume(info) => Ok(Response::Volume(info)),
                    answer => Err(wrong_answer(request_id, &call, &answer)),
                }
            })
            .await
        }
        Request::VolumeDeleteOnce { request_id, name } => {
            let sessions = service.sessions.clone();
            let requests = service.requests.clone();
            let call = NodeCall::VolumeDelete { name: name.clone() };
            blocking(move || {
                let answer = requests.carry_out_call(request_id, &call, || {
                    check_not_in_session(&sessions, &name, "deleted")?;
                    delete_closing_hosts(sessions.store(), &name)?;
                    Ok(NodeAnswer::Deleted)
                })?;
                match answer {
                    NodeAnswer::Deleted => Ok(Response::Deleted { name }),
                    answer => Err(wrong_answer(request_id, &call, &answer)),
                }
            })
            .await
        }
        Request::SessionAnswer { .. } if !from_node => refuse(
            ErrorCode::Forbidden,
            "the answers to session commands are for the control plane's leader".into(),
        ),
        Request::SessionAnswer { request_id } => match service.requests.answer(request_id) {
            Some(answer) => Response::Session(answer),
            None => refuse(
                ErrorCode::NotFound,
                Error::SessionRequestUnknown {
                    request_id: format!("{request_id:032x}"),
                }
                .to_string(),
            ),
        },
        storage_request => {
            let sessions = service.sessions.clone();
            let identity = service.identity.clone();
            let answer =
                tokio::task::spawn_blocking(move || answer(&sessions, &identity, storage_request))
                    .await
                    .unwrap_or_else(|join_error| {
                        Err(Error::Engine {
                            detail: format!("request task failed: {join_error}"),
                        })
                    });
            answer.unwrap_or_else(|error| refuse(error.code(), error.to_string()))
        }
    }
}

/// Logs a session command this node carried out, with the session and its volumes: from
/// the session as the command left it, or, when the command ended it, as it was before.
/// (A refused command is logged by [`handle`] with its message.)
fn log_session_command(
    command: &SessionCommand,
    named: Option<(protocol::session::SessionId, String, String)>,
    response: &Response,
) {
    let session = match response {
        Response::Session(Some(info)) => Some((info.id, info.source.clone(), info.target.clone())),
        Response::Session(None) => named,
        _ => return,
    };
    match session {
        Some((id, source, target)) => tracing::info!(
            command = command.name(),
            session = id,
            %source,
            %target,
            arguments = ?command,
            "session command carried out"
        ),
        None => tracing::info!(
            command = command.name(),
            arguments = ?command,
            "session command carried out"
        ),
    }
}

/// Runs store or session work on a blocking thread and turns its error into an answer.
async fn blocking(work: impl FnOnce() -> Result<Response> + Send + 'static) -> Response {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join_error| {
            Err(Error::Engine {
                detail: format!("request task failed: {join_error}"),
            })
        })
        .unwrap_or_else(|error| refuse(error.code(), error.to_string()))
}

/// Where the target of a new session lives, when it is not on this node: the catalog
/// names the volume's node and the node's address.
async fn remote_target_of<E: Engine>(
    service: &Service<E>,
    command: &SessionCommand,
) -> std::result::Result<Option<RemoteVolume>, Response> {
    let target = match command {
        SessionCommand::MirrorEstablish { bcv, .. } => bcv,
        SessionCommand::CloneCreate { target, .. } => target,
        _ => return Ok(None),
    };
    if service.store.volume(target).is_ok() || service.sessions.has_target(target) {
        return Ok(None);
    }
    let status = match serve_cluster(service, ClusterRequest::Status, 0).await {
        Response::Cluster(ClusterResponse::Status(status)) => status,
        Response::Error { code, message } => {
            return Err(refuse(
                code,
                format!("cannot find where volume '{target}' lives: {message}"),
            ))
        }
        other => {
            return Err(refuse(
                ErrorCode::Internal,
                format!("unexpected catalog answer {other:?}"),
            ))
        }
    };
    let Some(record) = status.volumes.iter().find(|volume| volume.name == *target) else {
        return Err(refuse(
            ErrorCode::NotFound,
            format!("volume '{target}' does not exist (see `tandem volume list`)"),
        ));
    };
    let Some(node) = status
        .sites
        .values()
        .flatten()
        .find(|node| node.name == record.node)
    else {
        return Err(refuse(
            ErrorCode::Unavailable,
            format!(
                "node {} of volume '{target}' is not registered",
                record.node
            ),
        ));
    };
    Ok(Some(RemoteVolume {
        node: node.name.clone(),
        address: node.address.clone(),
        volume: target.clone(),
    }))
}

async fn serve_cluster<E: Engine>(
    service: &Service<E>,
    mut request: ClusterRequest,
    hops: u8,
) -> Response {
    // A volume placed without --node goes to the node the CLI talked to.
    if let ClusterRequest::VolumeCreate { node, .. } = &mut request {
        if node.is_none() {
            *node = Some(service.identity.name.clone());
        }
    }
    if request == ClusterRequest::Init && service.control_plane.is_none() {
        return refuse(
            ErrorCode::InvalidArgument,
            format!(
                "node {} runs without `control_plane = true` in its config, so it cannot start a cluster",
                service.identity.name
            ),
        );
    }
    let local_only = matches!(
        request,
        ClusterRequest::Init | ClusterRequest::ClusterStatus
    );
    match route_to(service, hops, local_only) {
        Route::Local(control_plane) => control_plane.serve_cluster(request, hops).await,
        Route::Members => {
            to_members(
                service,
                Request::Cluster {
                    request,
                    hops: hops + 1,
                },
                CLUSTER_REQUEST_PATIENCE,
            )
            .await
        }
        Route::Refuse(response) => *response,
    }
}

/// Heartbeats are trusted by certificate: a node reports on itself only (the first hop
/// must come from the certificate of the node in the report), and only members pass
/// heartbeats on, so a node cannot register or keep alive another node's name.
async fn serve_heartbeat<E: Engine>(
    service: &Service<E>,
    peer: &Peer,
    report: NodeReport,
    hops: u8,
) -> Response {
    let PeerRole::Node(sender) = &peer.role else {
        return refuse(
            ErrorCode::Forbidden,
            "heartbeats come from nodes only".into(),
        );
    };
    let Some(control_plane) = &service.control_plane else {
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "node {} is not a control-plane member",
                service.identity.name
            ),
        );
    };
    if hops == 0 && *sender != report.name {
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "node {sender} sent a heartbeat for node {}; a node reports on itself only",
                report.name
            ),
        );
    }
    if hops > 0 && !control_plane.is_member(sender) {
        return refuse(
            ErrorCode::Forbidden,
            format!("node {sender} passed on a heartbeat but is not a control-plane member"),
        );
    }
    control_plane.serve_heartbeat(report, hops).await
}

/// How long a node waits for one member to answer a cluster request it passed on: longer
/// than a member's own patience with the leader and with owning nodes.
pub const CLUSTER_REQUEST_PATIENCE: Duration = Duration::from_secs(30);

/// Where a cluster request goes from this node.
enum Route<'a> {
    /// To the member in this process, which serves it or passes it to its leader.
    Local(&'a Arc<ControlPlane>),
    /// To the configured members, one pass more.
    Members,
    Refuse(Box<Response>),
}

fn route_to<E: Engine>(service: &Service<E>, hops: u8, local_only: bool) -> Route<'_> {
    match &service.control_plane {
        // A member that knows its leader, or a request that must be served here.
        Some(control_plane)
            if local_only
                || control_plane.knows_leader()
                || service
                    .members
                    .iter()
                    .all(|member| *member == service.own_address) =>
        {
            Route::Local(control_plane)
        }
        // A node that is no member, or a member not yet in any cluster (before
        // `cluster add-member`), asks the configured members, within the hop budget.
        _ if hops < CLUSTER_REQUEST_HOPS_MAX => Route::Members,
        // At the end of the hop budget a member in no cluster says so, so that the node
        // that asked can tell "no cluster yet" from "no leader now".
        Some(control_plane) if control_plane.is_uninitialized() => Route::Refuse(Box::new(refuse(
            ErrorCode::NotInitialized,
            NOT_INITIALIZED_MESSAGE.to_string(),
        ))),
        _ => Route::Refuse(Box::new(refuse(
            ErrorCode::Unavailable,
            format!(
                "node {} knows no leader and the request has been passed on {hops} times already",
                service.identity.name
            ),
        ))),
    }
}

/// What the log says of a configured member that cannot be reached.
const UNREACHABLE_MEMBER: &str = "cannot reach control-plane member";

/// Passes a request to the configured members, starting with the one that answered last
/// and moving on while they answer "unavailable" (dead, or no leader known), so that one
/// dead member in the list costs nothing once another has answered.
///
/// Each member gets at most `patience`: a heartbeat must not wait on a dead member for
/// longer than the leader waits for heartbeats, while a volume command may take its time.
pub async fn to_members<E: Engine>(
    service: &Service<E>,
    request: Request,
    patience: Duration,
) -> Response {
    let members: Vec<&String> = service
        .members
        .iter()
        .filter(|member| **member != service.own_address)
        .collect();
    if members.is_empty() {
        return refuse(
            ErrorCode::Unavailable,
            format!(
                "node {} names no other control-plane members: add `members = [\"HOST:PORT\", ...]` to its config",
                service.identity.name
            ),
        );
    }
    let start = service.preferred_member.load(Ordering::Relaxed) % members.len();
    let mut failures = Vec::new();
    let mut not_initialized = 0;
    for offset in 0..members.len() {
        let index = (start + offset) % members.len();
        let member = members[index];
        let answer = tokio::time::timeout(patience, service.caller.call(member, None, &request))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", patience.as_millis())));
        match answer {
            Ok(Response::Error {
                code:
                    code @ (ErrorCode::Unavailable | ErrorCode::NotInitialized | ErrorCode::NotMember),
                message,
            }) => {
                crate::log_limit::peer_recovered(UNREACHABLE_MEMBER, member);
                not_initialized += usize::from(code == ErrorCode::NotInitialized);
                failures.push(format!("{member}: {message}"));
            }
            Ok(response) => {
                crate::log_limit::peer_recovered(UNREACHABLE_MEMBER, member);
                service.preferred_member.store(index, Ordering::Relaxed);
                return response;
            }
            Err(detail) => {
                crate::log_limit::warn_peer(UNREACHABLE_MEMBER, member, &detail);
                failures.push(format!("{member}: {detail}"));
            }
        }
    }
    // Only when every member says it is in no cluster, and so is this node's own member,
    // is there no control plane: a member that does not answer may be the one that is.
    let own_uninitialized = service
        .control_plane
        .as_ref()
        .is_none_or(|control_plane| control_plane.is_uninitialized());
    if not_initialized == members.len() && own_uninitialized {
        return refuse(
            ErrorCode::NotInitialized,
            NOT_INITIALIZED_MESSAGE.to_string(),
        );
    }
    refuse(
        ErrorCode::Unavailable,
        format!(
            "no control-plane member could serve the request ({})",
            failures.join("; ")
        ),
    )
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::VolumeCreate { .. } => "volume_create",
        Request::VolumeList => "volume_list",
        Request::VolumeShow { .. } => "volume_show",
        Request::VolumeDelete { .. } => "volume_delete",
        Request::VolumeCreateOnce { .. } => "volume_create_once",
        Request::VolumeDeleteOnce { .. } => "volume_delete_once",
        Request::VolumeSetReadiness { .. } => "volume_set_readiness",
        Request::Snap { .. } | Request::SnapAt { .. } | Request::SnapLineage { .. } => "snap",
        Request::Lineage { .. } => "lineage",
        Request::LineageTracks { .. } => "lineage tracks",
        Request::NodeStatus => "node_status",
        Request::Cluster { .. } => "cluster",
        Request::Heartbeat { .. } => "heartbeat",
        Request::Raft(_) => "raft",
        Request::SetFault { .. } => "set_fault",
        Request::Target { .. } => "target",
        Request::Session { .. } => "session",
        Request::SessionAnswer { .. } => "session_answer",
        Request::SessionList { .. } => "session_list",
        Request::SessionShow { .. } => "session_show",
        Request::VolumeClients { .. } => "volume_clients",
        Request::Digest { .. } => "digest",
        Request::Resend { .. } => "resend",
    }
}

/// What a snap request asks, whichever request carried it.
struct SnapOrder {
    source: String,
    target: String,
    extents: Vec<protocol::messages::Extent>,
    target_extents: Vec<protocol::messages::Extent>,
    overwrite: bool,
    target_size_bytes: Option<u64>,
    lineage: Option<String>,
}

/// Carries out a snap once per request id (a retry gets the first answer, the image of
/// the first instant) and answers it.
async fn serve_snap<E: Engine>(
    service: &Arc<Service<E>>,
    request_id: protocol::cluster::RequestId,
    call: NodeCall,
    order: SnapOrder,
) -> Response {
    let sessions = service.sessions.clone();
    let requests = service.requests.clone();
    blocking(move || {
        let answer = requests.carry_out_call(request_id, &call, || snap(&sessions, &order))?;
        match answer {
            NodeAnswer::Snapped {
                target_info,
                elapsed_micros,
            } => Ok(Response::Snapped {
                source: order.source,
                target: order.target,
                extents: order.extents,
                elapsed_micros,
                target_info,
            }),
            answer => Err(wrong_answer(request_id, &call, &answer)),
        }
    })
    .await
}

/// A pointer snapshot of `source` into `target`, refused when the target is in a copy
/// session.
fn snap<E: Engine>(sessions: &Sessions<E>, order: &SnapOrder) -> Result<NodeAnswer> {
    check_not_in_session(sessions, &order.target, "overwritten by a snap")?;
    let started = Instant::now();
    let (target_volume, _created) = sessions.snap_with_lineage(
        &order.source,
        &order.target,
        &order.extents,
        &order.target_extents,
        order.overwrite,
        order.target_size_bytes,
        order.lineage.as_deref(),
    )?;
    Ok(NodeAnswer::Snapped {
        target_info: target_volume.info(),
        elapsed_micros: started.elapsed().as_micros() as u64,
    })
}

/// Refuses a volume change that would pull a volume out from under a copy session.
fn check_not_in_session<E: Engine>(sessions: &Sessions<E>, name: &str, what: &str) -> Result<()> {
    if sessions.involves(name) {
        return Err(Error::VolumeInSession {
            name: name.to_string(),
            what: what.to_string(),
        });
    }
    Ok(())
}

/// Deletes a volume after closing the NBD connections hosts have open to it. The
/// control plane asks this only once the catalog records the delete (it refuses a delete
/// of an open volume before that unless forced), so the hosts are disconnected cleanly:
/// their requests in flight are answered and the connection closes, instead of their next
/// read failing with EIO.
fn delete_closing_hosts<E: Engine>(store: &VolumeStore<E>, name: &str) -> Result<()> {
    let volume = store.volume(name)?;
    let hosts = store.hosts();
    let (asked, still_open) = hosts.close_volume(
        volume.id,
        Duration::from_millis(crate::nbd_hosts::DISCONNECT_WAIT_MILLISECONDS),
    );
    if !asked.is_empty() {
        tracing::info!(volume = %name, clients = ?asked, "closed the hosts' NBD connections before the delete");
    }
    if !still_open.is_empty() {
        tracing::warn!(volume = %name, clients = ?still_open, "NBD connections still open after the wait; their requests fail once the volume is gone");
    }
    let deleted = store.delete(name);
    hosts.reopen(volume.id);
    deleted
}

fn answer<E: Engine>(
    sessions: &Sessions<E>,
    identity: &Identity,
    request: Request,
) -> Result<Response> {
    let store = sessions.store();
    Ok(match request {
        Request::SessionList { kind } => Response::Sessions(sessions.list(kind)?),
        Request::SessionShow { kind, target } => {
            Response::Session(Some(sessions.show(kind, &target)?))
        }
        Request::VolumeCreate {
            name,
            size_bytes,
            track_size_bytes,
        } => Response::Volume(store.create(&name, size_bytes, track_size_bytes)?.info()),
        Request::VolumeList => Response::Volumes(store.list()),
        Request::VolumeShow { name } => Response::Volume(store.volume(&name)?.info()),
        Request::VolumeDelete { name } => {
            check_not_in_session(sessions, &name, "deleted")?;
            delete_closing_hosts(store, &name)?;
            Response::Deleted { name }
        }
        Request::VolumeClients { name } => {
            let volume = store.volume(&name)?;
            let clients = store.hosts().clients(volume.id);
            Response::VolumeClients {
                name,
                clients: clients.iter().map(ToString::to_string).collect(),
            }
        }
        Request::VolumeSetReadiness { name, readiness } => {
            check_not_in_session(sessions, &name, "given another readiness")?;
            Response::Volume(store.set_readiness(&name, readiness)?.info())
        }
        Request::NodeStatus => Response::NodeStatus(NodeStatus {
            name: identity.name.clone(),
            site: identity.site.clone(),
            nbd_address: identity.nbd_address.clone(),
            volume_count: store.volume_count() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        cluster_request => {
            return Err(Error::Config {
                detail: format!(
                    "{} is not a storage request",
                    request_kind(&cluster_request)
                ),
            })
        }
    })
}
