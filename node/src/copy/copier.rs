//! The copier: the loop that drives every copying session's steps on the node's copier
//! threads, the synchronous driver tests use instead, and the governor's window that
//! sets the copies' rate from the hosts' write latency.

use super::governor::GOVERNOR_WINDOW;
use super::{suspend, Sessions};
use crate::engine::Engine;
use crate::Result;
use protocol::session::{SessionCommand, SessionId, SessionState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl<E: Engine> Sessions<E> {
    /// The ids of sessions with copy work in their state, and whether a rotation waits
    /// for a split.
    pub fn copying(&self) -> Vec<SessionId> {
        self.table
            .lock()
            .sessions
            .values()
            .filter(|live| live.record.copies())
            .map(|live| live.record.id)
            .collect()
    }

    /// Rotations whose reestablish has synchronized and that now split again.
    fn due_splits(&self) -> Vec<String> {
        self.table
            .lock()
            .sessions
            .values()
            .filter(|live| {
                live.record.split_when_synchronized
                    && live.record.state == SessionState::Synchronized
            })
            .map(|live| live.record.target.clone())
            .collect()
    }

    /// Runs every session's copy until none has work left: the synchronous driver used
    /// by tests and by the model-based property test.
    pub fn settle(&self) -> Result<()> {
        loop {
            let mut worked = false;
            for id in self.copying() {
                let outcome = self.copy_step(id)?;
                worked |= !outcome.idle;
            }
            for bcv in self.due_splits() {
                self.command(SessionCommand::MirrorSplit {
                    bcv,
                    differential: false,
                })?;
                worked = true;
            }
            if !worked {
                return Ok(());
            }
        }
    }

    /// Runs the copies on the calling thread until `stop` is set: the node gives this its
    /// own thread, at the lowest scheduling priority, so that host IO always gets the
    /// processor first (see [`lower_thread_priority`]).
    /// Several copier threads may run; the one with `rotations` also carries out the
    /// splits that rotations wait for.
    pub fn run_copier(self: Arc<Self>, stop: Arc<AtomicBool>, rotations: bool) {
        let mut window_started = Instant::now();
        let mut probed = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if rotations && window_started.elapsed() >= GOVERNOR_WINDOW {
                window_started = Instant::now();
                self.govern();
            }
            if rotations && probed.elapsed() >= suspend::PROBE_INTERVAL {
                if let Err(error) = self.probe_targets() {
                    tracing::warn!(%error, "probing the targets of suspended sessions failed");
                }
                probed = Instant::now();
            }
            let mut worked = false;
            let mut wait = Duration::ZERO;
            for id in self.copying() {
                match self.paced_step(id) {
                    Ok(outcome) => {
                        worked |= !outcome.idle;
                        wait = wait.max(outcome.wait);
                    }
                    Err(error) => {
                        tracing::warn!(session = id, %error, "copy step failed; retrying");
                        self.record_error(id, error.to_string());
                        self.suspend_after_step(id, &error);
                        wait = wait.max(Duration::from_millis(500));
                    }
                }
            }
            for bcv in self.due_splits().into_iter().filter(|_| rotations) {
                if let Err(error) = self.command(SessionCommand::MirrorSplit {
                    bcv,
                    differential: false,
                }) {
                    tracing::warn!(%error, "rotation split failed");
                }
            }
            let pause = if worked {
                wait
            } else {
                wait.max(Duration::from_millis(20))
            };
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Ends a governor window: the host write latencies seen in it set the rate of the
    /// copies without their own limit (see [`governor`]).
    fn govern(&self) {
        let window = self.host_latency.take();
        let rate = self.governor.lock().observe(&window, self.epoch.elapsed());
        for live in self.table.lock().sessions.values_mut() {
            if live.record.rate_limit_mebibytes_per_second.is_none() {
                live.limit.set_rate(rate);
            }
        }
        // What the copies are held to, not what the default QoS proposes: sessions with
        // their own --rate and the node's ceiling limit them too.
        metrics::gauge!(crate::metrics::COPY_GOVERNED_BYTES_PER_SECOND)
            .set(self.applied_copy_rate() as f64);
    }
}
