//! Changes to the control plane's own membership: adding a registered node that runs a
//! member (first as a learner that catches up with the log, then as a voter) and removing
//! a member. Every change is bounded in time, and a refused add-member takes the learner
//! out again, so it leaves the membership as it was.

use super::*;

impl ControlPlane {
    pub(super) async fn add_member(&self, node: &str) -> Outcome<()> {
        self.refuse_stopped_member(node).await?;
        // A node started a moment ago registers with its first heartbeat, so "not yet
        // registered" is answered as unavailable: the CLI retries (with the same request)
        // and `add-member` right after starting the node just works.
        let record = self
            .catalog
            .read(|catalog| catalog.node(node).cloned())
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node '{node}' has not registered (yet): start it with this cluster's members in its config (`tandem status` lists the registered nodes)"
                    ),
                )
            })?;
        if !record.control_plane {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                format!("node '{node}' runs without `control_plane = true` in its config, so it cannot be a member"),
            ));
        }
        if record.health == Health::Down {
            return Err(CatalogError::NodeDown {
                node: node.to_string(),
            }
            .into());
        }
        let id = member_id(node);
        let member = Member {
            name: node.to_string(),
            address: record.address.clone(),
        };
        let membership_error = |error: RaftError<MemberId, ClientWriteError<MemberId, Member>>| {
            Refusal::new(ErrorCode::Unavailable, error.to_string())
        };
        let address = record.address.clone();
        match tokio::time::timeout(
            Duration::from_secs(MEMBERSHIP_CHANGE_TIMEOUT_SECONDS),
            self.raft.add_learner(id, member, true),
        )
        .await
        {
            Ok(added) => {
                added.map_err(membership_error)?;
            }
            Err(_) => {
                // The learner never caught up: take it out again, so a refused add-member
                // leaves the membership as it was.
                let removal = self
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false);
                if tokio::time::timeout(
                    Duration::from_secs(MEMBERSHIP_CHANGE_TIMEOUT_SECONDS),
                    removal,
                )
                .await
                .is_err()
                {
                    tracing::warn!(member = %node, "could not take the unreachable learner out again");
                }
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node '{node}' at {address} did not catch up with the log within {MEMBERSHIP_CHANGE_TIMEOUT_SECONDS} s; check that it runs, is reachable there, and was not initialized as a cluster of its own"
                    ),
                ));
            }
        }
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await?;
        tracing::info!(member = %node, "member added");
        Ok(())
    }

    async fn change_membership(&self, change: ChangeMembers<MemberId, Member>) -> Outcome<()> {
        match tokio::time::timeout(
            Duration::from_secs(MEMBERSHIP_CHANGE_TIMEOUT_SECONDS),
            self.raft.change_membership(change, false),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(Refusal::new(ErrorCode::Unavailable, error.to_string())),
            Err(_) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "the membership change did not commit within {MEMBERSHIP_CHANGE_TIMEOUT_SECONDS} s: a majority of the old and of the new members must be up (see `tandem cluster status`)"
                ),
            )),
        }
    }

    pub(super) async fn remove_member(&self, node: &str) -> Outcome<()> {
        let id = member_id(node);
        let voters: BTreeSet<MemberId> = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            metrics.membership_config.membership().voter_ids().collect()
        };
        if !voters.contains(&id) {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!(
                    "node '{node}' is not a control-plane member (see `tandem cluster status`)"
                ),
            ));
        }
        if voters.len() == 1 {
            return Err(Refusal::new(
                ErrorCode::IllegalState,
                format!("'{node}' is the last member; a cluster cannot remove its last member"),
            ));
        }
        self.refuse_without_remaining_majority(node, id).await?;
        self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await?;
        tracing::info!(member = %node, "member removed");
        Ok(())
    }

    /// A removal commits only with a majority of the members that remain. With one of
    /// them down it would hold the command for the whole change timeout and then stay in
    /// the log, to commit by itself once that member returns; so the leader asks the
    /// remaining members first and refuses at once, changing nothing (found by the chaos
    /// schedule: a remove-member while another member was killed took 30 s). The refusal
    /// is not "unavailable", which the CLI retries: the operator acts on it.
    async fn refuse_without_remaining_majority(
        &self,
        node: &str,
        removed: MemberId,
    ) -> Outcome<()> {
        let (own, remaining): (MemberId, Vec<(MemberId, Member)>) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let remaining = membership
                .voter_ids()
                .filter(|voter| *voter != removed)
                .filter_map(|voter| Some((voter, membership.get_node(&voter)?.clone())))
                .collect();
            (metrics.id, remaining)
        };
        // One after another: a cluster has a handful of members, and each probe is short.
        let mut silent = Vec::new();
        for (voter, member) in &remaining {
            if *voter == own {
                continue;
            }
            let answer = tokio::time::timeout(
                Duration::from_millis(MEMBER_PROBE_TIMEOUT_MILLISECONDS),
                self.call(&member.name, &member.address, Request::NodeStatus),
            )
            .await;
            if !matches!(answer, Ok(Ok(_))) {
                silent.push(member.name.clone());
            }
        }
        let up = remaining.len() - silent.len();
        if up * 2 > remaining.len() {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::IllegalState,
            format!(
                "removing '{node}' needs a majority of the members that remain ({}) up, and {} do{} not answer: bring {} back first, or remove {} instead",
                remaining.iter().map(|(_, member)| member.name.as_str()).collect::<Vec<_>>().join(", "),
                silent.join(", "),
                if silent.len() == 1 { "es" } else { "" },
                if silent.len() == 1 { "it" } else { "them" },
                if silent.len() == 1 { "it" } else { "one of them" },
            ),
        ))
    }
}
