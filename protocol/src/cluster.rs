//! The control plane's vocabulary: catalog records, the commands that change them, the
//! errors that refuse them, and the requests that carry them between the CLI, nodes and
//! control-plane members.
//!
//! These are plain data. What a command means is decided by the catalog state machine in
//! the `control-plane` crate; keeping the types here lets the CLI and nodes speak them
//! without depending on Raft.

use crate::messages::{Extent, Readiness, VolumeInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Raft's name for a member. It is derived from the member's node name, so the same
/// name always gets the same id and a certificate name can be checked against it.
pub type MemberId = u64;

/// The id a node name has as a control-plane member: 64-bit FNV-1a of the name.
/// FNV is stable across releases and platforms, which a hash from std is not.
pub fn member_id(node_name: &str) -> MemberId {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    node_name.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// How Raft reaches a member: its node name (which its certificate must carry) and the
/// QUIC address it listens on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub address: String,
}

impl fmt::Display for Member {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}@{}", self.name, self.address)
    }
}

/// How many times a cluster request may be passed on: a node that is no member (or a
/// member not yet in a cluster) to a member, and a member to its leader.
pub const CLUSTER_REQUEST_HOPS_MAX: u8 = 2;

/// Identifies one client request so that a retry is applied once. The CLI draws it at
/// random once per command and keeps it across retries.
pub type RequestId = u128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    Up,
    Down,
}

impl fmt::Display for Health {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Health::Up => "up",
            Health::Down => "down",
        })
    }
}

/// What a node tells the control plane about itself when it registers and on every
/// heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub site: String,
    pub address: String,
    pub nbd_address: String,
    pub capacity_bytes: u64,
    /// Whether this node's process can serve as a control-plane member.
    pub control_plane: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub site: String,
    pub address: String,
    pub nbd_address: String,
    pub capacity_bytes: u64,
    pub control_plane: bool,
    pub health: Health,
    /// When the leader marked the node down (Unix seconds, by the leader's clock); `None`
    /// while it is up.
    pub down_since_unix_seconds: Option<u64>,
}

/// Where a volume is in its life. `Creating` and `Deleting` are the half-way states of a
/// command whose owning node has not confirmed yet; the leader's reconciler finishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VolumeState {
    Creating,
    Ready,
    Deleting,
}

impl fmt::Display for VolumeState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Deleting => "deleting",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub node: String,
    pub size_bytes: u64,
    pub track_size_bytes: u32,
    pub state: VolumeState,
    pub readiness: Readiness,
}

/// One change to the catalog. Every command is validated against the whole catalog
/// before it changes anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records a node, or updates its addresses and capacity. Its site exists from then on.
    RegisterNode(NodeReport),
    SetNodeHealth {
        node: String,
        health: Health,
    },
    VolumeCreateBegin {
        name: String,
        node: String,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    VolumeCreateFinish {
        name: String,
    },
    /// The owning node refused the volume: it is removed as if never asked for.
    VolumeCreateRollback {
        name: String,
        reason: String,
    },
    VolumeDeleteBegin {
        name: String,
    },
    VolumeDeleteFinish {
        name: String,
    },
    VolumeSetReadiness {
        name: String,
        readiness: Readiness,
    },
    /// Records a copy session as its source node reports it (created, or changed state).
    SessionRecord(SessionEntry),
    /// The session of this target ended (terminated or cancelled).
    SessionForget {
        target: String,
    },
    /// Does nothing but commit; used to measure commit latency and to confirm leadership.
    Noop,
    /// The session of this target ended, and its target's node reports this readiness for
    /// it now. The catalog records what the node did rather than deriving it from the
    /// session's last recorded state, which can be a poll behind the node (a rotated mirror
    /// cancelled while its catalog entry still said syncing).
    SessionEnded {
        target: String,
        target_readiness: Readiness,
    },
    /// Marks a node down as of `since_unix_seconds`, the leader's clock when it gave up
    /// waiting for heartbeats: time enters the catalog only as data in a command.
    NodeDown {
        node: String,
        since_unix_seconds: u64,
    },
    /// The leader is about to ask a node for a step of work: recorded before the call,
    /// so that whatever fails, the step is finished (by the command or, after a leader
    /// change or the node's return, by the supervisor) under the same id.
    IntentBegin(Intent),
    /// The node answered the intent `id` (or refused it): the intent ends and its result
    /// is applied. Finishing an intent that is no longer open changes nothing.
    IntentFinish {
        id: RequestId,
        result: IntentResult,
    },
    /// Records a new gsnap job (the catalog gives it the next id), after checking its
    /// volumes, nodes and extents against the whole catalog.
    GsnapCreate(crate::gsnap::GsnapJob),
    /// Replaces the record of a running job with its next state (a step started or done,
    /// progress, a cancel asked for, the end).
    GsnapRecord(crate::gsnap::GsnapJob),
    /// Asks a running job to stop: judged against the job as recorded now (refused once
    /// its activation began), and only the request is recorded, so neither the driver nor
    /// the cancel can write over what the other recorded.
    GsnapCancel {
        job: crate::gsnap::JobId,
    },
    /// Records a round of a running job's verification.
    GsnapVerified {
        job: crate::gsnap::JobId,
        round: crate::gsnap::VerifyRound,
    },
    /// Records what a running job sends, once both nodes rotated their lineages: every
    /// track, or only those changed since the last job of the same P and S.
    GsnapSend {
        job: crate::gsnap::JobId,
        send: crate::gsnap::JobSend,
    },
    /// Drops the lineage of P and S (`tandem gsnap forget`): the next job sends everything.
    GsnapForget {
        source: String,
        target: String,
    },
}

