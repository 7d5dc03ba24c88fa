//! QUIC endpoints with mutual TLS between the members of one cluster.
//!
//! Both sides present a certificate signed by the cluster CA and accept only peers whose
//! certificate is signed by it too. Nodes are verified under the shared name
//! [`NODE_SERVER_NAME`], so a client needs the cluster CA but not the node's own name.
//!
//! Every request uses its own bidirectional stream: the client writes one request frame and
//! finishes the stream, the server answers with one response frame.

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame, FrameKind};
use crate::pki::{Identity, ADMIN_CERTIFICATE_NAME, NODE_SERVER_NAME};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol both sides must agree on; the number follows the frame protocol
/// version so that incompatible peers fail in the handshake with a clear reason.
pub const ALPN_PROTOCOL: &[u8] = b"tandem/1";

/// A connection with no traffic at all for this long is considered dead.
pub const IDLE_TIMEOUT_SECONDS: u64 = 30;

/// Keep-alives are sent this often so an idle but healthy connection never reaches the idle
/// timeout, even through NAT or firewall state that expires quickly.
pub const KEEP_ALIVE_INTERVAL_SECONDS: u64 = 5;

/// How long a connection attempt, handshake included, may take before it is given up.
pub const CONNECT_TIMEOUT_SECONDS: u64 = 10;

/// How long a server waits for a client to send a complete request frame on a stream, so a
/// stream that was opened and then left silent does not hold a task forever.
pub const REQUEST_READ_TIMEOUT_SECONDS: u64 = 30;

/// Application error code sent when a stream is reset because its request was unusable.
const STREAM_ERROR_MALFORMED_REQUEST: u32 = 1;

/// The QUIC close code for a connection whose certificate names no node and no admin.
const CONNECTION_ERROR_UNKNOWN_ROLE: u32 = 2;

/// The *ring* provider, chosen explicitly so the configuration never depends on which
/// provider some other part of the process installed as its default.
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(context: &str, error: impl std::fmt::Display) -> Error {
    Error::Tls {
        detail: format!("{context}: {error}"),
    }
}

/// A root store holding only the cluster CA.
fn cluster_roots(identity: &Identity) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(identity.ca_cert_der.clone())
        .map_err(|error| tls_error("the cluster CA certificate is unusable", error))?;
    Ok(Arc::new(roots))
}

/// The largest UDP payload path MTU discovery tries: a 9000-byte jumbo frame less the
/// IPv6 and UDP headers.
pub const UDP_PAYLOAD_BYTES_MAX: u16 = 8_952;

/// Idle timeout, keep-alive and MTU discovery, shared by both directions of every
/// connection.
fn transport_config() -> Result<Arc<quinn::TransportConfig>> {
    let idle_timeout = quinn::IdleTimeout::try_from(Duration::from_secs(IDLE_TIMEOUT_SECONDS))
        .map_err(|error| tls_error("the idle timeout is out of range", error))?;
    let mut transport = quinn::TransportConfig::default();
    // Path MTU discovery may grow packets up to a jumbo frame: a copy moves gigabytes, and
    // every packet carries its own headers and AEAD tag. Where the path carries only
    // 1500-byte frames, the probes above it are lost and packets stay at what works.
    let mut mtu_discovery = quinn::MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(UDP_PAYLOAD_BYTES_MAX);
    transport
        .max_idle_timeout(Some(idle_timeout))
        .keep_alive_interval(Some(Duration::from_secs(KEEP_ALIVE_INTERVAL_SECONDS)))
        .mtu_discovery_config(Some(mtu_discovery));
    Ok(Arc::new(transport))
}

/// The server side: TLS 1.3 only, a client certificate from the cluster CA required, and
/// 0-RTT refused because early data can be replayed and requests here change state.
fn server_config(identity: &Identity) -> Result<quinn::ServerConfig> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(cluster_roots(identity)?, provider.clone())
            .build()
            .map_err(|error| tls_error("cannot build the client certificate verifier", error))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| tls_error("TLS 1.3 is unavailable", error))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            identity.cert_chain.clone(),
            identity.private_key.clone_key(),
        )
        .map_err(|error| tls_error("the server certificate or key is unusable", error))?;
    tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|error| tls_error("the TLS configuration does not suit QUIC", error))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config()?);
    Ok(config)
}

/// The client side: TLS 1.3 only, the server verified against the cluster CA alone, our
/// certificate presented, and no 0-RTT.
fn client_config(identity: &Identity) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| tls_error("TLS 1.3 is unavailable", error))?
        .with_root_certificates(cluster_roots(identity)?)
        .with_client_auth_cert(
            identity.cert_chain.clone(),
            identity.private_key.clone_key(),
        )
        .map_err(|error| tls_error("the client certificate or key is unusable", error))?;
    tls.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|error| tls_error("the TLS configuration does not suit QUIC", error))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config()?);
    Ok(config)
}

