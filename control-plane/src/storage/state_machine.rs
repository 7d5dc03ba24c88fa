//! The catalog state machine and its snapshots, the latter in the `state_machine` column
//! family.
//!
//! The state lives in memory and is not written on every apply, so that applying costs no
//! disk write. A snapshot is the whole state encoded at once; the current snapshot is
//! persisted with `fsync`, and a restarted member starts from it and has openraft re-apply
//! the committed entries that follow it from the log.

use super::{any_error, column_family, write_batch, STATE_MACHINE_COLUMN_FAMILY};
use crate::catalog::Catalog;
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use parking_lot::RwLock;
use protocol::cluster::{CatalogReply, CatalogResponse};
use protocol::codec;
use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The `state_machine` key of the current snapshot's metadata.
const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";

/// The `state_machine` key of the current snapshot's data: an encoded [`StateMachineData`].
const SNAPSHOT_DATA_KEY: &[u8] = b"snapshot_data";

/// The first bytes of a snapshot's data: a format marker, then the layout's version, then
/// the encoded [`StateMachineData`]. Snapshots written before the marker hold the data of
/// version 1 alone; they cannot start with the marker (their first byte is an `Option`'s
/// tag, 0 or 1). The catalog will grow (intents, jobs): a new layout gets a new version,
/// and older ones are still read.
const SNAPSHOT_FORMAT_MARKER: &[u8; 4] = b"TCAT";
/// The layout this build writes: the catalog with its intents, gsnap jobs, their
/// verification rounds, sends and lineages.
const SNAPSHOT_FORMAT_VERSION: u8 = 4;
/// The layout before sends and lineages.
const SNAPSHOT_FORMAT_VERSION_WITHOUT_LINEAGES: u8 = 3;
/// The layout before verification rounds.
const SNAPSHOT_FORMAT_VERSION_WITHOUT_VERIFICATIONS: u8 = 2;
/// The layout before intents and jobs (also what unmarked snapshots hold).
const SNAPSHOT_FORMAT_VERSION_WITHOUT_INTENTS: u8 = 1;

/// Everything the state machine holds; a snapshot is exactly this, encoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StateMachineData {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    catalog: Catalog,
}

/// [`StateMachineData`] in layout version 1, before the catalog had intents.
#[derive(Deserialize)]
struct StateMachineDataWithoutIntents {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    catalog: crate::catalog::CatalogWithoutIntents,
}

/// [`StateMachineData`] in layout version 3, before sends and lineages.
#[derive(Deserialize)]
struct StateMachineDataWithoutLineages {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    catalog: crate::catalog::CatalogWithoutLineages,
}

impl From<StateMachineDataWithoutLineages> for StateMachineData {
    fn from(old: StateMachineDataWithoutLineages) -> StateMachineData {
        StateMachineData {
            last_applied: old.last_applied,
            last_membership: old.last_membership,
            catalog: old.catalog.into(),
        }
    }
}

/// [`StateMachineData`] in layout version 2, before verification rounds.
#[derive(Deserialize)]
struct StateMachineDataWithoutVerifications {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    catalog: crate::catalog::CatalogWithoutVerifications,
}

impl From<StateMachineDataWithoutVerifications> for StateMachineData {
    fn from(old: StateMachineDataWithoutVerifications) -> StateMachineData {
        StateMachineData {
            last_applied: old.last_applied,
            last_membership: old.last_membership,
            catalog: old.catalog.into(),
        }
    }
}

impl From<StateMachineDataWithoutIntents> for StateMachineData {
    fn from(old: StateMachineDataWithoutIntents) -> StateMachineData {
        StateMachineData {
            last_applied: old.last_applied,
            last_membership: old.last_membership,
            catalog: old.catalog.into(),
        }
    }
}

/// What the state machine and its snapshot builders share.
#[derive(Clone)]
struct Shared {
    db: Arc<DB>,
    data: Arc<RwLock<StateMachineData>>,
    /// Counts the snapshots built since the store was opened, to tell apart snapshots built at
    /// the same log id.
    snapshots_built: Arc<AtomicU64>,
    /// Held while the persisted snapshot is read or replaced. Its metadata and data are two
    /// keys, and a snapshot is built in a task of its own while the state machine goes on
    /// applying and installing, so without it a reader could pair one snapshot's metadata
    /// with another's data, or a slow build could overwrite a newer installed snapshot.
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
}

