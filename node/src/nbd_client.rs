//! A small NBD client over the pure wire module, for the demo and for tests. It sends one
//! request at a time; real hosts (qemu, nbdcopy, fio) are what exercise pipelining.

use crate::{Error, Result};
use protocol::nbd::client::{self as wire, OptionReplyHeader};
use protocol::nbd::transmission::{Command, RequestHeader};
use protocol::nbd::{
    command_flag, info, reply, ClientFlags, OPTION_REPLY_HEADER_BYTES, SERVER_GREETING_BYTES,
    SIMPLE_REPLY_BYTES,
};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct NbdClient {
    stream: TcpStream,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    next_cookie: u64,
}

/// An NBD error value the server answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the NBD server answered with error value {0}")]
pub struct NbdErrorValue(pub u32);

fn protocol_error(detail: String) -> Error {
    Error::Protocol(protocol::Error::NbdMalformed { detail })
}

impl NbdClient {
    /// Connects and negotiates `export` with NBD_OPT_GO.
    pub async fn connect(address: SocketAddr, export: &str) -> Result<NbdClient> {
        let mut stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let mut greeting = [0u8; SERVER_GREETING_BYTES];
        stream.read_exact(&mut greeting).await?;
        let handshake_flags = wire::parse_server_greeting(&greeting)?;
        stream
            .write_all(&wire::encode_client_flags(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: wire::server_offers_no_zeroes(handshake_flags),
            }))
            .await?;
        stream.write_all(&wire::encode_go(export)).await?;
        let mut size_and_flags = None;
        loop {
            let mut header_bytes = [0u8; OPTION_REPLY_HEADER_BYTES];
            stream.read_exact(&mut header_bytes).await?;
            let header: OptionReplyHeader = wire::parse_option_reply_header(&header_bytes)?;
            let mut data = vec![0u8; header.data_bytes as usize];
            stream.read_exact(&mut data).await?;
            if header.is_error() {
                return Err(protocol_error(format!(
                    "server refused export '{export}' (reply type {:#x})",
                    header.reply_type
                )));
            }
            match header.reply_type {
                reply::INFO if wire::parse_info_type(&data)? == info::EXPORT => {
                    size_and_flags = Some(wire::parse_info_export(&data)?);
                }
                reply::ACK => break,
                _ => {}
            }
        }
        let (size_bytes, transmission_flags) = size_and_flags
            .ok_or_else(|| protocol_error("server sent no export information".to_string()))?;
        Ok(NbdClient {
            stream,
            size_bytes,
            transmission_flags,
            next_cookie: 1,
        })
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<std::result::Result<Vec<u8>, NbdErrorValue>> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&wire::encode_request(header)).await?;
        self.stream.write_all(payload).await?;
        let mut reply_bytes = [0u8; SIMPLE_REPLY_BYTES];
        self.stream.read_exact(&mut reply_bytes).await?;
        let reply = wire::parse_simple_reply(&reply_bytes)?;
        if reply.cookie != cookie {
            return Err(protocol_error(format!(
                "reply cookie {} for request {cookie}",
                reply.cookie
            )));
        }
        if reply.error != 0 {
            return Ok(Err(NbdErrorValue(reply.error)));
        }
        let mut data = Vec::new();
        if command == Command::Read {
            data = vec![0u8; length as usize];
            self.stream.read_exact(&mut data).await?;
        }
        Ok(Ok(data))
    }

    pub async fn read(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<std::result::Result<Vec<u8>, NbdErrorValue>> {
        self.request(Command::Read, 0, offset, length, &[]).await
    }

    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<std::result::Result<(), NbdErrorValue>> {
        let flags = if fua { command_flag::FUA } else { 0 };
        Ok(self
            .request(Command::Write, flags, offset, data.len() as u32, data)
            .await?
            .map(|_| ()))
    }

    pub async fn flush(&mut self) -> Result<std::result::Result<(), NbdErrorValue>> {
        Ok(self
            .request(Command::Flush, 0, 0, 0, &[])
            .await?
            .map(|_| ()))
    }

    pub async fn write_zeroes(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<std::result::Result<(), NbdErrorValue>> {
        Ok(self
            .request(Command::WriteZeroes, 0, offset, length, &[])
            .await?
            .map(|_| ()))
    }

    /// Gives up the typed interface, for tests that send hand-made bytes after the
    /// handshake.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn disconnect(mut self) -> Result<()> {
        let header = RequestHeader {
            flags: 0,
            command: Command::Disconnect,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        self.stream.write_all(&wire::encode_request(header)).await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}