/// An endpoint that accepts connections on `bind` and can also connect out with the same
/// identity, as nodes both serve and call each other. Must be called inside a Tokio runtime.
/// Endpoint keys derived from the node's private key, so that a restarted process has the
/// same ones: the key that signs stateless resets, and the key that makes connection ids
/// verifiable. With both, a peer still holding a connection to the previous process gets
/// a valid reset at its first packet and reconnects at once, instead of waiting for an
/// idle timeout; that matters when a Raft member or a leader restarts.
fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let derive = |purpose: &[u8]| {
        ring::digest::digest(
            &ring::digest::SHA256,
            &[purpose, identity.private_key.secret_der()].concat(),
        )
    };
    let reset_secret = derive(b"tandem stateless reset key\0");
    let cid_secret = derive(b"tandem connection id key\0");
    let mut cid_key_bytes = [0u8; 8];
    cid_key_bytes.copy_from_slice(&cid_secret.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key_bytes);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_secret.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The UDP socket buffers a node asks for (the kernel caps them at `net.core.rmem_max`
/// and `wmem_max`). The default of about 200 KiB overflows when a copy step's 64 tracks
/// arrive at once: dropped datagrams cost retransmissions and a congestion window cut.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A UDP socket bound to `bind` with [`UDP_SOCKET_BUFFER_BYTES`] buffers.
fn udp_socket(bind: SocketAddr) -> Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer only costs throughput.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

pub fn server_endpoint(bind: SocketAddr, identity: &Identity) -> Result<quinn::Endpoint> {
    let socket = udp_socket(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| Error::Connection {
        peer: bind.to_string(),
        detail: "no async runtime to run the QUIC endpoint on".into(),
    })?;
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config(identity),
        Some(server_config(identity)?),
        socket,
        runtime,
    )?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// A client-only endpoint on an ephemeral IPv4 port, for reaching IPv4 peers. Must be called
/// inside a Tokio runtime.
pub fn client_endpoint(identity: &Identity) -> Result<quinn::Endpoint> {
    client_endpoint_bound(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), identity)
}

/// A client-only endpoint bound to `bind`, for example `[::]:0` to reach IPv6 peers: the
/// bound address family must match the peers' because dual-stack sockets are not portable.
pub fn client_endpoint_bound(bind: SocketAddr, identity: &Identity) -> Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// Connects to the node at `address`, verifying it against the cluster CA.
pub async fn connect(endpoint: &quinn::Endpoint, address: SocketAddr) -> Result<quinn::Connection> {
    let connection_error = |detail: String| Error::Connection {
        peer: address.to_string(),
        detail,
    };
    let connecting = endpoint
        .connect(address, NODE_SERVER_NAME)
        .map_err(|error| connection_error(format!("cannot start connecting: {error}")))?;
    match tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_SECONDS), connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(connection_error(format!("handshake failed: {error}"))),
        Err(_) => Err(connection_error(format!(
            "no answer within {CONNECT_TIMEOUT_SECONDS} seconds"
        ))),
    }
}

/// Sends `request` on a new stream of `connection` and waits for the one response.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    connection: &quinn::Connection,
    request: &Req,
) -> Result<Resp> {
    let peer = connection.remote_address().to_string();
    // A stream failure caused by the whole connection going away is reported as a
    // connection error, with the connection's reason, which says far more than the stream's.
    let explain = |error: Error| match connection.close_reason() {
        Some(reason) => Error::Connection {
            peer: peer.clone(),
            detail: reason.to_string(),
        },
        None => error,
    };
    let (mut send, mut receive) =
        connection
            .open_bi()
            .await
            .map_err(|error| Error::Connection {
                peer: peer.clone(),
                detail: format!("cannot open a stream: {error}"),
            })?;
    write_frame(&mut send, FrameKind::Request, request)
        .await
        .map_err(explain)?;
    send.finish().map_err(|error| {
        explain(Error::Stream {
            stream: send.id().to_string(),
            detail: error.to_string(),
        })
    })?;
    let (header, response) = read_frame::<Resp>(&mut receive).await.map_err(explain)?;
    if header.kind != FrameKind::Response {
        return Err(Error::FrameKindUnexpected {
            expected: FrameKind::Response,
            found: header.kind,
        });
    }
    Ok(response)
}

/// Serves requests on `connection` until it closes: each bidirectional stream carries one
/// request, answered by `handler` in a task of its own so a slow request does not hold up
/// the others.
///
/// A stream whose request is malformed is reset and logged; the connection goes on serving
/// its other streams.
/// Who is on the other end of a connection, as its certificate says. The CA signed the
/// certificate, so the name is as trustworthy as the CA's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// A node certificate, with the node's name.
    Node(String),
    /// The admin CLI's certificate.
    Admin,
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRole::Node(name) => write!(formatter, "node {name}"),
            PeerRole::Admin => formatter.write_str("admin"),
        }
    }
}

