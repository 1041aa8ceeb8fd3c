//! ARPCP 1.0: the line-delimited JSON protocol between the gateway (controller) and
//! its agents. This module is the wire layer only: message types and their parsing
//! (`message`), status codes and errors (`error`), framing (`codec`), a framed
//! socket (`connection`), a generic server loop (`server`) and a pooled client
//! (`client`). What a request *means* is decided by the agent and the gateway.

pub mod client;
pub mod codec;
pub mod connection;
pub mod error;
pub mod message;
pub mod server;

use std::time::Duration;

pub use client::{ArpcpClient, ClientError};
pub use error::{Code, ProtocolError};
pub use message::{
    Args, AtaskStatus, GetData, IdData, LeaseGrant, Method, Progress, Request, Response,
    SignalRequest, TaskError,
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
/// A connection with no complete request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests of one connection handled at once; a pipelining peer that sends more
/// waits (we stop reading) until answers go out.
pub const MAX_PIPELINED_REQUESTS: usize = 128;
/// Connections a server serves at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;
