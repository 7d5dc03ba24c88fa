//! The catalog state machine on its own: one command in, the exact catalog out.

use control_plane::catalog::{Catalog, APPLIED_REQUESTS_REMEMBERED_MAX};
use proptest::prelude::*;
use protocol::cluster::{
    CatalogError, CatalogReply, CatalogRequest, Command, Health, Intent, IntentCall, IntentResult,
    NewVolume, NodeReport, VolumeState,
};
use protocol::messages::{ErrorCode, Readiness, VolumeInfo};

const GIB: u64 = 1 << 30;
const TRACK: u32 = 64 << 10;

fn report(name: &str, site: &str, capacity_bytes: u64) -> NodeReport {
    NodeReport {
        name: name.into(),
        site: site.into(),
        address: format!("{name}:7100"),
        nbd_address: format!("{name}:10809"),
        capacity_bytes,
        control_plane: true,
    }
}

/// Applies a command under a fresh request id.
fn apply(catalog: &mut Catalog, id: u128, command: Command) -> Result<CatalogReply, CatalogError> {
    catalog.apply(&CatalogRequest {
        request_id: id,
        command,
    })
}

fn create(name: &str, node: &str, size_bytes: u64) -> Command {
    Command::VolumeCreateBegin {
        name: name.into(),
        node: node.into(),
        size_bytes,
        track_size_bytes: TRACK,
    }
}

/// Two sites, three nodes of 10 GiB each, one ready volume `data` of 4 GiB on `east-1`.
fn populated() -> Catalog {
    let mut catalog = Catalog::default();
    apply(
        &mut catalog,
        1,
        Command::RegisterNode(report("east-1", "east", 10 * GIB)),
    )
    .unwrap();
    apply(
        &mut catalog,
        2,
        Command::RegisterNode(report("east-2", "east", 10 * GIB)),
    )
    .unwrap();
    apply(
        &mut catalog,
        3,
        Command::RegisterNode(report("west-1", "west", 10 * GIB)),
    )
    .unwrap();
    apply(&mut catalog, 4, create("data", "east-1", 4 * GIB)).unwrap();
    apply(
        &mut catalog,
        5,
        Command::VolumeCreateFinish {
            name: "data".into(),
        },
    )
    .unwrap();
    catalog
}

#[test]
fn a_volume_is_created_in_two_steps_and_lands_on_its_node() {
    let catalog = populated();
    let volume = catalog.volume("data").unwrap();
    assert_eq!(volume.node, "east-1");
    assert_eq!(volume.state, VolumeState::Ready);
    assert_eq!(volume.readiness, Readiness::Ready);
    assert_eq!(catalog.sites().len(), 2);
    assert_eq!(catalog.nodes().count(), 3);
}

#[test]
fn a_retried_request_is_applied_once_and_gets_the_first_answer() {
    let mut catalog = populated();
    let first = apply(&mut catalog, 77, create("logs", "east-2", GIB)).unwrap();
    apply(
        &mut catalog,
        78,
        Command::VolumeCreateFinish {
            name: "logs".into(),
        },
    )
    .unwrap();
    let after_first = catalog.clone();
    // The same request again, after the volume became ready: no second volume, no
    // "already exists", no change at all, and the answer the first attempt got.
    let retried = apply(&mut catalog, 77, create("logs", "east-2", GIB)).unwrap();
    assert_eq!(retried, first);
    assert_eq!(catalog, after_first);
    // The same command under a new id is a new request, and refused.
    assert_eq!(
        apply(&mut catalog, 79, create("logs", "east-2", GIB)),
        Err(CatalogError::VolumeExists {
            volume: "logs".into(),
            node: "east-2".into()
        })
    );
}

#[test]
fn a_retried_refusal_is_refused_again_even_when_it_would_now_succeed() {
    let mut catalog = populated();
    let refused = apply(&mut catalog, 90, create("big", "east-2", 11 * GIB));
    assert!(matches!(refused, Err(CatalogError::DoesNotFit { .. })));
    apply(
        &mut catalog,
        91,
        Command::RegisterNode(report("east-2", "east", 20 * GIB)),
    )
    .unwrap();
    assert_eq!(
        apply(&mut catalog, 90, create("big", "east-2", 11 * GIB)),
        refused
    );
    assert!(catalog.volume("big").is_none());
}