/// A step of the leader's work on one node, between the commit that records it and the
/// commit of the node's answer. Its id is the request id the node is called with, so the
/// node carries it out once however often it is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub id: RequestId,
    pub node: String,
    pub call: IntentCall,
    /// The leader's clock when the intent was recorded.
    pub begun_unix_seconds: u64,
}

/// What an intent asks of its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntentCall {
    /// A pointer snapshot of `source` into `target`, on the node of both. With `create`,
    /// the target does not exist yet: the catalog records it (`creating`) with the
    /// intent, and the node makes it in the snap's own write.
    Snap {
        source: String,
        target: String,
        extents: Vec<Extent>,
        overwrite: bool,
        create: Option<NewVolume>,
    },
    /// [`IntentCall::Snap`] with `source`'s `extents` landing, in order, on `target`'s
    /// `target_extents` (a gsnap whose extents start elsewhere on S; appended, so logs
    /// and snapshots written before it still decode). A created target has `create`'s
    /// geometry.
    SnapAt {
        source: String,
        target: String,
        extents: Vec<Extent>,
        target_extents: Vec<Extent>,
        overwrite: bool,
        create: Option<NewVolume>,
    },
    /// [`IntentCall::SnapAt`] that also rotates the source's lineage `lineage` in the
    /// snap's own write (a gsnap's snap of P; appended).
    SnapLineage {
        source: String,
        target: String,
        extents: Vec<Extent>,
        target_extents: Vec<Extent>,
        overwrite: bool,
        create: Option<NewVolume>,
        lineage: String,
    },
    /// A copy-session command, carried out by the node of the session's source (appended).
    Session {
        command: crate::session::SessionCommand,
    },
    /// A new volume on `node`: the catalog records it (`creating`) with the intent and
    /// makes it ready with the node's answer, or removes it when the node refused
    /// (appended).
    VolumeCreate {
        name: String,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    /// The end of a volume: the catalog marks it `deleting` with the intent and removes
    /// it with the node's answer, or makes it ready again when the node refused
    /// (appended).
    VolumeDelete { name: String },
}

impl IntentCall {
    /// The volume the intent works on; one intent at a time per volume.
    pub fn owner(&self) -> &str {
        match self {
            IntentCall::Snap { target, .. }
            | IntentCall::SnapAt { target, .. }
            | IntentCall::SnapLineage { target, .. } => target,
            IntentCall::Session { command } => command.session_key(),
            IntentCall::VolumeCreate { name, .. } | IntentCall::VolumeDelete { name } => name,
        }
    }

    /// The call's name, for logs and fail points.
    pub fn name(&self) -> &'static str {
        match self {
            IntentCall::Snap { .. }
            | IntentCall::SnapAt { .. }
            | IntentCall::SnapLineage { .. } => "snap",
            IntentCall::Session { command } => command.name(),
            IntentCall::VolumeCreate { .. } => "volume create",
            IntentCall::VolumeDelete { .. } => "volume delete",
        }
    }
}

