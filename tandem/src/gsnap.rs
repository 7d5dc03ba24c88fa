//! `tandem gsnap`: one command copies a point-in-time image of a volume to a volume of
//! another node (seed 003's global snap), as a job the control plane drives to its end
//! whatever fails; `gsnap list`, `show` and `cancel` follow it.

use crate::{cluster_call, Connection, Session};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use protocol::cluster::{ClusterRequest, ClusterResponse};
use protocol::gsnap::{
    digest_hex, parse_volume_extents, GsnapJob, GsnapJobView, GsnapSpec, JobId, JobSend, JobState,
    SendMode,
};
use protocol::messages::Response;
use std::time::Duration;

/// How often `--wait` reads the job.
const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct GsnapArguments {
    #[command(subcommand)]
    command: Option<GsnapCommand>,
    /// SRC[:EXTENTS]: the volume to copy (P), and its tracks FIRST-LAST[,FIRST-LAST...]
    /// (default: all of them). A volume named list, show or cancel cannot be SRC.
    #[arg(required = true, value_name = "SRC[:EXTENTS]")]
    source: Option<String>,
    /// The intermediate snapshot of SRC (P'), on SRC's node; created if missing.
    #[arg(required = true)]
    intermediate: Option<String>,
    /// TARGET[:EXTENTS]: the volume that receives the image (S), on any node, and its
    /// tracks that do: SRC's tracks land on them in order, wherever they start (default:
    /// the same track numbers as SRC's). Both lists must hold as many tracks.
    #[arg(required = true, value_name = "TARGET[:EXTENTS]")]
    target: Option<String>,
    /// An intermediate volume on TARGET's node (S'), made with TARGET's size when missing:
    /// TARGET stays with its hosts during the copy and only its extents change, at one
    /// instant, at the end.
    #[arg(long)]
    target_intermediate: Option<String>,
    /// Copy rate limit, MiB/s (default: the node's QoS).
    #[arg(long)]
    rate: Option<u32>,
    /// Send every track (there are no incremental jobs yet, so every job does).
    #[arg(long)]
    full: bool,
    /// Follow the job to its end, then print its report.
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum GsnapCommand {
    /// Every job, running and ended.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// One job: its steps with their times, progress and the error if any.
    Show {
        job: JobId,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Stop a job before its activation; it ends what it started and ends `cancelled`.
    Cancel {
        job: JobId,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Drop the lineage of SRC and TARGET: both nodes free its session slots, and the
    /// next gsnap of the two sends every track.
    Forget {
        source: String,
        target: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn run(arguments: GsnapArguments) -> Result<()> {
    match arguments.command {
        Some(GsnapCommand::List { json, connection }) => {
            let response = cluster_call(&connection, ClusterRequest::GsnapList).await?;
            let Response::Cluster(ClusterResponse::JobViews(jobs)) = response else {
                bail!("unexpected answer from the cluster: {response:?}");
            };
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(jobs.iter().map(view_json).collect())
                );
            } else if jobs.is_empty() {
                println!("no gsnap jobs");
            } else {
                for job in &jobs {
                    println!("{}", summary(job));
                }
            }
            Ok(())
        }
        Some(GsnapCommand::Show {
            job,
            json,
            connection,
        }) => {
            let job = show(&connection, job).await?;
            print_job(&job, json);
            Ok(())
        }
        Some(GsnapCommand::Cancel {
            job,
            json,
            connection,
        }) => {
            let response = cluster_call(
                &connection,
                ClusterRequest::GsnapCancel {
                    request_id: rand::random(),
                    job,
                },
            )
            .await?;
            let Response::Cluster(ClusterResponse::Job(job)) = response else {
                bail!("unexpected answer from the cluster: {response:?}");
            };
            if json {
                println!("{}", job_json(&job, None));
            } else {
                println!("job {}: cancel asked; it ends what it started", job.id);
            }
            Ok(())
        }
        Some(GsnapCommand::Forget {
            source,
            target,
            json,
            connection,
        }) => {
            let response = cluster_call(
                &connection,
                ClusterRequest::GsnapForget {
                    request_id: rand::random(),
                    source: source.clone(),
                    target: target.clone(),
                },
            )
            .await?;
            let Response::Cluster(ClusterResponse::Done) = response else {
                bail!("unexpected answer from the cluster: {response:?}");
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"source": source, "target": target, "forgotten": true})
                );
            } else {
                println!(
                    "lineage {source} -> {target} forgotten: the next gsnap of the two sends every track"
                );
            }
            Ok(())
        }
        None => start(arguments).await,
    }
}

