//! A gsnap job: seed 003's global snap `GSC P, P', S, S'` — a point-in-time image of P
//! copied to S on another node, through an intermediate snapshot P' on P's node and,
//! optionally, an intermediate S' on S's node that lets S's hosts keep using S.
//!
//! A job is a list of steps, each made of operations that are already idempotent under
//! ids derived from the job's request id (see `control_plane::gsnap`): a snap intent of P
//! into P', a clone of P' into S (or S') that is precopied while S is not ready, its
//! activation, its end, and with S' a snap of S' into S's extents.

use crate::cluster::RequestId;
use crate::messages::{ErrorCode, Extent};
use serde::{Deserialize, Serialize};
use std::fmt;

pub type JobId = u64;

/// What `tandem gsnap` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GsnapSpec {
    /// P, and the tracks of it to copy (empty: all).
    pub source: String,
    pub source_extents: Vec<Extent>,
    /// P', on P's node (created when missing).
    pub intermediate: String,
    /// S, on any node, and the tracks of it that receive P's (empty: all).
    pub target: String,
    pub target_extents: Vec<Extent>,
    /// S', on S's node: with it, S stays with its hosts during the copy and only its
    /// named extents change, at one instant, at the end.
    pub target_intermediate: Option<String>,
    pub rate_mebibytes_per_second: Option<u32>,
    /// Send every track, not only those changed since the last job of the same P and S.
    pub full: bool,
}

/// The steps of a job, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GsnapStep {
    /// P → P' on P's node: the image of the command's instant; P is free for its hosts
    /// at once.
    Snap,
    /// A clone session P' → S' (or S) across the nodes, precopying; the target's node
    /// takes its volume (not ready) for the session.
    Pair,
    /// The precopy moves every track of the extents.
    Copy,
    /// The clone is activated: S (without S') goes to its hosts with P''s image.
    Activate,
    /// The clone has copied everything.
    Settle,
    /// The clone ends; its slots are free.
    Terminate,
    /// With S': S' → S over S's extents on S's node, at one instant. Skipped without S'.
    TargetSnap,
}

impl GsnapStep {
    pub const ALL: [GsnapStep; 7] = [
        GsnapStep::Snap,
        GsnapStep::Pair,
        GsnapStep::Copy,
        GsnapStep::Activate,
        GsnapStep::Settle,
        GsnapStep::Terminate,
        GsnapStep::TargetSnap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GsnapStep::Snap => "snap",
            GsnapStep::Pair => "pair",
            GsnapStep::Copy => "copy",
            GsnapStep::Activate => "activate",
            GsnapStep::Settle => "settle",
            GsnapStep::Terminate => "terminate",
            GsnapStep::TargetSnap => "target-snap",
        }
    }
}

impl fmt::Display for GsnapStep {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether the job has ended for good.
    pub fn is_final(self) -> bool {
        self != JobState::Running
    }
}

/// When one step of a job started and ended (unix seconds, the leader's clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: GsnapStep,
    pub started_unix_seconds: Option<u64>,
    pub finished_unix_seconds: Option<u64>,
    /// The step does not apply to this job (a target snap without S').
    pub skipped: bool,
}

impl StepRecord {
    pub fn done(&self) -> bool {
        self.finished_unix_seconds.is_some() || self.skipped
    }
}

/// Why a job failed: the step, a code scripts can branch on, and what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub step: GsnapStep,
    pub code: ErrorCode,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GsnapJob {
    pub id: JobId,
    /// The CLI's request id: every node call of the job is made under an id derived
    /// from it, so a new leader repeats none.
    pub request_id: RequestId,
    pub spec: GsnapSpec,
    pub source_node: String,
    pub target_node: String,
    pub state: JobState,
    /// One record per step of [`GsnapStep::ALL`], in that order.
    pub steps: Vec<StepRecord>,
    pub cancel_requested: bool,
    /// The pair's tracks to copy, and those its node last reported still to copy
    /// (`None` before the first report).
    pub tracks_total: u64,
    pub tracks_remaining: Option<u64>,
    pub error: Option<JobError>,
    pub created_unix_seconds: u64,
    pub finished_unix_seconds: Option<u64>,
}

impl GsnapJob {
    /// A new job, every step pending (the target snap skipped without S').
    pub fn new(
        id: JobId,
        request_id: RequestId,
        spec: GsnapSpec,
        source_node: String,
        target_node: String,
        created_unix_seconds: u64,
    ) -> GsnapJob {
        let steps = GsnapStep::ALL
            .iter()
            .map(|step| StepRecord {
                step: *step,
                started_unix_seconds: None,
                finished_unix_seconds: None,
                skipped: *step == GsnapStep::TargetSnap && spec.target_intermediate.is_none(),
            })
            .collect();
        GsnapJob {
            id,
            request_id,
            spec,
            source_node,
            target_node,
            state: JobState::Running,
            steps,
            cancel_requested: false,
            tracks_total: 0,
            tracks_remaining: None,
            error: None,
            created_unix_seconds,
            finished_unix_seconds: None,
        }
    }

