//! The core's table tests, in openraft's manner: one event in, the exact effects and
//! record out.

use super::*;
use SessionState as S;

const TRACKS: u64 = 8;
const SESSION: SessionId = 7;

fn whole() -> Extent {
    Extent {
        first: 0,
        last: TRACKS - 1,
    }
}

fn extent(first: u64, last: u64) -> Extent {
    Extent { first, last }
}

fn remote() -> RemoteVolume {
    RemoteVolume {
        node: "beta".into(),
        address: "127.0.0.1:2".into(),
        volume: "bcv".into(),
    }
}

/// A session of `kind` in `state` holding slot 2 (and, for a clone, precopy slot 3).
fn session(kind: SessionKind, state: SessionState) -> SessionRecord {
    SessionRecord {
        id: SESSION,
        kind,
        source: "std".into(),
        target: "bcv".into(),
        state,
        mode: MirrorMode::Sync,
        slot: 2,
        precopy_slot: (kind == SessionKind::Clone).then_some(3),
        extents: vec![whole()],
        created_unix_seconds: 1,
        split_sequence: 0,
        split_when_synchronized: false,
        progress: Progress::default(),
        tracks_copied_last: 5,
        rate_limit_mebibytes_per_second: None,
        error: Some("an old problem".into()),
        remote: Some(remote()),
        last_error: None,
        strict: false,
        target_timeout_milliseconds: TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
        resume_state: (state == S::Suspended).then_some(match kind {
            SessionKind::Clone => S::Active,
            SessionKind::Mirror => S::Synchronized,
        }),
    }
}

/// Slots 0-3 are taken; slot 2 is attached (host writes mark it pending).
fn facts() -> Facts {
    Facts {
        free_slots: !0b1111,
        attached_slots: 0b0100,
        ..Facts::new(whole())
    }
}

fn commands() -> Vec<SessionCommand> {
    let bcv = || "bcv".to_string();
    vec![
        SessionCommand::ClonePrecopy { target: bcv() },
        SessionCommand::CloneActivate { target: bcv() },
        SessionCommand::CloneTerminate { target: bcv() },
        SessionCommand::CloneCancel { target: bcv() },
        SessionCommand::MirrorEstablish {
            standard: "std".into(),
            bcv: bcv(),
            mode: MirrorMode::Sync,
            strict: false,
            target_timeout_milliseconds: None,
        },
        SessionCommand::MirrorSplit {
            bcv: bcv(),
            differential: false,
        },
        SessionCommand::MirrorSplit {
            bcv: bcv(),
            differential: true,
        },
        SessionCommand::MirrorReestablish { bcv: bcv() },
        SessionCommand::MirrorRestore {
            bcv: bcv(),
            incremental: false,
        },
        SessionCommand::MirrorRestore {
            bcv: bcv(),
            incremental: true,
        },
        SessionCommand::MirrorCancel { bcv: bcv() },
    ]
}

fn target(operation: TargetOperation) -> Effect {
    Effect::Target(operation)
}

fn readiness(readiness: Readiness) -> Effect {
    target(TargetOperation::SetReadiness {
        session: SESSION,
        readiness,
    })
}

fn tracking(tracking: bool) -> Effect {
    target(TargetOperation::TrackChanges {
        session: SESSION,
        tracking,
    })
}

fn bits(bits: Bits, extents: Vec<Extent>, set: bool) -> Effect {
    Effect::SourceBits { bits, extents, set }
}

fn attach_effects() -> Vec<Effect> {
    vec![
        Effect::SourceMarks {
            slot: 2,
            changed: Some(true),
            pending: Some(true),
        },
        readiness(Readiness::NotReady),
        tracking(false),
        Effect::TargetAfterCommit(TargetOperation::ForgetChanges { session: SESSION }),
    ]
}

