//! The gsnap planner on its own, in openraft's engine-test manner: a job and a catalog in,
//! the exact next action out, for each step in each situation (begun, under way, done,
//! refused, a node down, cancelled, failed) — seed 003's FIG. 3 job (no S') and FIG. 4's
//! (with S').

use control_plane::catalog::Catalog;
use control_plane::gsnap::{
    call_id, plan, progress_mark, refuse_cancel, stall_of, Action, Blocked,
};
use protocol::cluster::{
    derived_request_id, CatalogRequest, Command, Intent, IntentCall, IntentResult, NewVolume,
    NodeReport, SessionEntry,
};
use protocol::gsnap::{
    GsnapJob, GsnapSpec, GsnapStep, JobError, JobSend, JobState, SendMode, VerifyRound,
    RESEND_TRACKS_MAX, STALL_AFTER_SECONDS, VERIFY_ROUNDS_MAX,
};
use protocol::messages::{ErrorCode, Extent, Readiness, VolumeInfo};
use protocol::session::{SessionCommand, SessionKind, SessionState};

const GIB: u64 = 1 << 30;
const TRACK: u32 = 64 << 10;

/// Applies commands under fresh request ids.
struct Cluster {
    catalog: Catalog,
    next_request: u128,
}

impl Cluster {
    /// Node a1 on site-a with P (`p`), node b1 on site-b with S (`s`) and S' (`s-mid`).
    fn new() -> Cluster {
        let mut cluster = Cluster {
            catalog: Catalog::default(),
            next_request: 1_000,
        };
        for (node, site) in [("a1", "site-a"), ("b1", "site-b")] {
            cluster.apply(Command::RegisterNode(NodeReport {
                name: node.into(),
                site: site.into(),
                address: format!("{node}:7100"),
                nbd_address: format!("{node}:10809"),
                capacity_bytes: 100 * GIB,
                control_plane: node == "a1",
            }));
        }
        for (volume, node) in [("p", "a1"), ("s", "b1"), ("s-mid", "b1")] {
            cluster.apply(Command::VolumeCreateBegin {
                name: volume.into(),
                node: node.into(),
                size_bytes: GIB,
                track_size_bytes: TRACK,
            });
            cluster.apply(Command::VolumeCreateFinish {
                name: volume.into(),
            });
        }
        cluster
    }

    fn apply(&mut self, command: Command) {
        self.next_request += 1;
        self.apply_as(self.next_request, command);
    }

    fn apply_as(&mut self, request_id: u128, command: Command) {
        let answer = self.catalog.apply(&CatalogRequest {
            request_id,
            command: command.clone(),
        });
        assert!(answer.is_ok(), "{command:?}: {answer:?}");
    }

    fn begin(&mut self, job: &GsnapJob, step: GsnapStep, node: &str, call: IntentCall) {
        self.apply(Command::IntentBegin(Intent {
            id: call_id(job, step.name()),
            node: node.into(),
            call,
            begun_unix_seconds: 1,
        }));
    }

    /// Finishes intent `id` as the saga does: under its derived finish id.
    fn finish(&mut self, id: u128, result: IntentResult) {
        self.apply_as(
            derived_request_id(id, "finish"),
            Command::IntentFinish { id, result },
        );
    }

    fn pair(&mut self, job: &GsnapJob, state: SessionState) {
        self.apply(Command::SessionRecord(SessionEntry {
            id: 3,
            node: "a1".into(),
            kind: SessionKind::Clone,
            source: "p-mid".into(),
            target: job.pair_target().into(),
            state,
            slots: vec![0, 1],
            tracks_copied: 0,
            tracks_remaining: 16,
            error: None,
        }));
    }

    /// Records `job` as `tandem gsnap` does; the catalog's copy (with its id).
    fn record(&mut self, job: GsnapJob) -> GsnapJob {
        self.apply(Command::GsnapCreate(job));
        self.catalog.jobs().last().unwrap().clone()
    }

    fn send(&mut self, job: &GsnapJob, send: JobSend) {
        self.apply(Command::GsnapSend { job: job.id, send });
    }

    fn end_pair(&mut self, job: &GsnapJob) {
        self.apply(Command::SessionForget {
            target: job.pair_target().into(),
        });
    }
}

fn extents() -> Vec<Extent> {
    vec![Extent { first: 0, last: 15 }]
}

/// FIG. 3's job (`target_intermediate` None) or FIG. 4's (`Some("s-mid")`).
fn job(target_intermediate: Option<&str>) -> GsnapJob {
    GsnapJob::new(
        7,
        0xfeed,
        GsnapSpec {
            source: "p".into(),
            source_extents: extents(),
            intermediate: "p-mid".into(),
            target: "s".into(),
            target_extents: extents(),
            target_intermediate: target_intermediate.map(String::from),
            rate_mebibytes_per_second: None,
            full: false,
        },
        "a1".into(),
        "b1".into(),
        1,
    )
}

/// Marks every step before `step` (in the order the steps run) done and `step` started.
fn at(mut job: GsnapJob, step: GsnapStep) -> GsnapJob {
    let order = |step: GsnapStep| GsnapStep::ALL.iter().position(|known| *known == step);
    for record in job.steps.iter_mut() {
        if order(record.step) < order(step) {
            record.started_unix_seconds = Some(2);
            record.finished_unix_seconds = Some(3);
        } else if record.step == step {
            record.started_unix_seconds = Some(2);
        }
    }
    job
}

