//! Calls from one process to nodes and members, over connections kept open for reuse.

use parking_lot::{Mutex, RwLock};
use protocol::cluster::FaultRule;
use protocol::messages::{Request, Response};
use protocol::transport::PeerRole;
use std::collections::HashMap;
use std::sync::Arc;
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

/// Fault rules by peer node name, one table per process, kept by its [`Caller`]. Every
/// call this process makes to a peer, and every call it serves from one, obeys the rule
/// for that peer: Raft, cluster requests and heartbeats, the leader's node calls and copy
/// traffic alike. Rules are set at run time by the admin (`tandem debug fault`) on nodes
/// that allow it, so tests can partition a copy or a vote without touching the kernel.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    rules: Arc<RwLock<HashMap<String, FaultRule>>>,
}

impl Faults {
    pub fn rule(&self, peer: &str) -> FaultRule {
        self.rules.read().get(peer).cloned().unwrap_or_default()
    }

    /// Sets the rule for one peer; the default rule (no drop, no delay) removes it.
    pub fn set(&self, peer: &str, rule: FaultRule) {
        let mut rules = self.rules.write();
        if rule == FaultRule::default() {
            rules.remove(peer);
        } else {
            rules.insert(peer.to_string(), rule);
        }
    }

    /// Whether this call from `peer` is to go unanswered (every call under a drop rule,
    /// a share of them under a loss rule).
    pub fn drops(&self, peer: &str) -> bool {
        self.rules
            .read()
            .get(peer)
            .is_some_and(|rule| rule.drops_call(rand::random_range(0..100)))
    }
}

/// What a call to `peer` meets under the fault rules: a dropped call gets no answer, like a
/// call into a partition, so it fails only once the caller's own `timeout` has passed; a
/// delayed one waits before it is sent.
async fn obey_faults(faults: &Faults, peer: &str, timeout: Duration) -> Result<(), String> {
    let rule = faults.rule(peer);
    if rule.drops_call(rand::random_range(0..100)) {
        tokio::time::sleep(timeout).await;
        return Err(format!(
            "no answer within {} ms (calls to {peer} are dropped by fault injection)",
            timeout.as_millis()
        ));
    }
    if rule.delay_milliseconds > 0 {
        tokio::time::sleep(Duration::from_millis(rule.delay_milliseconds)).await;
    }
    Ok(())
}

/// The node a connection's peer certificate names, if it names one.
fn node_of(connection: &quinn::Connection) -> Option<String> {
    match protocol::transport::peer_role(connection) {
        Ok(PeerRole::Node(name)) => Some(name),
        _ => None,
    }
}

/// A QUIC endpoint and the connections it holds open, by address. One per process: the
/// node's service, the control plane and Raft share its connections and its fault rules.
pub struct Caller {
    endpoint: quinn::Endpoint,
    connections: Mutex<HashMap<String, quinn::Connection>>,
    faults: Faults,
}

impl Caller {
    pub fn new(endpoint: quinn::Endpoint) -> Caller {
        Caller {
            endpoint,
            connections: Mutex::new(HashMap::new()),
            faults: Faults::default(),
        }
    }

    /// The fault rules every call through this caller obeys (the service checks the same
    /// rules for the calls it serves).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Sends one request to `address` (`HOST:PORT`) and waits for the answer at most
    /// [`CALL_TIMEOUT_SECONDS`]. The error is a sentence saying why no answer came.
    ///
    /// A kept connection can be dead without knowing it (the peer restarted); when a call
    /// on it fails, the call is made once more on a fresh connection. Every request sent
    /// through here may be repeated: cluster requests carry request ids, and the node
    /// requests the leader sends are checked against the node's state (session commands
    /// carry the request id, which the node remembers).
    ///
    /// With `expected_node`, the peer's certificate must name that node; the request is not
    /// sent otherwise.
    pub async fn call(
        &self,
        address: &str,
        expected_node: Option<&str>,
        request: &Request,
    ) -> Result<Response, String> {
        self.call_within(
            address,
            expected_node,
            request,
            Duration::from_secs(CALL_TIMEOUT_SECONDS),
        )
        .await
    }

    /// [`Caller::call`] with the caller's own patience: `timeout` bounds the exchange once
    /// connected (and the connection, when it is shorter than [`CONNECT_TIMEOUT_SECONDS`]).
    /// The fault rule of the peer applies first: the peer is `expected_node`, or else the
    /// node the connection's certificate names.
    pub async fn call_within(
        &self,
        address: &str,
        expected_node: Option<&str>,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, String> {
        // A rule applies once per call, even when the call is made again on a fresh
        // connection below.
        let mut faults_obeyed = false;
        if let Some(peer) = expected_node {
            obey_faults(&self.faults, peer, timeout).await?;
            faults_obeyed = true;
        }
        let cached = self.connections.lock().get(address).cloned();
        if let Some(connection) = cached.filter(|connection| connection.close_reason().is_none()) {
            if !faults_obeyed {
                if let Some(peer) = node_of(&connection) {
                    obey_faults(&self.faults, &peer, timeout).await?;
                    faults_obeyed = true;
                }
            }
            match self
                .call_on(address, connection, expected_node, request, timeout)
                .await
            {
                Ok(response) => return Ok(response),
                Err(detail) => {
                    tracing::debug!(%address, %detail, "kept connection failed; reconnecting")
                }
            }
        }
        let connect_timeout = timeout.min(Duration::from_secs(CONNECT_TIMEOUT_SECONDS));
        let connection = tokio::time::timeout(connect_timeout, async {
            let socket = resolve(address).await?;
            protocol::transport::connect(&self.endpoint, socket)
                .await
                .map_err(|error| error.to_string())
        })
        .await
        .map_err(|_| format!("no connection within {} ms", connect_timeout.as_millis()))??;
        self.connections
            .lock()
            .insert(address.to_string(), connection.clone());
        if !faults_obeyed {
            if let Some(peer) = node_of(&connection) {
                obey_faults(&self.faults, &peer, timeout).await?;
            }
        }
        self.call_on(address, connection, expected_node, request, timeout)
            .await
    }

    async fn call_on(
        &self,
        address: &str,
        connection: quinn::Connection,
        expected_node: Option<&str>,
        request: &Request,
        timeout: Duration,
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
        let outcome = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {} ms", timeout.as_millis()),
        };
        self.connections.lock().remove(address);
        Err(outcome)
    }
}
