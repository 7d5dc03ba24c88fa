//! The vocabulary of copy sessions: kinds, states, commands and what a session reports.
//!
//! Clone sessions follow seeds 000/001 (CREATE, PRECOPY, ACTIVATE, TERMINATE); mirror
//! sessions follow seed 002 (ESTABLISH, SPLIT, REESTABLISH, RESTORE) with seed 004's
//! rotation. [`next_state`] is the one table of legal transitions, shared by every place
//! that must refuse an illegal command before anything changes.

use crate::messages::Extent;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Sessions per source volume: one per session slot (seed 002: 16 PB columns).
pub const SESSIONS_PER_VOLUME_MAX: usize = 16;
/// Extents one clone may name; each is checked before anything is set up.
pub const CLONE_EXTENTS_MAX: usize = 4096;
/// Extents one operation of a target carries (1 MiB of them); a longer list, such as the
/// tracks a precopied clone still owes, goes in several operations.
pub const OPERATION_EXTENTS_MAX: usize = 65_536;
/// How long a session's source waits for its remote target before the session is
/// suspended (a strict sync mirror fails the write instead), unless the mirror was
/// established with another `--target-timeout`.
pub const TARGET_TIMEOUT_MILLISECONDS_DEFAULT: u64 = 2_000;
/// The shortest `--target-timeout`: below it a busy but healthy link would suspend.
pub const TARGET_TIMEOUT_MILLISECONDS_MIN: u64 = 100;
/// The longest `--target-timeout`: a host write waits at most this once.
pub const TARGET_TIMEOUT_MILLISECONDS_MAX: u64 = 60_000;

pub type SessionId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionKind {
    Clone,
    Mirror,
}

impl fmt::Display for SessionKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            SessionKind::Clone => "clone",
            SessionKind::Mirror => "mirror",
        })
    }
}

/// Where a session is in its life. Resting states are where a session stays until the
/// next command; the others end by themselves when their copy is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionState {
    /// Clone: lists set up, destination not ready, nothing copied yet (resting).
    Created,
    /// Clone: the precopy loop copies pending tracks pass after pass; destination not
    /// ready (resting: it keeps catching up with host writes until activated).
    Precopying,
    /// Clone: the point in time is taken, the destination is ready, the background copy
    /// moves what is still pending. Ends in `Copied`.
    Active,
    /// Clone: every track is copied; terminate frees the slots (resting).
    Copied,
    /// Mirror: copying what the standard has and the BCV lacks; BCV not ready. Ends in
    /// `Synchronized` (or, when the session rotates, in `Split`).
    Syncing,
    /// Mirror: the BCV holds the standard's image and host writes reach it (resting).
    Synchronized,
    /// Mirror: the BCV is ready for its own hosts with the image of the split (resting).
    Split,
    /// Mirror: the standard is being restored from the BCV. Ends in `Synchronized`.
    Restoring,
    /// Any session whose remote target did not answer within the session's target
    /// timeout (a strict sync mirror never suspends). Host writes are acknowledged
    /// locally and only mark the session's bits; the source probes the target and, when
    /// it answers, the session resumes by itself (a mirror resynchronizes the tracks
    /// written meanwhile, then is synchronized again). Ends by itself.
    Suspended,
}

impl SessionState {
    /// Whether the session stays in this state until the next command.
    pub fn is_resting(self) -> bool {
        matches!(
            self,
            SessionState::Created
                | SessionState::Precopying
                | SessionState::Copied
                | SessionState::Synchronized
                | SessionState::Split
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            SessionState::Created => "created",
            SessionState::Precopying => "precopying",
            SessionState::Active => "active",
            SessionState::Copied => "copied",
            SessionState::Syncing => "syncing",
            SessionState::Synchronized => "synchronized",
            SessionState::Split => "split",
            SessionState::Restoring => "restoring",
            SessionState::Suspended => "suspended",
        })
    }
}