fn snap_call(create: bool) -> IntentCall {
    IntentCall::SnapLineage {
        source: "p".into(),
        target: "p-mid".into(),
        extents: extents(),
        target_extents: extents(),
        overwrite: false,
        create: create.then_some(NewVolume {
            size_bytes: GIB,
            track_size_bytes: TRACK,
        }),
        lineage: "p>s".into(),
    }
}

/// The send of a job that copies every track of its extents.
fn full_send() -> JobSend {
    JobSend {
        mode: SendMode::Full {
            reason: "first job".into(),
        },
        extents: extents(),
        tracks: 16,
    }
}

fn snapped() -> IntentResult {
    IntentResult::Snapped {
        target_info: VolumeInfo {
            name: "p-mid".into(),
            id: 4,
            size_bytes: GIB,
            track_size_bytes: TRACK,
            track_count: GIB / u64::from(TRACK),
            readiness: Readiness::Ready,
            session_slots_used: 0,
            layer_depth: 2,
            created_unix_seconds: 1,
        },
        elapsed_micros: 9,
    }
}

#[test]
fn the_snap_step_begins_its_intent_drives_it_and_is_done_when_the_node_answered() {
    let mut cluster = Cluster::new();
    let job = job(None);
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::StartStep(GsnapStep::Snap)
    );
    let job = at(job, GsnapStep::Snap);
    let id = call_id(&job, "snap");
    // P' does not exist yet: the intent creates it with P's geometry.
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::BeginIntent {
            id,
            node: "a1".into(),
            call: snap_call(true),
        }
    );
    cluster.begin(&job, GsnapStep::Snap, "a1", snap_call(true));
    assert_eq!(plan(&job, &cluster.catalog), Action::DriveIntent(id));
    // P's node is down: the job waits for it, saying since when.
    cluster.apply(Command::NodeDown {
        node: "a1".into(),
        since_unix_seconds: 44,
    });
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::Wait(Blocked::NodeDown {
            node: "a1".into(),
            since_unix_seconds: Some(44),
        })
    );
    cluster.apply(Command::RegisterNode(NodeReport {
        name: "a1".into(),
        site: "site-a".into(),
        address: "a1:7100".into(),
        nbd_address: "a1:10809".into(),
        capacity_bytes: 100 * GIB,
        control_plane: true,
    }));
    assert_eq!(plan(&job, &cluster.catalog), Action::DriveIntent(id));
    cluster.finish(id, snapped());
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::FinishStep(GsnapStep::Snap)
    );
}

#[test]
fn a_snap_the_node_refused_fails_the_job_with_the_nodes_words() {
    let mut cluster = Cluster::new();
    let job = at(job(None), GsnapStep::Snap);
    let id = call_id(&job, "snap");
    cluster.begin(&job, GsnapStep::Snap, "a1", snap_call(true));
    cluster.finish(
        id,
        IntentResult::Refused {
            code: ErrorCode::IllegalState,
            message: "p-mid is not a snapshot of p".into(),
        },
    );
    let error = JobError {
        step: GsnapStep::Snap,
        code: ErrorCode::IllegalState,
        detail: "p-mid is not a snapshot of p".into(),
    };
    assert_eq!(plan(&job, &cluster.catalog), Action::Fail(error.clone()));
    // Recorded, the failure ends the job: nothing was started that needs ending.
    let mut failed = job.clone();
    failed.error = Some(error.clone());
    assert_eq!(
        plan(&failed, &cluster.catalog),
        Action::Finish {
            state: JobState::Failed,
            error: Some(error),
        }
    );
}

#[test]
fn fig_3_the_pair_is_a_precopied_clone_activated_after_its_copy_and_then_terminated() {
    let mut cluster = Cluster::new();
    cluster.begin(&job(None), GsnapStep::Snap, "a1", snap_call(true));
    cluster.finish(call_id(&job(None), "snap"), snapped());

    // Before the pair, the job rotates the target's lineage and records what it sends.
    let job_at_pair = at(cluster.record(job(None)), GsnapStep::Pair);
    assert_eq!(plan(&job_at_pair, &cluster.catalog), Action::PlanSend);
    cluster.send(&job_at_pair, full_send());
    assert_eq!(
        plan(&job_at_pair, &cluster.catalog),
        Action::Session {
            request_id: call_id(&job_at_pair, "pair"),
            command: SessionCommand::CloneCreate {
                source: "p-mid".into(),
                target: "s".into(),
                precopy: true,
                extents: extents(),
            },
        }
    );
    cluster.pair(&job_at_pair, SessionState::Precopying);
    assert_eq!(
        plan(&job_at_pair, &cluster.catalog),
        Action::FinishStep(GsnapStep::Pair)
    );

    // The copy is done when the pair's node reports nothing left to precopy.
    let mut copying = at(job(None), GsnapStep::Copy);
    assert_eq!(plan(&copying, &cluster.catalog), Action::PollPair);
    copying.tracks_total = 16;
    copying.tracks_remaining = Some(5);
    assert_eq!(plan(&copying, &cluster.catalog), Action::PollPair);
    assert_eq!(copying.tracks_copied(), 11);
    copying.tracks_remaining = Some(0);
    assert_eq!(
        plan(&copying, &cluster.catalog),
        Action::FinishStep(GsnapStep::Copy)
    );

    let activating = at(job(None), GsnapStep::Activate);
    assert_eq!(
        plan(&activating, &cluster.catalog),
        Action::Session {
            request_id: call_id(&activating, "activate"),
            command: SessionCommand::CloneActivate { target: "s".into() },
        }
    );
    cluster.pair(&activating, SessionState::Active);
    assert_eq!(
        plan(&activating, &cluster.catalog),
        Action::FinishStep(GsnapStep::Activate)
    );

    let settling = at(job(None), GsnapStep::Settle);
    assert_eq!(plan(&settling, &cluster.catalog), Action::PollPair);
    cluster.pair(&settling, SessionState::Copied);
    assert_eq!(
        plan(&settling, &cluster.catalog),
        Action::FinishStep(GsnapStep::Settle)
    );

    let terminating = at(job(None), GsnapStep::Terminate);
    assert_eq!(
        plan(&terminating, &cluster.catalog),
        Action::Session {
            request_id: call_id(&terminating, "terminate"),
            command: SessionCommand::CloneTerminate { target: "s".into() },
        }
    );
    cluster.end_pair(&terminating);
    assert_eq!(
        plan(&terminating, &cluster.catalog),
        Action::FinishStep(GsnapStep::Terminate)
    );

    // Without S' there is no target snap: the job has succeeded.
    let mut done = at(job(None), GsnapStep::TargetSnap);
    done.step_mut(GsnapStep::TargetSnap).started_unix_seconds = None;
    assert!(done.step(GsnapStep::TargetSnap).skipped);
    assert_eq!(
        plan(&done, &cluster.catalog),
        Action::Finish {
            state: JobState::Succeeded,
            error: None,
        }
    );
    done.state = JobState::Succeeded;
    assert_eq!(plan(&done, &cluster.catalog), Action::Idle);
}

