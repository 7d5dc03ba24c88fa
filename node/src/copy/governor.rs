//! The default copy QoS: copies run as fast as host write latency allows.
//!
//! Pure logic, time passed in. The node measures every host write's latency into a
//! [`LatencyHistogram`]; every [`GOVERNOR_WINDOW`] the copier hands the window's counts to
//! [`Governor::observe`], which returns the rate for copies without their own `--rate`.
//!
//! The rule is multiplicative increase, multiplicative decrease against a baseline: the
//! host write p99 measured while copies ran at the floor rate. When hosts barely write,
//! copies double every window; otherwise the governor pools windows until it holds
//! [`DECISION_SAMPLES_MIN`] host writes (or [`DECISION_WINDOWS_MAX`] windows), then compares
//! their p99 with the baseline: within [`LATENCY_TOLERANCE`] times it the rate grows by a
//! quarter, above it the rate falls by a quarter, and above [`LATENCY_OVERLOAD`] times it
//! the rate halves; never below the floor, so a copy always progresses.
//!
//! Why pooled: the first version decided on every 200 ms window alone. A window of
//! 4 KiB writes at QD1 holds about 1,600 writes, so its p99 is the 16th slowest, and one
//! hiccup of the disk or the scheduler moves it by more than the 1.2× tolerance. Half of
//! the windows looked "slow" from noise alone, every such window halved the rate, and a
//! quarter more per good window never made that up: the copy sat at the floor
//! (1.2 MiB/s) while the host p99 was no better for it. With 2,000 writes or more per
//! decision the p99 is the 20th slowest of a larger sample, and a slow decision costs a
//! quarter of the rate, not half, unless the host is clearly overloaded.
//!
//! The baseline is measured again every [`BASELINE_AGE_MAX`] with one decision's worth of
//! writes at the floor; afterwards the copy goes back to the rate it had, instead of
//! climbing from the floor again. A new baseline moves at most by the tolerance from the
//! old one, up or down, so one unusually slow or unusually quick measurement cannot make
//! the governor reckless or timid.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the governor looks at host latency.
pub const GOVERNOR_WINDOW: Duration = Duration::from_millis(200);
/// The rate copies keep whatever the hosts do, so that every copy finishes.
pub const RATE_FLOOR_BYTES_PER_SECOND: u64 = 1 << 20;
/// Host write p99 may rise to this multiple of the baseline before copies slow down; below
/// the 1.5 the issue allows, to leave room for the decisions that probe upward.
pub const LATENCY_TOLERANCE: f64 = 1.25;
/// Past this multiple of the baseline the host is clearly hurt: the rate halves.
pub const LATENCY_OVERLOAD: f64 = 2.0;
/// Fewer host writes than this in a window say nothing about their tail: the hosts are
/// nearly idle and copies may speed up.
pub const WINDOW_SAMPLES_MIN: u64 = 100;
/// Host writes one decision needs, so that its p99 stands on 20 writes of the tail.
pub const DECISION_SAMPLES_MIN: u64 = 2_000;
/// Windows one decision waits for at most: slow hosts get a decision every second.
pub const DECISION_WINDOWS_MAX: u32 = 5;
/// How long a baseline is trusted before the governor measures it again at the floor
/// rate: the disk's idle latency drifts with its load and fill.
pub const BASELINE_AGE_MAX: Duration = Duration::from_secs(30);

/// Sub-buckets per power of two: bucket bounds are 2^(1/8) ≈ 9 % apart, fine enough to
/// tell 1.2× from 1.0×.
const SUB_BUCKETS: u32 = 8;
/// Buckets cover 1 µs to about 2^32 µs.
const BUCKETS: usize = 32 * SUB_BUCKETS as usize;

/// Counts of host write latencies, lock-free so that host writes can record into it.
pub struct LatencyHistogram {
    counts: Vec<AtomicU64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_micros().clamp(1, u128::from(u32::MAX)) as f64;
    let index = (micros.log2() * f64::from(SUB_BUCKETS)) as usize;
    index.min(BUCKETS - 1)
}

