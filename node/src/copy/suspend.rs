//! Losing a session's remote target (issue 11 item 5).
//!
//! DRBD's fencing policies and SRDF's domino mode are the anchors: by default the primary
//! stays writable and tracks what the peer missed. When the node holding a session's
//! target does not answer within the session's target timeout, the session is
//! *suspended*: host writes are acknowledged locally and only mark the session's bits
//! (the standard's write marks already set them), so a host write waits at most one
//! target timeout, once. The copier probes the target every [`PROBE_INTERVAL`]; when it
//! answers, the session resumes by itself (a mirror resynchronizes the tracks written
//! meanwhile and is synchronized again). A strict sync mirror never suspends: its host
//! writes fail instead, as before.
//!
//! A mirror cancelled while its BCV's node does not answer ends here at once (slot freed,
//! record gone); the BCV's registration is released when that node answers again: the
//! intent is stored in the same batch that drops the session record, and the copier
//! delivers it. A target also lets the same source node replace a registration of a
//! session that node has ended (see `register_target`).

use super::Sessions;
use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::{BitChange, Bits, Volume};
use crate::{Error, Result};
use protocol::session::{
    MirrorMode, RemoteVolume, SessionId, SessionKind, SessionState, TargetAnswer, TargetOperation,
};
use std::time::Duration;

/// How often the copier asks the target of a suspended session whether it answers again,
/// and delivers the releases of cancelled sessions' targets.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The longest one probe waits: a dead target must not hold the copier thread for long.
pub const PROBE_TIMEOUT_MILLISECONDS_MAX: u64 = 500;

const UNREGISTER_KEY_PREFIX: &[u8] = b"u/";
const UNREGISTER_KEY_END: &[u8] = b"u0";

pub(super) fn unregister_key(session: SessionId) -> Vec<u8> {
    let mut key = UNREGISTER_KEY_PREFIX.to_vec();
    key.extend_from_slice(&session.to_be_bytes());
    key
}

/// Whether an error means the target's node did not answer (or answered that it cannot
/// serve the session): what suspends a session rather than failing it.
pub(super) fn target_unanswered(error: &Error) -> bool {
    matches!(error, Error::Remote { .. } | Error::TargetUnanswered { .. })
}

impl<E: Engine> Sessions<E> {
    /// How long the session's target may take to answer.
    pub(super) fn target_timeout(&self, id: SessionId) -> Duration {
        let milliseconds = self.table.lock().sessions.get(&id).map_or(
            protocol::session::TARGET_TIMEOUT_MILLISECONDS_DEFAULT,
            |live| live.record.target_timeout_milliseconds,
        );
        Duration::from_millis(milliseconds)
    }

