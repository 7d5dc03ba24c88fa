//! How a session's record is stored: a format marker and version, then the record.
//!
//! Records written before issue 10 carry no marker; they counted the tracks a copy had
//! moved instead of its total and had no past error. They are still read: the session
//! then gets its total from that count and its bits (see `Sessions::open`). Records of
//! version 2 (issue 10) have no target timeout, strict flag or resume state; they are read
//! with the default timeout, not strict, and not suspended.

use super::core::Progress;
use super::SessionRecord;
use crate::{Error, Result};
use protocol::messages::Extent;
use protocol::session::{
    MirrorMode, PastError, RemoteVolume, SessionId, SessionKind, SessionState,
    TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
};
use serde::{Deserialize, Serialize};

/// The first byte of a versioned record. No unversioned record starts with it: those
/// start with the session id in bincode's variable-length encoding, which never begins
/// with 255 (bincode reserves it).
const RECORD_FORMAT_MARKER: u8 = 0xff;
/// The version of the record's layout after the marker.
const RECORD_FORMAT_VERSION: u8 = 3;
/// The layout of issue 10, before sessions could be suspended.
const RECORD_FORMAT_VERSION_WITHOUT_SUSPENSION: u8 = 2;

pub(super) fn encode(record: &SessionRecord) -> Result<Vec<u8>> {
    let mut bytes = vec![RECORD_FORMAT_MARKER, RECORD_FORMAT_VERSION];
    bytes.extend(protocol::codec::encode(record)?);
    Ok(bytes)
}

/// A stored record, and for a record of the first layout the tracks it had counted as
/// copied (from which its total is rebuilt).
pub(super) fn decode(bytes: &[u8]) -> Result<(SessionRecord, Option<u64>)> {
    match bytes {
        [RECORD_FORMAT_MARKER, RECORD_FORMAT_VERSION, rest @ ..] => {
            Ok((protocol::codec::decode(rest)?, None))
        }
        [RECORD_FORMAT_MARKER, RECORD_FORMAT_VERSION_WITHOUT_SUSPENSION, rest @ ..] => {
            let record: RecordWithoutSuspension = protocol::codec::decode(rest)?;
            Ok((record.into_record(), None))
        }
        [RECORD_FORMAT_MARKER, version, ..] => Err(Error::Metadata {
            what: "session record".to_string(),
            detail: format!(
                "stored in layout version {version}, which this build does not know (it reads {RECORD_FORMAT_VERSION}): run a newer tandem"
            ),
        }),
        _ => {
            let legacy: LegacyRecord = protocol::codec::decode(bytes)?;
            let copied = legacy.progress.copied;
            Ok((legacy.into_record(), Some(copied)))
        }
    }
}

/// The progress of a record of the first layout: tracks moved so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct LegacyProgress {
    copied: u64,
    reported_percent: f64,
}

/// The first layout of [`SessionRecord`], field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LegacyRecord {
    id: SessionId,
    kind: SessionKind,
    source: String,
    target: String,
    state: SessionState,
    mode: MirrorMode,
    slot: u8,
    precopy_slot: Option<u8>,
    extents: Vec<Extent>,
    created_unix_seconds: u64,
    split_sequence: u64,
    split_when_synchronized: bool,
    progress: LegacyProgress,
    tracks_copied_last: u64,
    rate_limit_mebibytes_per_second: Option<u32>,
    error: Option<String>,
    remote: Option<RemoteVolume>,
}

/// The layout of version 2 (issue 10), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RecordWithoutSuspension {
    id: SessionId,
    kind: SessionKind,
    source: String,
    target: String,
    state: SessionState,
    mode: MirrorMode,
    slot: u8,
    precopy_slot: Option<u8>,
    extents: Vec<Extent>,
    created_unix_seconds: u64,
    split_sequence: u64,
    split_when_synchronized: bool,
    progress: Progress,
    tracks_copied_last: u64,
    rate_limit_mebibytes_per_second: Option<u32>,
    error: Option<String>,
    remote: Option<RemoteVolume>,
    last_error: Option<PastError>,
}

impl RecordWithoutSuspension {
    fn into_record(self) -> SessionRecord {
        SessionRecord {
            id: self.id,
            kind: self.kind,
            source: self.source,
            target: self.target,
            state: self.state,
            mode: self.mode,
            slot: self.slot,
            precopy_slot: self.precopy_slot,
            extents: self.extents,
            created_unix_seconds: self.created_unix_seconds,
            split_sequence: self.split_sequence,
            split_when_synchronized: self.split_when_synchronized,
            progress: self.progress,
            tracks_copied_last: self.tracks_copied_last,
            rate_limit_mebibytes_per_second: self.rate_limit_mebibytes_per_second,
            error: self.error,
            remote: self.remote,
            last_error: self.last_error,
            strict: false,
            target_timeout_milliseconds: TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
            resume_state: None,
        }
    }
}