#[test]
fn each_invalid_command_is_refused_with_its_own_error_and_changes_nothing() {
    type Expectation = fn(&CatalogError) -> bool;
    let cases: Vec<(Command, Expectation)> = vec![
        (create("x", "nowhere", GIB), |e| {
            matches!(e, CatalogError::UnknownNode { .. })
        }),
        (create("data", "east-2", GIB), |e| {
            matches!(e, CatalogError::VolumeExists { .. })
        }),
        (
            create("x", "east-1", 7 * GIB),
            |e| matches!(e, CatalogError::DoesNotFit { free_bytes, .. } if *free_bytes == 6 * GIB),
        ),
        (create("x", "east-1", 1000), |e| {
            matches!(e, CatalogError::Invalid { .. })
        }),
        (create("x", "east-1", 0), |e| {
            matches!(e, CatalogError::Invalid { .. })
        }),
        (create("bad name", "east-1", GIB), |e| {
            matches!(e, CatalogError::Invalid { .. })
        }),
        (create("", "east-1", GIB), |e| {
            matches!(e, CatalogError::Invalid { .. })
        }),
        (
            Command::VolumeCreateBegin {
                name: "x".into(),
                node: "east-1".into(),
                size_bytes: GIB,
                track_size_bytes: 1000,
            },
            |e| matches!(e, CatalogError::Invalid { .. }),
        ),
        (
            Command::VolumeDeleteBegin {
                name: "ghost".into(),
            },
            |e| matches!(e, CatalogError::UnknownVolume { .. }),
        ),
        (
            Command::VolumeDeleteFinish {
                name: "data".into(),
            },
            |e| {
                matches!(
                    e,
                    CatalogError::IllegalState {
                        state: VolumeState::Ready,
                        ..
                    }
                )
            },
        ),
        (
            Command::VolumeCreateRollback {
                name: "data".into(),
                reason: "test".into(),
            },
            |e| matches!(e, CatalogError::IllegalState { .. }),
        ),
        (
            Command::SetNodeHealth {
                node: "ghost".into(),
                health: Health::Down,
            },
            |e| matches!(e, CatalogError::UnknownNode { .. }),
        ),
        (
            Command::RegisterNode(report("east-1", "west", 10 * GIB)),
            |e| matches!(e, CatalogError::SiteChange { .. }),
        ),
        (Command::RegisterNode(report("n/1", "east", GIB)), |e| {
            matches!(e, CatalogError::Invalid { .. })
        }),
        (Command::RegisterNode(report("n1", "", GIB)), |e| {
            matches!(e, CatalogError::Invalid { .. })
        }),
    ];
    for (index, (command, expected)) in cases.into_iter().enumerate() {
        let mut catalog = populated();
        let before = catalog.clone();
        let refusal = apply(&mut catalog, 1000 + index as u128, command.clone())
            .expect_err(&format!("{command:?} must be refused"));
        assert!(
            expected(&refusal),
            "{command:?} was refused with {refusal:?}"
        );
        // Only the remembered answer differs; sites, nodes and volumes are as before.
        assert_eq!(
            catalog.volumes().collect::<Vec<_>>(),
            before.volumes().collect::<Vec<_>>()
        );
        assert_eq!(
            catalog.nodes().collect::<Vec<_>>(),
            before.nodes().collect::<Vec<_>>()
        );
        assert_eq!(catalog.sites(), before.sites());
    }
}

#[test]
fn a_node_that_is_down_takes_no_new_volumes_until_it_returns() {
    let mut catalog = populated();
    apply(
        &mut catalog,
        10,
        Command::SetNodeHealth {
            node: "west-1".into(),
            health: Health::Down,
        },
    )
    .unwrap();
    assert_eq!(
        apply(&mut catalog, 11, create("w", "west-1", GIB)),
        Err(CatalogError::NodeDown {
            node: "west-1".into()
        })
    );
    // Registering again is how a node returns.
    apply(
        &mut catalog,
        12,
        Command::RegisterNode(report("west-1", "west", 10 * GIB)),
    )
    .unwrap();
    assert_eq!(catalog.node("west-1").unwrap().health, Health::Up);
    apply(&mut catalog, 13, create("w", "west-1", GIB)).unwrap();
}