/// What a job sends, in a line: every track and why, or only the changed tracks.
pub(crate) fn send_line(send: &JobSend) -> String {
    match &send.mode {
        SendMode::Full { reason } => format!("full: {} tracks ({reason})", send.tracks),
        SendMode::Incremental {
            since_job,
            source_changed,
            target_changed,
        } => format!(
            "incremental since job {since_job}: {source_changed} tracks changed on the source, {target_changed} on the target; {} tracks sent",
            send.tracks
        ),
    }
}

async fn start(arguments: GsnapArguments) -> Result<()> {
    let (Some(source), Some(intermediate), Some(target)) =
        (arguments.source, arguments.intermediate, arguments.target)
    else {
        bail!("name SRC, INTERMEDIATE and TARGET (see `tandem gsnap --help`)");
    };
    let (source, source_extents) = parse_volume_extents(&source).map_err(anyhow::Error::msg)?;
    let (target, target_extents) = parse_volume_extents(&target).map_err(anyhow::Error::msg)?;
    let spec = GsnapSpec {
        source,
        source_extents,
        intermediate,
        target,
        target_extents,
        target_intermediate: arguments.target_intermediate,
        rate_mebibytes_per_second: arguments.rate,
        full: arguments.full,
    };
    let response = cluster_call(
        &arguments.connection,
        ClusterRequest::Gsnap {
            request_id: rand::random(),
            spec,
        },
    )
    .await?;
    let Response::Cluster(ClusterResponse::Job(job)) = response else {
        bail!("unexpected answer from the cluster: {response:?}");
    };
    if !arguments.wait {
        if arguments.json {
            println!("{}", serde_json::json!({ "job": job.id }));
        } else {
            println!("job {}", job.id);
        }
        return Ok(());
    }
    let view = wait(&arguments.connection, job.id, arguments.json).await?;
    print_job(&view, arguments.json);
    match view.job.state {
        JobState::Succeeded => Ok(()),
        state => bail!("job {} ended {}", view.job.id, state_name(state)),
    }
}

async fn show(connection: &Connection, job: JobId) -> Result<GsnapJobView> {
    let response = cluster_call(connection, ClusterRequest::GsnapShow { job }).await?;
    let Response::Cluster(ClusterResponse::JobView(view)) = response else {
        bail!("unexpected answer from the cluster: {response:?}");
    };
    Ok(*view)
}

/// Follows a job to its end, with a line of progress on a terminal.
async fn wait(connection: &Connection, job: JobId, quiet: bool) -> Result<GsnapJobView> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let session = Session::open(connection).await?;
    let outcome = loop {
        let response = match session.cluster(ClusterRequest::GsnapShow { job }).await {
            Ok(response) => response,
            Err(error) => break Err(error),
        };
        let Response::Cluster(ClusterResponse::JobView(view)) = response else {
            break Err(anyhow::anyhow!(
                "unexpected answer from the cluster: {response:?}"
            ));
        };
        bar.set_message(progress_line(&view));
        if view.job.state.is_final() {
            bar.finish_and_clear();
            break Ok(*view);
        }
        tokio::time::sleep(WAIT_POLL_INTERVAL).await;
    };
    session.close().await;
    outcome
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// The job's percent: the pair's copy, never 100 before the job succeeded.
fn percent(job: &GsnapJob) -> f64 {
    if job.state == JobState::Succeeded {
        return 100.0;
    }
    if job.tracks_total == 0 {
        return 0.0;
    }
    (job.tracks_copied() as f64 * 100.0 / job.tracks_total as f64).min(99.9)
}

/// The bar's width in the `--wait` line.
const BAR_COLUMNS: usize = 20;

