//! The one error type of the node crate. Variants carry the ids involved so that a log
//! line or a CLI message says exactly what failed.

use protocol::messages::{ErrorCode, Extent};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stopped at fail point {name} (a crash test set it)")]
    FailPoint { name: String },
    #[error("volume '{name}' does not exist (see `tandem volume list`)")]
    VolumeNotFound { name: String },
    #[error("volume '{name}' already exists; pick another name or delete it first")]
    VolumeExists { name: String },
    #[error("volume name '{name}' is not allowed: {reason}")]
    VolumeNameInvalid { name: String, reason: String },
    #[error("volume '{name}': {reason}")]
    VolumeSizeInvalid { name: String, reason: String },
    #[error("volume {volume} was deleted while in use")]
    VolumeDeleted { volume: u64 },
    #[error("volume {volume}: offset {offset} and length {length} must be multiples of 512 bytes")]
    Unaligned {
        volume: u64,
        offset: u64,
        length: u64,
    },
    #[error(
        "volume {volume}: bytes {offset}..{offset}+{length} are beyond its end at {size_bytes}"
    )]
    OutOfRange {
        volume: u64,
        offset: u64,
        length: u64,
        size_bytes: u64,
    },
    #[error("volume {volume} track {track}: stored block fails verification ({detail}); refusing to serve it")]
    Corrupt {
        volume: u64,
        track: u64,
        detail: String,
    },
    #[error("extent {extent} does not fit volume '{name}', which has tracks 0-{last_track}")]
    ExtentOutOfRange {
        name: String,
        extent: Extent,
        last_track: u64,
    },
    #[error(
        "volume '{name}' has no free session slot: all {slots_max} are in use; end a session first"
    )]
    SessionSlotsExhausted { name: String, slots_max: usize },
    #[error("a digest of volume '{volume}' in groups of {group_tracks} tracks would hold {groups} groups, more than {groups_max}: ask for larger groups")]
    DigestTooLarge {
        volume: String,
        group_tracks: u64,
        groups: u64,
        groups_max: u64,
    },
    #[error("volume '{name}' session slot {slot} is not allocated")]
    SessionSlotNotAllocated { name: String, slot: u8 },
    #[error("cannot snap '{source_name}' to '{target}': {reason}")]
    SnapRefused {
        source_name: String,
        target: String,
        reason: String,
    },
    #[error("volume '{target}' already exists: it is {what}; a snap of '{source_name}' would replace its data: pass --overwrite to replace it, or snap to a new name (a snap creates its target)")]
    SnapTargetExists {
        source_name: String,
        target: String,
        what: String,
    },
    #[error("volume '{name}' would reference {references} layers, more than the {references_max} allowed; copy it to a fresh volume instead")]
    TooManyLayers {
        name: String,
        references: usize,
        references_max: usize,
    },
    #[error("volume '{name}' is {readiness} to hosts now (a copy session changed it)")]
    VolumeNotReady {
        name: String,
        readiness: protocol::messages::Readiness,
    },
    #[error("volume '{name}' takes part in a copy session and cannot be {what}; end the session first (`tandem clone terminate` or `tandem mirror cancel`)")]
    VolumeInSession { name: String, what: String },
    #[error("volume {volume} track {track}: copy refused: {detail}")]
    CopyRejected {
        volume: u64,
        track: u64,
        detail: String,
    },
    #[error("{command} refused for {session}: {reason}")]
    SessionRefused {
        command: String,
        session: String,
        reason: String,
    },
    #[error("no {kind} session has '{volume}' as its {role} (see `tandem {kind} list`)")]
    SessionNotFound {
        kind: String,
        volume: String,
        role: String,
    },
    #[error("request {request_id} was a {first} and cannot be reused for a {now}; send a new request id")]
    RequestReused {
        request_id: String,
        first: String,
        now: String,
    },
    #[error("no session command with request id {request_id} was carried out here, or it is no longer remembered")]
    SessionRequestUnknown { request_id: String },
    #[error("node {node}: {detail}")]
    Remote { node: String, detail: String },
    #[error("node {node} holding '{volume}' did not answer within {timeout_milliseconds} ms")]
    TargetUnanswered {
        node: String,
        volume: String,
        timeout_milliseconds: u64,
    },
    #[error("storage engine: {detail}")]
    Engine { detail: String },
    #[error("stored metadata for {what} is unreadable: {detail}")]
    Metadata { what: String, detail: String },
    #[error("configuration: {detail}")]
    Config { detail: String },
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error("control plane: {0}")]
    ControlPlane(#[from] control_plane::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The code a remote caller gets, so scripts can branch without parsing text.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::VolumeNotFound { .. }
            | Error::VolumeDeleted { .. }
            | Error::SessionNotFound { .. }
            | Error::SessionRequestUnknown { .. } => ErrorCode::NotFound,
            Error::SessionRefused { .. }
            | Error::VolumeNotReady { .. }
            | Error::VolumeInSession { .. } => ErrorCode::IllegalState,
            Error::VolumeExists { .. } | Error::SnapTargetExists { .. } => ErrorCode::AlreadyExists,
            Error::VolumeNameInvalid { .. }
            | Error::VolumeSizeInvalid { .. }
            | Error::Unaligned { .. }
            | Error::OutOfRange { .. }
            | Error::ExtentOutOfRange { .. }
            | Error::SessionSlotNotAllocated { .. }
            | Error::SnapRefused { .. }
            | Error::RequestReused { .. }
            | Error::Config { .. } => ErrorCode::InvalidArgument,
            Error::SessionSlotsExhausted { .. }
            | Error::TooManyLayers { .. }
            | Error::DigestTooLarge { .. } => ErrorCode::LimitExceeded,
            Error::Remote { .. } | Error::TargetUnanswered { .. } => ErrorCode::Unavailable,
            Error::Corrupt { .. }
            | Error::FailPoint { .. }
            | Error::CopyRejected { .. }
            | Error::Engine { .. }
            | Error::Metadata { .. }
            | Error::Protocol(_)
            | Error::ControlPlane(_)
            | Error::Io(_) => ErrorCode::Internal,
        }
    }
}
