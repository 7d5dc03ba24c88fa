//! Volume commands on the leader. Create and delete are intents (the saga,
//! `saga.rs`): the catalog records the intent with the volume `creating` or `deleting`,
//! the owning node is called under the intent's id, and its answer makes the volume
//! ready or removes it; a node that dies in between leaves an open intent that the
//! supervisor finishes when the node returns. A readiness is carried out by the node
//! before it is committed. List and show read the catalog after a read barrier (show
//! also asks the volume's node).

use super::*;
use protocol::cluster::{Intent, IntentCall, IntentResult};

impl ControlPlane {
    pub(super) fn known_volume(&self, name: &str) -> Outcome<VolumeRecord> {
        self.catalog
            .read(|catalog| catalog.volume(name).cloned())
            .ok_or_else(|| {
                CatalogError::UnknownVolume {
                    volume: name.to_string(),
                }
                .into()
            })
    }

    pub(super) fn node_address(&self, node: &str) -> Option<String> {
        self.catalog
            .read(|catalog| catalog.node(node).map(|record| record.address.clone()))
    }

    pub(super) async fn volume_create(
        &self,
        request_id: RequestId,
        name: &str,
        node: &str,
        size_bytes: u64,
        track_size_bytes: u32,
    ) -> Outcome<VolumeRecord> {
        self.volume_intent(
            request_id,
            node.to_string(),
            IntentCall::VolumeCreate {
                name: name.to_string(),
                size_bytes,
                track_size_bytes,
            },
        )
        .await?;
        self.known_volume(name)
    }

    /// Deletes a volume: refused while its node is down or hosts have it open, unless
    /// `force`, and then carried through like any intent.
    pub(super) async fn volume_delete(
        &self,
        request_id: RequestId,
        name: String,
        force: bool,
    ) -> Outcome<ClusterResponse> {
        // Asked before anything is recorded, so a refused delete changes nothing;
        // once `deleting` is recorded the node closes any connection first. With
        // --force the delete is recorded even while the node is down, and the node
        // finishes it when it returns.
        let begun = self
            .catalog
            .read(|catalog| catalog.applied_response(request_id).is_some());
        if !force && !begun {
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
        let node = self.known_volume(&name).map(|record| record.node);
        let node = match (node, begun) {
            (Ok(node), _) => node,
            // A retry of a delete that finished: its volume is gone, its answer stands.
            (Err(_), true) => String::new(),
            (Err(refusal), false) => return Err(refusal),
        };
        self.volume_intent(
            request_id,
            node,
            IntentCall::VolumeDelete { name: name.clone() },
        )
        .await?;
        Ok(ClusterResponse::Deleted { name })
    }

    /// The saga of a volume command: the intent is recorded (the catalog checks it and
    /// marks the volume `creating` or `deleting`), its node is called under the intent's
    /// id, and the answer is committed. A node that does not answer leaves the intent
    /// open, finished by the supervisor when the node answers; a retry under the same
    /// request id drives the same intent.
    async fn volume_intent(
        &self,
        request_id: RequestId,
        node: String,
        call: IntentCall,
    ) -> Outcome<()> {
        self.begin_intent(Intent {
            id: request_id,
            node,
            call,
            begun_unix_seconds: now_unix_seconds(),
        })
        .await?;
        match self.drive_intent(request_id).await? {
            IntentResult::VolumeCreated { .. } | IntentResult::VolumeDeleted => Ok(()),
            IntentResult::Refused { code, message } => Err(Refusal::new(code, message)),
            other => Err(Refusal::new(
                ErrorCode::Internal,
                format!("a volume command's intent finished with {other:?}"),
            )),
        }
    }

    /// Sets a volume's readiness: on its node first, then in the catalog.
    pub(super) async fn volume_set_readiness(
        &self,
        request_id: RequestId,
        name: String,
        readiness: Readiness,
    ) -> Outcome<ClusterResponse> {
        self.ensure_volume_node_up(&name)?;
        // A retry of a command that was applied gets its first answer without
        // asking the node again.
        if let Some(answer) = self
            .catalog
            .read(|catalog| catalog.applied_response(request_id).cloned())
        {
            return match answer.map_err(Refusal::from)? {
                CatalogReply::Volume(record) => Ok(ClusterResponse::Volume(record)),
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
        Ok(ClusterResponse::Volume(record))
    }

    /// Every volume in the catalog.
    pub(super) async fn volume_list(&self) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        Ok(ClusterResponse::Volumes(
            self.catalog
                .read(|catalog| catalog.volumes().cloned().collect()),
        ))
    }

    /// A volume's catalog record, with what its node says of it when the node answers.
    pub(super) async fn volume_show(&self, name: String) -> Outcome<ClusterResponse> {
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
        Ok(ClusterResponse::VolumeDetail {
            record,
            node_info,
            nbd_address,
        })
    }

    /// The readiness a volume's node gives it now, when the node answers.
    pub(super) async fn node_readiness(&self, volume: &str) -> Option<Readiness> {
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

    pub(super) async fn push_readiness(&self, record: &VolumeRecord) -> Outcome<()> {
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
}