#[test]
fn a_delete_passes_through_deleting_and_frees_the_space() {
    let mut catalog = populated();
    apply(
        &mut catalog,
        20,
        Command::VolumeDeleteBegin {
            name: "data".into(),
        },
    )
    .unwrap();
    assert_eq!(catalog.volume("data").unwrap().state, VolumeState::Deleting);
    // A half-deleted volume cannot be given a readiness or finished as created.
    assert!(apply(
        &mut catalog,
        21,
        Command::VolumeSetReadiness {
            name: "data".into(),
            readiness: Readiness::ReadOnly
        }
    )
    .is_err());
    apply(
        &mut catalog,
        22,
        Command::VolumeDeleteFinish {
            name: "data".into(),
        },
    )
    .unwrap();
    assert!(catalog.volume("data").is_none());
    apply(&mut catalog, 23, create("big", "east-1", 10 * GIB)).unwrap();
}

#[test]
fn a_volume_being_created_is_finished_or_rolled_back_never_both() {
    let mut catalog = populated();
    apply(&mut catalog, 30, create("half", "east-2", GIB)).unwrap();
    assert!(apply(
        &mut catalog,
        31,
        Command::VolumeDeleteBegin {
            name: "half".into()
        }
    )
    .is_err());
    apply(
        &mut catalog,
        32,
        Command::VolumeCreateRollback {
            name: "half".into(),
            reason: "node refused".into(),
        },
    )
    .unwrap();
    assert!(catalog.volume("half").is_none());
    assert!(apply(
        &mut catalog,
        33,
        Command::VolumeCreateFinish {
            name: "half".into()
        }
    )
    .is_err());
}

#[test]
fn remembered_request_ids_are_bounded() {
    let mut catalog = Catalog::default();
    for id in 0..(APPLIED_REQUESTS_REMEMBERED_MAX as u128 + 10) {
        apply(&mut catalog, id, Command::Noop).unwrap();
    }
    assert!(catalog.applied_response(0).is_none());
    assert!(catalog
        .applied_response(APPLIED_REQUESTS_REMEMBERED_MAX as u128 + 9)
        .is_some());
}

fn any_command() -> impl Strategy<Value = Command> {
    let names = prop::sample::select(vec!["a", "b", "c"]);
    let nodes = prop::sample::select(vec!["east-1", "east-2", "west-1", "ghost"]);
    prop_oneof![
        (names.clone(), nodes.clone(), 0u64..12).prop_map(|(name, node, gib)| create(
            name,
            node,
            gib * GIB
        )),
        names
            .clone()
            .prop_map(|name| Command::VolumeCreateFinish { name: name.into() }),
        names
            .clone()
            .prop_map(|name| Command::VolumeCreateRollback {
                name: name.into(),
                reason: "test".into()
            }),
        names
            .clone()
            .prop_map(|name| Command::VolumeDeleteBegin { name: name.into() }),
        names
            .clone()
            .prop_map(|name| Command::VolumeDeleteFinish { name: name.into() }),
        (nodes.clone(), any::<bool>()).prop_map(|(node, up)| Command::SetNodeHealth {
            node: node.into(),
            health: if up { Health::Up } else { Health::Down }
        }),
        // A node re-registering may report another capacity or, wrongly, another site.
        (
            nodes.clone(),
            prop::sample::select(vec!["east", "west"]),
            1u64..16
        )
            .prop_map(|(node, site, gib)| Command::RegisterNode(report(
                node,
                site,
                gib * GIB
            ))),
        // Snaps on the saga: begun onto new or existing targets, finished either way.
        (
            0u128..4,
            nodes.clone(),
            names.clone(),
            names.clone(),
            any::<bool>()
        )
            .prop_map(|(id, node, source, target, create)| Command::IntentBegin(
                snap_intent(id, node, source, target, create)
            )),
        // Volume commands on the saga.
        (4u128..8, nodes.clone(), names.clone(), 0u64..12).prop_map(|(id, node, name, gib)| {
            Command::IntentBegin(volume_create_intent(id, node, name, gib * GIB))
        }),
        (4u128..8, nodes, names.clone()).prop_map(|(id, node, name)| Command::IntentBegin(
            volume_delete_intent(id, node, name)
        )),
        (0u128..8, 0u8..4).prop_map(|(id, result)| Command::IntentFinish {
            id,
            result: match result {
                0 => snapped_result("x"),
                1 => IntentResult::VolumeCreated {
                    info: volume_info("x")
                },
                2 => IntentResult::VolumeDeleted,
                _ => refused_result(),
            },
        }),
    ]
}

