//! The gsnap planner: pure, `(job, catalog) → the next action`, no IO, no clock, no
//! randomness (as `openraft`'s engine and quinn-proto decide without doing). The leader's
//! driver carries an action out, records what came of it, and asks again; a new leader
//! asks the same question of the same catalog and gets the same answer, so a job resumes
//! wherever its last leader left it.
//!
//! Every node call of a job is made under an id derived from the job's request id and the
//! step, so a call repeated by a new leader is carried out once: the snaps are intents of
//! the saga (`member/saga.rs`), the pair's commands are session commands, which the source
//! node remembers by request id.

use crate::catalog::Catalog;
use protocol::cluster::{
    derived_request_id, IntentCall, IntentResult, NewVolume, RequestId, VolumeState,
};
use protocol::gsnap::{
    coarsen_extents, digest_hex, intersect_extents, lineage_name, map_to_target, union_extents,
    GsnapJob, GsnapStep, JobError, JobSend, JobState, SendMode, Stall, RESEND_TRACKS_MAX,
    SEND_EXTENTS_MAX, STALL_AFTER_SECONDS, VERIFY_ROUNDS_MAX,
};
use protocol::messages::{ErrorCode, Extent};
use protocol::session::{SessionCommand, SessionState};

/// What the driver does next for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Record that the step starts (the driver adds its clock's time).
    StartStep(GsnapStep),
    /// Record that the step is done.
    FinishStep(GsnapStep),
    /// Record this intent (with the driver's time), then drive it.
    BeginIntent {
        id: RequestId,
        node: String,
        call: IntentCall,
    },
    /// Call the node of this open intent again and record its answer.
    DriveIntent(RequestId),
    /// Carry out this session command on the pair's source node, under `request_id`.
    Session {
        request_id: RequestId,
        command: SessionCommand,
    },
    /// Make the volume the pair copies into (a missing S'), under `request_id`.
    CreateVolume {
        request_id: RequestId,
        name: String,
        node: String,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    /// Rotate the lineage of the volume the pair copies into (taking it from its hosts),
    /// read the tracks both lineages froze, and record what the job sends
    /// ([`send_of`]).
    PlanSend,
    /// Read the pair's progress from its source node and record it in the job.
    PollPair,
    /// Verification round `round`: digests of P''s copied tracks and of the target's,
    /// each on its own node; differing tracks are sent again (unless this is the last
    /// round allowed), and the round is recorded.
    Verify { round: u32 },
    /// Record that the job failed; it then ends what it started (a pair is cancelled or
    /// terminated) before it ends.
    Fail(JobError),
    /// End the job. A job whose snap may have rotated P's lineage first settles the
    /// lineages on both nodes (success: the frozen slots are freed) or drops them.
    Finish {
        state: JobState,
        error: Option<JobError>,
    },
    /// Nothing can move until this node is up again.
    Wait(Blocked),
    /// The job has ended: nothing to do.
    Idle,
}

/// Why a job waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    NodeDown {
        node: String,
        since_unix_seconds: Option<u64>,
    },
    /// A volume of the job is still being made.
    VolumeNotReady { volume: String },
}

/// The id of a step's node call: the same for every attempt of the job.
pub fn call_id(job: &GsnapJob, call: &str) -> RequestId {
    derived_request_id(job.request_id, &format!("gsnap {call}"))
}

