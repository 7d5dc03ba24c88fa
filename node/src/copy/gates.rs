//! The command gates: one reader-writer lock per volume.
//!
//! A session command takes the gates of the volumes of this node it changes (its source
//! and, when it lives here, its target) exclusively, so it is atomic with respect to the
//! host IO and copy steps on those volumes; host IO takes only its own volume's gate, and
//! a copy step those of its session's volumes, shared. Host IO on any other volume never
//! waits for a command, and two sessions of a node with no volume in common never wait for
//! each other (the node-wide gate this replaced made every volume's IO wait for every
//! command, network round trips included).
//!
//! Gates are always taken together, in the order of volume ids, and before any track
//! lock: two holders can never wait for each other in a cycle.

use parking_lot::lock_api::{ArcRwLockReadGuard, ArcRwLockWriteGuard};
use parking_lot::{Mutex, RawRwLock, RwLock};
use std::collections::HashMap;
use std::sync::Arc;

/// The gates held by one command, host access or copy step; dropping it releases them.
#[must_use = "the gates are released when this is dropped"]
pub(super) enum Held {
    Shared(#[allow(dead_code)] Vec<ArcRwLockReadGuard<RawRwLock, ()>>),
    Exclusive(#[allow(dead_code)] Vec<ArcRwLockWriteGuard<RawRwLock, ()>>),
}

#[derive(Default)]
pub(super) struct Gates {
    by_volume: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

impl Gates {
    /// The gates of `volumes`, deduplicated, in id order.
    fn ordered(&self, volumes: impl IntoIterator<Item = u64>) -> Vec<Arc<RwLock<()>>> {
        let mut ids: Vec<u64> = volumes.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut by_volume = self.by_volume.lock();
        ids.into_iter()
            .map(|id| by_volume.entry(id).or_default().clone())
            .collect()
    }

    /// Takes the gates of `volumes` shared (host IO, copy steps, a target's copies).
    pub(super) fn shared(&self, volumes: impl IntoIterator<Item = u64>) -> Held {
        Held::Shared(
            self.ordered(volumes)
                .into_iter()
                .map(|gate| gate.read_arc())
                .collect(),
        )
    }

    /// Takes the gates of `volumes` exclusively (session commands).
    pub(super) fn exclusive(&self, volumes: impl IntoIterator<Item = u64>) -> Held {
        Held::Exclusive(
            self.ordered(volumes)
                .into_iter()
                .map(|gate| gate.write_arc())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn an_exclusive_gate_holds_off_its_volume_and_nothing_else() {
        let gates = Arc::new(Gates::default());
        let held = gates.exclusive([7, 3]);
        let other = gates.shared([5]);
        drop(other);
        let reached = Arc::new(AtomicBool::new(false));
        let waiter = {
            let gates = gates.clone();
            let reached = reached.clone();
            std::thread::spawn(move || {
                let _held = gates.shared([3]);
                reached.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !reached.load(Ordering::SeqCst),
            "volume 3 is held exclusively"
        );
        drop(held);
        waiter.join().expect("the waiter ends");
        assert!(reached.load(Ordering::SeqCst));
    }

    #[test]
    fn shared_gates_do_not_wait_for_each_other() {
        let gates = Gates::default();
        let first = gates.shared([1, 2]);
        let second = gates.shared([2, 1]);
        drop((first, second));
    }
}