/// How a mirror's host writes reach its BCV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum MirrorMode {
    /// A host write is acknowledged only after the BCV has it.
    #[default]
    Sync,
    /// Changed tracks are shipped in the background; the lag is reported.
    Async,
}

impl fmt::Display for MirrorMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            MirrorMode::Sync => "sync",
            MirrorMode::Async => "async",
        })
    }
}

impl std::str::FromStr for MirrorMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sync" => Ok(MirrorMode::Sync),
            "async" => Ok(MirrorMode::Async),
            other => Err(format!("unknown mirror mode '{other}': use sync or async")),
        }
    }
}

/// A session command. Clone commands name the destination, mirror commands the BCV
/// (rotate names the standard), as the CLI does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionCommand {
    CloneCreate {
        source: String,
        target: String,
        precopy: bool,
        /// Empty: the whole volume.
        extents: Vec<Extent>,
    },
    ClonePrecopy {
        target: String,
    },
    CloneActivate {
        target: String,
    },
    CloneTerminate {
        target: String,
    },
    /// Undoes a clone that was never activated (created or precopying): frees the
    /// source's slots and leaves the destination not-ready with partial contents.
    CloneCancel {
        target: String,
    },
    MirrorEstablish {
        standard: String,
        bcv: String,
        mode: MirrorMode,
        /// Sync mirrors only: a host write fails when the BCV does not answer, instead of
        /// the mirror being suspended (SRDF's domino mode).
        strict: bool,
        /// How long the BCV's node may take to answer before the mirror is suspended (or,
        /// strict, the write fails); `None` is [`TARGET_TIMEOUT_MILLISECONDS_DEFAULT`].
        target_timeout_milliseconds: Option<u64>,
    },
    MirrorSplit {
        bcv: String,
        differential: bool,
    },
    MirrorReestablish {
        bcv: String,
    },
    MirrorRestore {
        bcv: String,
        incremental: bool,
    },
    MirrorCancel {
        bcv: String,
    },
    MirrorRotate {
        standard: String,
    },
    /// Changes a session's copy rate limit while it runs; `None` restores the default.
    SetRate {
        target: String,
        mebibytes_per_second: Option<u32>,
    },
}

impl SessionCommand {
    /// The command's name as the seeds and the CLI call it.
    pub fn name(&self) -> &'static str {
        match self {
            SessionCommand::CloneCreate { .. } => "clone create",
            SessionCommand::ClonePrecopy { .. } => "clone precopy",
            SessionCommand::CloneActivate { .. } => "clone activate",
            SessionCommand::CloneTerminate { .. } => "clone terminate",
            SessionCommand::CloneCancel { .. } => "clone cancel",
            SessionCommand::MirrorEstablish { .. } => "mirror establish",
            SessionCommand::MirrorSplit { .. } => "mirror split",
            SessionCommand::MirrorReestablish { .. } => "mirror reestablish",
            SessionCommand::MirrorRestore { .. } => "mirror restore",
            SessionCommand::MirrorCancel { .. } => "mirror cancel",
            SessionCommand::MirrorRotate { .. } => "mirror rotate",
            SessionCommand::SetRate { .. } => "set rate",
        }
    }

    /// The target volume the command names, if it names one (a rotation names its
    /// standard only).
    pub fn target(&self) -> Option<&str> {
        match self {
            SessionCommand::CloneCreate { target, .. }
            | SessionCommand::ClonePrecopy { target }
            | SessionCommand::CloneActivate { target }
            | SessionCommand::CloneTerminate { target }
            | SessionCommand::CloneCancel { target }
            | SessionCommand::SetRate { target, .. } => Some(target),
            SessionCommand::MirrorEstablish { bcv, .. }
            | SessionCommand::MirrorSplit { bcv, .. }
            | SessionCommand::MirrorReestablish { bcv }
            | SessionCommand::MirrorRestore { bcv, .. }
            | SessionCommand::MirrorCancel { bcv } => Some(bcv),
            SessionCommand::MirrorRotate { .. } => None,
        }
    }

    /// The volume the command's session is known by: its target, or for a rotation the
    /// standard (whose split BCV the node picks).
    pub fn session_key(&self) -> &str {
        match self {
            SessionCommand::MirrorRotate { standard } => standard,
            _ => self.target().unwrap_or_default(),
        }
    }
}

