//! Log lines about failing peers, at most one per peer per interval, with a count of the
//! repeats left out: a dead member or a rejected certificate is reported from the first
//! try without filling the log twice a second.
//!
//! [`LogLimiter`] is pure (the time is passed in); [`warn_peer`] and [`info_once_per`]
//! hold one limiter for the process.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// At most one line per peer (or topic) in this long.
pub const PEER_LOG_INTERVAL_SECONDS: u64 = 30;

/// A limiter holds this many keys at most; beyond, the oldest logged key is forgotten, so
/// peers with ever-new addresses cannot grow it without bound.
pub const LOG_LIMITER_KEYS_MAX: usize = 1024;

/// Decides which of the repeated events about one key are logged.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    keys: HashMap<String, KeyState>,
}

#[derive(Debug, Clone, Copy)]
struct KeyState {
    last_logged: Instant,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            keys: HashMap::new(),
        }
    }

    /// Whether an event about `key` at `now` is logged; when it is, how many events about
    /// the key were left out since the last logged one.
    pub fn admit(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some(state) = self.keys.get_mut(key) {
            if now.saturating_duration_since(state.last_logged) < self.interval {
                state.suppressed += 1;
                return None;
            }
            let suppressed = state.suppressed;
            *state = KeyState {
                last_logged: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if self.keys.len() >= LOG_LIMITER_KEYS_MAX {
            if let Some(oldest) = self
                .keys
                .iter()
                .min_by_key(|(_, state)| state.last_logged)
                .map(|(key, _)| key.clone())
            {
                self.keys.remove(&oldest);
            }
        }
        self.keys.insert(
            key.to_string(),
            KeyState {
                last_logged: now,
                suppressed: 0,
            },
        );
        Some(0)
    }

    /// Forgets `key`, so that its next event is logged at once (the peer recovered).
    pub fn forget(&mut self, key: &str) {
        self.keys.remove(key);
    }
}

static PROCESS_LIMITER: LazyLock<Mutex<LogLimiter>> = LazyLock::new(|| {
    Mutex::new(LogLimiter::new(Duration::from_secs(
        PEER_LOG_INTERVAL_SECONDS,
    )))
});

/// The words added to a line when repeats were left out before it.
fn repeats(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more in the last {PEER_LOG_INTERVAL_SECONDS} s not logged)")
    }
}

/// Logs a warning about `peer` (an address) unless one about the same peer and `what` was
/// logged less than [`PEER_LOG_INTERVAL_SECONDS`] ago.
pub fn warn_peer(what: &str, peer: &str, detail: &str) {
    let admitted = PROCESS_LIMITER
        .lock()
        .admit(&format!("{what}|{peer}"), Instant::now());
    if let Some(suppressed) = admitted {
        tracing::warn!(%peer, "{what} {peer}: {detail}{}", repeats(suppressed));
    }
}

/// Marks `peer` as working again for `what`, so that its next failure is logged at once.
pub fn peer_recovered(what: &str, peer: &str) {
    PROCESS_LIMITER.lock().forget(&format!("{what}|{peer}"));
}

/// Logs an informational line about `topic` at most once per interval.
pub fn info_once_per_interval(topic: &str, message: &str) {
    if let Some(suppressed) = PROCESS_LIMITER.lock().admit(topic, Instant::now()) {
        tracing::info!("{message}{}", repeats(suppressed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_interval_with_the_count_left_out() {
        let mut limiter = LogLimiter::new(Duration::from_secs(30));
        let start = Instant::now();
        assert_eq!(limiter.admit("a", start), Some(0));
        assert_eq!(limiter.admit("b", start), Some(0));
        for second in 1..30 {
            assert_eq!(
                limiter.admit("a", start + Duration::from_secs(second)),
                None
            );
        }
        assert_eq!(
            limiter.admit("a", start + Duration::from_secs(30)),
            Some(29)
        );
        assert_eq!(limiter.admit("a", start + Duration::from_secs(31)), None);
        limiter.forget("a");
        assert_eq!(limiter.admit("a", start + Duration::from_secs(32)), Some(0));
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let mut limiter = LogLimiter::new(Duration::from_secs(30));
        let start = Instant::now();
        for index in 0..LOG_LIMITER_KEYS_MAX + 10 {
            let now = start + Duration::from_millis(index as u64);
            assert_eq!(limiter.admit(&format!("peer-{index}"), now), Some(0));
        }
        assert_eq!(limiter.keys.len(), LOG_LIMITER_KEYS_MAX);
        // The oldest keys were forgotten, so they are logged again at once.
        assert_eq!(limiter.admit("peer-0", start), Some(0));
    }
}
