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
    /// The copy is proven: a digest of P''s copied tracks, computed on P's node, equals
    /// a digest of the same tracks read back on the target's node, each from its own
    /// stored bytes. Differing tracks are sent again, a bounded number of rounds. Runs
    /// after the copy and before the activation (appended last so that jobs recorded
    /// before it still decode; in [`GsnapStep::ALL`] it has its place in the order).
    Verify,
}

impl GsnapStep {
    pub const ALL: [GsnapStep; 8] = [
        GsnapStep::Snap,
        GsnapStep::Pair,
        GsnapStep::Copy,
        GsnapStep::Verify,
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
            GsnapStep::Verify => "verify",
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

    /// The record of `step`. A job recorded before a step existed (the verification)
    /// has none: that step counts as skipped for it.
    pub fn step(&self, step: GsnapStep) -> &StepRecord {
        const SKIPPED: StepRecord = StepRecord {
            step: GsnapStep::Verify,
            started_unix_seconds: None,
            finished_unix_seconds: None,
            skipped: true,
        };
        self.steps
            .iter()
            .find(|record| record.step == step)
            .unwrap_or(&SKIPPED)
    }

    /// The record of `step`, added in its place when the job has none yet.
    pub fn step_mut(&mut self, step: GsnapStep) -> &mut StepRecord {
        let index = match self.steps.iter().position(|record| record.step == step) {
            Some(index) => index,
            None => {
                let order =
                    |step: GsnapStep| GsnapStep::ALL.iter().position(|known| *known == step);
                let index = self
                    .steps
                    .iter()
                    .position(|record| order(record.step) > order(step))
                    .unwrap_or(self.steps.len());
                self.steps.insert(
                    index,
                    StepRecord {
                        step,
                        started_unix_seconds: None,
                        finished_unix_seconds: None,
                        skipped: false,
                    },
                );
                index
            }
        };
        &mut self.steps[index]
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

/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// Tracks a digest group holds at least: one group's digest per this many tracks keeps
/// an answer small; a mismatch is narrowed to single tracks in a second call.
pub const DIGEST_GROUP_TRACKS_MIN: u64 = 64;
/// Groups one digest answer holds at most (32 bytes each): larger extents get larger
/// groups.
pub const DIGEST_GROUPS_MAX: u64 = 4096;
/// Tracks a verification sends again at most in one round; more differing tracks fail
/// the job at once (a copy that wrong is not repaired by re-sending).
pub const RESEND_TRACKS_MAX: u64 = 1024;
/// Verification rounds of a job at most: the first and two after re-sends.
pub const VERIFY_ROUNDS_MAX: usize = 3;
/// A job that makes no progress for this long shows `stalled` with the reason.
pub const STALL_AFTER_SECONDS: u64 = 30;

/// One node's digests of a volume's tracks, each from its own stored bytes: a digest per
/// group of `group_tracks` consecutive tracks (taken in the order of the extents asked
/// for, the last group possibly shorter), and the digest of those digests in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackDigests {
    pub tracks: u64,
    pub bytes: u64,
    pub group_tracks: u64,
    pub groups: Vec<Digest>,
    pub whole: Digest,
}

/// The group size for `tracks` tracks: at least [`DIGEST_GROUP_TRACKS_MIN`], and large
/// enough that no answer holds more than [`DIGEST_GROUPS_MAX`] groups.
pub fn digest_group_tracks(tracks: u64) -> u64 {
    DIGEST_GROUP_TRACKS_MIN.max(tracks.div_ceil(DIGEST_GROUPS_MAX))
}

/// The tracks of `extents`, in order.
pub fn extent_tracks(extents: &[Extent]) -> impl Iterator<Item = u64> + '_ {
    extents.iter().flat_map(|extent| extent.first..=extent.last)
}

/// The tracks at positions `positions` (increasing) of the tracks of `extents` in order.
/// Digests compare tracks by position, so that P's and S's tracks pair up in order
/// whatever track numbers each side has.
pub fn tracks_at(extents: &[Extent], positions: &[u64]) -> Vec<u64> {
    let mut wanted = positions.iter().peekable();
    let mut tracks = Vec::with_capacity(positions.len());
    for (position, track) in extent_tracks(extents).enumerate() {
        let Some(next) = wanted.peek() else { break };
        if **next == position as u64 {
            tracks.push(track);
            wanted.next();
        }
    }
    tracks
}

/// Tracks as extents: each run of consecutive tracks becomes one extent.
pub fn extents_of_tracks(tracks: &[u64]) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for track in tracks {
        match extents.last_mut() {
            Some(last) if last.last + 1 == *track => last.last = *track,
            _ => extents.push(Extent {
                first: *track,
                last: *track,
            }),
        }
    }
    extents
}