/// The line `--wait` draws while a job runs: its id and step, a bar, the percent, and the
/// pair's rate and time left — or why the job is stalled.
fn progress_line(view: &GsnapJobView) -> String {
    use crate::sessions::wait_view::{bar, eta_text, fit, LINE_COLUMNS_MAX};
    let job = &view.job;
    let step = job
        .current_step()
        .map_or("done".to_string(), |step| step.to_string());
    let percent = percent(job);
    let tail = match &view.stalled {
        Some(stall) => format!("stalled: {}", stall.reason),
        None => format!(
            "{}/s eta {}",
            crate::sessions::human_bytes(view.rate_bytes_per_second),
            view.eta_seconds.map_or_else(|| "?".to_string(), eta_text)
        ),
    };
    fit(
        &format!(
            "job {} {step} [{}] {percent:5.1}% {tail}",
            job.id,
            bar(percent, BAR_COLUMNS)
        ),
        LINE_COLUMNS_MAX,
    )
}

/// The state a job shows: its recorded state, or `stalled` while a running job has made
/// no progress for the leader's threshold.
fn shown_state(view: &GsnapJobView) -> &'static str {
    match (&view.stalled, view.job.state) {
        (Some(_), JobState::Running) => "stalled",
        (_, state) => state_name(state),
    }
}

/// One line: id, state, step, volumes, percent, and why it is stalled.
fn summary(view: &GsnapJobView) -> String {
    let job = &view.job;
    let step = job
        .current_step()
        .map_or("done".to_string(), |step| step.to_string());
    let stalled = view
        .stalled
        .as_ref()
        .map(|stall| format!(" — stalled: {}", stall.reason))
        .unwrap_or_default();
    format!(
        "job {} {} step {} {} -> {} {:.1}% ({} of {} tracks){stalled}",
        job.id,
        shown_state(view),
        if job.state.is_final() {
            "-".to_string()
        } else {
            step
        },
        job.spec.source,
        job.spec.target,
        percent(job),
        job.tracks_copied(),
        job.tracks_total
    )
}

fn print_job(view: &GsnapJobView, json: bool) {
    if json {
        println!("{}", view_json(view));
        return;
    }
    let job = &view.job;
    println!("{}", summary(view));
    for record in &job.steps {
        let when = match (
            record.skipped,
            record.started_unix_seconds,
            record.finished_unix_seconds,
        ) {
            (true, _, _) => "skipped".to_string(),
            (_, Some(started), Some(finished)) => format!("done in {} s", finished - started),
            (_, Some(_), None) => "running".to_string(),
            (_, None, _) => "pending".to_string(),
        };
        println!("  {:<12} {when}", record.step.to_string());
    }
    if let Some(send) = &view.send {
        println!("  send         {}", send_line(send));
    }
    for round in &view.verification {
        let verdict = if round.matched() {
            "digests match".to_string()
        } else {
            format!(
                "{} tracks differ{}{}",
                round.differing_count,
                if round.differing.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        round
                            .differing
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                if round.resent { ", sent again" } else { "" }
            )
        };
        println!(
            "  verify round {}: {} tracks, {verdict}; source {}, target {}",
            round.round,
            round.tracks,
            digest_hex(&round.source),
            digest_hex(&round.target)
        );
    }
    if let (Some(finished), Some(round)) = (job.finished_unix_seconds, view.verification.first()) {
        let seconds = finished.saturating_sub(job.created_unix_seconds).max(1);
        println!(
            "  {} tracks, {} MiB in {} s ({:.1} MiB/s)",
            round.tracks,
            round.bytes >> 20,
            seconds,
            round.bytes as f64 / f64::from(1 << 20) / seconds as f64
        );
    }
    if let Some(stall) = &view.stalled {
        println!(
            "  stalled since {}: {}",
            control_plane::advice::format_utc(stall.since_unix_seconds),
            stall.reason
        );
    }
    if let Some(error) = &job.error {
        println!(
            "  error in step {}: {} [{}]",
            error.step, error.detail, error.code
        );
    }
}

