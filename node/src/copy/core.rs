//! The pure parts of copy sessions: the per-track rules of seed 001 for host writes to a
//! clone's source, progress that never goes back, the recent copy rate and the copy rate
//! limit. No IO, no clock: time comes in as an argument.

use protocol::session::{copy_percent, SessionState, PERCENT_UNFINISHED_MAX, RATE_WINDOW_SECONDS};
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

/// Progress of one copy, derived from what cannot lag behind a crash: the copy's total,
/// fixed when the copy starts (and stored with the session's record before any of its
/// bits is cleared), and the bits that remain now. Host writes can add tracks to a
/// running copy (a precopy re-queues rewritten tracks, a mirror's standard keeps
/// changing), so the plain fraction could fall: the reported percent keeps the highest
/// value reached, but it is 100 only while nothing remains.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub tracks_total: u64,
    pub reported_percent: f64,
}

/// One reading of a copy's progress: the counts and the percent agree with each other.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressReading {
    pub tracks_total: u64,
    pub tracks_copied: u64,
    pub tracks_remaining: u64,
    pub percent: f64,
}

impl Progress {
    /// A new copy of `tracks_total` tracks, starting at zero.
    pub fn start(tracks_total: u64) -> Progress {
        Progress {
            tracks_total,
            reported_percent: 0.0,
        }
    }

    /// Reads the progress given the tracks still to copy now, and remembers the percent
    /// (and a total that host writes made grow) so that it never goes back.
    pub fn read(&mut self, tracks_remaining: u64) -> ProgressReading {
        if crate::failpoints::deliberate_bug(
            crate::failpoints::DeliberateBug::ProgressCountsResendTwice,
        ) {
            // The deliberate bug: every copied track counts twice, as if each had been
            // sent again, so the percent passes 100 once half the copy is done.
            let tracks_copied = self.tracks_total.saturating_sub(tracks_remaining);
            return ProgressReading {
                tracks_total: self.tracks_total,
                tracks_copied,
                tracks_remaining,
                percent: (2 * tracks_copied) as f64 * 100.0 / self.tracks_total.max(1) as f64,
            };
        }
        self.tracks_total = self.tracks_total.max(tracks_remaining);
        let tracks_copied = self.tracks_total - tracks_remaining;
        let computed = copy_percent(tracks_copied, tracks_remaining);
        let percent = if tracks_remaining == 0 {
            100.0
        } else {
            self.reported_percent
                .max(computed)
                .min(PERCENT_UNFINISHED_MAX)
        };
        self.reported_percent = percent;
        ProgressReading {
            tracks_total: self.tracks_total,
            tracks_copied,
            tracks_remaining,
            percent,
        }
    }
}

/// The window of [`RecentRate`], as a [`Duration`].
pub const RATE_WINDOW: Duration = Duration::from_secs(RATE_WINDOW_SECONDS);
/// The window is kept in buckets of this length, so its rate is exact to a percent.
const RATE_BUCKET: Duration = Duration::from_millis(100);
const RATE_BUCKETS: usize = (RATE_WINDOW_SECONDS * 10) as usize;

/// A rate over the last [`RATE_WINDOW`] (a sliding window of 100 ms buckets), with the
/// time passed in: what a copy moves now, not its average since it started.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentRate {
    started: Duration,
    /// Units counted per bucket; bucket `index % RATE_BUCKETS` holds bucket `index`.
    buckets: Vec<u64>,
    /// The index of the newest bucket written (buckets count from time zero).
    newest: u64,
}

impl RecentRate {
    /// A rate that starts measuring at `now`.
    pub fn new(now: Duration) -> RecentRate {
        RecentRate {
            started: now,
            buckets: vec![0; RATE_BUCKETS],
            newest: Self::bucket_of(now),
        }
    }

    fn bucket_of(time: Duration) -> u64 {
        (time.as_nanos() / RATE_BUCKET.as_nanos()) as u64
    }

    /// Counts `units` moved at `now`.
    pub fn record(&mut self, units: u64, now: Duration) {
        let index = Self::bucket_of(now);
        if index > self.newest {
            // Buckets between the newest and this one saw nothing: clear them for reuse.
            let cleared = (index - self.newest).min(RATE_BUCKETS as u64);
            for step in 1..=cleared {
                self.buckets[((self.newest + step) % RATE_BUCKETS as u64) as usize] = 0;
            }
            self.newest = index;
        }
        // Copier threads race: a count older than the newest bucket goes to its own bucket,
        // or to the oldest one still in the window.
        let index = index.clamp(
            self.newest.saturating_sub(RATE_BUCKETS as u64 - 1),
            self.newest,
        );
        self.buckets[(index % RATE_BUCKETS as u64) as usize] += units;
    }

