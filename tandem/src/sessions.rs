//! `tandem clone ...` and `tandem mirror ...`: copy-session commands, listings and the
//! `--wait` progress bar.

pub(crate) mod wait_view;

use crate::{Connection, Session};
use anyhow::{bail, Result};
use clap::Subcommand;
use protocol::cluster::{ClusterRequest, ClusterResponse};
use protocol::messages::{Extent, Response};
use protocol::session::{MirrorMode, SessionCommand, SessionInfo, SessionKind};
use std::time::Duration;

/// How often `--wait` asks for progress.
const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Subcommand)]
pub enum CloneCommand {
    /// Set up a clone of SRC into DST: DST becomes not-ready and every track of the
    /// extents is listed to copy (seed 001 CREATE).
    Create {
        source: String,
        target: String,
        /// Start copying at once, before activation; host writes re-queue copied tracks.
        #[arg(long)]
        precopy: bool,
        /// Tracks FIRST-LAST to clone; repeat for several. Default: the whole volume.
        #[arg(long = "extent")]
        extents: Vec<Extent>,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Start the precopy loop of a created clone (DST stays not-ready).
    Precopy {
        target: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Take the point in time now: DST becomes ready at once and the rest is copied in
    /// the background (copy before write on SRC, copy on first access on DST).
    Activate {
        target: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// End a clone whose tracks are all copied, freeing SRC's session slots.
    Terminate {
        target: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Undo a clone that was never activated (created or precopying): SRC's session slots
    /// are freed and DST stays not-ready with partial contents until it is overwritten
    /// (for example by a new clone) or deleted.
    Cancel {
        target: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Change the copy rate limit of a running clone, in MiB/s.
    Rate {
        target: String,
        #[command(flatten)]
        rate: RateOptions,
    },
    /// List clone sessions.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one clone session by its destination.
    Show {
        target: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
pub enum MirrorCommand {
    /// Make BCV a mirror of STD: BCV becomes not-ready and every track is copied; once
    /// synchronized, host writes to STD reach BCV (seed 002 ESTABLISH).
    Establish {
        standard: String,
        bcv: String,
        /// sync: a write is acknowledged after BCV has it; async: shipped in the background.
        /// A sync mirror whose BCV's node does not answer within --target-timeout is
        /// suspended: writes are acknowledged locally and resynchronized when it answers.
        #[arg(long, default_value = "sync")]
        mode: MirrorMode,
        /// With --mode sync: host writes fail while the BCV's node does not answer, rather
        /// than the mirror being suspended (writes fail rather than diverge, like SRDF's
        /// domino mode).
        #[arg(long)]
        strict: bool,
        /// How long the BCV's node may take to answer before the mirror is suspended (or,
        /// with --strict, the write fails), for example 2s or 500ms.
        #[arg(long, value_parser = parse_milliseconds, default_value = "2s")]
        target_timeout: u64,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Detach a synchronized BCV with the image of this instant; it becomes ready.
    Split {
        bcv: String,
        /// Send down a cascade below the BCV only the tracks changed since the last split.
        #[arg(long)]
        differential: bool,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Re-attach a split BCV, copying only tracks changed on either side.
    Reestablish {
        bcv: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Copy BCV back onto its standard: all tracks, or with --incremental only changed ones.
    Restore {
        bcv: String,
        #[arg(long)]
        incremental: bool,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// End the mirror relationship and free the standard's slot.
    Cancel {
        bcv: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Reestablish the oldest split BCV of STD and split it again (a rotating history).
    Rotate {
        standard: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Change the copy rate limit of a mirror, in MiB/s.
    Rate {
        bcv: String,
        #[command(flatten)]
        rate: RateOptions,
    },
    /// List mirror sessions.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one mirror session by its BCV.
    Show {
        bcv: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(clap::Args)]
pub struct RateOptions {
    /// The new limit in MiB/s.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), required_unless_present = "default", conflicts_with = "default")]
    rate: Option<u32>,
    /// Go back to the node's default rate for sessions.
    #[arg(long)]
    default: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

impl RateOptions {
    fn into_command(self, target: String) -> (SessionCommand, CommandOptions) {
        (
            SessionCommand::SetRate {
                target,
                mebibytes_per_second: if self.default { None } else { self.rate },
            },
            CommandOptions {
                wait: false,
                rate: None,
                json: self.json,
                connection: self.connection,
            },
        )
    }
}

#[derive(clap::Args)]
pub struct CommandOptions {
    /// Show a progress bar until the session reaches its next resting state.
    #[arg(long)]
    wait: bool,
    /// Limit this session's copy rate, in MiB/s (changeable while it runs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

pub async fn clone(command: CloneCommand) -> Result<()> {
    let (command, options) = match command {
        CloneCommand::List { json, connection } => {
            return list(&connection, SessionKind::Clone, json).await
        }
        CloneCommand::Show {
            target,
            json,
            connection,
        } => return show(&connection, SessionKind::Clone, &target, json).await,
        CloneCommand::Create {
            source,
            target,
            precopy,
            extents,
            options,
        } => (
            SessionCommand::CloneCreate {
                source,
                target,
                precopy,
                extents,
            },
            options,
        ),
        CloneCommand::Precopy { target, options } => {
            (SessionCommand::ClonePrecopy { target }, options)
        }
        CloneCommand::Activate { target, options } => {
            (SessionCommand::CloneActivate { target }, options)
        }
        CloneCommand::Terminate { target, options } => {
            (SessionCommand::CloneTerminate { target }, options)
        }
        CloneCommand::Rate { target, rate } => rate.into_command(target),
        CloneCommand::Cancel {
            target,
            json,
            connection,
        } => return clone_cancel(&connection, target, json).await,
    };
    run_command(command, options, SessionKind::Clone).await
}

pub async fn mirror(command: MirrorCommand) -> Result<()> {
    let (command, options) = match command {
        MirrorCommand::List { json, connection } => {
            return list(&connection, SessionKind::Mirror, json).await
        }
        MirrorCommand::Show {
            bcv,
            json,
            connection,
        } => return show(&connection, SessionKind::Mirror, &bcv, json).await,
        MirrorCommand::Establish {
            standard,
            bcv,
            mode,
            strict,
            target_timeout,
            options,
        } => {
            if strict && mode != MirrorMode::Sync {
                bail!("--strict applies to sync mirrors only (an async mirror never makes a host write wait for its BCV): drop --strict or use --mode sync");
            }
            (
                SessionCommand::MirrorEstablish {
                    standard,
                    bcv,
                    mode,
                    strict,
                    target_timeout_milliseconds: Some(target_timeout),
                },
                options,
            )
        }
        MirrorCommand::Split {
            bcv,
            differential,
            options,
        } => (SessionCommand::MirrorSplit { bcv, differential }, options),
        MirrorCommand::Reestablish { bcv, options } => {
            (SessionCommand::MirrorReestablish { bcv }, options)
        }
        MirrorCommand::Restore {
            bcv,
            incremental,
            options,
        } => (SessionCommand::MirrorRestore { bcv, incremental }, options),
        MirrorCommand::Cancel { bcv, options } => (SessionCommand::MirrorCancel { bcv }, options),
        MirrorCommand::Rotate { standard, options } => {
            (SessionCommand::MirrorRotate { standard }, options)
        }
        MirrorCommand::Rate { bcv, rate } => rate.into_command(bcv),
    };
    run_command(command, options, SessionKind::Mirror).await
}

/// `tandem clone cancel DST`: ends the session and says what DST holds now.
async fn clone_cancel(connection: &Connection, target: String, json: bool) -> Result<()> {
    let session = Session::open(connection).await?;
    let result = async {
        // The source is named in the answer; the cancel itself refuses an unknown session.
        let source = show_through(&session, SessionKind::Clone, &target)
            .await
            .ok()
            .map(|info| info.source);
        let ended = send(
            &session,
            SessionCommand::CloneCancel {
                target: target.clone(),
            },
        )
        .await?;
        if let Some(info) = ended {
            bail!("unexpected answer: the session goes on as {}", describe(&info));
        }
        let source_text = source
            .as_deref()
            .map_or_else(|| "the source".to_string(), |source| format!("'{source}'"));
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "command": "clone cancel",
                    "ended": true,
                    "source": source,
                    "target": target,
                    "target_readiness": "not-ready",
                    "target_contents": "partial",
                })
            );
        } else {
            println!(
                "clone cancel: the clone of {source_text} into '{target}' is cancelled and its session slots on {source_text} are free; '{target}' holds partial contents and stays not-ready until it is overwritten (for example by a new clone) or deleted"
            );
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    session.close().await;
    result
}

async fn run_command(
    command: SessionCommand,
    options: CommandOptions,
    kind: SessionKind,
) -> Result<()> {
    let session = Session::open(&options.connection).await?;
    let result = run_on(&session, command, &options, kind).await;
    session.close().await;
    result
}

async fn run_on(
    session: &Session,
    command: SessionCommand,
    options: &CommandOptions,
    kind: SessionKind,
) -> Result<()> {
    let name = command.name();
    // A rotation ends split: it reestablishes the oldest BCV and splits it again once
    // synchronized, so the synchronized state on the way is not where it rests.
    let until_split = matches!(command, SessionCommand::MirrorRotate { .. });
    let info = send(session, command).await?;
    let Some(mut info) = info else {
        if options.json {
            println!("{}", serde_json::json!({ "command": name, "ended": true }));
        } else {
            println!("{name}: the session has ended and its slots are free");
        }
        return Ok(());
    };
    if let Some(rate) = options.rate {
        let command = SessionCommand::SetRate {
            target: info.target.clone(),
            mebibytes_per_second: Some(rate),
        };
        if let Some(updated) = send(session, command).await? {
            info = updated;
        }
    }
    if options.wait {
        info = wait(session, kind, &info.target, options.json, until_split).await?;
    }
    if options.json {
        println!("{}", session_json(&info));
    } else {
        println!("{name}: {}", describe(&info));
    }
    Ok(())
}

/// Sends a session command through the cluster: the leader has the source volume's node
/// carry it out and records the outcome in the catalog.
async fn send(session: &Session, command: SessionCommand) -> Result<Option<SessionInfo>> {
    let response = session
        .cluster(ClusterRequest::Session {
            request_id: rand::random(),
            command,
        })
        .await?;
    match response {
        Response::Cluster(ClusterResponse::Session(info)) => Ok(info.map(|info| *info)),
        other => bail!("unexpected answer from the cluster: {other:?}"),
    }
}

async fn show_through(session: &Session, kind: SessionKind, target: &str) -> Result<SessionInfo> {
    let response = session
        .cluster(ClusterRequest::SessionShow {
            kind,
            target: target.to_string(),
        })
        .await?;
    match response {
        Response::Cluster(ClusterResponse::Session(Some(info))) => Ok(*info),
        other => bail!("unexpected answer from the cluster: {other:?}"),
    }
}

/// Polls the session until it rests, with a progress bar on a terminal.
async fn wait(
    session: &Session,
    kind: SessionKind,
    target: &str,
    quiet: bool,
    until_split: bool,
) -> Result<SessionInfo> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    // The whole line is drawn by `wait_view` (so its width and warnings are tested).
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let mut view = wait_view::WaitView::default();
    loop {
        let info = show_through(session, kind, target).await?;
        bar.set_message(view.observe(&info));
        // A precopy rests while it runs; waiting on it means waiting until it caught up.
        let caught_up =
            info.state != protocol::session::SessionState::Precopying || info.tracks_remaining == 0;
        let rests = if until_split {
            info.state == protocol::session::SessionState::Split
        } else {
            info.state.is_resting() && caught_up
        };
        if rests {
            bar.finish_and_clear();
            return Ok(info);
        }
        tokio::time::sleep(WAIT_POLL_INTERVAL).await;
    }
}

async fn list(connection: &Connection, kind: SessionKind, json: bool) -> Result<()> {
    let response =
        crate::cluster_call(connection, ClusterRequest::SessionList { kind: Some(kind) }).await?;
    let Response::Cluster(ClusterResponse::Sessions(sessions)) = response else {
        bail!("unexpected answer from the cluster: {response:?}");
    };
    if json {
        println!(
            "{}",
            serde_json::Value::Array(sessions.iter().map(session_json).collect())
        );
        return Ok(());
    }
    if sessions.is_empty() {
        println!("no {kind} sessions");
        return Ok(());
    }
    println!(
        "{:<6} {:<20} {:<20} {:<13} {:>7} {:>12} {:>10}",
        "ID", "SOURCE", "TARGET", "STATE", "PERCENT", "REMAINING", "RATE/s"
    );
    for info in &sessions {
        println!(
            "{:<6} {:<20} {:<20} {:<13} {:>6.1}% {:>12} {:>10}",
            info.id,
            info.source,
            info.target,
            info.state.to_string(),
            info.percent,
            info.tracks_remaining,
            human_bytes(info.rate_bytes_per_second)
        );
    }
    Ok(())
}

async fn show(connection: &Connection, kind: SessionKind, target: &str, json: bool) -> Result<()> {
    let session = Session::open(connection).await?;
    let info = show_through(&session, kind, target).await;
    session.close().await;
    let info = info?;
    if json {
        println!("{}", session_json(&info));
    } else {
        println!("{}", describe(&info));
        println!(
            "  slots {:?}, extents {}",
            info.slots,
            extents_text(&info.extents)
        );
        println!(
            "  tracks: {} copied, {} remaining, {} total; last copy moved {}",
            info.tracks_copied, info.tracks_remaining, info.tracks_total, info.tracks_copied_last
        );
        if let Some(mode) = info.mode {
            println!(
                "  mode {mode}{}, target timeout {} ms, lag {} tracks / {} s",
                if info.strict { " (strict)" } else { "" },
                info.target_timeout_milliseconds,
                info.lag_tracks,
                info.lag_seconds
            );
        }
        match &info.error {
            Some(error) if info.state == protocol::session::SessionState::Suspended => {
                println!("  {error}")
            }
            Some(error) => println!("  warning (the copy retries): {error}"),
            None => {}
        }
        if let Some(past) = &info.last_error {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs());
            println!(
                "  last error {} s ago (unix time {}): {}",
                now.saturating_sub(past.unix_seconds),
                past.unix_seconds,
                past.message
            );
        }
    }
    Ok(())
}

fn extents_text(extents: &[Extent]) -> String {
    extents
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(info: &SessionInfo) -> String {
    format!(
        "{} {} -> {} is {} ({:.1}%, {} of {} tracks copied, {} remaining)",
        info.kind,
        info.source,
        info.target,
        info.state,
        info.percent,
        info.tracks_copied,
        info.tracks_total,
        info.tracks_remaining
    )
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub fn session_json(info: &SessionInfo) -> serde_json::Value {
    serde_json::json!({
        "id": info.id,
        "kind": info.kind.to_string(),
        "source": info.source,
        "target": info.target,
        "state": info.state.to_string(),
        "mode": info.mode.map(|mode| mode.to_string()),
        "slots": info.slots,
        "extents": info.extents.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tracks_total": info.tracks_total,
        "tracks_copied": info.tracks_copied,
        "tracks_remaining": info.tracks_remaining,
        "tracks_copied_last": info.tracks_copied_last,
        "percent": info.percent,
        "rate_bytes_per_second": info.rate_bytes_per_second,
        "eta_seconds": info.eta_seconds,
        "rate_limit_mebibytes_per_second": info.rate_limit_mebibytes_per_second,
        "lag_tracks": info.lag_tracks,
        "lag_seconds": info.lag_seconds,
        "error": info.error,
        "last_error": info.last_error.as_ref().map(|past| serde_json::json!({
            "message": past.message,
            "unix_seconds": past.unix_seconds,
        })),
        "split_sequence": info.split_sequence,
        "strict": info.strict,
        "target_timeout_milliseconds": info.target_timeout_milliseconds,
    })
}

/// A duration given as whole milliseconds (`500ms`) or seconds (`2s`), in milliseconds.
fn parse_milliseconds(text: &str) -> std::result::Result<u64, String> {
    let invalid = || {
        format!("'{text}' is not a duration: give whole milliseconds or seconds, for example 500ms or 2s")
    };
    let (number, factor) = if let Some(number) = text.strip_suffix("ms") {
        (number, 1)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1000)
    } else {
        return Err(invalid());
    };
    let value: u64 = number.trim().parse().map_err(|_| invalid())?;
    value.checked_mul(factor).ok_or_else(invalid)
}

#[cfg(test)]
mod duration_tests {
    use super::parse_milliseconds;

    #[test]
    fn a_target_timeout_is_read_in_milliseconds_or_seconds() {
        assert_eq!(parse_milliseconds("2s"), Ok(2000));
        assert_eq!(parse_milliseconds("500ms"), Ok(500));
        for wrong in ["2", "ms", "1.5s", "-1s", "2 minutes"] {
            let error = parse_milliseconds(wrong).unwrap_err();
            assert!(
                error.contains("for example 500ms or 2s"),
                "{wrong}: {error}"
            );
        }
    }
}
