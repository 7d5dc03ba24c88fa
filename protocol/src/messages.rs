//! Requests and responses exchanged over QUIC between the CLI and nodes.
//!
//! Every request travels in its own bidirectional stream: one request frame in, one
//! response frame out. The types carry no behaviour; nodes decide what they mean.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Volume names are short, printable, and safe to use as NBD export names and file names.
pub const VOLUME_NAME_BYTES_MAX: usize = 128;
pub const TRACK_BYTES_MIN: u32 = 4 << 10;
pub const TRACK_BYTES_MAX: u32 = 1 << 20;
/// Largest volume a node accepts: 256 TiB.
pub const VOLUME_BYTES_MAX: u64 = 256 << 40;

/// Whether a volume of this geometry can exist; the reason when it cannot. The catalog
/// and the node apply the same rule, so the catalog never records a volume a node refuses
/// for its shape.
pub fn check_geometry(size_bytes: u64, track_size_bytes: u32) -> Result<(), String> {
    if !track_size_bytes.is_power_of_two()
        || !(TRACK_BYTES_MIN..=TRACK_BYTES_MAX).contains(&track_size_bytes)
    {
        return Err(format!(
            "track size {track_size_bytes} bytes must be a power of two from 4 KiB to 1 MiB"
        ));
    }
    if size_bytes == 0 {
        return Err("size must be greater than zero".to_string());
    }
    if size_bytes > VOLUME_BYTES_MAX {
        return Err(format!(
            "size {size_bytes} bytes exceeds the limit of {VOLUME_BYTES_MAX} bytes"
        ));
    }
    if !size_bytes.is_multiple_of(u64::from(track_size_bytes)) {
        return Err(format!(
            "size {size_bytes} bytes is not a multiple of the track size {track_size_bytes} bytes"
        ));
    }
    Ok(())
}

/// How a volume may be used by its hosts, as the seeds switch it with session states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Readiness {
    /// Hosts may read and write.
    Ready,
    /// Hosts may read; writes are refused with EPERM.
    ReadOnly,
    /// Hosts may not use the volume at all; it is not offered as an export.
    NotReady,
}

impl fmt::Display for Readiness {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Readiness::Ready => "ready",
            Readiness::ReadOnly => "read-only",
            Readiness::NotReady => "not-ready",
        })
    }
}

impl FromStr for Readiness {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "ready" => Ok(Readiness::Ready),
            "read-only" => Ok(Readiness::ReadOnly),
            "not-ready" => Ok(Readiness::NotReady),
            other => Err(format!(
                "unknown readiness '{other}': use ready, read-only or not-ready"
            )),
        }
    }
}

/// An inclusive range of tracks, written `FIRST-LAST` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    pub first: u64,
    pub last: u64,
}

impl Extent {
    pub fn new(first: u64, last: u64) -> Result<Extent, String> {
        if first > last {
            return Err(format!(
                "extent {first}-{last} is backwards: the first track must not exceed the last"
            ));
        }
        Ok(Extent { first, last })
    }

    pub fn track_count(&self) -> u64 {
        self.last - self.first + 1
    }

    pub fn contains(&self, track: u64) -> bool {
        self.first <= track && track <= self.last
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}-{}", self.first, self.last)
    }
}

impl FromStr for Extent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (first, last),
            None => (text, text),
        };
        let parse = |part: &str| {
            part.trim().parse::<u64>().map_err(|_| {
                format!("extent '{text}' is not FIRST-LAST with track numbers, e.g. 0-99")
            })
        };
        Extent::new(parse(first)?, parse(last)?)
    }
}

/// What the cluster knows about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u64,
    pub size_bytes: u64,
    pub track_size_bytes: u32,
    pub track_count: u64,
    pub readiness: Readiness,
    /// Session slots in use (of the 16 a volume has).
    pub session_slots_used: u8,
    /// How many storage layers a read may walk: grows with snapshots.
    pub layer_depth: u32,
    /// Node-local creation time, seconds since the Unix epoch.
    pub created_unix_seconds: u64,
}

