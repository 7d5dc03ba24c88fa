//! Fail points for the crash tests: named places where a test makes a command stop as if
//! the node died there. They are compiled in only with the `failpoints` cargo feature,
//! which only the tests enable; without it [`hit`] does nothing.
//!
//! The `fail` crate's registry is global to the process, and the tests of one binary run
//! side by side on threads; so a fail point fires only on a thread that armed it (see
//! [`arm_this_thread`]), or anywhere in a process started with `FAILPOINTS` set.

use crate::Result;

#[cfg(feature = "failpoints")]
thread_local! {
    static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Stops here with [`crate::Error::FailPoint`] when a test has set the fail point `name`
/// to `return`; every other action of the `fail` crate (sleep, panic, pause) works too.
pub fn hit(name: &'static str) -> Result<()> {
    #[cfg(feature = "failpoints")]
    if ARMED.with(|armed| armed.get()) || std::env::var_os("FAILPOINTS").is_some() {
        fail::fail_point!(name, |_| Err(crate::Error::FailPoint {
            name: name.to_string()
        }));
    }
    let _ = name;
    Ok(())
}

/// Whether a copied `track` is to be stored corrupted: the test hook
/// `node::store::corrupt-copied-track`, set to `return(TRACK)` (that track, every time it
/// is stored) or `return(TRACK:once)` (only the first time in this process). The store
/// flips a byte of it after the copy's checksums were checked, as a disk might, so only
/// a digest of the stored bytes can tell.
pub fn corrupt_copied_track(track: u64) -> bool {
    #[cfg(feature = "failpoints")]
    if ARMED.with(|armed| armed.get()) || std::env::var_os("FAILPOINTS").is_some() {
        static CORRUPTED_ONCE: parking_lot::Mutex<Vec<u64>> = parking_lot::Mutex::new(Vec::new());
        let wanted = fail::eval("node::store::corrupt-copied-track", |value| value).flatten();
        let Some(wanted) = wanted else { return false };
        let (number, once) = match wanted.split_once(':') {
            Some((number, "once")) => (number, true),
            _ => (wanted.as_str(), false),
        };
        if number.parse::<u64>() != Ok(track) {
            return false;
        }
        if once {
            let mut corrupted = CORRUPTED_ONCE.lock();
            if corrupted.contains(&track) {
                return false;
            }
            corrupted.push(track);
        }
        tracing::warn!(track, "a test hook stores this copied track corrupted");
        return true;
    }
    let _ = track;
    false
}

/// Lets fail points fire on the calling thread (or stops them).
#[cfg(feature = "failpoints")]
pub fn arm_this_thread(armed: bool) {
    ARMED.with(|cell| cell.set(armed));
}

/// Sets fail point `name` to `actions` (the `fail` crate's syntax, e.g. `return` or
/// `1*return`).
#[cfg(feature = "failpoints")]
pub fn configure(name: &str, actions: &str) -> std::result::Result<(), String> {
    fail::cfg(name, actions)
}

/// Removes fail point `name`.
#[cfg(feature = "failpoints")]
pub fn remove(name: &str) {
    fail::remove(name);
}

/// The deliberate bugs the chaos checkers are tested against (`chaos/`, `docs/CHAOS.md`):
/// each breaks one promise a checker guards. They are compiled in only with the
/// `failpoints` feature (test builds) and one is turned on for a whole node process by
/// the environment variable `TANDEM_DELIBERATE_BUG=NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliberateBug {
    /// Host writes skip the write-ahead log and a FLUSH is acknowledged while they are
    /// only in memory: a kill -9 loses flushed writes (the writes checker).
    AckFlushBeforeSync,
    /// A copy step clears the session bits of tracks whose store on the target failed,
    /// as if it had cleared them before the target acknowledged: the next pass never
    /// sends them and a mirror's BCV misses them (the copies checker).
    ClearBitBeforeAcknowledged,
    /// A host write to an active clone's source goes ahead without copying the track's
    /// point-in-time data first (the copies checker).
    SkipCopyBeforeWrite,
    /// Progress counts every copied track twice, as if each had been sent again, so the
    /// percent passes 100 (the progress checker).
    ProgressCountsResendTwice,
}

impl DeliberateBug {
    pub const ALL: [DeliberateBug; 4] = [
        DeliberateBug::AckFlushBeforeSync,
        DeliberateBug::ClearBitBeforeAcknowledged,
        DeliberateBug::SkipCopyBeforeWrite,
        DeliberateBug::ProgressCountsResendTwice,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DeliberateBug::AckFlushBeforeSync => "ack-flush-before-sync",
            DeliberateBug::ClearBitBeforeAcknowledged => "clear-bit-before-acknowledged",
            DeliberateBug::SkipCopyBeforeWrite => "skip-copy-before-write",
            DeliberateBug::ProgressCountsResendTwice => "progress-counts-resend-twice",
        }
    }
}

/// Whether this process runs with `bug` turned on (never without the `failpoints`
/// feature).
pub fn deliberate_bug(bug: DeliberateBug) -> bool {
    #[cfg(feature = "failpoints")]
    {
        static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let chosen = CHOSEN.get_or_init(|| std::env::var("TANDEM_DELIBERATE_BUG").ok());
        if chosen.as_deref() == Some(bug.name()) {
            return true;
        }
    }
    let _ = bug;
    false
}
