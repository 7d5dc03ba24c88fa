//! Gsnap jobs on the leader: the commands (start, list, show, cancel) and the driver, a
//! thin shell around the pure planner (`crate::gsnap::plan`): it asks the planner for
//! the next action of each running job, carries it out, records what came of it in the
//! job's catalog record, and asks again. Every supervision round drives every running
//! job whose next action can move, one task per job, so a new leader resumes each job
//! where the catalog says it is.

use super::sessions::NodeSession;
use super::*;
use crate::gsnap::{plan, progress_mark, stall_of, Action, Blocked, ProgressMark};
use protocol::cluster::Intent;
use protocol::gsnap::{
    differing_positions, digest_group_tracks, extents_of_tracks, lineage_name, tracks_at, GsnapJob,
    GsnapJobView, GsnapSpec, GsnapStep, JobError, JobId, JobState, LineageStep, TrackDigests,
    VerifyRound, RESEND_TRACKS_MAX, VERIFY_ROUNDS_MAX,
};
use protocol::messages::Extent;

/// Actions one drive of a job carries out at most before it lets the next round go on:
/// a job never holds its task for long.
const JOB_ACTIONS_PER_ROUND_MAX: usize = 64;

/// How long `tandem gsnap` waits for each of its nodes to answer before it records a job.
const REACHABLE_TIMEOUT_SECONDS: u64 = 3;

/// How often a drive reads a copying pair again while it waits for it to move.
const PAIR_POLL_INTERVAL_MILLISECONDS: u64 = 50;

/// How long a digest or re-send call may take: a base, plus the time to read its bytes at a rate
/// any disk manages (each node reads its own copy at low priority, after host IO).
const DIGEST_TIMEOUT_BASE_SECONDS: u64 = 10;
const DIGEST_BYTES_PER_SECOND_MIN: u64 = 20 << 20;
/// How long a re-send may take: a base, plus its bytes at a rate any link manages.
const RESEND_BYTES_PER_SECOND_MIN: u64 = 5 << 20;

/// What the leader saw of one job's progress: when it last moved, and why it waits now.
/// Kept in memory only: a new leader starts watching afresh, so it never shows a job
/// stalled that it has not watched for the whole threshold.
pub(super) struct JobWatch {
    mark: ProgressMark,
    moved_unix_seconds: u64,
    reason: Option<String>,
    /// The pair's last reported rate and time left, for `--wait`.
    rate_bytes_per_second: u64,
    eta_seconds: Option<u64>,
    /// A long call of the job may answer until then: it is working, not stalled.
    busy_until_unix_seconds: u64,
    /// When this member last drove the job.
    seen_unix_seconds: u64,
}

/// A watch not updated for this long was kept in another term of this member's
/// leadership, or its drives stopped: it starts afresh.
const WATCH_LAPSED_AFTER_SECONDS: u64 = 60;

/// What came of one action: the job goes on at once, or waits (with why).
enum Next {
    Continue,
    Wait(String),
}

/// Takes a job out of the driving set when its drive ends, however it ends.
struct DrivingJob<'a> {
    set: &'a Mutex<HashSet<JobId>>,
    job: JobId,
}

impl Drop for DrivingJob<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.job);
    }
}

impl ControlPlane {
    /// Records a new job; the supervisor drives it from the next round. A retry of the
    /// same request gets the same job.
    pub(super) async fn gsnap_start(
        &self,
        request_id: RequestId,
        spec: GsnapSpec,
    ) -> Outcome<ClusterResponse> {
        let (source_node, target_node) = self.catalog.read(|catalog| {
            let node_of = |volume: &str| {
                catalog
                    .volume(volume)
                    .map(|record| record.node.clone())
                    .unwrap_or_default()
            };
            (node_of(&spec.source), node_of(&spec.target))
        });
        if source_node.is_empty() {
            return Err(CatalogError::UnknownVolume {
                volume: spec.source.clone(),
            }
            .into());
        }
        if target_node.is_empty() {
            return Err(CatalogError::UnknownVolume {
                volume: spec.target.clone(),
            }
            .into());
        }
        // Both nodes must answer before anything is recorded: a job towards a node cut
        // off from this one would only stall. A retry of a recorded job gets it back
        // whatever the nodes do now.
        let recorded = self
            .catalog
            .read(|catalog| catalog.applied_response(request_id).is_some());
        if !recorded {
            for node in [&source_node, &target_node] {
                self.check_answers(node).await?;
            }
        }
        let job = GsnapJob::new(
            0,
            request_id,
            spec,
            source_node,
            target_node,
            now_unix_seconds(),
        );
        match self.commit(request_id, Command::GsnapCreate(job)).await? {
            CatalogReply::Job(job) => {
                tracing::info!(job = job.id, source = %job.spec.source, target = %job.spec.target, "gsnap job recorded");
                self.snap_before_answering(job.id).await;
                // The job goes on at once, not at the supervisor's next round.
                self.jobs_wakeup.notify_one();
                let job = self
                    .catalog
                    .read(|catalog| catalog.job(job.id).cloned().map(Box::new))
                    .unwrap_or(job);
                Ok(ClusterResponse::Job(job))
            }
            other => Err(unexpected_reply(&other)),
        }
    }

