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
//!
//! This file holds what every concern shares: the timing constants, `Refusal`, the
//! `ControlPlane` itself with its start and shutdown, and the supervision loop. The rest is
//! one file per concern, each an `impl ControlPlane` of its own: `raft` (the Raft
//! instance, commits, leadership), `routing` (serving requests here or at the leader, and
//! the leader's dispatch), `volumes`, `snaps`, `sessions` and `membership` (the leader's
//! commands), `status` (what a member reports), `supervision` (heartbeats, silent nodes,
//! half-way volumes), `checks` (refusals before any node is asked) and `lifecycle` (a
//! member never initialized, or removed).

use crate::advice;
mod checks;
mod gsnap;
mod lifecycle;
mod membership;
mod raft;
mod routing;
mod saga;
mod sessions;
mod snaps;
mod status;
mod supervision;
mod volumes;

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
    derived_request_id, member_id, CatalogError, CatalogReply, CatalogRequest, CatalogStatus,
    ClusterRequest, ClusterResponse, ClusterStatus, Command, Health, Member, MemberId,
    MemberStatus, NodeRecord, NodeReport, RequestId, SessionEntry, VolumeRecord, VolumeState,
    CLUSTER_REQUEST_HOPS_MAX,
};
use protocol::messages::{ErrorCode, Extent, Readiness, Request, Response};
use protocol::session::{
    next_state, SessionCommand, SessionInfo, SessionKind, SessionState, Transition,
};
use protocol::transport::Peer;
pub use sessions::{
    RESTING_SESSION_RECONCILE_INTERVAL_MILLISECONDS, SESSION_CHECKPOINT_TRACKS,
    SESSION_GONE_GRACE_MILLISECONDS,
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
/// How long a remove-member waits for each remaining member to answer before it counts
/// that member as down.
pub const MEMBER_PROBE_TIMEOUT_MILLISECONDS: u64 = 1_000;
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
    /// One lock per intent, so the command that began it and the supervisor never call
    /// its node at once.
    intent_locks: Mutex<HashMap<RequestId, Arc<tokio::sync::Mutex<()>>>>,
    /// Intents the supervisor is driving now.
    driving_intents: Mutex<HashSet<RequestId>>,
    /// Gsnap jobs the supervisor is driving now.
    driving_jobs: Mutex<HashSet<protocol::gsnap::JobId>>,
    /// Wakes the supervisor to drive the jobs at once (a new job answered after its
    /// snap), rather than at its next round.
    jobs_wakeup: Arc<tokio::sync::Notify>,
    /// What the leader saw of each running job's progress, for `stalled`.
    job_watch: Mutex<HashMap<protocol::gsnap::JobId, gsnap::JobWatch>>,
    /// One lock per session (by target volume), so a command and the supervisor's
    /// reconciliation never act on one session at once.
    session_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The highest percent this member showed of each session's copy, with the state it
    /// was in: a later answer of the same copy never shows less (a catalog checkpoint
    /// while the node does not answer, or the node's reading after it restarted).
    shown_percent:
        Mutex<HashMap<protocol::session::SessionId, (protocol::session::SessionState, f64)>>,
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
            intent_locks: Mutex::new(HashMap::new()),
            driving_intents: Mutex::new(HashSet::new()),
            driving_jobs: Mutex::new(HashSet::new()),
            jobs_wakeup: Arc::new(tokio::sync::Notify::new()),
            job_watch: Mutex::new(HashMap::new()),
            session_locks: Mutex::new(HashMap::new()),
            shown_percent: Mutex::new(HashMap::new()),
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
    let Some(jobs_wakeup) = control_plane
        .upgrade()
        .map(|control_plane| control_plane.jobs_wakeup.clone())
    else {
        return;
    };
    loop {
        let woken = tokio::select! {
            _ = ticker.tick() => false,
            _ = jobs_wakeup.notified() => true,
        };
        let Some(control_plane) = control_plane.upgrade() else {
            return;
        };
        if woken {
            if control_plane.is_leader() {
                control_plane.drive_jobs();
            }
        } else {
            control_plane.supervise_once().await;
        }
    }
}
