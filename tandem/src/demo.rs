//! `tandem demo`: the embedded default. Two sites on loopback in a temporary directory:
//! site-a with a node and the control plane, site-b with a node. A volume, writes and
//! reads through NBD, a pointer snapshot, a clone, a mirror, a verified gsnap from site-a
//! to site-b while the host writes, and a plain report. Every step checks what it claims
//! and the demo fails loudly if anything does not hold.

use anyhow::{bail, ensure, Context, Result};
use node::config::NodeConfig;
use node::nbd_client::NbdClient;
use protocol::cluster::{ClusterRequest, ClusterResponse};
use protocol::gsnap::{digest_hex, GsnapJobView, GsnapSpec, JobState, SendMode};
use protocol::messages::{ErrorCode, Request, Response};
use protocol::session::{MirrorMode, SessionCommand, SessionInfo, SessionKind};
use std::net::SocketAddr;
use std::time::Instant;

const VOLUME: &str = "demo";
const SNAPSHOT: &str = "demo-snap";
const CLONE: &str = "demo-clone";
const BCV: &str = "demo-bcv";
const VOLUME_BYTES: u64 = 64 << 20;
/// The node of the second site, and the gsnap's volumes: P on site-a, P' beside it, S on
/// site-b.
const SITE_B_NODE: &str = "demo-b1";
const GSNAP_SOURCE: &str = "orders";
const GSNAP_INTERMEDIATE: &str = "orders-gsnap";
const GSNAP_TARGET: &str = "orders-dr";
const TRACK_BYTES: u32 = 64 << 10;

/// Writes the demo makes: offsets chosen to be unaligned to tracks and blocks, one
/// crossing a track boundary, and a large sequential one.
const WRITES: [(u64, usize); 4] = [
    (0, 4096),
    (65536 - 1024, 8192),
    ((1 << 20) + 1536, 512),
    (8 << 20, 1 << 20),
];

fn pattern(seed: u8, length: usize) -> Vec<u8> {
    (0..length)
        .map(|index| seed.wrapping_add((index % 251) as u8))
        .collect()
}

/// How long the demo waits for its one-member control plane to elect itself and for the
/// node to register; both take well under a second.
const CLUSTER_READY_SECONDS: u64 = 20;

/// Sends a cluster command, retrying while the control plane is still electing.
async fn request(connection: &quinn::Connection, request: ClusterRequest) -> Result<Response> {
    let deadline = Instant::now() + std::time::Duration::from_secs(CLUSTER_READY_SECONDS);
    let message = Request::Cluster { request, hops: 0 };
    loop {
        let response: Response = protocol::transport::call(connection, &message).await?;
        match response {
            Response::Error {
                code: ErrorCode::Unavailable,
                ..
            } if Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Response::Error { code, message } => bail!("{message} [{code}]"),
            response => return Ok(response),
        }
    }
}

