//! A snap on the leader: the source and the extents are checked against the catalog, a
//! target that does not exist is created through the catalog first, the source's node
//! snaps, and a target made for a snap that did not happen is deleted again, so a refused
//! snap changes nothing.

use super::*;

impl ControlPlane {
    pub(super) async fn snap(
        &self,
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
        let created_target = match self.catalog.read(|catalog| catalog.volume(target).cloned()) {
            None => {
                // The target is created through the catalog first, so that a node dying
                // during the snap leaves a complete, empty target rather than a volume the
                // catalog does not know.
                self.volume_create(
                    random_request_id(),
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
                    source: source.to_string(),
                    target: target.to_string(),
                    extents,
                    // A target made for this snap above is empty: nothing to lose.
                    overwrite: overwrite || created_target,
                },
            )
            .await;
        match answer {
            Ok(response @ Response::Snapped { .. }) => Ok(response),
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
                    Ok(other) => Err(Refusal::new(
                        ErrorCode::Internal,
                        format!("unexpected answer {other:?}"),
                    )),
                    Err(detail) => Err(Refusal::new(
                        ErrorCode::Unavailable,
                        format!(
                            "node '{}' did not answer the snap: {detail}",
                            source_record.node
                        ),
                    )),
                }
            }
        }
    }
}
