//! A member's life outside the ordinary: never initialized (every command answers at once
//! that there is no control plane yet), initialized (init returns once its own node is
//! registered), and removed (it stops its Raft, says so, and starts afresh after a restart).

use super::*;

/// How long `cluster init` waits for the member's own node to register, so that a command
/// naming that node right after init finds it.
pub const INIT_REGISTRATION_TIMEOUT_SECONDS: u64 = 10;
const INIT_REGISTRATION_POLL_MILLISECONDS: u64 = 10;

/// A member that knows no leader for this long asks the other members whether it was
/// removed: longer than an election takes.
pub const REMOVAL_CHECK_AFTER_LEADERLESS_MILLISECONDS: u64 = 1_000;
pub const REMOVAL_CHECK_INTERVAL_MILLISECONDS: u64 = 500;

/// The file a removed member leaves in the node's data directory: at its next start the
/// node sets its old control-plane store aside and starts a fresh member, which the leader
/// can add again.
pub const REMOVED_MARKER_FILE: &str = "control-plane.removed";

/// What a member learned when it found itself removed.
#[derive(Debug, Clone)]
pub(super) struct Removal {
    /// The leader whose membership no longer lists this member, and its term.
    leader: String,
    leader_term: u64,
    /// This member's own term when its Raft stopped.
    own_term: u64,
}

pub(super) fn now_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Sets a removed member's store aside, so that the node starts a fresh member.
pub(super) fn retire_removed_store(data_directory: &Path) -> Result<(), Error> {
    let marker = data_directory.join(REMOVED_MARKER_FILE);
    if !marker.exists() {
        return Ok(());
    }
    let store = data_directory.join("control-plane");
    let retired = data_directory.join(format!("control-plane.removed-{}", now_unix_seconds()));
    let storage_error = |detail: String| Error::Storage {
        path: store.display().to_string(),
        detail,
    };
    if store.exists() {
        std::fs::rename(&store, &retired).map_err(|error| {
            storage_error(format!(
                "this member was removed from the control plane, but its old store cannot be set aside as {}: {error}",
                retired.display()
            ))
        })?;
    }
    std::fs::remove_file(&marker)
        .map_err(|error| storage_error(format!("cannot remove {}: {error}", marker.display())))?;
    tracing::info!(
        retired = %retired.display(),
        "this node was removed from the control plane before it restarted; it starts a fresh member that `tandem cluster add-member` can add again"
    );
    Ok(())
}

impl ControlPlane {
    /// Whether this member was never initialized and never added to a cluster: its
    /// membership is empty.
    pub fn is_uninitialized(&self) -> bool {
        if self.removed.lock().is_some() {
            return false;
        }
        let metrics = self.raft.metrics();
        let empty = metrics
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_none();
        empty
    }

    /// Whether this member found itself removed from the control plane.
    pub fn is_removed(&self) -> bool {
        self.removed.lock().is_some()
    }

    pub(super) fn removed_refusal(&self) -> Option<Refusal> {
        let removal = self.removed.lock().clone()?;
        Some(Refusal::new(
            ErrorCode::NotMember,
            format!(
                "node {} is not a control-plane member: it was removed from the control plane (leader {}, term {}) and its Raft stopped at term {}; it serves on as a plain node. To make it a member again, restart it (it then starts a fresh member) and run `tandem cluster add-member {}`",
                self.name, removal.leader, removal.leader_term, removal.own_term, self.name
            ),
        ))
    }

    /// The refusal of a request this member cannot serve because it is in no cluster: it
    /// was removed, or it was never initialized (then only `Init` and `ClusterStatus`, which
    /// shows the empty membership, are served).
    pub(super) fn outside_cluster(&self, request: &ClusterRequest) -> Option<Refusal> {
        if let Some(refusal) = self.removed_refusal() {
            return Some(refusal);
        }
        let served_anyway = matches!(
            request,
            ClusterRequest::Init | ClusterRequest::ClusterStatus
        );
        (!served_anyway && self.is_uninitialized()).then(|| {
            Refusal::new(
                ErrorCode::NotInitialized,
                advice::NOT_INITIALIZED_MESSAGE.to_string(),
            )
        })
    }

    /// Returns once this member knows a leader (at once when it does now).
    pub async fn leader_known(&self) {
        let mut metrics = self.raft.metrics();
        loop {
            if self.knows_leader() {
                return;
            }
            if metrics.changed().await.is_err() {
                // Raft stopped: no leader will be known again.
                std::future::pending::<()>().await;
            }
        }
    }

    pub(super) fn already_initialized(&self) -> Refusal {
        let status = self.cluster_status();
        Refusal::new(
            ErrorCode::IllegalState,
            format!(
                "member {} is already initialized (leader {}, term {}); a cluster is initialized once: add members with `tandem cluster add-member NODE`",
                self.name,
                status.leader.as_deref().unwrap_or("none at the moment"),
                status.term
            ),
        )
    }

