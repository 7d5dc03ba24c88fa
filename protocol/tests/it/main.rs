//! Cross-module tests of the protocol crate: real QUIC connections with mutual TLS on
//! loopback, using certificates made by `pki::init_cluster`.

use protocol::frame::{encode_frame, FrameKind};
use protocol::messages::{ErrorCode, Request, Response};
use protocol::pki::{init_cluster, Identity};
use protocol::transport::{
    call, client_endpoint, connect, serve_connection, server_endpoint, Peer,
};
use protocol::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// No test here may hang: every network step is bounded by this.
const TEST_STEP_TIMEOUT_SECONDS: u64 = 20;

async fn bounded<T>(step: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(TEST_STEP_TIMEOUT_SECONDS), step)
        .await
        .expect("a network step took too long")
}

fn make_cluster(dir: &Path) {
    init_cluster(dir, &["node-a".to_owned(), "node-b".to_owned()]).unwrap();
}

/// Answers `VolumeShow { name }` with `Deleted { name }` so tests can see that the request
/// arrived intact and the response came back from the handler.
async fn echo(peer: Peer, request: Request) -> Response {
    match request {
        Request::VolumeShow { name } => Response::Deleted { name },
        // Answers with who the server saw, for the authorization-by-identity test.
        Request::NodeStatus => Response::Deleted {
            name: peer.role.to_string(),
        },
        other => Response::Error {
            code: ErrorCode::InvalidArgument,
            message: format!("{other:?}"),
        },
    }
}

/// Starts a server endpoint on loopback that serves every connection with `echo`.
fn start_server(identity: &Identity) -> (quinn::Endpoint, SocketAddr) {
    let endpoint = server_endpoint("127.0.0.1:0".parse().unwrap(), identity).unwrap();
    let address = endpoint.local_addr().unwrap();
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                if let Ok(connection) = incoming.await {
                    serve_connection(connection, echo).await;
                }
            });
        }
    });
    (endpoint, address)
}

fn show(name: &str) -> Request {
    Request::VolumeShow {
        name: name.to_owned(),
    }
}

#[tokio::test]
async fn an_admin_of_the_same_cluster_can_call_a_node() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let (_server, address) = start_server(&Identity::load(directory.path(), "node-a").unwrap());

    let client = client_endpoint(&Identity::load(directory.path(), "admin").unwrap()).unwrap();
    let connection = bounded(connect(&client, address)).await.unwrap();
    let response: Response = bounded(call(&connection, &show("alpha"))).await.unwrap();
    assert_eq!(
        response,
        Response::Deleted {
            name: "alpha".to_owned()
        }
    );
    let response: Response = bounded(call(&connection, &Request::VolumeList))
        .await
        .unwrap();
    assert!(matches!(
        response,
        Response::Error {
            code: ErrorCode::InvalidArgument,
            ..
        }
    ));
}

#[tokio::test]
async fn the_server_learns_the_callers_name_from_its_certificate() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let (_server, address) = start_server(&Identity::load(directory.path(), "node-a").unwrap());
    for (identity, expected) in [("admin", "admin"), ("node-b", "node node-b")] {
        let client = client_endpoint(&Identity::load(directory.path(), identity).unwrap()).unwrap();
        let connection = bounded(connect(&client, address)).await.unwrap();
        let response: Response = bounded(call(&connection, &Request::NodeStatus))
            .await
            .unwrap();
        assert_eq!(
            response,
            Response::Deleted {
                name: expected.to_owned()
            }
        );
    }
}

#[tokio::test]
async fn many_calls_share_one_connection_concurrently() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let (_server, address) = start_server(&Identity::load(directory.path(), "node-a").unwrap());
    let client = client_endpoint(&Identity::load(directory.path(), "admin").unwrap()).unwrap();
    let connection = bounded(connect(&client, address)).await.unwrap();

    let mut calls = Vec::new();
    for index in 0..20 {
        let connection = connection.clone();
        calls.push(tokio::spawn(async move {
            let name = format!("volume-{index}");
            let response: Response = call(&connection, &show(&name)).await.unwrap();
            assert_eq!(response, Response::Deleted { name });
        }));
    }
    for handle in calls {
        bounded(handle).await.unwrap();
    }
}

#[tokio::test]
async fn nodes_call_each_other_from_their_server_endpoints() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let (_server_a, address_a) = start_server(&Identity::load(directory.path(), "node-a").unwrap());
    let (server_b, _address_b) = start_server(&Identity::load(directory.path(), "node-b").unwrap());

    let connection = bounded(connect(&server_b, address_a)).await.unwrap();
    let response: Response = bounded(call(&connection, &show("from-b"))).await.unwrap();
    assert_eq!(
        response,
        Response::Deleted {
            name: "from-b".to_owned()
        }
    );
}

