//! The one pattern of the leader's multi-step work on nodes (the saga): an intent is
//! committed before its node is called; the node is called under the intent's id, and
//! carries a call out once per id (it answers a repeat with its first answer); the node's
//! answer is committed as the intent's result. An intent left open — the leader died, the
//! node did not answer — is driven again by the supervisor once its node is up, under the
//! same id, so nothing is left half done and nothing is done twice. Volume creates and
//! deletes, snaps, session commands and gsnap steps follow it (docs/design/gsnap.md).

use super::*;
use protocol::cluster::{Intent, IntentCall, IntentResult};
use protocol::messages::VolumeInfo;

/// Takes an intent out of the driving set when its drive ends, however it ends.
struct Driving<'a> {
    set: &'a Mutex<HashSet<RequestId>>,
    id: RequestId,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

impl ControlPlane {
    /// Records `intent` under its own id: a retry of the request that began it commits
    /// nothing new.
    pub(super) async fn begin_intent(&self, intent: Intent) -> Outcome<()> {
        let name = intent.call.name();
        self.commit(intent.id, Command::IntentBegin(intent)).await?;
        crate::fail_points::exit_point("control-plane::saga::after-intent-commit", name);
        Ok(())
    }

    /// The result intent `id` finished with, if it finished (and the catalog still
    /// remembers the answer to its finish).
    pub(super) fn intent_result(&self, id: RequestId) -> Option<IntentResult> {
        self.catalog
            .read(|catalog| catalog.intent_result(id).cloned())
    }

    fn intent_lock(&self, id: RequestId) -> Arc<tokio::sync::Mutex<()>> {
        self.intent_locks.lock().entry(id).or_default().clone()
    }

    /// Calls the node of intent `id` under the intent's id and commits its answer;
    /// returns the result, also when an earlier drive finished it. A node that does not
    /// answer leaves the intent open (unavailable: the supervisor or a retry finishes it).
    pub(super) async fn drive_intent(&self, id: RequestId) -> Outcome<IntentResult> {
        self.drive_intent_answer(id).await.map(|(result, _)| result)
    }