#[test]
fn fig_4_the_pair_copies_into_s_prime_and_a_snap_on_s_node_lands_it_in_s_extents() {
    let mut cluster = Cluster::new();
    let at_pair = at(cluster.record(job(Some("s-mid"))), GsnapStep::Pair);
    cluster.send(&at_pair, full_send());
    assert_eq!(
        plan(&at_pair, &cluster.catalog),
        Action::Session {
            request_id: call_id(&at_pair, "pair"),
            command: SessionCommand::CloneCreate {
                source: "p-mid".into(),
                target: "s-mid".into(),
                precopy: true,
                extents: extents(),
            },
        }
    );
    let target_snap = at(job(Some("s-mid")), GsnapStep::TargetSnap);
    let id = call_id(&target_snap, "target-snap");
    let call = IntentCall::Snap {
        source: "s-mid".into(),
        target: "s".into(),
        extents: extents(),
        overwrite: true,
        create: None,
    };
    assert_eq!(
        plan(&target_snap, &cluster.catalog),
        Action::BeginIntent {
            id,
            node: "b1".into(),
            call: call.clone(),
        }
    );
    cluster.begin(&target_snap, GsnapStep::TargetSnap, "b1", call);
    assert_eq!(
        plan(&target_snap, &cluster.catalog),
        Action::DriveIntent(id)
    );
    cluster.finish(id, snapped());
    assert_eq!(
        plan(&target_snap, &cluster.catalog),
        Action::FinishStep(GsnapStep::TargetSnap)
    );
}

#[test]
fn a_cancel_before_the_activation_ends_the_pair_then_the_job_and_is_refused_after_it() {
    let mut cluster = Cluster::new();
    let mut copying = at(job(None), GsnapStep::Copy);
    copying.cancel_requested = true;
    assert_eq!(refuse_cancel(&copying), None);
    // No pair yet (the pair step never ran): the job ends cancelled at once.
    assert_eq!(
        plan(&copying, &cluster.catalog),
        Action::Finish {
            state: JobState::Cancelled,
            error: None,
        }
    );
    // An open snap intent is finished first: its node may already have snapped.
    cluster.begin(&copying, GsnapStep::Snap, "a1", snap_call(true));
    let id = call_id(&copying, "snap");
    assert_eq!(plan(&copying, &cluster.catalog), Action::DriveIntent(id));
    cluster.finish(id, snapped());
    // A pair precopying is cancelled.
    cluster.pair(&copying, SessionState::Precopying);
    assert_eq!(
        plan(&copying, &cluster.catalog),
        Action::Session {
            request_id: call_id(&copying, "cancel"),
            command: SessionCommand::CloneCancel { target: "s".into() },
        }
    );
    cluster.end_pair(&copying);
    assert_eq!(
        plan(&copying, &cluster.catalog),
        Action::Finish {
            state: JobState::Cancelled,
            error: None,
        }
    );
    // Once the activation began, S is getting the image: the job finishes instead.
    let mut activating = at(job(None), GsnapStep::Activate);
    assert!(refuse_cancel(&activating).is_some());
    activating.cancel_requested = true;
    assert!(matches!(
        plan(&activating, &cluster.catalog),
        Action::Session {
            command: SessionCommand::CloneActivate { .. },
            ..
        }
    ));
}