/// The geometry of a volume an intent creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVolume {
    pub size_bytes: u64,
    pub track_size_bytes: u32,
}

/// What the node answered an intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntentResult {
    Snapped {
        target_info: VolumeInfo,
        elapsed_micros: u64,
    },
    /// The node refused: it changed nothing, and neither does the intent.
    Refused {
        code: crate::messages::ErrorCode,
        message: String,
    },
    /// A session command was carried out: the session as it left it, or `None` when it
    /// ended the session, with the readiness the target's node reports for the target
    /// then (`None`: the target's node did not say; the catalog forgets the session and
    /// keeps the readiness it had). Appended.
    Session {
        entry: Option<SessionEntry>,
        target_readiness: Option<Readiness>,
    },
    /// The node made the volume (or holds one of the intent's geometry from an attempt
    /// whose answer was lost). Appended.
    VolumeCreated { info: VolumeInfo },
    /// The node no longer holds the volume. Appended.
    VolumeDeleted,
}

/// A copy session as the catalog records it. The source volume's node runs the session
/// and keeps its bits; the catalog holds where it is, so a new leader and every member
/// know which sessions exist, and refuses what would break one (deleting its volumes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    /// The source node's id of the session.
    pub id: crate::session::SessionId,
    /// The node that runs it: the node of the source volume.
    pub node: String,
    pub kind: crate::session::SessionKind,
    pub source: String,
    pub target: String,
    pub state: crate::session::SessionState,
    pub slots: Vec<u8>,
    /// The progress checkpoint: tracks copied so far and still to copy.
    pub tracks_copied: u64,
    pub tracks_remaining: u64,
    pub error: Option<String>,
}

/// The request id of one step of the work a request does (the target a snap creates,
/// the node's snap): the same for every attempt of that request, so each step is carried
/// out once however often the request is retried, and different for every step and
/// request. FNV-1a, 128 bits, over the request id and the step's name.
pub fn derived_request_id(request_id: RequestId, step: &str) -> RequestId {
    const OFFSET_BASIS: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    request_id
        .to_be_bytes()
        .iter()
        .chain(step.as_bytes())
        .fold(OFFSET_BASIS, |hash, byte| {
            (hash ^ u128::from(*byte)).wrapping_mul(PRIME)
        })
}

/// A command as it travels through Raft, with the id that makes retries harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRequest {
    pub request_id: RequestId,
    pub command: Command,
}

impl fmt::Display for CatalogRequest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:032x}: {:?}", self.request_id, self.command)
    }
}

/// Why the catalog refused a command. Each refusal leaves the catalog unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CatalogError {
    #[error("node '{node}' is not registered: start it with this cluster's members in its config, or check the name with `tandem status`")]
    UnknownNode { node: String },
    #[error("volume '{volume}' does not exist: `tandem volume list` shows the volumes")]
    UnknownVolume { volume: String },
    #[error("a volume named '{volume}' already exists on node '{node}': names are unique across the cluster")]
    VolumeExists { volume: String, node: String },
    #[error("volume '{volume}' of {size_bytes} bytes does not fit on node '{node}': {free_bytes} of its {capacity_bytes} bytes are unprovisioned")]
    DoesNotFit {
        volume: String,
        node: String,
        size_bytes: u64,
        free_bytes: u64,
        capacity_bytes: u64,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("node '{node}' is down; place the volume on a node that is up")]
    NodeDown { node: String },
    #[error("volume '{volume}' is {state}, so it cannot be {action}")]
    IllegalState {
        volume: String,
        state: VolumeState,
        action: String,
    },
    #[error("volume '{volume}' takes part in the {kind} session {source_volume} -> {target}; end it first (`tandem clone terminate {target}` or `tandem mirror cancel {target}`)")]
    VolumeInSession {
        volume: String,
        kind: crate::session::SessionKind,
        source_volume: String,
        target: String,
    },
    #[error("the {kind} session of '{target}' cannot go from {from} to {to}")]
    SessionTransition {
        kind: crate::session::SessionKind,
        target: String,
        from: crate::session::SessionState,
        to: crate::session::SessionState,
    },
    #[error("'{target}' is already the target of the {kind} session from '{source_volume}'")]
    SessionTargetTaken {
        kind: crate::session::SessionKind,
        source_volume: String,
        target: String,
    },
    #[error(
        "site '{site}' of node '{node}' cannot change to '{requested}': a node stays in its site"
    )]
    SiteChange {
        node: String,
        site: String,
        requested: String,
    },
    #[error("the readiness of volume '{volume}' follows the {kind} session {source_volume} -> {target}, so it cannot be set by hand: {advice}")]
    ReadinessFollowsSession {
        volume: String,
        kind: crate::session::SessionKind,
        source_volume: String,
        target: String,
        advice: String,
    },
    #[error("volume '{volume}' has a {call} under way; wait for it to finish (`tandem volume show {volume}`)")]
    IntentUnderWay { volume: String, call: String },
    #[error("there is no gsnap job {job}: `tandem gsnap list` shows the jobs")]
    UnknownJob { job: u64 },
    #[error("gsnap job {job} has ended; it cannot change any more")]
    JobEnded { job: u64 },
    #[error("volume '{volume}' takes part in the running gsnap job {job}; wait for it or cancel it (`tandem gsnap cancel {job}`)")]
    VolumeInJob { volume: String, job: u64 },
    #[error("{reason}")]
    CancelRefused { job: u64, reason: String },
    #[error("volume '{volume}' keeps the lineage of gsnap jobs from '{source_volume}' to '{target}', which only its hosts' writes may change; run `tandem gsnap forget {source_volume} {target}` first (the next gsnap then sends every track)")]
    VolumeInLineage {
        volume: String,
        source_volume: String,
        target: String,
    },
    #[error("there is no lineage of gsnap jobs from '{source_volume}' to '{target}': `tandem gsnap list` shows the jobs")]
    UnknownLineage {
        source_volume: String,
        target: String,
    },
}

