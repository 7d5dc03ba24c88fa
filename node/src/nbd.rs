//! The NBD export: a thin tokio driver around the pure wire module
//! [`protocol::nbd`] and the volume store.
//!
//! Each connection negotiates options, then reads requests in order and runs each one in
//! its own task, so a client with many requests in flight (qemu, fio at QD16, nbdcopy)
//! gets them served concurrently; replies go back through one writer task in the order
//! they finish. Readiness is checked on every request, so a volume made `not-ready` or
//! `read-only` while a host is connected takes effect at once.

use crate::copy::Sessions;
use crate::engine::{Durability, Engine};
use crate::nbd_hosts::OpenConnection;
use crate::store::{Volume, VolumeStore};
use crate::Error;
use protocol::messages::Readiness;
use protocol::nbd::handshake::{self, ExportCatalog, ExportInfo, NextStep};
use protocol::nbd::transmission::{self, Command, RequestCheck, RequestHeader};
use protocol::nbd::{
    command_flag, error_value, CLIENT_FLAGS_BYTES, OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Payload bytes a connection may hold in flight before it stops reading new requests:
/// bounds a node's memory whatever its clients send.
const IN_FLIGHT_BYTES_MAX: usize = 128 << 20;
/// In-flight budget is counted in units of this many bytes.
const IN_FLIGHT_UNIT_BYTES: usize = 1 << 10;
/// Requests a connection may have in flight at once.
const IN_FLIGHT_REQUESTS_MAX: usize = 256;
/// A client that has not finished negotiating after this long is dropped.
const HANDSHAKE_SECONDS_MAX: u64 = 30;

struct StoreCatalog<'a, E: Engine> {
    store: &'a VolumeStore<E>,
}

/// The export a volume offers right now: none when it is not ready.
fn export_of(volume: &Volume) -> Option<ExportInfo> {
    if volume.is_deleted() {
        return None;
    }
    match volume.readiness() {
        Readiness::NotReady => None,
        readiness => Some(ExportInfo {
            size_bytes: volume.size_bytes,
            read_only: readiness == Readiness::ReadOnly,
        }),
    }
}

impl<E: Engine> ExportCatalog for StoreCatalog<'_, E> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.store
            .volume(name)
            .ok()
            .and_then(|volume| export_of(&volume))
    }

    fn unavailable_reason(&self, name: &str) -> Option<String> {
        let volume = self.store.volume(name).ok()?;
        (!volume.is_deleted() && volume.readiness() == Readiness::NotReady).then(|| {
            format!(
                "volume '{name}' exists but is not ready (readiness not-ready): a clone destination becomes ready when it is activated, a BCV when it is split; see `tandem volume show {name}`"
            )
        })
    }

    fn names(&self) -> Vec<String> {
        self.store
            .list()
            .into_iter()
            .filter(|info| info.readiness != Readiness::NotReady)
            .map(|info| info.name)
            .collect()
    }
}

/// Serves NBD on `listener` until the task is dropped or aborted.
pub async fn serve<E: Engine>(listener: TcpListener, store: Arc<Sessions<E>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "NBD accept failed");
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            crate::metrics::nbd_connection_opened();
            let mut export = None;
            let outcome = serve_connection(stream, store, peer, &mut export).await;
            // Before the client chose an export there is no volume to name.
            let volume = export.as_deref().unwrap_or("-");
            match outcome {
                Ok(()) => tracing::debug!(%peer, volume, "NBD client disconnected"),
                Err(error) => tracing::info!(%peer, volume, %error, "NBD connection closed"),
            }
            crate::metrics::nbd_connection_closed();
        });
    }
}

/// Serves one client; `export` names the volume once the client has chosen it, so that
/// the caller's log line can name it too.
async fn serve_connection<E: Engine>(
    mut stream: TcpStream,
    store: Arc<Sessions<E>>,
    peer: SocketAddr,
    export: &mut Option<String>,
) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let negotiated = tokio::time::timeout(
        std::time::Duration::from_secs(HANDSHAKE_SECONDS_MAX),
        negotiate(&mut stream, store.store()),
    )
    .await
    .map_err(|_| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "NBD handshake took too long",
        ))
    })??;
    let Some(export_name) = negotiated else {
        return Ok(());
    };
    *export = Some(export_name.clone());
    let volume = store.store().volume(&export_name)?;
    // Registered so that a delete can name this client, and close it cleanly.
    let Some(connection) = store.store().hosts().open(volume.id, peer) else {
        tracing::info!(%peer, volume = %export_name, "NBD client refused: the volume is being deleted");
        return Ok(());
    };
    crate::metrics::nbd_volume_opened(&export_name);
    tracing::debug!(volume = %export_name, %peer, "NBD transmission started");
    transmit(stream, store, volume, peer, connection).await
}