#[test]
fn every_state_and_command_is_decided_as_the_state_table_says() {
    for kind in [SessionKind::Clone, SessionKind::Mirror] {
        for state in [
            S::Created,
            S::Precopying,
            S::Active,
            S::Copied,
            S::Syncing,
            S::Synchronized,
            S::Split,
            S::Restoring,
            S::Suspended,
        ] {
            for command in commands() {
                let transition = transition_of(&command).unwrap();
                let record = session(kind, state);
                // A suspended clone's cancel is judged on the state it was suspended in.
                let judged = match (kind, transition) {
                    (SessionKind::Clone, Transition::Cancel) => record.acting_state(),
                    _ => state,
                };
                let table = next_state(kind, judged, transition);
                let decided = decide(&command, session(kind, state), &facts());
                // The driver takes a remote BCV from its hosts once the command is
                // accepted without its changed tracks: with them, it must be too.
                let with_changed = Facts {
                    target_changed: vec![1, 5],
                    ..facts()
                };
                assert_eq!(
                    decide(&command, session(kind, state), &with_changed).is_ok(),
                    decided.is_ok(),
                    "{kind} {state} {}",
                    command.name()
                );
                match (&table, &decided) {
                    (Err(reason), Err(Refusal::Reason(refused))) => {
                        assert_eq!(reason, refused, "{kind} {state} {}", command.name())
                    }
                    (Ok(next), Ok(decision)) => {
                        assert_eq!(
                            decision.record.as_ref().map(|record| record.state),
                            *next,
                            "{kind} {state} {}",
                            command.name()
                        );
                        // A command that keeps the session clears its old problem.
                        if let Some(record) = &decision.record {
                            assert_eq!(record.error, None);
                        }
                    }
                    _ => panic!(
                        "{kind} {state} {}: table {table:?}, decided {decided:?}",
                        command.name()
                    ),
                }
            }
        }
    }
}

#[test]
fn a_clone_is_created_with_its_destination_marked_missing_before_its_source_list() {
    let decision = create_clone(
        SESSION,
        "std",
        "bcv",
        vec![extent(1, 3), extent(6, 7)],
        true,
        Some(remote()),
        &facts(),
        100,
    )
    .unwrap();
    let extents = vec![extent(1, 3), extent(6, 7)];
    assert_eq!(
        decision.effects,
        vec![
            Effect::TakeSlot(4),
            Effect::TakeSlot(5),
            target(TargetOperation::MarkInvalid {
                session: SESSION,
                extents: extents.clone(),
            }),
            readiness(Readiness::NotReady),
            Effect::TargetTakeOver,
            bits(Bits::Session(4), extents, true),
        ]
    );
    let record = decision.record.unwrap();
    assert_eq!(record.state, S::Precopying);
    assert_eq!((record.slot, record.precopy_slot), (4, Some(5)));
    assert_eq!(record.progress.tracks_total, 5);
    assert_eq!(record.created_unix_seconds, 100);
}

#[test]
fn a_seventeenth_session_is_refused_before_anything_changes() {
    let full = Facts {
        free_slots: 0,
        ..facts()
    };
    let created = create_clone(SESSION, "std", "bcv", vec![whole()], false, None, &full, 1);
    assert_eq!(created, Err(Refusal::SlotsExhausted));
    // A precopy needs a second slot: one free slot is not enough.
    let one = Facts {
        free_slots: 1 << 9,
        ..facts()
    };
    let created = create_clone(SESSION, "std", "bcv", vec![whole()], true, None, &one, 1);
    assert_eq!(created, Err(Refusal::SlotsExhausted));
}

#[test]
fn activating_a_precopied_clone_marks_what_it_still_owes_drops_the_precopied_list_and_readies_the_destination(
) {
    let activate = SessionCommand::CloneActivate {
        target: "bcv".into(),
    };
    let owing = Facts {
        changed: vec![1, 2, 3, 6],
        ..facts()
    };
    let decision = decide(
        &activate,
        session(SessionKind::Clone, S::Precopying),
        &owing,
    )
    .unwrap();
    assert_eq!(
        decision.effects,
        vec![
            target(TargetOperation::MarkInvalid {
                session: SESSION,
                extents: vec![extent(1, 3), extent(6, 6)],
            }),
            bits(Bits::Session(3), vec![whole()], false),
            readiness(Readiness::Ready),
        ]
    );
    let record = decision.record.unwrap();
    assert_eq!(record.state, S::Active);
    assert_eq!(record.tracks_copied_last, 0);
    // Without a precopy there is no list to drop.
    let mut created = session(SessionKind::Clone, S::Created);
    created.precopy_slot = None;
    let decision = decide(&activate, created, &facts()).unwrap();
    assert_eq!(decision.effects, vec![readiness(Readiness::Ready)]);
}