#[test]
fn a_failed_job_lets_an_activated_pair_copy_to_the_end_and_terminates_it() {
    let mut cluster = Cluster::new();
    let mut failed = at(job(None), GsnapStep::Settle);
    let error = JobError {
        step: GsnapStep::Settle,
        code: ErrorCode::Internal,
        detail: "test".into(),
    };
    failed.error = Some(error.clone());
    cluster.begin(&failed, GsnapStep::Snap, "a1", snap_call(true));
    cluster.finish(call_id(&failed, "snap"), snapped());
    cluster.pair(&failed, SessionState::Active);
    assert_eq!(plan(&failed, &cluster.catalog), Action::PollPair);
    cluster.pair(&failed, SessionState::Copied);
    assert_eq!(
        plan(&failed, &cluster.catalog),
        Action::Session {
            request_id: call_id(&failed, "terminate"),
            command: SessionCommand::CloneTerminate { target: "s".into() },
        }
    );
    cluster.end_pair(&failed);
    assert_eq!(
        plan(&failed, &cluster.catalog),
        Action::Finish {
            state: JobState::Failed,
            error: Some(error),
        }
    );
}

#[test]
fn every_call_of_a_job_has_its_own_id_the_same_for_every_leader() {
    let job = job(None);
    let ids: Vec<u128> = [
        "snap",
        "pair",
        "activate",
        "terminate",
        "cancel",
        "target-snap",
    ]
    .iter()
    .map(|call| call_id(&job, call))
    .collect();
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len());
    assert_eq!(ids[0], call_id(&job.clone(), "snap"));
    let mut other = job.clone();
    other.request_id += 1;
    assert_ne!(call_id(&other, "snap"), ids[0]);
}

#[test]
fn the_catalog_records_a_job_only_when_its_volumes_and_nodes_fit_and_holds_its_volumes() {
    let mut cluster = Cluster::new();
    let refused = |cluster: &mut Cluster, job: GsnapJob| {
        cluster.next_request += 1;
        cluster.catalog.apply(&CatalogRequest {
            request_id: cluster.next_request,
            command: Command::GsnapCreate(job),
        })
    };
    let mut same_twice = job(None);
    same_twice.spec.intermediate = "p".into();
    assert!(refused(&mut cluster, same_twice).is_err());
    let mut elsewhere = job(None);
    elsewhere.target_node = "a1".into();
    assert!(refused(&mut cluster, elsewhere).is_err(), "S is on b1");
    let mut mismatched = job(None);
    mismatched.spec.target_extents = vec![Extent {
        first: 16,
        last: 30,
    }];
    let error = refused(&mut cluster, mismatched).unwrap_err().to_string();
    assert!(error.contains("same number"), "{error}");
    let tracks = GIB / u64::from(TRACK);
    let mut beyond = job(None);
    beyond.spec.target_extents = vec![Extent {
        first: tracks - 8,
        last: tracks + 7,
    }];
    let error = refused(&mut cluster, beyond).unwrap_err().to_string();
    assert!(error.contains("does not fit"), "{error}");
    assert!(cluster.catalog.jobs().next().is_none(), "nothing recorded");

    let reply = refused(&mut cluster, job(None)).expect("a job that fits");
    let protocol::cluster::CatalogReply::Job(recorded) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(recorded.id, 1);
    // Its volumes are held: not deleted, not in a second job.
    cluster.next_request += 1;
    let delete = cluster.catalog.apply(&CatalogRequest {
        request_id: cluster.next_request,
        command: Command::VolumeDeleteBegin { name: "s".into() },
    });
    assert!(delete.is_err(), "{delete:?}");
    assert!(refused(&mut cluster, job(None)).is_err(), "S is in job 1");
    // An ended job changes no more and lets its volumes go.
    let mut ended = (*recorded).clone();
    ended.state = JobState::Succeeded;
    cluster.apply(Command::GsnapRecord(ended.clone()));
    cluster.next_request += 1;
    assert!(cluster
        .catalog
        .apply(&CatalogRequest {
            request_id: cluster.next_request,
            command: Command::GsnapRecord(ended),
        })
        .is_err());
    let second = refused(&mut cluster, job(None)).expect("the volumes are free again");
    assert!(matches!(
        second,
        protocol::cluster::CatalogReply::Job(ref job) if job.id == 2
    ));
}

/// A verification round with the given outcome.
fn round(round: u32, matched: bool, differing: &[u64], resent: bool) -> VerifyRound {
    VerifyRound {
        round,
        at_unix_seconds: 10,
        tracks: 16,
        bytes: 16 * u64::from(TRACK),
        source: [1; 32],
        target: if matched { [1; 32] } else { [2; 32] },
        differing: differing.to_vec(),
        differing_count: differing.len() as u64,
        resent,
    }
}

#[test]
fn the_verification_runs_rounds_until_the_digests_match_and_is_then_done() {
    let mut cluster = Cluster::new();
    let recorded = cluster.record(job(None));
    // The verification follows the copy and comes before the activation.
    let mut copied = at(recorded.clone(), GsnapStep::Copy);
    copied.tracks_remaining = Some(0);
    assert_eq!(
        plan(&copied, &cluster.catalog),
        Action::FinishStep(GsnapStep::Copy)
    );
    copied.step_mut(GsnapStep::Copy).finished_unix_seconds = Some(3);
    assert_eq!(
        plan(&copied, &cluster.catalog),
        Action::StartStep(GsnapStep::Verify)
    );
    let job = at(recorded, GsnapStep::Verify);
    assert_eq!(plan(&job, &cluster.catalog), Action::Verify { round: 1 });
    // Track 9 differed and was sent again: a second round.
    cluster.apply(Command::GsnapVerified {
        job: job.id,
        round: round(1, false, &[9], true),
    });
    assert_eq!(plan(&job, &cluster.catalog), Action::Verify { round: 2 });
    // Both nodes must be up for a round.
    cluster.apply(Command::NodeDown {
        node: "b1".into(),
        since_unix_seconds: 50,
    });
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::Wait(Blocked::NodeDown {
            node: "b1".into(),
            since_unix_seconds: Some(50),
        })
    );
}

