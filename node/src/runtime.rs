//! Starting a node: open the store, bind QUIC, NBD and metrics, serve until dropped.

use crate::config::NodeConfig;
use crate::engine::rocks::RocksEngine;
use crate::service::{self, Identity};
use crate::store::VolumeStore;
use crate::{nbd, Error, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// A node serving on its addresses; dropping it stops the listeners.
pub struct RunningNode {
    pub name: String,
    pub quic_address: SocketAddr,
    pub nbd_address: SocketAddr,
    pub store: Arc<VolumeStore<RocksEngine>>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Stops serving: closes QUIC connections and the NBD listener.
    pub fn shutdown(&mut self) {
        self.endpoint.close(0u32.into(), b"node shutting down");
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the Prometheus exporter once per process.
pub fn install_metrics(address: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(address)
        .install()
        .map_err(|error| Error::Config {
            detail: format!("metrics endpoint {address}: {error}"),
        })
}

pub async fn start(config: &NodeConfig) -> Result<RunningNode> {
    let identity = protocol::pki::Identity::load(&config.certs, &config.name)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|error| Error::Config {
        detail: format!(
            "cannot create data_dir {}: {error}",
            config.data_dir.display()
        ),
    })?;
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || {
        let engine = RocksEngine::open(&data_dir.join("db"))?;
        VolumeStore::open(engine)
    })
    .await
    .map_err(|join_error| Error::Engine {
        detail: join_error.to_string(),
    })??;
    let store = Arc::new(store);

    let nbd_listener = tokio::net::TcpListener::bind(config.nbd)
        .await
        .map_err(|error| Error::Config {
            detail: format!("cannot listen for NBD on {}: {error}", config.nbd),
        })?;
    let nbd_address = nbd_listener.local_addr()?;
    let endpoint = protocol::transport::server_endpoint(config.listen, &identity)?;
    let quic_address = endpoint.local_addr()?;
    if let Some(metrics_address) = config.metrics {
        install_metrics(metrics_address)?;
    }

    let service_identity = Arc::new(Identity {
        name: config.name.clone(),
        site: config.site.clone(),
        nbd_address: nbd_address.to_string(),
    });
    let mut tasks = vec![tokio::spawn(nbd::serve(nbd_listener, store.clone()))];
    let accept_store = store.clone();
    let accept_endpoint = endpoint.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(incoming) = accept_endpoint.accept().await {
            let store = accept_store.clone();
            let identity = service_identity.clone();
            tokio::spawn(async move {
                let connection = match incoming.await {
                    Ok(connection) => connection,
                    Err(error) => {
                        // Peers without a certificate from the cluster CA end here.
                        tracing::warn!(%error, "QUIC connection refused");
                        metrics::counter!("tandem_quic_refused_total").increment(1);
                        return;
                    }
                };
                protocol::transport::serve_connection(connection, move |request| {
                    service::handle(store.clone(), identity.clone(), request)
                })
                .await;
            });
        }
    }));
    tracing::info!(name = %config.name, site = %config.site, %quic_address, %nbd_address, "node serving");
    Ok(RunningNode {
        name: config.name.clone(),
        quic_address,
        nbd_address,
        store,
        endpoint,
        tasks,
    })
}
