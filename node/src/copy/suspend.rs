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
//! A session whose target is on another node ends there after it ended here: the
//! release (tracking off, a cancelled clone's invalid bits, readiness, registration) is
//! stored as owed in the batch that drops the session's record and frees its slot, and
//! the command delivers it once its gates are released — no command waits on the network
//! with its volumes held. A release that was not delivered then (that node does not
//! answer, or the answer was lost) is delivered by the copier when that node answers
//! again, without its readiness: the catalog recorded the readiness the target's node
//! reported when the session ended, and a late release does not change it. A target also
//! lets the same source node replace a registration of a session it has ended (see
//! `register_target`).

use super::Sessions;
use crate::engine::{Batch, Durability, Engine, Space};
use crate::store::{Bits, Volume};
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

const RELEASE_KEY_PREFIX: &[u8] = b"u/";
const RELEASE_KEY_END: &[u8] = b"u0";
/// The first byte of an owed release of the current layout (the remote volume and the
/// whole release operation). Releases stored before it hold only the remote volume, in
/// bincode, which never begins with 255.
const RELEASE_FORMAT_MARKER: u8 = 0xff;
const RELEASE_FORMAT_VERSION: u8 = 1;

pub(super) fn release_key(session: SessionId) -> Vec<u8> {
    let mut key = RELEASE_KEY_PREFIX.to_vec();
    key.extend_from_slice(&session.to_be_bytes());
    key
}

/// A session's release its target's node has not acknowledged yet.
#[derive(Debug, Clone, PartialEq)]
pub struct OwedRelease {
    pub session: SessionId,
    pub remote: RemoteVolume,
    /// A [`TargetOperation::Release`].
    pub release: TargetOperation,
}

impl OwedRelease {
    pub(super) fn encode(&self) -> Result<Vec<u8>> {
        let mut bytes = vec![RELEASE_FORMAT_MARKER, RELEASE_FORMAT_VERSION];
        bytes.extend(protocol::codec::encode(&(&self.remote, &self.release))?);
        Ok(bytes)
    }

    fn decode(session: SessionId, bytes: &[u8]) -> Result<OwedRelease> {
        let (remote, release) = match bytes {
            [RELEASE_FORMAT_MARKER, RELEASE_FORMAT_VERSION, rest @ ..] => {
                protocol::codec::decode::<(RemoteVolume, TargetOperation)>(rest)?
            }
            [RELEASE_FORMAT_MARKER, version, ..] => {
                return Err(Error::Metadata {
                    what: format!("owed release of session {session}"),
                    detail: format!("stored in layout version {version}, which this build does not know (it reads {RELEASE_FORMAT_VERSION}): run a newer tandem"),
                })
            }
            _ => (
                protocol::codec::decode::<RemoteVolume>(bytes)?,
                TargetOperation::release(session),
            ),
        };
        Ok(OwedRelease {
            session,
            remote,
            release,
        })
    }

    /// The release as delivered late: without its readiness (see the module's comment).
    fn late(&self) -> TargetOperation {
        match &self.release {
            TargetOperation::Release {
                session,
                clear_invalid,
                ..
            } => TargetOperation::Release {
                session: *session,
                clear_invalid: clear_invalid.clone(),
                readiness: None,
            },
            _ => TargetOperation::release(self.session),
        }
    }
}

/// Whether an error means the target's node did not answer (or answered that it cannot
/// serve the session): what suspends a session rather than failing it.
pub(super) fn target_unanswered(error: &Error) -> bool {
    matches!(error, Error::Remote { .. } | Error::TargetUnanswered { .. })
}

/// The releases one command stored as owed, which it delivers itself once its gates are
/// released; until then the copier leaves them alone (it would deliver them without their
/// readiness). Dropped undelivered, they are the copier's.
#[must_use = "a command delivers the releases it stored once its gates are released"]
pub(super) struct ReleasesInHand<'s, E: Engine> {
    sessions: &'s Sessions<E>,
    owed: Vec<(OwedRelease, Duration)>,
}

