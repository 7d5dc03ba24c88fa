//! A control-plane member: the Raft instance of one node process, and what its leader
//! does with cluster requests, heartbeats and half-finished volume commands.
//!
//! Every volume command goes: leader → catalog entry (`creating`, `deleting`) → owning
//! node → catalog entry (`ready`, removed). A node that dies in between leaves the entry
//! half-way; the leader's reconciler finishes it when the node heartbeats again. The
//! catalog is the truth, so the outcome is never ambiguous: finished, or rolled back when
//! the owning node refuses the volume.
//!
//! The control plane never touches volume bytes: it asks owning nodes over QUIC.

use crate::advice;
mod checks;
mod lifecycle;
mod sessions;

use crate::caller::Caller;
use crate::error::Error;
use crate::network::{self, QuicNetworkFactory};
use crate::storage::{self, CatalogView};
use crate::types::Raft;
use lifecycle::{now_unix_seconds, retire_removed_store, watch_removal, Removal};
pub use lifecycle::{
    INIT_REGISTRATION_TIMEOUT_SECONDS, REMOVAL_CHECK_AFTER_LEADERLESS_MILLISECONDS,
    REMOVAL_CHECK_INTERVAL_MILLISECONDS, REMOVED_MARKER_FILE,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, SnapshotPolicy};
use parking_lot::Mutex;
use protocol::cluster::{
    member_id, CatalogError, CatalogReply, CatalogRequest, CatalogStatus, ClusterRequest,
    ClusterResponse, ClusterStatus, Command, Health, Member, MemberId, MemberStatus, NodeRecord,
    NodeReport, RequestId, SessionEntry, VolumeRecord, VolumeState, CLUSTER_REQUEST_HOPS_MAX,
};
use protocol::messages::{ErrorCode, Extent, Readiness, Request, Response};
use protocol::session::{
    next_state, SessionCommand, SessionInfo, SessionKind, SessionState, Transition,
};
use protocol::transport::Peer;
use sessions::{
    checkpoint_info, session_lock_key, session_response, target_of, NodeSession, Replayed,
};
pub use sessions::{
    RESTING_SESSION_RECONCILE_INTERVAL_MILLISECONDS, SESSION_GONE_GRACE_MILLISECONDS,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the leader sends heartbeats (empty appends) to followers. openraft also uses
/// it as the time one append may take, connecting included, so it must exceed the round
/// trip between members with room for a loaded machine.
pub const RAFT_HEARTBEAT_INTERVAL_MILLISECONDS: u64 = 100;
/// A follower that hears no leader for a random time in this range starts an election.
/// openraft adds a leader lease of the maximum before a follower votes for anyone else, so
/// a follower stands after 450–600 ms of silence (four or more missed heartbeats), and a
/// dead leader is replaced within that plus a vote round trip: under the 1 s failover
/// goal with room for a slow, loaded machine.
pub const ELECTION_TIMEOUT_MIN_MILLISECONDS: u64 = 150;
pub const ELECTION_TIMEOUT_MAX_MILLISECONDS: u64 = 300;
/// A catalog snapshot is sent in chunks of this size; with the timeout below, a chunk has
/// ample time even on a slow link, and many chunks make a large catalog install fine.
pub const SNAPSHOT_CHUNK_BYTES_MAX: u64 = 1024 * 1024;
pub const INSTALL_SNAPSHOT_TIMEOUT_MILLISECONDS: u64 = 10_000;
/// A snapshot is built after this many log entries, and this many stay after a purge so a
/// briefly lagging follower catches up from the log instead of a snapshot.
pub const SNAPSHOT_AFTER_ENTRIES: u64 = 5_000;
pub const LOG_ENTRIES_KEPT_AFTER_SNAPSHOT: u64 = 1_000;

/// How long `add-member` waits for a new member to catch up, and any membership change to
/// commit, before it answers "unavailable" and undoes what it can.
pub const MEMBERSHIP_CHANGE_TIMEOUT_SECONDS: u64 = 30;
/// How long the leader waits for a command to commit before answering "unavailable".
pub const COMMIT_TIMEOUT_SECONDS: u64 = 5;
/// A node not heard from for this long is marked `down` by the leader.
pub const NODE_DOWN_AFTER_MILLISECONDS: u64 = 3_000;
/// How often the leader looks for silent nodes and half-finished volume commands.
pub const SUPERVISE_INTERVAL_MILLISECONDS: u64 = 500;

/// The ways a cluster request fails, already in the form the CLI shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response {
        Response::Error {
            code: self.code,
            message: self.message,
        }
    }
}

impl From<CatalogError> for Refusal {
    fn from(error: CatalogError) -> Refusal {
        Refusal::new(error.code(), error.to_string())
    }
}

type Outcome<T> = Result<T, Refusal>;

/// One member of the control plane, running inside a node process.
pub struct ControlPlane {
    name: String,
    address: String,
    id: MemberId,
    raft: Raft,
    catalog: CatalogView,
    caller: Arc<Caller>,
    /// When the leader last heard from each node. Volatile: a new leader starts counting
    /// afresh, which gives every node a full timeout of grace after a leader change.
    last_seen: Mutex<HashMap<String, Instant>>,
    /// One lock per volume, so the request path and the reconciler never drive the same
    /// volume at once.
    volume_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Volumes the supervisor is reconciling now.
    reconciling: Mutex<HashSet<String>>,
    /// One lock per session (by target volume), so a command and the supervisor's
    /// reconciliation never act on one session at once.
    session_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When the supervisor last compared resting sessions with their nodes.
    resting_sessions_reconciled: Mutex<Option<Instant>>,
    /// Sessions whose node said it no longer has them, since when (see
    /// [`sessions::SESSION_GONE_GRACE_MILLISECONDS`]).
    gone_sessions: Mutex<HashMap<String, Instant>>,
    /// The node's data directory, where a removed member leaves its marker.
    data_directory: PathBuf,
    /// Set once this member learned that it was removed from the control plane: its Raft
    /// is stopped and the node serves on as a plain node.
    removed: Mutex<Option<Removal>>,
}

/// Takes a volume out of the reconciling set when its reconciliation ends, however it ends.
struct Reconciling<'a> {
    set: &'a Mutex<HashSet<String>>,
    name: &'a str,
}

