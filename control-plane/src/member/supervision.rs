//! The leader's watch over the nodes: a heartbeat registers a node or brings it back up
//! (pushing the catalog's readiness to a returning node), and the periodic supervision
//! marks silent nodes down, compares sessions with their nodes, and drives the open
//! intents (volume, snap and session commands left half way) on nodes that are up, one
//! drive per intent at a time.

use super::*;
use protocol::cluster::{Intent, IntentCall};

impl ControlPlane {
    /// Records a node's heartbeat; registers it, or marks it up again, when needed.
    pub(super) async fn heartbeat(&self, report: NodeReport) -> Outcome<()> {
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

    /// The leader's periodic duty: mark silent nodes down and finish half-way volumes and
    /// open intents on nodes that are up.
    pub(super) async fn supervise_once(self: &Arc<Self>) {
        if !self.is_leader() {
            self.last_seen.lock().clear();
            return;
        }
        self.mark_silent_nodes_down().await;
        self.refresh_sessions().await;
        self.adopt_half_way_volumes().await;
        self.reconcile_intents();
        self.drive_jobs();
    }

    /// Marks down every node the catalog has up that has not been heard from for
    /// [`NODE_DOWN_AFTER_MILLISECONDS`].
    async fn mark_silent_nodes_down(&self) {
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
    }

    /// Begins an intent for every volume left `creating` or `deleting` without one (by a
    /// leader from before volume intents), so that it is finished like any other: the
    /// same call under the intent's id, driven by `reconcile_intents`.
    async fn adopt_half_way_volumes(&self) {
        let half_way: Vec<VolumeRecord> = self.catalog.read(|catalog| {
            catalog
                .volumes()
                .filter(|volume| volume.state != VolumeState::Ready)
                .filter(|volume| catalog.intent_of_volume(&volume.name).is_none())
                .cloned()
                .collect()
        });
        for volume in half_way {
            let call = match volume.state {
                VolumeState::Creating => IntentCall::VolumeCreate {
                    name: volume.name.clone(),
                    size_bytes: volume.size_bytes,
                    track_size_bytes: volume.track_size_bytes,
                },
                VolumeState::Deleting => IntentCall::VolumeDelete {
                    name: volume.name.clone(),
                },
                VolumeState::Ready => continue,
            };
            let intent = Intent {
                id: random_request_id(),
                node: volume.node.clone(),
                call,
                begun_unix_seconds: now_unix_seconds(),
            };
            match self.begin_intent(intent).await {
                Ok(()) => {
                    tracing::info!(volume = %volume.name, state = %volume.state, "a half-way volume without an intent is now finished by one")
                }
                Err(refusal) => {
                    tracing::warn!(volume = %volume.name, reason = %refusal.message, "could not begin an intent for a half-way volume")
                }
            }
        }
    }
}