/// Runs the option haggling; returns the export to serve, or `None` when the client left.
async fn negotiate<E: Engine>(
    stream: &mut TcpStream,
    store: &VolumeStore<E>,
) -> Result<Option<String>, Error> {
    stream.write_all(&handshake::server_greeting()).await?;
    let mut flag_bytes = [0u8; CLIENT_FLAGS_BYTES];
    stream.read_exact(&mut flag_bytes).await?;
    let client_flags = handshake::parse_client_flags(&flag_bytes)?;
    loop {
        let mut header_bytes = [0u8; OPTION_HEADER_BYTES];
        stream.read_exact(&mut header_bytes).await?;
        // The header's length is checked against its limit before the data is read.
        let header = handshake::parse_option_header(&header_bytes)?;
        let mut data = vec![0u8; header.data_bytes as usize];
        stream.read_exact(&mut data).await?;
        let outcome =
            handshake::answer_option(client_flags, &header, &data, &StoreCatalog { store });
        stream.write_all(&outcome.reply).await?;
        match outcome.next {
            NextStep::Continue => {}
            NextStep::Transmission { export_name, .. } => return Ok(Some(export_name)),
            NextStep::Close => return Ok(None),
        }
    }
}

/// A finished request's reply: the 16-byte header, for a READ its data, and the
/// in-flight permits it holds until the reply is on the socket — so a client that stops
/// reading replies also stops being served new requests, and memory stays bounded.
struct Reply {
    header: [u8; protocol::nbd::SIMPLE_REPLY_BYTES],
    data: Option<Vec<u8>>,
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

fn error_value_of(error: &Error) -> u32 {
    match error {
        Error::Unaligned { .. } | Error::OutOfRange { .. } => error_value::EINVAL,
        Error::VolumeNotReady { .. } => error_value::EPERM,
        _ => error_value::EIO,
    }
}

fn operation_name(command: Command) -> &'static str {
    match command {
        Command::Read => "read",
        Command::Write => "write",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::WriteZeroes => "write_zeroes",
        Command::Disconnect => "disconnect",
        Command::Unknown(_) => "unknown",
    }
}

async fn transmit<E: Engine>(
    stream: TcpStream,
    store: Arc<Sessions<E>>,
    volume: Arc<Volume>,
    peer: SocketAddr,
    connection: OpenConnection,
) -> Result<(), Error> {
    let (mut reader, writer) = stream.into_split();
    let (reply_sender, mut reply_receiver) = mpsc::channel::<Reply>(IN_FLIGHT_REQUESTS_MAX);
    let writer_task = tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(256 << 10, writer);
        while let Some(reply) = reply_receiver.recv().await {
            writer.write_all(&reply.header).await?;
            if let Some(data) = &reply.data {
                writer.write_all(data).await?;
            }
            drop(reply.permits);
            // Batch replies that are already waiting into one send; flush when idle.
            if reply_receiver.is_empty() {
                writer.flush().await?;
            }
        }
        writer.flush().await?;
        Ok::<(), std::io::Error>(())
    });
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX / IN_FLIGHT_UNIT_BYTES));
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_REQUESTS_MAX));

    let result = 'requests: loop {
        let mut header_bytes = [0u8; REQUEST_HEADER_BYTES];
        // A delete closes the connection between requests: those in flight are answered
        // below before the socket closes.
        let header_read = tokio::select! {
            biased;
            () = connection.close_requested() => {
                tracing::info!(volume = %volume.name, %peer, "NBD connection closed: the volume is being deleted");
                break 'requests Ok(());
            }
            read = reader.read_exact(&mut header_bytes) => read,
        };
        match header_read {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(error) => break Err(error.into()),
        }
        let header = match transmission::parse_request_header(&header_bytes) {
            Ok(header) => header,
            Err(error) => break Err(error.into()),
        };
        let readiness = if volume.is_deleted() {
            Readiness::NotReady
        } else {
            volume.readiness()
        };
        let mut check = transmission::classify_request(
            &header,
            volume.size_bytes,
            readiness == Readiness::ReadOnly,
        );
        // A volume that stopped being ready refuses everything but a clean goodbye.
        if readiness == Readiness::NotReady
            && check == RequestCheck::Proceed
            && header.command != Command::Disconnect
        {
            check = RequestCheck::ErrorReply {
                error: error_value::EIO,
                discard_payload_bytes: header.payload_bytes(),
            };
        }
        match check {
            RequestCheck::Disconnect => {
                tracing::info!(
                    volume = %volume.name,
                    %peer,
                    length = header.length,
                    "NBD request too long; disconnecting"
                );
                break Ok(());
            }
            RequestCheck::ErrorReply {
                error,
                discard_payload_bytes,
            } => {
                metrics::counter!(
                    crate::metrics::NBD_REFUSED_TOTAL,
                    "operation" => operation_name(header.command),
                    "volume" => volume.name.clone()
                )
                .increment(1);
                let mut remaining = u64::from(discard_payload_bytes);
                let mut sink = vec![0u8; (remaining as usize).min(64 << 10)];
                while remaining > 0 {
                    let step = remaining.min(sink.len() as u64) as usize;
                    if let Err(error) = reader.read_exact(&mut sink[..step]).await {
                        break 'requests Err(error.into());
                    }
                    remaining -= step as u64;
                }
                let reply = Reply {
                    header: transmission::encode_simple_reply(error, header.cookie),
                    data: None,
                    permits: None,
                };
                if reply_sender.send(reply).await.is_err() {
                    break Ok(());
                }
                continue;
            }
            RequestCheck::Proceed => {}
        }
        if header.command == Command::Disconnect {
            break Ok(());
        }
        // Only requests that carry data (a WRITE's payload, a READ's reply) hold memory;
        // a TRIM or WRITE_ZEROES may span gigabytes and costs one unit.
        let data_bytes = match header.command {
            Command::Read | Command::Write => header.length as usize,
            _ => 0,
        };
        let units = data_bytes.div_ceil(IN_FLIGHT_UNIT_BYTES).max(1) as u32;
        let (Ok(budget_permit), Ok(slot_permit)) = (
            budget.clone().acquire_many_owned(units).await,
            slots.clone().acquire_owned().await,
        ) else {
            break Ok(());
        };
        let mut payload = Vec::new();
        if header.command == Command::Write {
            payload = vec![0u8; header.length as usize];
            if let Err(error) = reader.read_exact(&mut payload).await {
                break Err(error.into());
            }
        }
        let store = store.clone();
        let volume = volume.clone();
        let reply_sender = reply_sender.clone();
        tokio::spawn(async move {
            let (header, data) = execute(store, volume, peer, header, payload).await;
            let reply = Reply {
                header,
                data,
                permits: Some((budget_permit, slot_permit)),
            };
            // A closed writer drops the reply and its permits with it.
            let _ = reply_sender.send(reply).await;
        });
    };
    // Wait for requests still running so their replies are sent before the close.
    let _ = slots.acquire_many(IN_FLIGHT_REQUESTS_MAX as u32).await;
    drop(reply_sender);
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error.into()),
        Err(join_error) => return Err(Error::Io(std::io::Error::other(join_error.to_string()))),
    }
    result
}