/// Which command a session receives, without its arguments: the input of [`next_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Precopy,
    Activate,
    Terminate,
    Establish,
    Split,
    Reestablish,
    Restore,
    Cancel,
    /// The session's copy finished (no pending track is left).
    CopyDone,
    /// The session's remote target did not answer within the target timeout.
    Suspend,
    /// The target of a suspended session answers again; the state it was suspended in.
    Resume(SessionState),
}

/// The reason a split of a suspended mirror is refused, offering the way out.
pub const SPLIT_SUSPENDED_REASON: &str = "the mirror is suspended: its BCV's node does not answer, so the BCV lacks the writes made since and cannot take the standard's image; wait until the mirror resumes by itself and synchronizes, or end it with `tandem mirror cancel` (the BCV keeps its older image and stays not-ready)";

/// Where a session goes on a transition, or why it may not: the seeds' error checks.
/// `None` as the result of `Terminate` or `Cancel` means the session ends.
pub fn next_state(
    kind: SessionKind,
    state: SessionState,
    transition: Transition,
) -> Result<Option<SessionState>, String> {
    use SessionState as S;
    use Transition as T;
    match (kind, transition, state) {
        // Losing the target: only states whose copy runs towards the target suspend. A
        // restore is not suspended: the standard depends on the BCV for the tracks it has
        // not brought back yet.
        (SessionKind::Mirror, T::Suspend, S::Syncing | S::Synchronized)
        | (SessionKind::Clone, T::Suspend, S::Precopying | S::Active) => Ok(Some(S::Suspended)),
        (_, T::Suspend, S::Suspended) => Err(format!("the {kind} is already suspended")),
        (_, T::Suspend, _) => Err(format!(
            "a {kind} that is {state} does not depend on its target answering"
        )),
        // A mirror resynchronizes what hosts wrote meanwhile and is synchronized again; a
        // clone goes on where it was.
        (SessionKind::Mirror, T::Resume(S::Syncing | S::Synchronized), S::Suspended) => {
            Ok(Some(S::Syncing))
        }
        (SessionKind::Clone, T::Resume(resumed @ (S::Precopying | S::Active)), S::Suspended) => {
            Ok(Some(resumed))
        }
        (_, T::Resume(resumed), S::Suspended) => Err(format!(
            "a {kind} is never suspended while {resumed}, so it cannot resume to it"
        )),
        (_, T::Resume(_), _) => Err(format!("the {kind} is {state}, not suspended")),
        (SessionKind::Mirror, T::Split, S::Suspended) => Err(SPLIT_SUSPENDED_REASON.to_string()),
        (SessionKind::Clone, T::Precopy | T::Activate, S::Suspended) => Err(
            "the clone is suspended: its destination's node does not answer; it resumes by itself when that node answers again".to_string(),
        ),
        (SessionKind::Clone, T::Terminate | T::Cancel, S::Suspended) => Err(
            "the clone is suspended: its destination's node does not answer; wait until it resumes by itself (see `tandem clone show`)".to_string(),
        ),
        (SessionKind::Clone, T::Precopy, S::Created) => Ok(Some(S::Precopying)),
        (SessionKind::Clone, T::Precopy, S::Precopying) => {
            Err("the precopy is already running".to_string())
        }
        (SessionKind::Clone, T::Precopy, _) => {
            Err("the clone is already active: a precopy only runs before activation".to_string())
        }
        (SessionKind::Clone, T::Activate, S::Created | S::Precopying) => Ok(Some(S::Active)),
        (SessionKind::Clone, T::Activate, _) => {
            Err("the clone is already active (activate it only once)".to_string())
        }
        (SessionKind::Clone, T::Terminate, S::Copied) => Ok(None),
        (SessionKind::Clone, T::Terminate, S::Active) => Err(
            "the clone is still copying: terminate is allowed once every track is copied (use --wait on activate, or `tandem clone show`)"
                .to_string(),
        ),
        (SessionKind::Clone, T::Terminate, _) => Err(
            "the clone was never activated: activate it and let it copy before terminating"
                .to_string(),
        ),
        // A clone that was never activated can be undone: its destination was never given
        // to hosts. Once activated, the destination is the point-in-time image in use.
        (SessionKind::Clone, T::Cancel, S::Created | S::Precopying) => Ok(None),
        (SessionKind::Clone, T::Cancel, S::Active) => Err(
            "the clone is active: its destination is already the point-in-time image its hosts use, so it cannot be undone; terminate it once the copy completes (see `tandem clone show`)"
                .to_string(),
        ),
        (SessionKind::Clone, T::Cancel, _) => Err(
            "every track is copied and the destination holds the complete image: end the session with `tandem clone terminate`"
                .to_string(),
        ),
        (SessionKind::Clone, T::CopyDone, S::Active) => Ok(Some(S::Copied)),
        (SessionKind::Clone, T::CopyDone, state) => Ok(Some(state)),
        (SessionKind::Mirror, T::Establish, S::Split) => Ok(Some(S::Syncing)),
        (SessionKind::Mirror, T::Establish, _) => Err(
            "the mirror is already established; split it first to establish again".to_string(),
        ),
        (SessionKind::Mirror, T::Split, S::Synchronized) => Ok(Some(S::Split)),
        (SessionKind::Mirror, T::Split, S::Split) => Err("the mirror is already split".to_string()),
        (SessionKind::Mirror, T::Split, _) => Err(format!(
            "the mirror is {state}, not synchronized: wait until it is synchronized, then split"
        )),
        (SessionKind::Mirror, T::Reestablish, S::Split) => Ok(Some(S::Syncing)),
        (SessionKind::Mirror, T::Reestablish, _) => Err(format!(
            "the mirror is {state}: only a split mirror can be reestablished"
        )),
        (SessionKind::Mirror, T::Restore, S::Split) => Ok(Some(S::Restoring)),
        (SessionKind::Mirror, T::Restore, _) => Err(format!(
            "the mirror is {state}: restore needs a split BCV holding a complete image"
        )),
        (SessionKind::Mirror, T::Cancel, S::Restoring) => Err(
            "the standard is being restored from this BCV; cancelling now would leave it half restored: wait for the restore to finish"
                .to_string(),
        ),
        (SessionKind::Mirror, T::Cancel, _) => Ok(None),
        (SessionKind::Mirror, T::CopyDone, S::Syncing | S::Restoring) => Ok(Some(S::Synchronized)),
        (SessionKind::Mirror, T::CopyDone, state) => Ok(Some(state)),
        (SessionKind::Clone, _, _) => Err("that is a mirror command; this is a clone".to_string()),
        (SessionKind::Mirror, _, _) => Err("that is a clone command; this is a mirror".to_string()),
    }
}