impl Drop for Reconciling<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(self.name);
    }
}

fn random_request_id() -> RequestId {
    rand::random()
}

impl ControlPlane {
    /// Opens the member's Raft store under `data_directory` and starts its Raft instance
    /// and its leader duties. `address` is where other members reach this node.
    ///
    /// `compact_after_entries` replaces the snapshot policy: a snapshot every that many
    /// entries, and no log kept behind it, so that a lagging or new member must install the
    /// snapshot. Tests use it to exercise snapshot transfer on a small catalog.
    pub async fn start(
        name: &str,
        address: &str,
        data_directory: &Path,
        caller: Arc<Caller>,
        compact_after_entries: Option<u64>,
    ) -> Result<Arc<ControlPlane>, Error> {
        retire_removed_store(data_directory)?;
        let (log_store, state_machine) = storage::open(&data_directory.join("control-plane"))?;
        let catalog = state_machine.catalog_view();
        let config = Config {
            cluster_name: "tandem".into(),
            heartbeat_interval: RAFT_HEARTBEAT_INTERVAL_MILLISECONDS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MILLISECONDS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MILLISECONDS,
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MILLISECONDS,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES_MAX,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(
                compact_after_entries.unwrap_or(SNAPSHOT_AFTER_ENTRIES),
            ),
            max_in_snapshot_log_to_keep: if compact_after_entries.is_some() {
                0
            } else {
                LOG_ENTRIES_KEPT_AFTER_SNAPSHOT
            },
            ..Config::default()
        }
        .validate()
        .map_err(|error| Error::Raft {
            detail: format!("invalid Raft configuration: {error}"),
        })?;
        let id = member_id(name);
        let network = QuicNetworkFactory {
            caller: caller.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log_store, state_machine)
            .await
            .map_err(|error| Error::Raft {
                detail: format!("cannot start Raft: {error}"),
            })?;
        let control_plane = Arc::new(ControlPlane {
            name: name.to_string(),
            address: address.to_string(),
            id,
            raft,
            catalog,
            caller,
            last_seen: Mutex::new(HashMap::new()),
            volume_locks: Mutex::new(HashMap::new()),
            reconciling: Mutex::new(HashSet::new()),
            session_locks: Mutex::new(HashMap::new()),
            resting_sessions_reconciled: Mutex::new(None),
            gone_sessions: Mutex::new(HashMap::new()),
            data_directory: data_directory.to_path_buf(),
            removed: Mutex::new(None),
        });
        tokio::spawn(supervise(Arc::downgrade(&control_plane)));
        tokio::spawn(watch_removal(Arc::downgrade(&control_plane)));
        Ok(control_plane)
    }