/// A job as JSON, with its verification rounds and stall as shown.
fn view_json(view: &GsnapJobView) -> serde_json::Value {
    let mut json = job_json(&view.job, view.stalled.as_ref());
    json["state"] = shown_state(view).into();
    json["rate_bytes_per_second"] = view.rate_bytes_per_second.into();
    json["eta_seconds"] = view.eta_seconds.into();
    json["send"] = match &view.send {
        None => serde_json::Value::Null,
        Some(send) => {
            let (mode, reason, since_job, source_changed, target_changed) = match &send.mode {
                SendMode::Full { reason } => ("full", Some(reason.clone()), None, None, None),
                SendMode::Incremental {
                    since_job,
                    source_changed,
                    target_changed,
                } => (
                    "incremental",
                    None,
                    Some(*since_job),
                    Some(*source_changed),
                    Some(*target_changed),
                ),
            };
            serde_json::json!({
                "mode": mode,
                "reason": reason,
                "since_job": since_job,
                "source_changed_tracks": source_changed,
                "target_changed_tracks": target_changed,
                "tracks": send.tracks,
            })
        }
    };
    json["verification"] = view
        .verification
        .iter()
        .map(|round| {
            serde_json::json!({
                "round": round.round,
                "at_unix_seconds": round.at_unix_seconds,
                "tracks": round.tracks,
                "bytes": round.bytes,
                "source_digest": digest_hex(&round.source),
                "target_digest": digest_hex(&round.target),
                "matched": round.matched(),
                "differing_count": round.differing_count,
                "differing": round.differing,
                "resent": round.resent,
            })
        })
        .collect::<Vec<_>>()
        .into();
    json
}

fn job_json(job: &GsnapJob, stalled: Option<&protocol::gsnap::Stall>) -> serde_json::Value {
    serde_json::json!({
        "job": job.id,
        "state": state_name(job.state),
        "stalled": stalled.map(|stall| serde_json::json!({
            "reason": stall.reason,
            "since_unix_seconds": stall.since_unix_seconds,
        })),
        "source": job.spec.source,
        "source_extents": job.spec.source_extents.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "intermediate": job.spec.intermediate,
        "target": job.spec.target,
        "target_extents": job.spec.target_extents.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "target_intermediate": job.spec.target_intermediate,
        "source_node": job.source_node,
        "target_node": job.target_node,
        "step": job.current_step().map(|step| step.to_string()),
        "steps": job.steps.iter().map(|record| serde_json::json!({
            "step": record.step.to_string(),
            "started_unix_seconds": record.started_unix_seconds,
            "finished_unix_seconds": record.finished_unix_seconds,
            "skipped": record.skipped,
        })).collect::<Vec<_>>(),
        "tracks_total": job.tracks_total,
        "tracks_copied": job.tracks_copied(),
        "percent": percent(job),
        "cancel_requested": job.cancel_requested,
        "error": job.error.as_ref().map(|error| serde_json::json!({
            "step": error.step.to_string(),
            "code": error.code.to_string(),
            "detail": error.detail,
        })),
        "created_unix_seconds": job.created_unix_seconds,
        "finished_unix_seconds": job.finished_unix_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::gsnap::{GsnapStep, Stall};

    fn running_view() -> GsnapJobView {
        let spec = GsnapSpec {
            source: "p".into(),
            source_extents: Vec::new(),
            intermediate: "p-mid".into(),
            target: "s".into(),
            target_extents: Vec::new(),
            target_intermediate: None,
            rate_mebibytes_per_second: None,
            full: false,
        };
        let mut job = GsnapJob::new(7, 1, spec, "a1".into(), "b1".into(), 0);
        for step in [GsnapStep::Snap, GsnapStep::Pair] {
            job.step_mut(step).started_unix_seconds = Some(1);
            job.step_mut(step).finished_unix_seconds = Some(2);
        }
        job.step_mut(GsnapStep::Copy).started_unix_seconds = Some(2);
        job.tracks_total = 200;
        job.tracks_remaining = Some(100);
        GsnapJobView {
            job,
            verification: Vec::new(),
            stalled: None,
            rate_bytes_per_second: 3 << 20,
            eta_seconds: Some(95),
            send: None,
        }
    }

    #[test]
    fn the_wait_line_shows_step_bar_percent_rate_and_time_left_or_why_it_is_stalled() {
        let mut view = running_view();
        let line = progress_line(&view);
        assert!(line.starts_with("job 7 copy [=========="), "{line}");
        assert!(line.contains(" 50.0% "), "{line}");
        assert!(line.ends_with("/s eta 1m35s"), "{line}");
        view.stalled = Some(Stall {
            reason: "node b1 unreachable since 2026-12-07 12:03:04 UTC".into(),
            since_unix_seconds: 5,
        });
        let line = progress_line(&view);
        assert!(line.contains("stalled: node b1 unreachable"), "{line}");
        assert!(line.chars().count() <= crate::sessions::wait_view::LINE_COLUMNS_MAX);
        assert_eq!(shown_state(&view), "stalled");
    }
}