/// What `clone list|show` and `mirror list|show` report of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub kind: SessionKind,
    /// Clone: the source; mirror: the standard volume.
    pub source: String,
    /// Clone: the destination; mirror: the BCV.
    pub target: String,
    pub state: SessionState,
    pub mode: Option<MirrorMode>,
    /// The source's session slots this session holds.
    pub slots: Vec<u8>,
    pub extents: Vec<Extent>,
    /// One reading of the current copy: its tracks (fixed when the copy starts; it only
    /// grows when host writes add more work than it had), those no longer to move
    /// (`tracks_total - tracks_remaining`) and those still to move (the bits now).
    pub tracks_total: u64,
    pub tracks_copied: u64,
    pub tracks_remaining: u64,
    /// Never decreases within a copy (when host writes re-queue tracks it holds the
    /// highest value reached); 100 exactly when no track remains, at most
    /// [`PERCENT_UNFINISHED_MAX`] otherwise.
    pub percent: f64,
    /// The recent copy rate: bytes moved over the last [`RATE_WINDOW_SECONDS`].
    pub rate_bytes_per_second: u64,
    pub eta_seconds: Option<u64>,
    /// The copy rate limit, when one is set for the session.
    pub rate_limit_mebibytes_per_second: Option<u32>,
    /// Tracks copied by the last completed pass or command (seed 001's example counts them).
    pub tracks_copied_last: u64,
    /// Async mirrors: changed tracks not yet on the BCV, and the age of the oldest.
    pub lag_tracks: u64,
    pub lag_seconds: u64,
    /// The problem the copy has now (it retries): set by a failed copy step, cleared as
    /// soon as a step makes progress again or a command changes the session.
    pub error: Option<String>,
    pub created_unix_seconds: u64,
    /// Mirrors: the order of their last split (rotate re-uses the oldest).
    pub split_sequence: u64,
    /// The most recent error the copy met, with its time; kept after it recovered.
    pub last_error: Option<PastError>,
    /// Sync mirrors established with `--strict`: writes fail rather than diverge.
    #[serde(default)]
    pub strict: bool,
    /// How long the target may take to answer before the session is suspended.
    #[serde(default)]
    pub target_timeout_milliseconds: u64,
}

