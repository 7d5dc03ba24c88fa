//! The leader's watch over the nodes: a heartbeat registers a node or brings it back up
//! (pushing the catalog's readiness to a returning node), and the periodic supervision
//! marks silent nodes down, compares sessions with their nodes, and finishes half-way
//! volume commands on nodes that are up, one reconciliation per volume at a time.

use super::*;

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
        self.reconcile_half_way_volumes();
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

    /// Starts finishing every half-way volume whose node is up, in a task of its own.
    fn reconcile_half_way_volumes(self: &Arc<Self>) {
        let half_way: Vec<VolumeRecord> = self.catalog.read(|catalog| {
            catalog
                .volumes()
                .filter(|volume| volume.state != VolumeState::Ready)
                // A snap's new target is finished by its intent (`reconcile_intents`).
                .filter(|volume| catalog.intent_of_volume(&volume.name).is_none())
                .filter(|volume| catalog.node_is_up(&volume.node))
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