impl<'s, E: Engine> ReleasesInHand<'s, E> {
    pub(super) fn new(sessions: &'s Sessions<E>) -> Self {
        ReleasesInHand {
            sessions,
            owed: Vec::new(),
        }
    }

    /// Takes a release before the batch that stores it is written, so the copier never
    /// sees it stored and not in hand.
    pub(super) fn hold(&mut self, release: OwedRelease, timeout: Duration) {
        self.sessions.in_hand.lock().insert(release.session);
        self.owed.push((release, timeout));
    }

    /// Delivers each release within its session's target timeout; one that fails stays
    /// stored for the copier.
    pub(super) fn deliver(mut self) {
        for (release, timeout) in std::mem::take(&mut self.owed) {
            self.sessions
                .deliver(&release, release.release.clone(), timeout);
            self.sessions.in_hand.lock().remove(&release.session);
        }
    }
}

impl<E: Engine> Drop for ReleasesInHand<'_, E> {
    fn drop(&mut self) {
        let mut in_hand = self.sessions.in_hand.lock();
        for (release, _) in &self.owed {
            in_hand.remove(&release.session);
        }
    }
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
            let shipped = self.ship(id, volume, bcv, slot, &[track], durability);
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
        self.deliver_late();
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

    /// The releases of ended sessions' targets not delivered yet.
    pub fn owed_releases(&self) -> Result<Vec<OwedRelease>> {
        let mut owed = Vec::new();
        let mut failure = None;
        self.store.engine().scan(
            Space::Meta,
            RELEASE_KEY_PREFIX,
            RELEASE_KEY_END,
            &mut |key, value| {
                let decoded = key
                    .get(RELEASE_KEY_PREFIX.len()..)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(SessionId::from_be_bytes)
                    .ok_or_else(|| Error::Metadata {
                        what: format!("owed release key {key:02x?}"),
                        detail: "the key names no session".to_string(),
                    })
                    .and_then(|session| OwedRelease::decode(session, value));
                match decoded {
                    Ok(release) => {
                        owed.push(release);
                        true
                    }
                    Err(error) => {
                        failure = Some(error);
                        false
                    }
                }
            },
        )?;
        match failure {
            Some(error) => Err(error),
            None => Ok(owed),
        }
    }

    /// Tells the targets of ended sessions that have not heard of it to release their
    /// volumes (the copier, every [`PROBE_INTERVAL`]). Releases a command is delivering
    /// itself are left to it.
    fn deliver_late(&self) {
        let owed = match self.owed_releases() {
            Ok(owed) => owed,
            Err(error) => {
                tracing::warn!(%error, "cannot read the target releases to deliver");
                return;
            }
        };
        for release in owed {
            if self.in_hand.lock().contains(&release.session) {
                continue;
            }
            let timeout = Duration::from_millis(PROBE_TIMEOUT_MILLISECONDS_MAX);
            self.deliver(&release, release.late(), timeout);
        }
    }

    fn deliver(&self, release: &OwedRelease, operation: TargetOperation, timeout: Duration) {
        let OwedRelease {
            session, remote, ..
        } = release;
        let session = *session;
        let Ok(link) = self.link() else {
            return;
        };
        match link.call_within(remote, operation, timeout) {
            Ok(_) => {
                let mut batch = Batch::default();
                batch.delete(Space::Meta, release_key(session));
                match self.store.engine().write(batch, Durability::Synced) {
                    Ok(()) => {
                        tracing::info!(session, node = %remote.node, volume = %remote.volume, "the target of an ended session released its volume")
                    }
                    Err(error) => {
                        tracing::warn!(session, %error, "could not forget a delivered target release")
                    }
                }
            }
            Err(error) => {
                tracing::debug!(session, %error, "the target of an ended session does not answer yet")
            }
        }
    }
}
