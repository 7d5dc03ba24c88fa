//! How the run talks to the cluster: the `tandem` CLI for cluster commands, as an
//! operator's script would (every call recorded in the history, so the liveness checker
//! sees its time), and direct admin calls to one node for what only that node knows (its
//! own volumes and slots) and for fault rules.

use crate::history::{History, Operation, Outcome};
use crate::Error;
use protocol::messages::{Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a call waits on a kept connection before it tries a new one.
pub const KEPT_CONNECTION_PATIENCE_MILLISECONDS: u64 = 2_000;
/// How long one direct call to a node may take.
pub const NODE_CALL_TIMEOUT_SECONDS: u64 = 10;

#[derive(Clone)]
pub struct Cli {
    pub tandem: PathBuf,
    pub certs: PathBuf,
    pub history: History,
    /// A command still running after this long is killed and recorded as unknown (the
    /// liveness checker reports it).
    pub timeout: Duration,
}

impl Cli {
    /// Runs `tandem ARGUMENTS` against the node at `endpoint`; its standard output, or
    /// what it said on failure.
    pub async fn run(&self, endpoint: SocketAddr, arguments: &[&str]) -> Result<String, String> {
        let operation = self.history.invoke(
            "cli",
            Operation::Command {
                arguments: arguments
                    .iter()
                    .map(|argument| argument.to_string())
                    .collect(),
            },
        );
        let child = tokio::process::Command::new(&self.tandem)
            .args(arguments)
            .env("TANDEM_ENDPOINT", endpoint.to_string())
            .env("TANDEM_CERTS", &self.certs)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.timeout, child).await {
            Err(_) => {
                let detail = format!("no answer within {} s", self.timeout.as_secs());
                self.history
                    .end(operation, Outcome::Unknown, Some(detail.clone()));
                Err(detail)
            }
            Ok(Err(error)) => {
                let detail = format!("cannot run {}: {error}", self.tandem.display());
                self.history
                    .end(operation, Outcome::Fail, Some(detail.clone()));
                Err(detail)
            }
            Ok(Ok(output)) if output.status.success() => {
                self.history.end(operation, Outcome::Ok, None);
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            }
            Ok(Ok(output)) => {
                let detail = String::from_utf8_lossy(&output.stderr).trim().to_string();
                self.history
                    .end(operation, Outcome::Fail, Some(detail.clone()));
                Err(detail)
            }
        }
    }

    /// [`Cli::run`] of a command given `--json`, parsed.
    pub async fn json(
        &self,
        endpoint: SocketAddr,
        arguments: &[&str],
    ) -> Result<serde_json::Value, String> {
        let output = self.run(endpoint, arguments).await?;
        serde_json::from_str(&output)
            .map_err(|error| format!("`tandem {}` printed no JSON: {error}", arguments.join(" ")))
    }
}

/// Direct admin calls to nodes, with the admin certificate, over one client endpoint and
/// one connection per node kept open between calls: a new endpoint, certificate load and
/// handshake (and the close's drain) per call took longer than the call, and a round
/// makes dozens (fault rules both ways, every node's volume list twice).
///
/// A connection is bound to the runtime that made it, so each runtime has its own caller.
pub struct NodeCaller {
    certs: PathBuf,
    endpoint: Option<quinn::Endpoint>,
    connections: HashMap<SocketAddr, quinn::Connection>,
}

impl NodeCaller {
    pub fn new(certs: &Path) -> NodeCaller {
        NodeCaller {
            certs: certs.to_path_buf(),
            endpoint: None,
            connections: HashMap::new(),
        }
    }

    /// Sends `request` to the node at `address`. A kept connection that fails (its node
    /// restarted) is dropped and the call made once more on a new one.
    pub async fn call(
        &mut self,
        node: &str,
        address: SocketAddr,
        request: Request,
    ) -> Result<Response, Error> {
        let failed = |detail: String| Error::Call {
            node: node.to_string(),
            detail,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(NODE_CALL_TIMEOUT_SECONDS);
        let timed_out = || failed(format!("no answer within {NODE_CALL_TIMEOUT_SECONDS} s"));
        let kept = self
            .connections
            .get(&address)
            .filter(|connection| connection.close_reason().is_none())
            .cloned();
        let mut last = None;
        for connection in kept.into_iter().map(Some).chain(std::iter::once(None)) {
            // A kept connection gets a short while: one to a container that was cut off
            // and reconnected, or whose node restarted elsewhere, may never answer, and
            // only a new connection may take the call's whole bound.
            let fresh = connection.is_none();
            let until = if fresh {
                deadline
            } else {
                deadline.min(
                    tokio::time::Instant::now()
                        + Duration::from_millis(KEPT_CONNECTION_PATIENCE_MILLISECONDS),
                )
            };
            let connection = match connection {
                Some(connection) => connection,
                None => {
                    let connecting = self.connect(address);
                    match tokio::time::timeout_at(deadline, connecting).await {
                        Ok(Ok(connection)) => connection,
                        Ok(Err(detail)) => return Err(failed(detail)),
                        Err(_) => return Err(timed_out()),
                    }
                }
            };
            let call = protocol::transport::call::<Request, Response>(&connection, &request);
            match tokio::time::timeout_at(until, call).await {
                Err(_) if fresh => {
                    self.connections.remove(&address);
                    return Err(timed_out());
                }
                Err(_) => {
                    self.connections.remove(&address);
                    last = Some("the kept connection did not answer".to_string());
                }
                Ok(Err(error)) => {
                    self.connections.remove(&address);
                    last = Some(error.to_string());
                }
                Ok(Ok(Response::Error { code, message })) => {
                    return Err(failed(format!("{message} [{code}]")))
                }
                Ok(Ok(response)) => return Ok(response),
            }
        }
        Err(failed(last.unwrap_or_default()))
    }

    async fn connect(&mut self, address: SocketAddr) -> Result<quinn::Connection, String> {
        if self.endpoint.is_none() {
            let identity = protocol::pki::Identity::load(&self.certs, protocol::pki::ADMIN_NAME)
                .map_err(|error| error.to_string())?;
            self.endpoint = Some(
                protocol::transport::client_endpoint(&identity)
                    .map_err(|error| error.to_string())?,
            );
        }
        let endpoint = self.endpoint.as_ref().expect("made above");
        let connection = protocol::transport::connect(endpoint, address)
            .await
            .map_err(|error| error.to_string())?;
        self.connections.insert(address, connection.clone());
        Ok(connection)
    }
}
