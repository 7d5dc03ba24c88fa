//! Where a request is served: cluster requests and heartbeats are served here when this
//! member leads and passed on to the leader otherwise (within the hop budget, and ending
//! the wait when leadership moves), and the leader's `lead` hands each cluster request to
//! the function of its concern. `call` is the one way the member reaches a node or another
//! member.

use super::*;

impl ControlPlane {
    /// Serves a cluster request: here when this member leads (or the request is `Init`),
    /// else passed to the leader when the hop budget allows.
    pub async fn serve_cluster(&self, request: ClusterRequest, hops: u8) -> Response {
        if let Some(refusal) = self.outside_cluster(&request) {
            return refusal.into_response();
        }
        if request == ClusterRequest::Init {
            return self.init().await.map_or_else(Refusal::into_response, |()| {
                Response::Cluster(ClusterResponse::Done)
            });
        }
        if !self.is_leader() {
            if request == ClusterRequest::ClusterStatus
                && (hops >= CLUSTER_REQUEST_HOPS_MAX || self.leader().is_none())
            {
                return Response::Cluster(ClusterResponse::ClusterStatus(self.cluster_status()));
            }
            return self
                .forward(
                    Request::Cluster {
                        request,
                        hops: hops + 1,
                    },
                    hops,
                )
                .await;
        }
        match self.lead(request).await {
            Ok(response) => response,
            Err(refusal) => refusal.into_response(),
        }
    }

    /// Serves a node's heartbeat: the leader records it, others pass it on.
    pub async fn serve_heartbeat(&self, report: NodeReport, hops: u8) -> Response {
        if let Some(refusal) = self.outside_cluster(&ClusterRequest::Status) {
            return refusal.into_response();
        }
        if !self.is_leader() {
            return self
                .forward(
                    Request::Heartbeat {
                        report,
                        hops: hops + 1,
                    },
                    hops,
                )
                .await;
        }
        match self.heartbeat(report).await {
            Ok(()) => Response::Cluster(ClusterResponse::Done),
            Err(refusal) => refusal.into_response(),
        }
    }

    async fn forward(&self, request: Request, hops: u8) -> Response {
        let unavailable =
            |message: String| Refusal::new(ErrorCode::Unavailable, message).into_response();
        if hops >= CLUSTER_REQUEST_HOPS_MAX {
            return unavailable(format!(
                "member {} is not the leader and the request has been passed on {hops} times already; retry the command",
                self.name
            ));
        }
        let Some((leader_id, leader)) = self.leader() else {
            return unavailable(
                "the control plane has no leader yet: a majority of members must be up (see `tandem cluster status`)"
                    .into(),
            );
        };
        // A dead leader answers nothing until the connection times out; the election that
        // replaces it is much faster, so the wait ends as soon as leadership moves.
        let mut metrics = self.raft.metrics();
        let leadership_moved = async move {
            loop {
                if metrics.borrow_and_update().current_leader != Some(leader_id) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            answer = self.call(&leader.name, &leader.address, request) => match answer {
                Ok(response) => response,
                Err(detail) => unavailable(format!("the leader {leader} did not answer: {detail}")),
            },
            () = leadership_moved => unavailable(format!(
                "leadership moved away from {leader} while the request was on its way; retry the command"
            )),
        }
    }

    /// Calls a node or member at `address`.
    /// The answer is trusted only if the peer's certificate names `node`: an address can
    /// be reused by another node.
    pub(super) async fn call(
        &self,
        node: &str,
        address: &str,
        request: Request,
    ) -> Result<Response, String> {
        self.caller.call(address, Some(node), &request).await
    }

    /// Serves a cluster request on the leader, through the function of its concern.
    async fn lead(&self, request: ClusterRequest) -> Outcome<Response> {
        let cluster = |response: ClusterResponse| Ok(Response::Cluster(response));
        match request {
            ClusterRequest::Init => unreachable!("Init is served before leadership is checked"),
            ClusterRequest::AddMember { node } => {
                self.add_member(&node).await?;
                cluster(ClusterResponse::ClusterStatus(self.cluster_status()))
            }
            ClusterRequest::RemoveMember { node } => {
                self.remove_member(&node).await?;
                cluster(ClusterResponse::ClusterStatus(self.cluster_status()))
            }
            ClusterRequest::ClusterStatus => {
                cluster(ClusterResponse::ClusterStatus(self.cluster_status()))
            }
            ClusterRequest::Status => {
                self.read_barrier().await?;
                cluster(ClusterResponse::Status(self.status()))
            }
            ClusterRequest::Noop { request_id } => {
                self.commit(request_id, Command::Noop).await?;
                cluster(ClusterResponse::Done)
            }
            ClusterRequest::VolumeCreate {
                request_id,
                name,
                node,
                size_bytes,
                track_size_bytes,
            } => {
                let node = node.ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::InvalidArgument,
                        "no node was named for the volume; pass --node NODE",
                    )
                })?;
                let record = self
                    .volume_create(request_id, &name, &node, size_bytes, track_size_bytes)
                    .await?;
                cluster(ClusterResponse::Volume(record))
            }
            ClusterRequest::VolumeDelete {
                request_id,
                name,
                force,
            } => cluster(self.volume_delete(request_id, name, force).await?),
            ClusterRequest::VolumeSetReadiness {
                request_id,
                name,
                readiness,
            } => cluster(
                self.volume_set_readiness(request_id, name, readiness)
                    .await?,
            ),
            ClusterRequest::VolumeList => cluster(self.volume_list().await?),
            ClusterRequest::VolumeShow { name } => cluster(self.volume_show(name).await?),
            ClusterRequest::Snap {
                request_id,
                source,
                target,
                extents,
                overwrite,
            } => {
                self.snap(request_id, &source, &target, extents, overwrite)
                    .await
            }
            ClusterRequest::Session {
                request_id,
                command,
            } => self.session_command(request_id, command).await,
            ClusterRequest::SessionList { kind } => cluster(self.session_list(kind).await?),
            ClusterRequest::SessionShow { kind, target } => {
                cluster(self.session_show(kind, target).await?)
            }
            ClusterRequest::Gsnap { request_id, spec } => {
                cluster(self.gsnap_start(request_id, spec).await?)
            }
            ClusterRequest::GsnapList => cluster(self.gsnap_list().await?),
            ClusterRequest::GsnapShow { job } => cluster(self.gsnap_show(job).await?),
            ClusterRequest::GsnapCancel { request_id, job } => {
                cluster(self.gsnap_cancel(request_id, job).await?)
            }
            ClusterRequest::GsnapForget {
                request_id,
                source,
                target,
            } => cluster(self.gsnap_forget(request_id, source, target).await?),
        }
    }
}