/// A request from the CLI (or another node) to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    VolumeCreate {
        name: String,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    VolumeList,
    VolumeShow {
        name: String,
    },
    VolumeDelete {
        name: String,
    },
    VolumeSetReadiness {
        name: String,
        readiness: Readiness,
    },
    /// A pointer snapshot of `source` into `target` (created when it does not exist),
    /// limited to `extents` when any are given. Carried out at most once per request id:
    /// a retry under the same id is answered with the first answer (the image of the
    /// first instant), not snapped again.
    Snap {
        request_id: crate::cluster::RequestId,
        source: String,
        target: String,
        extents: Vec<Extent>,
        /// Replace the data of an existing target that is not a snapshot of `source`;
        /// without it such a snap is refused.
        overwrite: bool,
    },
    NodeStatus,
    /// A command for the cluster. A node that is no member passes it to a member; a member
    /// that is not the leader passes it to the leader. `hops` counts the passes so far; a
    /// request is passed on at most [`crate::cluster::CLUSTER_REQUEST_HOPS_MAX`] times, so
    /// no configuration can make it circle.
    Cluster {
        request: crate::cluster::ClusterRequest,
        hops: u8,
    },
    /// A node's registration and heartbeat, sent by the node itself (`hops` 0, from the
    /// certificate of the node it reports on) to a member, which passes it to the leader.
    Heartbeat {
        report: crate::cluster::NodeReport,
        hops: u8,
    },
    /// A Raft message between members, encoded by the control plane.
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A copy-session command for volumes of the node that receives it. `request_id` is
    /// the id of the cluster request the leader carries out: the node remembers the answer
    /// it gave to each id and answers a retry with it, without carrying the command out
    /// again (a leader that died before committing is followed by one that asks again).
    Session {
        request_id: crate::cluster::RequestId,
        command: crate::session::SessionCommand,
    },
    /// The answer the node gave to the session command with this request id, if it carried
    /// one out and still remembers it; `not-found` otherwise. Changes nothing.
    SessionAnswer {
        request_id: crate::cluster::RequestId,
    },
    /// The node's sessions, of one kind or all.
    SessionList {
        kind: Option<crate::session::SessionKind>,
    },
    /// One session, by its target (a clone's destination, a mirror's BCV).
    SessionShow {
        kind: crate::session::SessionKind,
        target: String,
    },
    /// From a session's source node to the node holding its target volume.
    Target {
        operation: crate::session::TargetOperation,
    },
    /// Sets (or with the default rule, clears) fault injection towards one peer, by node
    /// name: it applies to every call between the two nodes (Raft, cluster requests and
    /// heartbeats, the leader's node calls, copy traffic).
    SetFault {
        peer: String,
        rule: crate::cluster::FaultRule,
    },
    /// The NBD clients that have a volume open now (read-only; asked before a delete).
    VolumeClients {
        name: String,
    },
    /// Digests of `extents` of a volume (all of it when empty) from the node's own stored
    /// bytes, a digest per `group_tracks` tracks in order (a gsnap's verification; from
    /// the control plane's leader only). Reads, changes nothing.
    Digest {
        volume: String,
        extents: Vec<Extent>,
        group_tracks: u64,
    },
    /// [`Request::Snap`] with `source`'s `extents` landing, in order, on `target`'s
    /// `target_extents`, and a target the snap makes `target_size_bytes` large (default:
    /// the source's size). Carried out at most once per request id, as a snap.
    SnapAt {
        request_id: crate::cluster::RequestId,
        source: String,
        target: String,
        extents: Vec<Extent>,
        target_extents: Vec<Extent>,
        overwrite: bool,
        target_size_bytes: Option<u64>,
    },
    /// Sends `tracks` of the clone session whose destination is `target` again, from the
    /// session's source on this node (a gsnap's verification found them differing; from
    /// the control plane's leader only). Storing the same image twice changes nothing, so
    /// a retry needs no request id.
    Resend {
        target: String,
        tracks: Vec<u64>,
    },
    /// [`Request::SnapAt`] that also rotates the source's lineage `lineage` in the snap's
    /// own write, under the source's write lock: the tracks written before the snap are
    /// in the frozen slot, those after it in the new live one (a gsnap's snap of P).
    /// Carried out at most once per request id.
    SnapLineage {
        request_id: crate::cluster::RequestId,
        source: String,
        target: String,
        extents: Vec<Extent>,
        target_extents: Vec<Extent>,
        overwrite: bool,
        target_size_bytes: Option<u64>,
        lineage: String,
    },
    /// A lineage step on `volume` (see [`crate::gsnap::LineageStep`]); carried out at
    /// most once per request id. From the control plane's leader only.
    Lineage {
        request_id: crate::cluster::RequestId,
        volume: String,
        lineage: String,
        step: crate::gsnap::LineageStep,
    },
    /// The tracks of `volume`'s lineage frozen by its last rotation. Reads, changes nothing.
    LineageTracks {
        volume: String,
        lineage: String,
    },
    /// [`Request::VolumeCreate`] carried out at most once per request id: the control
    /// plane's leader calls it under the id of the volume's intent, and a repeat is
    /// answered with the first answer (appended).
    VolumeCreateOnce {
        request_id: crate::cluster::RequestId,
        name: String,
        size_bytes: u64,
        track_size_bytes: u32,
    },
    /// [`Request::VolumeDelete`] carried out at most once per request id (appended).
    VolumeDeleteOnce {
        request_id: crate::cluster::RequestId,
        name: String,
    },
}

