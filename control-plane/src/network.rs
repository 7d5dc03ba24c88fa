//! Raft messages between members, over the same QUIC transport (mutual TLS) as every
//! other tandem message; the fault rules of the process's [`Caller`] (drop, delay per
//! peer) apply to them as to every call between nodes.
//!
//! A member accepts a Raft message only from a peer whose certificate names a member of
//! its current membership, and only when the message claims to come from that member:
//! being signed by the cluster CA is not enough.

use crate::caller::Caller;
use crate::types::{Raft, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::AnyError;
use protocol::cluster::{member_id, Member, MemberId};
use protocol::messages::{ErrorCode, Request, Response};
use protocol::transport::{Peer, PeerRole};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A Raft message from one member to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftMessage {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<MemberId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The receiving member's answer to a [`RaftMessage`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftAnswer {
    AppendEntries(Result<AppendEntriesResponse<MemberId>, RaftError<MemberId>>),
    Vote(Result<VoteResponse<MemberId>, RaftError<MemberId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<MemberId>, RaftError<MemberId, InstallSnapshotError>>,
    ),
}

/// Makes one [`QuicNetwork`] per target member; they share the endpoint, its connections
/// and its fault rules.
#[derive(Clone)]
pub struct QuicNetworkFactory {
    pub caller: Arc<Caller>,
}

impl RaftNetworkFactory<TypeConfig> for QuicNetworkFactory {
    type Network = QuicNetwork;

    async fn new_client(&mut self, target: MemberId, node: &Member) -> QuicNetwork {
        QuicNetwork {
            caller: self.caller.clone(),
            target,
            member: node.clone(),
        }
    }
}

/// The link to one member, over the process's shared connections: one stream per message.
pub struct QuicNetwork {
    caller: Arc<Caller>,
    target: MemberId,
    member: Member,
}

fn unreachable<E: std::error::Error>(detail: String) -> RPCError<MemberId, Member, E> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(detail)))
}

impl QuicNetwork {
    /// Sends one message and waits for the answer, within the time openraft allows.
    async fn send(
        &mut self,
        message: RaftMessage,
        option: &RPCOption,
    ) -> Result<RaftAnswer, String> {
        let bytes = protocol::codec::encode(&message).map_err(|error| error.to_string())?;
        // The callee must prove it is the member: Raft messages go to no one else.
        let request = Request::Raft(bytes);
        // The caller applies the fault rules for the member (drop, delay), as for every
        // other call between nodes.
        let exchange = self.caller.call_within(
            &self.member.address,
            Some(&self.member.name),
            &request,
            option.hard_ttl(),
        );
        let response = tokio::time::timeout(option.hard_ttl(), exchange)
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {:?}",
                    self.member,
                    option.hard_ttl()
                )
            })??;
        match response {
            Response::Raft(bytes) => protocol::codec::decode::<RaftAnswer>(&bytes)
                .map_err(|error| format!("undecodable answer from {}: {error}", self.member)),
            Response::Error { code, message } => {
                Err(format!("{} refused: {code}: {message}", self.member))
            }
            other => Err(format!("unexpected answer from {}: {other:?}", self.member)),
        }
    }
}

/// The error type openraft expects from one kind of Raft call.
type CallError<E> = RPCError<MemberId, Member, RaftError<MemberId, E>>;

impl QuicNetwork {
    /// Sends `message` and takes the answer of the expected kind out of the reply: the
    /// remote member's own error becomes a remote error, any failure to get an answer
    /// makes the member unreachable (openraft then backs off and retries).
    async fn exchange<T, E: std::error::Error>(
        &mut self,
        message: RaftMessage,
        option: &RPCOption,
        expected: impl FnOnce(RaftAnswer) -> Option<Result<T, RaftError<MemberId, E>>>,
    ) -> Result<T, CallError<E>> {
        let answer = self.send(message, option).await.map_err(unreachable)?;
        match expected(answer) {
            Some(answer) => answer.map_err(|error| {
                RPCError::RemoteError(openraft::error::RemoteError::new_with_node(
                    self.target,
                    self.member.clone(),
                    error,
                ))
            }),
            None => Err(RPCError::Network(NetworkError::new(&AnyError::error(
                format!("{} answered a different kind of Raft message", self.member),
            )))),
        }
    }
}