/// An error a session met, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PastError {
    pub message: String,
    pub unix_seconds: u64,
}

/// Highest percent reported while tracks remain: 100 means done, and only done.
pub const PERCENT_UNFINISHED_MAX: f64 = 99.9;
/// The window over which a session's rate is measured.
pub const RATE_WINDOW_SECONDS: u64 = 10;

/// The percent of a copy with these counts: 100 when nothing remains, otherwise the
/// fraction copied, at most [`PERCENT_UNFINISHED_MAX`] (a rounded 100 would say done).
pub fn copy_percent(tracks_copied: u64, tracks_remaining: u64) -> f64 {
    if tracks_remaining == 0 {
        return 100.0;
    }
    let total = tracks_copied.saturating_add(tracks_remaining) as f64;
    (tracks_copied as f64 * 100.0 / total).min(PERCENT_UNFINISHED_MAX)
}

/// The percent of a copy as a stale checkpoint of it says (the catalog's, when the node
/// does not answer): a copy recorded as still running is not said to be done, whatever
/// its counts were then.
pub fn checkpoint_percent(state: SessionState, tracks_copied: u64, tracks_remaining: u64) -> f64 {
    let percent = copy_percent(tracks_copied, tracks_remaining);
    if state.is_resting() {
        percent
    } else {
        percent.min(PERCENT_UNFINISHED_MAX)
    }
}

/// One track in flight between nodes: its bytes and a CRC-32C per 4 KiB block, computed
/// from the source's verified read and checked by the target before it stores the track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackImage {
    pub track: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub checksums: Vec<u32>,
}