/// The positions (in track order) of the groups whose digests differ between two
/// answers over the same number of tracks, widened to the positions of their tracks.
pub fn differing_positions(source: &TrackDigests, target: &TrackDigests) -> Vec<u64> {
    let mut positions = Vec::new();
    for (group, (left, right)) in source.groups.iter().zip(&target.groups).enumerate() {
        if left != right {
            let first = group as u64 * source.group_tracks;
            let last = (first + source.group_tracks).min(source.tracks);
            positions.extend(first..last);
        }
    }
    positions
}

/// One round of a job's verification, as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRound {
    /// 1 for the first round.
    pub round: u32,
    pub at_unix_seconds: u64,
    pub tracks: u64,
    pub bytes: u64,
    /// The whole digests: of P''s tracks on P's node, of the target's on its node.
    pub source: Digest,
    pub target: Digest,
    /// The target's tracks (its own numbers) whose bytes differ from P''s, when the
    /// digests differ and they are at most [`RESEND_TRACKS_MAX`].
    pub differing: Vec<u64>,
    /// How many tracks differ (when more than [`RESEND_TRACKS_MAX`], counting stopped
    /// there: at least that many).
    pub differing_count: u64,
    /// Whether another round follows: the differing tracks were sent again, or the round
    /// was inconclusive (no single track differed when read again).
    pub resent: bool,
}

impl VerifyRound {
    pub fn matched(&self) -> bool {
        self.source == self.target
    }
}

/// A job that has made no progress for [`STALL_AFTER_SECONDS`]: why, and since when
/// (the last progress the leader saw; unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stall {
    pub reason: String,
    pub since_unix_seconds: u64,
}

/// A job as `gsnap show` and `gsnap list` show it: its record, its verification rounds,
/// and whether it is stalled now (a view of the leader's, not recorded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GsnapJobView {
    pub job: GsnapJob,
    pub verification: Vec<VerifyRound>,
    pub stalled: Option<Stall>,
    /// The pair's copy rate and time left as its node last reported them (0 and `None`
    /// when no copy runs or the leader has not read it yet).
    pub rate_bytes_per_second: u64,
    pub eta_seconds: Option<u64>,
    /// What the job sends, once recorded.
    pub send: Option<JobSend>,
}

/// What a job does to a lineage on one node: the session slot that marks a volume's
/// tracks written by hosts since the last job of the same P and S (on P, and on the
/// volume the pair copies into, S' or S).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineageStep {
    /// The live slot is frozen (its tracks become the job's changed tracks; a frozen slot
    /// left by an earlier job is freed first) and a new live slot takes the writes from
    /// now on. On the pair's target the volume also goes not ready, in the same write,
    /// so no host write falls between the two slots; the job's copy makes it ready again.
    Rotate,
    /// The job succeeded: its frozen slot is freed; the live one goes on. The volume is
    /// made ready (a job that had nothing to send has no pair to do it).
    Settle,
    /// The job failed, was cancelled, or the lineage is forgotten: both slots are freed
    /// and the lineage is gone (the next job sends everything).
    Drop,
    /// [`LineageStep::Drop`], and a volume the rotation took from its hosts goes back to
    /// them (the job failed before anything was written to it).
    Release,
    /// The job failed or was cancelled, and the lineage goes on from the last job that
    /// succeeded: the frozen slot's tracks go back into the live slot (the next job sends
    /// them again, with whatever this one wrote in part) and the frozen slot is freed. A
    /// volume the rotation took from its hosts stays not ready (the job wrote it in part).
    /// Appended.
    Fold,
    /// [`LineageStep::Fold`], and a volume the rotation took from its hosts goes back to
    /// them (the job failed before anything was written to it). Appended.
    FoldRelease,
}

impl LineageStep {
    pub fn name(self) -> &'static str {
        match self {
            LineageStep::Rotate => "rotate",
            LineageStep::Settle => "settle",
            LineageStep::Drop => "drop",
            LineageStep::Release => "release",
            LineageStep::Fold => "fold",
            LineageStep::FoldRelease => "fold-release",
        }
    }
}

/// The name both nodes keep a lineage of P and S under.
pub fn lineage_name(source: &str, target: &str) -> String {
    format!("{source}>{target}")
}

/// A node's lineage after a rotation: the tracks its frozen slot holds (written since the
/// last job), or `None` when the node kept no live slot for it (a first job, one after a
/// failure or a `gsnap forget`, or a volume made again): then the job sends everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageTracks {
    pub volume: String,
    pub lineage: String,
    pub frozen: Option<Vec<Extent>>,
}

/// Distinct runs of tracks a job's pair may name: more changed runs are merged across
/// the smallest gaps (a few unchanged tracks are sent too).
pub const SEND_EXTENTS_MAX: usize = crate::session::CLONE_EXTENTS_MAX;