    pub(super) async fn gsnap_list(&self) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        let jobs: Vec<GsnapJob> = self
            .catalog
            .read(|catalog| catalog.jobs().cloned().collect());
        Ok(ClusterResponse::JobViews(
            jobs.into_iter().map(|job| self.job_view(job)).collect(),
        ))
    }

    pub(super) async fn gsnap_show(&self, job: JobId) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        self.catalog
            .read(|catalog| catalog.job(job).cloned())
            .map(|job| ClusterResponse::JobView(Box::new(self.job_view(job))))
            .ok_or_else(|| CatalogError::UnknownJob { job }.into())
    }

    /// A job with its verification rounds and, when it has not moved for the stall
    /// threshold, why.
    fn job_view(&self, job: GsnapJob) -> GsnapJobView {
        let verification = self
            .catalog
            .read(|catalog| catalog.verification(job.id).to_vec());
        let (stalled, rate_bytes_per_second, eta_seconds) = match self
            .job_watch
            .lock()
            .get(&job.id)
            .filter(|_| !job.state.is_final())
        {
            Some(watch) => (
                stall_of(
                    watch.moved_unix_seconds,
                    watch.reason.as_deref(),
                    now_unix_seconds(),
                )
                .filter(|_| now_unix_seconds() >= watch.busy_until_unix_seconds),
                watch.rate_bytes_per_second,
                watch.eta_seconds,
            ),
            None => (None, 0, None),
        };
        let send = self.catalog.read(|catalog| catalog.send(job.id).cloned());
        GsnapJobView {
            job,
            verification,
            stalled,
            rate_bytes_per_second,
            eta_seconds,
            send,
        }
    }

    /// Asks a running job to stop: before its activation it ends what it started and
    /// ends `cancelled`; after it, it is refused (the target already takes the image).
    pub(super) async fn gsnap_cancel(
        &self,
        request_id: RequestId,
        job: JobId,
    ) -> Outcome<ClusterResponse> {
        match self
            .commit(request_id, Command::GsnapCancel { job })
            .await?
        {
            CatalogReply::Job(job) => Ok(ClusterResponse::Job(job)),
            other => Err(unexpected_reply(&other)),
        }
    }

    /// Drops the lineage of `source` and `target`: both nodes free its slots, then the
    /// catalog forgets it, so the next job of the two sends every track. Refused while a
    /// job of theirs runs. A node that does not answer leaves the lineage in the catalog
    /// (a retry finishes it); a lineage one node dropped already is never used for an
    /// incremental job, since that node then reports no changes kept.
    pub(super) async fn gsnap_forget(
        &self,
        request_id: RequestId,
        source: String,
        target: String,
    ) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        if self
            .catalog
            .read(|catalog| catalog.applied_response(request_id).is_some())
        {
            self.commit(request_id, Command::GsnapForget { source, target })
                .await?;
            return Ok(ClusterResponse::Done);
        }
        let lineage = self.catalog.read(|catalog| {
            if let Some(job) = catalog
                .job_of_volume(&source)
                .filter(|job| job.spec.target == target)
            {
                return Err(CatalogError::VolumeInJob {
                    volume: source.clone(),
                    job: job.id,
                });
            }
            catalog
                .lineage(&source, &target)
                .cloned()
                .ok_or_else(|| CatalogError::UnknownLineage {
                    source_volume: source.clone(),
                    target: target.clone(),
                })
        })?;
        let name = lineage_name(&source, &target);
        for (node, volume) in [
            (&lineage.source_node, lineage.source.clone()),
            (&lineage.target_node, lineage.tracked().to_string()),
        ] {
            let id = derived_request_id(request_id, &format!("forget {volume}"));
            self.lineage_step(node, id, &volume, &name, LineageStep::Drop)
                .await?;
        }
        self.commit(request_id, Command::GsnapForget { source, target })
            .await?;
        Ok(ClusterResponse::Done)
    }

    /// Starts driving every running job not being driven, each in a task of its own.
    pub(super) fn drive_jobs(self: &Arc<Self>) {
        let running: Vec<JobId> = self.catalog.read(|catalog| {
            catalog
                .jobs()
                .filter(|job| !job.state.is_final())
                .map(|job| job.id)
                .collect()
        });
        for job in running {
            if !self.driving_jobs.lock().insert(job) {
                continue;
            }
            let control_plane = Arc::clone(self);
            tokio::spawn(async move {
                let _done = DrivingJob {
                    set: &control_plane.driving_jobs,
                    job,
                };
                if let Err(refusal) = control_plane.drive_job(job).await {
                    tracing::debug!(job, reason = %refusal.message, "a gsnap job goes on at the next round");
                }
            });
        }
    }

    /// Drives a new job up to its snap before `tandem gsnap` answers, so that S gets P's
    /// image of the command's instant rather than of a later supervision round. A job the
    /// supervisor drives already is waited for; a snap that cannot be taken now (P's node
    /// away) is left to the supervisor, and the command answers with the job as it is.
    async fn snap_before_answering(&self, id: JobId) {
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_secs(crate::caller::CALL_TIMEOUT_SECONDS);
        let snapped = |job: &GsnapJob| job.state.is_final() || job.step(GsnapStep::Snap).done();
        while std::time::Instant::now() < deadline {
            if self
                .catalog
                .read(|catalog| catalog.job(id).is_none_or(snapped))
            {
                return;
            }
            if self.driving_jobs.lock().insert(id) {
                let _done = DrivingJob {
                    set: &self.driving_jobs,
                    job: id,
                };
                if let Err(refusal) = self.drive_job_while(id, |job| !snapped(job)).await {
                    tracing::debug!(job = id, reason = %refusal.message, "a gsnap job's snap is left to the supervisor");
                }
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Carries out a job's next actions until it must wait.
    async fn drive_job(&self, id: JobId) -> Outcome<()> {
        self.drive_job_while(id, |_| true).await
    }

    /// Carries out a job's next actions while `going_on` holds for it and until it must
    /// wait, and notes in its watch whether it moved, or why it waits.
    async fn drive_job_while(
        &self,
        id: JobId,
        going_on: impl Fn(&GsnapJob) -> bool,
    ) -> Outcome<()> {
        for _ in 0..JOB_ACTIONS_PER_ROUND_MAX {
            let Some((job, action, mark)) = self.catalog.read(|catalog| {
                catalog
                    .job(id)
                    .map(|job| (job.clone(), plan(job, catalog), progress_mark(job, catalog)))
            }) else {
                return Ok(());
            };
            if !going_on(&job) {
                return Ok(());
            }
            self.watch_job(id, mark, None);
            if job.state.is_final() {
                self.job_watch.lock().remove(&id);
                return Ok(());
            }
            let next = match self.carry_out_job_action(job, action).await {
                Ok(next) => next,
                Err(refusal) => {
                    self.watch_job_reason(id, refusal.message.clone());
                    return Err(refusal);
                }
            };
            if let Next::Wait(reason) = next {
                self.watch_job_reason(id, reason);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Notes the job's progress as it is now: a change from what was seen before is
    /// progress, which clears the reason it waited for.
    fn watch_job(&self, id: JobId, mark: ProgressMark, reason: Option<String>) {
        let now = now_unix_seconds();
        let mut watches = self.job_watch.lock();
        let watch = watches.entry(id).or_insert_with(|| JobWatch {
            mark: mark.clone(),
            moved_unix_seconds: now,
            reason: None,
            rate_bytes_per_second: 0,
            eta_seconds: None,
            busy_until_unix_seconds: 0,
            seen_unix_seconds: now,
        });
        // A watch this member stopped keeping (it led, then did not, then leads again) is
        // started afresh rather than judged by what it saw in another term.
        let lapsed = now.saturating_sub(watch.seen_unix_seconds) > WATCH_LAPSED_AFTER_SECONDS;
        if watch.mark != mark || lapsed {
            watch.mark = mark;
            watch.moved_unix_seconds = now;
            watch.reason = None;
        }
        watch.seen_unix_seconds = now;
        if reason.is_some() {
            watch.reason = reason;
        }
    }

    /// Notes that the job is working until `until_unix_seconds` (a long call under way):
    /// it is not shown stalled before then.
    fn watch_job_busy(&self, id: JobId, until_unix_seconds: u64) {
        if let Some(watch) = self.job_watch.lock().get_mut(&id) {
            watch.busy_until_unix_seconds = until_unix_seconds;
        }
    }

    fn watch_job_reason(&self, id: JobId, reason: String) {
        if let Some(watch) = self.job_watch.lock().get_mut(&id) {
            watch.reason = Some(reason);
        }
    }

    /// Carries out one action; says whether the job can go on at once.
    async fn carry_out_job_action(&self, mut job: GsnapJob, action: Action) -> Outcome<Next> {
        let now = now_unix_seconds();
        match action {
            Action::Idle => return Ok(Next::Wait("the job has ended".into())),
            Action::Wait(Blocked::NodeDown {
                node,
                since_unix_seconds,
            }) => {
                tracing::debug!(job = job.id, %node, "gsnap job waits for its node");
                let since = since_unix_seconds
                    .map(|since| format!(" since {}", crate::advice::format_utc(since)))
                    .unwrap_or_default();
                return Ok(Next::Wait(format!("node {node} unreachable{since}")));
            }
            Action::Wait(Blocked::VolumeNotReady { volume }) => {
                return Ok(Next::Wait(format!("'{volume}' is being made on its node")));
            }
            Action::Verify { round } => return self.verify_round(job, round).await,
            Action::CreateVolume {
                request_id,
                name,
                node,
                size_bytes,
                track_size_bytes,
            } => {
                match self
                    .volume_create(request_id, &name, &node, size_bytes, track_size_bytes)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(job = job.id, volume = %name, %node, "gsnap made its target intermediate");
                        return Ok(Next::Continue);
                    }
                    Err(refusal) if refusal.code == ErrorCode::Unavailable => {
                        return Ok(Next::Wait(refusal.message))
                    }
                    Err(refusal) => {
                        job.error = Some(JobError {
                            step: GsnapStep::Pair,
                            code: refusal.code,
                            detail: refusal.message,
                        });
                    }
                }
            }
            Action::StartStep(step) => {
                job.step_mut(step).started_unix_seconds = Some(now);
                tracing::info!(job = job.id, %step, "gsnap step started");
            }
            Action::FinishStep(step) => {
                job.step_mut(step).finished_unix_seconds = Some(now);
                tracing::info!(job = job.id, %step, "gsnap step done");
            }
            Action::BeginIntent { id, node, call } => {
                self.begin_intent(Intent {
                    id,
                    node,
                    call,
                    begun_unix_seconds: now,
                })
                .await?;
                return Ok(self.drive_job_intent(id).await);
            }
            Action::DriveIntent(id) => return Ok(self.drive_job_intent(id).await),
            Action::Session {
                request_id,
                command,
            } => {
                let step = job.current_step();
                let pair_created = matches!(command, SessionCommand::CloneCreate { .. });
                let terminates = matches!(command, SessionCommand::CloneTerminate { .. });
                match self.session_command(request_id, command).await {
                    Ok(_) if pair_created && job.spec.rate_mebibytes_per_second.is_some() => {
                        // The job's rate limit is the pair's, set under an id of its own.
                        let rate = SessionCommand::SetRate {
                            target: job.pair_target().to_string(),
                            mebibytes_per_second: job.spec.rate_mebibytes_per_second,
                        };
                        self.session_command(crate::gsnap::call_id(&job, "rate"), rate)
                            .await?;
                        return Ok(Next::Continue);
                    }
                    Ok(_) => return Ok(Next::Continue),
                    Err(refusal) if refusal.code == ErrorCode::Unavailable => {
                        return Ok(Next::Wait(refusal.message))
                    }
                    // The step wants the pair gone, and it is: another drive of the pair's
                    // terminate (a supervisor finishing an earlier leader's intent) ended it
                    // between this drive's reading of the catalog and its command (CI's
                    // compose chaos, seed 18157799571555186707, round 10). The planner reads
                    // the catalog again and finishes the step.
                    Err(refusal)
                        if terminates
                            && refusal.code == ErrorCode::NotFound
                            && self
                                .catalog
                                .read(|catalog| catalog.session(job.pair_target()).is_none()) =>
                    {
                        return Ok(Next::Continue)
                    }
                    Err(refusal) => {
                        tracing::warn!(job = job.id, reason = %refusal.message, "gsnap step refused");
                        job.error = Some(JobError {
                            step: step.unwrap_or(protocol::gsnap::GsnapStep::Terminate),
                            code: refusal.code,
                            detail: refusal.message,
                        });
                    }
                }
            }
            Action::PollPair => {
                // A pair that is copying is read again shortly within this drive, so a
                // job does not wait a whole supervision round at each of its steps.
                let deadline = std::time::Instant::now()
                    + std::time::Duration::from_millis(SUPERVISE_INTERVAL_MILLISECONDS);
                loop {
                    // The pair's lock is taken before the catalog and the node are read, so
                    // the record the catalog follows below is not older than one a command
                    // or the supervisor recorded meanwhile. A command under way on the pair
                    // records its own outcome: then the pair is only read.
                    let lock = self.session_lock(job.pair_target());
                    let one_at_a_time = lock.try_lock().ok();
                    let entry = self
                        .catalog
                        .read(|catalog| catalog.session(job.pair_target()).cloned());
                    let Some(entry) = entry else {
                        return Ok(Next::Wait(format!(
                            "the pair into '{}' is not in the catalog",
                            job.pair_target()
                        )));
                    };
                    let info = match self.node_session(&entry).await {
                        NodeSession::Live(info) => info,
                        _ => {
                            return Ok(Next::Wait(format!(
                                "node {} does not show the pair into '{}'",
                                job.source_node,
                                job.pair_target()
                            )))
                        }
                    };
                    if let Some(watch) = self.job_watch.lock().get_mut(&job.id) {
                        watch.rate_bytes_per_second = info.rate_bytes_per_second;
                        watch.eta_seconds = info.eta_seconds;
                    }
                    // The catalog follows the node's state of the pair (copied, say) now
                    // rather than at the supervisor's next reading.
                    let state_changed = match &one_at_a_time {
                        Some(_) => self.follow_live_session(&entry, &info).await,
                        None => false,
                    };
                    drop(one_at_a_time);
                    // The pair's numbers only grow: a re-read never shows less copied.
                    let remaining = job.tracks_remaining.map_or(info.tracks_remaining, |known| {
                        known.min(info.tracks_remaining)
                    });
                    let moved = job.tracks_total != info.tracks_total
                        || job.tracks_remaining != Some(remaining);
                    if moved {
                        job.tracks_total = job.tracks_total.max(info.tracks_total);
                        job.tracks_remaining = Some(remaining);
                        break;
                    }
                    if state_changed {
                        return Ok(Next::Continue);
                    }
                    let copying = info.error.is_none() && info.state != SessionState::Suspended;
                    if !copying || std::time::Instant::now() >= deadline {
                        return Ok(Next::Wait(pair_wait_reason(&info)));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(
                        PAIR_POLL_INTERVAL_MILLISECONDS,
                    ))
                    .await;
                }
            }
            Action::PlanSend => return self.plan_send(job).await,
            Action::Fail(error) => {
                tracing::warn!(job = job.id, step = %error.step, code = %error.code, detail = %error.detail, "gsnap job failed; it ends what it started");
                job.error = Some(error);
            }
            Action::Finish { state, error } => {
                if crate::gsnap::touches_lineage(&job) {
                    if let Err(refusal) = self.end_lineages(&job, state).await {
                        return Ok(Next::Wait(refusal.message));
                    }
                }
                job.state = state;
                job.error = error;
                job.finished_unix_seconds = Some(now);
                tracing::info!(job = job.id, state = ?job.state, "gsnap job ended");
            }
        }
        self.commit(random_request_id(), Command::GsnapRecord(job))
            .await?;
        Ok(Next::Continue)
    }

    /// Before the pair: the volume the pair copies into rotates its lineage (and leaves
    /// its hosts until the job gives it back), both nodes say which tracks their
    /// lineages froze, and the job's send is recorded. Every call is a retry-safe: the
    /// rotation is carried out once under the job's id, and the reads change nothing.
    async fn plan_send(&self, mut job: GsnapJob) -> Outcome<Next> {
        let lineage = lineage_name(&job.spec.source, &job.spec.target);
        let tracked = job.pair_target().to_string();
        let rotate = Request::Lineage {
            request_id: crate::gsnap::call_id(&job, "lineage rotate"),
            volume: tracked.clone(),
            lineage: lineage.clone(),
            step: LineageStep::Rotate,
        };
        let mut failure = None;
        match self.call_job_node(&job.target_node, rotate).await {
            Ok(Response::Lineage(_)) => {
                // Tests end the process here to play a leader that dies after the
                // target rotated and before the send was recorded.
                crate::fail_points::exit_point(
                    "control-plane::gsnap::after-lineage-rotate",
                    "lineage",
                );
            }
            Ok(other) => failure = Some(node_refusal(other)),
            Err(refusal) => return Ok(Next::Wait(refusal.message)),
        }
        let mut frozen = Vec::new();
        if failure.is_none() {
            for (node, volume) in [
                (&job.source_node, &job.spec.source),
                (&job.target_node, &tracked),
            ] {
                let read = Request::LineageTracks {
                    volume: volume.clone(),
                    lineage: lineage.clone(),
                };
                match self.call_job_node(node, read).await {
                    Ok(Response::LineageTracks(tracks)) => frozen.push(tracks.frozen),
                    Ok(other) => {
                        failure = Some(node_refusal(other));
                        break;
                    }
                    Err(refusal) => return Ok(Next::Wait(refusal.message)),
                }
            }
        }
        if let Some((code, detail)) = failure {
            tracing::warn!(job = job.id, %detail, "gsnap lineage refused");
            job.error = Some(JobError {
                step: GsnapStep::Pair,
                code,
                detail,
            });
            self.commit(random_request_id(), Command::GsnapRecord(job))
                .await?;
            return Ok(Next::Continue);
        }
        let send = self.catalog.read(|catalog| {
            crate::gsnap::send_of(&job, catalog, frozen[0].as_deref(), frozen[1].as_deref())
        });
        tracing::info!(job = job.id, mode = ?send.mode, tracks = send.tracks, "gsnap job's send planned");
        self.commit(
            random_request_id(),
            Command::GsnapSend { job: job.id, send },
        )
        .await?;
        Ok(Next::Continue)
    }

    /// A job that rotated P's lineage ends it on both nodes before its end is recorded:
    /// success frees the frozen slots (and gives the target back to its hosts when no
    /// pair did). A failure or cancel folds the frozen tracks back into the live slots
    /// when the catalog's lineage goes on (`keeps_lineage`: the next job sends them
    /// again, with whatever this one wrote in part), and drops both lineages otherwise,
    /// so the next job sends everything; either way a target no pair can have written (no
    /// send with tracks recorded) goes back to its hosts. A success waits for both
    /// nodes. A failure or cancel does not: a node that was away still holds both slots,
    /// and its next rotation merges them, which loses no track either.
    async fn end_lineages(&self, job: &GsnapJob, state: JobState) -> Outcome<()> {
        let lineage = lineage_name(&job.spec.source, &job.spec.target);
        let succeeded = state == JobState::Succeeded;
        let (unwritten, keeps) = self.catalog.read(|catalog| {
            (
                catalog.send(job.id).is_none_or(|send| send.tracks == 0),
                crate::gsnap::keeps_lineage(job, catalog),
            )
        });
        let (source_step, target_step) = match (succeeded, keeps, unwritten) {
            (true, _, _) => (LineageStep::Settle, LineageStep::Settle),
            (false, true, true) => (LineageStep::Fold, LineageStep::FoldRelease),
            (false, true, false) => (LineageStep::Fold, LineageStep::Fold),
            (false, false, true) => (LineageStep::Drop, LineageStep::Release),
            (false, false, false) => (LineageStep::Drop, LineageStep::Drop),
        };
        for (node, volume, step) in [
            (&job.source_node, job.spec.source.clone(), source_step),
            (&job.target_node, job.pair_target().to_string(), target_step),
        ] {
            if !succeeded && !self.catalog.read(|catalog| catalog.node_is_up(node)) {
                continue;
            }
            let id = crate::gsnap::call_id(job, &format!("lineage {} {volume}", step.name()));
            match self.lineage_step(node, id, &volume, &lineage, step).await {
                Ok(()) => {}
                Err(refusal) if succeeded => return Err(refusal),
                Err(refusal) => {
                    tracing::warn!(job = job.id, %node, reason = %refusal.message, "a failed job's lineage was not ended on its node; its next rotation takes it in");
                }
            }
        }
        Ok(())
    }

    /// A lineage step on `volume` of `node` under `request_id`. A volume gone since
    /// (deleted with its slots) has no lineage left to end: that is done too.
    async fn lineage_step(
        &self,
        node: &str,
        request_id: RequestId,
        volume: &str,
        lineage: &str,
        step: LineageStep,
    ) -> Outcome<()> {
        let request = Request::Lineage {
            request_id,
            volume: volume.to_string(),
            lineage: lineage.to_string(),
            step,
        };
        match self.call_job_node(node, request).await? {
            Response::Lineage(_)
            | Response::Error {
                code: ErrorCode::NotFound,
                ..
            } => Ok(()),
            other => {
                let (code, message) = node_refusal(other);
                Err(Refusal::new(code, message))
            }
        }
    }

    /// Calls a node of a job with the usual timeout; an unreachable node is a refusal
    /// with code `unavailable`.
    async fn call_job_node(&self, node: &str, request: Request) -> Outcome<Response> {
        let address = self.node_address(node).unwrap_or_default();
        self.call(node, &address, request)
            .await
            .map_err(|error| Refusal::new(ErrorCode::Unavailable, error))
    }

    /// Drives a job's intent; the job goes on at once when its node answered.
    async fn drive_job_intent(&self, id: RequestId) -> Next {
        match self.drive_intent(id).await {
            Ok(_) => Next::Continue,
            Err(refusal) => {
                tracing::debug!(intent = %format!("{id:032x}"), reason = %refusal.message, "a gsnap snap waits");
                Next::Wait(refusal.message)
            }
        }
    }

    /// One verification round: both nodes digest their own stored bytes of the copied
    /// tracks at once; when the digests differ, the differing groups are narrowed to
    /// tracks, those are sent again (not after the last round allowed, nor when there
    /// are too many), and the round is recorded. A node that does not answer makes the
    /// job wait; one that refuses fails it.
    async fn verify_round(&self, job: GsnapJob, round: u32) -> Outcome<Next> {
        // P' holds P's tracks at S's track numbers: both sides digest S's.
        let Some(extents) = self
            .catalog
            .read(|catalog| crate::gsnap::pair_extents(&job, catalog))
        else {
            return Ok(Next::Wait(format!(
                "'{}' is not in the catalog",
                job.spec.source
            )));
        };
        let (source_extents, target_extents) = (extents.clone(), extents);
        let tracks: u64 = source_extents.iter().map(Extent::track_count).sum();
        let group_tracks = digest_group_tracks(tracks);
        // A round reads every copied track on both nodes: while its calls may still
        // answer in time, the job is working, not stalled.
        let timeout = self.call_timeout(&job.spec.source, tracks, DIGEST_BYTES_PER_SECOND_MIN);
        self.watch_job_busy(job.id, now_unix_seconds() + 2 * timeout.as_secs());
        let (source, target) = match self
            .digest_both(&job, &source_extents, &target_extents, group_tracks)
            .await
        {
            Ok(digests) => digests,
            Err(refusal) => return self.verify_failed(job, refusal).await,
        };
        let mut record = VerifyRound {
            round,
            at_unix_seconds: now_unix_seconds(),
            tracks: source.tracks,
            bytes: source.bytes,
            source: source.whole,
            target: target.whole,
            differing: Vec::new(),
            differing_count: 0,
            resent: false,
        };
        if source.whole != target.whole || source.tracks != target.tracks {
            let positions = differing_positions(&source, &target);
            // One digest a track over the differing groups only, in batches an answer
            // holds, until more tracks differ than a round may send again.
            let mut differing: Vec<u64> = Vec::new();
            for batch in positions.chunks(protocol::gsnap::DIGEST_GROUPS_MAX as usize) {
                if differing.len() as u64 > RESEND_TRACKS_MAX {
                    break;
                }
                let source_tracks = extents_of_tracks(&tracks_at(&source_extents, batch));
                let target_tracks = extents_of_tracks(&tracks_at(&target_extents, batch));
                let (source_narrow, target_narrow) = match self
                    .digest_both(&job, &source_tracks, &target_tracks, 1)
                    .await
                {
                    Ok(digests) => digests,
                    Err(refusal) => return self.verify_failed(job, refusal).await,
                };
                differing.extend(
                    differing_positions(&source_narrow, &target_narrow)
                        .into_iter()
                        .map(|index| batch[index as usize]),
                );
            }
            record.differing_count = differing.len() as u64;
            let too_many = differing.len() as u64 > RESEND_TRACKS_MAX;
            if !too_many {
                record.differing = tracks_at(&target_extents, &differing);
            }
            let resend = tracks_at(&source_extents, &differing);
            if !too_many && !resend.is_empty() && (round as usize) < VERIFY_ROUNDS_MAX {
                if let Err(refusal) = self.resend(&job, &resend).await {
                    return self.verify_failed(job, refusal).await;
                }
                record.resent = true;
            }
            // Groups differed but no single track did when read again (bytes changed in
            // between): inconclusive, so the next round decides, within the rounds
            // allowed.
            if differing.is_empty() && (round as usize) < VERIFY_ROUNDS_MAX {
                record.resent = true;
            }
            tracing::warn!(
                job = job.id,
                round,
                differing = record.differing_count,
                resent = record.resent,
                "gsnap verification found differing tracks"
            );
        } else {
            tracing::info!(
                job = job.id,
                round,
                tracks = record.tracks,
                "gsnap verification: the digests match"
            );
        }
        self.commit(
            protocol::cluster::derived_request_id(job.request_id, &format!("gsnap verify {round}")),
            Command::GsnapVerified {
                job: job.id,
                round: record,
            },
        )
        .await?;
        Ok(Next::Continue)
    }

    /// A digest or re-send that did not happen: a node that does not answer makes the
    /// job wait; a refusal fails it at the verification.
    async fn verify_failed(&self, mut job: GsnapJob, refusal: Refusal) -> Outcome<Next> {
        if refusal.code == ErrorCode::Unavailable {
            return Ok(Next::Wait(refusal.message));
        }
        tracing::warn!(job = job.id, reason = %refusal.message, "gsnap verification refused");
        job.error = Some(JobError {
            step: GsnapStep::Verify,
            code: refusal.code,
            detail: refusal.message,
        });
        self.commit(random_request_id(), Command::GsnapRecord(job))
            .await?;
        Ok(Next::Continue)
    }

    /// Digests of P''s tracks on P's node and of the pair target's on its node, both at
    /// once.
    async fn digest_both(
        &self,
        job: &GsnapJob,
        source_extents: &[Extent],
        target_extents: &[Extent],
        group_tracks: u64,
    ) -> Outcome<(TrackDigests, TrackDigests)> {
        let (source, target) = tokio::join!(
            self.digest(
                &job.source_node,
                &job.spec.intermediate,
                source_extents,
                group_tracks
            ),
            self.digest(
                &job.target_node,
                job.pair_target(),
                target_extents,
                group_tracks
            ),
        );
        Ok((source?, target?))
    }

    /// Digests of `extents` of `volume`, computed by `node` from its own stored bytes.
    async fn digest(
        &self,
        node: &str,
        volume: &str,
        extents: &[Extent],
        group_tracks: u64,
    ) -> Outcome<TrackDigests> {
        let tracks = extents.iter().map(Extent::track_count).sum();
        let timeout = self.call_timeout(volume, tracks, DIGEST_BYTES_PER_SECOND_MIN);
        let request = Request::Digest {
            volume: volume.to_string(),
            extents: extents.to_vec(),
            group_tracks,
        };
        let what = format!("digest '{volume}'");
        match self.call_node_within(node, request, timeout, &what).await? {
            Response::Digests(digests) => Ok(digests),
            other => Err(Refusal::new(
                ErrorCode::Internal,
                format!("node {node} answered a digest with {other:?}"),
            )),
        }
    }

    /// Refuses, saying so, when `node` does not answer a status request within
    /// [`REACHABLE_TIMEOUT_SECONDS`].
    async fn check_answers(&self, node: &str) -> Outcome<()> {
        let timeout = std::time::Duration::from_secs(REACHABLE_TIMEOUT_SECONDS);
        match self
            .call_node_within(
                node,
                Request::NodeStatus,
                timeout,
                "answer a status request",
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(refusal) if refusal.code == ErrorCode::Unavailable => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!(
                    "{}; a gsnap needs both its nodes, and nothing was recorded",
                    refusal.message
                ),
            )),
            Err(refusal) => Err(refusal),
        }
    }

    /// Calls `node` with `request`, waiting at most `timeout`: its refusal, or a node that
    /// does not answer (`unavailable`), says what the call was for.
    async fn call_node_within(
        &self,
        node: &str,
        request: Request,
        timeout: std::time::Duration,
        what: &str,
    ) -> Outcome<Response> {
        let address = self.node_address(node).unwrap_or_default();
        match self
            .caller
            .call_within(&address, Some(node), &request, timeout)
            .await
        {
            Ok(Response::Error { code, message }) => Err(Refusal::new(
                code,
                format!("node {node} did not {what}: {message}"),
            )),
            Ok(response) => Ok(response),
            Err(detail) => Err(Refusal::new(
                ErrorCode::Unavailable,
                format!("node {node} did not answer ({what}): {detail}"),
            )),
        }
    }

    /// How long a call that moves or reads `tracks` tracks of `volume` may take: a base,
    /// plus their bytes at `bytes_per_second`.
    fn call_timeout(
        &self,
        volume: &str,
        tracks: u64,
        bytes_per_second: u64,
    ) -> std::time::Duration {
        let bytes = self.catalog.read(|catalog| {
            catalog
                .volume(volume)
                .map_or(0, |record| u64::from(record.track_size_bytes) * tracks)
        });
        std::time::Duration::from_secs(DIGEST_TIMEOUT_BASE_SECONDS + bytes / bytes_per_second)
    }

    /// Sends `tracks` of the job's pair again, from P' on P's node.
    async fn resend(&self, job: &GsnapJob, tracks: &[u64]) -> Outcome<()> {
        let timeout = self.call_timeout(
            &job.spec.intermediate,
            tracks.len() as u64,
            RESEND_BYTES_PER_SECOND_MIN,
        );
        let request = Request::Resend {
            target: job.pair_target().to_string(),
            tracks: tracks.to_vec(),
        };
        let node = &job.source_node;
        match self
            .call_node_within(node, request, timeout, "send the differing tracks again")
            .await?
        {
            Response::Resent { tracks, bytes } => {
                tracing::info!(
                    job = job.id,
                    tracks,
                    bytes,
                    "gsnap sent differing tracks again"
                );
                Ok(())
            }
            other => Err(Refusal::new(
                ErrorCode::Internal,
                format!("node {node} answered a re-send with {other:?}"),
            )),
        }
    }
}

/// Why a pair that did not move waits, from its source node's view of it.
fn pair_wait_reason(info: &protocol::session::SessionInfo) -> String {
    match (&info.error, info.state) {
        (Some(error), _) => format!("the copy cannot go on: {error}"),
        (None, protocol::session::SessionState::Suspended) => format!(
            "the pair into '{}' is suspended: its target's node does not answer",
            info.target
        ),
        (None, _) => format!(
            "the copy into '{}' made no progress ({} tracks remain)",
            info.target, info.tracks_remaining
        ),
    }
}

/// A node's answer that is not the one asked for, as a refusal's code and message.
fn node_refusal(response: Response) -> (ErrorCode, String) {
    match response {
        Response::Error { code, message } => (code, message),
        other => (
            ErrorCode::Internal,
            format!("the node answered with something else: {other:?}"),
        ),
    }
}
