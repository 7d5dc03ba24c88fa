//! The default copy QoS: copies run as fast as host write latency allows.
//!
//! Pure logic, time passed in. The node measures every host write's latency into a
//! [`LatencyHistogram`]; every [`GOVERNOR_WINDOW`] the copier hands the window's counts to
//! [`Governor::observe`], which returns the rate for copies without their own `--rate`.
//! The rule is additive increase, multiplicative decrease against a baseline: the host
//! write p99 measured while copies ran at the floor rate. When hosts barely write, copies
//! speed up quickly; when the window's p99 rises past [`LATENCY_TOLERANCE`] times the
//! baseline, the rate halves, never below the floor, so a copy always progresses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the governor looks at host latency and sets the rate.
pub const GOVERNOR_WINDOW: Duration = Duration::from_millis(200);
/// The rate copies keep whatever the hosts do, so that every copy finishes.
pub const RATE_FLOOR_BYTES_PER_SECOND: u64 = 1 << 20;
/// Host write p99 may rise to this multiple of the baseline before copies slow down;
/// below the 1.5 the issue allows, to leave room for the windows that probe upward.
pub const LATENCY_TOLERANCE: f64 = 1.2;
/// Fewer host writes than this in a window say nothing about their tail: the hosts are
/// nearly idle and copies may speed up.
pub const WINDOW_SAMPLES_MIN: u64 = 100;
/// How long a baseline is trusted before the governor measures it again with a window at
/// the floor rate: the disk's idle latency drifts with its load and fill.
pub const BASELINE_AGE_MAX: Duration = Duration::from_secs(10);

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
    /// The last window ran at the floor to measure the baseline.
    measuring: bool,
}

impl Governor {
    /// Starts at the floor, measuring the baseline; `ceiling` is the node's copy rate.
    pub fn new(ceiling: u64) -> Governor {
        Governor {
            rate: RATE_FLOOR_BYTES_PER_SECOND.min(ceiling),
            ceiling,
            baseline: None,
            baseline_measured: Duration::ZERO,
            measuring: true,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// Takes the window that just ended (at `now`) and returns the rate for the next.
    pub fn observe(&mut self, window: &Window, now: Duration) -> u64 {
        let floor = RATE_FLOOR_BYTES_PER_SECOND.min(self.ceiling);
        let p99 = (window.samples() >= WINDOW_SAMPLES_MIN)
            .then(|| window.p99())
            .flatten();
        if self.measuring {
            self.measuring = false;
            if let Some(p99) = p99 {
                // A baseline never jumps up by more than the tolerance at once: a window
                // at the floor that was slow for another reason must not license more.
                self.baseline = Some(match self.baseline {
                    Some(old) => p99.min(old.mul_f64(LATENCY_TOLERANCE)),
                    None => p99,
                });
                self.baseline_measured = now;
            }
        }
        self.rate = match (p99, self.baseline) {
            // Hosts are (nearly) idle: speed up fast.
            (None, _) => self.rate.saturating_mul(2),
            (Some(_), None) => {
                self.measuring = true;
                floor
            }
            (Some(p99), Some(baseline)) if p99 > baseline.mul_f64(LATENCY_TOLERANCE) => {
                self.rate / 2
            }
            (Some(_), Some(_)) => self.rate + (self.rate / 4).max(floor),
        }
        .clamp(floor, self.ceiling);
        if p99.is_some() && now.saturating_sub(self.baseline_measured) >= BASELINE_AGE_MAX {
            self.measuring = true;
            self.rate = floor;
        }
        self.rate
    }

    /// The node's copy rate changed.
    pub fn set_ceiling(&mut self, ceiling: u64) {
        self.ceiling = ceiling;
        self.rate = self.rate.min(ceiling);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn micros(value: u64) -> Duration {
        Duration::from_micros(value)
    }

    /// A window of 1000 host writes: 990 at `typical` µs and 10 at `tail` µs.
    fn busy(typical: u64, tail: u64) -> Window {
        Window::of(
            std::iter::repeat_n(micros(typical), 990).chain(std::iter::repeat_n(micros(tail), 10)),
        )
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

    #[test]
    fn a_slow_tail_halves_the_rate_and_a_good_window_adds_a_quarter() {
        let mut governor = Governor::new(1024 * MIB);
        let mut now = GOVERNOR_WINDOW;
        // The first busy window, at the floor, sets the baseline; it was good, so the
        // rate rises.
        assert_eq!(governor.observe(&busy(80, 150), now), 2 * MIB);
        assert!(governor.baseline().unwrap() <= micros(90));
        let mut rate = 2 * MIB;
        for _ in 0..6 {
            now += GOVERNOR_WINDOW;
            let next = governor.observe(&busy(80, 150), now);
            assert_eq!(next, rate + (rate / 4).max(MIB));
            rate = next;
        }
        // The copy now hurts the tail: 2 % of writes take 400 µs.
        now += GOVERNOR_WINDOW;
        let hurt = Window::of(
            std::iter::repeat_n(micros(80), 980).chain(std::iter::repeat_n(micros(400), 20)),
        );
        assert_eq!(governor.observe(&hurt, now), rate / 2);
        // It never goes below the floor.
        for _ in 0..20 {
            now += GOVERNOR_WINDOW;
            assert!(governor.observe(&hurt, now) >= MIB);
        }
        assert_eq!(governor.rate(), MIB);
    }

    #[test]
    fn the_baseline_is_measured_again_at_the_floor_and_never_jumps_up() {
        let mut governor = Governor::new(1024 * MIB);
        let mut now = GOVERNOR_WINDOW;
        governor.observe(&busy(80, 150), now);
        let first = governor.baseline().unwrap();
        while now < BASELINE_AGE_MAX {
            now += GOVERNOR_WINDOW;
            governor.observe(&busy(80, 150), now);
        }
        now += GOVERNOR_WINDOW;
        // The aged baseline sends the copy to the floor for one measuring window...
        assert_eq!(governor.observe(&busy(80, 150), now), MIB);
        // ...in which the disk happens to be much slower: the baseline rises by the
        // tolerance at most.
        now += GOVERNOR_WINDOW;
        governor.observe(&busy(500, 900), now);
        assert_eq!(
            governor.baseline().unwrap(),
            first.mul_f64(LATENCY_TOLERANCE)
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