    /// The volume the pair copies into: S' when the job has one, S otherwise.
    pub fn pair_target(&self) -> &str {
        self.spec
            .target_intermediate
            .as_deref()
            .unwrap_or(&self.spec.target)
    }

    pub fn step(&self, step: GsnapStep) -> &StepRecord {
        self.steps
            .iter()
            .find(|record| record.step == step)
            .expect("a job holds a record of every step")
    }

    pub fn step_mut(&mut self, step: GsnapStep) -> &mut StepRecord {
        self.steps
            .iter_mut()
            .find(|record| record.step == step)
            .expect("a job holds a record of every step")
    }

    /// The first step not done yet; `None` when every step is.
    pub fn current_step(&self) -> Option<GsnapStep> {
        self.steps
            .iter()
            .find(|record| !record.done())
            .map(|record| record.step)
    }

    /// Tracks copied so far, never more than the total.
    pub fn tracks_copied(&self) -> u64 {
        self.tracks_remaining
            .map_or(0, |remaining| self.tracks_total.saturating_sub(remaining))
    }
}

/// Reads `VOLUME[:FIRST-LAST[,FIRST-LAST...]]`, the form `tandem gsnap` names P and S in
/// (volume names cannot hold a `:`). No extents: the whole volume.
pub fn parse_volume_extents(text: &str) -> Result<(String, Vec<Extent>), String> {
    let (volume, extents) = match text.split_once(':') {
        Some((volume, extents)) => (volume, Some(extents)),
        None => (text, None),
    };
    if volume.is_empty() {
        return Err(format!(
            "'{text}' names no volume: write VOLUME or VOLUME:FIRST-LAST"
        ));
    }
    let extents = match extents {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::parse::<Extent>)
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok((volume.to_string(), extents))
}

/// Checks P's and S's extents as a job pairs them: each list in increasing track order
/// without overlaps (so "in order" means one thing), and both holding the same number of
/// tracks; P's tracks land on S's in order. Empty lists mean whole volumes and are
/// checked against the volumes' sizes by the caller.
pub fn check_extents(source: &[Extent], target: &[Extent]) -> Result<(), String> {
    for (what, extents) in [("source", source), ("target", target)] {
        if let Some(pair) = extents
            .windows(2)
            .find(|pair| pair[1].first <= pair[0].last)
        {
            return Err(format!(
                "the {what}'s extents must be in increasing track order without overlaps: {} comes after {}",
                pair[1], pair[0]
            ));
        }
    }
    let tracks = |extents: &[Extent]| extents.iter().map(Extent::track_count).sum::<u64>();
    if !source.is_empty() && !target.is_empty() && tracks(source) != tracks(target) {
        return Err(format!(
            "the source's extents hold {} tracks and the target's {}: they must hold the same number",
            tracks(source),
            tracks(target)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(first: u64, last: u64) -> Extent {
        Extent { first, last }
    }

    #[test]
    fn a_volume_is_named_with_or_without_its_extents() {
        assert_eq!(parse_volume_extents("p"), Ok(("p".to_string(), Vec::new())));
        assert_eq!(
            parse_volume_extents("p:0-99,200-299"),
            Ok(("p".to_string(), vec![extent(0, 99), extent(200, 299)]))
        );
        assert_eq!(
            parse_volume_extents("s:7"),
            Ok(("s".to_string(), vec![extent(7, 7)]))
        );
        assert!(parse_volume_extents(":0-9").is_err());
        assert!(parse_volume_extents("p:").is_err());
        assert!(parse_volume_extents("p:9-0").is_err());
        assert!(parse_volume_extents("p:a-b").is_err());
    }

    #[test]
    fn extents_pair_in_order_and_hold_the_same_number_of_tracks() {
        assert_eq!(check_extents(&[], &[]), Ok(()));
        assert_eq!(
            check_extents(&[extent(0, 99)], &[extent(500, 549), extent(600, 649)]),
            Ok(())
        );
        let error = check_extents(&[extent(0, 99)], &[extent(0, 98)]).unwrap_err();
        assert!(error.contains("100 tracks"), "{error}");
        let error = check_extents(&[extent(10, 19), extent(0, 9)], &[extent(0, 19)]).unwrap_err();
        assert!(error.contains("increasing"), "{error}");
        assert!(check_extents(&[extent(0, 9), extent(9, 19)], &[]).is_err());
    }
}
