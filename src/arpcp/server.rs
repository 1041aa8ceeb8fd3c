//! The ARPCP server loop shared by the agent and the gateway's SIGNAL listener:
//! accepts every connection and keeps a table of the open ones, so that a peer over
//! its share (`MAX_CONNECTIONS_PER_PEER`), or a server at `MAX_CONNECTIONS`, makes
//! room by closing an idle connection of the peer holding the most — a flood pushes
//! out the flooder, never the controller. Answers the requests of each connection in
//! order (pipelined ones too, handled side by side and answered in order, several
//! answers per write), charges unfinished lines to one budget per server
//! (`MAX_BUFFERED_INPUT`), closes idle, stalled, over-long-line and over-budget
//! connections, and on shutdown stops accepting and reading and lets each
//! connection answer what it has read.
//!
//! Given a TLS configuration, a connection is served only once its TLS handshake
//! with a client certificate of the cluster CA has finished; the handshake runs
//! inside the connection's place in the table, so the limits hold for it too.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::Either;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::codec::{CodecError, InputBudget};
use super::connection::{self, Connection};
use super::tls::{HandshakeError, ServerTls, Standing};
use super::{
    Method, ProtocolError, Request, Response, IDLE_TIMEOUT, MAX_BUFFERED_INPUT, MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_PEER, MAX_LINE_LEN, MAX_PIPELINED_REQUESTS,
};
use crate::tls::{PeerIdentity, Role};

/// At most one warning per this interval about connections closed or refused for
/// the limits (each one is logged at debug level): a flood must not flood the log.
const LIMIT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// At most this many refused TLS handshakes are logged as warnings per
/// `LIMIT_WARN_INTERVAL` (the rest at debug level, counted in the next warning):
/// a stranger knocking must not flood the log.
pub const MAX_HANDSHAKE_WARNINGS: u64 = 20;

/// Who sent a request, and on which of our addresses it arrived.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Who the peer's certificate says it is; `None` on a plain (non-TLS) server.
    pub identity: Option<PeerIdentity>,
}