impl LegacyRecord {
    fn into_record(self) -> SessionRecord {
        SessionRecord {
            id: self.id,
            kind: self.kind,
            source: self.source,
            target: self.target,
            state: self.state,
            mode: self.mode,
            slot: self.slot,
            precopy_slot: self.precopy_slot,
            extents: self.extents,
            created_unix_seconds: self.created_unix_seconds,
            split_sequence: self.split_sequence,
            split_when_synchronized: self.split_when_synchronized,
            progress: Progress {
                tracks_total: 0,
                reported_percent: self.progress.reported_percent,
            },
            tracks_copied_last: self.tracks_copied_last,
            rate_limit_mebibytes_per_second: self.rate_limit_mebibytes_per_second,
            error: self.error,
            remote: self.remote,
            last_error: None,
            strict: false,
            target_timeout_milliseconds: TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
            resume_state: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy() -> LegacyRecord {
        LegacyRecord {
            id: 300,
            kind: SessionKind::Clone,
            source: "src".to_string(),
            target: "dst".to_string(),
            state: SessionState::Active,
            mode: MirrorMode::Sync,
            slot: 3,
            precopy_slot: Some(4),
            extents: vec![Extent {
                first: 0,
                last: 1023,
            }],
            created_unix_seconds: 1_700_000_000,
            split_sequence: 0,
            split_when_synchronized: false,
            progress: LegacyProgress {
                copied: 230,
                reported_percent: 22.5,
            },
            tracks_copied_last: 230,
            rate_limit_mebibytes_per_second: Some(2),
            error: None,
            remote: None,
        }
    }

    #[test]
    fn a_record_of_the_first_layout_is_still_read_with_its_count() {
        let bytes = protocol::codec::encode(&legacy()).unwrap();
        let (record, copied) = decode(&bytes).unwrap();
        assert_eq!(copied, Some(230));
        assert_eq!(record.id, 300);
        assert_eq!(record.precopy_slot, Some(4));
        assert_eq!(record.rate_limit_mebibytes_per_second, Some(2));
        assert_eq!(record.progress.reported_percent, 22.5);
    }

    #[test]
    fn a_record_round_trips_with_its_total_and_past_error() {
        let mut record = legacy().into_record();
        record.progress = Progress {
            tracks_total: 1024,
            reported_percent: 40.0,
        };
        record.last_error = Some(PastError {
            message: "node beta did not answer".to_string(),
            unix_seconds: 1_700_000_100,
        });
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[..2], [RECORD_FORMAT_MARKER, RECORD_FORMAT_VERSION]);
        assert_eq!(decode(&bytes).unwrap(), (record, None));
        let mut newer = bytes.clone();
        newer[1] = RECORD_FORMAT_VERSION + 1;
        assert!(decode(&newer).is_err());
    }

    #[test]
    fn a_record_of_version_2_is_read_with_the_default_timeout_and_a_suspended_one_round_trips() {
        let record = legacy().into_record();
        let old = RecordWithoutSuspension {
            id: record.id,
            kind: record.kind,
            source: record.source.clone(),
            target: record.target.clone(),
            state: SessionState::Synchronized,
            mode: MirrorMode::Sync,
            slot: record.slot,
            precopy_slot: None,
            extents: record.extents.clone(),
            created_unix_seconds: record.created_unix_seconds,
            split_sequence: 4,
            split_when_synchronized: false,
            progress: Progress {
                tracks_total: 1024,
                reported_percent: 100.0,
            },
            tracks_copied_last: 7,
            rate_limit_mebibytes_per_second: None,
            error: None,
            remote: None,
            last_error: None,
        };
        let mut bytes = vec![
            RECORD_FORMAT_MARKER,
            RECORD_FORMAT_VERSION_WITHOUT_SUSPENSION,
        ];
        bytes.extend(protocol::codec::encode(&old).unwrap());
        let (read, copied) = decode(&bytes).unwrap();
        assert_eq!(copied, None);
        assert_eq!(read.state, SessionState::Synchronized);
        assert_eq!(read.split_sequence, 4);
        assert_eq!(read.progress.tracks_total, 1024);
        assert_eq!(
            (
                read.strict,
                read.target_timeout_milliseconds,
                read.resume_state
            ),
            (false, TARGET_TIMEOUT_MILLISECONDS_DEFAULT, None)
        );
        let mut suspended = read;
        suspended.state = SessionState::Suspended;
        suspended.resume_state = Some(SessionState::Synchronized);
        suspended.strict = false;
        suspended.target_timeout_milliseconds = 500;
        let bytes = encode(&suspended).unwrap();
        assert_eq!(bytes[1], RECORD_FORMAT_VERSION);
        assert_eq!(decode(&bytes).unwrap(), (suspended, None));
    }
}
