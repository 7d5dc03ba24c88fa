//! Refusals the leader gives before it asks any node or commits anything: a node that is
//! down, a session target that is taken, a volume hosts have open. Each says what the
//! volume or node is and what to do.

use super::*;

/// How long the leader waits for the target's node to say what readiness a session left
/// on its volume; a node that does not answer was not reached by the end either.
const TARGET_READINESS_TIMEOUT_SECONDS: u64 = 2;

impl ControlPlane {
    /// What the catalog records when a session ended on its source's node: the readiness
    /// the target's node reports now (see [`ControlPlane::ended_target_readiness`]).
    pub(super) async fn session_end_record(&self, target: String) -> Command {
        match self.ended_target_readiness(&target).await {
            Some(target_readiness) => Command::SessionEnded {
                target,
                target_readiness,
            },
            None => Command::SessionForget { target },
        }
    }

    /// The readiness the node of a session's target reports once the session ended;
    /// `None` when that node does not know the volume. A target whose node is down or
    /// does not answer was ended without it (a mirror cancelled while its BCV's node is
    /// lost): that volume keeps the not-ready it had as a BCV, and its node releases it
    /// when it returns.
    pub(super) async fn ended_target_readiness(&self, target: &str) -> Option<Readiness> {
        if self.ensure_volume_node_up(target).is_err() {
            return Some(Readiness::NotReady);
        }
        tokio::time::timeout(
            Duration::from_secs(TARGET_READINESS_TIMEOUT_SECONDS),
            self.node_readiness(target),
        )
        .await
        .unwrap_or(Some(Readiness::NotReady))
    }

    /// Refuses to delete a volume that hosts have open over NBD: their next IO would fail.
    /// The volume's node is asked before the catalog records anything, so the refusal
    /// changes nothing. A volume the catalog does not know, or whose delete is already
    /// under way, is left to the catalog's own checks.
    pub(super) async fn refuse_open_volume(&self, name: &str) -> Outcome<()> {
        self.read_barrier().await?;
        let Some(record) = self.catalog.read(|catalog| catalog.volume(name).cloned()) else {
            return Ok(());
        };
        if record.state != VolumeState::Ready {
            return Ok(());
        }
        let node = self
            .catalog
            .read(|catalog| catalog.node(&record.node).cloned());
        let Some(node) = node else {
            return Ok(());
        };
        let answer = self
            .call(
                &record.node,
                &node.address,
                Request::VolumeClients {
                    name: name.to_string(),
                },
            )
            .await;
        match answer {
            Ok(Response::VolumeClients { clients, .. }) if clients.is_empty() => Ok(()),
            Ok(Response::VolumeClients { clients, .. }) => Err(Refusal::new(
                ErrorCode::IllegalState,
                format!(
                    "volume '{name}' is open by {} NBD connection{} ({}): disconnect {} first, or pass --force to close {} and delete the volume",
                    clients.len(),
                    if clients.len() == 1 { "" } else { "s" },
                    clients.join(", "),
                    if clients.len() == 1 { "that host" } else { "those hosts" },
                    if clients.len() == 1 { "the connection" } else { "the connections" },
                ),
            )),
            // The node never got the volume (a create it did not finish): no host has it.
            Ok(Response::Error {
                code: ErrorCode::NotFound,
                ..
            }) => Ok(()),
            Ok(Response::Error { code, message }) => Err(Refusal::new(
                code,
                format!(
                    "cannot check whether hosts have volume '{name}' open: {message}; pass --force to delete it anyway"
                ),
            )),
            Ok(other) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("unexpected answer {other:?}"),
            )),
            Err(detail) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "node '{}' did not answer whether hosts have volume '{name}' open ({detail}); retry, or pass --force to delete it anyway",
                    record.node
                ),
            )),
        }
    }

    /// Refuses a command for a node the catalog marks down, at once: calling it would only
    /// wait for connection timeouts.
    pub(super) fn ensure_node_up(&self, node: &str) -> Outcome<()> {
        let record = self.catalog.read(|catalog| catalog.node(node).cloned());
        match record {
            Some(record) if record.health == Health::Down => Err(Refusal::new(
                ErrorCode::IllegalState,
                advice::node_down(node, record.down_since_unix_seconds, now_unix_seconds()),
            )),
            _ => Ok(()),
        }
    }
    /// [`Self::ensure_node_up`] for the node of a volume, when the volume exists.
    pub(super) fn ensure_volume_node_up(&self, volume: &str) -> Outcome<()> {
        let node = self
            .catalog
            .read(|catalog| catalog.volume(volume).map(|record| record.node.clone()));
        node.map_or(Ok(()), |node| self.ensure_node_up(&node))
    }
    /// Refuses a new session whose target already is another session's target, saying
    /// what the volume is and what to do, before any node is asked.
    pub(super) async fn refuse_taken_target(&self, command: &SessionCommand) -> Outcome<()> {
        let target = match command {
            SessionCommand::CloneCreate { target, .. } => target,
            SessionCommand::MirrorEstablish { bcv, .. } => bcv,
            _ => return Ok(()),
        };
        let Some(mut existing) = self
            .catalog
            .read(|catalog| catalog.session(target).cloned())
        else {
            return Ok(());
        };
        if advice::target_taken(command, &existing).is_none() {
            return Ok(());
        }
        // The catalog's state is a checkpoint (a copy may have finished since); the
        // session's node knows the state now, and the checkpoint stands when it is down.
        existing.state = self.session_live(&existing).await.state;
        match advice::target_taken(command, &existing) {
            Some(message) => Err(Refusal::new(ErrorCode::IllegalState, message)),
            None => Ok(()),
        }
    }
}