fn snap_intent(id: u128, node: &str, source: &str, target: &str, create: bool) -> Intent {
    Intent {
        id,
        node: node.into(),
        call: IntentCall::Snap {
            source: source.into(),
            target: target.into(),
            extents: Vec::new(),
            overwrite: false,
            create: create.then_some(NewVolume {
                size_bytes: GIB,
                track_size_bytes: TRACK,
            }),
        },
        begun_unix_seconds: 1,
    }
}

fn volume_create_intent(id: u128, node: &str, name: &str, size_bytes: u64) -> Intent {
    Intent {
        id,
        node: node.into(),
        call: IntentCall::VolumeCreate {
            name: name.into(),
            size_bytes,
            track_size_bytes: TRACK,
        },
        begun_unix_seconds: 1,
    }
}

fn volume_delete_intent(id: u128, node: &str, name: &str) -> Intent {
    Intent {
        id,
        node: node.into(),
        call: IntentCall::VolumeDelete { name: name.into() },
        begun_unix_seconds: 1,
    }
}

fn volume_info(name: &str) -> VolumeInfo {
    VolumeInfo {
        name: name.into(),
        id: 9,
        size_bytes: GIB,
        track_size_bytes: TRACK,
        track_count: GIB / u64::from(TRACK),
        readiness: Readiness::Ready,
        session_slots_used: 0,
        layer_depth: 2,
        created_unix_seconds: 1,
    }
}

fn snapped_result(target: &str) -> IntentResult {
    IntentResult::Snapped {
        target_info: volume_info(target),
        elapsed_micros: 5,
    }
}

fn refused_result() -> IntentResult {
    IntentResult::Refused {
        code: ErrorCode::IllegalState,
        message: "refused by the node".into(),
    }
}

#[test]
fn a_snap_intent_records_its_new_target_creating_and_its_result_makes_it_ready_or_removes_it() {
    let mut catalog = populated();
    apply(
        &mut catalog,
        10,
        Command::IntentBegin(snap_intent(1, "east-1", "data", "copy", true)),
    )
    .unwrap();
    assert_eq!(catalog.volume("copy").unwrap().state, VolumeState::Creating);
    assert_eq!(
        catalog.intent_of_volume("copy").map(|intent| intent.id),
        Some(1)
    );
    // Nothing else may start on the volume meanwhile.
    assert_eq!(
        apply(
            &mut catalog,
            11,
            Command::IntentBegin(snap_intent(2, "east-1", "data", "copy", false)),
        ),
        Err(CatalogError::IntentUnderWay {
            volume: "copy".into(),
            call: "snap".into()
        })
    );
    let finished = apply(
        &mut catalog,
        12,
        Command::IntentFinish {
            id: 1,
            result: snapped_result("copy"),
        },
    );
    assert_eq!(
        finished,
        Ok(CatalogReply::IntentFinished(snapped_result("copy")))
    );
    assert_eq!(catalog.volume("copy").unwrap().state, VolumeState::Ready);
    assert!(catalog.intents().next().is_none());
    // Finishing again (the command and the supervisor raced) changes nothing but the
    // memory of request ids.
    let before = catalog.clone();
    assert_eq!(
        apply(
            &mut catalog,
            13,
            Command::IntentFinish {
                id: 1,
                result: refused_result(),
            },
        ),
        Ok(CatalogReply::Done)
    );
    assert_eq!(
        catalog.volumes().collect::<Vec<_>>(),
        before.volumes().collect::<Vec<_>>()
    );
    assert!(catalog.intents().next().is_none());

    // A snap the node refused leaves nothing behind: its new target goes again.
    apply(
        &mut catalog,
        14,
        Command::IntentBegin(snap_intent(3, "east-1", "data", "other", true)),
    )
    .unwrap();
    apply(
        &mut catalog,
        15,
        Command::IntentFinish {
            id: 3,
            result: refused_result(),
        },
    )
    .unwrap();
    assert!(catalog.volume("other").is_none());
    // A snap onto an existing target keeps it either way.
    apply(
        &mut catalog,
        16,
        Command::IntentBegin(snap_intent(4, "east-1", "data", "copy", false)),
    )
    .unwrap();
    apply(
        &mut catalog,
        17,
        Command::IntentFinish {
            id: 4,
            result: refused_result(),
        },
    )
    .unwrap();
    assert_eq!(catalog.volume("copy").unwrap().state, VolumeState::Ready);
}