#[test]
fn digests_that_still_differ_after_the_rounds_allowed_fail_the_job_naming_the_tracks() {
    let mut cluster = Cluster::new();
    let job = at(cluster.record(job(None)), GsnapStep::Verify);
    for number in 1..VERIFY_ROUNDS_MAX as u32 {
        cluster.apply(Command::GsnapVerified {
            job: job.id,
            round: round(number, false, &[9], true),
        });
        assert_eq!(
            plan(&job, &cluster.catalog),
            Action::Verify { round: number + 1 }
        );
    }
    cluster.apply(Command::GsnapVerified {
        job: job.id,
        round: round(VERIFY_ROUNDS_MAX as u32, false, &[9], false),
    });
    let Action::Fail(error) = plan(&job, &cluster.catalog) else {
        panic!("the job goes on after its last round");
    };
    assert_eq!(error.step, GsnapStep::Verify);
    assert_eq!(error.code, ErrorCode::DigestMismatch);
    assert!(error.detail.contains("tracks 9"), "{}", error.detail);
    assert!(error.detail.contains(&"01".repeat(32)), "{}", error.detail);
}

#[test]
fn too_many_differing_tracks_fail_the_job_at_once_and_a_match_ends_the_step() {
    let mut cluster = Cluster::new();
    let job = at(cluster.record(job(None)), GsnapStep::Verify);
    let mut first = round(1, false, &[], false);
    first.differing_count = RESEND_TRACKS_MAX + 1;
    cluster.apply(Command::GsnapVerified {
        job: job.id,
        round: first,
    });
    let Action::Fail(error) = plan(&job, &cluster.catalog) else {
        panic!("too many differing tracks did not fail the job");
    };
    assert!(error.detail.contains("too many"), "{}", error.detail);

    let mut cluster = Cluster::new();
    let job = at(cluster.record(self::job(None)), GsnapStep::Verify);
    cluster.apply(Command::GsnapVerified {
        job: job.id,
        round: round(1, true, &[], false),
    });
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::FinishStep(GsnapStep::Verify)
    );
}

#[test]
fn the_catalog_records_verification_rounds_once_and_in_order_and_keeps_a_cancel() {
    let mut cluster = Cluster::new();
    let id = cluster.record(job(None)).id;
    let answer = |cluster: &mut Cluster, command: Command| {
        cluster.next_request += 1;
        cluster.catalog.apply(&CatalogRequest {
            request_id: cluster.next_request,
            command,
        })
    };
    let mut first = round(1, false, &[9], true);
    assert!(answer(
        &mut cluster,
        Command::GsnapVerified {
            job: id,
            round: first.clone()
        }
    )
    .is_ok());
    // The same round again (a retry) changes nothing; a round out of order is refused.
    first.resent = false;
    assert!(answer(
        &mut cluster,
        Command::GsnapVerified {
            job: id,
            round: first
        }
    )
    .is_ok());
    assert!(cluster.catalog.verification(id)[0].resent);
    assert!(answer(
        &mut cluster,
        Command::GsnapVerified {
            job: id,
            round: round(3, true, &[], false)
        }
    )
    .is_err());
    assert_eq!(cluster.catalog.verification(id).len(), 1);

    // A cancel stays asked for when the driver records a copy it read before it, and
    // that copy may not start the activation the cancel came before.
    let stale = cluster.catalog.job(id).unwrap().clone();
    assert!(answer(&mut cluster, Command::GsnapCancel { job: id }).is_ok());
    let mut snapping = stale.clone();
    snapping.step_mut(GsnapStep::Snap).started_unix_seconds = Some(4);
    assert!(answer(&mut cluster, Command::GsnapRecord(snapping)).is_ok());
    let job = cluster.catalog.job(id).unwrap();
    assert!(job.cancel_requested);
    assert_eq!(job.step(GsnapStep::Snap).started_unix_seconds, Some(4));
    let mut activating = at(stale, GsnapStep::Activate);
    activating.cancel_requested = false;
    assert!(answer(&mut cluster, Command::GsnapRecord(activating)).is_err());
    assert!(cluster
        .catalog
        .job(id)
        .unwrap()
        .step(GsnapStep::Activate)
        .started_unix_seconds
        .is_none());

    // Once the activation began, a cancel is refused and records nothing.
    let mut cluster = Cluster::new();
    let id = cluster.record(self::job(None)).id;
    let activating = at(
        cluster.catalog.job(id).unwrap().clone(),
        GsnapStep::Activate,
    );
    cluster.apply(Command::GsnapRecord(activating));
    let refused = answer(&mut cluster, Command::GsnapCancel { job: id }).unwrap_err();
    assert!(
        refused.to_string().contains("past its activation"),
        "{refused}"
    );
    assert!(!cluster.catalog.job(id).unwrap().cancel_requested);
}

