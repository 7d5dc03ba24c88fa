//! How the run talks to the cluster: the `tandem` CLI for cluster commands, as an
//! operator's script would (every call recorded in the history, so the liveness checker
//! sees its time), and direct admin calls to one node for what only that node knows (its
//! own volumes and slots) and for fault rules.

use crate::history::{History, Operation, Outcome};
use crate::Error;
use protocol::messages::{Request, Response};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Sends one request to the node at `address` with the admin certificate.
pub async fn node_call(
    certs: &Path,
    node: &str,
    address: SocketAddr,
    request: Request,
) -> Result<Response, Error> {
    let failed = |detail: String| Error::Call {
        node: node.to_string(),
        detail,
    };
    let call = async {
        let identity = protocol::pki::Identity::load(certs, protocol::pki::ADMIN_NAME)
            .map_err(|error| failed(error.to_string()))?;
        let endpoint = protocol::transport::client_endpoint(&identity)
            .map_err(|error| failed(error.to_string()))?;
        let connection = protocol::transport::connect(&endpoint, address)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let response: Result<Response, _> = protocol::transport::call(&connection, &request).await;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        match response.map_err(|error| failed(error.to_string()))? {
            Response::Error { code, message } => Err(failed(format!("{message} [{code}]"))),
            response => Ok(response),
        }
    };
    tokio::time::timeout(Duration::from_secs(NODE_CALL_TIMEOUT_SECONDS), call)
        .await
        .map_err(|_| failed(format!("no answer within {NODE_CALL_TIMEOUT_SECONDS} s")))?
}
