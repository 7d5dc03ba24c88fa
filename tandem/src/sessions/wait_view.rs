//! The line `--wait` shows while a session copies, as pure functions of the session infos
//! it polls: the line fits an 80-column terminal, and a copy's transient error shows as a
//! warning only until the copy moves again.

use protocol::session::{SessionInfo, SessionState};

/// The widest line `--wait` draws: a standard terminal.
pub const LINE_COLUMNS_MAX: usize = 80;
/// The bar's width when the rest of the line leaves room, and the least it shrinks to.
const BAR_COLUMNS_MAX: usize = 30;
const BAR_COLUMNS_MIN: usize = 10;
/// The columns kept for the session's name and state when the line must be cut.
const LABEL_COLUMNS_MIN: usize = 20;

/// What `--wait` shows, carried from one poll to the next.
#[derive(Debug, Default)]
pub struct WaitView {
    warning: Option<Warning>,
}

/// A copy's error as the view shows it, and where the copy was when it first appeared.
#[derive(Debug)]
struct Warning {
    message: String,
    since: Mark,
    /// The copy moved on since: the error is past, even if the node still reports it.
    resolved: bool,
}

/// Where a copy is: any change of these after an error means the copy moves again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    state: SessionState,
    remaining: u64,
    moved: u64,
}

impl Mark {
    fn of(info: &SessionInfo) -> Mark {
        Mark {
            state: info.state,
            remaining: info.tracks_remaining,
            moved: info.tracks_copied_last,
        }
    }

    fn progressed_from(self, earlier: Mark) -> bool {
        self.state != earlier.state
            || self.remaining < earlier.remaining
            || self.moved > earlier.moved
    }
}

impl WaitView {
    /// Takes the next polled info and returns the line to show for it.
    pub fn observe(&mut self, info: &SessionInfo) -> String {
        let mark = Mark::of(info);
        match &info.error {
            None => self.warning = None,
            Some(message) => match &mut self.warning {
                Some(warning) if warning.message == *message => {
                    warning.resolved |= mark.progressed_from(warning.since);
                }
                _ => {
                    self.warning = Some(Warning {
                        message: message.clone(),
                        since: mark,
                        resolved: false,
                    })
                }
            },
        }
        let warning = self
            .warning
            .as_ref()
            .filter(|warning| !warning.resolved)
            .map(|warning| warning.message.as_str());
        render_line(info, warning, LINE_COLUMNS_MAX)
    }
}

/// One line of progress for `info`, at most `columns` wide: name and state, a bar, the
/// percent, and either the counts, rate and time left or the warning.
pub fn render_line(info: &SessionInfo, warning: Option<&str>, columns: usize) -> String {
    let label = format!("{} {}", info.target, info.state);
    let percent = format!("{:5.1}%", info.percent);
    let tail = match warning {
        Some(message) => format!("warning: {message}"),
        None => format!(
            "{}/{} tracks {}/s eta {}",
            info.tracks_copied,
            info.tracks_total,
            super::human_bytes(info.rate_bytes_per_second),
            info.eta_seconds.map_or_else(|| "?".to_string(), eta_text)
        ),
    };
    // "label [bar] percent tail": five separators and brackets around the bar.
    let separators = 5;
    let text_columns = width(&label) + width(&percent) + width(&tail) + separators;
    let bar_columns = columns
        .saturating_sub(text_columns)
        .clamp(BAR_COLUMNS_MIN, BAR_COLUMNS_MAX);
    let budget = columns.saturating_sub(bar_columns + width(&percent) + separators);
    // The name keeps at least its minimum; the tail gets the rest.
    let label_columns =
        width(&label).min(LABEL_COLUMNS_MIN.max(budget.saturating_sub(width(&tail))));
    let tail_columns = budget.saturating_sub(label_columns);
    let line = format!(
        "{} [{}] {percent} {}",
        fit(&label, label_columns),
        bar(info.percent, bar_columns),
        fit(&tail, tail_columns)
    );
    fit(&line, columns)
}

pub(crate) fn width(text: &str) -> usize {
    text.chars().count()
}

