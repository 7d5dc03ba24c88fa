//! Every metric a node process exports, by name, with its description and unit, and the
//! task that publishes the gauges read from the node's state once a second.
//!
//! The Prometheus exporter is installed by [`install`]: it renders latencies as
//! histograms with [`LATENCY_BUCKETS_SECONDS`], prints a `# HELP` line for every metric
//! (each is described here at start-up), and starts the counters with no labels, and the
//! error counter with each code, at 0 so that a `rate()` over them works from the first
//! scrape. Gauges that nothing sets for [`GAUGE_IDLE_TIMEOUT`] are dropped from the
//! output, so the gauges of a session that ended, or of a member that stopped leading,
//! disappear instead of repeating their last value: every gauge is therefore set again
//! (absolutely, never incremented) at least once a second, by [`publish`] or by the
//! copier's governor window.

use crate::copy::Sessions;
use crate::engine::Engine;
use crate::store::VolumeStore;
use crate::{Error, Result};
use control_plane::member::ControlPlane;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;
use protocol::cluster::Health;
use protocol::messages::ErrorCode;
use protocol::session::{MirrorMode, SessionInfo, SessionKind, SessionState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// NBD, by operation (and by volume where the count is per request).
pub const NBD_CONNECTIONS: &str = "tandem_nbd_connections";
pub const NBD_OPERATIONS_TOTAL: &str = "tandem_nbd_operations_total";
pub const NBD_BYTES_TOTAL: &str = "tandem_nbd_bytes_total";
pub const NBD_ERRORS_TOTAL: &str = "tandem_nbd_errors_total";
pub const NBD_REFUSED_TOTAL: &str = "tandem_nbd_refused_total";
pub const NBD_SECONDS: &str = "tandem_nbd_seconds";

// The QUIC service.
pub const REQUESTS_SECONDS: &str = "tandem_requests_seconds";
pub const REQUEST_ERRORS_TOTAL: &str = "tandem_request_errors_total";
pub const NODE_CALLS_CARRIED_OUT_TOTAL: &str = "tandem_node_calls_carried_out_total";
pub const NODE_CALLS_REPLAYED_TOTAL: &str = "tandem_node_calls_replayed_total";
pub const ERRORS_TOTAL: &str = "tandem_errors_total";
pub const QUIC_REFUSED_TOTAL: &str = "tandem_quic_refused_total";

// The store.
pub const VOLUMES: &str = "tandem_volumes";
pub const SNAP_SECONDS: &str = "tandem_snap_seconds";
pub const CHECKSUM_ERRORS_TOTAL: &str = "tandem_checksum_errors_total";

// Copies, node-wide.
pub const COPY_TRACKS_TOTAL: &str = "tandem_copy_tracks_total";
pub const COPY_BYTES_TOTAL: &str = "tandem_copy_bytes_total";
pub const COPY_CHECKSUM_ERRORS_TOTAL: &str = "tandem_copy_checksum_errors_total";
pub const COPY_GOVERNED_BYTES_PER_SECOND: &str = "tandem_copy_governed_bytes_per_second";
pub const TARGET_TRACKS_RECEIVED_TOTAL: &str = "tandem_target_tracks_received_total";
pub const CLONE_PULLED_TRACKS_TOTAL: &str = "tandem_clone_pulled_tracks_total";

// Copy sessions this node runs, labelled `kind`, `source` and `target`.
pub const SESSIONS: &str = "tandem_sessions";
pub const SESSION_STATE: &str = "tandem_session_state";
pub const SESSION_TRACKS_TOTAL: &str = "tandem_session_tracks_total";
pub const SESSION_TRACKS_REMAINING: &str = "tandem_session_tracks_remaining";
pub const SESSION_COPIED_BYTES: &str = "tandem_session_copied_bytes";
pub const SESSION_RATE_BYTES_PER_SECOND: &str = "tandem_session_rate_bytes_per_second";
pub const SESSION_RATE_LIMIT_BYTES_PER_SECOND: &str = "tandem_session_rate_limit_bytes_per_second";
pub const SESSION_LAG_TRACKS: &str = "tandem_session_lag_tracks";
pub const SESSION_LAG_SECONDS: &str = "tandem_session_lag_seconds";

// The control-plane member this process hosts (`control-plane/src` records the commit
// latency and refused Raft messages under these names itself).
pub const RAFT_TERM: &str = "tandem_raft_term";
pub const RAFT_IS_LEADER: &str = "tandem_raft_is_leader";
pub const RAFT_COMMIT_INDEX: &str = "tandem_raft_commit_index";
pub const RAFT_APPLIED_INDEX: &str = "tandem_raft_applied_index";
pub const RAFT_LAST_LOG_INDEX: &str = "tandem_raft_last_log_index";
pub const RAFT_REFUSED_TOTAL: &str = "tandem_raft_refused_total";
pub const CATALOG_COMMIT_SECONDS: &str = "tandem_catalog_commit_seconds";
pub const NODE_UP: &str = "tandem_node_up";

/// Histogram buckets of every latency (all are in seconds): from 50 µs, a fast host write
/// to the page cache, to 30 s, a snapshot of a large volume or a commit that timed out.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often [`publish`] reads the node's sessions, volumes and Raft state. A session's
/// counts are the kept counts `mirror show` reads (only chunks changed since are read
/// again), so once a second costs little next to host IO.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// A gauge not set for this long leaves the output: ten publishing intervals, so a late
/// tick never drops a live gauge, and an ended session's gauges go within seconds.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every error code, so that the error counter starts at 0 for each.
const ERROR_CODES: [ErrorCode; 11] = [
    ErrorCode::NotFound,
    ErrorCode::AlreadyExists,
    ErrorCode::InvalidArgument,
    ErrorCode::IllegalState,
    ErrorCode::LimitExceeded,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
    ErrorCode::Forbidden,
    ErrorCode::NotInitialized,
    ErrorCode::NotMember,
    ErrorCode::DigestMismatch,
];

/// The states a session of each kind can be in, so that the state gauge shows 0 for the
/// states a session is not in (the usual Prometheus form of an enumeration).
const CLONE_STATES: [SessionState; 5] = [
    SessionState::Created,
    SessionState::Precopying,
    SessionState::Active,
    SessionState::Copied,
    SessionState::Suspended,
];
const MIRROR_STATES: [SessionState; 5] = [
    SessionState::Syncing,
    SessionState::Synchronized,
    SessionState::Split,
    SessionState::Restoring,
    SessionState::Suspended,
];

/// NBD connections open now, counted here so that the gauge can be set absolutely.
static NBD_CONNECTIONS_OPEN: AtomicU64 = AtomicU64::new(0);

/// Installs the Prometheus exporter (once per process), describes every metric and starts
/// the counters at 0.
pub fn install(address: SocketAddr) -> Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets(LATENCY_BUCKETS_SECONDS)
        .and_then(|builder| {
            builder
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT))
                .install()
        })
        .map_err(|error| Error::Config {
            detail: format!("metrics endpoint {address}: {error}"),
        })?;
    describe();
    start_counters_at_zero();
    Ok(())
}

