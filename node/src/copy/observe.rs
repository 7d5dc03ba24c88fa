//! What the node's metrics and logs read of the sessions, without scanning any bitmap:
//! the rate limits in force and which session a command names.

use super::Sessions;
use crate::engine::Engine;
use protocol::session::{SessionCommand, SessionId};
use std::collections::BTreeMap;

impl<E: Engine> Sessions<E> {
    /// The copy rate limit each session has now, bytes per second: its own `--rate` or
    /// the default QoS's rate, capped by the node's ceiling, which all copies share.
    pub fn applied_session_rates(&self) -> BTreeMap<SessionId, u64> {
        let ceiling = self.node_limit.lock().bytes_per_second();
        self.table
            .lock()
            .sessions
            .iter()
            .map(|(id, live)| (*id, live.limit.bytes_per_second().min(ceiling)))
            .collect()
    }

    /// The copy rate limit in force on the node, bytes per second: the sum of the limits
    /// of the sessions with copy work in their state, capped by the node's ceiling; with
    /// none, the rate the default QoS would give a new copy.
    pub fn applied_copy_rate(&self) -> u64 {
        let ceiling = self.node_limit.lock().bytes_per_second();
        let copying: Vec<u64> = self
            .table
            .lock()
            .sessions
            .values()
            .filter(|live| live.record.copies())
            .map(|live| live.limit.bytes_per_second())
            .collect();
        if copying.is_empty() {
            return self.governor.lock().rate().min(ceiling);
        }
        copying
            .into_iter()
            .fold(0u64, u64::saturating_add)
            .min(ceiling)
    }

    /// The session a command names by its target (a clone's destination, a mirror's
    /// BCV), as its id, source and target: a command that ends the session returns
    /// nothing to log it by afterwards.
    pub fn named_session(&self, command: &SessionCommand) -> Option<(SessionId, String, String)> {
        let target = match command {
            SessionCommand::ClonePrecopy { target }
            | SessionCommand::CloneActivate { target }
            | SessionCommand::CloneTerminate { target }
            | SessionCommand::CloneCancel { target }
            | SessionCommand::SetRate { target, .. }
            | SessionCommand::MirrorSplit { bcv: target, .. }
            | SessionCommand::MirrorReestablish { bcv: target }
            | SessionCommand::MirrorRestore { bcv: target, .. }
            | SessionCommand::MirrorCancel { bcv: target } => target,
            SessionCommand::CloneCreate { .. }
            | SessionCommand::MirrorEstablish { .. }
            | SessionCommand::MirrorRotate { .. } => return None,
        };
        self.table
            .lock()
            .sessions
            .values()
            .find(|live| live.record.target == *target)
            .map(|live| {
                (
                    live.record.id,
                    live.record.source.clone(),
                    live.record.target.clone(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::mebibytes;
    use crate::engine::memory::MemoryEngine;
    use crate::store::VolumeStore;
    use protocol::session::MirrorMode;
    use std::sync::Arc;

    const NODE_RATE_MEBIBYTES_PER_SECOND: u32 = 50;

    fn sessions() -> Sessions<MemoryEngine> {
        let store = Arc::new(VolumeStore::open(MemoryEngine::new()).unwrap());
        for name in ["std", "bcv1", "bcv2"] {
            store.create(name, 1 << 20, 64 << 10).unwrap();
        }
        Sessions::open(store, NODE_RATE_MEBIBYTES_PER_SECOND, None).unwrap()
    }

    #[test]
    fn the_applied_rate_is_a_sessions_own_rate_capped_by_the_node() {
        let sessions = sessions();
        let governed = sessions.applied_copy_rate();
        assert!(governed <= mebibytes(NODE_RATE_MEBIBYTES_PER_SECOND));
        for bcv in ["bcv1", "bcv2"] {
            sessions
                .command(SessionCommand::MirrorEstablish {
                    standard: "std".into(),
                    bcv: bcv.into(),
                    mode: MirrorMode::Async,
                    strict: false,
                    target_timeout_milliseconds: None,
                })
                .unwrap();
        }
        // One session limited to 5 MiB/s, the other to more than the node allows.
        sessions
            .command(SessionCommand::SetRate {
                target: "bcv1".into(),
                mebibytes_per_second: Some(5),
            })
            .unwrap();
        sessions
            .command(SessionCommand::SetRate {
                target: "bcv2".into(),
                mebibytes_per_second: Some(500),
            })
            .unwrap();
        let limits: Vec<u64> = sessions.applied_session_rates().into_values().collect();
        assert_eq!(
            limits,
            vec![mebibytes(5), mebibytes(NODE_RATE_MEBIBYTES_PER_SECOND)]
        );
        assert_eq!(
            sessions.applied_copy_rate(),
            mebibytes(NODE_RATE_MEBIBYTES_PER_SECOND),
            "two sessions together may not pass the node's ceiling"
        );
        sessions
            .command(SessionCommand::SetRate {
                target: "bcv2".into(),
                mebibytes_per_second: Some(7),
            })
            .unwrap();
        assert_eq!(sessions.applied_copy_rate(), mebibytes(5) + mebibytes(7));
        let named = sessions.named_session(&SessionCommand::MirrorCancel { bcv: "bcv2".into() });
        assert_eq!(
            named.map(|(_, source, target)| (source, target)),
            Some(("std".to_string(), "bcv2".to_string()))
        );
    }
}