#[test]
fn a_volume_intent_holds_its_volume_creating_or_deleting_until_its_node_answers() {
    let mut catalog = populated();
    // A create is recorded `creating` with its intent, and made ready by the node's answer.
    apply(
        &mut catalog,
        10,
        Command::IntentBegin(volume_create_intent(1, "east-2", "logs", GIB)),
    )
    .unwrap();
    assert_eq!(catalog.volume("logs").unwrap().state, VolumeState::Creating);
    assert_eq!(catalog.volume("logs").unwrap().node, "east-2");
    // Neither a second create nor a delete of it may start meanwhile.
    for (id, intent) in [
        (11, volume_create_intent(2, "east-1", "logs", GIB)),
        (12, volume_delete_intent(3, "east-2", "logs")),
    ] {
        let refused = apply(&mut catalog, id, Command::IntentBegin(intent));
        assert!(
            matches!(refused, Err(CatalogError::IntentUnderWay { .. })),
            "{refused:?}"
        );
    }
    apply(
        &mut catalog,
        13,
        Command::IntentFinish {
            id: 1,
            result: IntentResult::VolumeCreated {
                info: volume_info("logs"),
            },
        },
    )
    .unwrap();
    assert_eq!(catalog.volume("logs").unwrap().state, VolumeState::Ready);
    // A create the node refused leaves no record.
    apply(
        &mut catalog,
        14,
        Command::IntentBegin(volume_create_intent(4, "east-2", "junk", GIB)),
    )
    .unwrap();
    apply(
        &mut catalog,
        15,
        Command::IntentFinish {
            id: 4,
            result: refused_result(),
        },
    )
    .unwrap();
    assert!(catalog.volume("junk").is_none());
    // A delete is recorded `deleting`; a refusal by the node gives the volume back as it
    // was, and its answer removes it.
    apply(
        &mut catalog,
        16,
        Command::IntentBegin(volume_delete_intent(5, "east-2", "logs")),
    )
    .unwrap();
    assert_eq!(catalog.volume("logs").unwrap().state, VolumeState::Deleting);
    apply(
        &mut catalog,
        17,
        Command::IntentFinish {
            id: 5,
            result: refused_result(),
        },
    )
    .unwrap();
    assert_eq!(catalog.volume("logs").unwrap().state, VolumeState::Ready);
    apply(
        &mut catalog,
        18,
        Command::IntentBegin(volume_delete_intent(6, "east-2", "logs")),
    )
    .unwrap();
    apply(
        &mut catalog,
        19,
        Command::IntentFinish {
            id: 6,
            result: IntentResult::VolumeDeleted,
        },
    )
    .unwrap();
    assert!(catalog.volume("logs").is_none());
    // A delete names the volume's own node; one in a session is refused.
    let before = catalog.clone();
    let elsewhere = apply(
        &mut catalog,
        20,
        Command::IntentBegin(volume_delete_intent(7, "west-1", "data")),
    );
    assert!(
        matches!(elsewhere, Err(CatalogError::Invalid { .. })),
        "{elsewhere:?}"
    );
    ready_volume(&mut catalog, 21, "bcv", "west-1");
    apply(
        &mut catalog,
        23,
        Command::SessionRecord(mirror(protocol::session::SessionState::Syncing)),
    )
    .unwrap();
    let in_session = apply(
        &mut catalog,
        24,
        Command::IntentBegin(volume_delete_intent(8, "east-1", "data")),
    );
    assert!(
        matches!(in_session, Err(CatalogError::VolumeInSession { .. })),
        "{in_session:?}"
    );
    assert_eq!(catalog.volume("data"), before.volume("data"));
    assert!(catalog.intents().next().is_none());
}

