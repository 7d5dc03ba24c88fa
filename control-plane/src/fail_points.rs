//! Fail points (the `fail` crate) for tests that end a process at a named place. They are
//! compiled in only with this crate's `failpoints` feature, which only the tandem crate's
//! tests turn on; without it every point here is empty and `setup` reads nothing.
//!
//! Points are named `<crate>::<place>` and armed through the `FAILPOINTS` environment
//! variable of the process, e.g.
//! `FAILPOINTS=control-plane::session::after-node-call=return(mirror split)`.

/// Whether this build has fail points.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// The exit status of a process ended by a fail point: that of a SIGKILL, which is what
/// the point plays.
pub const EXIT_STATUS: i32 = 137;

/// The fail points armed from `FAILPOINTS`, for as long as this lives.
pub struct FailPoints {
    #[cfg(feature = "failpoints")]
    _scenario: fail::FailScenario<'static>,
}

/// Arms the fail points named in `FAILPOINTS` (a build without them ignores it). The
/// point `control-plane::fail-points::setup` is evaluated at once, so a test can check
/// that the binary it runs really has fail points: armed with `return`, it ends the
/// process with [`EXIT_STATUS`].
pub fn setup() -> FailPoints {
    let fail_points = FailPoints {
        #[cfg(feature = "failpoints")]
        _scenario: fail::FailScenario::setup(),
    };
    exit_point("control-plane::fail-points::setup", "");
    fail_points
}

/// Ends the process with [`EXIT_STATUS`] at `place` when a test armed it with `return`,
/// or with `return(CONTEXT)` and `context` is CONTEXT (for example a session command's
/// name, so that only a split ends the process).
pub fn exit_point(place: &str, context: &str) {
    fail::fail_point!(place, |only: Option<String>| {
        if only
            .as_deref()
            .is_none_or(|only| only.is_empty() || only == context)
        {
            tracing::error!(%place, %context, "fail point reached: ending the process");
            std::process::exit(EXIT_STATUS);
        }
    });
    let _ = (place, context);
}