/// The next action for `job` given the catalog as it is now.
pub fn plan(job: &GsnapJob, catalog: &Catalog) -> Action {
    if job.state.is_final() {
        return Action::Idle;
    }
    // A failed job, or one cancelled before its activation, first ends what it started.
    let cancelling =
        job.cancel_requested && job.step(GsnapStep::Activate).started_unix_seconds.is_none();
    if job.error.is_some() || cancelling {
        return clean_up(job, catalog);
    }
    let Some(step) = job.current_step() else {
        return Action::Finish {
            state: JobState::Succeeded,
            error: None,
        };
    };
    if job.step(step).started_unix_seconds.is_none() {
        return Action::StartStep(step);
    }
    let pair_target = job.pair_target();
    let pair = catalog
        .session(pair_target)
        .filter(|entry| entry.source == job.spec.intermediate);
    match step {
        GsnapStep::Snap => {
            let Some((source_extents, target_extents)) = job_extents(job, catalog) else {
                return Action::Fail(JobError {
                    step,
                    code: ErrorCode::NotFound,
                    detail: format!("'{}' has left the catalog", job.spec.source),
                });
            };
            let missing = catalog.volume(&job.spec.intermediate).is_none();
            // P's tracks land on P' at S's track numbers (P' has S's geometry when the
            // extents differ), so the pair, the verification and the target snap need no
            // offsets. The extents are named even when they are all of P: a P' an
            // earlier job made with another size then still takes P's tracks. P' is the
            // job's own intermediate: one that is not P's snapshot is refused by the
            // node rather than overwritten. The snap rotates P's lineage in its own
            // write, so the next job knows which tracks P's hosts wrote after it.
            let geometry_of = if source_extents == target_extents {
                &job.spec.source
            } else {
                &job.spec.target
            };
            let call = IntentCall::SnapLineage {
                source: job.spec.source.clone(),
                target: job.spec.intermediate.clone(),
                extents: source_extents,
                target_extents,
                overwrite: false,
                create: missing.then(|| geometry(catalog, geometry_of)).flatten(),
                lineage: lineage_name(&job.spec.source, &job.spec.target),
            };
            snap_step(job, catalog, step, &job.source_node, call)
        }
        GsnapStep::Pair => match (pair, catalog.volume(pair_target)) {
            (Some(_), _) => Action::FinishStep(step),
            // S' is made when missing, on S's node with S's geometry, under an id of the
            // job's (a retry or a new leader asks for the same volume once).
            (None, None) => match catalog.volume(&job.spec.target) {
                Some(target) => on_nodes(
                    catalog,
                    &[&job.target_node],
                    Action::CreateVolume {
                        request_id: call_id(job, "create target intermediate"),
                        name: pair_target.to_string(),
                        node: job.target_node.clone(),
                        size_bytes: target.size_bytes,
                        track_size_bytes: target.track_size_bytes,
                    },
                ),
                None => Action::Fail(JobError {
                    step,
                    code: ErrorCode::NotFound,
                    detail: format!("'{}' has left the catalog", job.spec.target),
                }),
            },
            // Made by someone else meanwhile, on another node: the pair would copy there.
            (None, Some(volume)) if volume.node != job.target_node => Action::Fail(JobError {
                step,
                code: ErrorCode::InvalidArgument,
                detail: format!(
                    "'{pair_target}' is on node '{}'; the job needs it on '{}'",
                    volume.node, job.target_node
                ),
            }),
            // Being made (its node was away when the job asked): the reconciler finishes it.
            (None, Some(volume)) if volume.state != VolumeState::Ready => {
                Action::Wait(Blocked::VolumeNotReady {
                    volume: pair_target.to_string(),
                })
            }
            (None, Some(_)) => match catalog.send(job.id) {
                None => on_nodes(
                    catalog,
                    &[&job.source_node, &job.target_node],
                    Action::PlanSend,
                ),
                // Nothing changed on either side since the last job: no pair.
                Some(send) if send.tracks == 0 => Action::FinishStep(step),
                Some(send) => on_nodes(
                    catalog,
                    &[&job.source_node, &job.target_node],
                    Action::Session {
                        request_id: call_id(job, "pair"),
                        command: SessionCommand::CloneCreate {
                            source: job.spec.intermediate.clone(),
                            target: pair_target.to_string(),
                            precopy: true,
                            extents: send.extents.clone(),
                        },
                    },
                ),
            },
        },
        _ if nothing_to_send(job, catalog) && step != GsnapStep::TargetSnap => {
            Action::FinishStep(step)
        }
        GsnapStep::Copy => match job.tracks_remaining {
            Some(0) => Action::FinishStep(step),
            _ => on_nodes(catalog, &[&job.source_node], Action::PollPair),
        },
        GsnapStep::Verify => verify_step(job, catalog),
        GsnapStep::Activate => match pair.map(|entry| entry.state) {
            Some(SessionState::Active | SessionState::Copied) => Action::FinishStep(step),
            _ => on_nodes(
                catalog,
                &[&job.source_node, &job.target_node],
                Action::Session {
                    request_id: call_id(job, "activate"),
                    command: SessionCommand::CloneActivate {
                        target: pair_target.to_string(),
                    },
                },
            ),
        },
        GsnapStep::Settle => match pair.map(|entry| entry.state) {
            Some(SessionState::Copied) | None => Action::FinishStep(step),
            Some(_) => on_nodes(catalog, &[&job.source_node], Action::PollPair),
        },
        GsnapStep::Terminate => match pair {
            None => Action::FinishStep(step),
            Some(_) => on_nodes(
                catalog,
                &[&job.source_node, &job.target_node],
                Action::Session {
                    request_id: call_id(job, "terminate"),
                    command: SessionCommand::CloneTerminate {
                        target: pair_target.to_string(),
                    },
                },
            ),
        },
        GsnapStep::TargetSnap => snap_step(
            job,
            catalog,
            step,
            &job.target_node,
            IntentCall::Snap {
                source: pair_target.to_string(),
                target: job.spec.target.clone(),
                extents: job_extents(job, catalog)
                    .map(|(_, target)| target)
                    .unwrap_or_default(),
                // S is the volume the command names as the destination: its extents take
                // P's image whatever they held.
                overwrite: true,
                create: None,
            },
        ),
    }
}