/// The caller of one request: where it connects from and who its certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub address: SocketAddr,
    pub role: PeerRole,
}

/// Reads the role from the certificate the peer presented in the TLS handshake. Node
/// certificates carry the node's name beside [`NODE_SERVER_NAME`]; the admin's carries
/// [`ADMIN_CERTIFICATE_NAME`].
pub fn peer_role(connection: &quinn::Connection) -> Result<PeerRole> {
    let refuse = |detail: &str| Error::Connection {
        peer: connection.remote_address().to_string(),
        detail: detail.to_string(),
    };
    let identity = connection
        .peer_identity()
        .ok_or_else(|| refuse("the peer presented no certificate"))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| refuse("the peer's identity is not a certificate chain"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| refuse("the peer's certificate chain is empty"))?;
    let certificate = webpki::EndEntityCert::try_from(leaf)
        .map_err(|_| refuse("the peer's certificate cannot be parsed"))?;
    let names: Vec<&str> = certificate.valid_dns_names().collect();
    if names.contains(&ADMIN_CERTIFICATE_NAME) {
        return Ok(PeerRole::Admin);
    }
    if names.contains(&NODE_SERVER_NAME) {
        if let Some(name) = names.iter().find(|name| **name != NODE_SERVER_NAME) {
            return Ok(PeerRole::Node((*name).to_string()));
        }
    }
    Err(refuse(
        "the peer's certificate names neither a node nor the admin",
    ))
}

/// Serves every request stream of one connection with `handler`, which learns who the
/// caller is. A connection whose certificate names no role is closed at once.
pub async fn serve_connection<Req, Resp, H, Fut>(connection: quinn::Connection, handler: H)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(Peer, Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let address = connection.remote_address();
    let role = match peer_role(&connection) {
        Ok(role) => role,
        Err(error) => {
            tracing::warn!(peer = %address, %error, "refusing the connection");
            connection.close(
                quinn::VarInt::from_u32(CONNECTION_ERROR_UNKNOWN_ROLE),
                b"unknown role",
            );
            return;
        }
    };
    let peer = Peer { address, role };
    loop {
        let (send, receive) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(error) => {
                tracing::debug!(peer = %address, %error, "connection closed; no more requests");
                return;
            }
        };
        let handler = handler.clone();
        let caller = peer.clone();
        tokio::spawn(serve_stream(address, send, receive, move |request| {
            handler(caller.clone(), request)
        }));
    }
}

async fn serve_stream<Req, Resp, H, Fut>(
    peer: SocketAddr,
    mut send: quinn::SendStream,
    mut receive: quinn::RecvStream,
    handler: H,
) where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Req) -> Fut,
    Fut: Future<Output = Resp>,
{
    let stream = send.id();
    let read = tokio::time::timeout(
        Duration::from_secs(REQUEST_READ_TIMEOUT_SECONDS),
        read_frame::<Req>(&mut receive),
    )
    .await;
    let request = match read {
        Ok(Ok((header, request))) if header.kind == FrameKind::Request => request,
        Ok(Ok((header, _))) => {
            tracing::warn!(%peer, %stream, kind = ?header.kind, "expected a request frame; resetting the stream");
            refuse_stream(&mut send, &mut receive);
            return;
        }
        Ok(Err(error)) => {
            tracing::warn!(%peer, %stream, %error, "unusable request; resetting the stream");
            refuse_stream(&mut send, &mut receive);
            return;
        }
        Err(_) => {
            tracing::warn!(
                %peer,
                %stream,
                "no complete request within {REQUEST_READ_TIMEOUT_SECONDS} seconds; resetting the stream"
            );
            refuse_stream(&mut send, &mut receive);
            return;
        }
    };
    let response = handler(request).await;
    if let Err(error) = write_frame(&mut send, FrameKind::Response, &response).await {
        tracing::warn!(%peer, %stream, %error, "could not send the response");
        refuse_stream(&mut send, &mut receive);
        return;
    }
    // A stream that is already gone has nothing left to finish; the peer sees the failure.
    if let Err(error) = send.finish() {
        tracing::debug!(%peer, %stream, %error, "stream closed before it could be finished");
    }
}

/// Abandons both directions of a stream, telling the peer it was refused.
fn refuse_stream(send: &mut quinn::SendStream, receive: &mut quinn::RecvStream) {
    let code = quinn::VarInt::from_u32(STREAM_ERROR_MALFORMED_REQUEST);
    // Either direction may already be closed by the peer; that leaves nothing to refuse.
    let _ = send.reset(code);
    let _ = receive.stop(code);
}