/// What a session's source node asks of the node holding the session's target volume,
/// and (`PullTrack`, `Pulled`) what a clone destination's node asks back of the source's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetOperation {
    /// Take the volume as the target of `session` (the seed's descriptor "with the target
    /// too"): it is refused when the volume already is another session's target. The
    /// source node's name and address let a clone destination pull tracks back.
    Register {
        session: SessionId,
        kind: SessionKind,
        source_node: String,
        source_address: String,
        source: String,
        volume: String,
    },
    /// Mark tracks of the target invalid (seed 001's IND: a clone destination does not
    /// hold them yet).
    MarkInvalid {
        session: SessionId,
        extents: Vec<Extent>,
    },
    /// Sent by a clone destination's node to the source's: the source's point-in-time
    /// image of a track the destination's host accesses before the copier brought it
    /// (copy on first access). Answered with the track, or `NothingToPull` when the
    /// destination already got it.
    PullTrack {
        session: SessionId,
        track: u64,
    },
    /// Sent by a clone destination's node once pulled tracks are stored durably: the
    /// source clears their bits so the copier does not send them again.
    Pulled {
        session: SessionId,
        tracks: Vec<u64>,
    },
    /// Whether the target's node answers and still holds the session's registration:
    /// the source of a suspended session asks this until it answers `Done`.
    Probe {
        session: SessionId,
    },
    /// End the session on the target, in one write: host writes stop being tracked (and
    /// the tracks they changed are forgotten),
    /// `clear_invalid` stops being invalid (a cancelled clone's tracks, no longer owed by
    /// any source, so no later session mistakes them for a clone's missing ones), the
    /// volume gets `readiness` when there is one, and the registration goes. One
    /// operation, so a release whose answer was lost can be sent again: a target that
    /// no longer holds the session answers `Done`, having done all of it already.
    Release {
        session: SessionId,
        clear_invalid: Vec<Extent>,
        readiness: Option<crate::messages::Readiness>,
    },
    /// Store a track; with `only_if_invalid`, only while the track is still invalid (a host
    /// may have written it since). Clears the track's invalid bit. Answers whether stored.
    PutTrack {
        session: SessionId,
        image: TrackImage,
        only_if_invalid: bool,
        synced: bool,
        /// Sent by a background copy, which the target stores at low priority; `false`
        /// when a host write or a command waits for the answer.
        background: bool,
    },
    /// Read a track (a restore brings the BCV's tracks back).
    GetTrack {
        session: SessionId,
        track: u64,
    },
    SetReadiness {
        session: SessionId,
        readiness: crate::messages::Readiness,
    },
    /// Turn tracking of host writes (target-changed bits) on or off. Turning it on clears
    /// the bits; turning it off keeps them, so the source can read them again when the
    /// command that turned it off has to be retried (its answer lost).
    TrackChanges {
        session: SessionId,
        tracking: bool,
    },
    /// The tracks hosts changed since the split.
    ChangedTracks {
        session: SessionId,
    },
    /// The source has taken over the tracks the target's hosts changed (a re-establish
    /// or restore is committed): clear them. Sent after the source's commit, so that a
    /// command whose answer was lost reads them again when it is retried.
    ForgetChanges {
        session: SessionId,
    },
    CountInvalid {
        session: SessionId,
    },
    /// A split of the session: mark the target's own downstream mirrors (a cascade below
    /// the BCV) changed on these tracks, or on every track when `None`.
    MarkDownstream {
        session: SessionId,
        tracks: Option<Vec<u64>>,
    },
}

impl TargetOperation {
    /// The release of a session's target that changes nothing else of the volume: a
    /// session that failed to begin, or one cancelled while its target did not answer
    /// (the volume stays not ready: it lacks the writes since).
    pub fn release(session: SessionId) -> TargetOperation {
        TargetOperation::Release {
            session,
            clear_invalid: Vec::new(),
            readiness: None,
        }
    }
}

/// Where a session's target lives when it is not on the source's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteVolume {
    pub node: String,
    pub address: String,
    pub volume: String,
}

