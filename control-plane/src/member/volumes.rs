//! Volume commands on the leader. Create and delete go catalog entry (`creating`,
//! `deleting`) → owning node → catalog entry (`ready`, removed), so a node that dies in
//! between leaves a half-way volume that `drive_volume` finishes later, any number of times
//! safely; a readiness is carried out by the node before it is committed. List and show
//! read the catalog after a read barrier (show also asks the volume's node).

use super::*;

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

    /// Deletes a volume: refused while its node is down or hosts have it open, unless
    /// `force`, and then carried through like any half-way volume.
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
        Ok(ClusterResponse::Deleted { name })
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
    pub(super) async fn drive_volume(&self, name: &str) -> Outcome<()> {
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