#[test]
fn a_job_is_stalled_only_after_the_threshold_without_progress() {
    let mut cluster = Cluster::new();
    let job = at(cluster.record(job(None)), GsnapStep::Verify);
    let before = progress_mark(&job, &cluster.catalog);
    assert_eq!(
        stall_of(
            100,
            Some("node b1 unreachable"),
            100 + STALL_AFTER_SECONDS - 1
        ),
        None
    );
    let stall = stall_of(100, Some("node b1 unreachable"), 100 + STALL_AFTER_SECONDS).unwrap();
    assert_eq!(stall.reason, "node b1 unreachable");
    assert_eq!(stall.since_unix_seconds, 100);
    assert!(stall_of(100, None, 1_000)
        .unwrap()
        .reason
        .contains("no step"));
    // A verification round is progress.
    cluster.apply(Command::GsnapVerified {
        job: job.id,
        round: round(1, false, &[9], true),
    });
    assert_ne!(progress_mark(&job, &cluster.catalog), before);
}

#[test]
fn a_missing_s_prime_is_made_on_s_node_with_s_geometry_before_the_pair() {
    let mut cluster = Cluster::new();
    let job = at(cluster.record(job(Some("s-new"))), GsnapStep::Pair);
    let request_id = call_id(&job, "create target intermediate");
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::CreateVolume {
            request_id,
            name: "s-new".into(),
            node: "b1".into(),
            size_bytes: GIB,
            track_size_bytes: TRACK,
        }
    );
    // While its node makes it, the job waits; once ready, the pair copies into it.
    cluster.apply(Command::VolumeCreateBegin {
        name: "s-new".into(),
        node: "b1".into(),
        size_bytes: GIB,
        track_size_bytes: TRACK,
    });
    assert_eq!(
        plan(&job, &cluster.catalog),
        Action::Wait(Blocked::VolumeNotReady {
            volume: "s-new".into()
        })
    );
    cluster.apply(Command::VolumeCreateFinish {
        name: "s-new".into(),
    });
    assert_eq!(plan(&job, &cluster.catalog), Action::PlanSend);
    cluster.send(&job, full_send());
    assert!(matches!(
        plan(&job, &cluster.catalog),
        Action::Session {
            command: SessionCommand::CloneCreate { ref target, .. },
            ..
        } if target == "s-new"
    ));
}

#[test]
fn extents_at_another_offset_snap_p_onto_p_prime_at_s_track_numbers() {
    let mut cluster = Cluster::new();
    let mut shifted = job(None);
    shifted.spec.target_extents = vec![
        Extent {
            first: 100,
            last: 103,
        },
        Extent {
            first: 200,
            last: 211,
        },
    ];
    let job = at(cluster.record(shifted), GsnapStep::Snap);
    let Action::BeginIntent { call, .. } = plan(&job, &cluster.catalog) else {
        panic!("the snap step begins no intent");
    };
    assert_eq!(
        call,
        IntentCall::SnapLineage {
            source: "p".into(),
            target: "p-mid".into(),
            extents: extents(),
            target_extents: job.spec.target_extents.clone(),
            overwrite: false,
            // P' takes S's geometry, so the pair copies without offsets.
            create: Some(NewVolume {
                size_bytes: GIB,
                track_size_bytes: TRACK,
            }),
            lineage: "p>s".into(),
        }
    );
    // The pair copies S's extents.
    let at_pair = at(job.clone(), GsnapStep::Pair);
    cluster.begin(&job, GsnapStep::Snap, "a1", call);
    cluster.finish(call_id(&job, "snap"), snapped());
    let send = control_plane::gsnap::send_of(&at_pair, &cluster.catalog, None, None);
    assert_eq!(send.extents, at_pair.spec.target_extents);
    cluster.send(&at_pair, send);
    assert!(matches!(
        plan(&at_pair, &cluster.catalog),
        Action::Session {
            command: SessionCommand::CloneCreate { ref extents, .. },
            ..
        } if *extents == at_pair.spec.target_extents
    ));
}

/// Ends a recorded job as its driver does, with `state`.
fn end_job(cluster: &mut Cluster, job: &GsnapJob, state: JobState) {
    let mut ended = job.clone();
    ended.state = state;
    ended.finished_unix_seconds = Some(9);
    cluster.apply(Command::GsnapRecord(ended));
}

/// A job of P's tracks 0-15 landing on S's 100-115, with or without S'.
fn shifted_job(request_id: u128, target_intermediate: Option<&str>) -> GsnapJob {
    let mut shifted = job(target_intermediate);
    shifted.request_id = request_id;
    shifted.spec.target_extents = vec![Extent {
        first: 100,
        last: 115,
    }];
    shifted
}

fn run(first: u64, last: u64) -> Extent {
    Extent { first, last }
}