impl RaftNetwork<TypeConfig> for QuicNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, CallError<openraft::error::Infallible>> {
        self.exchange(
            RaftMessage::AppendEntries(rpc),
            &option,
            |answer| match answer {
                RaftAnswer::AppendEntries(answer) => Some(answer),
                _ => None,
            },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, CallError<InstallSnapshotError>> {
        self.exchange(
            RaftMessage::InstallSnapshot(rpc),
            &option,
            |answer| match answer {
                RaftAnswer::InstallSnapshot(answer) => Some(answer),
                _ => None,
            },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, CallError<openraft::error::Infallible>> {
        self.exchange(RaftMessage::Vote(rpc), &option, |answer| match answer {
            RaftAnswer::Vote(answer) => Some(answer),
            _ => None,
        })
        .await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A peer that is down is retried often enough that it rejoins within a heartbeat or
        // two of coming back, and rarely enough that a dead peer costs nothing noticeable.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

fn refuse(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

/// Serves one Raft message from `peer` after checking who sent it. (The node's service
/// has already applied the fault rules for the peer, as for every call it serves.)
pub async fn serve(raft: &Raft, peer: &Peer, bytes: &[u8]) -> Response {
    let name = match &peer.role {
        PeerRole::Node(name) => name,
        PeerRole::Admin => {
            return refuse(
                ErrorCode::Forbidden,
                "Raft messages come from members only, never from the admin".into(),
            )
        }
    };
    let message = match protocol::codec::decode::<RaftMessage>(bytes) {
        Ok(message) => message,
        Err(error) => {
            return refuse(
                ErrorCode::InvalidArgument,
                format!("undecodable Raft message from {name}: {error}"),
            )
        }
    };
    if let Err(reason) = authorize(raft, name, &message) {
        tracing::warn!(peer = %peer.address, %name, %reason, "Raft message refused");
        metrics::counter!("tandem_raft_refused_total").increment(1);
        return refuse(ErrorCode::Forbidden, reason);
    }
    let answer = match message {
        RaftMessage::AppendEntries(rpc) => {
            RaftAnswer::AppendEntries(raft.append_entries(rpc).await)
        }
        RaftMessage::Vote(rpc) => RaftAnswer::Vote(raft.vote(rpc).await),
        RaftMessage::InstallSnapshot(rpc) => {
            RaftAnswer::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
    };
    match protocol::codec::encode(&answer) {
        Ok(bytes) => Response::Raft(bytes),
        Err(error) => refuse(
            ErrorCode::Internal,
            format!("cannot encode the answer: {error}"),
        ),
    }
}

/// A peer may send Raft messages when its certificate names a member and the message
/// claims to come from that same member. A member not yet in any cluster has no
/// membership to check against: it accepts the first leader that adds it, which is how
/// `tandem cluster add-member` reaches it.
fn authorize(raft: &Raft, name: &str, message: &RaftMessage) -> Result<(), String> {
    let claimed_sender = match message {
        RaftMessage::AppendEntries(rpc) => rpc.vote.leader_id().voted_for(),
        RaftMessage::Vote(rpc) => rpc.vote.leader_id().voted_for(),
        RaftMessage::InstallSnapshot(rpc) => rpc.vote.leader_id().voted_for(),
    };
    if claimed_sender != Some(member_id(name)) {
        return Err(format!(
            "the message claims to come from member {claimed_sender:?}, but the certificate names '{name}'"
        ));
    }
    let metrics = raft.metrics();
    let membership = metrics.borrow().membership_config.clone();
    let mut members = membership.nodes().peekable();
    if members.peek().is_none() {
        return Ok(());
    }
    if members.any(|(_, member)| member.name == name) {
        Ok(())
    } else {
        Err(format!(
            "'{name}' has a certificate of this cluster but is not a control-plane member"
        ))
    }
}