/// The tracks a job copies: P's (its extents, or all of P) and where they land on S (S's
/// extents, or the same track numbers). `None` when P has left the catalog.
pub fn job_extents(job: &GsnapJob, catalog: &Catalog) -> Option<(Vec<Extent>, Vec<Extent>)> {
    let source = catalog.volume(&job.spec.source)?;
    let source_extents = if job.spec.source_extents.is_empty() {
        vec![Extent {
            first: 0,
            last: (source.size_bytes / u64::from(source.track_size_bytes)).saturating_sub(1),
        }]
    } else {
        job.spec.source_extents.clone()
    };
    let target_extents = if job.spec.target_extents.is_empty() {
        source_extents.clone()
    } else {
        job.spec.target_extents.clone()
    };
    Some((source_extents, target_extents))
}

/// The target's tracks (its own numbers) the job's pair copies: what the job's send
/// names, or, before it is recorded (and for jobs recorded before sends existed), the
/// target's extents.
pub fn pair_extents(job: &GsnapJob, catalog: &Catalog) -> Option<Vec<Extent>> {
    match catalog.send(job.id) {
        Some(send) => Some(send.extents.clone()),
        None => job_extents(job, catalog).map(|(_, target)| target),
    }
}

/// Whether the job's send is recorded and holds no track (nothing changed since the
/// last job): it has no pair, copy or verification.
fn nothing_to_send(job: &GsnapJob, catalog: &Catalog) -> bool {
    catalog.send(job.id).is_some_and(|send| send.tracks == 0)
}

fn track_total(extents: &[Extent]) -> u64 {
    extents.iter().map(Extent::track_count).sum()
}

/// What a job sends, from the catalog and the tracks each node's lineage froze when
/// the job rotated it (`None`: the node kept no live slot for it). Only the changes
/// since the last job are sent when the lineage of P and S is in the catalog, the job
/// matches it, `--full` is absent, and both nodes kept their slots; otherwise every
/// track, and the report says why.
pub fn send_of(
    job: &GsnapJob,
    catalog: &Catalog,
    source_frozen: Option<&[Extent]>,
    target_frozen: Option<&[Extent]>,
) -> JobSend {
    let (source_extents, target_extents) = job_extents(job, catalog).unwrap_or_default();
    let full = |reason: String| JobSend {
        mode: SendMode::Full { reason },
        tracks: track_total(&target_extents),
        extents: target_extents.clone(),
    };
    let (source, target) = (&job.spec.source, &job.spec.target);
    if job.spec.full {
        return full("--full asks for every track".to_string());
    }
    let Some(lineage) = catalog.lineage(source, target) else {
        return full(format!(
            "no earlier job from '{source}' to '{target}' succeeded since its lineage began"
        ));
    };
    if let Some(mismatch) = lineage.mismatch(&job.spec) {
        return full(mismatch);
    }
    let Some(source_frozen) = source_frozen else {
        return full(format!(
            "node {} kept no record of the tracks written to '{source}' since job {}",
            job.source_node, lineage.last_job
        ));
    };
    let Some(target_frozen) = target_frozen else {
        return full(format!(
            "node {} kept no record of the tracks written to '{}' since job {}",
            job.target_node,
            job.pair_target(),
            lineage.last_job
        ));
    };
    let source_changed = map_to_target(source_frozen, &source_extents, &target_extents);
    let target_changed = intersect_extents(target_frozen, &target_extents);
    let extents = coarsen_extents(
        &union_extents(&source_changed, &target_changed),
        SEND_EXTENTS_MAX,
    );
    JobSend {
        mode: SendMode::Incremental {
            since_job: lineage.last_job,
            source_changed: track_total(&source_changed),
            target_changed: track_total(&target_changed),
        },
        tracks: track_total(&extents),
        extents,
    }
}