/// Waits until the node has registered with the control plane.
async fn wait_for_registration(connection: &quinn::Connection, node: &str) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(CLUSTER_READY_SECONDS);
    loop {
        if let Response::Cluster(ClusterResponse::Status(status)) =
            request(connection, ClusterRequest::Status).await?
        {
            if status
                .sites
                .values()
                .flatten()
                .any(|record| record.name == node)
            {
                return Ok(());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "node {node} did not register with the control plane within {CLUSTER_READY_SECONDS} seconds"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Sends a copy-session command to the node.
async fn session(
    connection: &quinn::Connection,
    command: SessionCommand,
) -> Result<Option<SessionInfo>> {
    let response = request(
        connection,
        ClusterRequest::Session {
            request_id: rand::random(),
            command,
        },
    )
    .await?;
    match response {
        Response::Cluster(ClusterResponse::Session(info)) => Ok(info.map(|info| *info)),
        other => bail!("unexpected answer to a session command: {other:?}"),
    }
}

/// Waits until a session has nothing left to copy and rests.
async fn settled(
    connection: &quinn::Connection,
    kind: SessionKind,
    target: &str,
) -> Result<SessionInfo> {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let response = request(
            connection,
            ClusterRequest::SessionShow {
                kind,
                target: target.to_string(),
            },
        )
        .await?;
        let Response::Cluster(ClusterResponse::Session(Some(info))) = response else {
            bail!("unexpected answer to a session query: {response:?}");
        };
        let info = *info;
        if info.state.is_resting() && info.tracks_remaining == 0 {
            return Ok(info);
        }
        ensure!(
            Instant::now() < deadline,
            "{target} did not finish copying: {info:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn create_volume(connection: &quinn::Connection, name: &str) -> Result<()> {
    create_volume_on(connection, name, "demo-node").await
}

async fn create_volume_on(connection: &quinn::Connection, name: &str, node: &str) -> Result<()> {
    request(
        connection,
        ClusterRequest::VolumeCreate {
            request_id: rand::random(),
            name: name.to_string(),
            node: Some(node.to_string()),
            size_bytes: VOLUME_BYTES,
            track_size_bytes: TRACK_BYTES,
        },
    )
    .await?;
    Ok(())
}

/// Reads a whole volume through NBD.
async fn read_volume(nbd_address: SocketAddr, volume: &str) -> Result<Vec<u8>> {
    let mut client = NbdClient::connect(nbd_address, volume).await?;
    let mut bytes = Vec::with_capacity(client.size_bytes as usize);
    let chunk: u32 = 1 << 20;
    while (bytes.len() as u64) < client.size_bytes {
        let part = client
            .read(bytes.len() as u64, chunk)
            .await?
            .context("NBD read")?;
        bytes.extend(part);
    }
    client.disconnect().await?;
    Ok(bytes)
}

/// A gsnap from site-a to site-b while the source's host keeps writing: the job's steps
/// as they happen, its verified report, and the target equal to the image of the
/// command's instant. Then a few tracks change and a second job sends only those.
async fn gsnap_demo(
    connection: &quinn::Connection,
    site_a_nbd: SocketAddr,
    site_b_nbd: SocketAddr,
) -> Result<()> {
    create_volume(connection, GSNAP_SOURCE).await?;
    create_volume_on(connection, GSNAP_TARGET, SITE_B_NODE).await?;
    let mut host = NbdClient::connect(site_a_nbd, GSNAP_SOURCE).await?;
    // Every fourth track written, so the copy has something in every part of the volume.
    let tracks = VOLUME_BYTES / u64::from(TRACK_BYTES);
    for track in (0..tracks).step_by(4) {
        host.write(
            track * u64::from(TRACK_BYTES),
            &pattern(track as u8, TRACK_BYTES as usize),
            false,
        )
        .await?
        .context("NBD write")?;
    }
    host.flush().await?.context("NBD flush")?;
    let before = read_volume(site_a_nbd, GSNAP_SOURCE).await?;
    let started = Instant::now();
    let (view, written) = run_gsnap(connection, &mut host, "10.", tracks).await?;
    let verified = view
        .verification
        .last()
        .filter(|round| round.matched())
        .context("the gsnap job succeeded without a matching verification")?;
    let target = read_volume(site_b_nbd, GSNAP_TARGET).await?;
    ensure!(
        target == before,
        "{GSNAP_TARGET} does not hold {GSNAP_SOURCE}'s image of the command's instant"
    );
    let after = read_volume(site_a_nbd, GSNAP_SOURCE).await?;
    ensure!(
        written.is_empty() || after != before,
        "the host's writes during the job did not land on {GSNAP_SOURCE}"
    );
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "    succeeded in {seconds:.2} s: {} tracks, {} MiB ({:.0} MiB/s); the host wrote {} tracks meanwhile",
        verified.tracks,
        verified.bytes >> 20,
        verified.bytes as f64 / f64::from(1 << 20) / seconds,
        written.len()
    );
    println!(
        "    verified: BLAKE3 of the copied tracks on {} {} = on {SITE_B_NODE} {}",
        view.job.source_node,
        &digest_hex(&verified.source)[..16],
        &digest_hex(&verified.target)[..16]
    );
    println!(
        "    read {GSNAP_TARGET} back on site-b through NBD: byte for byte the image of the command's instant, none of the later writes"
    );

    // A few more tracks change; the next job of the same two volumes sends only what P's
    // host wrote since the first job's snap: these, and the writes made during that job.
    let during_first_job = written.len();
    let mut changed: std::collections::BTreeSet<u64> = written;
    for track in [3, tracks / 2, tracks - 5] {
        host.write(
            track * u64::from(TRACK_BYTES),
            &pattern(77, TRACK_BYTES as usize),
            true,
        )
        .await?
        .context("NBD write")?;
        changed.insert(track);
    }
    host.flush().await?.context("NBD flush")?;
    let source_now = read_volume(site_a_nbd, GSNAP_SOURCE).await?;
    let (view, _) = run_gsnap(connection, &mut host, "11.", 0).await?;
    let send = view
        .send
        .as_ref()
        .context("the second gsnap job has no send recorded")?;
    let SendMode::Incremental { source_changed, .. } = &send.mode else {
        bail!(
            "the second gsnap job sent every track: {}",
            crate::gsnap::send_line(send)
        );
    };
    // Every track sent is one the host wrote after the first job's snap (the writes made
    // during that job all came after it, as `tandem gsnap` answers once it snapped).
    ensure!(
        *source_changed == send.tracks && send.tracks >= 3 && send.tracks <= changed.len() as u64,
        "the second gsnap job sent {} tracks; the host changed {} since the first job's snap",
        send.tracks,
        changed.len()
    );
    let moved = view
        .verification
        .last()
        .filter(|round| round.matched())
        .context("the second gsnap job succeeded without a matching verification")?;
    ensure!(
        read_volume(site_b_nbd, GSNAP_TARGET).await? == source_now,
        "{GSNAP_TARGET} does not hold {GSNAP_SOURCE}'s image after the incremental job"
    );
    println!(
        "    {} (the host wrote {} tracks during job {} and {} after it)",
        crate::gsnap::send_line(send),
        during_first_job,
        view.job.id - 1,
        changed.len() - during_first_job
    );
    println!(
        "    moved and verified {} of {tracks} tracks ({} KiB); {GSNAP_TARGET} equals {GSNAP_SOURCE} again",
        moved.tracks,
        moved.bytes >> 10
    );
    host.disconnect().await?;
    Ok(())
}

/// Runs one gsnap of the demo's volumes to its end, printing its steps as they happen;
/// while it runs, `host` writes one 4 KiB block at a time to P (none of which may reach
/// S) when `tracks` is not 0. Returns the job and the tracks the host wrote meanwhile.
async fn run_gsnap(
    connection: &quinn::Connection,
    host: &mut NbdClient,
    number: &str,
    tracks: u64,
) -> Result<(GsnapJobView, std::collections::BTreeSet<u64>)> {
    let started = Instant::now();
    let Response::Cluster(ClusterResponse::Job(job)) = request(
        connection,
        ClusterRequest::Gsnap {
            request_id: rand::random(),
            spec: GsnapSpec {
                source: GSNAP_SOURCE.to_string(),
                source_extents: Vec::new(),
                intermediate: GSNAP_INTERMEDIATE.to_string(),
                target: GSNAP_TARGET.to_string(),
                target_extents: Vec::new(),
                target_intermediate: None,
                rate_mebibytes_per_second: None,
                full: false,
            },
        },
    )
    .await?
    else {
        bail!("unexpected answer to the gsnap request");
    };
    println!(
        "{number} gsnap {GSNAP_SOURCE} (site-a) -> {GSNAP_TARGET} ({SITE_B_NODE}, site-b) through {GSNAP_INTERMEDIATE}: job {}{}",
        job.id,
        if tracks > 0 {
            format!(", while the host keeps writing {GSNAP_SOURCE}")
        } else {
            String::new()
        }
    );
    let deadline = Instant::now() + std::time::Duration::from_secs(GSNAP_DEMO_SECONDS_MAX);
    let mut shown_step = None;
    let mut written = std::collections::BTreeSet::new();
    let mut host_writes = 0u64;
    let view = loop {
        let Response::Cluster(ClusterResponse::JobView(view)) =
            request(connection, ClusterRequest::GsnapShow { job: job.id }).await?
        else {
            bail!("unexpected answer to a gsnap query");
        };
        let step = view.job.current_step();
        if step != shown_step && !view.job.state.is_final() {
            if let Some(step) = step {
                println!(
                    "      {:>6.2} s  step {step:<11} {} of {} tracks copied",
                    started.elapsed().as_secs_f64(),
                    view.job.tracks_copied(),
                    view.job.tracks_total
                );
            }
            shown_step = step;
        }
        if view.job.state.is_final() {
            break view;
        }
        ensure!(
            Instant::now() < deadline,
            "the gsnap job did not end within {GSNAP_DEMO_SECONDS_MAX} s: {view:?}"
        );
        if tracks > 0 {
            // The host writes on: none of it may reach the target, which gets the image
            // of the command's instant.
            let track = host_writes * 7 % tracks;
            host.write(track * u64::from(TRACK_BYTES), &pattern(200, 4096), false)
                .await?
                .context("NBD write")?;
            written.insert(track);
            host_writes += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    host.flush().await?.context("NBD flush")?;
    ensure!(
        view.job.state == JobState::Succeeded,
        "the gsnap job ended {:?}: {:?}",
        view.job.state,
        view.job.error
    );
    Ok((*view, written))
}

/// How long the demo waits for its gsnap job (64 MiB on loopback takes about a second).
const GSNAP_DEMO_SECONDS_MAX: u64 = 120;

/// A clone activated under host writes, and a mirror split, written to and resynced.
async fn sessions_demo(
    connection: &quinn::Connection,
    host: &mut NbdClient,
    nbd_address: SocketAddr,
) -> Result<()> {
    create_volume(connection, CLONE).await?;
    create_volume(connection, BCV).await?;
    let image_offset = 8 << 20;
    let before = host
        .read(image_offset, 1 << 20)
        .await?
        .context("NBD read")?;
    session(
        connection,
        SessionCommand::CloneCreate {
            source: VOLUME.to_string(),
            target: CLONE.to_string(),
            precopy: false,
            extents: Vec::new(),
        },
    )
    .await?;
    let activated = session(
        connection,
        SessionCommand::CloneActivate {
            target: CLONE.to_string(),
        },
    )
    .await?
    .context("the clone ended on activation")?;
    // The source is rewritten at once: copy before write keeps the clone's point in time.
    host.write(image_offset, &pattern(200, 1 << 20), true)
        .await?
        .context("NBD write")?;
    let mut clone = NbdClient::connect(nbd_address, CLONE).await?;
    let from_clone = clone
        .read(image_offset, 1 << 20)
        .await?
        .context("NBD read")?;
    ensure!(
        from_clone == before,
        "the clone does not hold the source's image of its activation"
    );
    clone.disconnect().await?;
    let copied = settled(connection, SessionKind::Clone, CLONE).await?;
    session(
        connection,
        SessionCommand::CloneTerminate {
            target: CLONE.to_string(),
        },
    )
    .await?;
    println!(
        "7. cloned {VOLUME} -> {CLONE}: ready at activation with {} tracks still to copy; the source was rewritten at once and the clone kept the old image (copy before write); {} tracks copied, clone terminated",
        activated.tracks_remaining, copied.tracks_copied
    );

    session(
        connection,
        SessionCommand::MirrorEstablish {
            standard: VOLUME.to_string(),
            bcv: BCV.to_string(),
            mode: MirrorMode::Sync,
            strict: false,
            target_timeout_milliseconds: None,
        },
    )
    .await?;
    let established = settled(connection, SessionKind::Mirror, BCV).await?;
    host.write(0, &pattern(77, 4096), true)
        .await?
        .context("NBD write")?;
    session(
        connection,
        SessionCommand::MirrorSplit {
            bcv: BCV.to_string(),
            differential: false,
        },
    )
    .await?;
    let mut bcv = NbdClient::connect(nbd_address, BCV).await?;
    ensure!(
        bcv.read(0, 4096).await?.context("NBD read")? == pattern(77, 4096),
        "the split BCV lacks a write the sync mirror acknowledged"
    );
    bcv.disconnect().await?;
    for track in [3u64, 500, 1000] {
        host.write(
            track * u64::from(TRACK_BYTES),
            &pattern(track as u8, 4096),
            false,
        )
        .await?
        .context("NBD write")?;
    }
    session(
        connection,
        SessionCommand::MirrorReestablish {
            bcv: BCV.to_string(),
        },
    )
    .await?;
    let resynced = settled(connection, SessionKind::Mirror, BCV).await?;
    ensure!(
        resynced.tracks_copied_last == 3,
        "reestablish copied {} tracks, not the 3 changed",
        resynced.tracks_copied_last
    );
    session(
        connection,
        SessionCommand::MirrorSplit {
            bcv: BCV.to_string(),
            differential: false,
        },
    )
    .await?;
    println!(
        "8. mirrored {VOLUME} -> {BCV} (sync): established with {} tracks, split with a write the mirror acknowledged, 3 tracks rewritten, reestablished copying exactly {} tracks, split again",
        established.tracks_copied_last, resynced.tracks_copied_last
    );
    Ok(())
}

pub async fn run() -> Result<()> {
    let started = Instant::now();
    let directory = tempfile::tempdir().context("cannot make a temporary directory")?;
    let certs = directory.path().join("certs");
    protocol::pki::init_cluster(&certs, &["demo-node".to_string(), SITE_B_NODE.to_string()])?;
    println!(
        "tandem demo — everything below runs on loopback in {}",
        directory.path().display()
    );
    println!("1. made a cluster CA, a node certificate and an admin certificate");

    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let config = NodeConfig {
        name: "demo-node".to_string(),
        site: "site-a".to_string(),
        data_dir: directory.path().join("data"),
        listen: loopback,
        nbd: loopback,
        metrics: None,
        certs: certs.clone(),
        control_plane: true,
        members: Vec::new(),
        advertise: None,
        capacity_bytes: Some(1 << 30),
        fault_injection: false,
        raft_compact_after_entries: None,
        copy_rate_mebibytes_per_second: node::config::NODE_COPY_RATE_DEFAULT_MEBIBYTES_PER_SECOND,
    };
    let node = node::runtime::start(&config).await?;
    println!(
        "2. started node demo-node: QUIC (mutual TLS) on {}, NBD on {}",
        node.quic_address, node.nbd_address
    );

    let admin = protocol::pki::Identity::load(&certs, protocol::pki::ADMIN_NAME)?;
    let endpoint = protocol::transport::client_endpoint(&admin)?;
    let connection = protocol::transport::connect(&endpoint, node.quic_address).await?;
    request(&connection, ClusterRequest::Init).await?;
    wait_for_registration(&connection, "demo-node").await?;
    println!(
        "3. started a one-member control plane (Raft) on demo-node; the node registered with it"
    );
    request(
        &connection,
        ClusterRequest::VolumeCreate {
            request_id: rand::random(),
            name: VOLUME.to_string(),
            node: Some("demo-node".to_string()),
            size_bytes: VOLUME_BYTES,
            track_size_bytes: TRACK_BYTES,
        },
    )
    .await?;
    println!("   created volume '{VOLUME}' through the catalog: 64 MiB in 1024 tracks of 64 KiB");

    let mut host = NbdClient::connect(node.nbd_address, VOLUME).await?;
    ensure!(
        host.size_bytes == VOLUME_BYTES,
        "NBD export reports {} bytes",
        host.size_bytes
    );
    let mut written_bytes = 0;
    for (index, (offset, length)) in WRITES.iter().enumerate() {
        let data = pattern(index as u8 + 1, *length);
        host.write(*offset, &data, false)
            .await?
            .with_context(|| format!("NBD write at {offset}"))?;
        written_bytes += length;
    }
    host.flush().await?.context("NBD flush")?;
    for (index, (offset, length)) in WRITES.iter().enumerate() {
        let read = host
            .read(*offset, *length as u32)
            .await?
            .context("NBD read")?;
        ensure!(
            read == pattern(index as u8 + 1, *length),
            "read back at {offset} differs from what was written"
        );
    }
    let untouched = host.read(32 << 20, 65536).await?.context("NBD read")?;
    ensure!(
        untouched.iter().all(|byte| *byte == 0),
        "a never-written track does not read as zeros"
    );
    println!(
        "4. wrote {} writes ({} bytes, some across track boundaries), flushed, read every byte back through NBD: identical; unwritten tracks read as zeros",
        WRITES.len(),
        written_bytes
    );

    let Response::Snapped { elapsed_micros, .. } = request(
        &connection,
        ClusterRequest::Snap {
            request_id: rand::random(),
            source: VOLUME.to_string(),
            target: SNAPSHOT.to_string(),
            extents: Vec::new(),
            overwrite: false,
        },
    )
    .await?
    else {
        bail!("unexpected answer to the snapshot request");
    };
    println!(
        "5. took a pointer snapshot {VOLUME} -> {SNAPSHOT} in {elapsed_micros} µs (no data copied)"
    );

    for (index, (offset, length)) in WRITES.iter().enumerate() {
        let data = pattern(index as u8 + 100, *length);
        host.write(*offset, &data, true)
            .await?
            .with_context(|| format!("NBD write at {offset}"))?;
    }
    let mut snapshot = NbdClient::connect(node.nbd_address, SNAPSHOT).await?;
    let mut source_checksum = 0u32;
    let mut snapshot_checksum = 0u32;
    for (index, (offset, length)) in WRITES.iter().enumerate() {
        let from_snapshot = snapshot
            .read(*offset, *length as u32)
            .await?
            .context("NBD read")?;
        let from_source = host
            .read(*offset, *length as u32)
            .await?
            .context("NBD read")?;
        ensure!(
            from_snapshot == pattern(index as u8 + 1, *length),
            "the snapshot changed when its source was rewritten"
        );
        ensure!(
            from_source == pattern(index as u8 + 100, *length),
            "the source lost a write made after the snapshot"
        );
        snapshot_checksum = crc32c::crc32c_append(snapshot_checksum, &from_snapshot);
        source_checksum = crc32c::crc32c_append(source_checksum, &from_source);
    }
    println!("6. rewrote the source (FUA writes): the snapshot still holds the old image (crc32c {snapshot_checksum:08x}), the source the new one (crc32c {source_checksum:08x})");

    sessions_demo(&connection, &mut host, node.nbd_address).await?;

    let second_site = NodeConfig {
        name: SITE_B_NODE.to_string(),
        site: "site-b".to_string(),
        data_dir: directory.path().join("data-b"),
        control_plane: false,
        members: vec![node.quic_address.to_string()],
        ..config.clone()
    };
    let mut site_b = node::runtime::start(&second_site).await?;
    wait_for_registration(&connection, SITE_B_NODE).await?;
    println!(
        "9. started node {SITE_B_NODE} on site-b (QUIC on {}); it registered with the control plane on site-a",
        site_b.quic_address
    );
    gsnap_demo(&connection, node.nbd_address, site_b.nbd_address).await?;

    let Response::Cluster(ClusterResponse::Volumes(volumes)) =
        request(&connection, ClusterRequest::VolumeList).await?
    else {
        bail!("unexpected answer to the list request");
    };
    println!("12. volumes in the catalog:");
    for record in &volumes {
        println!(
            "     {:<12} {:>3} MiB  on {:<9}  {:<6} {}",
            record.name,
            record.size_bytes >> 20,
            record.node,
            record.state.to_string(),
            record.readiness
        );
    }
    host.disconnect().await?;
    snapshot.disconnect().await?;
    connection.close(0u32.into(), b"demo done");
    endpoint.wait_idle().await;
    site_b.stop().await;
    let mut node = node;
    node.stop().await;
    println!(
        "demo finished in {:.2} s: every check passed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