#[test]
fn after_a_job_succeeded_the_next_sends_the_changes_of_both_sides_on_the_targets_numbers() {
    let mut cluster = Cluster::new();
    let first = at(cluster.record(shifted_job(1, None)), GsnapStep::Snap);
    // The first job of P and S has no lineage to follow: it sends every track.
    let send = control_plane::gsnap::send_of(&first, &cluster.catalog, None, None);
    assert_eq!(send.extents, vec![run(100, 115)]);
    assert_eq!(send.tracks, 16);
    let SendMode::Full { reason } = &send.mode else {
        panic!("{send:?}");
    };
    assert!(reason.contains("no earlier job"), "{reason}");
    cluster.send(&first, send);
    end_job(&mut cluster, &first, JobState::Succeeded);
    let lineage = cluster.catalog.lineage("p", "s").unwrap().clone();
    assert_eq!(lineage.last_job, first.id);
    assert_eq!(lineage.tracked(), "s");

    // P's tracks 3-4 and 40 (not the job's) changed, and S's 102 and 5000 (not the job's):
    // the job sends P's 3-4 at S's 103-104, and S's 102.
    let second = at(cluster.record(shifted_job(2, None)), GsnapStep::Pair);
    let source_frozen = [run(3, 4), run(40, 40)];
    let target_frozen = [run(102, 102), run(5000, 5000)];
    let send = control_plane::gsnap::send_of(
        &second,
        &cluster.catalog,
        Some(&source_frozen),
        Some(&target_frozen),
    );
    assert_eq!(
        send.mode,
        SendMode::Incremental {
            since_job: first.id,
            source_changed: 2,
            target_changed: 1,
        }
    );
    assert_eq!(send.extents, vec![run(102, 104)]);
    assert_eq!(send.tracks, 3);

    // Each reason to send everything, said.
    let full_reason = |job: &GsnapJob, source: Option<&[Extent]>, target: Option<&[Extent]>| {
        match control_plane::gsnap::send_of(job, &cluster.catalog, source, target).mode {
            SendMode::Full { reason } => reason,
            other => panic!("{other:?}"),
        }
    };
    let mut full = second.clone();
    full.spec.full = true;
    assert_eq!(
        full_reason(&full, Some(&source_frozen), Some(&target_frozen)),
        "--full asks for every track"
    );
    assert!(full_reason(&second, None, Some(&target_frozen)).contains("node a1 kept no record"));
    assert!(full_reason(&second, Some(&source_frozen), None).contains("node b1 kept no record"));
    let mut other = second.clone();
    other.spec.intermediate = "p-other".into();
    assert!(
        full_reason(&other, Some(&source_frozen), Some(&target_frozen)).contains("intermediate")
    );
    let mut moved = second.clone();
    moved.spec.target_extents = vec![run(200, 215)];
    assert!(full_reason(&moved, Some(&source_frozen), Some(&target_frozen)).contains("extents"));
}

#[test]
fn a_job_with_nothing_to_send_skips_its_pair_and_with_s_prime_still_snaps_s() {
    let mut cluster = Cluster::new();
    let job = cluster.record(job(Some("s-mid")));
    cluster.send(
        &job,
        JobSend {
            mode: SendMode::Incremental {
                since_job: 1,
                source_changed: 0,
                target_changed: 0,
            },
            extents: Vec::new(),
            tracks: 0,
        },
    );
    for step in [
        GsnapStep::Pair,
        GsnapStep::Copy,
        GsnapStep::Verify,
        GsnapStep::Activate,
        GsnapStep::Settle,
        GsnapStep::Terminate,
    ] {
        assert_eq!(
            plan(&at(job.clone(), step), &cluster.catalog),
            Action::FinishStep(step)
        );
    }
    assert!(matches!(
        plan(&at(job.clone(), GsnapStep::TargetSnap), &cluster.catalog),
        Action::BeginIntent { .. }
    ));
}

#[test]
fn a_lineage_keeps_other_changes_off_its_volumes_until_forgotten_and_outlives_a_failure_it_tracks()
{
    let mut cluster = Cluster::new();
    let first = at(cluster.record(job(Some("s-mid"))), GsnapStep::Snap);
    cluster.send(&first, full_send());
    end_job(&mut cluster, &first, JobState::Succeeded);
    let refused = |cluster: &mut Cluster, command: Command| {
        cluster.next_request += 1;
        let answer = cluster.catalog.apply(&CatalogRequest {
            request_id: cluster.next_request,
            command,
        });
        match answer {
            Err(error) => error,
            Ok(reply) => panic!("accepted: {reply:?}"),
        }
    };
    // S' (the tracked volume) and P may not be snapped onto nor deleted; S may (S' is
    // snapped onto S's extents at each job's end anyway).
    for volume in ["s-mid", "p"] {
        let error = refused(
            &mut cluster,
            Command::VolumeDeleteBegin {
                name: volume.into(),
            },
        );
        assert!(
            error.to_string().contains("tandem gsnap forget p s"),
            "{error}"
        );
    }
    let error = refused(
        &mut cluster,
        Command::IntentBegin(Intent {
            id: 77,
            node: "b1".into(),
            call: IntentCall::Snap {
                source: "s".into(),
                target: "s-mid".into(),
                extents: Vec::new(),
                overwrite: true,
                create: None,
            },
            begun_unix_seconds: 1,
        }),
    );
    assert!(error.to_string().contains("lineage"), "{error}");
    assert!(cluster.catalog.refuse_lineage_change("s").is_ok());

    // A forget of a pair with no lineage is refused; of this one, it removes it.
    let error = refused(
        &mut cluster,
        Command::GsnapForget {
            source: "p".into(),
            target: "s-mid".into(),
        },
    );
    assert!(error.to_string().contains("no lineage"), "{error}");
    cluster.apply(Command::GsnapForget {
        source: "p".into(),
        target: "s".into(),
    });
    assert!(cluster.catalog.lineage("p", "s").is_none());
    cluster.apply(Command::VolumeDeleteBegin {
        name: "s-mid".into(),
    });

    // A job the lineage tracks that fails after its snap leaves the lineage as the last
    // succeeded job left it (its nodes fold their frozen tracks back in): the next job
    // sends the changes since that job, this one's included.
    let mut cluster = Cluster::new();
    let first = at(cluster.record(job(None)), GsnapStep::Snap);
    cluster.send(&first, full_send());
    end_job(&mut cluster, &first, JobState::Succeeded);
    let kept = cluster.catalog.lineage("p", "s").cloned();
    let mut second = job(None);
    second.request_id = 2;
    let second = at(cluster.record(second), GsnapStep::Copy);
    assert!(control_plane::gsnap::keeps_lineage(
        &second,
        &cluster.catalog
    ));
    end_job(&mut cluster, &second, JobState::Failed);
    assert_eq!(cluster.catalog.lineage("p", "s").cloned(), kept);
    assert_eq!(kept.map(|lineage| lineage.last_job), Some(first.id));

    // One it does not track (another intermediate) drops it: the next sends everything.
    let mut third = job(None);
    third.request_id = 3;
    third.spec.intermediate = "p-other".into();
    let third = cluster.record(third);
    let third = at(third, GsnapStep::Copy);
    assert!(!control_plane::gsnap::keeps_lineage(
        &third,
        &cluster.catalog
    ));
    end_job(&mut cluster, &third, JobState::Cancelled);
    assert!(cluster.catalog.lineage("p", "s").is_none());
}