/// What an applied command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogReply {
    Done,
    Node(NodeRecord),
    Volume(VolumeRecord),
    /// The result an intent finished with.
    IntentFinished(IntentResult),
    /// A gsnap job as recorded.
    Job(Box<crate::gsnap::GsnapJob>),
}

/// The state machine's answer to one log entry: the reply, or the refusal.
pub type CatalogResponse = Result<CatalogReply, CatalogError>;

/// A member's view of the Raft group, as `tandem cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The member that answered.
    pub answered_by: String,
    pub leader: Option<String>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
    pub learners: Vec<String>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub address: String,
    /// How many entries this member's log is behind the leader's; known on the leader only.
    pub lag_entries: Option<u64>,
}

/// Everything `tandem status` shows: the Raft group, nodes by site, and volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogStatus {
    pub cluster: ClusterStatus,
    pub sites: BTreeMap<String, Vec<NodeRecord>>,
    pub volumes: Vec<VolumeRecord>,
}

/// A request the CLI (or a node acting for it) sends to any node; nodes forward it to a
/// member and members to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// Bootstrap a one-member cluster on the node that receives it (no forwarding).
    Init,
    AddMember {
        node: String,
    },
    RemoveMember {
        node: String,
    },
    ClusterStatus,
    Status,
    VolumeCreate {
        request_id: RequestId,
        name: String,
        /// The owning node; `None` places the volume on the node that first received the request.
        node: Option<String>,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    VolumeDelete {
        request_id: RequestId,
        name: String,
        /// Disconnect hosts that have the volume open instead of refusing the delete.
        force: bool,
    },
    VolumeSetReadiness {
        request_id: RequestId,
        name: String,
        readiness: Readiness,
    },
    VolumeList,
    VolumeShow {
        name: String,
    },
    /// A pointer snapshot. A retry under the same `request_id` (the CLI's, while the
    /// cluster answers unavailable) takes the image of the first instant, not a newer one.
    Snap {
        request_id: RequestId,
        source: String,
        target: String,
        extents: Vec<Extent>,
        /// Replace the data of an existing target that is not a snapshot of `source`.
        overwrite: bool,
    },
    /// A copy-session command: the leader sends it to the source volume's node and
    /// records the outcome.
    Session {
        request_id: RequestId,
        command: crate::session::SessionCommand,
    },
    /// The sessions in the catalog, with their nodes' live progress when they answer.
    SessionList {
        kind: Option<crate::session::SessionKind>,
    },
    SessionShow {
        kind: crate::session::SessionKind,
        target: String,
    },
    /// Commits a no-op command; answers once it is applied.
    Noop {
        request_id: RequestId,
    },
    /// Starts a gsnap job; answers with the job as recorded.
    Gsnap {
        request_id: RequestId,
        spec: crate::gsnap::GsnapSpec,
    },
    GsnapList,
    GsnapShow {
        job: crate::gsnap::JobId,
    },
    GsnapCancel {
        request_id: RequestId,
        job: crate::gsnap::JobId,
    },
    /// Drops the lineage of `source` and `target`: both nodes free its slots, and the
    /// next job of the two sends every track.
    GsnapForget {
        request_id: RequestId,
        source: String,
        target: String,
    },
}

