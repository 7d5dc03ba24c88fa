//! The RocksDB storage: openraft's conformance suite, and what must survive a restart.

use control_plane::storage::{self, LogStore, StateMachineStore};
use control_plane::types::{Entry, LogId, SnapshotMeta, StorageError, TypeConfig, Vote};
use openraft::storage::{LogState, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    AnyError, CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder,
    StorageIOError, StoredMembership,
};
use protocol::cluster::{
    member_id, CatalogReply, CatalogRequest, Command, Health, Member, MemberId, NodeReport,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use tempfile::TempDir;

/// A test's outcome: boxed, because openraft's `StorageError` is too large to return by
/// value without clippy objecting.
type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The leader every entry in these scenarios comes from.
const LEADER_NAME: &str = "node-a";

/// Gives openraft's suite a fresh database in a new temporary directory for every test; the
/// directory is the guard, so it lives exactly as long as the test that uses it.
struct TemporaryStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TemporaryStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let directory =
            TempDir::new().map_err(|error| StorageIOError::write(AnyError::new(&error)))?;
        let (log_store, state_machine) = storage::open(directory.path())
            .map_err(|error| StorageIOError::write(AnyError::new(&error)))?;
        Ok((directory, log_store, state_machine))
    }
}

#[test]
fn openraft_storage_conformance_suite_passes() -> TestResult {
    // The suite runs every test in a tokio runtime of its own, so it is called from a plain
    // test rather than from inside another runtime.
    Suite::<TypeConfig, LogStore, StateMachineStore, TemporaryStoreBuilder, TempDir>::test_all(
        TemporaryStoreBuilder,
    )?;
    Ok(())
}

fn leader() -> MemberId {
    member_id(LEADER_NAME)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, leader()), index)
}

fn membership_entry(term: u64, index: u64) -> Entry {
    let member = Member {
        name: LEADER_NAME.to_string(),
        address: "127.0.0.1:7000".to_string(),
    };
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([leader()])],
            BTreeMap::from([(leader(), member)]),
        )),
    }
}

fn register_node_entry(term: u64, index: u64, node: &str, site: &str) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(CatalogRequest {
            request_id: u128::from(index),
            command: Command::RegisterNode(NodeReport {
                name: node.to_string(),
                site: site.to_string(),
                address: format!("{node}:7000"),
                nbd_address: format!("{node}:10809"),
                capacity_bytes: 1 << 40,
                control_plane: true,
            }),
        }),
    }
}

fn open(path: &Path) -> (LogStore, StateMachineStore) {
    storage::open(path).expect("the store opens")
}

fn node_names(state_machine: &StateMachineStore) -> Vec<String> {
    state_machine
        .catalog_view()
        .read(|catalog| catalog.nodes().map(|node| node.name.clone()).collect())
}

fn entry_indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|entry| entry.log_id.index).collect()
}

#[tokio::test]
async fn vote_committed_purge_point_and_entries_survive_a_reopen() -> TestResult {
    let directory = TempDir::new().expect("a temporary directory");
    let entries = vec![
        membership_entry(1, 1),
        register_node_entry(1, 2, "node-a", "east"),
        register_node_entry(1, 3, "node-b", "west"),
        register_node_entry(2, 4, "node-c", "east"),
        register_node_entry(2, 5, "node-d", "west"),
    ];
    let vote = Vote::new_committed(2, leader());
    {
        let (mut log_store, _state_machine) = open(directory.path());
        log_store.blocking_append(entries.clone()).await?;
        log_store.save_vote(&vote).await?;
        log_store.save_committed(Some(log_id(2, 4))).await?;
        log_store.purge(log_id(1, 2)).await?;
    }

    let (mut log_store, _state_machine) = open(directory.path());
    assert_eq!(log_store.read_vote().await?, Some(vote));
    assert_eq!(log_store.read_committed().await?, Some(log_id(2, 4)));
    assert_eq!(
        log_store.get_log_state().await?,
        LogState {
            last_purged_log_id: Some(log_id(1, 2)),
            last_log_id: Some(log_id(2, 5)),
        }
    );
    assert_eq!(
        log_store.try_get_log_entries(..).await?,
        entries[2..].to_vec()
    );
    Ok(())
}