fn describe() {
    describe_gauge!(
        NBD_CONNECTIONS,
        Unit::Count,
        "NBD client connections open now."
    );
    describe_counter!(
        NODE_CALLS_CARRIED_OUT_TOTAL,
        Unit::Count,
        "Calls of the leader under a request id (session commands, snaps) this node carried out, by call."
    );
    describe_counter!(
        NODE_CALLS_REPLAYED_TOTAL,
        Unit::Count,
        "Retries of such calls this node answered with their first answer instead of carrying them out again, by call."
    );
    describe_counter!(
        NBD_OPERATIONS_TOTAL,
        Unit::Count,
        "NBD requests served successfully, by operation and volume."
    );
    describe_counter!(
        NBD_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes read and written by NBD clients, by operation and volume."
    );
    describe_counter!(
        NBD_ERRORS_TOTAL,
        Unit::Count,
        "NBD requests that failed in the store (answered EIO, EINVAL or EPERM), by operation and volume."
    );
    describe_counter!(
        NBD_REFUSED_TOTAL,
        Unit::Count,
        "NBD requests refused before they reached the store (out of range, read-only or not-ready volume), by operation and volume."
    );
    describe_histogram!(
        NBD_SECONDS,
        Unit::Seconds,
        "Host IO latency inside the node, from an NBD request read off the socket to its reply, by operation."
    );
    describe_histogram!(
        REQUESTS_SECONDS,
        Unit::Seconds,
        "Time to answer a QUIC request (CLI, other nodes, Raft), by request kind."
    );
    describe_counter!(
        REQUEST_ERRORS_TOTAL,
        Unit::Count,
        "QUIC requests answered with an error, by request kind."
    );
    describe_counter!(
        ERRORS_TOTAL,
        Unit::Count,
        "QUIC requests answered with an error, by error code (not-found, illegal-state, unavailable, ...)."
    );
    describe_counter!(
        QUIC_REFUSED_TOTAL,
        Unit::Count,
        "QUIC connections refused during the TLS handshake (no certificate from the cluster CA)."
    );
    describe_gauge!(VOLUMES, Unit::Count, "Volumes stored on this node.");
    describe_histogram!(
        SNAP_SECONDS,
        Unit::Seconds,
        "Time to take a pointer snapshot."
    );
    describe_counter!(
        CHECKSUM_ERRORS_TOTAL,
        Unit::Count,
        "Stored blocks whose header or checksum failed verification on read (each an EIO to the host)."
    );
    describe_counter!(
        COPY_TRACKS_TOTAL,
        Unit::Count,
        "Tracks copied by this node's copy sessions (to local or remote targets)."
    );
    describe_counter!(
        COPY_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes copied by this node's copy sessions."
    );
    describe_counter!(
        COPY_CHECKSUM_ERRORS_TOTAL,
        Unit::Count,
        "Copied tracks refused because a block's checksum did not match the source's."
    );
    describe_gauge!(
        COPY_GOVERNED_BYTES_PER_SECOND,
        Unit::Bytes,
        "The copy rate limit in force on this node, bytes per second: the sum of the running sessions' limits (each its own --rate, or the default QoS's rate), capped by the node's copy_rate_mebibytes_per_second; with no copy running, the rate the default QoS would give a new copy."
    );
    describe_counter!(
        TARGET_TRACKS_RECEIVED_TOTAL,
        Unit::Count,
        "Tracks stored here as the target of a session another node runs."
    );
    describe_counter!(
        CLONE_PULLED_TRACKS_TOTAL,
        Unit::Count,
        "Tracks a clone destination on this node pulled from its source before a host touched them."
    );
    describe_gauge!(
        SESSIONS,
        Unit::Count,
        "Copy sessions this node runs as the source, by kind."
    );
    describe_gauge!(
        SESSION_STATE,
        Unit::Count,
        "1 for the state a session is in, 0 for the other states of its kind; labelled kind, source, target and state."
    );
    describe_gauge!(
        SESSION_TRACKS_TOTAL,
        Unit::Count,
        "Tracks the session's current copy has to move in all."
    );
    describe_gauge!(
        SESSION_TRACKS_REMAINING,
        Unit::Count,
        "Tracks the session's current copy still has to move."
    );
    describe_gauge!(
        SESSION_COPIED_BYTES,
        Unit::Bytes,
        "Bytes the session's current copy has moved."
    );
    describe_gauge!(
        SESSION_RATE_BYTES_PER_SECOND,
        Unit::Bytes,
        "The session's current copy rate, bytes per second."
    );
    describe_gauge!(
        SESSION_RATE_LIMIT_BYTES_PER_SECOND,
        Unit::Bytes,
        "The copy rate limit applied to the session, bytes per second: its own --rate or the default QoS's rate, capped by the node's ceiling."
    );
    describe_gauge!(
        SESSION_LAG_TRACKS,
        Unit::Count,
        "Async mirrors: changed tracks of the standard not yet on the BCV."
    );
    describe_gauge!(
        SESSION_LAG_SECONDS,
        Unit::Seconds,
        "Async mirrors: how long the BCV has been behind the standard."
    );
    describe_gauge!(
        RAFT_TERM,
        Unit::Count,
        "The Raft term of the control-plane member in this process."
    );
    describe_gauge!(
        RAFT_IS_LEADER,
        Unit::Count,
        "1 when the control-plane member in this process is the leader, else 0."
    );
    describe_gauge!(
        RAFT_COMMIT_INDEX,
        Unit::Count,
        "The highest log index a majority of members hold (known on the leader only)."
    );
    describe_gauge!(
        RAFT_APPLIED_INDEX,
        Unit::Count,
        "The last log index applied to this member's catalog."
    );
    describe_gauge!(
        RAFT_LAST_LOG_INDEX,
        Unit::Count,
        "The last log index in this member's log."
    );
    describe_counter!(
        RAFT_REFUSED_TOTAL,
        Unit::Count,
        "Raft messages refused because the peer is not a member or claimed another identity."
    );
    describe_histogram!(
        CATALOG_COMMIT_SECONDS,
        Unit::Seconds,
        "Time for the leader to commit one catalog command."
    );
    describe_gauge!(
        NODE_UP,
        Unit::Count,
        "Each registered node's health in this member's catalog: 1 up, 0 down; labelled node and site."
    );
}