#[test]
fn a_volume_left_half_way_by_an_older_leader_is_taken_over_by_an_intent() {
    let mut catalog = populated();
    // Recorded as leaders before volume intents did: `creating`, with no intent.
    apply(&mut catalog, 10, create("old", "east-2", GIB)).unwrap();
    // An intent of the same volume on the same node, with its geometry, takes it over...
    apply(
        &mut catalog,
        11,
        Command::IntentBegin(volume_create_intent(1, "east-2", "old", GIB)),
    )
    .unwrap();
    assert_eq!(
        catalog.intent_of_volume("old").map(|intent| intent.id),
        Some(1)
    );
    apply(
        &mut catalog,
        12,
        Command::IntentFinish {
            id: 1,
            result: IntentResult::VolumeCreated {
                info: volume_info("old"),
            },
        },
    )
    .unwrap();
    assert_eq!(catalog.volume("old").unwrap().state, VolumeState::Ready);
    // ...and any other create of a name in use is refused.
    apply(&mut catalog, 13, create("older", "east-2", GIB)).unwrap();
    let other_size = apply(
        &mut catalog,
        14,
        Command::IntentBegin(volume_create_intent(2, "east-2", "older", 2 * GIB)),
    );
    assert!(
        matches!(other_size, Err(CatalogError::VolumeExists { .. })),
        "{other_size:?}"
    );
    // A legacy `deleting` volume is finished by a delete intent.
    apply(
        &mut catalog,
        15,
        Command::VolumeDeleteBegin { name: "old".into() },
    )
    .unwrap();
    apply(
        &mut catalog,
        16,
        Command::IntentBegin(volume_delete_intent(3, "east-2", "old")),
    )
    .unwrap();
    apply(
        &mut catalog,
        17,
        Command::IntentFinish {
            id: 3,
            result: IntentResult::VolumeDeleted,
        },
    )
    .unwrap();
    assert!(catalog.volume("old").is_none());
}

#[test]
fn a_snap_intent_is_refused_with_nothing_recorded_when_its_node_cannot_do_it() {
    let mut catalog = populated();
    let before = catalog.clone();
    let refused = [
        // The source is on east-1, not west-1.
        snap_intent(1, "west-1", "data", "copy", true),
        // No such source.
        snap_intent(1, "east-1", "ghost", "copy", true),
        // The target exists, so it cannot be created; and a missing target must be.
        snap_intent(1, "east-1", "data", "data", true),
        snap_intent(1, "east-1", "data", "missing", false),
    ];
    for (index, intent) in refused.into_iter().enumerate() {
        let answer = apply(
            &mut catalog,
            20 + index as u128,
            Command::IntentBegin(intent),
        );
        assert!(answer.is_err(), "{answer:?}");
    }
    assert_eq!(
        catalog.volumes().collect::<Vec<_>>(),
        before.volumes().collect::<Vec<_>>()
    );
    assert!(catalog.intents().next().is_none());
}