#[tokio::test]
async fn a_log_purged_to_its_end_still_knows_its_last_log_id_after_a_reopen() -> TestResult {
    let directory = TempDir::new().expect("a temporary directory");
    {
        let (mut log_store, _state_machine) = open(directory.path());
        log_store
            .blocking_append([
                membership_entry(1, 1),
                register_node_entry(1, 2, "node-a", "east"),
            ])
            .await?;
        // Purging beyond the last entry happens when a snapshot installed from the leader is
        // ahead of this member's whole log.
        log_store.purge(log_id(3, 9)).await?;
    }

    let (mut log_store, _state_machine) = open(directory.path());
    assert_eq!(
        log_store.get_log_state().await?,
        LogState {
            last_purged_log_id: Some(log_id(3, 9)),
            last_log_id: Some(log_id(3, 9)),
        }
    );
    assert!(log_store.try_get_log_entries(..).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn truncated_entries_stay_gone_after_a_reopen() -> TestResult {
    let directory = TempDir::new().expect("a temporary directory");
    {
        let (mut log_store, _state_machine) = open(directory.path());
        log_store
            .blocking_append([
                membership_entry(1, 1),
                register_node_entry(1, 2, "node-a", "east"),
                register_node_entry(1, 3, "node-b", "west"),
                register_node_entry(1, 4, "node-c", "east"),
            ])
            .await?;
        // A new leader's log conflicts from index 3 on.
        log_store.truncate(log_id(1, 3)).await?;
        log_store
            .blocking_append([register_node_entry(2, 3, "node-d", "west")])
            .await?;
    }

    let (mut log_store, _state_machine) = open(directory.path());
    let entries = log_store.try_get_log_entries(..).await?;
    assert_eq!(entry_indexes(&entries), vec![1, 2, 3]);
    assert_eq!(entries[2], register_node_entry(2, 3, "node-d", "west"));
    assert_eq!(
        log_store.get_log_state().await?.last_log_id,
        Some(log_id(2, 3))
    );
    Ok(())
}

#[tokio::test]
async fn applying_entries_answers_with_the_catalog_responses() -> TestResult {
    let directory = TempDir::new().expect("a temporary directory");
    let (_log_store, mut state_machine) = open(directory.path());
    let responses = state_machine
        .apply([
            membership_entry(1, 1),
            register_node_entry(1, 2, "node-a", "east"),
            Entry {
                log_id: log_id(2, 3),
                payload: EntryPayload::Blank,
            },
            // The same request id as index 2: a retry gets the first answer again.
            Entry {
                log_id: log_id(2, 4),
                payload: EntryPayload::Normal(CatalogRequest {
                    request_id: 2,
                    command: Command::Noop,
                }),
            },
        ])
        .await?;

    assert_eq!(responses.len(), 4);
    assert_eq!(responses[0], Ok(CatalogReply::Done));
    let Ok(CatalogReply::Node(record)) = &responses[1] else {
        panic!(
            "registering a node answers with its record, got {:?}",
            responses[1]
        );
    };
    assert_eq!(record.name, "node-a");
    assert_eq!(record.health, Health::Up);
    assert_eq!(responses[2], Ok(CatalogReply::Done));
    assert_eq!(responses[3], responses[1]);

    let (last_applied, last_membership) = state_machine.applied_state().await?;
    assert_eq!(last_applied, Some(log_id(2, 4)));
    assert_eq!(last_membership.log_id(), &Some(log_id(1, 1)));
    assert_eq!(
        state_machine.catalog_view().last_applied(),
        Some(log_id(2, 4))
    );
    assert_eq!(node_names(&state_machine), vec!["node-a"]);
    Ok(())
}

#[tokio::test]
async fn a_built_snapshot_survives_a_reopen_and_the_state_machine_starts_from_it() -> TestResult {
    let directory = TempDir::new().expect("a temporary directory");
    let built_meta = {
        let (_log_store, mut state_machine) = open(directory.path());
        assert!(state_machine.get_current_snapshot().await?.is_none());
        state_machine
            .apply([
                membership_entry(1, 1),
                register_node_entry(1, 2, "node-a", "east"),
                register_node_entry(1, 3, "node-b", "west"),
            ])
            .await?;
        let snapshot = state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await?;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 3)));
        // Applied after the snapshot and never persisted by the state machine: after a
        // restart openraft re-applies it from the log.
        state_machine
            .apply([register_node_entry(1, 4, "node-c", "east")])
            .await?;
        snapshot.meta
    };

    let (_log_store, mut state_machine) = open(directory.path());
    let current = state_machine
        .get_current_snapshot()
        .await?
        .expect("the built snapshot is persisted");
    assert_eq!(current.meta, built_meta);
    assert_eq!(
        state_machine.catalog_view().last_applied(),
        Some(log_id(1, 3))
    );
    assert_eq!(node_names(&state_machine), vec!["node-a", "node-b"]);
    let (last_applied, last_membership) = state_machine.applied_state().await?;
    assert_eq!(last_applied, Some(log_id(1, 3)));
    assert_eq!(last_membership, built_meta.last_membership);
    Ok(())
}

