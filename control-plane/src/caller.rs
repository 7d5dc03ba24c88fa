//! Calls from one process to nodes and members, over connections kept open for reuse.

use parking_lot::Mutex;
use protocol::messages::{Request, Response};
use protocol::transport::PeerRole;
use std::collections::HashMap;
use std::time::Duration;

/// How long one call to a node or member may take once connected.
pub const CALL_TIMEOUT_SECONDS: u64 = 10;
/// How long connecting to a node or member may take. Nodes of one cluster answer a
/// handshake within milliseconds even across sites; a dead peer should cost little, since
/// heartbeats and forwarded requests move on to the next member.
pub const CONNECT_TIMEOUT_SECONDS: u64 = 2;

/// Resolves a `HOST:PORT` address; names work as well as IP addresses, so a deployment
/// can use host names.
pub async fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    let mut addresses = tokio::net::lookup_host(address)
        .await
        .map_err(|error| format!("cannot resolve '{address}': {error}"))?;
    addresses
        .next()
        .ok_or_else(|| format!("'{address}' resolves to no address"))
}

/// A QUIC endpoint and the connections it holds open, by address. One per process: the
/// node's service, the control plane and Raft share its connections.
pub struct Caller {
    endpoint: quinn::Endpoint,
    connections: Mutex<HashMap<String, quinn::Connection>>,
}

impl Caller {
    pub fn new(endpoint: quinn::Endpoint) -> Caller {
        Caller {
            endpoint,
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// Sends one request to `address` (`HOST:PORT`) and waits for the answer. The error is
    /// a sentence saying why no answer came.
    ///
    /// A kept connection can be dead without knowing it (the peer restarted); when a call
    /// on it fails, the call is made once more on a fresh connection. Every request sent
    /// through here may be repeated: cluster requests carry request ids, and the node
    /// requests the leader sends are checked against the node's state.
    ///
    /// With `expected_node`, the peer's certificate must name that node; the request is not
    /// sent otherwise.
    pub async fn call(
        &self,
        address: &str,
        expected_node: Option<&str>,
        request: &Request,
    ) -> Result<Response, String> {
        let cached = self.connections.lock().get(address).cloned();
        if let Some(connection) = cached.filter(|connection| connection.close_reason().is_none()) {
            match self
                .call_on(address, connection, expected_node, request)
                .await
            {
                Ok(response) => return Ok(response),
                Err(detail) => {
                    tracing::debug!(%address, %detail, "kept connection failed; reconnecting")
                }
            }
        }
        let connection =
            tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_SECONDS), async {
                let socket = resolve(address).await?;
                protocol::transport::connect(&self.endpoint, socket)
                    .await
                    .map_err(|error| error.to_string())
            })
            .await
            .map_err(|_| format!("no connection within {CONNECT_TIMEOUT_SECONDS} seconds"))??;
        self.connections
            .lock()
            .insert(address.to_string(), connection.clone());
        self.call_on(address, connection, expected_node, request)
            .await
    }

    async fn call_on(
        &self,
        address: &str,
        connection: quinn::Connection,
        expected_node: Option<&str>,
        request: &Request,
    ) -> Result<Response, String> {
        if let Some(expected) = expected_node {
            let role =
                protocol::transport::peer_role(&connection).map_err(|error| error.to_string())?;
            if role != PeerRole::Node(expected.to_string()) {
                return Err(format!(
                    "{address} answers as {role}, not as node {expected}; refusing to send it the request"
                ));
            }
        }
        let exchange = protocol::transport::call::<Request, Response>(&connection, request);
        let outcome =
            match tokio::time::timeout(Duration::from_secs(CALL_TIMEOUT_SECONDS), exchange).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {CALL_TIMEOUT_SECONDS} seconds"),
            };
        self.connections.lock().remove(address);
        Err(outcome)
    }
}