async fn execute<E: Engine>(
    store: Arc<Sessions<E>>,
    volume: Arc<Volume>,
    peer: SocketAddr,
    header: RequestHeader,
    payload: Vec<u8>,
) -> ([u8; protocol::nbd::SIMPLE_REPLY_BYTES], Option<Vec<u8>>) {
    let started = Instant::now();
    let operation = operation_name(header.command);
    let durability = if header.flags & command_flag::FUA != 0 {
        Durability::Synced
    } else {
        Durability::Logged
    };
    let length = u64::from(header.length);
    let governed = store.clone();
    let volume_name = volume.name.clone();
    let outcome = tokio::task::spawn_blocking(move || match header.command {
        Command::Read => store.read(&volume, header.offset, length).map(Some),
        Command::Write => store
            .write(&volume, header.offset, length, Some(&payload), durability)
            .map(|()| None),
        Command::WriteZeroes | Command::Trim => store
            .write(&volume, header.offset, length, None, durability)
            .map(|()| None),
        Command::Flush => store.store().flush().map(|()| None),
        Command::Disconnect | Command::Unknown(_) => Ok(None),
    })
    .await
    .unwrap_or_else(|join_error| {
        Err(Error::Engine {
            detail: format!("storage task failed: {join_error}"),
        })
    });
    let latency = started.elapsed();
    // Latency by operation only: buckets per volume would multiply the series by ~20.
    metrics::histogram!(crate::metrics::NBD_SECONDS, "operation" => operation)
        .record(latency.as_secs_f64());
    if matches!(header.command, Command::Write | Command::WriteZeroes) {
        governed.record_host_write(latency);
    }
    match outcome {
        Ok(data) => {
            metrics::counter!(
                crate::metrics::NBD_OPERATIONS_TOTAL,
                "operation" => operation,
                "volume" => volume_name.clone()
            )
            .increment(1);
            if matches!(header.command, Command::Read | Command::Write) {
                metrics::counter!(
                    crate::metrics::NBD_BYTES_TOTAL,
                    "operation" => operation,
                    "volume" => volume_name
                )
                .increment(length);
            }
            (transmission::encode_simple_reply(0, header.cookie), data)
        }
        Err(error) => {
            metrics::counter!(
                crate::metrics::NBD_ERRORS_TOTAL,
                "operation" => operation,
                "volume" => volume_name.clone()
            )
            .increment(1);
            tracing::warn!(
                volume = %volume_name,
                %peer,
                %error,
                operation,
                offset = header.offset,
                length,
                "NBD request failed"
            );
            (
                transmission::encode_simple_reply(error_value_of(&error), header.cookie),
                None,
            )
        }
    }
}
