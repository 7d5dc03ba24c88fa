//! Gsnap jobs on the leader: the commands (start, list, show, cancel) and the driver, a
//! thin shell around the pure planner (`crate::gsnap::plan`): it asks the planner for
//! the next action of each running job, carries it out, records what came of it in the
//! job's catalog record, and asks again. Every supervision round drives every running
//! job whose next action can move, one task per job, so a new leader resumes each job
//! where the catalog says it is.

use super::sessions::NodeSession;
use super::*;
use crate::gsnap::{plan, refuse_cancel, Action, Blocked};
use protocol::cluster::{Intent, IntentResult};
use protocol::gsnap::{GsnapJob, GsnapSpec, JobError, JobId};

/// Actions one drive of a job carries out at most before it lets the next round go on:
/// a job never holds its task for long.
const JOB_ACTIONS_PER_ROUND_MAX: usize = 16;

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
                Ok(ClusterResponse::Job(job))
            }
            other => Err(unexpected_reply(&other)),
        }
    }

    pub(super) async fn gsnap_list(&self) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        Ok(ClusterResponse::Jobs(
            self.catalog
                .read(|catalog| catalog.jobs().cloned().collect()),
        ))
    }

    pub(super) async fn gsnap_show(&self, job: JobId) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        self.catalog
            .read(|catalog| catalog.job(job).cloned())
            .map(|job| ClusterResponse::Job(Box::new(job)))
            .ok_or_else(|| CatalogError::UnknownJob { job }.into())
    }

    /// Asks a running job to stop: before its activation it ends what it started and
    /// ends `cancelled`; after it, it is refused (the target already takes the image).
    pub(super) async fn gsnap_cancel(
        &self,
        request_id: RequestId,
        job: JobId,
    ) -> Outcome<ClusterResponse> {
        self.read_barrier().await?;
        let mut record = self
            .catalog
            .read(|catalog| catalog.job(job).cloned())
            .ok_or(CatalogError::UnknownJob { job })?;
        if record.cancel_requested {
            return Ok(ClusterResponse::Job(Box::new(record)));
        }
        if let Some(reason) = refuse_cancel(&record) {
            return Err(Refusal::new(ErrorCode::IllegalState, reason));
        }
        record.cancel_requested = true;
        match self
            .commit(request_id, Command::GsnapRecord(record))
            .await?
        {
            CatalogReply::Job(job) => Ok(ClusterResponse::Job(job)),
            other => Err(unexpected_reply(&other)),
        }
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

    /// Carries out a job's next actions until it must wait.
    async fn drive_job(&self, id: JobId) -> Outcome<()> {
        for _ in 0..JOB_ACTIONS_PER_ROUND_MAX {
            let Some((job, action)) = self
                .catalog
                .read(|catalog| catalog.job(id).map(|job| (job.clone(), plan(job, catalog))))
            else {
                return Ok(());
            };
            if !self.carry_out_job_action(job, action).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Carries out one action; returns whether the job can go on at once.
    async fn carry_out_job_action(&self, mut job: GsnapJob, action: Action) -> Outcome<bool> {
        let now = now_unix_seconds();
        match action {
            Action::Idle => return Ok(false),
            Action::Wait(Blocked::NodeDown { node, .. }) => {
                tracing::debug!(job = job.id, %node, "gsnap job waits for its node");
                return Ok(false);
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
                return self.drive_job_intent(id).await;
            }
            Action::DriveIntent(id) => return self.drive_job_intent(id).await,
            Action::Session {
                request_id,
                command,
            } => {
                let step = job.current_step();
                let pair_created = matches!(command, SessionCommand::CloneCreate { .. });
                match self.session_command(request_id, command).await {
                    Ok(_) if pair_created && job.spec.rate_mebibytes_per_second.is_some() => {
                        // The job's rate limit is the pair's, set under an id of its own.
                        let rate = SessionCommand::SetRate {
                            target: job.pair_target().to_string(),
                            mebibytes_per_second: job.spec.rate_mebibytes_per_second,
                        };
                        self.session_command(crate::gsnap::call_id(&job, "rate"), rate)
                            .await?;
                        return Ok(true);
                    }
                    Ok(_) => return Ok(true),
                    Err(refusal) if refusal.code == ErrorCode::Unavailable => return Ok(false),
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
                let entry = self
                    .catalog
                    .read(|catalog| catalog.session(job.pair_target()).cloned());
                let Some(entry) = entry else {
                    return Ok(false);
                };
                let NodeSession::Live(info) = self.node_session(&entry).await else {
                    return Ok(false);
                };
                // The pair's numbers only grow: a re-read never shows less copied.
                let remaining = job.tracks_remaining.map_or(info.tracks_remaining, |known| {
                    known.min(info.tracks_remaining)
                });
                let moved = job.tracks_total != info.tracks_total
                    || job.tracks_remaining != Some(remaining);
                job.tracks_total = job.tracks_total.max(info.tracks_total);
                job.tracks_remaining = Some(remaining);
                if !moved {
                    return Ok(false);
                }
            }
            Action::Finish { state, error } => {
                job.state = state;
                job.error = error;
                job.finished_unix_seconds = Some(now);
                tracing::info!(job = job.id, state = ?job.state, "gsnap job ended");
            }
        }
        self.commit(random_request_id(), Command::GsnapRecord(job))
            .await?;
        Ok(true)
    }

    /// Drives a job's intent; whether the job can go on at once (its node answered).
    async fn drive_job_intent(&self, id: RequestId) -> Outcome<bool> {
        match self.drive_intent(id).await {
            Ok(IntentResult::Snapped { .. } | IntentResult::Refused { .. }) => Ok(true),
            Err(refusal) => {
                tracing::debug!(intent = %format!("{id:032x}"), reason = %refusal.message, "a gsnap snap waits");
                Ok(false)
            }
        }
    }
}