#[test]
fn a_precopy_takes_its_slot_once() {
    let precopy = SessionCommand::ClonePrecopy {
        target: "bcv".into(),
    };
    let mut created = session(SessionKind::Clone, S::Created);
    created.precopy_slot = None;
    let decision = decide(&precopy, created, &facts()).unwrap();
    assert_eq!(decision.effects, vec![Effect::TakeSlot(4)]);
    assert_eq!(decision.record.unwrap().precopy_slot, Some(4));
}

#[test]
fn terminate_and_cancel_release_the_target_and_free_both_slots() {
    let terminate = SessionCommand::CloneTerminate {
        target: "bcv".into(),
    };
    let decision = decide(&terminate, session(SessionKind::Clone, S::Copied), &facts()).unwrap();
    let release = |clear_invalid: Vec<Extent>| {
        vec![
            target(TargetOperation::Release {
                session: SESSION,
                clear_invalid,
                readiness: None,
            }),
            Effect::FreeSlot(2),
            Effect::FreeSlot(3),
        ]
    };
    assert_eq!(decision.effects, release(Vec::new()));
    assert_eq!(decision.record, None);
    let cancel = SessionCommand::CloneCancel {
        target: "bcv".into(),
    };
    let decision = decide(&cancel, session(SessionKind::Clone, S::Created), &facts()).unwrap();
    assert_eq!(decision.effects, release(vec![whole()]));
}

#[test]
fn a_clone_suspended_before_its_activation_can_be_cancelled_and_one_suspended_after_cannot() {
    let cancel = SessionCommand::CloneCancel {
        target: "bcv".into(),
    };
    let mut precopying = session(SessionKind::Clone, S::Suspended);
    precopying.resume_state = Some(S::Precopying);
    let decision = decide(&cancel, precopying, &facts()).unwrap();
    assert_eq!(decision.record, None);
    assert_eq!(
        decision.effects[0],
        target(TargetOperation::Release {
            session: SESSION,
            clear_invalid: vec![whole()],
            readiness: None,
        })
    );
    let active = session(SessionKind::Clone, S::Suspended);
    assert_eq!(active.resume_state, Some(S::Active));
    assert!(matches!(
        decide(&cancel, active, &facts()),
        Err(Refusal::Reason(reason)) if reason.contains("the clone is active")
    ));
}

#[test]
fn an_establish_marks_every_track_changed_and_pending_and_attaches_the_bcv() {
    let establish = &commands()[4];
    let decision = decide(establish, session(SessionKind::Mirror, S::Split), &facts()).unwrap();
    let mut expected = vec![
        bits(Bits::Session(2), vec![whole()], true),
        bits(Bits::Pending(2), vec![whole()], true),
    ];
    expected.extend(attach_effects());
    assert_eq!(decision.effects, expected);
    let record = decision.record.unwrap();
    assert_eq!(record.state, S::Syncing);
    assert_eq!(record.progress.tracks_total, TRACKS);
    // A new pair: its slot and the BCV's data first, then the same path.
    let pair = establish_pair(
        SESSION,
        establish,
        "std",
        "bcv",
        MirrorMode::Async,
        false,
        500,
        None,
        &facts(),
        1,
    )
    .unwrap();
    assert_eq!(
        pair.effects[..2],
        [Effect::TakeSlot(4), Effect::TargetTakeOver]
    );
    let record = pair.record.unwrap();
    assert_eq!(
        (record.slot, record.state, record.mode),
        (4, S::Syncing, MirrorMode::Async)
    );
}

#[test]
fn a_reestablish_copies_what_changed_on_either_side_and_counts_it_exactly() {
    let facts = Facts {
        changed: vec![1, 2],
        pending: vec![2, 5],
        // Track 9 is past the standard's end: a larger BCV's own tracks are ignored.
        target_changed: vec![2, 3, 9],
        ..facts()
    };
    let reestablish = SessionCommand::MirrorReestablish { bcv: "bcv".into() };
    let decision = decide(&reestablish, session(SessionKind::Mirror, S::Split), &facts).unwrap();
    let mut expected = vec![
        bits(Bits::Session(2), vec![extent(2, 3)], true),
        bits(Bits::Pending(2), vec![extent(1, 3)], true),
    ];
    expected.extend(attach_effects());
    assert_eq!(decision.effects, expected);
    // Pending 2 and 5, changed 1, 2 and 3: tracks 1, 2, 3 and 5.
    assert_eq!(decision.record.unwrap().progress.tracks_total, 4);
}

