//! ARPCP 1.0: the line-delimited JSON protocol between the gateway (controller) and
//! its agents. This module is the wire layer only: message types and their parsing
//! (`message`), status codes and errors (`error`), framing (`codec`), a framed
//! socket (`connection`), a generic server loop (`server`) and a pooled client
//! (`client`), over plain TCP or mutual TLS (`tls`). What a request *means* is decided by the agent and the gateway.

pub mod client;
pub mod codec;
pub mod connection;
pub mod error;
pub mod message;
pub mod server;
pub mod tls;

use std::time::Duration;

pub use client::{ArpcpClient, ClientError};
pub use error::{Code, ProtocolError};
pub use message::{
    Args, AtaskStatus, CatalogEntry, GetData, IdData, LeaseGrant, Method, ProcedureKind, Progress,
    Request, Response, SignalRequest, TaskError, MAX_NAME_LEN,
};

/// Protocol version written by this implementation.
pub const VERSION: &str = "1.0";
/// The agent's default port (the prototype's).
pub const DEFAULT_AGENT_PORT: u16 = 7018;
/// The gateway's default ARPCP port, where agents send SIGNALs.
pub const DEFAULT_CONTROLLER_PORT: u16 = 7019;
/// Longest line a receiver buffers. A longer one is answered with 200 and the
/// connection closes, so a peer can never make us hold more than this per connection.
pub const MAX_LINE_LEN: usize = 1024 * 1024;
/// A connection with no complete request for this long is closed, and so is one
/// whose peer does not take an answer off the wire for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests of one connection handled at once; a pipelining peer that sends more
/// waits (we stop reading) until answers go out.
pub const MAX_PIPELINED_REQUESTS: usize = 128;
/// Connections a server keeps open at once. A new one beyond it makes room by
/// closing the least recently active idle connection of the peer holding the most
/// connections, or is refused (300) when that peer has none idle.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections one peer (one IP address) may hold at once. A new one beyond it
/// closes that peer's own least recently active idle connection, or is refused
/// (300) when none is idle: a peer flooding us only ever pushes out itself.
pub const MAX_CONNECTIONS_PER_PEER: usize = 512;
/// Bytes of unfinished request lines a server buffers over all its connections.
/// A connection whose partial line does not fit is answered 200 and closed.
pub const MAX_BUFFERED_INPUT: usize = 64 * 1024 * 1024;
/// A read buffer up to this size is not charged to a budget, so ordinary lines
/// (a controller's requests, an agent's SIGNALs) always fit. It also bounds what the
/// uncharged buffers hold: `MAX_CONNECTIONS` times this.
pub const UNCHARGED_READ_BUFFER: usize = 64 * 1024;