/// What a job sends: everything, or only the tracks changed since the last job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendMode {
    /// Every track of the extents, and why.
    Full { reason: String },
    /// P's tracks written since job `since_job`'s snap, with the tracks the target's
    /// hosts wrote since that job ended.
    Incremental {
        since_job: JobId,
        source_changed: u64,
        target_changed: u64,
    },
}

/// A job's send, recorded once both nodes rotated their lineages and before the pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSend {
    pub mode: SendMode,
    /// The target's tracks (its own numbers) the pair copies, in increasing order; for a
    /// full job, the target's extents.
    pub extents: Vec<Extent>,
    pub tracks: u64,
}

impl JobSend {
    pub fn is_incremental(&self) -> bool {
        matches!(self.mode, SendMode::Incremental { .. })
    }
}

/// A lineage as the catalog keeps it, by P and S: the job that last succeeded, and what
/// the next job must match to send only what changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub source: String,
    pub target: String,
    pub intermediate: String,
    pub target_intermediate: Option<String>,
    pub source_extents: Vec<Extent>,
    pub target_extents: Vec<Extent>,
    pub source_node: String,
    pub target_node: String,
    pub last_job: JobId,
    pub since_unix_seconds: u64,
}

impl Lineage {
    /// The volume whose host writes the target side tracks: S' when the job has one.
    pub fn tracked(&self) -> &str {
        self.target_intermediate.as_deref().unwrap_or(&self.target)
    }

    /// Why a job of `spec` cannot send only the changes of this lineage (`None`: it can).
    pub fn mismatch(&self, spec: &GsnapSpec) -> Option<String> {
        if self.intermediate != spec.intermediate {
            return Some(format!(
                "the intermediate is '{}', not job {}'s '{}'",
                spec.intermediate, self.last_job, self.intermediate
            ));
        }
        if self.target_intermediate != spec.target_intermediate {
            return Some(format!(
                "the target intermediate differs from job {}'s",
                self.last_job
            ));
        }
        if self.source_extents != spec.source_extents || self.target_extents != spec.target_extents
        {
            return Some(format!("the extents differ from job {}'s", self.last_job));
        }
        None
    }
}

/// Runs of tracks merged across the smallest gaps until at most `extents_max` remain.
/// `extents` are in increasing order without overlaps.
pub fn coarsen_extents(extents: &[Extent], extents_max: usize) -> Vec<Extent> {
    if extents.len() <= extents_max || extents_max == 0 {
        return extents.to_vec();
    }
    // The gaps to fill: the widest are kept, so the fewest unchanged tracks are sent.
    let mut gaps: Vec<(u64, usize)> = extents
        .windows(2)
        .enumerate()
        .map(|(index, pair)| (pair[1].first - pair[0].last - 1, index))
        .collect();
    gaps.sort_unstable();
    let mut fill = vec![false; extents.len()];
    for (_, index) in gaps.iter().take(extents.len() - extents_max) {
        fill[*index] = true;
    }
    let mut merged: Vec<Extent> = Vec::with_capacity(extents_max);
    let mut joining = false;
    for (index, extent) in extents.iter().enumerate() {
        match merged.last_mut() {
            Some(last) if joining => last.last = extent.last,
            _ => merged.push(*extent),
        }
        joining = fill[index];
    }
    merged
}

/// The union of two lists of extents, each in increasing order without overlaps, as one
/// such list with touching runs joined.
pub fn union_extents(left: &[Extent], right: &[Extent]) -> Vec<Extent> {
    let mut all: Vec<Extent> = left.iter().chain(right).copied().collect();
    all.sort_unstable_by_key(|extent| extent.first);
    let mut merged: Vec<Extent> = Vec::with_capacity(all.len());
    for extent in all {
        match merged.last_mut() {
            Some(last) if extent.first <= last.last.saturating_add(1) => {
                last.last = last.last.max(extent.last)
            }
            _ => merged.push(extent),
        }
    }
    merged
}

/// The part of `extents` inside `within` (both in increasing order without overlaps).
pub fn intersect_extents(extents: &[Extent], within: &[Extent]) -> Vec<Extent> {
    let mut result = Vec::new();
    for extent in extents {
        for bound in within {
            let first = extent.first.max(bound.first);
            let last = extent.last.min(bound.last);
            if first <= last {
                result.push(Extent { first, last });
            }
        }
    }
    result.sort_unstable_by_key(|extent| extent.first);
    result
}

