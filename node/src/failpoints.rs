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