#[test]
fn a_split_drains_then_marks_downstream_and_gives_the_bcv_to_its_hosts() {
    for differential in [false, true] {
        let split = SessionCommand::MirrorSplit {
            bcv: "bcv".into(),
            differential,
        };
        let facts = Facts {
            changed: vec![4],
            split_sequence_max: 6,
            ..facts()
        };
        let decision = decide(
            &split,
            session(SessionKind::Mirror, S::Synchronized),
            &facts,
        )
        .unwrap();
        assert_eq!(
            decision.effects,
            vec![
                Effect::Drain,
                target(TargetOperation::MarkDownstream {
                    session: SESSION,
                    tracks: differential.then(|| vec![4]),
                }),
                bits(Bits::Session(2), vec![whole()], false),
                Effect::SourceMarks {
                    slot: 2,
                    changed: None,
                    pending: Some(false),
                },
                tracking(true),
                readiness(Readiness::Ready),
            ]
        );
        let record = decision.record.unwrap();
        assert_eq!((record.state, record.split_sequence), (S::Split, 7));
    }
}

#[test]
fn a_split_waits_for_a_restore_of_the_standard() {
    let mut restoring = session(SessionKind::Mirror, S::Restoring);
    restoring.id = 8;
    let facts = Facts {
        others: vec![restoring],
        ..facts()
    };
    let split = &commands()[5];
    let refused = decide(split, session(SessionKind::Mirror, S::Synchronized), &facts);
    assert!(
        matches!(&refused, Err(Refusal::Reason(reason)) if reason.contains("restoring the standard")),
        "{refused:?}"
    );
}

#[test]
fn an_incremental_restore_marks_the_tracks_changed_on_either_side_and_every_other_mirror() {
    let mut other_mirror = session(SessionKind::Mirror, S::Split);
    other_mirror.id = 8;
    other_mirror.slot = 5;
    let mut attached_mirror = session(SessionKind::Mirror, S::Synchronized);
    attached_mirror.id = 9;
    attached_mirror.slot = 6;
    let facts = Facts {
        changed: vec![0],
        target_changed: vec![1, 6],
        attached_slots: 0b0100_0100,
        others: vec![other_mirror, attached_mirror],
        ..facts()
    };
    let restore = &commands()[9];
    let decision = decide(restore, session(SessionKind::Mirror, S::Split), &facts).unwrap();
    let restored = vec![extent(0, 1), extent(6, 6)];
    let mut expected = vec![
        bits(Bits::Invalid, restored.clone(), true),
        bits(Bits::Session(5), restored.clone(), true),
        bits(Bits::Session(6), restored.clone(), true),
        bits(Bits::Pending(6), restored, true),
        bits(Bits::Session(2), vec![whole()], false),
    ];
    expected.extend(attach_effects());
    assert_eq!(decision.effects, expected);
    let record = decision.record.unwrap();
    assert_eq!(
        (record.state, record.progress.tracks_total),
        (S::Restoring, 3)
    );
}

#[test]
fn a_restore_is_refused_from_an_incomplete_bcv_onto_an_unready_standard_or_under_a_clone() {
    let restore = &commands()[8];
    let split = || session(SessionKind::Mirror, S::Split);
    let reason = |facts: &Facts| match decide(restore, split(), facts) {
        Err(Refusal::Reason(reason)) => reason,
        other => panic!("{other:?}"),
    };
    let incomplete = Facts {
        target_invalid: 3,
        ..facts()
    };
    assert!(reason(&incomplete).contains("3 invalid tracks"));
    let unready = Facts {
        source_ready: false,
        ..facts()
    };
    assert!(reason(&unready).contains("not ready"));
    let mut clone = session(SessionKind::Clone, S::Active);
    clone.id = 8;
    let under_clone = Facts {
        others: vec![clone],
        ..facts()
    };
    assert!(reason(&under_clone).contains("point-in-time data"));
}

