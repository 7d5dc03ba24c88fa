//! A snap on the leader: the source and the extents are checked against the catalog, a
//! target that does not exist is created through the catalog first, the source's node
//! snaps, and a target made for a snap the node refused is deleted again, so a refused
//! snap changes nothing.
//!
//! Each step carries an id derived from the CLI's request id, so a retry (the leader died,
//! or the node's answer was lost) does each step once: the target's creation is answered
//! from the catalog, and the node answers its first snap instead of taking a newer image.
//! A snap whose node did not answer may have happened there, so its target stays for the
//! retry.

use super::*;

impl ControlPlane {
    pub(super) async fn snap(
        &self,
        request_id: RequestId,
        source: &str,
        target: &str,
        extents: Vec<Extent>,
        overwrite: bool,
    ) -> Outcome<Response> {
        let source_record = self.known_volume(source)?;
        self.ensure_node_up(&source_record.node)?;
        if source_record.state != VolumeState::Ready {
            return Err(CatalogError::IllegalState {
                volume: source.to_string(),
                state: source_record.state,
                action: "snapped".into(),
            }
            .into());
        }
        let track_count = source_record.size_bytes / u64::from(source_record.track_size_bytes);
        if let Some(extent) = extents.iter().find(|extent| extent.last >= track_count) {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                format!(
                    "extent {extent} does not fit volume '{source}', which has tracks 0-{}",
                    track_count.saturating_sub(1)
                ),
            ));
        }
        let create_id = derived_request_id(request_id, "snap target");
        let created_before = self
            .catalog
            .read(|catalog| catalog.applied_response(create_id).is_some());
        let existing = self.catalog.read(|catalog| catalog.volume(target).cloned());
        let created_target = match existing {
            // A retry of this snap finds the target its first attempt made (finished here
            // if that attempt stopped half-way).
            None | Some(_) if created_before => {
                self.volume_create(
                    create_id,
                    target,
                    &source_record.node,
                    source_record.size_bytes,
                    source_record.track_size_bytes,
                )
                .await?;
                true
            }
            None => {
                // The target is created through the catalog first, so that a node dying
                // during the snap leaves a complete, empty target rather than a volume the
                // catalog does not know.
                self.volume_create(
                    create_id,
                    target,
                    &source_record.node,
                    source_record.size_bytes,
                    source_record.track_size_bytes,
                )
                .await?;
                true
            }
            Some(record) if record.node != source_record.node => {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!(
                    "a snap works within one node: '{source}' is on '{}' but '{target}' is on '{}'",
                    source_record.node, record.node
                ),
                ))
            }
            Some(record) if record.state != VolumeState::Ready => {
                return Err(CatalogError::IllegalState {
                    volume: target.to_string(),
                    state: record.state,
                    action: "a snap target".into(),
                }
                .into())
            }
            Some(_) => false,
        };
        let address = self.node_address(&source_record.node).unwrap_or_default();
        let answer = self
            .call(
                &source_record.node,
                &address,
                Request::Snap {
                    request_id: derived_request_id(request_id, "snap"),
                    source: source.to_string(),
                    target: target.to_string(),
                    extents,
                    // A target made for this snap above is empty: nothing to lose.
                    overwrite: overwrite || created_target,
                },
            )
            .await;
        match answer {
            Ok(response @ Response::Snapped { .. }) => {
                crate::fail_points::exit_point("control-plane::snap::after-node-call", "snap");
                Ok(response)
            }
            Err(detail) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "node '{}' did not answer the snap (it may have happened there; a retry under the same request finishes it): {detail}",
                    source_record.node
                ),
            )),
            refused => {
                if created_target {
                    // The snap did not happen, so the target made for it goes again: a
                    // refused command changes nothing.
                    self.commit(
                        random_request_id(),
                        Command::VolumeDeleteBegin {
                            name: target.to_string(),
                        },
                    )
                    .await?;
                    self.drive_volume(target).await?;
                }
                match refused {
                    Ok(Response::Error { code, message }) => Err(Refusal::new(code, message)),
                    other => Err(Refusal::new(
                        ErrorCode::Internal,
                        format!("unexpected answer {other:?}"),
                    )),
                }
            }
        }
    }
}
