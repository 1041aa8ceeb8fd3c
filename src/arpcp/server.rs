//! The ARPCP server loop shared by the agent and the gateway's SIGNAL listener:
//! accepts connections up to a limit, answers the requests of each connection in
//! order (pipelined ones too), closes idle and over-long-line connections, and on
//! shutdown stops accepting and lets each connection finish its current request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::codec::CodecError;
use super::connection::Connection;
use super::{ProtocolError, Request, Response, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_LINE_LEN};

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
    let mut conn = Connection::new(stream, MAX_LINE_LEN)?;
    let peer = PeerInfo {
        peer: conn.peer_addr(),
        local: conn.local_addr(),
    };
    loop {
        let line = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(IDLE_TIMEOUT, conn.read_line()) => match r {
                Err(_idle) => return Ok(()),
                Ok(r) => r,
            },
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(CodecError::LineTooLong { limit }) => {
                let e = ProtocolError::LineTooLong { limit };
                warn!(peer = %peer.peer, "{e}");
                conn.send(&Response::error(&e)).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let response = match Request::parse(&line) {
            Ok(req) => handler.handle(req, peer).await,
            Err(e) => {
                debug!(peer = %peer.peer, "bad request: {e}");
                Response::error(&e)
            }
        };
        conn.send(&response).await?;
    }
}
