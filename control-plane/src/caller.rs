//! Calls from one process to nodes and members, over connections kept open for reuse.

use crate::network;
use parking_lot::Mutex;
use protocol::messages::{Request, Response};
use std::collections::HashMap;
use std::time::Duration;

/// How long one call to a node or member may take, connecting included.
pub const CALL_TIMEOUT_SECONDS: u64 = 10;

/// A QUIC endpoint and the connections it holds open, by address.
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
    pub async fn call(&self, address: &str, request: &Request) -> Result<Response, String> {
        let exchange = async {
            let cached = self.connections.lock().get(address).cloned();
            let connection = match cached {
                Some(connection) if connection.close_reason().is_none() => connection,
                _ => {
                    let socket = network::resolve(address).await?;
                    let connection = protocol::transport::connect(&self.endpoint, socket)
                        .await
                        .map_err(|error| error.to_string())?;
                    self.connections
                        .lock()
                        .insert(address.to_string(), connection.clone());
                    connection
                }
            };
            protocol::transport::call::<Request, Response>(&connection, request)
                .await
                .map_err(|error| error.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(CALL_TIMEOUT_SECONDS), exchange).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(detail)) => {
                self.connections.lock().remove(address);
                Err(detail)
            }
            Err(_) => {
                self.connections.lock().remove(address);
                Err(format!("no answer within {CALL_TIMEOUT_SECONDS} seconds"))
            }
        }
    }
}