impl PeerInfo {
    /// Refuses `method` unless the peer's certificate carries `needed`. A plain
    /// server has no identities to check and serves everyone, as ARPCP 1.0 did.
    pub fn require(&self, method: Method, needed: Role) -> Result<(), ProtocolError> {
        match &self.identity {
            Some(who) if who.role != needed => Err(ProtocolError::RoleRequired {
                method: method.as_str(),
                needed,
                role: who.role,
                name: who.name.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// What a server does with a well-formed request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, peer: PeerInfo) -> impl Future<Output = Response> + Send;

    /// The `server` label of this server's metrics (`agent`, `gateway`).
    fn server_name(&self) -> &'static str {
        "arpcp"
    }
}

/// Serves `listener` until `shutdown` is cancelled, then waits for open connections
/// to finish the request they are on. With `tls`, only TLS connections with a client
/// certificate of the cluster CA are served, and a connection whose peer's
/// certificate is revoked while it is open is closed at its next request.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(|t| (TlsAcceptor::from(t.config.clone()), t));
    let refusals = Arc::new(HandshakeLog::default());
    let table = ConnTable::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    let budget = InputBudget::new("MAX_BUFFERED_INPUT", MAX_BUFFERED_INPUT);
    let tracker = TaskTracker::new();
    loop {
        // Accepting is never held back: a connection waiting in the kernel's backlog
        // could be the controller's, so the table decides who makes room.
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match table.admit(addr.ip()) {
            Ok(slot) => slot,
            Err(e) => {
                // A TLS peer could not read a plain answer: it just sees the close.
                if acceptor.is_none() {
                    refuse(stream, &e);
                }
                continue;
            }
        };
        let (handler, shutdown, budget) = (handler.clone(), shutdown.clone(), budget.clone());
        let (acceptor, refusals) = (acceptor.clone(), refusals.clone());
        tracker.spawn(async move {
            let _open = crate::metrics::get().server_connection(handler.server_name());
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = slot.closed() => return,
                c = open(stream, acceptor.as_ref(), budget) => c,
            };
            let (conn, identity, standing) = match conn {
                Ok(c) => c,
                Err(e) => {
                    refusals.note(addr, &e);
                    return;
                }
            };
            let served = serve_connection(conn, identity, standing, &*handler, &shutdown, &slot);
            if let Err(e) = served.await {
                debug!(error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Tells a refused peer why, if its socket takes the line at once, and closes.
fn refuse(stream: TcpStream, e: &ProtocolError) {
    let Ok(mut line) = serde_json::to_vec(&Response::error(e)) else {
        return;
    };
    line.extend_from_slice(b"\r\n");
    // The std socket is non-blocking: a write that would wait is simply skipped.
    if let Ok(mut s) = stream.into_std() {
        let _ = s.write(&line);
    }
}

/// Why a connection was not served at all.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("{0}")]
    Socket(std::io::Error),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
}

/// A connection, who its peer is, and what re-checks the peer's certificate.
type Opened = (Connection, Option<PeerIdentity>, Option<Standing>);

/// The connection over `stream`: as is, or once a TLS handshake has finished.
async fn open(
    stream: TcpStream,
    acceptor: Option<&(TlsAcceptor, ServerTls)>,
    budget: Arc<InputBudget>,
) -> Result<Opened, OpenError> {
    let (peer, local) = connection::prepare(&stream).map_err(OpenError::Socket)?;
    let Some((acceptor, server_tls)) = acceptor else {
        let conn = Connection::over(Box::new(stream), peer, local, MAX_LINE_LEN, budget);
        return Ok((conn, None, None));
    };
    // Read before the handshake: a list that changes during it only makes the
    // connection be checked once more.
    let generation = server_tls.revocations.generation();
    let (tls, who) = super::tls::accept(acceptor, stream).await?;
    let standing = Standing::of(tls.get_ref().1, server_tls, generation);
    let conn = Connection::over(Box::new(tls), peer, local, MAX_LINE_LEN, budget);
    Ok((conn, Some(who), standing))
}

/// Logs refused handshakes, each with the peer and the reason, up to
/// `MAX_HANDSHAKE_WARNINGS` per `LIMIT_WARN_INTERVAL`.
#[derive(Default)]
pub(crate) struct HandshakeLog {
    inner: Mutex<(Option<Instant>, u64, u64)>,
}

impl HandshakeLog {
    pub(crate) fn note(&self, peer: SocketAddr, e: &dyn std::fmt::Display) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (since, warned, quiet) = &mut *g;
        if since.is_none_or(|s| s.elapsed() >= LIMIT_WARN_INTERVAL) {
            *since = Some(Instant::now());
            *warned = 0;
        }
        if *warned >= MAX_HANDSHAKE_WARNINGS {
            *quiet += 1;
            debug!(%peer, "refused a connection: {e}");
            return;
        }
        *warned += 1;
        let unlogged = std::mem::take(quiet);
        drop(g);
        if unlogged > 0 {
            warn!(%peer, "refused a connection from {peer}: {e} ({unlogged} more refused since at debug level)");
        } else {
            warn!(%peer, "refused a connection from {peer}: {e}");
        }
    }
}

async fn serve_connection<H: Handler>(
    conn: Connection,
    identity: Option<PeerIdentity>,
    mut standing: Option<Standing>,
    handler: &H,
    shutdown: &CancellationToken,
    slot: &Slot,
) -> Result<(), CodecError> {
    let peer = PeerInfo {
        peer: conn.peer_addr(),
        local: conn.local_addr(),
        identity,
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
            // Closed to make room: like a shutdown, what was read is still answered.
            _ = slot.closed(), if reading => reading = false,
            _ = idle, if in_flight.is_empty() => return Ok(()),
            line = lines.next(), if can_read => {
                idle_since = tokio::time::Instant::now();
                // A peer revoked since its handshake is served nothing more.
                if let (Some(Ok(_)), Some(standing)) = (&line, standing.as_mut()) {
                    if let Err(why) = standing.recheck() {
                        let name = peer.identity.as_ref().map_or("", |w| w.name.as_str());
                        warn!(peer = %peer.peer, "closing the connection of {} ({name:?}): {why}", peer.peer);
                        return Ok(());
                    }
                }
                let answer = match line {
                    None => {
                        reading = false;
                        continue;
                    }
                    Some(Ok(line)) => match Request::parse(&line) {
                        Ok(req) => {
                            crate::metrics::get()
                                .server_request(handler.server_name(), req.method().as_str());
                            Either::Left(handler.handle(req, peer.clone()))
                        }
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
                    Some(Err(CodecError::BudgetExceeded { name, limit, held })) => {
                        let e = ProtocolError::InputBudget { name, limit, held };
                        slot.table.note(Limited::OverBudget, peer.peer.ip(), &e);
                        reading = false;
                        Either::Right(std::future::ready(Response::error(&e)))
                    }
                    Some(Err(e)) => return Err(e),
                };
                in_flight.push_back(answer);
                slot.active(true);
            }
            Some(response) = in_flight.next() => {
                let write = async {
                    sink.feed(response).await?;
                    // Answers that are ready too go out in the same write.
                    while let Some(Some(more)) = in_flight.next().now_or_never() {
                        sink.feed(more).await?;
                    }
                    sink.flush().await
                };
                // A peer that takes no answers would hold the connection (and its
                // place in the table, as a busy one) for ever.
                match tokio::time::timeout(IDLE_TIMEOUT, write).await {
                    Ok(written) => written?,
                    Err(_) => {
                        debug!(peer = %peer.peer, "peer took no answer for {IDLE_TIMEOUT:?}; closing");
                        return Ok(());
                    }
                }
                idle_since = tokio::time::Instant::now();
                slot.active(!in_flight.is_empty());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The table of open connections

/// The open connections of one server, by peer address.
struct ConnTable {
    max: usize,
    per_peer_max: usize,
    /// Activity times are kept as milliseconds since this instant.
    epoch: Instant,
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Open>,
    per_peer: HashMap<IpAddr, usize>,
    /// Closes and refusals since the last warning, and when it was.
    unreported: u64,
    last_warn: Option<Instant>,
}

struct Open {
    peer: IpAddr,
    state: Arc<ConnState>,
}

/// What a connection tells the table about itself.
#[derive(Default)]
struct ConnState {
    /// When a request was last read or an answer written (ms since the epoch).
    last_active_ms: AtomicU64,
    /// Requests read and not answered yet: such a connection is never closed to
    /// make room.
    busy: AtomicBool,
    close: CancellationToken,
}

/// A connection's place in the table, given back when dropped.
struct Slot {
    id: u64,
    state: Arc<ConnState>,
    table: Arc<ConnTable>,
}

/// Why a connection was closed or refused.
#[derive(Debug, Clone, Copy)]
enum Limited {
    /// An idle connection closed to make room for a new one.
    Evicted,
    /// A new connection refused: nothing idle could make room.
    Refused,
    /// A connection whose partial line did not fit the input budget.
    OverBudget,
}

impl Slot {
    fn active(&self, busy: bool) {
        self.state
            .last_active_ms
            .store(self.table.now_ms(), Ordering::Relaxed);
        self.state.busy.store(busy, Ordering::Relaxed);
    }

    fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.state.close.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.table.lock();
        if let Some(open) = t.open.remove(&self.id) {
            t.forget_peer(open.peer);
        }
    }
}

impl Table {
    fn forget_peer(&mut self, peer: IpAddr) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// The idle connection of `peer` that has been so the longest.
    fn oldest_idle(&self, peer: IpAddr) -> Option<u64> {
        self.open
            .iter()
            .filter(|(_, o)| o.peer == peer && !o.state.busy.load(Ordering::Relaxed))
            .min_by_key(|(id, o)| (o.state.last_active_ms.load(Ordering::Relaxed), **id))
            .map(|(id, _)| *id)
    }

    fn close(&mut self, id: u64) -> Option<IpAddr> {
        let open = self.open.remove(&id)?;
        open.state.close.cancel();
        self.forget_peer(open.peer);
        Some(open.peer)
    }
}

impl ConnTable {
    fn new(max: usize, per_peer_max: usize) -> Arc<Self> {
        Arc::new(ConnTable {
            max,
            per_peer_max,
            epoch: Instant::now(),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A place for a new connection from `peer`, made by closing an idle connection
    /// if a limit is reached; an error (naming the limit) if nothing idle can go.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, ProtocolError> {
        let peer = peer.to_canonical();
        let mut t = self.lock();
        let held = t.per_peer.get(&peer).copied().unwrap_or(0);
        let full = if held >= self.per_peer_max {
            Some(("MAX_CONNECTIONS_PER_PEER", self.per_peer_max, Some(peer)))
        } else if t.open.len() >= self.max {
            let busiest = t
                .per_peer
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(ip, _)| *ip);
            Some(("MAX_CONNECTIONS", self.max, busiest))
        } else {
            None
        };
        if let Some((name, limit, from)) = full {
            let victim = from.and_then(|ip| t.oldest_idle(ip));
            let Some(closed) = victim.and_then(|id| t.close(id)) else {
                drop(t);
                let e = ProtocolError::ConnectionLimit { name, limit, peer };
                self.note(Limited::Refused, peer, &e);
                return Err(e);
            };
            drop(t);
            self.note(
                Limited::Evicted,
                closed,
                &format!("{name} = {limit} reached by a connection from {peer}"),
            );
            t = self.lock();
        }
        let id = t.next_id;
        t.next_id += 1;
        let state = Arc::new(ConnState::default());
        state.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
        t.open.insert(
            id,
            Open {
                peer,
                state: state.clone(),
            },
        );
        *t.per_peer.entry(peer).or_default() += 1;
        Ok(Slot {
            id,
            state,
            table: self.clone(),
        })
    }

    /// Logs a connection closed or refused for a limit: each at debug level, and at
    /// most one warning per `LIMIT_WARN_INTERVAL` with the count since the last.
    fn note(&self, what: Limited, peer: IpAddr, why: &dyn std::fmt::Display) {
        let action = match what {
            Limited::Evicted => "closed an idle connection to make room",
            Limited::Refused => "refused a connection",
            Limited::OverBudget => "closing a connection over the input budget",
        };
        debug!(%peer, "{action}: {why}");
        let mut t = self.lock();
        t.unreported += 1;
        if t.last_warn
            .is_some_and(|w| w.elapsed() < LIMIT_WARN_INTERVAL)
        {
            return;
        }
        let count = std::mem::take(&mut t.unreported);
        t.last_warn = Some(Instant::now());
        let (open, peers) = (t.open.len(), t.per_peer.len());
        drop(t);
        warn!(
            %peer,
            open,
            peers,
            "{action}: {why} ({count} connection(s) closed or refused for the limits since the last warning; more at debug level)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_over_its_share_loses_its_own_oldest_idle_connection() {
        let table = ConnTable::new(10, 3);
        let a: Vec<Slot> = (0..3)
            .map(|_| table.admit(ip("10.0.0.1")).unwrap())
            .collect();
        let b = table.admit(ip("10.0.0.2")).unwrap();
        a[0].active(true);
        // a[1] worked after a[2] was opened.
        a[1].state.last_active_ms.store(60_000, Ordering::Relaxed);
        let _a4 = table.admit(ip("10.0.0.1")).unwrap();
        // a[0] is busy, a[2] is the oldest idle one (a[1] just worked).
        assert!(!a[0].state.close.is_cancelled());
        assert!(!a[1].state.close.is_cancelled());
        assert!(a[2].state.close.is_cancelled());
        assert!(!b.state.close.is_cancelled());
        assert_eq!(table.lock().per_peer[&ip("10.0.0.1")], 3);
    }

    #[test]
    fn a_full_server_takes_room_from_the_busiest_peer_or_refuses() {
        let table = ConnTable::new(4, 4);
        let flood: Vec<Slot> = (0..3)
            .map(|_| table.admit(ip("10.0.0.9")).unwrap())
            .collect();
        let ctl = table.admit(ip("10.0.0.1")).unwrap();
        let ctl2 = table.admit(ip("10.0.0.1")).unwrap();
        assert!(flood[0].state.close.is_cancelled());
        assert!(!ctl.state.close.is_cancelled());
        // Everyone busy: the next one is refused, naming the limit.
        for s in flood.iter().chain([&ctl, &ctl2]) {
            s.active(true);
        }
        let e = table.admit(ip("10.0.0.3")).err().unwrap();
        assert!(e.to_string().contains("MAX_CONNECTIONS = 4"), "{e}");
        assert_eq!(e.code().as_u16(), 300);
        drop(flood);
        assert_eq!(table.lock().open.len(), 2);
        assert!(table.admit(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn a_peer_whose_connections_are_all_busy_is_refused() {
        let table = ConnTable::new(10, 2);
        let a: Vec<Slot> = (0..2)
            .map(|_| table.admit(ip("::ffff:10.0.0.1")).unwrap())
            .collect();
        for s in &a {
            s.active(true);
        }
        let e = table.admit(ip("10.0.0.1")).err().unwrap();
        assert!(
            e.to_string().contains("MAX_CONNECTIONS_PER_PEER = 2"),
            "{e}"
        );
        assert!(e.to_string().contains("10.0.0.1"), "{e}");
    }
}