/// The target node's answer to a [`TargetOperation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetAnswer {
    Done,
    Stored(bool),
    Track(TrackImage),
    Tracks(Vec<u64>),
    Count(u64),
    /// The source no longer owes the destination this track.
    NothingToPull,
    /// The volume's geometry, answered to `Register`.
    Registered {
        track_size_bytes: u32,
        track_count: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_whose_target_stops_answering_suspends_and_resumes_by_the_table() {
        use SessionKind::{Clone, Mirror};
        use SessionState as S;
        use Transition as T;
        for (kind, state) in [
            (Mirror, S::Syncing),
            (Mirror, S::Synchronized),
            (Clone, S::Precopying),
            (Clone, S::Active),
        ] {
            assert_eq!(next_state(kind, state, T::Suspend), Ok(Some(S::Suspended)));
        }
        // A restore depends on the BCV; resting sessions without a copy do not suspend.
        for (kind, state) in [
            (Mirror, S::Restoring),
            (Mirror, S::Split),
            (Clone, S::Created),
            (Clone, S::Copied),
            (Mirror, S::Suspended),
        ] {
            assert!(
                next_state(kind, state, T::Suspend).is_err(),
                "{kind} {state}"
            );
        }
        // A mirror resynchronizes first, whatever it was; a clone goes on as it was.
        assert_eq!(
            next_state(Mirror, S::Suspended, T::Resume(S::Synchronized)),
            Ok(Some(S::Syncing))
        );
        assert_eq!(
            next_state(Mirror, S::Suspended, T::Resume(S::Syncing)),
            Ok(Some(S::Syncing))
        );
        assert_eq!(
            next_state(Clone, S::Suspended, T::Resume(S::Active)),
            Ok(Some(S::Active))
        );
        assert_eq!(
            next_state(Clone, S::Suspended, T::Resume(S::Precopying)),
            Ok(Some(S::Precopying))
        );
        assert!(next_state(Mirror, S::Suspended, T::Resume(S::Split)).is_err());
        assert!(next_state(Mirror, S::Synchronized, T::Resume(S::Synchronized)).is_err());
        // Commands: a suspended mirror can be cancelled, not split (the refusal says why
        // and offers cancel), and nothing else moves it.
        assert_eq!(next_state(Mirror, S::Suspended, T::Cancel), Ok(None));
        let split = next_state(Mirror, S::Suspended, T::Split).unwrap_err();
        assert!(split.contains("does not answer"), "{split}");
        assert!(split.contains("tandem mirror cancel"), "{split}");
        for transition in [T::Establish, T::Reestablish, T::Restore] {
            assert!(next_state(Mirror, S::Suspended, transition).is_err());
        }
        assert_eq!(
            next_state(Mirror, S::Suspended, T::CopyDone),
            Ok(Some(S::Suspended))
        );
        for transition in [T::Precopy, T::Activate, T::Terminate, T::Cancel] {
            assert!(next_state(Clone, S::Suspended, transition).is_err());
        }
        assert!(!S::Suspended.is_resting(), "it ends by itself");
        assert_eq!(S::Suspended.to_string(), "suspended");
    }

    #[test]
    fn a_percent_is_100_only_when_no_track_remains() {
        assert_eq!(copy_percent(0, 0), 100.0);
        assert_eq!(copy_percent(1024, 0), 100.0);
        assert_eq!(copy_percent(512, 512), 50.0);
        assert_eq!(copy_percent(100_000, 1), PERCENT_UNFINISHED_MAX);
        assert_eq!(copy_percent(0, 7), 0.0);
    }

    #[test]
    fn a_checkpoint_of_a_running_copy_never_says_100() {
        // A rotate's checkpoint taken before the copy counted anything: 0 of 0 tracks.
        assert_eq!(
            checkpoint_percent(SessionState::Syncing, 0, 0),
            PERCENT_UNFINISHED_MAX
        );
        assert_eq!(
            checkpoint_percent(SessionState::Active, 1024, 0),
            PERCENT_UNFINISHED_MAX
        );
        assert_eq!(checkpoint_percent(SessionState::Active, 256, 768), 25.0);
        assert_eq!(checkpoint_percent(SessionState::Copied, 1024, 0), 100.0);
        assert_eq!(checkpoint_percent(SessionState::Split, 0, 0), 100.0);
        assert_eq!(
            checkpoint_percent(SessionState::Synchronized, 100, 4),
            100.0 * 100.0 / 104.0
        );
    }
}