    /// Waits until this member's own node is registered in the catalog, so that a
    /// command naming it right after `cluster init` finds it.
    pub(super) async fn wait_until_registered(&self) -> Outcome<()> {
        let deadline = Instant::now() + Duration::from_secs(INIT_REGISTRATION_TIMEOUT_SECONDS);
        loop {
            let registered = self.catalog.read(|catalog| {
                catalog
                    .node(&self.name)
                    .is_some_and(|node| node.health == Health::Up)
            });
            if registered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the control plane is initialized, but node {} did not register with it within {INIT_REGISTRATION_TIMEOUT_SECONDS} s; commands that name it fail until it does (see its log and `tandem status`)",
                        self.name
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(INIT_REGISTRATION_POLL_MILLISECONDS)).await;
        }
    }

    /// Refuses to add a node whose member was removed and stopped: it would never answer
    /// Raft again until the node restarts with a fresh member.
    pub(super) async fn refuse_stopped_member(&self, node: &str) -> Outcome<()> {
        let Some(address) = self.node_address(node) else {
            return Ok(());
        };
        let request = Request::Cluster {
            request: ClusterRequest::ClusterStatus,
            hops: CLUSTER_REQUEST_HOPS_MAX,
        };
        match self.call(node, &address, request).await {
            Ok(Response::Error {
                code: ErrorCode::NotMember,
                ..
            }) => Err(Refusal::new(
                ErrorCode::IllegalState,
                format!(
                    "node '{node}' was removed from the control plane earlier and its member is stopped; restart the node (it then starts a fresh member) and run `tandem cluster add-member {node}` again"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Asks the other members of this member's last known membership whether their leader
    /// still counts this member in. Only a leader's own answer counts, and only from a term
    /// at least as new as the entries this member applied, so a stale leader cut off
    /// before this member joined cannot make it stop.
    pub(super) async fn confirm_removal(&self) -> Option<Removal> {
        let (peers, applied_term, own_term) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let peers: Vec<Member> = metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(_, member)| member.clone())
                .collect();
            let applied_term = metrics
                .last_applied
                .map_or(0, |log_id| log_id.leader_id.get_term());
            (peers, applied_term, metrics.current_term)
        };
        for peer in peers {
            let request = Request::Cluster {
                request: ClusterRequest::ClusterStatus,
                hops: CLUSTER_REQUEST_HOPS_MAX,
            };
            let Ok(Response::Cluster(ClusterResponse::ClusterStatus(status))) =
                self.call(&peer.name, &peer.address, request).await
            else {
                continue;
            };
            let leads = status.leader.as_deref() == Some(status.answered_by.as_str());
            let counts_me = status.members.iter().any(|member| member.name == self.name)
                || status.learners.contains(&self.name);
            if leads && status.term >= applied_term && !counts_me {
                return Some(Removal {
                    leader: status.answered_by,
                    leader_term: status.term,
                    own_term,
                });
            }
        }
        None
    }

    /// Stops this removed member's Raft (so it no longer campaigns) and leaves the marker
    /// that gives the node a fresh member at its next start.
    pub(super) async fn stop_as_removed(&self, removal: Removal) {
        let marker = self.data_directory.join(REMOVED_MARKER_FILE);
        if let Err(error) = std::fs::write(&marker, format!("{removal:?}\n")) {
            tracing::warn!(%error, marker = %marker.display(), "cannot leave the removed-member marker; delete the control-plane directory before restarting this node");
        }
        tracing::warn!(
            member = %self.name,
            leader = %removal.leader,
            term = removal.leader_term,
            "this node was removed from the control plane: its Raft member stops and the node serves on as a plain node; restart it to let `tandem cluster add-member {}` add it again",
            self.name
        );
        *self.removed.lock() = Some(removal);
        self.shutdown().await;
    }
}

/// Watches for this member's removal from the control plane. A removed member never
/// receives the membership that leaves it out (the leader stops replicating to it first),
/// so it would campaign for ever; it asks the others once it has been leaderless a while.
///
/// A member that still believes it leads is in the same place when it was removed after
/// it lost its majority (a paused or cut-off leader, removed by the leader elected
/// meanwhile): the others refuse its messages as a non-member's, so it never hears of the
/// newer term and would lead a cluster of one for ever, while every request sent to it
/// waited for commits that cannot come (found by the chaos schedule). So a leader that
/// cannot confirm its leadership counts as leaderless here.
pub(super) async fn watch_removal(control_plane: std::sync::Weak<ControlPlane>) {
    let mut ticker =
        tokio::time::interval(Duration::from_millis(REMOVAL_CHECK_INTERVAL_MILLISECONDS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leaderless_since: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let Some(control_plane) = control_plane.upgrade() else {
            return;
        };
        if control_plane.is_removed() {
            return;
        }
        let leads_or_follows = if control_plane.is_leader() {
            tokio::time::timeout(
                Duration::from_millis(REMOVAL_CHECK_INTERVAL_MILLISECONDS),
                control_plane.read_barrier(),
            )
            .await
            .is_ok_and(|confirmed| confirmed.is_ok())
        } else {
            control_plane.knows_leader()
        };
        if leads_or_follows || control_plane.is_uninitialized() {
            leaderless_since = None;
            continue;
        }
        let since = *leaderless_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_millis(REMOVAL_CHECK_AFTER_LEADERLESS_MILLISECONDS) {
            continue;
        }
        if let Some(removal) = control_plane.confirm_removal().await {
            control_plane.stop_as_removed(removal).await;
            return;
        }
    }
}