    /// Stops the Raft instance; used when the node shuts down.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "Raft did not shut down cleanly");
        }
    }

    /// Serves a Raft message from another member.
    pub async fn serve_raft(&self, peer: &Peer, bytes: &[u8]) -> Response {
        if let Some(refusal) = self.removed_refusal() {
            return refusal.into_response();
        }
        network::serve(&self.raft, peer, bytes).await
    }

    fn leader(&self) -> Option<(MemberId, Member)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let member = metrics
            .membership_config
            .membership()
            .get_node(&leader)?
            .clone();
        Some((leader, member))
    }

    /// Whether this member knows a leader, i.e. it is part of a cluster that has one.
    pub fn knows_leader(&self) -> bool {
        self.removed.lock().is_none() && self.leader().is_some()
    }

    fn is_leader(&self) -> bool {
        self.leader().is_some_and(|(leader, _)| leader == self.id)
    }

    /// Whether `name` is a voter or learner of this member's current membership.
    pub fn is_member(&self, name: &str) -> bool {
        let metrics = self.raft.metrics();
        let membership = metrics.borrow().membership_config.clone();
        let is_member = membership.nodes().any(|(_, member)| member.name == name);
        is_member
    }

    /// Serves a cluster request: here when this member leads (or the request is `Init`),
    /// else passed to the leader when the hop budget allows.
    pub async fn serve_cluster(&self, request: ClusterRequest, hops: u8) -> Response {
        if let Some(refusal) = self.outside_cluster(&request) {
            return refusal.into_response();
        }
        if request == ClusterRequest::Init {
            return self.init().await.map_or_else(Refusal::into_response, |()| {
                Response::Cluster(ClusterResponse::Done)
            });
        }
        if !self.is_leader() {
            if request == ClusterRequest::ClusterStatus
                && (hops >= CLUSTER_REQUEST_HOPS_MAX || self.leader().is_none())
            {
                return Response::Cluster(ClusterResponse::ClusterStatus(self.cluster_status()));
            }
            return self
                .forward(
                    Request::Cluster {
                        request,
                        hops: hops + 1,
                    },
                    hops,
                )
                .await;
        }
        match self.lead(request).await {
            Ok(response) => response,
            Err(refusal) => refusal.into_response(),
        }
    }

    /// Serves a node's heartbeat: the leader records it, others pass it on.
    pub async fn serve_heartbeat(&self, report: NodeReport, hops: u8) -> Response {
        if let Some(refusal) = self.outside_cluster(&ClusterRequest::Status) {
            return refusal.into_response();
        }
        if !self.is_leader() {
            return self
                .forward(
                    Request::Heartbeat {
                        report,
                        hops: hops + 1,
                    },
                    hops,
                )
                .await;
        }
        match self.heartbeat(report).await {
            Ok(()) => Response::Cluster(ClusterResponse::Done),
            Err(refusal) => refusal.into_response(),
        }
    }

    async fn forward(&self, request: Request, hops: u8) -> Response {
        let unavailable =
            |message: String| Refusal::new(ErrorCode::Unavailable, message).into_response();
        if hops >= CLUSTER_REQUEST_HOPS_MAX {
            return unavailable(format!(
                "member {} is not the leader and the request has been passed on {hops} times already; retry the command",
                self.name
            ));
        }
        let Some((leader_id, leader)) = self.leader() else {
            return unavailable(
                "the control plane has no leader yet: a majority of members must be up (see `tandem cluster status`)"
                    .into(),
            );
        };
        // A dead leader answers nothing until the connection times out; the election that
        // replaces it is much faster, so the wait ends as soon as leadership moves.
        let mut metrics = self.raft.metrics();
        let leadership_moved = async move {
            loop {
                if metrics.borrow_and_update().current_leader != Some(leader_id) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            answer = self.call(&leader.name, &leader.address, request) => match answer {
                Ok(response) => response,
                Err(detail) => unavailable(format!("the leader {leader} did not answer: {detail}")),
            },
            () = leadership_moved => unavailable(format!(
                "leadership moved away from {leader} while the request was on its way; retry the command"
            )),
        }
    }

    /// Calls a node or member at `address`.
    /// The answer is trusted only if the peer's certificate names `node`: an address can
    /// be reused by another node.
    async fn call(&self, node: &str, address: &str, request: Request) -> Result<Response, String> {
        self.caller.call(address, Some(node), &request).await
    }

    async fn init(&self) -> Outcome<()> {
        let members = BTreeMap::from([(
            self.id,
            Member {
                name: self.name.clone(),
                address: self.address.clone(),
            },
        )]);
        match self.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(member = %self.name, "control plane initialized with this member");
                self.wait_until_registered().await
            }
            Err(RaftError::APIError(_)) => Err(self.already_initialized()),
            Err(error) => Err(Refusal::new(ErrorCode::Internal, error.to_string())),
        }
    }

    /// Commits one command and returns the catalog's answer to it.
    async fn commit(&self, request_id: RequestId, command: Command) -> Outcome<CatalogReply> {
        let started = Instant::now();
        let write = self.raft.client_write(CatalogRequest {
            request_id,
            command,
        });
        // A leader cut off from its majority never learns that it cannot commit; the
        // timeout turns that into an answer. The entry may still commit later, and a retry
        // under the same request id is then answered from the catalog, not applied again.
        let Ok(written) =
            tokio::time::timeout(Duration::from_secs(COMMIT_TIMEOUT_SECONDS), write).await
        else {
            return Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "not committed within {COMMIT_TIMEOUT_SECONDS} seconds: a majority of members may be unreachable"
                ),
            ));
        };
        metrics::histogram!("tandem_catalog_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        match written {
            Ok(response) => response.data.map_err(Refusal::from),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "leadership moved to {}; retry the command",
                        forward.leader_node.map_or_else(
                            || "an unknown member".to_string(),
                            |member| member.to_string()
                        )
                    ),
                ))
            }
            Err(error) => Err(Refusal::new(ErrorCode::Unavailable, error.to_string())),
        }
    }

    /// Waits until this member is sure it still leads, so reads see every committed entry.
    async fn read_barrier(&self) -> Outcome<()> {
        self.raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(|error| {
                Refusal::new(
                    ErrorCode::Unavailable,
                    format!("cannot confirm leadership: {error}"),
                )
            })
    }

    async fn lead(&self, request: ClusterRequest) -> Outcome<Response> {
        let cluster = |response: ClusterResponse| Ok(Response::Cluster(response));
        match request {
            ClusterRequest::Init => unreachable!("Init is served before leadership is checked"),
            ClusterRequest::AddMember { node } => {
                self.add_member(&node).await?;
                cluster(ClusterResponse::ClusterStatus(self.cluster_status()))
            }
            ClusterRequest::RemoveMember { node } => {
                self.remove_member(&node).await?;
                cluster(ClusterResponse::ClusterStatus(self.cluster_status()))
            }
            ClusterRequest::ClusterStatus => {
                cluster(ClusterResponse::ClusterStatus(self.cluster_status()))
            }
            ClusterRequest::Status => {
                self.read_barrier().await?;
                cluster(ClusterResponse::Status(self.status()))
            }
            ClusterRequest::Noop { request_id } => {
                self.commit(request_id, Command::Noop).await?;
                cluster(ClusterResponse::Done)
            }
            ClusterRequest::VolumeCreate {
                request_id,
                name,
                node,
                size_bytes,
                track_size_bytes,
            } => {
                let node = node.ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::InvalidArgument,
                        "no node was named for the volume; pass --node NODE",
                    )
                })?;
                let record = self
                    .volume_create(request_id, &name, &node, size_bytes, track_size_bytes)
                    .await?;
                cluster(ClusterResponse::Volume(record))
            }
            ClusterRequest::VolumeDelete {
                request_id,
                name,
                force,
            } => {
                // Asked before anything is recorded, so a refused delete changes nothing;
                // once `deleting` is recorded the node closes any connection first. With
                // --force the delete is recorded even while the node is down, and the node
                // finishes it when it returns.
                if !force {
                    self.ensure_volume_node_up(&name).map_err(|refusal| {
                        Refusal::new(
                            refusal.code,
                            format!(
                                "{}; or pass --force to delete it anyway (the node deletes it when it returns)",
                                refusal.message
                            ),
                        )
                    })?;
                    self.refuse_open_volume(&name).await?;
                }
                self.commit(
                    request_id,
                    Command::VolumeDeleteBegin { name: name.clone() },
                )
                .await?;
                self.drive_volume(&name).await?;
                cluster(ClusterResponse::Deleted { name })
            }
            ClusterRequest::VolumeSetReadiness {
                request_id,
                name,
                readiness,
            } => {
                self.ensure_volume_node_up(&name)?;
                // A retry of a command that was applied gets its first answer without
                // asking the node again.
                if let Some(answer) = self
                    .catalog
                    .read(|catalog| catalog.applied_response(request_id).cloned())
                {
                    return match answer.map_err(Refusal::from)? {
                        CatalogReply::Volume(record) => cluster(ClusterResponse::Volume(record)),
                        other => Err(unexpected_reply(&other)),
                    };
                }
                // Validate, then let the node carry it out, then commit: a readiness the
                // node refuses never reaches the catalog, where the supervisor would push
                // it back to the node as the truth.
                let mut record = self
                    .catalog
                    .read(|catalog| {
                        catalog.check_readiness(&name)?;
                        Ok::<_, CatalogError>(catalog.volume(&name).cloned())
                    })
                    .map_err(Refusal::from)?
                    .ok_or_else(|| {
                        Refusal::new(
                            ErrorCode::NotFound,
                            format!("volume '{name}' does not exist"),
                        )
                    })?;
                record.readiness = readiness;
                self.push_readiness(&record).await?;
                let record = match self
                    .commit(
                        request_id,
                        Command::VolumeSetReadiness {
                            name: name.clone(),
                            readiness,
                        },
                    )
                    .await?
                {
                    CatalogReply::Volume(record) => record,
                    other => return Err(unexpected_reply(&other)),
                };
                cluster(ClusterResponse::Volume(record))
            }
            ClusterRequest::VolumeList => {
                self.read_barrier().await?;
                cluster(ClusterResponse::Volumes(
                    self.catalog
                        .read(|catalog| catalog.volumes().cloned().collect()),
                ))
            }
            ClusterRequest::VolumeShow { name } => {
                self.read_barrier().await?;
                let record = self.known_volume(&name)?;
                let node_info = match self.node_address(&record.node) {
                    Some(address) if self.ensure_node_up(&record.node).is_ok() => {
                        match self
                            .call(&record.node, &address, Request::VolumeShow { name })
                            .await
                        {
                            Ok(Response::Volume(info)) => Some(info),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                let nbd_address = self.catalog.read(|catalog| {
                    catalog
                        .node(&record.node)
                        .map(|node| node.nbd_address.clone())
                });
                cluster(ClusterResponse::VolumeDetail {
                    record,
                    node_info,
                    nbd_address,
                })
            }
            ClusterRequest::Snap {
                source,
                target,
                extents,
                overwrite,
            } => self.snap(&source, &target, extents, overwrite).await,
            ClusterRequest::Session {
                request_id,
                command,
            } => self.session_command(request_id, command).await,
            ClusterRequest::SessionList { kind } => {
                self.read_barrier().await?;
                let entries: Vec<SessionEntry> = self.catalog.read(|catalog| {
                    catalog
                        .sessions()
                        .filter(|entry| kind.is_none_or(|kind| entry.kind == kind))
                        .cloned()
                        .collect()
                });
                let mut infos = Vec::new();
                for entry in &entries {
                    infos.push(self.session_live(entry).await);
                }
                infos.sort_by_key(|info| (info.source.clone(), info.target.clone()));
                cluster(ClusterResponse::Sessions(infos))
            }
            ClusterRequest::SessionShow { kind, target } => {
                self.read_barrier().await?;
                let entry = self.known_session(kind, &target)?;
                let info = self.session_live(&entry).await;
                cluster(ClusterResponse::Session(Some(Box::new(info))))
            }
        }
    }

    fn known_session(&self, kind: SessionKind, target: &str) -> Outcome<SessionEntry> {
        self.catalog
            .read(|catalog| catalog.session(target).cloned())
            .filter(|entry| entry.kind == kind)
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::NotFound,
                    format!(
                        "no {kind} session has '{target}' as its {} (see `tandem {kind} list`)",
                        match kind {
                            SessionKind::Clone => "destination",
                            SessionKind::Mirror => "BCV",
                        }
                    ),
                )
            })
    }

    /// A session as its node reports it now, or the catalog's checkpoint when the node
    /// does not answer.
    async fn session_live(&self, entry: &SessionEntry) -> SessionInfo {
        match self.node_session(entry).await {
            NodeSession::Live(info) => *info,
            NodeSession::Gone(reason) | NodeSession::Silent(reason) => checkpoint_info(
                entry,
                Some(format!(
                    "node {} did not answer ({reason}); this is the catalog's last checkpoint",
                    entry.node
                )),
            ),
        }
    }

    /// A session command: the catalog refuses an illegal transition of a resting session
    /// before any node is asked; otherwise the source volume's node carries it out (and
    /// checks it against its own, newer, state), and the outcome is committed.
    ///
    /// Retries are harmless: a request the catalog recorded gets its first answer from the
    /// catalog, calling no node; the node is called with the request id and answers a
    /// request it carried out before with its first answer, without carrying it out again.
    async fn session_command(
        &self,
        request_id: RequestId,
        command: SessionCommand,
    ) -> Outcome<Response> {
        self.read_barrier().await?;
        if let Some(applied) = self
            .catalog
            .read(|catalog| catalog.applied_response(request_id).cloned())
        {
            applied.map_err(Refusal::from)?;
            return Ok(session_response(self.recorded_session(&command)));
        }
        // One command or reconciliation of a session at a time on this leader.
        let lock = self.session_lock(&session_lock_key(&command));
        let _one_at_a_time = lock.lock().await;
        let (node, address, source, target) = match self.session_command_checks(&command).await {
            Ok(checked) => checked,
            Err(refusal) if refusal.code == ErrorCode::IllegalState => {
                // The catalog may trail the node: a command the node carried out whose
                // recording was lost with its leader, and that the supervisor has recorded
                // since. The node then still knows this request id and its first answer.
                return match self.replayed_answer(request_id, &command).await {
                    Replayed::Answered(node, info) => {
                        let info = info.map(|info| *info);
                        self.record_session_outcome(request_id, &node, target_of(&command), info)
                            .await
                    }
                    Replayed::NotCarriedOut => Err(refusal),
                    // Refusing now could refuse a retry of a command that was carried out:
                    // the CLI retries an unavailable cluster, and the node may answer then.
                    Replayed::Unknown(reason) => Err(Refusal::new(
                        ErrorCode::Unavailable,
                        format!(
                            "{} — unless this is a retry of a command the node already carried out, which could not be asked ({reason})",
                            refusal.message
                        ),
                    )),
                };
            }
            Err(refusal) => return Err(refusal),
        };
        let response = self
            .call(
                &node,
                &address,
                Request::Session {
                    request_id,
                    command: command.clone(),
                },
            )
            .await
            .map_err(|reason| {
                Refusal::new(
                    ErrorCode::Unavailable,
                    format!("node {node} of volume '{source}' did not answer: {reason}"),
                )
            })?;
        let info = match response {
            Response::Session(info) => info,
            Response::Error { code, message } => return Err(Refusal::new(code, message)),
            other => {
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    format!("unexpected answer {other:?}"),
                ))
            }
        };
        // Tests end the process here to play a leader that dies after the node carried a
        // command out and before the catalog recorded it.
        crate::fail_points::exit_point("control-plane::session::after-node-call", command.name());
        self.record_session_outcome(request_id, &node, target, info)
            .await
    }

    /// The checks before a session command reaches its node, and where it goes: the
    /// source volume's node, its address, the source and the target.
    async fn session_command_checks(
        &self,
        command: &SessionCommand,
    ) -> Outcome<(String, String, String, Option<String>)> {
        self.refuse_taken_target(command).await?;
        let (source, target, entry) = match command {
            SessionCommand::CloneCreate { source, target, .. } => {
                (source.clone(), Some(target.clone()), None)
            }
            SessionCommand::MirrorEstablish { standard, bcv, .. } => (
                standard.clone(),
                Some(bcv.clone()),
                self.catalog.read(|catalog| catalog.session(bcv).cloned()),
            ),
            SessionCommand::MirrorRotate { standard } => (standard.clone(), None, None),
            SessionCommand::ClonePrecopy { target }
            | SessionCommand::CloneActivate { target }
            | SessionCommand::CloneTerminate { target }
            | SessionCommand::CloneCancel { target } => {
                let entry = self.known_session(SessionKind::Clone, target)?;
                (entry.source.clone(), Some(target.clone()), Some(entry))
            }
            SessionCommand::MirrorSplit { bcv: target, .. }
            | SessionCommand::MirrorReestablish { bcv: target }
            | SessionCommand::MirrorRestore { bcv: target, .. }
            | SessionCommand::MirrorCancel { bcv: target } => {
                let entry = self.known_session(SessionKind::Mirror, target)?;
                (entry.source.clone(), Some(target.clone()), Some(entry))
            }
            SessionCommand::SetRate { target, .. } => {
                let entry = self
                    .catalog
                    .read(|catalog| catalog.session(target).cloned())
                    .ok_or_else(|| {
                        Refusal::new(
                            ErrorCode::NotFound,
                            format!("no session has '{target}' as its target"),
                        )
                    })?;
                (entry.source.clone(), Some(target.clone()), Some(entry))
            }
        };
        if let (Some(entry), Some(transition)) = (&entry, transition_of(command)) {
            if entry.state.is_resting() {
                if let Err(reason) = next_state(entry.kind, entry.state, transition) {
                    return Err(Refusal::new(
                        ErrorCode::IllegalState,
                        format!(
                            "{} refused for {} {} -> {}: {reason}",
                            command.name(),
                            entry.kind,
                            entry.source,
                            entry.target
                        ),
                    ));
                }
            }
        }
        let volume = self.known_volume(&source)?;
        if let Some(target) = &target {
            self.known_volume(target)?;
        }
        self.ensure_node_up(&volume.node)?;
        let address = self.node_address(&volume.node).ok_or_else(|| {
            Refusal::new(
                ErrorCode::Unavailable,
                format!("node {} is not registered", volume.node),
            )
        })?;
        Ok((volume.node, address, source, target))
    }

    /// Commits what a node answered to a session command, under the command's request id,
    /// and answers with it.
    async fn record_session_outcome(
        &self,
        request_id: RequestId,
        node: &str,
        target: Option<String>,
        info: Option<SessionInfo>,
    ) -> Outcome<Response> {
        let record = match &info {
            Some(info) => Command::SessionRecord(entry_of(node, info)),
            None => self.session_end_record(target.unwrap_or_default()).await,
        };
        self.commit(request_id, record).await?;
        Ok(session_response(info))
    }

    fn known_volume(&self, name: &str) -> Outcome<VolumeRecord> {
        self.catalog
            .read(|catalog| catalog.volume(name).cloned())
            .ok_or_else(|| {
                CatalogError::UnknownVolume {
                    volume: name.to_string(),
                }
                .into()
            })
    }

    fn node_address(&self, node: &str) -> Option<String> {
        self.catalog
            .read(|catalog| catalog.node(node).map(|record| record.address.clone()))
    }

    async fn volume_create(
        &self,
        request_id: RequestId,
        name: &str,
        node: &str,
        size_bytes: u64,
        track_size_bytes: u32,
    ) -> Outcome<VolumeRecord> {
        self.commit(
            request_id,
            Command::VolumeCreateBegin {
                name: name.to_string(),
                node: node.to_string(),
                size_bytes,
                track_size_bytes,
            },
        )
        .await?;
        self.drive_volume(name).await?;
        self.known_volume(name)
    }

    fn volume_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.volume_locks
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Carries a volume's half-way state through on its owning node and records the
    /// result. Safe to call at any time and any number of times: a volume that is not
    /// half-way is left alone.
    async fn drive_volume(&self, name: &str) -> Outcome<()> {
        let lock = self.volume_lock(name);
        let _guard = lock.lock().await;
        // A leader cut off from its majority does not know it was replaced; acting on its
        // stale catalog could delete a volume the new leader has since recreated. Confirming
        // leadership first narrows that window to the length of one node call.
        self.read_barrier().await?;
        let Some(record) = self.catalog.read(|catalog| catalog.volume(name).cloned()) else {
            return Ok(());
        };
        let address = self.node_address(&record.node).ok_or_else(|| {
            Refusal::from(CatalogError::UnknownNode {
                node: record.node.clone(),
            })
        })?;
        let unreachable = |detail: String| {
            Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "node '{}' did not answer ({detail}); volume '{name}' stays {} in the catalog and is finished when the node returns",
                    record.node, record.state
                ),
            )
        };
        match record.state {
            VolumeState::Ready => Ok(()),
            VolumeState::Creating => {
                let created = self
                    .call(
                        &record.node,
                        &address,
                        Request::VolumeCreate {
                            name: name.to_string(),
                            size_bytes: record.size_bytes,
                            track_size_bytes: record.track_size_bytes,
                        },
                    )
                    .await
                    .map_err(unreachable)?;
                let outcome = match created {
                    Response::Volume(_) => Ok(()),
                    Response::Error {
                        code: ErrorCode::AlreadyExists,
                        ..
                    } => self.confirm_existing(&address, &record).await,
                    Response::Error { code, message }
                        if code == ErrorCode::Unavailable || code == ErrorCode::Internal =>
                    {
                        return Err(unreachable(format!("{code}: {message}")))
                    }
                    Response::Error { code, message } => Err(Refusal::new(code, message)),
                    other => return Err(unreachable(format!("unexpected answer {other:?}"))),
                };
                match outcome {
                    Ok(()) => {
                        self.commit(
                            random_request_id(),
                            Command::VolumeCreateFinish {
                                name: name.to_string(),
                            },
                        )
                        .await?;
                        Ok(())
                    }
                    Err(refusal) => {
                        tracing::warn!(volume = %name, node = %record.node, reason = %refusal.message, "the node refused the volume; rolling back");
                        self.commit(
                            random_request_id(),
                            Command::VolumeCreateRollback {
                                name: name.to_string(),
                                reason: refusal.message.clone(),
                            },
                        )
                        .await?;
                        Err(refusal)
                    }
                }
            }
            VolumeState::Deleting => {
                let deleted = self
                    .call(
                        &record.node,
                        &address,
                        Request::VolumeDelete {
                            name: name.to_string(),
                        },
                    )
                    .await
                    .map_err(unreachable)?;
                match deleted {
                    Response::Deleted { .. }
                    | Response::Error {
                        code: ErrorCode::NotFound,
                        ..
                    } => {
                        self.commit(
                            random_request_id(),
                            Command::VolumeDeleteFinish {
                                name: name.to_string(),
                            },
                        )
                        .await?;
                        Ok(())
                    }
                    Response::Error { code, message } => Err(Refusal::new(
                        code,
                        format!(
                            "node '{}' could not delete volume '{name}': {message}",
                            record.node
                        ),
                    )),
                    other => Err(unreachable(format!("unexpected answer {other:?}"))),
                }
            }
        }
    }

    /// The node already has a volume of this name: from an earlier attempt whose answer was
    /// lost, when its geometry matches; else something the catalog never asked for.
    async fn confirm_existing(&self, address: &str, record: &VolumeRecord) -> Outcome<()> {
        match self
            .call(&record.node, address, Request::VolumeShow { name: record.name.clone() })
            .await
        {
            Ok(Response::Volume(info))
                if info.size_bytes == record.size_bytes
                    && info.track_size_bytes == record.track_size_bytes =>
            {
                Ok(())
            }
            Ok(Response::Volume(info)) => Err(Refusal::new(
                ErrorCode::AlreadyExists,
                format!(
                    "node '{}' already holds a volume '{}' of {} bytes that the catalog does not know; delete it there or choose another name",
                    record.node, record.name, info.size_bytes
                ),
            )),
            Ok(other) => Err(Refusal::new(ErrorCode::Unavailable, format!("unexpected answer {other:?}"))),
            Err(detail) => Err(Refusal::new(ErrorCode::Unavailable, detail)),
        }
    }

    /// The readiness a volume's node gives it now, when the node answers.
    async fn node_readiness(&self, volume: &str) -> Option<Readiness> {
        let record = self
            .catalog
            .read(|catalog| catalog.volume(volume).cloned())?;
        let address = self.node_address(&record.node)?;
        match self
            .call(
                &record.node,
                &address,
                Request::VolumeShow {
                    name: volume.to_string(),
                },
            )
            .await
        {
            Ok(Response::Volume(info)) => Some(info.readiness),
            _ => None,
        }
    }

    async fn push_readiness(&self, record: &VolumeRecord) -> Outcome<()> {
        let address = self.node_address(&record.node).unwrap_or_default();
        match self
            .call(
                &record.node,
                &address,
                Request::VolumeSetReadiness {
                    name: record.name.clone(),
                    readiness: record.readiness,
                },
            )
            .await
        {
            Ok(Response::Volume(_)) => Ok(()),
            Ok(Response::Error { code, message }) => Err(Refusal::new(code, message)),
            Ok(other) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("unexpected answer {other:?}"),
            )),
            Err(detail) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "node '{}' did not answer ({detail}) when asked to make volume '{}' {}",
                    record.node, record.name, record.readiness
                ),
            )),
        }
    }

    async fn snap(
        &self,
        source: &str,
        target: &str,
        extents: Vec<Extent>,
        overwrite: bool,
    ) -> Outcome<Response> {
        let source_record = self.known_volume(source)?;
        self.ensure_node_up(&source_record.node)?;
        if source_record.state != VolumeState::Ready {
            return Err(CatalogError::IllegalState {
                volume: source.to_string(),
                state: source_record.state,
                action: "snapped".into(),
            }
            .into());
        }
        let track_count = source_record.size_bytes / u64::from(source_record.track_size_bytes);
        if let Some(extent) = extents.iter().find(|extent| extent.last >= track_count) {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                format!(
                    "extent {extent} does not fit volume '{source}', which has tracks 0-{}",
                    track_count.saturating_sub(1)
                ),
            ));
        }
        let created_target = match self.catalog.read(|catalog| catalog.volume(target).cloned()) {
            None => {
                // The target is created through the catalog first, so that a node dying
                // during the snap leaves a complete, empty target rather than a volume the
                // catalog does not know.
                self.volume_create(
                    random_request_id(),
                    target,
                    &source_record.node,
                    source_record.size_bytes,
                    source_record.track_size_bytes,
                )
                .await?;
                true
            }
            Some(record) if record.node != source_record.node => {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!(
                    "a snap works within one node: '{source}' is on '{}' but '{target}' is on '{}'",
                    source_record.node, record.node
                ),
                ))
            }
            Some(record) if record.state != VolumeState::Ready => {
                return Err(CatalogError::IllegalState {
                    volume: target.to_string(),
                    state: record.state,
                    action: "a snap target".into(),
                }
                .into())
            }
            Some(_) => false,
        };
        let address = self.node_address(&source_record.node).unwrap_or_default();
        let answer = self
            .call(
                &source_record.node,
                &address,
                Request::Snap {
                    source: source.to_string(),
                    target: target.to_string(),
                    extents,
                    // A target made for this snap above is empty: nothing to lose.
                    overwrite: overwrite || created_target,
                },
            )
            .await;
        match answer {
            Ok(response @ Response::Snapped { .. }) => Ok(response),
            refused => {
                if created_target {
                    // The snap did not happen, so the target made for it goes again: a
                    // refused command changes nothing.
                    self.commit(
                        random_request_id(),
                        Command::VolumeDeleteBegin {
                            name: target.to_string(),
                        },
                    )
                    .await?;
                    self.drive_volume(target).await?;
                }
                match refused {
                    Ok(Response::Error { code, message }) => Err(Refusal::new(code, message)),
                    Ok(other) => Err(Refusal::new(
                        ErrorCode::Internal,
                        format!("unexpected answer {other:?}"),
                    )),
                    Err(detail) => Err(Refusal::new(
                        ErrorCode::Unavailable,
                        format!(
                            "node '{}' did not answer the snap: {detail}",
                            source_record.node
                        ),
                    )),
                }
            }
        }
    }

    async fn add_member(&self, node: &str) -> Outcome<()> {
        self.refuse_stopped_member(node).await?;
        // A node started a moment ago registers with its first heartbeat, so "not yet
        // registered" is answered as unavailable: the CLI retries (with the same request)
        // and `add-member` right after starting the node just works.
        let record = self
            .catalog
            .read(|catalog| catalog.node(node).cloned())
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node '{node}' has not registered (yet): start it with this cluster's members in its config (`tandem status` lists the registered nodes)"
                    ),
                )
            })?;
        if !record.control_plane {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                format!("node '{node}' runs without `control_plane = true` in its config, so it cannot be a member"),
            ));
        }
        if record.health == Health::Down {
            return Err(CatalogError::NodeDown {
                node: node.to_string(),
            }
            .into());
        }
        let id = member_id(node);
        let member = Member {
            name: node.to_string(),
            address: record.address.clone(),
        };
        let membership_error = |error: RaftError<MemberId, ClientWriteError<MemberId, Member>>| {
            Refusal::new(ErrorCode::Unavailable, error.to_string())
        };
        let address = record.address.clone();
        match tokio::time::timeout(
            Duration::from_secs(MEMBERSHIP_CHANGE_TIMEOUT_SECONDS),
            self.raft.add_learner(id, member, true),
        )
        .await
        {
            Ok(added) => {
                added.map_err(membership_error)?;
            }
            Err(_) => {
                // The learner never caught up: take it out again, so a refused add-member
                // leaves the membership as it was.
                let removal = self
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false);
                if tokio::time::timeout(
                    Duration::from_secs(MEMBERSHIP_CHANGE_TIMEOUT_SECONDS),
                    removal,
                )
                .await
                .is_err()
                {
                    tracing::warn!(member = %node, "could not take the unreachable learner out again");
                }
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node '{node}' at {address} did not catch up with the log within {MEMBERSHIP_CHANGE_TIMEOUT_SECONDS} s; check that it runs, is reachable there, and was not initialized as a cluster of its own"
                    ),
                ));
            }
        }
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await?;
        tracing::info!(member = %node, "member added");
        Ok(())
    }

    async fn change_membership(&self, change: ChangeMembers<MemberId, Member>) -> Outcome<()> {
        match tokio::time::timeout(
            Duration::from_secs(MEMBERSHIP_CHANGE_TIMEOUT_SECONDS),
            self.raft.change_membership(change, false),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(Refusal::new(ErrorCode::Unavailable, error.to_string())),
            Err(_) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "the membership change did not commit within {MEMBERSHIP_CHANGE_TIMEOUT_SECONDS} s: a majority of the old and of the new members must be up (see `tandem cluster status`)"
                ),
            )),
        }
    }

    async fn remove_member(&self, node: &str) -> Outcome<()> {
        let id = member_id(node);
        let voters: BTreeSet<MemberId> = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            metrics.membership_config.membership().voter_ids().collect()
        };
        if !voters.contains(&id) {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!(
                    "node '{node}' is not a control-plane member (see `tandem cluster status`)"
                ),
            ));
        }
        if voters.len() == 1 {
            return Err(Refusal::new(
                ErrorCode::IllegalState,
                format!("'{node}' is the last member; a cluster cannot remove its last member"),
            ));
        }
        self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await?;
        tracing::info!(member = %node, "member removed");
        Ok(())
    }

    /// This member's view of the Raft group. Lags are known only on the leader, which
    /// tracks how far each follower's log matches its own.
    pub fn cluster_status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let name_of = |id: &MemberId| {
            membership
                .get_node(id)
                .map_or_else(|| format!("member-{id:016x}"), |member| member.name.clone())
        };
        let matched = |id: &MemberId| -> Option<u64> {
            if *id == metrics.id {
                return metrics.last_log_index;
            }
            metrics
                .replication
                .as_ref()?
                .get(id)
                .map(|log_id| log_id.map_or(0, |log_id| log_id.index))
        };
        let voters: Vec<MemberId> = membership.voter_ids().collect();
        let members = voters
            .iter()
            .map(|id| MemberStatus {
                name: name_of(id),
                address: membership
                    .get_node(id)
                    .map(|member| member.address.clone())
                    .unwrap_or_default(),
                lag_entries: match (
                    metrics.replication.is_some(),
                    metrics.last_log_index,
                    matched(id),
                ) {
                    (true, Some(last), Some(matched)) => Some(last.saturating_sub(matched)),
                    _ => None,
                },
            })
            .collect();
        // The commit index is the highest index a majority of voters hold.
        let commit_index = if metrics.replication.is_some() {
            let mut indexes: Vec<u64> = voters.iter().filter_map(matched).collect();
            indexes.sort_unstable_by(|left, right| right.cmp(left));
            indexes.get(voters.len() / 2).copied()
        } else {
            None
        };
        ClusterStatus {
            answered_by: self.name.clone(),
            leader: metrics.current_leader.as_ref().map(name_of),
            term: metrics.current_term,
            members,
            learners: membership.learner_ids().map(|id| name_of(&id)).collect(),
            last_log_index: metrics.last_log_index,
            commit_index,
            applied_index: metrics.last_applied.map(|log_id| log_id.index),
        }
    }

    /// Every registered node's name, site and health in this member's catalog, for the
    /// node's metrics.
    pub fn node_health(&self) -> Vec<(String, String, Health)> {
        self.catalog.read(|catalog| {
            catalog
                .nodes()
                .map(|node| (node.name.clone(), node.site.clone(), node.health))
                .collect()
        })
    }

    fn status(&self) -> CatalogStatus {
        let (sites, volumes) = self.catalog.read(|catalog| {
            let mut sites: BTreeMap<String, Vec<NodeRecord>> = BTreeMap::new();
            for node in catalog.nodes() {
                sites
                    .entry(node.site.clone())
                    .or_default()
                    .push(node.clone());
            }
            (sites, catalog.volumes().cloned().collect())
        });
        CatalogStatus {
            cluster: self.cluster_status(),
            sites,
            volumes,
        }
    }

    /// Records a node's heartbeat; registers it, or marks it up again, when needed.
    async fn heartbeat(&self, report: NodeReport) -> Outcome<()> {
        self.last_seen
            .lock()
            .insert(report.name.clone(), Instant::now());
        let known = self
            .catalog
            .read(|catalog| catalog.node(&report.name).cloned());
        let current = known.as_ref().is_some_and(|record| {
            record.health == Health::Up
                && record.site == report.site
                && record.address == report.address
                && record.nbd_address == report.nbd_address
                && record.capacity_bytes == report.capacity_bytes
                && record.control_plane == report.control_plane
        });
        if current {
            return Ok(());
        }
        let name = report.name.clone();
        self.commit(random_request_id(), Command::RegisterNode(report))
            .await?;
        tracing::info!(node = %name, "node registered or returned");
        if known.is_some_and(|record| record.health == Health::Down) {
            // A returning node may hold a readiness the catalog never committed (a command
            // whose commit failed after the node carried it out); the catalog's readiness
            // is the truth, so it is pushed again. Half-way volumes are
            // finished by the next supervision round.
            let volumes: Vec<VolumeRecord> = self.catalog.read(|catalog| {
                catalog
                    .volumes()
                    // A volume in a session has the readiness its session gives it on
                    // the node, which the catalog follows; only the others are pushed.
                    .filter(|volume| {
                        volume.node == name && catalog.check_readiness(&volume.name).is_ok()
                    })
                    .cloned()
                    .collect()
            });
            for volume in volumes {
                if let Err(refusal) = self.push_readiness(&volume).await {
                    tracing::warn!(volume = %volume.name, reason = %refusal.message, "could not restore readiness");
                }
            }
        }
        Ok(())
    }

    /// The leader's periodic duty: mark silent nodes down and finish half-way volumes on
    /// nodes that are up.
    async fn supervise_once(self: &Arc<Self>) {
        if !self.is_leader() {
            self.last_seen.lock().clear();
            return;
        }
        let now = Instant::now();
        let nodes: Vec<NodeRecord> = self
            .catalog
            .read(|catalog| catalog.nodes().cloned().collect());
        for node in nodes.iter().filter(|node| node.health == Health::Up) {
            let last_seen = *self
                .last_seen
                .lock()
                .entry(node.name.clone())
                .or_insert(now);
            if now.duration_since(last_seen) > Duration::from_millis(NODE_DOWN_AFTER_MILLISECONDS) {
                tracing::warn!(node = %node.name, "no heartbeat for {NODE_DOWN_AFTER_MILLISECONDS} ms; marking the node down");
                if let Err(refusal) = self
                    .commit(
                        random_request_id(),
                        Command::NodeDown {
                            node: node.name.clone(),
                            since_unix_seconds: now_unix_seconds(),
                        },
                    )
                    .await
                {
                    tracing::warn!(node = %node.name, reason = %refusal.message, "could not mark the node down");
                }
            }
        }
        self.refresh_sessions().await;
        let half_way: Vec<VolumeRecord> = self.catalog.read(|catalog| {
            catalog
                .volumes()
                .filter(|volume| volume.state != VolumeState::Ready)
                .filter(|volume| {
                    catalog
                        .node(&volume.node)
                        .is_some_and(|node| node.health == Health::Up)
                })
                .cloned()
                .collect()
        });
        for volume in half_way {
            // One reconciliation per volume at a time: a slow node must not collect a queue
            // of them, two a second.
            if !self.reconciling.lock().insert(volume.name.clone()) {
                continue;
            }
            let control_plane = Arc::clone(self);
            tokio::spawn(async move {
                let _done = Reconciling {
                    set: &control_plane.reconciling,
                    name: &volume.name,
                };
                match control_plane.drive_volume(&volume.name).await {
                    Ok(()) => {
                        tracing::info!(volume = %volume.name, node = %volume.node, "reconciled a half-finished volume command")
                    }
                    Err(refusal) => {
                        tracing::debug!(volume = %volume.name, reason = %refusal.message, "reconciliation will retry")
                    }
                }
            });
        }
    }
}

