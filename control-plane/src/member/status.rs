//! What a member reports: its view of the Raft group (leader, term, lags and indexes, the
//! lags known only on the leader), the health of every registered node for the node's
//! metrics, and the catalog's sites and volumes for `tandem status`.

use super::*;

impl ControlPlane {
    /// This member's view of the Raft group. Lags are known only on the leader, which
    /// tracks how far each follower's log matches its own.
    pub fn cluster_status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let name_of = |id: &MemberId| {
            membership
                .get_node(id)
                .map_or_else(|| format!("member-{id:016x}"), |member| member.name.clone())
        };
        let matched = |id: &MemberId| -> Option<u64> {
            if *id == metrics.id {
                return metrics.last_log_index;
            }
            metrics
                .replication
                .as_ref()?
                .get(id)
                .map(|log_id| log_id.map_or(0, |log_id| log_id.index))
        };
        let voters: Vec<MemberId> = membership.voter_ids().collect();
        let members = voters
            .iter()
            .map(|id| MemberStatus {
                name: name_of(id),
                address: membership
                    .get_node(id)
                    .map(|member| member.address.clone())
                    .unwrap_or_default(),
                lag_entries: match (
                    metrics.replication.is_some(),
                    metrics.last_log_index,
                    matched(id),
                ) {
                    (true, Some(last), Some(matched)) => Some(last.saturating_sub(matched)),
                    _ => None,
                },
            })
            .collect();
        // The commit index is the highest index a majority of voters hold.
        let commit_index = if metrics.replication.is_some() {
            let mut indexes: Vec<u64> = voters.iter().filter_map(matched).collect();
            indexes.sort_unstable_by(|left, right| right.cmp(left));
            indexes.get(voters.len() / 2).copied()
        } else {
            None
        };
        ClusterStatus {
            answered_by: self.name.clone(),
            leader: metrics.current_leader.as_ref().map(name_of),
            term: metrics.current_term,
            members,
            learners: membership.learner_ids().map(|id| name_of(&id)).collect(),
            last_log_index: metrics.last_log_index,
            commit_index,
            applied_index: metrics.last_applied.map(|log_id| log_id.index),
        }
    }

    /// Every registered node's name, site and health in this member's catalog, for the
    /// node's metrics.
    pub fn node_health(&self) -> Vec<(String, String, Health)> {
        self.catalog.read(|catalog| {
            catalog
                .nodes()
                .map(|node| (node.name.clone(), node.site.clone(), node.health))
                .collect()
        })
    }

    pub(super) fn status(&self) -> CatalogStatus {
        let (sites, volumes) = self.catalog.read(|catalog| {
            let mut sites: BTreeMap<String, Vec<NodeRecord>> = BTreeMap::new();
            for node in catalog.nodes() {
                sites
                    .entry(node.site.clone())
                    .or_default()
                    .push(node.clone());
            }
            (sites, catalog.volumes().cloned().collect())
        });
        CatalogStatus {
            cluster: self.cluster_status(),
            sites,
            volumes,
        }
    }
}