    /// Units per second over the window that ends at `now` (or since the start, when
    /// that is shorter; at least one bucket long).
    pub fn per_second(&self, now: Duration) -> f64 {
        let index = Self::bucket_of(now);
        let oldest = index.saturating_sub(RATE_BUCKETS as u64 - 1);
        let units: u64 = (0..RATE_BUCKETS as u64)
            .filter_map(|age| self.newest.checked_sub(age))
            .filter(|bucket| *bucket >= oldest && *bucket <= index)
            .map(|bucket| self.buckets[(bucket % RATE_BUCKETS as u64) as usize])
            .sum();
        let measured = now
            .saturating_sub(self.started)
            .clamp(RATE_BUCKET, RATE_WINDOW);
        units as f64 / measured.as_secs_f64()
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
        let mut progress = Progress::start(100);
        let reading = progress.read(50);
        assert_eq!(reading.percent, 50.0);
        assert_eq!((reading.tracks_total, reading.tracks_copied), (100, 50));
        // Host writes re-queue tracks: the fraction falls, the report does not.
        let reading = progress.read(80);
        assert_eq!(reading.percent, 50.0);
        assert_eq!((reading.tracks_total, reading.tracks_copied), (100, 20));
        // More work than the copy had: the total grows, it never shrinks again.
        assert_eq!(progress.read(150).tracks_total, 150);
        assert_eq!(progress.read(10).tracks_total, 150);
        // One track of a thousand left rounds to 100.0, but is not done.
        let mut progress = Progress::start(1000);
        assert_eq!(progress.read(1).percent, PERCENT_UNFINISHED_MAX);
        assert_eq!(progress.read(0).percent, 100.0);
        // A caught-up precopy said 100; a host write re-queues a track: no longer 100.
        let reading = progress.read(3);
        assert_eq!(reading.percent, PERCENT_UNFINISHED_MAX);
        assert_eq!(reading.tracks_copied + reading.tracks_remaining, 1000);
        // A copy with nothing to move is done at once.
        assert_eq!(Progress::start(0).read(0).percent, 100.0);
    }

    #[test]
    fn progress_read_again_after_a_restart_is_never_below_what_was_shown() {
        // Shown before a crash; the checkpointed record holds an older percent.
        let mut shown = Progress::start(1024);
        let before = shown.read(800);
        let mut checkpoint = Progress::start(1024);
        checkpoint.read(900);
        // The restarted node reads its checkpoint and the bits now (at most as many as
        // were left when the percent was shown: cleared bits stay cleared).
        let after = checkpoint.read(790);
        assert_eq!(after.tracks_total, before.tracks_total);
        assert!(after.percent >= before.percent, "{after:?} {before:?}");
    }

    #[test]
    fn every_percent_below_100_has_tracks_remaining_and_never_falls() {
        let mut progress = Progress::start(37);
        let mut previous = 0.0;
        // Remaining falls, rises again (host writes), and finally reaches zero.
        for remaining in [37, 30, 12, 1, 5, 36, 2, 1, 0] {
            let reading = progress.read(remaining);
            assert_eq!(reading.percent == 100.0, remaining == 0, "{reading:?}");
            assert!(reading.percent >= previous, "{reading:?} after {previous}");
            assert_eq!(reading.tracks_copied + remaining, reading.tracks_total);
            previous = reading.percent;
        }
    }

    #[test]
    fn the_rate_is_the_last_ten_seconds_not_the_lifetime_average() {
        let seconds = Duration::from_secs;
        let mut rate = RecentRate::new(Duration::ZERO);
        // 100 units a second for 20 s...
        for tenth in 0..200 {
            rate.record(10, Duration::from_millis(tenth * 100 + 50));
        }
        let fast = rate.per_second(seconds(20));
        assert!((fast - 100.0).abs() < 2.0, "{fast}");
        // ...then 10 a second for 10 s: the lifetime average would be 70.
        for tenth in 200..300 {
            rate.record(1, Duration::from_millis(tenth * 100 + 50));
        }
        let slow = rate.per_second(seconds(30));
        assert!((slow - 10.0).abs() < 1.0, "{slow}");
        // Nothing for 10 s: the rate falls to zero.
        assert_eq!(rate.per_second(seconds(41)), 0.0);
        // Half way through a quiet spell only the recent half counts.
        rate.record(500, seconds(45));
        assert!((rate.per_second(seconds(50)) - 50.0).abs() < 1.0);
    }

    #[test]
    fn a_rate_just_started_divides_by_the_time_since_it_started() {
        let start = Duration::from_secs(100);
        let mut rate = RecentRate::new(start);
        rate.record(40, start + Duration::from_millis(500));
        let measured = rate.per_second(start + Duration::from_secs(2));
        assert!((measured - 20.0).abs() < 0.01, "{measured}");
        // A count reported late by another thread still lands in the window.
        rate.record(40, start + Duration::from_millis(100));
        let measured = rate.per_second(start + Duration::from_secs(2));
        assert!((measured - 40.0).abs() < 0.01, "{measured}");
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