#[test]
fn a_cancel_gives_a_synchronized_bcv_to_its_hosts_unless_its_node_does_not_answer() {
    let cancel = &commands()[10];
    let decision = decide(
        cancel,
        session(SessionKind::Mirror, S::Synchronized),
        &facts(),
    )
    .unwrap();
    assert_eq!(
        decision.effects,
        vec![
            target(TargetOperation::Release {
                session: SESSION,
                clear_invalid: Vec::new(),
                readiness: Some(Readiness::Ready),
            }),
            Effect::FreeSlot(2),
        ]
    );
    assert_eq!(decision.record, None);
    let decision = decide(cancel, session(SessionKind::Mirror, S::Split), &facts()).unwrap();
    assert_eq!(
        decision.effects,
        vec![
            target(TargetOperation::Release {
                session: SESSION,
                clear_invalid: Vec::new(),
                readiness: None,
            }),
            Effect::FreeSlot(2),
        ]
    );
    let silent = Facts {
        target_answers: false,
        ..facts()
    };
    // A synchronized BCV whose node does not answer is not promised to its hosts: it
    // lacks what its standard wrote since, and its release comes late.
    let mut synchronized_remote = session(SessionKind::Mirror, S::Synchronized);
    synchronized_remote.remote = Some(remote());
    for record in [
        session(SessionKind::Mirror, S::Suspended),
        synchronized_remote,
    ] {
        let decision = decide(cancel, record, &silent).unwrap();
        assert_eq!(
            decision.effects,
            vec![
                target(TargetOperation::Release {
                    session: SESSION,
                    clear_invalid: Vec::new(),
                    readiness: None,
                }),
                Effect::FreeSlot(2)
            ]
        );
    }
}

#[test]
fn the_remaining_work_and_what_a_moved_track_clears_follow_the_state() {
    let cases = [
        (
            SessionKind::Clone,
            S::Created,
            Some((Bits::Session(2), Direction::ToTarget)),
            false,
        ),
        (
            SessionKind::Clone,
            S::Precopying,
            Some((Bits::Session(2), Direction::ToTarget)),
            true,
        ),
        (
            SessionKind::Clone,
            S::Active,
            Some((Bits::Session(2), Direction::ToTarget)),
            true,
        ),
        (SessionKind::Clone, S::Copied, None, false),
        (
            SessionKind::Clone,
            S::Suspended,
            Some((Bits::Session(2), Direction::ToTarget)),
            false,
        ),
        (
            SessionKind::Mirror,
            S::Syncing,
            Some((Bits::Pending(2), Direction::ToTarget)),
            true,
        ),
        (
            SessionKind::Mirror,
            S::Synchronized,
            Some((Bits::Pending(2), Direction::ToTarget)),
            true,
        ),
        (SessionKind::Mirror, S::Split, None, false),
        (
            SessionKind::Mirror,
            S::Restoring,
            Some((Bits::Invalid, Direction::FromTarget)),
            true,
        ),
        (
            SessionKind::Mirror,
            S::Suspended,
            Some((Bits::Pending(2), Direction::ToTarget)),
            false,
        ),
    ];
    for (kind, state, expected_work, expected_copies) in cases {
        let record = session(kind, state);
        assert_eq!(work(&record), expected_work, "{kind} {state}");
        assert_eq!(copies(&record), expected_copies, "{kind} {state}");
    }
    // Seed 001 FIG. 6: a precopied track joins the precopied list.
    assert_eq!(
        moved(&session(SessionKind::Clone, S::Precopying)),
        vec![(Bits::Session(2), false), (Bits::Session(3), true)]
    );
    assert_eq!(
        moved(&session(SessionKind::Clone, S::Active)),
        vec![(Bits::Session(2), false)]
    );
    assert_eq!(
        moved(&session(SessionKind::Mirror, S::Restoring)),
        vec![(Bits::Invalid, false)]
    );
    assert_eq!(moved(&session(SessionKind::Mirror, S::Split)), vec![]);
}

#[test]
fn what_a_copy_step_holds_and_skips_follows_the_kind_and_mode() {
    let clone = session(SessionKind::Clone, S::Active);
    assert_eq!(
        send(&clone),
        Send {
            only_if_invalid: true,
            holds_track_locks: true
        }
    );
    let precopy = session(SessionKind::Clone, S::Precopying);
    assert!(!send(&precopy).only_if_invalid);
    let sync = session(SessionKind::Mirror, S::Synchronized);
    assert!(send(&sync).holds_track_locks);
    let mut asynchronous = sync.clone();
    asynchronous.mode = MirrorMode::Async;
    assert!(!send(&asynchronous).holds_track_locks);
    assert!(!send(&session(SessionKind::Mirror, S::Syncing)).holds_track_locks);
    // A standard's track a restore has not brought back is not sent; a clone's is.
    assert!(skips(&sync, true));
    assert!(!skips(&sync, false));
    assert!(!skips(&clone, true));
}