/// Fault injection in our own network layer, per peer node: the kernel here has no
/// netem. Accepted only by nodes started with fault injection enabled, and only from the
/// admin certificate. The rule covers every call between this node and the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Drop every call to and from this peer (named by its node name), as a partition
    /// would: no answer, so the caller waits out its own timeout.
    pub drop: bool,
    /// Delay every call to this peer by this long.
    pub delay_milliseconds: u64,
    /// Drop this percent of the calls to and from this peer, each drawn on its own (a
    /// lossy link rather than a cut one).
    pub loss_percent: u8,
}

impl FaultRule {
    /// Whether one call meets a drop, given a draw in `0..100` for the loss.
    pub fn drops_call(&self, draw: u8) -> bool {
        self.drop || draw < self.loss_percent
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClusterResponse {
    Done,
    ClusterStatus(ClusterStatus),
    Status(CatalogStatus),
    Volume(VolumeRecord),
    /// The catalog record and, when the owning node answered, its own view.
    VolumeDetail {
        record: VolumeRecord,
        node_info: Option<VolumeInfo>,
        /// Where hosts reach the volume: its node's NBD address (`nbd://ADDRESS/NAME`).
        nbd_address: Option<String>,
    },
    Volumes(Vec<VolumeRecord>),
    Deleted {
        name: String,
    },
    /// A session after a command (`None`: the command ended it), or as shown.
    Session(Option<Box<crate::session::SessionInfo>>),
    Sessions(Vec<crate::session::SessionInfo>),
    Job(Box<crate::gsnap::GsnapJob>),
    Jobs(Vec<crate::gsnap::GsnapJob>),
    /// Jobs as `gsnap show` and `gsnap list` show them.
    JobView(Box<crate::gsnap::GsnapJobView>),
    JobViews(Vec<crate::gsnap::GsnapJobView>),
}

impl CatalogError {
    /// The wire error code scripts branch on.
    pub fn code(&self) -> crate::messages::ErrorCode {
        use crate::messages::ErrorCode;
        match self {
            CatalogError::UnknownNode { .. } | CatalogError::UnknownVolume { .. } => {
                ErrorCode::NotFound
            }
            CatalogError::VolumeExists { .. } => ErrorCode::AlreadyExists,
            CatalogError::DoesNotFit { .. } => ErrorCode::LimitExceeded,
            CatalogError::Invalid { .. } => ErrorCode::InvalidArgument,
            // Not "unavailable": the refusal is remembered under the request id, so retrying
            // the same request cannot succeed; the user chooses another node.
            CatalogError::NodeDown { .. }
            | CatalogError::IllegalState { .. }
            | CatalogError::VolumeInSession { .. }
            | CatalogError::ReadinessFollowsSession { .. }
            | CatalogError::SessionTransition { .. }
            | CatalogError::SessionTargetTaken { .. }
            | CatalogError::SiteChange { .. }
            | CatalogError::IntentUnderWay { .. }
            | CatalogError::JobEnded { .. }
            | CatalogError::VolumeInJob { .. }
            | CatalogError::CancelRefused { .. }
            | CatalogError::VolumeInLineage { .. } => ErrorCode::IllegalState,
            CatalogError::UnknownJob { .. } | CatalogError::UnknownLineage { .. } => {
                ErrorCode::NotFound
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_stable_and_distinct() {
        // Fixed values: a change of hash would orphan every member of a running cluster.
        assert_eq!(member_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(member_id("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(member_id("node-a"), member_id("node-b"));
    }

    #[test]
    fn a_step_keeps_its_id_across_attempts_and_steps_and_requests_differ() {
        let snap = super::derived_request_id(1, "snap");
        assert_eq!(snap, super::derived_request_id(1, "snap"));
        assert_ne!(snap, super::derived_request_id(1, "snap target"));
        assert_ne!(snap, super::derived_request_id(2, "snap"));
        assert_ne!(snap, 1);
    }
}
