//! The gRPC API over TLS: accepts TCP connections, runs their TLS handshakes (the
//! gateway's certificate, ALPN `h2`, a client certificate optional but verified
//! against the cluster CA when given) and hands the finished ones to tonic, each
//! carrying what its certificate says for `auth.rs`.
//!
//! The handshakes are ours rather than tonic's so that they are bounded in number and
//! time like ARPCP's, and a refused one is logged with the peer and the reason.
//!
//! Without TLS (`plain_incoming`) the same bound on open connections holds: tonic
//! serves every connection it is handed, each in a task of its own.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::auth::{GrpcPeer, PeerCertificate};
use crate::arpcp::server::HandshakeLog;
use crate::arpcp::tls::{HandshakeError, ServerTls, Standing, HANDSHAKE_TIMEOUT};

/// TLS handshakes of the gRPC listener under way at once; more connections wait in
/// the kernel's backlog. Each lasts at most `HANDSHAKE_TIMEOUT`.
pub const MAX_GRPC_HANDSHAKES: usize = 64;
/// Open connections of the gRPC API (TLS ones handshaking or served, or plain
/// ones); at this many, new ones wait in the kernel's backlog until one closes.
pub const MAX_GRPC_CONNECTIONS: usize = 1024;
/// Connections whose handshake finished, waiting for tonic to take them.
pub const HANDED_OVER: usize = 16;

/// A gRPC connection whose TLS handshake finished.
pub struct GrpcConn {
    tls: TlsStream<TcpStream>,
    peer: GrpcPeer,
    /// Its place under `MAX_GRPC_CONNECTIONS`, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = GrpcPeer;

    fn connect_info(&self) -> GrpcPeer {
        self.peer.clone()
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The connections of `listener` once their handshakes have finished, until
/// `shutdown` is cancelled.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<GrpcConn, io::Error>> {
    let (tx, rx) = mpsc::channel(HANDED_OVER);
    tokio::spawn(accept_loop(listener, tls, tx, shutdown));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<Result<GrpcConn, io::Error>>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_GRPC_CONNECTIONS));
    let handshakes = Arc::new(Semaphore::new(MAX_GRPC_HANDSHAKES));
    let refusals = Arc::new(HandshakeLog::default());
    let acceptor = TlsAcceptor::from(tls.config.clone());
    let tls = Arc::new(tls);
    loop {
        let permits = async {
            let slot = slots.clone().acquire_owned().await.ok()?;
            let handshake = handshakes.clone().acquire_owned().await.ok()?;
            Some((slot, handshake))
        };
        let Some((slot, handshake)) = (tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits => p,
        }) else {
            return;
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "gRPC accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, tls, tx, refusals) =
            (acceptor.clone(), tls.clone(), tx.clone(), refusals.clone());
        tokio::spawn(async move {
            let conn = handshake_one(&acceptor, &tls, stream, addr, slot).await;
            drop(handshake);
            match conn {
                Ok(conn) => {
                    let _ = tx.send(Ok(conn)).await;
                }
                Err(e) => refusals.note(addr, &format_args!("gRPC {e}")),
            }
        });
    }
}

async fn handshake_one(
    acceptor: &TlsAcceptor,
    server_tls: &ServerTls,
    stream: TcpStream,
    addr: SocketAddr,
    slot: OwnedSemaphorePermit,
) -> Result<GrpcConn, HandshakeError> {
    let generation = server_tls.revocations.generation();
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Failed)?;
    let certificate = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => PeerCertificate::None,
        Some(cert) => match crate::tls::identity_of(cert) {
            Ok(who) => match Standing::of(tls.get_ref().1, server_tls, generation) {
                Some(standing) => PeerCertificate::Verified(who, Arc::new(Mutex::new(standing))),
                None => PeerCertificate::None,
            },
            Err(e) => PeerCertificate::Unusable(e.to_string()),
        },
    };
    Ok(GrpcConn {
        tls,
        peer: GrpcPeer { addr, certificate },
        _slot: slot,
    })
}

/// A plain gRPC connection holding its place under `MAX_GRPC_CONNECTIONS`.
pub struct PlainConn {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for PlainConn {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for PlainConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The plain connections of `listener`, at most `MAX_GRPC_CONNECTIONS` open at
/// once: the next is accepted only once a place is free, so tonic is never handed
/// more.
pub fn plain_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = Result<PlainConn, io::Error>> {
    let slots = Arc::new(Semaphore::new(MAX_GRPC_CONNECTIONS));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        // The semaphore is never closed.
        let slot = slots.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let conn = PlainConn { tcp, _slot: slot };
                    return Some((Ok(conn), (listener, slots)));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