#[test]
fn host_accesses_pull_and_ship_in_the_states_of_the_seeds() {
    assert!(access_pulls(&session(SessionKind::Clone, S::Active), false));
    assert!(access_pulls(&session(SessionKind::Clone, S::Copied), false));
    assert!(!access_pulls(
        &session(SessionKind::Clone, S::Precopying),
        false
    ));
    assert!(!access_pulls(&session(SessionKind::Clone, S::Active), true));
    assert!(access_pulls(
        &session(SessionKind::Mirror, S::Restoring),
        true
    ));
    assert!(!access_pulls(
        &session(SessionKind::Mirror, S::Restoring),
        false
    ));
    assert!(!access_pulls(
        &session(SessionKind::Mirror, S::Synchronized),
        true
    ));
    assert!(host_write_ships(&session(
        SessionKind::Mirror,
        S::Synchronized
    )));
    let mut asynchronous = session(SessionKind::Mirror, S::Synchronized);
    asynchronous.mode = MirrorMode::Async;
    assert!(!host_write_ships(&asynchronous));
    assert!(!host_write_ships(&session(SessionKind::Mirror, S::Syncing)));
    assert!(!host_write_ships(&session(
        SessionKind::Mirror,
        S::Suspended
    )));
}

#[test]
fn a_finished_copy_rests_in_the_states_of_the_seeds() {
    assert_eq!(
        copy_done(&session(SessionKind::Clone, S::Active)),
        Ok(Some(S::Copied))
    );
    assert_eq!(
        copy_done(&session(SessionKind::Mirror, S::Syncing)),
        Ok(Some(S::Synchronized))
    );
    assert_eq!(
        copy_done(&session(SessionKind::Mirror, S::Restoring)),
        Ok(Some(S::Synchronized))
    );
    assert_eq!(
        copy_done(&session(SessionKind::Clone, S::Precopying)),
        Ok(None)
    );
}

#[test]
fn a_target_that_stops_answering_suspends_a_session_unless_strict_or_here() {
    let record = session(SessionKind::Mirror, S::Synchronized);
    let suspended = suspend(&record, "no answer", 42).unwrap();
    assert_eq!(suspended.state, S::Suspended);
    assert_eq!(suspended.resume_state, Some(S::Synchronized));
    assert!(suspended.error.as_deref().unwrap().contains("node beta"));
    assert_eq!(suspended.last_error.unwrap().unix_seconds, 42);
    let mut strict = record.clone();
    strict.strict = true;
    assert_eq!(suspend(&strict, "no answer", 42), None);
    let mut here = record.clone();
    here.remote = None;
    assert_eq!(suspend(&here, "no answer", 42), None);
    assert_eq!(
        suspend(&session(SessionKind::Mirror, S::Split), "no answer", 42),
        None
    );
    // It resumes by resynchronizing what was written meanwhile.
    let mut suspended = suspend(&record, "no answer", 42).unwrap();
    suspended.state = S::Suspended;
    let resumed = resume(&suspended, 3).unwrap();
    assert_eq!(resumed.state, S::Syncing);
    assert_eq!(resumed.progress.tracks_total, 3);
    assert_eq!((resumed.resume_state, resumed.error), (None, None));
    let clone = suspend(&session(SessionKind::Clone, S::Active), "no answer", 1).unwrap();
    assert_eq!(resume(&clone, 0).unwrap().state, S::Active);
}

/// Found by the chaos schedule: a mirror suspended while syncing came back syncing with a
/// new copy's progress, so `mirror show` went from 40.6 % back to 20.3 %. It goes on with
/// the copy it had: the percent holds, and the tracks written meanwhile raise the total.
#[test]
fn a_mirror_suspended_while_syncing_resumes_the_same_copy_and_its_percent_holds() {
    let mut syncing = session(SessionKind::Mirror, S::Syncing);
    syncing.progress = Progress::start(64);
    let shown = syncing.progress.read(38).percent;
    assert!(shown > 40.0, "{shown}");
    let mut suspended = suspend(&syncing, "no answer", 7).unwrap();
    suspended.state = S::Suspended;
    let mut resumed = resume(&suspended, 70).unwrap();
    assert_eq!(resumed.state, S::Syncing);
    let reading = resumed.progress.read(70);
    assert_eq!(reading.tracks_total, 70);
    assert_eq!(reading.percent, shown);
    assert_eq!(resumed.progress.read(10).tracks_copied, 60);
}