    /// Synchronized sync mirrors of a host write's volume: the BCV has the write before
    /// the host hears of it. A BCV on another node that does not answer within the
    /// session's target timeout suspends the session, and the write is acknowledged with
    /// its pending bits left set; a strict mirror fails the write instead.
    pub(super) fn ship_host_write(
        &self,
        id: SessionId,
        volume: &Volume,
        bcv: &dyn super::target::Target,
        first: u64,
        last: u64,
        durability: Durability,
    ) -> Result<()> {
        for track in first..=last {
            // Another write may have suspended the session since this one looked.
            let current = self.table.lock().sessions.get(&id).map(|live| {
                (
                    live.record.state,
                    live.record.mode,
                    live.record.slot,
                    live.record.strict,
                )
            });
            let Some((SessionState::Synchronized, MirrorMode::Sync, slot, strict)) = current else {
                return Ok(());
            };
            let shipped = self.ship(
                id,
                volume,
                bcv,
                track,
                &[BitChange {
                    volume,
                    bits: Bits::Pending(slot),
                    track,
                    set: false,
                }],
                durability,
            );
            match shipped {
                Ok(_) => {}
                Err(error)
                    if !strict && target_unanswered(&error) && self.suspend_live(id, &error) =>
                {
                    // The write is stored here and its pending bit set: the resync
                    // brings it to the BCV.
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// A copy step failed: a session whose remote target does not answer is suspended.
    pub(super) fn suspend_after_step(&self, id: SessionId, error: &Error) {
        if target_unanswered(error) {
            let _gates = self.session_gates(id);
            self.suspend_live(id, error);
        }
    }

    /// Suspends the session if its state allows it (see [`next_state`]), its target is
    /// on another node and it is not a strict mirror; returns whether it is suspended.
    /// Only the state and the record change: the bits already say what the target lacks.
    fn suspend_live(&self, id: SessionId, error: &Error) -> bool {
        let mut table = self.table.lock();
        let Some(live) = table.sessions.get_mut(&id) else {
            return false;
        };
        if live.record.state == SessionState::Suspended {
            return true;
        }
        let Some(record) = super::session_core::suspend(
            &live.record,
            &error.to_string(),
            super::now_unix_seconds(),
        ) else {
            return false;
        };
        let remote = record
            .remote
            .clone()
            .expect("only a remote target suspends");
        live.record = record;
        let record = live.record.clone();
        drop(table);
        tracing::warn!(session = id, node = %remote.node, volume = %remote.volume, %error, "session suspended: its target does not answer");
        if let Err(error) = self.persist(&record) {
            // The table holds the state; the next change of the record stores it.
            tracing::warn!(session = id, %error, "could not store the suspended session");
        }
        true
    }

    /// The ids of suspended sessions, with their targets and probe timeouts.
    fn suspended(&self) -> Vec<(SessionId, RemoteVolume, Duration)> {
        self.table
            .lock()
            .sessions
            .values()
            .filter(|live| live.record.state == SessionState::Suspended)
            .filter_map(|live| {
                let timeout = live
                    .record
                    .target_timeout_milliseconds
                    .min(PROBE_TIMEOUT_MILLISECONDS_MAX);
                live.record
                    .remote
                    .clone()
                    .map(|remote| (live.record.id, remote, Duration::from_millis(timeout)))
            })
            .collect()
    }

    /// Asks the target of every suspended session whether it answers, and resumes those
    /// that do; delivers the releases of cancelled sessions' targets. Returns the
    /// sessions resumed. The copier calls this every [`PROBE_INTERVAL`].
    pub fn probe_targets(&self) -> Result<Vec<SessionId>> {
        self.deliver_unregisters();
        let mut resumed = Vec::new();
        for (id, remote, timeout) in self.suspended() {
            let link = self.link()?;
            match link.call_within(&remote, TargetOperation::Probe { session: id }, timeout) {
                Ok(TargetAnswer::Done) => {
                    if self.resume(id)? {
                        resumed.push(id);
                    }
                }
                Ok(answer) => {
                    tracing::debug!(session = id, ?answer, "unexpected probe answer");
                }
                Err(error) => {
                    tracing::debug!(session = id, %error, "target of a suspended session still does not answer");
                }
            }
        }
        Ok(resumed)
    }

    /// The target of a suspended session answers again: it goes back to work with host
    /// IO held off, so a mirror's resync counts exactly the tracks hosts wrote meanwhile.
    fn resume(&self, id: SessionId) -> Result<bool> {
        let _gates = self.session_gates(id);
        let Some(record) = self
            .table
            .lock()
            .sessions
            .get(&id)
            .map(|live| live.record.clone())
            .filter(|record| record.state == SessionState::Suspended)
        else {
            return Ok(false);
        };
        // A mirror resynchronizes exactly what its pending bits list now.
        let pending = match record.kind {
            SessionKind::Mirror => {
                let source = self.store.volume(&record.source)?;
                self.store.count_set(&source, Bits::Pending(record.slot))?
            }
            SessionKind::Clone => 0,
        };
        let record = super::session_core::resume(&record, pending).map_err(|reason| {
            Error::SessionRefused {
                command: "resume".to_string(),
                session: record.describe(),
                reason,
            }
        })?;
        tracing::info!(session = id, state = %record.state, tracks = record.progress.tracks_total, "target answers again; session resumed");
        self.persist(&record)?;
        self.install(record);
        Ok(true)
    }

    /// The releases of cancelled sessions' targets not delivered yet.
    pub fn pending_unregisters(&self) -> Result<Vec<(SessionId, RemoteVolume)>> {
        let mut pending = Vec::new();
        let mut failure = None;
        self.store.engine().scan(
            Space::Meta,
            UNREGISTER_KEY_PREFIX,
            UNREGISTER_KEY_END,
            &mut |key, value| {
                let session = key
                    .get(UNREGISTER_KEY_PREFIX.len()..)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(SessionId::from_be_bytes);
                match (session, protocol::codec::decode::<RemoteVolume>(value)) {
                    (Some(session), Ok(remote)) => {
                        pending.push((session, remote));
                        true
                    }
                    (_, decoded) => {
                        failure = Some(Error::Metadata {
                            what: format!("target release key {key:02x?}"),
                            detail: decoded.err().map_or_else(
                                || "the key names no session".to_string(),
                                |error| error.to_string(),
                            ),
                        });
                        false
                    }
                }
            },
        )?;
        match failure {
            Some(error) => Err(error),
            None => Ok(pending),
        }
    }

    /// Tells the targets of sessions cancelled while they did not answer to release
    /// their volumes; each release is forgotten once its target acknowledged it.
    fn deliver_unregisters(&self) {
        let pending = match self.pending_unregisters() {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!(%error, "cannot read the target releases to deliver");
                return;
            }
        };
        let Ok(link) = self.link() else {
            return;
        };
        for (session, remote) in pending {
            let timeout = Duration::from_millis(PROBE_TIMEOUT_MILLISECONDS_MAX);
            match link.call_within(&remote, TargetOperation::release(session), timeout) {
                Ok(_) => {
                    let mut batch = Batch::default();
                    batch.delete(Space::Meta, unregister_key(session));
                    match self.store.engine().write(batch, Durability::Synced) {
                        Ok(()) => {
                            tracing::info!(session, node = %remote.node, volume = %remote.volume, "the target of a cancelled session released its volume")
                        }
                        Err(error) => {
                            tracing::warn!(session, %error, "could not forget a delivered target release")
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(session, %error, "target of a cancelled session still does not answer")
                }
            }
        }
    }
}