#[test]
fn a_volume_in_two_lineages_is_kept_for_both_a_job_of_one_may_not_change_it_for_the_other() {
    let mut cluster = Cluster::new();
    // P -> S, then S -> S' (S is the first lineage's target and the second's P).
    let first = at(cluster.record(job(None)), GsnapStep::Snap);
    cluster.send(&first, full_send());
    end_job(&mut cluster, &first, JobState::Succeeded);
    let mut cascade = job(None);
    cascade.request_id = 2;
    cascade.spec.source = "s".into();
    cascade.spec.intermediate = "s-snap".into();
    cascade.spec.target = "s-mid".into();
    cascade.source_node = "b1".into();
    let second = at(cluster.record(cascade), GsnapStep::Snap);
    cluster.send(&second, full_send());
    end_job(&mut cluster, &second, JobState::Succeeded);
    assert_eq!(cluster.catalog.lineages_of_volume("s").count(), 2);

    // A new job P -> S would write S behind the second lineage's back: refused, naming it.
    let mut again = job(None);
    again.request_id = 3;
    cluster.next_request += 1;
    let answer = cluster.catalog.apply(&CatalogRequest {
        request_id: cluster.next_request,
        command: Command::GsnapCreate(again),
    });
    let error = answer.unwrap_err().to_string();
    assert!(error.contains("gsnap forget s s-mid"), "{error}");
    assert!(cluster
        .catalog
        .refuse_lineage_change_except("s", Some(("p", "s")))
        .is_err());
    assert!(cluster
        .catalog
        .refuse_lineage_change_except("s-mid", Some(("s", "s-mid")))
        .is_ok());
}

/// Session commands are intents of the saga too: recorded before their node is asked
/// (one at a time per session, and holding their volumes), and the catalog follows what
/// the node answered when the intent finishes.
#[test]
fn a_session_command_is_an_intent_whose_result_the_catalog_follows() {
    let mut cluster = Cluster::new();
    let create = SessionCommand::CloneCreate {
        source: "p".into(),
        target: "s".into(),
        precopy: true,
        extents: Vec::new(),
    };
    let intent = |id: u128, command: SessionCommand| {
        Command::IntentBegin(Intent {
            id,
            node: "a1".into(),
            call: IntentCall::Session { command },
            begun_unix_seconds: 1,
        })
    };
    cluster.apply(intent(500, create));
    // While it is open, another command of the same session and a delete wait for it.
    for command in [
        intent(501, SessionCommand::CloneActivate { target: "s".into() }),
        Command::VolumeDeleteBegin { name: "s".into() },
        Command::VolumeDeleteBegin { name: "p".into() },
    ] {
        cluster.next_request += 1;
        let answer = cluster.catalog.apply(&CatalogRequest {
            request_id: cluster.next_request,
            command,
        });
        assert!(
            answer.unwrap_err().to_string().contains("under way"),
            "an open session intent holds its volumes"
        );
    }
    let entry = SessionEntry {
        id: 3,
        node: "a1".into(),
        kind: SessionKind::Clone,
        source: "p".into(),
        target: "s".into(),
        state: SessionState::Precopying,
        slots: vec![0, 1],
        tracks_copied: 0,
        tracks_remaining: 16,
        error: None,
    };
    cluster.finish(
        500,
        IntentResult::Session {
            entry: Some(entry.clone()),
            target_readiness: None,
        },
    );
    assert_eq!(cluster.catalog.session("s"), Some(&entry));
    assert_eq!(
        cluster.catalog.volume("s").unwrap().readiness,
        Readiness::NotReady
    );
    // A command that ended the session: the catalog forgets it and takes the readiness
    // the target's node reported.
    cluster.apply(intent(
        502,
        SessionCommand::CloneCancel { target: "s".into() },
    ));
    cluster.finish(
        502,
        IntentResult::Session {
            entry: None,
            target_readiness: Some(Readiness::Ready),
        },
    );
    assert_eq!(cluster.catalog.session("s"), None);
    assert_eq!(
        cluster.catalog.volume("s").unwrap().readiness,
        Readiness::Ready
    );
    assert_eq!(cluster.catalog.intents().count(), 0);
}
