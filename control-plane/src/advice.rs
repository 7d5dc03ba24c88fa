//! The words of refusals that tell the user what to do: pure functions from catalog
//! records (and, where time matters, a clock reading passed in) to sentences.

use protocol::cluster::SessionEntry;
use protocol::session::{SessionCommand, SessionKind};

/// What every command meets before `tandem cluster init` ran on any member.
pub const NOT_INITIALIZED_MESSAGE: &str =
    "the cluster has no control plane yet: run `tandem cluster init` against the first member";

/// A Unix time as a UTC date and time, e.g. `2026-12-06 03:15:25 UTC`.
pub fn format_utc(unix_seconds: u64) -> String {
    const SECONDS_PER_DAY: u64 = 86_400;
    let days = unix_seconds / SECONDS_PER_DAY;
    let second_of_day = unix_seconds % SECONDS_PER_DAY;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// "node X is down since T (N s ago)": the refusal of a command its node cannot carry out.
/// `since_unix_seconds` is `None` for a node marked down before the catalog kept the time.
pub fn node_down(node: &str, since_unix_seconds: Option<u64>, now_unix_seconds: u64) -> String {
    let since = match since_unix_seconds {
        Some(since) => format!(
            " since {} ({} s ago)",
            format_utc(since),
            now_unix_seconds.saturating_sub(since)
        ),
        None => String::new(),
    };
    format!(
        "node '{node}' is down{since}: it has not sent a heartbeat since then; start it again (or wait for it to return) and retry, `tandem status` shows the nodes' health"
    )
}

/// When a new session would take a volume that already is another session's target: what
/// that volume is and what to do, or `None` when the command is for the same pair (the
/// session's own transition rules decide then).
pub fn target_taken(command: &SessionCommand, existing: &SessionEntry) -> Option<String> {
    let (kind, source, role) = match command {
        SessionCommand::CloneCreate { source, .. } => (SessionKind::Clone, source, "destination"),
        SessionCommand::MirrorEstablish { standard, .. } => (SessionKind::Mirror, standard, "BCV"),
        _ => return None,
    };
    // Establishing a known pair again is legal from split; a clone is created only once.
    if kind == SessionKind::Mirror && existing.kind == kind && existing.source == *source {
        return None;
    }
    let target = &existing.target;
    let what = match existing.kind {
        SessionKind::Mirror => format!(
            "'{target}' is already the BCV of a mirror of '{}' (state {})",
            existing.source, existing.state
        ),
        SessionKind::Clone => format!(
            "'{target}' is the destination of a clone of '{}' (state {})",
            existing.source, existing.state
        ),
    };
    let remedy = match existing.kind {
        SessionKind::Mirror => {
            format!("cancel that mirror first (`tandem mirror cancel {target}`)")
        }
        SessionKind::Clone => {
            format!("end that clone first (`tandem clone terminate {target}` once it is copied)")
        }
    };
    Some(format!(
        "{} refused: {what}; {remedy} or choose another volume as the {role}",
        command.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::session::{MirrorMode, SessionState};

    #[test]
    fn utc_times_read_as_calendar_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_796_527_525), "2026-12-06 03:25:25 UTC");
    }

    #[test]
    fn a_down_node_is_named_with_its_time() {
        let message = node_down("n2", Some(1_796_527_525), 1_796_527_567);
        assert!(
            message.starts_with("node 'n2' is down since 2026-12-06 03:25:25 UTC (42 s ago)"),
            "{message}"
        );
        assert!(node_down("n2", None, 0).starts_with("node 'n2' is down:"));
    }

    fn entry(kind: SessionKind, source: &str, target: &str, state: SessionState) -> SessionEntry {
        SessionEntry {
            id: 1,
            node: "n1".into(),
            kind,
            source: source.into(),
            target: target.into(),
            state,
            slots: vec![0],
            tracks_copied: 0,
            tracks_remaining: 0,
            error: None,
        }
    }

    #[test]
    fn a_taken_target_is_described_with_its_remedy() {
        let establish = |standard: &str, bcv: &str| SessionCommand::MirrorEstablish {
            standard: standard.into(),
            bcv: bcv.into(),
            mode: MirrorMode::Sync,
            strict: false,
            target_timeout_milliseconds: None,
        };
        let bcv = entry(
            SessionKind::Mirror,
            "vol1",
            "bcv1",
            SessionState::Synchronized,
        );
        let message = target_taken(&establish("vol2", "bcv1"), &bcv).unwrap();
        assert!(
            message
                .contains("'bcv1' is already the BCV of a mirror of 'vol1' (state synchronized)"),
            "{message}"
        );
        assert!(message.contains("tandem mirror cancel bcv1"), "{message}");
        assert_eq!(target_taken(&establish("vol1", "bcv1"), &bcv), None);

        let destination = entry(SessionKind::Clone, "vol1", "cdst", SessionState::Active);
        let message = target_taken(&establish("vol2", "cdst"), &destination).unwrap();
        assert!(
            message.contains("'cdst' is the destination of a clone of 'vol1' (state active)"),
            "{message}"
        );
        let create = SessionCommand::CloneCreate {
            source: "vol1".into(),
            target: "cdst".into(),
            precopy: false,
            extents: Vec::new(),
        };
        let message = target_taken(&create, &destination).unwrap();
        assert!(
            message.contains("choose another volume as the destination"),
            "{message}"
        );
    }
}