/// Whether a job's end must settle, fold or drop the lineages on its nodes: once its
/// snap began, P's lineage may have been rotated.
pub fn touches_lineage(job: &GsnapJob) -> bool {
    job.step(GsnapStep::Snap).started_unix_seconds.is_some()
}

/// Whether a job that did not succeed leaves the lineage of its P and S to go on from
/// the last job that succeeded (its nodes fold their frozen tracks back in, the next job
/// sends them again): when the catalog holds that lineage and the job is one it tracks
/// (the same intermediates, extents and nodes). Otherwise the job's end drops the
/// lineages it rotated, and the next job sends everything.
pub fn keeps_lineage(job: &GsnapJob, catalog: &Catalog) -> bool {
    catalog
        .lineage(&job.spec.source, &job.spec.target)
        .is_some_and(|lineage| {
            lineage.mismatch(&job.spec).is_none()
                && lineage.source_node == job.source_node
                && lineage.target_node == job.target_node
        })
}

/// The geometry of `volume`, for a volume made like it.
fn geometry(catalog: &Catalog, volume: &str) -> Option<NewVolume> {
    catalog.volume(volume).map(|record| NewVolume {
        size_bytes: record.size_bytes,
        track_size_bytes: record.track_size_bytes,
    })
}

/// The verification: done when the last round's digests matched; failed when its
/// tracks were not sent again (too many, or the last round allowed); otherwise the next
/// round, on both nodes.
fn verify_step(job: &GsnapJob, catalog: &Catalog) -> Action {
    let rounds = catalog.verification(job.id);
    match rounds.last() {
        Some(last) if last.matched() => Action::FinishStep(GsnapStep::Verify),
        Some(last) if !last.resent || rounds.len() >= VERIFY_ROUNDS_MAX => {
            let listed: Vec<String> = last
                .differing
                .iter()
                .take(DIFFERING_TRACKS_SHOWN_MAX)
                .map(u64::to_string)
                .collect();
            let more = if last.differing_count > listed.len() as u64 {
                ", ..."
            } else {
                ""
            };
            let why = if last.differing_count > RESEND_TRACKS_MAX {
                format!("more than {RESEND_TRACKS_MAX}, too many to send again")
            } else {
                format!("after {} rounds", rounds.len())
            };
            Action::Fail(JobError {
                step: GsnapStep::Verify,
                code: ErrorCode::DigestMismatch,
                detail: format!(
                        "{} tracks of '{}' differ from '{}' ({why}): tracks {}{more}; digests {} (source) and {} (target)",
                        last.differing_count,
                        job.pair_target(),
                        job.spec.intermediate,
                        listed.join(", "),
                    digest_hex(&last.source),
                    digest_hex(&last.target),
                ),
            })
        }
        _ => on_nodes(
            catalog,
            &[&job.source_node, &job.target_node],
            Action::Verify {
                round: rounds.len() as u32 + 1,
            },
        ),
    }
}

/// Differing tracks a failed job's error names at most.
const DIFFERING_TRACKS_SHOWN_MAX: usize = 16;

/// A step made of one snap intent: begun, driven until its node answered, then done —
/// or the job fails with the node's refusal.
fn snap_step(
    job: &GsnapJob,
    catalog: &Catalog,
    step: GsnapStep,
    node: &str,
    call: IntentCall,
) -> Action {
    let id = call_id(job, step.name());
    match catalog.intent_result(id) {
        Some(IntentResult::Snapped { .. }) => Action::FinishStep(step),
        Some(IntentResult::Refused { code, message }) => Action::Fail(JobError {
            step,
            code: *code,
            detail: message.clone(),
        }),
        Some(other) => Action::Fail(JobError {
            step,
            code: ErrorCode::Internal,
            detail: format!("the step's snap finished with {other:?}"),
        }),
        None if catalog.intent(id).is_some() => on_nodes(catalog, &[node], Action::DriveIntent(id)),
        None => on_nodes(
            catalog,
            &[node],
            Action::BeginIntent {
                id,
                node: node.to_string(),
                call,
            },
        ),
    }
}