/// Status of the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub site: String,
    pub nbd_address: String,
    pub volume_count: u64,
    pub version: String,
}

/// Why a request failed, in a form scripts can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    IllegalState,
    LimitExceeded,
    Internal,
    /// The cluster cannot answer now (no leader, a node unreachable); retrying may succeed.
    Unavailable,
    /// The caller's certificate does not allow this request.
    Forbidden,
    /// No control plane exists yet: the member asked (and every configured member) was
    /// never initialized. Retrying cannot help until `tandem cluster init` runs.
    NotInitialized,
    /// The node asked was removed from the control plane and no longer serves as a member.
    NotMember,
    /// A copy's digests differ from its source's after every re-send allowed.
    DigestMismatch,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ErrorCode::NotFound => "not-found",
            ErrorCode::AlreadyExists => "already-exists",
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::IllegalState => "illegal-state",
            ErrorCode::LimitExceeded => "limit-exceeded",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotInitialized => "not-initialized",
            ErrorCode::NotMember => "not-member",
            ErrorCode::DigestMismatch => "digest-mismatch",
        })
    }
}

/// A node's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Deleted {
        name: String,
    },
    Snapped {
        source: String,
        target: String,
        extents: Vec<Extent>,
        elapsed_micros: u64,
        target_info: VolumeInfo,
    },
    NodeStatus(NodeStatus),
    Cluster(crate::cluster::ClusterResponse),
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A session after a command (`None`: the command ended it), or as shown.
    Session(Option<crate::session::SessionInfo>),
    Sessions(Vec<crate::session::SessionInfo>),
    Target(crate::session::TargetAnswer),
    /// The addresses of the NBD clients that have `name` open.
    VolumeClients {
        name: String,
        clients: Vec<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Digests(crate::gsnap::TrackDigests),
    /// Tracks sent again, and their bytes.
    Resent {
        tracks: u64,
        bytes: u64,
    },
    /// A lineage step was carried out (or had been): the volume as it is now.
    Lineage(VolumeInfo),
    LineageTracks(crate::gsnap::LineageTracks),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_parse_from_the_command_line_form() {
        assert_eq!(
            "3-9".parse::<Extent>().unwrap(),
            Extent { first: 3, last: 9 }
        );
        assert_eq!("7".parse::<Extent>().unwrap(), Extent { first: 7, last: 7 });
        assert!("9-3".parse::<Extent>().is_err());
        assert!("a-3".parse::<Extent>().is_err());
        assert!("".parse::<Extent>().is_err());
    }

    #[test]
    fn readiness_round_trips_through_its_text() {
        for readiness in [Readiness::Ready, Readiness::ReadOnly, Readiness::NotReady] {
            assert_eq!(
                readiness.to_string().parse::<Readiness>().unwrap(),
                readiness
            );
        }
        assert!("online".parse::<Readiness>().is_err());
    }
}