fn bucket_upper_bound(index: usize) -> Duration {
    let micros = 2f64.powf((index + 1) as f64 / f64::from(SUB_BUCKETS));
    Duration::from_secs_f64(micros / 1e6)
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        self.counts[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts since the last call, which starts a new window.
    pub fn take(&self) -> Window {
        Window {
            counts: self
                .counts
                .iter()
                .map(|count| count.swap(0, Ordering::Relaxed))
                .collect(),
        }
    }
}

/// One window's host write latencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    counts: Vec<u64>,
}

impl Window {
    /// A window built from latencies, for tests and simulations.
    pub fn of(latencies: impl IntoIterator<Item = Duration>) -> Window {
        let mut counts = vec![0; BUCKETS];
        for latency in latencies {
            counts[bucket_of(latency)] += 1;
        }
        Window { counts }
    }

    fn empty() -> Window {
        Window {
            counts: vec![0; BUCKETS],
        }
    }

    fn add(&mut self, other: &Window) {
        for (count, more) in self.counts.iter_mut().zip(&other.counts) {
            *count += more;
        }
    }

    pub fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The 99th percentile, as the upper bound of its bucket.
    pub fn p99(&self) -> Option<Duration> {
        let samples = self.samples();
        if samples == 0 {
            return None;
        }
        let rank = samples - samples / 100;
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_upper_bound(index));
            }
        }
        None
    }
}

/// The rate for copies without their own limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Governor {
    rate: u64,
    ceiling: u64,
    baseline: Option<Duration>,
    baseline_measured: Duration,
    /// The copy runs at the floor to measure the baseline; the rate to return to after.
    measuring: Option<u64>,
    /// Host writes of the windows since the last decision.
    pooled: Window,
    pooled_windows: u32,
}

/// What one decision concluded, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Idle,
    Pooling,
    Measuring,
    Measured,
    Within,
    Above,
    Overloaded,
}