fn start_counters_at_zero() {
    // `increment(0)` registers a counter without touching a value already counted.
    for name in [
        QUIC_REFUSED_TOTAL,
        CHECKSUM_ERRORS_TOTAL,
        COPY_TRACKS_TOTAL,
        COPY_BYTES_TOTAL,
        COPY_CHECKSUM_ERRORS_TOTAL,
        TARGET_TRACKS_RECEIVED_TOTAL,
        CLONE_PULLED_TRACKS_TOTAL,
        RAFT_REFUSED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    for code in ERROR_CODES {
        metrics::counter!(ERRORS_TOTAL, "code" => code.to_string()).increment(0);
    }
}

/// Counts a QUIC request answered with an error, by its code.
pub fn count_error(code: ErrorCode) {
    metrics::counter!(ERRORS_TOTAL, "code" => code.to_string()).increment(1);
}

/// The NBD operations counted per volume (as `nbd.rs` names them).
const NBD_OPERATIONS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

/// An NBD client chose `volume`: its counters exist from now on, at 0 until used.
pub fn nbd_volume_opened(volume: &str) {
    for operation in NBD_OPERATIONS {
        for name in [NBD_OPERATIONS_TOTAL, NBD_ERRORS_TOTAL, NBD_REFUSED_TOTAL] {
            metrics::counter!(name, "operation" => operation, "volume" => volume.to_string())
                .increment(0);
        }
    }
    for operation in ["read", "write"] {
        metrics::counter!(NBD_BYTES_TOTAL, "operation" => operation, "volume" => volume.to_string())
            .increment(0);
    }
}

/// An NBD client connected.
pub fn nbd_connection_opened() {
    let open = NBD_CONNECTIONS_OPEN.fetch_add(1, Ordering::Relaxed) + 1;
    metrics::gauge!(NBD_CONNECTIONS).set(open as f64);
}

/// An NBD client disconnected.
pub fn nbd_connection_closed() {
    let open = NBD_CONNECTIONS_OPEN
        .fetch_sub(1, Ordering::Relaxed)
        .saturating_sub(1);
    metrics::gauge!(NBD_CONNECTIONS).set(open as f64);
}

/// Sets the node's, its sessions' and its member's gauges every [`PUBLISH_INTERVAL`] for
/// as long as the node runs.
pub async fn publish<E: Engine>(
    store: Arc<VolumeStore<E>>,
    sessions: Arc<Sessions<E>>,
    control_plane: Option<Arc<ControlPlane>>,
) {
    let mut ticker = tokio::time::interval(PUBLISH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        metrics::gauge!(NBD_CONNECTIONS).set(NBD_CONNECTIONS_OPEN.load(Ordering::Relaxed) as f64);
        metrics::gauge!(VOLUMES).set(store.volume_count() as f64);
        let reading = {
            let sessions = sessions.clone();
            let store = store.clone();
            tokio::task::spawn_blocking(move || read_sessions(&store, &sessions)).await
        };
        match reading {
            Ok(Ok(readings)) => publish_sessions(&readings),
            Ok(Err(error)) => tracing::debug!(%error, "session metrics not read this time"),
            Err(join_error) => tracing::debug!(%join_error, "session metrics task failed"),
        }
        if let Some(control_plane) = &control_plane {
            publish_member(control_plane);
        }
    }
}

/// One session as its gauges show it.
struct SessionReading {
    info: SessionInfo,
    track_size_bytes: u64,
    rate_limit_bytes_per_second: u64,
}

/// Reads every session once (the same counts `list` reads), with the numbers that need the
/// store: a session's bytes are its tracks times its source's track size.
fn read_sessions<E: Engine>(
    store: &VolumeStore<E>,
    sessions: &Sessions<E>,
) -> Result<Vec<SessionReading>> {
    let limits = sessions.applied_session_rates();
    Ok(sessions
        .list(None)?
        .into_iter()
        .map(|info| SessionReading {
            track_size_bytes: store
                .volume(&info.source)
                .map_or(0, |volume| u64::from(volume.track_size_bytes)),
            rate_limit_bytes_per_second: limits.get(&info.id).copied().unwrap_or(0),
            info,
        })
        .collect())
}

fn publish_sessions(readings: &[SessionReading]) {
    for kind in [SessionKind::Clone, SessionKind::Mirror] {
        let count = readings
            .iter()
            .filter(|reading| reading.info.kind == kind)
            .count();
        metrics::gauge!(SESSIONS, "kind" => kind.to_string()).set(count as f64);
    }
    for reading in readings {
        let info = &reading.info;
        let labels = [
            ("kind", info.kind.to_string()),
            ("source", info.source.clone()),
            ("target", info.target.clone()),
        ];
        let states = match info.kind {
            SessionKind::Clone => CLONE_STATES,
            SessionKind::Mirror => MIRROR_STATES,
        };
        for state in states {
            let mut state_labels = labels.to_vec();
            state_labels.push(("state", state.to_string()));
            let value = if state == info.state { 1.0 } else { 0.0 };
            metrics::gauge!(SESSION_STATE, &state_labels).set(value);
        }
        metrics::gauge!(SESSION_TRACKS_TOTAL, &labels).set(info.tracks_total as f64);
        metrics::gauge!(SESSION_TRACKS_REMAINING, &labels).set(info.tracks_remaining as f64);
        metrics::gauge!(SESSION_COPIED_BYTES, &labels)
            .set((info.tracks_copied * reading.track_size_bytes) as f64);
        metrics::gauge!(SESSION_RATE_BYTES_PER_SECOND, &labels)
            .set(info.rate_bytes_per_second as f64);
        metrics::gauge!(SESSION_RATE_LIMIT_BYTES_PER_SECOND, &labels)
            .set(reading.rate_limit_bytes_per_second as f64);
        if info.mode == Some(MirrorMode::Async) {
            metrics::gauge!(SESSION_LAG_TRACKS, &labels).set(info.lag_tracks as f64);
            metrics::gauge!(SESSION_LAG_SECONDS, &labels).set(info.lag_seconds as f64);
        }
    }
}

/// The member's Raft state (from openraft's metrics) and the nodes' health in its catalog.
fn publish_member(control_plane: &ControlPlane) {
    let status = control_plane.cluster_status();
    metrics::gauge!(RAFT_TERM).set(status.term as f64);
    let is_leader = status.leader.as_deref() == Some(status.answered_by.as_str());
    metrics::gauge!(RAFT_IS_LEADER).set(if is_leader { 1.0 } else { 0.0 });
    if let Some(commit_index) = status.commit_index {
        metrics::gauge!(RAFT_COMMIT_INDEX).set(commit_index as f64);
    }
    if let Some(applied_index) = status.applied_index {
        metrics::gauge!(RAFT_APPLIED_INDEX).set(applied_index as f64);
    }
    if let Some(last_log_index) = status.last_log_index {
        metrics::gauge!(RAFT_LAST_LOG_INDEX).set(last_log_index as f64);
    }
    for (node, site, health) in control_plane.node_health() {
        let up = if health == Health::Up { 1.0 } else { 0.0 };
        metrics::gauge!(NODE_UP, "node" => node, "site" => site).set(up);
    }
}
