//! Wire formats of tandem, with no storage and no policy in them.
//!
//! - [`cluster`]: the control plane's catalog records, commands and cluster requests.
//! - [`codec`]: the one place that turns values into bytes (bincode, size-limited).
//! - [`frame`]: the versioned frame that carries every QUIC message.
//! - [`messages`]: the requests and responses nodes and the CLI exchange.
//! - [`nbd`]: the NBD newstyle-fixed wire protocol as pure parsing and encoding.
//! - [`session`]: copy sessions' kinds, states, commands, reports and the one table of
//!   legal transitions.
//! - [`pki`] and [`transport`]: the cluster CA, certificates, and quinn endpoints with
//!   mutual TLS.

pub mod cluster;
pub mod codec;
pub mod error;
pub mod frame;
pub mod gsnap;
pub mod messages;
pub mod nbd;
pub mod pki;
pub mod session;
pub mod transport;

pub use error::Error;