/// `extents` of P moved onto S's numbering: P's extents `source` land in order on S's
/// `target` (equal track totals). Tracks outside `source` are dropped.
pub fn map_to_target(extents: &[Extent], source: &[Extent], target: &[Extent]) -> Vec<Extent> {
    // Segments where a source run and a target run line up: (source first, target first, tracks).
    let mut segments = Vec::new();
    let (mut source_index, mut target_index) = (0, 0);
    let (mut source_offset, mut target_offset) = (0u64, 0u64);
    while source_index < source.len() && target_index < target.len() {
        let source_left = source[source_index].track_count() - source_offset;
        let target_left = target[target_index].track_count() - target_offset;
        let tracks = source_left.min(target_left);
        segments.push((
            source[source_index].first + source_offset,
            target[target_index].first + target_offset,
            tracks,
        ));
        source_offset += tracks;
        target_offset += tracks;
        if source_offset == source[source_index].track_count() {
            source_index += 1;
            source_offset = 0;
        }
        if target_offset == target[target_index].track_count() {
            target_index += 1;
            target_offset = 0;
        }
    }
    let mut mapped = Vec::new();
    for extent in extents {
        for (source_first, target_first, tracks) in &segments {
            let first = extent.first.max(*source_first);
            let last = extent.last.min(source_first + tracks - 1);
            if first <= last {
                mapped.push(Extent {
                    first: target_first + (first - source_first),
                    last: target_first + (last - source_first),
                });
            }
        }
    }
    union_extents(&mapped, &[])
}

/// Hex text of a digest, as reports print it.
pub fn digest_hex(digest: &Digest) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
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

    #[test]
    fn digests_pair_tracks_by_position_and_narrow_to_the_differing_groups() {
        assert_eq!(digest_group_tracks(10), DIGEST_GROUP_TRACKS_MIN);
        assert_eq!(digest_group_tracks(1 << 24), (1 << 24) / DIGEST_GROUPS_MAX);
        let extents = [extent(10, 12), extent(20, 21)];
        assert_eq!(tracks_at(&extents, &[0, 3, 4]), vec![10, 20, 21]);
        assert_eq!(tracks_at(&extents, &[]), Vec::<u64>::new());
        assert_eq!(
            extents_of_tracks(&[1, 2, 3, 7, 9, 10]),
            vec![extent(1, 3), extent(7, 7), extent(9, 10)]
        );
        let digests = |groups: Vec<Digest>| TrackDigests {
            tracks: 130,
            bytes: 0,
            group_tracks: 64,
            groups,
            whole: [0; 32],
        };
        let source = digests(vec![[1; 32], [2; 32], [3; 32]]);
        let target = digests(vec![[1; 32], [2; 32], [4; 32]]);
        assert_eq!(differing_positions(&source, &target), vec![128, 129]);
        assert_eq!(differing_positions(&source, &source), Vec::<u64>::new());
    }

    #[test]
    fn changed_tracks_map_onto_the_target_and_merge_across_the_smallest_gaps() {
        // P's tracks 0-9 and 20-29 land on S's 100-119.
        let source = [extent(0, 9), extent(20, 29)];
        let target = [extent(100, 119)];
        assert_eq!(
            map_to_target(&[extent(8, 21), extent(40, 41)], &source, &target),
            vec![extent(108, 111)]
        );
        assert_eq!(
            union_extents(
                &[extent(1, 3), extent(10, 10)],
                &[extent(4, 5), extent(8, 9)]
            ),
            vec![extent(1, 5), extent(8, 10)]
        );
        assert_eq!(
            intersect_extents(&[extent(0, 10), extent(20, 30)], &[extent(5, 25)]),
            vec![extent(5, 10), extent(20, 25)]
        );
        let runs = [extent(0, 0), extent(2, 2), extent(10, 10), extent(13, 13)];
        assert_eq!(coarsen_extents(&runs, 4), runs.to_vec());
        assert_eq!(
            coarsen_extents(&runs, 3),
            vec![extent(0, 2), extent(10, 10), extent(13, 13)]
        );
        assert_eq!(
            coarsen_extents(&runs, 2),
            vec![extent(0, 2), extent(10, 13)]
        );
        assert_eq!(coarsen_extents(&runs, 1), vec![extent(0, 13)]);
    }

    #[test]
    fn a_job_recorded_before_the_verification_counts_it_skipped() {
        let spec = GsnapSpec {
            source: "p".into(),
            source_extents: Vec::new(),
            intermediate: "p1".into(),
            target: "s".into(),
            target_extents: Vec::new(),
            target_intermediate: None,
            rate_mebibytes_per_second: None,
            full: false,
        };
        let mut job = GsnapJob::new(1, 7, spec, "a1".into(), "b1".into(), 0);
        assert_eq!(job.steps.len(), GsnapStep::ALL.len());
        job.steps.retain(|record| record.step != GsnapStep::Verify);
        assert!(job.step(GsnapStep::Verify).done());
        job.step_mut(GsnapStep::Verify).started_unix_seconds = Some(5);
        let order: Vec<GsnapStep> = job.steps.iter().map(|record| record.step).collect();
        assert_eq!(order, GsnapStep::ALL.to_vec());
    }
}
