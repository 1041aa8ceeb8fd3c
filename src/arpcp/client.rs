//! The requesting side of ARPCP, used by the gateway (ATASK, GET, TASK, ID, SIGNAL
//! terminate) and by agents (SIGNALs, announcements). Keeps a few idle connections
//! per peer for reuse, and bounds every exchange by a timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::TcpStream;

use super::codec::CodecError;
use super::connection::Connection;
use super::{Method, ProtocolError, Request, Response};

/// Longest response line accepted: results can be larger than requests.
pub const MAX_RESPONSE_LEN: usize = 16 * 1024 * 1024;
/// Idle connections kept per peer.
pub const MAX_POOLED_PER_PEER: usize = 64;
/// A pooled connection idle longer than this is dropped rather than reused, well
/// before the peer's idle timeout closes it under us.
pub const POOL_IDLE: Duration = Duration::from_secs(20);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("connection to {addr} failed: {source}")]
    Io { addr: String, source: CodecError },
    #[error("{addr} closed the connection without answering")]
    Closed { addr: String },
    #[error("{addr} sent an invalid response: {error}")]
    BadResponse { addr: String, error: ProtocolError },
}

impl ClientError {
    /// True when the peer could not be reached at all (it did not see the request).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

pub struct ArpcpClient {
    pool: Mutex<HashMap<String, Vec<(Connection, Instant)>>>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Default for ArpcpClient {
    fn default() -> Self {
        ArpcpClient::new(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT)
    }
}

impl ArpcpClient {
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> Self {
        ArpcpClient {
            pool: Mutex::new(HashMap::new()),
            connect_timeout,
            request_timeout,
        }
    }

    /// Sends `req` to `addr` and returns the response, with the default timeout.
    pub async fn call(&self, addr: &str, req: &Request) -> Result<Response, ClientError> {
        self.call_with_timeout(addr, req, self.request_timeout)
            .await
    }

    /// Sends `req` and waits up to `timeout` for the response. A request that failed
    /// on a reused connection is sent once more on a fresh one, unless it is a TASK
    /// (not idempotent: the peer may have run it).
    pub async fn call_with_timeout(
        &self,
        addr: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let msg = req.to_json();
        if let Some(conn) = self.take_pooled(addr) {
            match self.exchange(conn, addr, &msg, timeout).await {
                Ok(r) => return Ok(r),
                Err(e) if req.method() == Method::Task => return Err(e),
                Err(_) => {}
            }
        }
        let conn = self.connect(addr).await?;
        self.exchange(conn, addr, &msg, timeout).await
    }

    async fn connect(&self, addr: &str) -> Result<Connection, ClientError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Connection::new(stream, MAX_RESPONSE_LEN).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })
    }

    async fn exchange(
        &self,
        mut conn: Connection,
        addr: &str,
        msg: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            addr: addr.to_string(),
            source,
        };
        let round_trip = async {
            conn.send(msg).await.map_err(io)?;
            match conn.read_line().await.map_err(io)? {
                Some(line) => Response::parse(&line).map_err(|error| ClientError::BadResponse {
                    addr: addr.to_string(),
                    error,
                }),
                None => Err(ClientError::Closed {
                    addr: addr.to_string(),
                }),
            }
        };
        let response = tokio::time::timeout(timeout, round_trip)
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.to_string(),
                timeout,
            })??;
        self.put_back(addr, conn);
        Ok(response)
    }

    fn take_pooled(&self, addr: &str) -> Option<Connection> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(addr)?;
        while let Some((conn, since)) = conns.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some(conn);
            }
        }
        None
    }

    fn put_back(&self, addr: &str, conn: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.entry(addr.to_string()).or_default();
        if conns.len() < MAX_POOLED_PER_PEER {
            conns.push((conn, Instant::now()));
        }
    }

    /// Drops the idle connections to `addr` (after it failed, say).
    pub fn forget(&self, addr: &str) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.remove(addr);
    }
}