/// How far a running copy moves between two progress checkpoints in the catalog.
pub const SESSION_CHECKPOINT_TRACKS: u64 = 4096;

/// The catalog's record of a session as its node reported it.
fn entry_of(node: &str, info: &SessionInfo) -> SessionEntry {
    SessionEntry {
        id: info.id,
        node: node.to_string(),
        kind: info.kind,
        source: info.source.clone(),
        target: info.target.clone(),
        state: info.state,
        slots: info.slots.clone(),
        tracks_copied: info.tracks_copied,
        tracks_remaining: info.tracks_remaining,
        error: info.error.clone(),
    }
}

/// The transition a command asks of an existing session.
fn transition_of(command: &SessionCommand) -> Option<Transition> {
    match command {
        SessionCommand::ClonePrecopy { .. } => Some(Transition::Precopy),
        SessionCommand::CloneActivate { .. } => Some(Transition::Activate),
        SessionCommand::CloneTerminate { .. } => Some(Transition::Terminate),
        SessionCommand::CloneCancel { .. } => Some(Transition::Cancel),
        SessionCommand::MirrorEstablish { .. } => Some(Transition::Establish),
        SessionCommand::MirrorSplit { .. } => Some(Transition::Split),
        SessionCommand::MirrorReestablish { .. } => Some(Transition::Reestablish),
        SessionCommand::MirrorRestore { .. } => Some(Transition::Restore),
        SessionCommand::MirrorCancel { .. } => Some(Transition::Cancel),
        SessionCommand::CloneCreate { .. }
        | SessionCommand::MirrorRotate { .. }
        | SessionCommand::SetRate { .. } => None,
    }
}

fn unexpected_reply(reply: &CatalogReply) -> Refusal {
    Refusal::new(
        ErrorCode::Internal,
        format!("unexpected catalog reply {reply:?}"),
    )
}

async fn supervise(control_plane: std::sync::Weak<ControlPlane>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(SUPERVISE_INTERVAL_MILLISECONDS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(control_plane) = control_plane.upgrade() else {
            return;
        };
        control_plane.supervise_once().await;
    }
}
