//! This member's Raft instance as the rest of the member uses it: serving Raft messages
//! from other members, who leads and who is a member, initializing a cluster, committing
//! a command, and confirming leadership before a read. Every other concern reaches the
//! catalog through `commit` and `read_barrier` here, so their timeouts and the answers a
//! lost leadership gives are the same for all of them.

use super::*;

impl ControlPlane {
    /// Serves a Raft message from another member.
    pub async fn serve_raft(&self, peer: &Peer, bytes: &[u8]) -> Response {
        if let Some(refusal) = self.removed_refusal() {
            return refusal.into_response();
        }
        network::serve(&self.raft, peer, bytes).await
    }

    pub(super) fn leader(&self) -> Option<(MemberId, Member)> {
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

    pub(super) fn is_leader(&self) -> bool {
        self.leader().is_some_and(|(leader, _)| leader == self.id)
    }

    /// Whether `name` is a voter or learner of this member's current membership.
    pub fn is_member(&self, name: &str) -> bool {
        let metrics = self.raft.metrics();
        let membership = metrics.borrow().membership_config.clone();
        let is_member = membership.nodes().any(|(_, member)| member.name == name);
        is_member
    }

    pub(super) async fn init(&self) -> Outcome<()> {
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
    pub(super) async fn commit(
        &self,
        request_id: RequestId,
        command: Command,
    ) -> Outcome<CatalogReply> {
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
    pub(super) async fn read_barrier(&self) -> Outcome<()> {
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
}
