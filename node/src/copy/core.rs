//! The pure parts of copy sessions: the per-track rules of seed 001 for host writes to a
//! clone's source, progress that never goes back, and the copy rate limit. No IO, no
//! clock: time comes in as an argument.

use protocol::session::SessionState;
use std::time::Duration;

/// What a host write to a clone's source track requires first (seed 001, FIGS. 6 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceWriteStep {
    /// Nothing: the track is outside the clone, or its old data is not needed.
    Nothing,
    /// Precopy (FIG. 6, step 137): the track was precopied and is about to change, so it
    /// goes back on the lists — clone pending and indirect set, precopied cleared.
    Requeue,
    /// Active (copy before write): the point-in-time data of the track has not reached
    /// the destination yet, so it is copied there before the write lands.
    CopyFirst,
}

/// The rule for a host write to a clone source track with these bits.
pub fn clone_source_write(
    state: SessionState,
    clone_pending: bool,
    precopied: bool,
) -> SourceWriteStep {
    match state {
        SessionState::Created | SessionState::Precopying if precopied => SourceWriteStep::Requeue,
        SessionState::Active if clone_pending => SourceWriteStep::CopyFirst,
        _ => SourceWriteStep::Nothing,
    }
}

/// Whether a host access to a clone's destination track must first pull it from the
/// source (copy on first access): only once the destination is ready, and only while the
/// track is still indirect.
pub fn clone_target_access_pulls(state: SessionState, indirect: bool) -> bool {
    matches!(state, SessionState::Active | SessionState::Copied) && indirect
}

/// Progress of one copy, reported so that it never goes back and never passes 100 %:
/// host writes can add tracks to a running copy (a precopy re-queues rewritten tracks), so
/// the plain fraction could fall; the reported percent keeps its highest value instead.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub copied: u64,
    pub reported_percent: f64,
}

/// Highest percent reported while tracks remain: 100 means done, and only done.
const PERCENT_UNFINISHED_MAX: f64 = 99.9;

impl Progress {
    /// A new copy, starting at zero.
    pub fn restart() -> Progress {
        Progress::default()
    }

    /// The percent to report now, given the tracks still to copy, and remembers it.
    pub fn percent(&mut self, remaining: u64) -> f64 {
        let computed = if remaining == 0 {
            100.0
        } else {
            let total = (self.copied + remaining) as f64;
            (self.copied as f64 * 100.0 / total).min(PERCENT_UNFINISHED_MAX)
        };
        self.reported_percent = self.reported_percent.max(computed);
        self.reported_percent
    }
}

/// A token bucket over bytes, with the time passed in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    bytes_per_second: u64,
    /// Bytes that may be sent now without waiting; negative when in debt.
    available: f64,
    last: Duration,
}

/// How far ahead of its rate a copy may run: a quarter second of credit.
const RATE_BURST_SECONDS: f64 = 0.25;

impl RateLimit {
    pub fn new(bytes_per_second: u64, now: Duration) -> RateLimit {
        RateLimit {
            bytes_per_second,
            available: 0.0,
            last: now,
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    pub fn set_rate(&mut self, bytes_per_second: u64) {
        self.bytes_per_second = bytes_per_second;
    }

    /// Takes `bytes` and returns how long the caller must wait before sending more.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        self.refill(now);
        self.available -= bytes as f64;
        self.debt_wait()
    }

    /// How long the caller must wait before it may send anything.
    pub fn wait(&mut self, now: Duration) -> Duration {
        self.refill(now);
        self.debt_wait()
    }

    /// Returns bytes taken for work that did not happen (a step charges its tracks before
    /// it moves them, so that parallel copier threads see each other's share).
    pub fn give_back(&mut self, bytes: u64) {
        let rate = self.bytes_per_second as f64;
        self.available = (self.available + bytes as f64).min(rate * RATE_BURST_SECONDS);
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let rate = self.bytes_per_second as f64;
        self.available = (self.available + elapsed * rate).min(rate * RATE_BURST_SECONDS);
    }

    fn debt_wait(&self) -> Duration {
        let rate = self.bytes_per_second as f64;
        if self.available >= 0.0 || rate == 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.available / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precopied_tracks_are_requeued_and_pending_ones_copied_first_only_when_active() {
        use SessionState::*;
        assert_eq!(
            clone_source_write(Precopying, false, true),
            SourceWriteStep::Requeue
        );
        assert_eq!(
            clone_source_write(Precopying, true, false),
            SourceWriteStep::Nothing
        );
        assert_eq!(
            clone_source_write(Active, true, false),
            SourceWriteStep::CopyFirst
        );
        assert_eq!(
            clone_source_write(Active, false, false),
            SourceWriteStep::Nothing
        );
        assert_eq!(
            clone_source_write(Copied, true, false),
            SourceWriteStep::Nothing
        );
        assert!(clone_target_access_pulls(Active, true));
        assert!(!clone_target_access_pulls(Precopying, true));
        assert!(!clone_target_access_pulls(Active, false));
    }

    #[test]
    fn progress_never_falls_and_reaches_100_only_when_done() {
        let mut progress = Progress::restart();
        progress.copied = 50;
        assert_eq!(progress.percent(50), 50.0);
        // Host writes re-queue tracks: the fraction falls, the report does not.
        assert_eq!(progress.percent(200), 50.0);
        progress.copied = 999;
        assert_eq!(progress.percent(1), PERCENT_UNFINISHED_MAX);
        assert_eq!(progress.percent(0), 100.0);
    }

    #[test]
    fn a_rate_limit_spaces_sends_at_its_rate() {
        let mut limit = RateLimit::new(1_000, Duration::ZERO);
        assert_eq!(limit.take(500, Duration::ZERO), Duration::from_millis(500));
        // Half a second later the debt is paid.
        assert_eq!(limit.take(0, Duration::from_millis(500)), Duration::ZERO);
        // Credit is capped at a quarter second.
        let wait = limit.take(1_000, Duration::from_secs(10));
        assert_eq!(wait, Duration::from_millis(750));
    }

    #[test]
    fn a_step_charged_up_front_makes_a_parallel_step_wait_and_unused_bytes_come_back() {
        let second = Duration::from_secs(1);
        let mut limit = RateLimit::new(1 << 20, Duration::ZERO);
        // The first copier thread charges 2 MiB for its step at 1 MiB/s...
        assert_eq!(limit.take(2 << 20, Duration::ZERO), 2 * second);
        // ...so the second waits for that debt instead of starting a step of its own.
        assert_eq!(limit.wait(Duration::ZERO), 2 * second);
        assert_eq!(limit.wait(second), second);
        // The step moved only half: the other half comes back.
        limit.give_back(1 << 20);
        assert_eq!(limit.wait(second), Duration::ZERO);
        // Credit never exceeds a quarter second, however much comes back.
        limit.give_back(100 << 20);
        assert_eq!(limit.take(1 << 20, second), Duration::from_secs_f64(0.75));
    }
}