/// The catalog state machine openraft applies committed entries to.
pub struct StateMachineStore {
    shared: Shared,
}

/// Builds snapshots of the state machine for openraft, which runs it in a task of its own.
pub struct StateMachineSnapshotBuilder {
    shared: Shared,
}

/// A read-only view of the catalog as applied so far, for the control plane's request
/// handlers. Cloning is cheap; every clone sees the state machine's current state.
#[derive(Clone)]
pub struct CatalogView {
    data: Arc<RwLock<StateMachineData>>,
}

impl CatalogView {
    /// Runs `f` on the catalog and returns what it returns.
    ///
    /// `f` runs under the state machine's read lock, which holds up applying committed
    /// entries, so it should only look, copy what it needs, and return.
    pub fn read<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        f(&self.data.read().catalog)
    }

    /// The log id of the last entry applied to the catalog, if any.
    pub fn last_applied(&self) -> Option<LogId> {
        self.data.read().last_applied
    }
}

/// Encodes the state as a snapshot's data, behind the format marker and version.
fn encode_state(state: &StateMachineData) -> protocol::error::Result<Vec<u8>> {
    let mut bytes = SNAPSHOT_FORMAT_MARKER.to_vec();
    bytes.push(SNAPSHOT_FORMAT_VERSION);
    bytes.extend(codec::encode(state)?);
    Ok(bytes)
}

/// Decodes a snapshot's data of any layout this build knows.
fn decode_state(bytes: &[u8]) -> Result<StateMachineData, AnyError> {
    match bytes.strip_prefix(SNAPSHOT_FORMAT_MARKER.as_slice()) {
        Some([SNAPSHOT_FORMAT_VERSION, rest @ ..]) => codec::decode(rest).map_err(any_error),
        Some([SNAPSHOT_FORMAT_VERSION_WITHOUT_LINEAGES, rest @ ..]) => {
            codec::decode::<StateMachineDataWithoutLineages>(rest)
                .map(StateMachineData::from)
                .map_err(any_error)
        }
        Some([SNAPSHOT_FORMAT_VERSION_WITHOUT_VERIFICATIONS, rest @ ..]) => {
            codec::decode::<StateMachineDataWithoutVerifications>(rest)
                .map(StateMachineData::from)
                .map_err(any_error)
        }
        Some([SNAPSHOT_FORMAT_VERSION_WITHOUT_INTENTS, rest @ ..]) => decode_without_intents(rest),
        Some([version, ..]) => Err(AnyError::error(format!(
            "the catalog snapshot is stored in layout version {version}, which this build does not know (it reads up to {SNAPSHOT_FORMAT_VERSION}): run a newer tandem"
        ))),
        Some([]) => Err(AnyError::error(
            "the catalog snapshot ends after its format marker",
        )),
        // Written before the marker: the data of version 1.
        None => decode_without_intents(bytes),
    }
}

fn decode_without_intents(bytes: &[u8]) -> Result<StateMachineData, AnyError> {
    codec::decode::<StateMachineDataWithoutIntents>(bytes)
        .map(StateMachineData::from)
        .map_err(any_error)
}

impl StateMachineStore {
    /// Loads the state machine from `db`: the persisted snapshot's state when there is one,
    /// otherwise the empty state.
    pub(super) fn load(db: Arc<DB>) -> Result<Self, AnyError> {
        let data = match read_persisted_snapshot(&db)? {
            Some((_, bytes)) => decode_state(&bytes)?,
            None => StateMachineData::default(),
        };
        Ok(Self {
            shared: Shared {
                db,
                data: Arc::new(RwLock::new(data)),
                snapshots_built: Arc::new(AtomicU64::new(0)),
                snapshot_lock: Arc::new(tokio::sync::Mutex::new(())),
            },
        })
    }

    /// A view of the catalog that stays current as entries are applied.
    pub fn catalog_view(&self) -> CatalogView {
        CatalogView {
            data: Arc::clone(&self.shared.data),
        }
    }
}

