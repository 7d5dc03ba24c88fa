//! The NBD connections hosts have open, by volume. The control plane asks for them before
//! it deletes a volume (a delete is refused while hosts have the export open, unless
//! forced), and a delete closes them cleanly first: the connection stops reading
//! requests, answers the ones in flight and closes, so a host sees its export go away
//! instead of an EIO on its next read.

use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a delete waits for the connections it closes to answer their requests in
/// flight and go; a connection still open after that gets errors, as the volume is gone.
pub const DISCONNECT_WAIT_MILLISECONDS: u64 = 5_000;

/// What a connection and the registry share: the request to close.
struct CloseSignal {
    requested: AtomicBool,
    wake: Notify,
}

struct Connection {
    volume: u64,
    peer: SocketAddr,
    close: Arc<CloseSignal>,
}

#[derive(Default)]
struct Table {
    connections: BTreeMap<u64, Connection>,
    next_id: u64,
    /// Volumes being deleted: a new connection to them is not admitted.
    closing: BTreeSet<u64>,
}

/// The open NBD connections of one node.
#[derive(Default)]
pub struct HostConnections {
    table: Mutex<Table>,
    /// Signalled whenever a connection goes.
    gone: Condvar,
}

/// One open connection; it leaves the registry when dropped.
pub struct OpenConnection {
    registry: Arc<HostConnections>,
    id: u64,
    close: Arc<CloseSignal>,
}

impl OpenConnection {
    /// Completes once the connection has been asked to close.
    pub async fn close_requested(&self) {
        loop {
            let woken = self.close.wake.notified();
            if self.close.requested.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.registry.table.lock().connections.remove(&self.id);
        self.registry.gone.notify_all();
    }
}

impl HostConnections {
    /// Registers a connection of `peer` to `volume`; `None` while the volume is being
    /// deleted (the connection is then closed at once).
    pub fn open(self: &Arc<Self>, volume: u64, peer: SocketAddr) -> Option<OpenConnection> {
        let mut table = self.table.lock();
        if table.closing.contains(&volume) {
            return None;
        }
        let id = table.next_id;
        table.next_id += 1;
        let close = Arc::new(CloseSignal {
            requested: AtomicBool::new(false),
            wake: Notify::new(),
        });
        table.connections.insert(
            id,
            Connection {
                volume,
                peer,
                close: close.clone(),
            },
        );
        Some(OpenConnection {
            registry: self.clone(),
            id,
            close,
        })
    }

    /// The addresses of the clients that have `volume` open, in the order they connected.
    pub fn clients(&self, volume: u64) -> Vec<SocketAddr> {
        self.table
            .lock()
            .connections
            .values()
            .filter(|connection| connection.volume == volume)
            .map(|connection| connection.peer)
            .collect()
    }

    /// Asks every connection to `volume` to close and waits up to `wait` for them to go;
    /// admits no new connection to it until [`HostConnections::reopen`]. Returns the
    /// clients that were asked to close and the ones still open after the wait.
    pub fn close_volume(&self, volume: u64, wait: Duration) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let deadline = Instant::now() + wait;
        let mut table = self.table.lock();
        table.closing.insert(volume);
        let mut asked = Vec::new();
        for connection in table
            .connections
            .values()
            .filter(|connection| connection.volume == volume)
        {
            connection.close.requested.store(true, Ordering::Release);
            connection.close.wake.notify_one();
            asked.push(connection.peer);
        }
        loop {
            let open: Vec<SocketAddr> = table
                .connections
                .values()
                .filter(|connection| connection.volume == volume)
                .map(|connection| connection.peer)
                .collect();
            if open.is_empty() || self.gone.wait_until(&mut table, deadline).timed_out() {
                return (asked, open);
            }
        }
    }

    /// Admits connections to `volume` again (its delete is over, or failed).
    pub fn reopen(&self, volume: u64) {
        self.table.lock().closing.remove(&volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn connections_are_listed_by_volume_and_leave_when_dropped() {
        let registry = Arc::new(HostConnections::default());
        let first = registry.open(1, peer(1001)).unwrap();
        let _second = registry.open(2, peer(1002)).unwrap();
        let third = registry.open(1, peer(1003)).unwrap();
        assert_eq!(registry.clients(1), vec![peer(1001), peer(1003)]);
        drop(first);
        assert_eq!(registry.clients(1), vec![peer(1003)]);
        drop(third);
        assert!(registry.clients(1).is_empty());
        assert_eq!(registry.clients(2), vec![peer(1002)]);
    }

    #[test]
    fn closing_a_volume_signals_its_connections_and_admits_no_new_ones() {
        let registry = Arc::new(HostConnections::default());
        let connection = registry.open(7, peer(2001)).unwrap();
        let other = registry.open(8, peer(2002)).unwrap();
        let closer = {
            let registry = registry.clone();
            std::thread::spawn(move || registry.close_volume(7, Duration::from_secs(10)))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), connection.close_requested())
                .await
                .expect("the connection is asked to close");
        });
        assert!(registry.open(7, peer(2003)).is_none());
        drop(connection);
        let (asked, still_open) = closer.join().unwrap();
        assert_eq!(asked, vec![peer(2001)]);
        assert!(still_open.is_empty());
        // The other volume's connection was not asked to close.
        assert!(!other.close.requested.load(Ordering::Acquire));
        registry.reopen(7);
        assert!(registry.open(7, peer(2004)).is_some());
    }

    #[test]
    fn a_connection_that_does_not_go_is_reported_after_the_wait() {
        let registry = Arc::new(HostConnections::default());
        let _stubborn = registry.open(3, peer(3001)).unwrap();
        let (asked, still_open) = registry.close_volume(3, Duration::from_millis(50));
        assert_eq!(asked, vec![peer(3001)]);
        assert_eq!(still_open, vec![peer(3001)]);
    }
}
