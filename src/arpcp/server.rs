//! The ARPCP server loop shared by the agent and the gateway's SIGNAL listener:
//! accepts connections up to a limit, answers the requests of each connection in
//! order (pipelined ones too, handled side by side and answered in order, several
//! answers per write), closes idle and over-long-line connections, and on shutdown
//! stops accepting and reading and lets each connection answer what it has read.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::Either;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::codec::CodecError;
use super::connection::Connection;
use super::{
    ProtocolError, Request, Response, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_LINE_LEN,
    MAX_PIPELINED_REQUESTS,
};

/// Who sent a request, and on which of our addresses it arrived.
#[derive(Debug, Clone, Copy)]
pub struct PeerInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// What a server does with a well-formed request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, peer: PeerInfo) -> impl Future<Output = Response> + Send;
}

/// Serves `listener` until `shutdown` is cancelled, then waits for open connections
/// to finish the request they are on.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = serve_connection(stream, &*handler, &shutdown).await {
                debug!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    handler: &H,
    shutdown: &CancellationToken,
) -> Result<(), CodecError> {
    let conn = Connection::new(stream, MAX_LINE_LEN)?;
    let peer = PeerInfo {
        peer: conn.peer_addr(),
        local: conn.local_addr(),
    };
    let (mut sink, mut lines) = conn.split();
    // Requests being handled, answered in the order they came. Each handler runs
    // its state changes before it first waits (for a durable commit, say), and
    // handlers are first polled in arrival order, so requests on one connection
    // also take effect in order; waiting for disk overlaps across requests.
    let mut in_flight = FuturesOrdered::new();
    let mut reading = true;
    let mut idle_since = tokio::time::Instant::now();
    loop {
        if !reading && in_flight.is_empty() {
            return Ok(());
        }
        let can_read = reading && in_flight.len() < MAX_PIPELINED_REQUESTS;
        let idle = tokio::time::sleep_until(idle_since + IDLE_TIMEOUT);
        tokio::select! {
            _ = shutdown.cancelled(), if reading => reading = false,
            _ = idle, if in_flight.is_empty() => return Ok(()),
            line = lines.next(), if can_read => {
                idle_since = tokio::time::Instant::now();
                let answer = match line {
                    None => {
                        reading = false;
                        continue;
                    }
                    Some(Ok(line)) => match Request::parse(&line) {
                        Ok(req) => Either::Left(handler.handle(req, peer)),
                        Err(e) => {
                            debug!(peer = %peer.peer, "bad request: {e}");
                            Either::Right(std::future::ready(Response::error(&e)))
                        }
                    },
                    Some(Err(CodecError::LineTooLong { limit })) => {
                        let e = ProtocolError::LineTooLong { limit };
                        warn!(peer = %peer.peer, "{e}");
                        // Answer it after the requests before it, then close.
                        reading = false;
                        Either::Right(std::future::ready(Response::error(&e)))
                    }
                    Some(Err(e)) => return Err(e),
                };
                in_flight.push_back(answer);
            }
            Some(response) = in_flight.next() => {
                sink.feed(response).await?;
                // Answers that are ready too go out in the same write.
                while let Some(Some(more)) = in_flight.next().now_or_never() {
                    sink.feed(more).await?;
                }
                sink.flush().await?;
                idle_since = tokio::time::Instant::now();
            }
        }
    }
}
