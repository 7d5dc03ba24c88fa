//! A snap on the leader, on the saga (`saga.rs`): the source and the extents are checked
//! against the catalog, the snap is recorded as an intent (with its target, `creating`,
//! when it does not exist yet), the source's node snaps under the intent's id (making a
//! missing target in the snap's own write), and the answer finishes the intent: the target
//! becomes ready, or — when the node refused — a target made for it goes again, so a
//! refused snap changes nothing.
//!
//! The intent's id is derived from the CLI's request id, so a retry drives the same
//! intent: the node answers its first snap instead of taking a newer image. An intent the
//! leader did not finish (it died, the node did not answer) is finished by the supervisor
//! once the node is up, so no target is left empty.

use super::*;
use protocol::cluster::{Intent, IntentCall, IntentResult, NewVolume};

impl ControlPlane {
    pub(super) async fn snap(
        &self,
        request_id: RequestId,
        source: &str,
        target: &str,
        extents: Vec<Extent>,
        overwrite: bool,
    ) -> Outcome<Response> {
        let id = derived_request_id(request_id, "snap");
        let open = self.catalog.read(|catalog| catalog.intent(id).is_some());
        if self.intent_result(id).is_none() && !open {
            let intent = self.snap_intent(id, source, target, &extents, overwrite)?;
            self.begin_intent(intent).await?;
        }
        match self.drive_intent(id).await? {
            IntentResult::Snapped {
                target_info,
                elapsed_micros,
            } => Ok(Response::Snapped {
                source: source.to_string(),
                target: target.to_string(),
                extents,
                elapsed_micros,
                target_info,
            }),
            IntentResult::Refused { code, message } => Err(Refusal::new(code, message)),
            other => Err(Refusal::new(
                ErrorCode::Internal,
                format!("a snap's intent finished with {other:?}"),
            )),
        }
    }

    /// The intent of a snap, checked as far as the catalog can: the source is ready on a
    /// node that is up and the extents fit it. The catalog checks the rest when it
    /// records the intent.
    fn snap_intent(
        &self,
        id: RequestId,
        source: &str,
        target: &str,
        extents: &[Extent],
        overwrite: bool,
    ) -> Outcome<Intent> {
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
        let exists = self
            .catalog
            .read(|catalog| catalog.volume(target).is_some());
        Ok(Intent {
            id,
            node: source_record.node.clone(),
            call: IntentCall::Snap {
                source: source.to_string(),
                target: target.to_string(),
                extents: extents.to_vec(),
                overwrite,
                create: (!exists).then_some(NewVolume {
                    size_bytes: source_record.size_bytes,
                    track_size_bytes: source_record.track_size_bytes,
                }),
            },
            begun_unix_seconds: lifecycle::now_unix_seconds(),
        })
    }
}