#[tokio::test]
async fn an_installed_snapshot_replaces_the_catalog_and_survives_a_reopen() -> TestResult {
    let leader_directory = TempDir::new().expect("a temporary directory");
    let follower_directory = TempDir::new().expect("a temporary directory");
    let (_leader_log, mut leader_state_machine) = open(leader_directory.path());
    leader_state_machine
        .apply([
            membership_entry(1, 1),
            register_node_entry(1, 2, "node-a", "east"),
            register_node_entry(1, 3, "node-b", "west"),
        ])
        .await?;
    let snapshot = leader_state_machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await?;

    {
        let (_follower_log, mut follower_state_machine) = open(follower_directory.path());
        follower_state_machine
            .apply([register_node_entry(1, 1, "node-z", "south")])
            .await?;
        let mut received = follower_state_machine.begin_receiving_snapshot().await?;
        received
            .write_all(snapshot.snapshot.get_ref())
            .expect("writing to memory succeeds");
        follower_state_machine
            .install_snapshot(&snapshot.meta, received)
            .await?;
        assert_eq!(
            node_names(&follower_state_machine),
            vec!["node-a", "node-b"]
        );
    }

    let (_follower_log, mut follower_state_machine) = open(follower_directory.path());
    assert_eq!(
        node_names(&follower_state_machine),
        vec!["node-a", "node-b"]
    );
    let current = follower_state_machine
        .get_current_snapshot()
        .await?
        .expect("the installed snapshot is persisted");
    assert_eq!(current.meta, snapshot.meta);
    Ok(())
}

#[tokio::test]
async fn installing_a_garbage_snapshot_fails_and_changes_nothing() -> TestResult {
    let directory = TempDir::new().expect("a temporary directory");
    let (_log_store, mut state_machine) = open(directory.path());
    state_machine
        .apply([
            membership_entry(1, 1),
            register_node_entry(1, 2, "node-a", "east"),
        ])
        .await?;
    let applied_before = state_machine.applied_state().await?;

    let mut received = state_machine.begin_receiving_snapshot().await?;
    received
        .write_all(&[0xff; 64])
        .expect("writing to memory succeeds");
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(3, 40)),
        last_membership: StoredMembership::new(
            Some(log_id(1, 1)),
            Membership::new(vec![BTreeSet::from([leader()])], ()),
        ),
        snapshot_id: "3-40-1".to_string(),
    };
    let result = state_machine.install_snapshot(&meta, received).await;

    assert!(result.is_err(), "a garbage snapshot was installed");
    assert_eq!(state_machine.applied_state().await?, applied_before);
    assert_eq!(node_names(&state_machine), vec!["node-a"]);
    assert!(state_machine.get_current_snapshot().await?.is_none());
    Ok(())
}
