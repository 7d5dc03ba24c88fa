//! The Raft type configuration: what travels in the log and how members are named.

use protocol::cluster::{CatalogRequest, CatalogResponse, Member, MemberId};
use std::io::Cursor;

openraft::declare_raft_types!(
    /// tandem's control plane: catalog requests in the log, catalog responses out,
    /// members named by [`MemberId`] and reached through [`Member`].
    pub TypeConfig:
        D = CatalogRequest,
        R = CatalogResponse,
        NodeId = MemberId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<MemberId>;
pub type Vote = openraft::Vote<MemberId>;
pub type StoredMembership = openraft::StoredMembership<MemberId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<MemberId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<MemberId>;