#[tokio::test]
async fn a_malformed_stream_is_refused_and_the_connection_keeps_serving() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let (_server, address) = start_server(&Identity::load(directory.path(), "node-a").unwrap());
    let client = client_endpoint(&Identity::load(directory.path(), "admin").unwrap()).unwrap();
    let connection = bounded(connect(&client, address)).await.unwrap();

    // Garbage instead of a frame.
    let (mut send, mut receive) = bounded(connection.open_bi()).await.unwrap();
    send.write_all(b"definitely not a tandem frame")
        .await
        .unwrap();
    send.finish().unwrap();
    let answer = bounded(receive.read_to_end(1024)).await;
    assert!(answer.is_err(), "the server answered garbage: {answer:?}");

    // A well-formed frame of the wrong kind.
    let (mut send, mut receive) = bounded(connection.open_bi()).await.unwrap();
    let response_frame = encode_frame(FrameKind::Response, &show("sneaky")).unwrap();
    send.write_all(&response_frame).await.unwrap();
    send.finish().unwrap();
    let answer = bounded(receive.read_to_end(1024)).await;
    assert!(
        answer.is_err(),
        "the server answered a response frame: {answer:?}"
    );

    // A valid header whose body ends early.
    let (mut send, mut receive) = bounded(connection.open_bi()).await.unwrap();
    let request_frame = encode_frame(FrameKind::Request, &show("cut short")).unwrap();
    send.write_all(&request_frame[..request_frame.len() - 2])
        .await
        .unwrap();
    send.finish().unwrap();
    let answer = bounded(receive.read_to_end(1024)).await;
    assert!(
        answer.is_err(),
        "the server answered a truncated frame: {answer:?}"
    );

    let response: Response = bounded(call(&connection, &show("still-alive")))
        .await
        .unwrap();
    assert_eq!(
        response,
        Response::Deleted {
            name: "still-alive".to_owned()
        }
    );
}

#[tokio::test]
async fn a_client_certificate_from_another_cluster_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    make_cluster(ours.path());
    make_cluster(theirs.path());
    let (_server, address) = start_server(&Identity::load(ours.path(), "node-a").unwrap());

    // The stranger trusts our CA, so only the server's check of the client certificate
    // stands between it and the node.
    let mut stranger = Identity::load(theirs.path(), "admin").unwrap();
    stranger.ca_cert_der = Identity::load(ours.path(), "admin").unwrap().ca_cert_der;
    let client = client_endpoint(&stranger).unwrap();
    let outcome = bounded(async {
        let connection = connect(&client, address).await?;
        call::<Request, Response>(&connection, &show("intruder")).await
    })
    .await;
    assert!(
        matches!(outcome, Err(Error::Connection { .. })),
        "a foreign client certificate was accepted: {outcome:?}"
    );

    // A whole foreign identity, CA included, fails as well.
    let client = client_endpoint(&Identity::load(theirs.path(), "admin").unwrap()).unwrap();
    let outcome = bounded(async {
        let connection = connect(&client, address).await?;
        call::<Request, Response>(&connection, &show("intruder")).await
    })
    .await;
    assert!(
        outcome.is_err(),
        "a foreign cluster was accepted: {outcome:?}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_cluster_ca_refuses_the_server() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    make_cluster(ours.path());
    make_cluster(theirs.path());
    let (_server, address) = start_server(&Identity::load(ours.path(), "node-a").unwrap());

    // Our own admin certificate, which the server accepts, but another CA to verify with.
    let mut misconfigured = Identity::load(ours.path(), "admin").unwrap();
    misconfigured.ca_cert_der = Identity::load(theirs.path(), "admin").unwrap().ca_cert_der;
    let client = client_endpoint(&misconfigured).unwrap();
    match bounded(connect(&client, address)).await {
        Err(Error::Connection { peer, detail }) => {
            assert_eq!(peer, address.to_string());
            assert!(detail.contains("handshake"), "{detail}");
        }
        other => panic!("the client accepted an untrusted server: {other:?}"),
    }
}

#[tokio::test]
async fn the_admin_certificate_cannot_serve() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    // The admin certificate lacks the server usage and the node server name, so a node must
    // not accept it as a server even though the cluster CA signed it.
    let (_server, address) = start_server(&Identity::load(directory.path(), "admin").unwrap());
    let client = client_endpoint(&Identity::load(directory.path(), "node-b").unwrap()).unwrap();
    assert!(matches!(
        bounded(connect(&client, address)).await,
        Err(Error::Connection { .. })
    ));
}

#[tokio::test]
async fn connecting_to_nobody_fails_with_the_peer_named() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let client = client_endpoint(&Identity::load(directory.path(), "admin").unwrap()).unwrap();
    // A port we bound and then released, so nothing answers there.
    let address = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    match bounded(connect(&client, address)).await {
        Err(Error::Connection { peer, .. }) => assert_eq!(peer, address.to_string()),
        other => panic!("connected to nobody: {other:?}"),
    }
}

#[tokio::test]
async fn large_messages_cross_in_both_directions() {
    let directory = tempfile::tempdir().unwrap();
    make_cluster(directory.path());
    let (_server, address) = start_server(&Identity::load(directory.path(), "node-a").unwrap());
    let client = client_endpoint(&Identity::load(directory.path(), "admin").unwrap()).unwrap();
    let connection = bounded(connect(&client, address)).await.unwrap();

    // Large enough to span many QUIC packets and stream chunks on the way in and out.
    let name = "x".repeat(3 * 1024 * 1024);
    let response: Response = bounded(call(&connection, &show(&name))).await.unwrap();
    assert_eq!(response, Response::Deleted { name });
}
