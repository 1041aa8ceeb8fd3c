//! A connection carrying ARPCP lines, plain TCP or TLS over it: owns the stream and
//! its read buffer, which is charged to a budget shared with the owner's other
//! connections.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use super::codec::{CodecError, InputBudget, LineCodec};

/// A byte stream a connection can run over: a TCP socket, or a TLS session on one.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Boxed so that the server loop, the table and the client pool are one code path
/// for plain and TLS connections.
pub type BoxIo = Box<dyn Io>;

/// The writing half of a split connection, taking items of type `T`.
pub type Writer<T> = futures::stream::SplitSink<Framed<BoxIo, LineCodec>, T>;
/// The reading half of a split connection: lines.
pub type Reader = futures::stream::SplitStream<Framed<BoxIo, LineCodec>>;

pub struct Connection {
    framed: Framed<BoxIo, LineCodec>,
    peer: SocketAddr,
    local: SocketAddr,
}

impl Connection {
    /// Lines of at most `max_line` bytes; what the read buffer holds beyond a small
    /// size is charged to `budget` until the connection is dropped.
    pub fn new(
        stream: TcpStream,
        max_line: usize,
        budget: Arc<InputBudget>,
    ) -> std::io::Result<Self> {
        let (peer, local) = prepare(&stream)?;
        Ok(Connection::over(
            Box::new(stream),
            peer,
            local,
            max_line,
            budget,
        ))
    }

    /// A connection over an established stream (a TLS session, say) between `peer`
    /// and `local`.
    pub fn over(
        io: BoxIo,
        peer: SocketAddr,
        local: SocketAddr,
        max_line: usize,
        budget: Arc<InputBudget>,
    ) -> Self {
        Connection {
            framed: Framed::new(io, LineCodec::with_budget(max_line, budget)),
            peer,
            local,
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next non-empty line, or `None` when the peer closed cleanly.
    pub async fn read_line(&mut self) -> Result<Option<BytesMut>, CodecError> {
        self.framed.next().await.transpose()
    }

    /// The writing and reading halves, for serving several requests at once.
    pub fn split(self) -> (Writer<super::Response>, Reader) {
        self.framed.split()
    }

    /// The halves as raw lines: writing pre-encoded lines, reading responses.
    pub fn split_raw(self) -> (Writer<bytes::Bytes>, Reader) {
        self.framed.split()
    }

    /// Writes one pre-encoded line (terminator included) and flushes it.
    pub async fn send_raw(&mut self, line: bytes::Bytes) -> Result<(), CodecError> {
        self.framed.send(line).await
    }

    /// Writes one message as a line and flushes it.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), CodecError> {
        self.framed.send(msg).await
    }
}

/// Sets up a fresh socket for line traffic (small answers go out at once) and
/// returns its peer and local addresses.
pub fn prepare(stream: &TcpStream) -> std::io::Result<(SocketAddr, SocketAddr)> {
    stream.set_nodelay(true)?;
    Ok((stream.peer_addr()?, stream.local_addr()?))
}