impl Governor {
    /// Starts at the floor, measuring the baseline; `ceiling` is the node's copy rate.
    pub fn new(ceiling: u64) -> Governor {
        let floor = RATE_FLOOR_BYTES_PER_SECOND.min(ceiling);
        Governor {
            rate: floor,
            ceiling,
            baseline: None,
            baseline_measured: Duration::ZERO,
            measuring: Some(floor),
            pooled: Window::empty(),
            pooled_windows: 0,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    fn floor(&self) -> u64 {
        RATE_FLOOR_BYTES_PER_SECOND.min(self.ceiling)
    }

    /// Takes the window that just ended (at `now`) and returns the rate for the next.
    pub fn observe(&mut self, window: &Window, now: Duration) -> u64 {
        self.decide(window, now);
        self.rate
    }

    fn decide(&mut self, window: &Window, now: Duration) -> Verdict {
        let floor = self.floor();
        if window.samples() < WINDOW_SAMPLES_MIN {
            // Hosts are (nearly) idle: speed up fast. A baseline cannot be measured now,
            // and what was pooled is too old to judge the new rate by.
            self.pooled = Window::empty();
            self.pooled_windows = 0;
            let rate = self.measuring.take().unwrap_or(self.rate);
            self.rate = rate.saturating_mul(2).clamp(floor, self.ceiling);
            return Verdict::Idle;
        }
        self.pooled.add(window);
        self.pooled_windows += 1;
        if self.pooled.samples() < DECISION_SAMPLES_MIN
            && self.pooled_windows < DECISION_WINDOWS_MAX
        {
            return Verdict::Pooling;
        }
        let p99 = self.pooled.p99().expect("a pool with samples has a p99");
        self.pooled = Window::empty();
        self.pooled_windows = 0;
        if let Some(resume) = self.measuring.take() {
            // This pool ran at the floor: it is the new baseline.
            self.baseline = Some(match self.baseline {
                Some(old) => p99.clamp(
                    old.div_f64(LATENCY_TOLERANCE),
                    old.mul_f64(LATENCY_TOLERANCE),
                ),
                None => p99,
            });
            self.baseline_measured = now;
            self.rate = resume.clamp(floor, self.ceiling);
            return Verdict::Measured;
        }
        let Some(baseline) = self.baseline else {
            // Hosts got busy before any baseline was measured: measure one first.
            self.measuring = Some(self.rate);
            self.rate = floor;
            return Verdict::Measuring;
        };
        let verdict = if p99 > baseline.mul_f64(LATENCY_OVERLOAD) {
            self.rate /= 2;
            Verdict::Overloaded
        } else if p99 > baseline.mul_f64(LATENCY_TOLERANCE) {
            self.rate -= self.rate / 4;
            Verdict::Above
        } else {
            self.rate += (self.rate / 4).max(floor);
            Verdict::Within
        };
        self.rate = self.rate.clamp(floor, self.ceiling);
        if now.saturating_sub(self.baseline_measured) >= BASELINE_AGE_MAX {
            self.measuring = Some(self.rate);
            self.rate = floor;
        }
        verdict
    }

    /// The node's copy rate changed.
    pub fn set_ceiling(&mut self, ceiling: u64) {
        self.ceiling = ceiling;
        self.rate = self.rate.min(ceiling);
        if let Some(resume) = self.measuring.as_mut() {
            *resume = (*resume).min(ceiling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn micros(value: u64) -> Duration {
        Duration::from_micros(value)
    }

    /// A window of `writes` host writes: all at `typical` µs but `tail_writes` at `tail` µs.
    fn window(writes: u64, typical: u64, tail_writes: u64, tail: u64) -> Window {
        Window::of(
            std::iter::repeat_n(micros(typical), (writes - tail_writes) as usize)
                .chain(std::iter::repeat_n(micros(tail), tail_writes as usize)),
        )
    }

    /// A window of 1000 host writes: 990 at `typical` µs and 10 at `tail` µs.
    fn busy(typical: u64, tail: u64) -> Window {
        window(1000, typical, 10, tail)
    }

    /// A window of 1000 host writes whose p99 is 150 µs: 15 of them take that long.
    fn steady() -> Window {
        window(1000, 80, 15, 150)
    }

    /// A governor whose baseline was measured from two windows of `steady()` at time
    /// `GOVERNOR_WINDOW * 2`, now at `rate`.
    fn governed_at(rate: u64) -> (Governor, Duration) {
        let mut governor = Governor::new(1024 * MIB);
        let mut now = Duration::ZERO;
        for _ in 0..2 {
            now += GOVERNOR_WINDOW;
            governor.decide(&steady(), now);
        }
        assert!(governor.baseline().is_some());
        governor.rate = rate;
        (governor, now)
    }

    #[test]
    fn the_p99_of_a_window_is_within_a_bucket_of_the_true_one() {
        let window = busy(80, 200);
        let p99 = window.p99().unwrap();
        assert!(p99 >= micros(80) && p99 <= micros(90), "{p99:?}");
        let window = Window::of((1..=1000).map(micros));
        let p99 = window.p99().unwrap();
        assert!(p99 >= micros(990) && p99 <= micros(1080), "{p99:?}");
        assert_eq!(Window::of([]).p99(), None);
    }

    #[test]
    fn idle_hosts_let_the_copy_double_up_to_the_ceiling() {
        let mut governor = Governor::new(1024 * MIB);
        let mut now = Duration::ZERO;
        let mut rates = Vec::new();
        for _ in 0..12 {
            now += GOVERNOR_WINDOW;
            rates.push(governor.observe(&Window::of([micros(100); 10]), now) / MIB);
        }
        assert_eq!(
            rates,
            [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024]
        );
    }

    /// The decision table: each row is the pooled p99 against a baseline of ~150 µs and
    /// what the governor concludes and does to a rate of 40 MiB/s.
    #[test]
    fn each_pooled_p99_gives_its_verdict_and_rate() {
        let rows = [
            // (tail µs of 30 writes in 2000, verdict, rate after, MiB/s)
            (150, Verdict::Within, 50 * MIB),
            (170, Verdict::Within, 50 * MIB),
            (220, Verdict::Above, 30 * MIB),
            (280, Verdict::Above, 30 * MIB),
            (400, Verdict::Overloaded, 20 * MIB),
            (5_000, Verdict::Overloaded, 20 * MIB),
        ];
        for (tail, verdict, rate) in rows {
            let (mut governor, now) = governed_at(40 * MIB);
            let baseline = governor.baseline().unwrap();
            assert!(
                baseline >= micros(140) && baseline <= micros(160),
                "{baseline:?}"
            );
            let pooled = window(1000, 80, 15, tail);
            assert_eq!(
                governor.decide(&pooled, now + GOVERNOR_WINDOW),
                Verdict::Pooling,
                "tail {tail} µs: 1000 writes are not enough for a decision"
            );
            assert_eq!(
                governor.rate(),
                40 * MIB,
                "tail {tail} µs: no change while pooling"
            );
            assert_eq!(
                governor.decide(&pooled, now + GOVERNOR_WINDOW * 2),
                verdict,
                "tail {tail} µs"
            );
            assert_eq!(governor.rate(), rate, "tail {tail} µs");
        }
    }

    #[test]
    fn one_slow_window_among_good_ones_does_not_slow_the_copy() {
        // One window where 2 % of writes met a disk hiccup: alone its p99 is the
        // hiccup; pooled with the next window of 1000 it is 1 % of 2000, at the edge,
        // and with two more good windows it is 0.5 %: the rate keeps growing.
        let (mut governor, mut now) = governed_at(16 * MIB);
        let hiccup = window(1000, 80, 15, 900);
        let good = steady();
        let mut rates = Vec::new();
        for window in [&good, &hiccup, &good, &good, &good, &good] {
            now += GOVERNOR_WINDOW;
            governor.decide(window, now);
            rates.push(governor.rate() / MIB);
        }
        assert_eq!(rates, [16, 20, 20, 25, 25, 31]);
    }

    #[test]
    fn the_rate_falls_by_a_quarter_above_the_tolerance_and_never_below_the_floor() {
        let (mut governor, mut now) = governed_at(64 * MIB);
        let hurt = window(1000, 80, 20, 250);
        let mut rates = Vec::new();
        for _ in 0..12 {
            now += GOVERNOR_WINDOW;
            governor.decide(&hurt, now);
            rates.push(governor.rate() / MIB);
        }
        assert_eq!(rates, [64, 48, 48, 36, 36, 27, 27, 20, 20, 15, 15, 11]);
        for _ in 0..40 {
            now += GOVERNOR_WINDOW;
            governor.decide(&window(1000, 80, 20, 5_000), now);
        }
        assert_eq!(governor.rate(), MIB);
    }

    #[test]
    fn slow_hosts_get_a_decision_after_the_most_windows_a_decision_waits() {
        let (mut governor, mut now) = governed_at(8 * MIB);
        let sparse = window(150, 80, 1, 150);
        for _ in 1..DECISION_WINDOWS_MAX {
            now += GOVERNOR_WINDOW;
            assert_eq!(governor.decide(&sparse, now), Verdict::Pooling);
        }
        now += GOVERNOR_WINDOW;
        assert_eq!(governor.decide(&sparse, now), Verdict::Within);
        assert_eq!(governor.rate(), 10 * MIB);
    }

    #[test]
    fn an_aged_baseline_is_measured_at_the_floor_and_the_copy_resumes_its_rate() {
        let (mut governor, mut now) = governed_at(100 * MIB);
        let first = governor.baseline().unwrap();
        while governor.measuring.is_none() {
            assert!(
                now <= BASELINE_AGE_MAX + GOVERNOR_WINDOW * 2,
                "never measured again"
            );
            now += GOVERNOR_WINDOW;
            governor.decide(&steady(), now);
        }
        assert!(
            now >= BASELINE_AGE_MAX,
            "measured again too early, at {now:?}"
        );
        let before = governor
            .measuring
            .expect("an aged baseline is measured again");
        assert_eq!(governor.rate(), MIB, "the measurement runs at the floor");
        // The disk happens to be much slower while measuring: the baseline rises by the
        // tolerance at most, and the copy goes back to the rate it had.
        for _ in 0..2 {
            now += GOVERNOR_WINDOW;
            governor.decide(&busy(500, 900), now);
        }
        assert_eq!(
            governor.baseline().unwrap(),
            first.mul_f64(LATENCY_TOLERANCE)
        );
        assert_eq!(governor.rate(), before);
        // The next measurement is much quicker: the baseline falls by the tolerance at
        // most.
        let raised = governor.baseline().unwrap();
        governor.measuring = Some(governor.rate);
        for _ in 0..2 {
            now += GOVERNOR_WINDOW;
            governor.decide(&busy(20, 30), now);
        }
        assert_eq!(
            governor.baseline().unwrap(),
            raised.div_f64(LATENCY_TOLERANCE)
        );
    }

    #[test]
    fn hosts_that_get_busy_before_any_baseline_send_the_copy_to_the_floor_to_measure_one() {
        let mut governor = Governor::new(1024 * MIB);
        let mut now = Duration::ZERO;
        for _ in 0..6 {
            now += GOVERNOR_WINDOW;
            governor.decide(&Window::of([]), now);
        }
        assert_eq!(governor.rate(), 64 * MIB);
        now += GOVERNOR_WINDOW;
        assert_eq!(governor.decide(&busy(80, 150), now), Verdict::Pooling);
        now += GOVERNOR_WINDOW;
        assert_eq!(governor.decide(&busy(80, 150), now), Verdict::Measuring);
        assert_eq!(governor.rate(), MIB);
        now += GOVERNOR_WINDOW;
        governor.decide(&busy(80, 150), now);
        now += GOVERNOR_WINDOW;
        assert_eq!(governor.decide(&busy(80, 150), now), Verdict::Measured);
        assert_eq!(governor.rate(), 64 * MIB);
    }

    /// A simulated host and copy: host writes keep their tail while the copy moves at
    /// most 40 MiB/s and 3 % of them slow down past that, and one window in four has a
    /// disk hiccup that has nothing to do with the copy. The first governor, deciding
    /// on each window alone, halved at every hiccup; this one must spend most of the
    /// time near the knee, and rarely above it.
    #[test]
    fn a_noisy_host_lets_the_copy_run_near_the_rate_the_host_tolerates() {
        const KNEE: u64 = 40 * MIB;
        let mut governor = Governor::new(1024 * MIB);
        let mut now = Duration::ZERO;
        let mut random: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        let (mut moved, mut windows_above_knee) = (0u64, 0u32);
        let windows = 1500;
        for _ in 0..windows {
            let rate = governor.rate();
            moved += rate / 5;
            let hurt = if rate > KNEE {
                windows_above_knee += 1;
                48
            } else {
                0
            };
            let hiccup = if next() % 4 == 0 { 20 } else { 0 };
            let window = Window::of(
                std::iter::repeat_n(micros(80), 1600 - 16 - hurt - hiccup)
                    .chain(std::iter::repeat_n(micros(150), 16))
                    .chain(std::iter::repeat_n(micros(400), hurt))
                    .chain(std::iter::repeat_n(micros(2_000), hiccup)),
            );
            now += GOVERNOR_WINDOW;
            governor.observe(&window, now);
        }
        let seconds = windows as u64 / 5;
        let average = moved / seconds;
        assert!(
            average >= KNEE / 2,
            "the copy averaged {} MiB/s against a knee of 40",
            average / MIB
        );
        assert!(
            windows_above_knee * 4 < windows,
            "{windows_above_knee} of {windows} windows ran above the knee"
        );
    }

    #[test]
    fn a_lower_node_ceiling_caps_the_rate_and_the_floor() {
        let mut governor = Governor::new(512 << 10);
        assert_eq!(governor.rate(), 512 << 10);
        let now = GOVERNOR_WINDOW;
        assert_eq!(governor.observe(&Window::of([]), now), 512 << 10);
        governor.set_ceiling(4 * MIB);
        for step in 1..10 {
            governor.observe(&Window::of([]), now * step);
        }
        assert_eq!(governor.rate(), 4 * MIB);
    }
}
