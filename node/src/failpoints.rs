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
