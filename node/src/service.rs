//! The node's QUIC service: requests from the CLI and other nodes, answered from the
//! volume store. A thin driver: validation lives in the store.

use crate::engine::Engine;
use crate::store::VolumeStore;
use crate::{Error, Result};
use protocol::messages::{NodeStatus, Request, Response};
use std::sync::Arc;
use std::time::Instant;

/// What a node tells about itself in a status answer.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub site: String,
    pub nbd_address: String,
}

pub async fn handle<E: Engine>(
    store: Arc<VolumeStore<E>>,
    identity: Arc<Identity>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let kind = request_kind(&request);
    let answer = tokio::task::spawn_blocking(move || answer(&store, &identity, request))
        .await
        .unwrap_or_else(|join_error| {
            Err(Error::Engine {
                detail: format!("request task failed: {join_error}"),
            })
        });
    metrics::histogram!("tandem_requests_seconds", "request" => kind)
        .record(started.elapsed().as_secs_f64());
    match answer {
        Ok(response) => response,
        Err(error) => {
            metrics::counter!("tandem_request_errors_total", "request" => kind).increment(1);
            tracing::info!(request = kind, %error, "request refused");
            Response::Error {
                code: error.code(),
                message: error.to_string(),
            }
        }
    }
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::VolumeCreate { .. } => "volume_create",
        Request::VolumeList => "volume_list",
        Request::VolumeShow { .. } => "volume_show",
        Request::VolumeDelete { .. } => "volume_delete",
        Request::VolumeSetReadiness { .. } => "volume_set_readiness",
        Request::Snap { .. } => "snap",
        Request::NodeStatus => "node_status",
    }
}

fn answer<E: Engine>(
    store: &VolumeStore<E>,
    identity: &Identity,
    request: Request,
) -> Result<Response> {
    Ok(match request {
        Request::VolumeCreate {
            name,
            size_bytes,
            track_size_bytes,
        } => Response::Volume(store.create(&name, size_bytes, track_size_bytes)?.info()),
        Request::VolumeList => Response::Volumes(store.list()),
        Request::VolumeShow { name } => Response::Volume(store.volume(&name)?.info()),
        Request::VolumeDelete { name } => {
            store.delete(&name)?;
            Response::Deleted { name }
        }
        Request::VolumeSetReadiness { name, readiness } => {
            Response::Volume(store.set_readiness(&name, readiness)?.info())
        }
        Request::Snap {
            source,
            target,
            extents,
        } => {
            let started = Instant::now();
            let (target_volume, _created) = store.snap(&source, &target, &extents)?;
            Response::Snapped {
                source,
                target,
                extents,
                elapsed_micros: started.elapsed().as_micros() as u64,
                target_info: target_volume.info(),
            }
        }
        Request::NodeStatus => Response::NodeStatus(NodeStatus {
            name: identity.name.clone(),
            site: identity.site.clone(),
            nbd_address: identity.nbd_address.clone(),
            volume_count: store.volume_count() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }),
    })
}