/// Reads the persisted snapshot's metadata and data. The caller holds the snapshot lock,
/// or is the only user of the database.
fn read_persisted_snapshot(db: &DB) -> Result<Option<(SnapshotMeta, Vec<u8>)>, AnyError> {
    let Some(meta) = read_persisted_snapshot_meta(db)? else {
        return Ok(None);
    };
    let family = column_family(db, STATE_MACHINE_COLUMN_FAMILY)?;
    let data = db
        .get_cf(family, SNAPSHOT_DATA_KEY)
        .map_err(any_error)?
        .ok_or_else(|| {
            AnyError::error(format!(
                "the metadata of snapshot {} is stored without its data",
                meta.snapshot_id
            ))
        })?;
    Ok(Some((meta, data)))
}

fn read_persisted_snapshot_meta(db: &DB) -> Result<Option<SnapshotMeta>, AnyError> {
    let family = column_family(db, STATE_MACHINE_COLUMN_FAMILY)?;
    match db
        .get_pinned_cf(family, SNAPSHOT_META_KEY)
        .map_err(any_error)?
    {
        Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(any_error)?)),
        None => Ok(None),
    }
}

/// Replaces the persisted snapshot with `meta` and `data` in one atomic, synced write.
/// The caller holds the snapshot lock.
async fn persist_snapshot(db: &Arc<DB>, meta: &SnapshotMeta, data: &[u8]) -> Result<(), AnyError> {
    let encoded_meta = codec::encode(meta).map_err(any_error)?;
    let family = column_family(db, STATE_MACHINE_COLUMN_FAMILY)?;
    let mut batch = WriteBatch::default();
    batch.put_cf(family, SNAPSHOT_META_KEY, encoded_meta);
    batch.put_cf(family, SNAPSHOT_DATA_KEY, data);
    // Synced, because openraft purges the log up to a snapshot once it has it: a snapshot
    // lost in a crash would take those entries with it.
    write_batch(db, batch, true).await
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let shared = &self.shared;
        // The state is encoded under the read lock so that the data and the metadata
        // describe the same moment; applying waits for the encoding, not for the disk.
        let (meta, data) = {
            let state = shared.data.read();
            let data = encode_state(&state)
                .map_err(|error| StorageIOError::read_state_machine(AnyError::new(&error)))?;
            let build_number = shared.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
            let snapshot_id = match state.last_applied {
                Some(log_id) => {
                    format!("{}-{}-{build_number}", log_id.leader_id.term, log_id.index)
                }
                None => format!("none-{build_number}"),
            };
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.last_membership.clone(),
                snapshot_id,
            };
            (meta, data)
        };

        let _snapshot_guard = shared.snapshot_lock.lock().await;
        let persist = async {
            let persisted = read_persisted_snapshot_meta(&shared.db)?;
            // A snapshot installed from the leader while this one was being built is newer
            // and must stay; one at the same log id holds the same state, and openraft keeps
            // the first one's metadata, so the first one stays too.
            let is_newer = match &persisted {
                Some(persisted) => persisted.last_log_id < meta.last_log_id,
                None => true,
            };
            if is_newer {
                persist_snapshot(&shared.db, &meta, &data).await?;
            }
            Ok::<(), AnyError>(())
        };
        persist
            .await
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), error))?;

        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self.shared.data.read();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CatalogResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut responses = Vec::with_capacity(entries.size_hint().0);
        let mut state = self.shared.data.write();
        for entry in entries {
            let response = match entry.payload {
                EntryPayload::Blank => Ok(CatalogReply::Done),
                EntryPayload::Normal(request) => state.catalog.apply(&request),
                EntryPayload::Membership(membership) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(CatalogReply::Done)
                }
            };
            state.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachineSnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let read_error = |error| StorageIOError::read_snapshot(Some(meta.signature()), error);
        let data = snapshot.into_inner();
        // Everything is checked before anything changes, so a bad snapshot leaves the state
        // machine and the persisted snapshot as they were.
        let state = decode_state(&data).map_err(read_error)?;
        if state.last_applied != meta.last_log_id || state.last_membership != meta.last_membership {
            return Err(read_error(AnyError::error(format!(
                "snapshot {} does not hold the state its metadata describes",
                meta.snapshot_id
            )))
            .into());
        }

        let _snapshot_guard = self.shared.snapshot_lock.lock().await;
        // Persisted before the state is replaced, so that a failed write changes nothing.
        persist_snapshot(&self.shared.db, meta, &data)
            .await
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), error))?;
        *self.shared.data.write() = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let _snapshot_guard = self.shared.snapshot_lock.lock().await;
        let persisted = read_persisted_snapshot(&self.shared.db)
            .map_err(|error| StorageIOError::read_snapshot(None, error))?;
        Ok(persisted.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::cluster::{CatalogRequest, Command, NodeReport};

    /// A state with something in its catalog: one registered node.
    fn state() -> StateMachineData {
        let mut state = StateMachineData::default();
        state
            .catalog
            .apply(&CatalogRequest {
                request_id: 7,
                command: Command::RegisterNode(NodeReport {
                    name: "east-1".into(),
                    site: "east".into(),
                    address: "east-1:7100".into(),
                    nbd_address: "east-1:10809".into(),
                    capacity_bytes: 1 << 30,
                    control_plane: true,
                }),
            })
            .expect("the node registers");
        state
    }

    /// `state` as layout 3 encoded it, before sends and lineages: they are the
    /// catalog's last fields, and empty they encode as one byte (0) each at the end.
    fn encoded_without_lineages(state: &StateMachineData) -> Vec<u8> {
        let mut bytes = codec::encode(state).unwrap();
        for field in ["lineages", "sends"] {
            assert_eq!(bytes.pop(), Some(0), "no {field} at the end");
        }
        bytes
    }

    /// `state` as layout 2 encoded it, before verification rounds (and what came after).
    fn encoded_without_verifications(state: &StateMachineData) -> Vec<u8> {
        let mut bytes = encoded_without_lineages(state);
        assert_eq!(bytes.pop(), Some(0), "no verification rounds at the end");
        bytes
    }

    /// `state` as layout 1 encoded it, before intents and jobs: those are the catalog's
    /// last fields (intents, jobs, the last job id, verification rounds), and empty they
    /// encode as one byte each (0) at the end.
    fn encoded_without_intents(state: &StateMachineData) -> Vec<u8> {
        let mut bytes = encoded_without_verifications(state);
        for field in ["last job id", "jobs", "intents"] {
            assert_eq!(bytes.pop(), Some(0), "no {field} at the end");
        }
        bytes
    }

    #[test]
    fn a_snapshot_carries_its_layout_and_older_layouts_are_still_read() {
        let state = state();
        let marked = encode_state(&state).unwrap();
        assert_eq!(&marked[..5], b"TCAT\x04");
        assert_eq!(decode_state(&marked).unwrap(), state);
        // Layout 3, before sends and lineages.
        let mut marked_old = b"TCAT\x03".to_vec();
        marked_old.extend(encoded_without_lineages(&state));
        assert_eq!(decode_state(&marked_old).unwrap(), state);
        // Layout 2, before verification rounds.
        marked_old = b"TCAT\x02".to_vec();
        marked_old.extend(encoded_without_verifications(&state));
        assert_eq!(decode_state(&marked_old).unwrap(), state);
        // Layout 1, before intents: marked, and before the marker the data alone.
        let old = encoded_without_intents(&state);
        marked_old = b"TCAT\x01".to_vec();
        marked_old.extend(&old);
        assert_eq!(decode_state(&marked_old).unwrap(), state);
        assert_eq!(decode_state(&old).unwrap(), state);
    }

    #[test]
    fn a_snapshot_of_an_unknown_layout_is_refused_with_what_to_do() {
        let mut newer = encode_state(&state()).unwrap();
        newer[4] = SNAPSHOT_FORMAT_VERSION + 1;
        let error = decode_state(&newer).unwrap_err().to_string();
        assert!(error.contains("run a newer tandem"), "{error}");
        assert!(decode_state(b"TCAT").is_err());
    }
}