/// `text` cut to `columns`, with an ellipsis where it was cut.
pub(crate) fn fit(text: &str, columns: usize) -> String {
    if width(text) <= columns {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(columns.saturating_sub(1)).collect();
    if columns > 0 {
        cut.push('…');
    }
    cut
}

pub(crate) fn bar(percent: f64, columns: usize) -> String {
    let filled = ((percent.clamp(0.0, 100.0) / 100.0) * columns as f64).floor() as usize;
    let mut bar = "=".repeat(filled.min(columns));
    if filled < columns {
        bar.push('>');
        bar.push_str(&" ".repeat(columns - filled - 1));
    }
    bar
}

pub(crate) fn eta_text(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::session::{PastError, SessionKind};

    fn info(state: SessionState, remaining: u64) -> SessionInfo {
        let total = 1024;
        SessionInfo {
            id: 1,
            kind: SessionKind::Clone,
            source: "src".to_string(),
            target: "dst".to_string(),
            state,
            mode: None,
            slots: vec![0],
            extents: Vec::new(),
            tracks_total: total,
            tracks_copied: total - remaining,
            tracks_remaining: remaining,
            percent: protocol::session::copy_percent(total - remaining, remaining),
            rate_bytes_per_second: 2 << 20,
            eta_seconds: Some(remaining / 32),
            rate_limit_mebibytes_per_second: Some(2),
            tracks_copied_last: total - remaining,
            lag_tracks: 0,
            lag_seconds: 0,
            error: None,
            created_unix_seconds: 0,
            split_sequence: 0,
            last_error: None,
            strict: false,
            target_timeout_milliseconds: 0,
        }
    }

    fn failing(mut info: SessionInfo, message: &str) -> SessionInfo {
        info.error = Some(message.to_string());
        info.last_error = Some(PastError {
            message: message.to_string(),
            unix_seconds: 1_700_000_000,
        });
        info
    }

    #[test]
    fn the_line_fits_80_columns_whatever_the_names_numbers_and_errors() {
        let mut long = info(SessionState::Synchronized, 3);
        long.target = "a-volume-with-a-name-much-longer-than-any-terminal-would-show".into();
        long.tracks_total = u64::MAX / 2;
        long.tracks_copied = u64::MAX / 2 - 3;
        long.rate_bytes_per_second = u64::MAX;
        long.eta_seconds = Some(u64::MAX);
        let error = "node beta did not answer (timed out after 5 s): the connection was lost while sending 64 tracks";
        for sample in [
            info(SessionState::Active, 1024),
            info(SessionState::Active, 0),
            long.clone(),
            failing(info(SessionState::Syncing, 512), error),
            failing(long, error),
        ] {
            for warning in [None, sample.error.as_deref()] {
                let line = render_line(&sample, warning, LINE_COLUMNS_MAX);
                assert!(
                    line.chars().count() <= LINE_COLUMNS_MAX,
                    "{} columns: {line}",
                    line.chars().count()
                );
                assert!(line.contains('%'), "{line}");
            }
        }
        let line = render_line(&info(SessionState::Active, 512), None, LINE_COLUMNS_MAX);
        assert!(line.starts_with("dst active ["), "{line}");
        assert!(
            line.contains(" 50.0% 512/1024 tracks 2.0 MiB/s eta 16s"),
            "{line}"
        );
        // The bar is drawn to the percent: half of it filled.
        let bar = &line[line.find('[').unwrap() + 1..line.find(']').unwrap()];
        let filled = bar.chars().filter(|column| *column == '=').count();
        assert!(bar.len() >= BAR_COLUMNS_MIN, "{line}");
        assert_eq!(filled, bar.len() / 2, "{line}");
    }

    #[test]
    fn a_transient_error_is_a_warning_until_the_copy_moves_again() {
        let mut view = WaitView::default();
        let error = "copy step failed: node beta did not answer";
        let lines: Vec<String> = [
            info(SessionState::Active, 900),
            failing(info(SessionState::Active, 880), error),
            // Still stuck: the warning stays.
            failing(info(SessionState::Active, 880), error),
            // The copy moves again; a node that still reports the error does not keep
            // the warning up...
            failing(info(SessionState::Active, 860), error),
            // ...and neither does one that cleared it, with only the past error left.
            {
                let mut recovered = info(SessionState::Active, 840);
                recovered.last_error = failing(recovered.clone(), error).last_error;
                recovered
            },
            // A new error is a new warning.
            failing(info(SessionState::Active, 840), "disk full"),
            info(SessionState::Copied, 0),
        ]
        .iter()
        .map(|info| view.observe(info))
        .collect();
        let warned: Vec<bool> = lines.iter().map(|line| line.contains("warning:")).collect();
        assert_eq!(
            warned,
            [false, true, true, false, false, true, false],
            "{lines:#?}"
        );
        assert!(lines[3].contains("1024 tracks"), "{}", lines[3]);
        assert!(lines[6].contains("100.0% 1024/1024 tracks"), "{}", lines[6]);
    }
}