proptest! {
    /// Whatever the order of commands, replicas agree, refusals change nothing, a volume
    /// is placed only on an up node with room for it, and no node changes site.
    #[test]
    fn any_command_sequence_keeps_the_catalog_consistent(
        commands in prop::collection::vec((any_command(), 0u128..40), 1..60)
    ) {
        let mut catalog = populated();
        let mut replica = populated();
        for (command, id) in commands {
            let before = catalog.clone();
            let answer = apply(&mut catalog, id + 100, command.clone());
            prop_assert_eq!(&answer, &apply(&mut replica, id + 100, command.clone()));
            let command_applied = command;
            prop_assert_eq!(&catalog, &replica);
            if answer.is_err() {
                prop_assert_eq!(catalog.volumes().collect::<Vec<_>>(), before.volumes().collect::<Vec<_>>());
                prop_assert_eq!(catalog.nodes().collect::<Vec<_>>(), before.nodes().collect::<Vec<_>>());
                prop_assert_eq!(catalog.intents().collect::<Vec<_>>(), before.intents().collect::<Vec<_>>());
            }
            // One open intent per volume, and every open intent's volume is known.
            let owners: Vec<&str> = catalog.intents().map(|intent| intent.call.owner()).collect();
            let mut distinct = owners.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(owners.len(), distinct.len());
            for owner in owners {
                prop_assert!(catalog.volume(owner).is_some(), "intent on unknown {}", owner);
            }
            // A volume is placed only where it fits. (A node may later report less
            // capacity than it holds; the catalog records the report, it cannot refuse it.)
            // A reused request id gets its first answer back, so only new ids are checked.
            let fresh = before.applied_response(id + 100).is_none();
            if let (true, Ok(CatalogReply::Volume(volume)), Command::VolumeCreateBegin { .. }) =
                (fresh, &answer, &command_applied)
            {
                let node = catalog.node(&volume.node).unwrap();
                let provisioned: u64 = catalog
                    .volumes()
                    .filter(|other| other.node == node.name)
                    .map(|other| other.size_bytes)
                    .sum();
                prop_assert!(provisioned <= node.capacity_bytes);
                prop_assert_eq!(node.health, Health::Up);
            }
            // A node never changes site.
            for node in catalog.nodes() {
                if let Some(earlier) = before.node(&node.name) {
                    prop_assert_eq!(&node.site, &earlier.site);
                }
            }
        }
    }
}

fn ready_volume(catalog: &mut Catalog, id: u128, name: &str, node: &str) {
    apply(catalog, id, create(name, node, GIB)).unwrap();
    apply(
        catalog,
        id + 1,
        Command::VolumeCreateFinish { name: name.into() },
    )
    .unwrap();
}

fn mirror(state: protocol::session::SessionState) -> protocol::cluster::SessionEntry {
    protocol::cluster::SessionEntry {
        id: 7,
        node: "east-1".into(),
        kind: protocol::session::SessionKind::Mirror,
        source: "data".into(),
        target: "bcv".into(),
        state,
        slots: vec![0],
        tracks_copied: 0,
        tracks_remaining: 16_384,
        error: None,
    }
}

#[test]
fn sessions_are_recorded_only_through_reachable_states_and_hold_their_volumes() {
    use protocol::session::SessionState::*;
    let mut catalog = populated();
    ready_volume(&mut catalog, 100, "bcv", "west-1");
    let readiness = |catalog: &Catalog| catalog.volume("bcv").unwrap().readiness;
    apply(&mut catalog, 110, Command::SessionRecord(mirror(Syncing))).unwrap();
    // The BCV's readiness follows the session: taken from its hosts while a mirror...
    assert_eq!(readiness(&catalog), Readiness::NotReady);
    // A copy finishing and a split are reachable; a split mirror cannot be "active".
    apply(
        &mut catalog,
        111,
        Command::SessionRecord(mirror(Synchronized)),
    )
    .unwrap();
    assert_eq!(readiness(&catalog), Readiness::NotReady);
    apply(&mut catalog, 112, Command::SessionRecord(mirror(Split))).unwrap();
    // ...and given back at the split.
    assert_eq!(readiness(&catalog), Readiness::Ready);
    let before = catalog.clone();
    let refused = apply(&mut catalog, 113, Command::SessionRecord(mirror(Active)));
    assert!(
        matches!(refused, Err(CatalogError::SessionTransition { .. })),
        "{refused:?}"
    );
    assert_eq!(catalog.session("bcv").unwrap().state, Split);
    // The BCV taken by this session cannot be the target of another source.
    let mut other = mirror(Syncing);
    other.source = "bcv".into();
    let taken = apply(&mut catalog, 114, Command::SessionRecord(other));
    assert!(
        matches!(taken, Err(CatalogError::SessionTargetTaken { .. })),
        "{taken:?}"
    );
    // Neither volume of a session can be deleted while it lasts.
    for (id, volume) in [(115, "data"), (116, "bcv")] {
        let refused = apply(
            &mut catalog,
            id,
            Command::VolumeDeleteBegin {
                name: volume.into(),
            },
        );
        assert!(
            matches!(refused, Err(CatalogError::VolumeInSession { .. })),
            "{refused:?}"
        );
    }
    // A session of an unknown volume is refused.
    let mut unknown = mirror(Syncing);
    unknown.target = "nothing".into();
    assert!(matches!(
        apply(&mut catalog, 117, Command::SessionRecord(unknown)),
        Err(CatalogError::UnknownVolume { .. })
    ));
    // Refused commands are remembered by request id but change no record.
    assert_eq!(catalog.session("bcv"), before.session("bcv"));
    assert_eq!(catalog.volumes().count(), before.volumes().count());
    apply(
        &mut catalog,
        118,
        Command::SessionForget {
            target: "bcv".into(),
        },
    )
    .unwrap();
    assert!(catalog.session("bcv").is_none());
    apply(
        &mut catalog,
        119,
        Command::VolumeDeleteBegin { name: "bcv".into() },
    )
    .unwrap();
}