/// A failed or cancelled job ends what it started before it ends: an open snap intent is
/// finished (its node may already have acted), a pair not activated is cancelled, one
/// activated copies to the end and is terminated. Volumes the job made stay, and the
/// report names them.
fn clean_up(job: &GsnapJob, catalog: &Catalog) -> Action {
    for step in [GsnapStep::Snap, GsnapStep::TargetSnap] {
        let id = call_id(job, step.name());
        if let Some(intent) = catalog.intent(id) {
            return on_nodes(catalog, &[&intent.node], Action::DriveIntent(id));
        }
    }
    let pair_target = job.pair_target();
    let pair = catalog
        .session(pair_target)
        .filter(|entry| entry.source == job.spec.intermediate);
    let nodes = [job.source_node.as_str(), job.target_node.as_str()];
    match pair.map(|entry| entry.state) {
        None => Action::Finish {
            state: if job.error.is_some() {
                JobState::Failed
            } else {
                JobState::Cancelled
            },
            error: job.error.clone(),
        },
        Some(SessionState::Copied) => on_nodes(
            catalog,
            &nodes,
            Action::Session {
                request_id: call_id(job, "terminate"),
                command: SessionCommand::CloneTerminate {
                    target: pair_target.to_string(),
                },
            },
        ),
        Some(SessionState::Active) => on_nodes(catalog, &nodes[..1], Action::PollPair),
        Some(_) => on_nodes(
            catalog,
            &nodes,
            Action::Session {
                request_id: call_id(job, "cancel"),
                command: SessionCommand::CloneCancel {
                    target: pair_target.to_string(),
                },
            },
        ),
    }
}

/// `action`, or a wait for the first of `nodes` the catalog has down.
fn on_nodes(catalog: &Catalog, nodes: &[&str], action: Action) -> Action {
    for node in nodes {
        if !catalog.node_is_up(node) {
            return Action::Wait(Blocked::NodeDown {
                node: node.to_string(),
                since_unix_seconds: catalog
                    .node(node)
                    .and_then(|record| record.down_since_unix_seconds),
            });
        }
    }
    action
}

/// What counts as a job's progress: a step started or done, a track copied, a
/// verification round, an error or a cancel recorded. The leader compares marks to tell
/// a job that moves from one that is stalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressMark {
    steps: Vec<(bool, bool)>,
    tracks_total: u64,
    tracks_remaining: Option<u64>,
    verification_rounds: usize,
    failed: bool,
    cancel_requested: bool,
}

pub fn progress_mark(job: &GsnapJob, catalog: &Catalog) -> ProgressMark {
    ProgressMark {
        steps: job
            .steps
            .iter()
            .map(|record| (record.started_unix_seconds.is_some(), record.done()))
            .collect(),
        tracks_total: job.tracks_total,
        tracks_remaining: job.tracks_remaining,
        verification_rounds: catalog.verification(job.id).len(),
        failed: job.error.is_some(),
        cancel_requested: job.cancel_requested,
    }
}

/// Whether a job that last moved at `moved_unix_seconds` is stalled at `now`: it is
/// once [`STALL_AFTER_SECONDS`] have passed, with the reason it waits (or a general one
/// when the driver has not said).
pub fn stall_of(
    moved_unix_seconds: u64,
    reason: Option<&str>,
    now_unix_seconds: u64,
) -> Option<Stall> {
    (now_unix_seconds.saturating_sub(moved_unix_seconds) >= STALL_AFTER_SECONDS).then(|| Stall {
        reason: reason
            .unwrap_or("no step has moved; the leader drives it every supervision round")
            .to_string(),
        since_unix_seconds: moved_unix_seconds,
    })
}

/// Why a job cannot be cancelled now, if it cannot: once its activation began, S holds
/// (or is about to hold) P''s image, and the job finishes instead.
pub fn refuse_cancel(job: &GsnapJob) -> Option<String> {
    if job.state.is_final() {
        return Some(format!(
            "job {} has already ended ({:?})",
            job.id, job.state
        ));
    }
    job.step(GsnapStep::Activate).started_unix_seconds.map(|_| {
        format!(
            "job {} is past its activation: '{}' already holds the image, and the job finishes",
            job.id,
            job.pair_target()
        )
    })
}