    /// [`ControlPlane::drive_intent`], with the session a session command's node answered
    /// when this drive called it (`None` when an earlier drive finished the intent): a
    /// command answers its caller with the live session, not the catalog's record.
    pub(super) async fn drive_intent_answer(
        &self,
        id: RequestId,
    ) -> Outcome<(IntentResult, Option<Option<SessionInfo>>)> {
        let lock = self.intent_lock(id);
        let outcome = {
            let _guard = lock.lock().await;
            self.drive_intent_locked(id).await
        };
        let mut locks = self.intent_locks.lock();
        // The lock goes once nobody else holds or waits for it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&id);
        }
        outcome
    }

    async fn drive_intent_locked(
        &self,
        id: RequestId,
    ) -> Outcome<(IntentResult, Option<Option<SessionInfo>>)> {
        if let Some(result) = self.intent_result(id) {
            return Ok((result, None));
        }
        let Some(intent) = self.catalog.read(|catalog| catalog.intent(id).cloned()) else {
            return Err(Refusal::new(
                ErrorCode::Internal,
                format!("intent {id:032x} is neither open nor remembered as finished"),
            ));
        };
        self.ensure_node_up(&intent.node).map_err(|refusal| {
            Refusal::new(
                refusal.code,
                format!(
                    "{}; the {} is recorded and finished when the node returns",
                    refusal.message,
                    intent.call.name()
                ),
            )
        })?;
        // A leader cut off from its majority must not act on a stale catalog.
        self.read_barrier().await?;
        let address = self.node_address(&intent.node).unwrap_or_default();
        let request = match &intent.call {
            IntentCall::Snap {
                source,
                target,
                extents,
                overwrite,
                create,
            } => Request::Snap {
                request_id: id,
                source: source.clone(),
                target: target.clone(),
                extents: extents.clone(),
                // A target made by this snap is empty: nothing to lose.
                overwrite: *overwrite || create.is_some(),
            },
            IntentCall::SnapAt {
                source,
                target,
                extents,
                target_extents,
                overwrite,
                create,
            } => Request::SnapAt {
                request_id: id,
                source: source.clone(),
                target: target.clone(),
                extents: extents.clone(),
                target_extents: target_extents.clone(),
                overwrite: *overwrite || create.is_some(),
                target_size_bytes: create.as_ref().map(|new| new.size_bytes),
            },
            IntentCall::SnapLineage {
                source,
                target,
                extents,
                target_extents,
                overwrite,
                create,
                lineage,
            } => Request::SnapLineage {
                request_id: id,
                source: source.clone(),
                target: target.clone(),
                extents: extents.clone(),
                target_extents: target_extents.clone(),
                overwrite: *overwrite || create.is_some(),
                target_size_bytes: create.as_ref().map(|new| new.size_bytes),
                lineage: lineage.clone(),
            },
            IntentCall::Session { command } => Request::Session {
                request_id: id,
                command: command.clone(),
            },
            IntentCall::VolumeCreate {
                name,
                size_bytes,
                track_size_bytes,
            } => Request::VolumeCreateOnce {
                request_id: id,
                name: name.clone(),
                size_bytes: *size_bytes,
                track_size_bytes: *track_size_bytes,
            },
            IntentCall::VolumeDelete { name } => Request::VolumeDeleteOnce {
                request_id: id,
                name: name.clone(),
            },
        };
        let mut live = None;
        let result = match self.call(&intent.node, &address, request).await {
            Ok(Response::Session(info)) => {
                let IntentCall::Session { command } = &intent.call else {
                    return Err(Refusal::new(
                        ErrorCode::Internal,
                        format!("node '{}' answered a snap with a session", intent.node),
                    ));
                };
                // Tests end the process here to play a leader that dies after the node
                // carried a command out and before the catalog recorded it.
                crate::fail_points::exit_point(
                    "control-plane::session::after-node-call",
                    command.name(),
                );
                let result = match &info {
                    Some(info) => IntentResult::Session {
                        entry: Some(super::sessions::entry_of(&intent.node, info)),
                        target_readiness: None,
                    },
                    None => {
                        let target_readiness = match command.target() {
                            Some(target) => self.ended_target_readiness(target).await,
                            None => None,
                        };
                        IntentResult::Session {
                            entry: None,
                            target_readiness,
                        }
                    }
                };
                live = Some(info);
                result
            }
            Ok(Response::Snapped {
                target_info,
                elapsed_micros,
                ..
            }) => IntentResult::Snapped {
                target_info,
                elapsed_micros,
            },
            Ok(Response::Volume(info)) if matches!(intent.call, IntentCall::VolumeCreate { .. }) => {
                IntentResult::VolumeCreated { info }
            }
            Ok(Response::Deleted { .. }) if matches!(intent.call, IntentCall::VolumeDelete { .. }) => {
                IntentResult::VolumeDeleted
            }
            // The node holds the volume already: made by an attempt of this intent whose
            // answer was lost before the node remembered it, when its geometry is the
            // intent's; else a volume the catalog never asked for, which is refused.
            Ok(Response::Error {
                code: ErrorCode::AlreadyExists,
                ..
            }) if matches!(intent.call, IntentCall::VolumeCreate { .. }) => {
                match self.existing_volume(&intent, &address).await? {
                    Ok(info) => IntentResult::VolumeCreated { info },
                    Err(refusal) => IntentResult::Refused {
                        code: refusal.code,
                        message: refusal.message,
                    },
                }
            }
            // Deleted by an attempt whose answer was lost, or never there.
            Ok(Response::Error {
                code: ErrorCode::NotFound,
                ..
            }) if matches!(intent.call, IntentCall::VolumeDelete { .. }) => {
                IntentResult::VolumeDeleted
            }
            Ok(Response::Error { code, message }) if code != ErrorCode::Unavailable => {
                IntentResult::Refused { code, message }
            }
            Ok(other) => {
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    format!("node '{}' answered {other:?}", intent.node),
                ))
            }
            Err(detail) => {
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node '{}' did not answer the {} ({detail}); it is recorded and finished when the node returns",
                        intent.node,
                        intent.call.name()
                    ),
                ))
            }
        };
        crate::fail_points::exit_point(
            "control-plane::saga::before-result-commit",
            intent.call.name(),
        );
        self.commit(
            derived_request_id(id, "finish"),
            Command::IntentFinish {
                id,
                result: result.clone(),
            },
        )
        .await?;
        Ok((result, live))
    }

    /// What the node holds under the name of a volume intent met with `already exists`:
    /// `Ok(info)` when its geometry is the intent's, the refusal otherwise; an error (the
    /// intent stays open) when the node could not say.
    async fn existing_volume(
        &self,
        intent: &Intent,
        address: &str,
    ) -> Outcome<Outcome<VolumeInfo>> {
        let IntentCall::VolumeCreate {
            name,
            size_bytes,
            track_size_bytes,
        } = &intent.call
        else {
            return Err(Refusal::new(
                ErrorCode::Internal,
                format!("intent {:032x} creates no volume", intent.id),
            ));
        };
        let answer = self
            .call(
                &intent.node,
                address,
                Request::VolumeShow { name: name.clone() },
            )
            .await;
        match answer {
            Ok(Response::Volume(info))
                if info.size_bytes == *size_bytes && info.track_size_bytes == *track_size_bytes =>
            {
                Ok(Ok(info))
            }
            Ok(Response::Volume(info)) => Ok(Err(Refusal::new(
                ErrorCode::AlreadyExists,
                format!(
                    "node '{}' already holds a volume '{name}' of {} bytes that the catalog does not know; delete it there or choose another name",
                    intent.node, info.size_bytes
                ),
            ))),
            Ok(other) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!("node '{}' answered {other:?}", intent.node),
            )),
            Err(detail) => Err(Refusal::new(ErrorCode::Unavailable, detail)),
        }
    }

    /// Starts driving every open intent whose node is up, each in a task of its own and
    /// one drive per intent at a time.
    pub(super) fn reconcile_intents(self: &Arc<Self>) {
        let open: Vec<Intent> = self.catalog.read(|catalog| {
            catalog
                .intents()
                .filter(|intent| catalog.node_is_up(&intent.node))
                .cloned()
                .collect()
        });
        for intent in open {
            if !self.driving_intents.lock().insert(intent.id) {
                continue;
            }
            let control_plane = Arc::clone(self);
            tokio::spawn(async move {
                let _done = Driving {
                    set: &control_plane.driving_intents,
                    id: intent.id,
                };
                match control_plane.drive_intent(intent.id).await {
                    Ok(result) => {
                        tracing::info!(intent = %format!("{:032x}", intent.id), call = intent.call.name(), node = %intent.node, ?result, "finished an intent left open")
                    }
                    Err(refusal) => {
                        tracing::debug!(intent = %format!("{:032x}", intent.id), reason = %refusal.message, "an open intent will be driven again")
                    }
                }
            });
        }
    }
}