#[test]
fn every_state_a_session_reaches_by_commands_and_copies_is_reachable_in_the_catalog() {
    use control_plane::catalog::session_state_reachable;
    use protocol::session::{SessionKind, SessionState::*};
    assert!(session_state_reachable(SessionKind::Mirror, Split, Split));
    assert!(session_state_reachable(SessionKind::Mirror, Syncing, Split));
    assert!(session_state_reachable(
        SessionKind::Mirror,
        Split,
        Synchronized
    ));
    assert!(session_state_reachable(SessionKind::Clone, Created, Copied));
    // A target that stops answering suspends a session; it resumes by itself.
    assert!(session_state_reachable(
        SessionKind::Mirror,
        Synchronized,
        Suspended
    ));
    assert!(session_state_reachable(
        SessionKind::Mirror,
        Suspended,
        Synchronized
    ));
    assert!(session_state_reachable(
        SessionKind::Clone,
        Suspended,
        Copied
    ));
    assert!(!session_state_reachable(
        SessionKind::Clone,
        Copied,
        Precopying
    ));
    assert!(!session_state_reachable(
        SessionKind::Mirror,
        Synchronized,
        Active
    ));
}

#[test]
fn readiness_cannot_be_set_by_hand_on_a_volume_in_a_session_and_an_ended_session_takes_its_nodes_readiness(
) {
    use protocol::session::SessionState::*;
    let mut catalog = populated();
    ready_volume(&mut catalog, 9200, "bcv", "west-1");
    apply(&mut catalog, 9301, Command::SessionRecord(mirror(Syncing))).unwrap();
    // Neither the standard nor the BCV takes a readiness by hand while the mirror lasts:
    // the node refuses it too, and a catalog that accepted it would later push it to the
    // node as the truth.
    for (id, volume) in [(9302, "data"), (9303, "bcv")] {
        let before = catalog.clone();
        let refused = apply(
            &mut catalog,
            id,
            Command::VolumeSetReadiness {
                name: volume.into(),
                readiness: Readiness::ReadOnly,
            },
        );
        assert!(
            matches!(&refused, Err(CatalogError::ReadinessFollowsSession { volume: named, .. }) if named == volume),
            "{refused:?}"
        );
        assert_eq!(catalog.volume(volume), before.volume(volume));
    }
    assert!(catalog.check_readiness("bcv").is_err());
    // The session ends on its node while the catalog still recorded it syncing (a
    // rotation that synchronized, then a cancel): the catalog takes the readiness the
    // BCV's node reports, not one derived from its stale state.
    apply(
        &mut catalog,
        9304,
        Command::SessionEnded {
            target: "bcv".into(),
            target_readiness: Readiness::Ready,
        },
    )
    .unwrap();
    assert!(catalog.session("bcv").is_none());
    assert_eq!(catalog.volume("bcv").unwrap().readiness, Readiness::Ready);
    // Out of the session, readiness is the admin's again.
    apply(
        &mut catalog,
        9305,
        Command::VolumeSetReadiness {
            name: "bcv".into(),
            readiness: Readiness::ReadOnly,
        },
    )
    .unwrap();
    assert_eq!(
        catalog.volume("bcv").unwrap().readiness,
        Readiness::ReadOnly
    );
}
