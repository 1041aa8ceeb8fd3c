//! The requesting side of ARPCP, used by the gateway (ATASK, GET, TASK, ID, SIGNAL
//! terminate) and by agents (SIGNALs, announcements). Keeps one pipelined
//! connection per peer, and bounds every exchange by a timeout. Built with a TLS
//! configuration, it opens every connection as a mutual-TLS session.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::codec::{CodecError, InputBudget};
use super::connection::{self, BoxIo, Connection};
use super::tls::ClientTls;
use super::{Method, ProtocolError, Request, Response};
use crate::tls::PeerIdentity;

/// Longest response line accepted: results can be larger than requests.
pub const MAX_RESPONSE_LEN: usize = 16 * 1024 * 1024;
/// Bytes of unfinished response lines one client buffers over all its connections
/// (room for 16 responses of `MAX_RESPONSE_LEN` arriving at once). A connection
/// whose partial response does not fit fails, and the request is retried once.
pub const MAX_BUFFERED_RESPONSES: usize = 16 * MAX_RESPONSE_LEN;
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
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: super::tls::HandshakeError,
    },
    #[error("{addr} is not {expected:?}: its certificate names {got:?}; the request was not sent")]
    WrongPeer {
        addr: String,
        expected: String,
        got: String,
    },
    #[error("{addr} sent an invalid response: {error}")]
    BadResponse { addr: String, error: ProtocolError },
    #[error(
        "no connection opened to {addr}: this client holds connections to {limit} peers \
         (MAX_PEERS) and none of them is idle; the request was not sent"
    )]
    TooManyPeers { addr: String, limit: usize },
}

impl ClientError {
    /// True when the peer could not be reached at all (it did not see the request).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Tls { .. }
                | ClientError::WrongPeer { .. }
                | ClientError::TooManyPeers { .. }
        )
    }
}

/// Idle connections kept per peer for TASKs.
pub const MAX_IDLE_PER_PEER: usize = 16;
/// An idle connection is reused only this soon, well before the peer's idle
/// timeout closes it.
pub const IDLE_REUSE: Duration = Duration::from_secs(20);
/// Requests written to one peer and not answered yet, per connection.
pub const MAX_PIPELINED_PER_PEER: usize = 128;
/// Requests queued for a peer's connection writer.
const PIPELINE_QUEUE: usize = 1024;
/// Peers (destination addresses) one client keeps pipelined connections to, and
/// peers it keeps idle TASK connections for, at most: the gateway's bound on
/// agents (`gateway::core::MAX_AGENTS`), so each agent keeps its connection. A
/// new peer beyond it closes the connection of the peer least recently used that
/// has nothing in flight; when every one is busy the request fails with
/// `TooManyPeers` (logged at most every `REFUSAL_LOG_INTERVAL`) without being sent.
pub const MAX_PEERS: usize = 4096;
/// At most one warning per this interval about requests refused at `MAX_PEERS`.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Sends requests to peers. Requests to one peer share one connection, pipelined:
/// concurrent requests are written together (one write for many) and their answers
/// matched in order. A TASK, which may run long, gets a connection of its own so it
/// holds up nothing else.
pub struct ArpcpClient {
    peers: Mutex<HashMap<String, Arc<Pipeline>>>,
    /// `MAX_PEERS`, smaller in tests.
    max_peers: usize,
    /// Requests taken so far: a pipeline's last use is the count when a request last
    /// took it (a clock would tie the requests of one millisecond).
    uses: std::sync::atomic::AtomicU64,
    /// Requests refused at `max_peers` since the last warning, and when that was.
    refusals: Mutex<(u64, Option<Instant>)>,
    /// Idle connections for TASKs, with the time each went idle.
    idle: Mutex<HashMap<String, Vec<(Opened, Instant)>>>,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// Shared by the read buffers of every connection of this client.
    budget: Arc<InputBudget>,
    tls: Option<ClientTls>,
}

impl Default for ArpcpClient {
    fn default() -> Self {
        ArpcpClient::new(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT)
    }
}

type Reply = oneshot::Sender<Result<Response, ClientError>>;

struct Queued {
    line: Bytes,
    reply: Reply,
    slot: OwnedSemaphorePermit,
}

/// A response and who sent it: the server's certificate identity, over TLS.
#[derive(Debug)]
pub struct Identified {
    pub response: Response,
    pub peer: Option<PeerIdentity>,
}

/// A connection just opened, with who is at the other end (TLS) and the revocation
/// list generation its handshake was checked under.
struct Opened {
    conn: Connection,
    peer: Option<PeerIdentity>,
    generation: u64,
}

/// One pipelined connection: a writer task and a reader task.
struct Pipeline {
    queue: mpsc::Sender<Queued>,
    slots: Arc<Semaphore>,
    dead: CancellationToken,
    peer: Option<PeerIdentity>,
    generation: u64,
    /// The client's `uses` when a request last took it.
    last_used: std::sync::atomic::AtomicU64,
}

impl Pipeline {
    /// Nothing written to it waits for an answer, nor is about to be written.
    fn is_idle(&self) -> bool {
        self.slots.available_permits() == MAX_PIPELINED_PER_PEER
    }

    fn open(addr: &str, opened: Opened) -> Pipeline {
        let Opened {
            conn,
            peer,
            generation,
        } = opened;
        let (queue, mut rx) = mpsc::channel::<Queued>(PIPELINE_QUEUE);
        let dead = CancellationToken::new();
        let waiting: Arc<Mutex<VecDeque<(Reply, OwnedSemaphorePermit)>>> = Arc::default();
        let (mut sink, mut lines) = conn.split_raw();
        let fail_all = {
            let waiting = waiting.clone();
            let addr = addr.to_string();
            move || {
                let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                for (reply, _) in w.drain(..) {
                    let _ = reply.send(Err(ClientError::Closed { addr: addr.clone() }));
                }
            }
        };
        // Writer: everything queued so far goes out in one write.
        {
            let (dead, waiting, fail_all) = (dead.clone(), waiting.clone(), fail_all.clone());
            tokio::spawn(async move {
                loop {
                    let first = tokio::select! {
                        _ = dead.cancelled() => break,
                        q = rx.recv() => match q { Some(q) => q, None => break },
                    };
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let mut failed = false;
                    for q in batch {
                        // Registered before written, so the reader can never see
                        // an answer it has no waiter for.
                        waiting
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_back((q.reply, q.slot));
                        if !failed && sink.feed(q.line).await.is_err() {
                            failed = true;
                        }
                    }
                    if failed || sink.flush().await.is_err() {
                        break;
                    }
                }
                dead.cancel();
                fail_all();
            });
        }
        // Reader: answers in request order.
        {
            let (dead, addr) = (dead.clone(), addr.to_string());
            tokio::spawn(async move {
                loop {
                    let line = tokio::select! {
                        _ = dead.cancelled() => break,
                        l = lines.next() => l,
                    };
                    let answer = match line {
                        Some(Ok(line)) => {
                            Response::parse(&line).map_err(|error| ClientError::BadResponse {
                                addr: addr.clone(),
                                error,
                            })
                        }
                        Some(Err(source)) => Err(ClientError::Io {
                            addr: addr.clone(),
                            source,
                        }),
                        None => break,
                    };
                    let next = waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
                    let fatal = answer.is_err();
                    match next {
                        Some((reply, slot)) => {
                            // Free before the caller wakes: a caller that has its
                            // answer finds the connection idle.
                            drop(slot);
                            let _ = reply.send(answer);
                        }
                        // An answer nobody asked for: the peer is confused.
                        None => break,
                    }
                    if fatal {
                        break;
                    }
                }
                dead.cancel();
                fail_all();
            });
        }
        Pipeline {
            queue,
            slots: Arc::new(Semaphore::new(MAX_PIPELINED_PER_PEER)),
            dead,
            peer,
            generation,
            last_used: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl ArpcpClient {
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> Self {
        ArpcpClient {
            peers: Mutex::new(HashMap::new()),
            max_peers: MAX_PEERS,
            uses: std::sync::atomic::AtomicU64::new(0),
            refusals: Mutex::new((0, None)),
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            request_timeout,
            budget: InputBudget::new("MAX_BUFFERED_RESPONSES", MAX_BUFFERED_RESPONSES),
            tls: None,
        }
    }

    /// The same client keeping connections to at most `n` peers (tests of the bound).
    #[doc(hidden)]
    pub fn with_max_peers(mut self, n: usize) -> Self {
        self.max_peers = n.max(1);
        self
    }

    /// How long `call` waits for an answer.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Connects with TLS (`Some`) or plain TCP (`None`).
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Sends `req` to `addr` and returns the response, with the default timeout.
    pub async fn call(&self, addr: &str, req: &Request) -> Result<Response, ClientError> {
        self.call_with_timeout(addr, req, self.request_timeout)
            .await
    }

    /// Sends `req` and waits up to `timeout` for the response. A request that failed
    /// because an established connection broke is sent once more on a fresh one,
    /// unless it is a TASK (not idempotent: the peer may have run it).
    pub async fn call_with_timeout(
        &self,
        addr: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        Ok(self
            .call_identified_with_timeout(addr, req, timeout)
            .await?
            .response)
    }

    /// `call`, saying also who answered: the identity in the verified certificate
    /// of the connection the response came on (`None` over plain TCP).
    pub async fn call_identified(
        &self,
        addr: &str,
        req: &Request,
    ) -> Result<Identified, ClientError> {
        self.call_identified_with_timeout(addr, req, self.request_timeout)
            .await
    }

    /// `call_with_timeout`, saying also who answered (see `call_identified`).
    pub async fn call_identified_with_timeout(
        &self,
        addr: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Identified, ClientError> {
        self.exchange(addr, None, req, timeout).await
    }

    /// `call_with_timeout` to the peer whose certificate is named `name`: over TLS,
    /// a connection to anyone else fails with `WrongPeer` before the request is
    /// written (`None`, or plain TCP: whoever is at `addr`).
    pub async fn call_named(
        &self,
        addr: &str,
        name: Option<&str>,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        Ok(self.exchange(addr, name, req, timeout).await?.response)
    }

    async fn exchange(
        &self,
        addr: &str,
        expect: Option<&str>,
        req: &Request,
        timeout: Duration,
    ) -> Result<Identified, ClientError> {
        let started = std::time::Instant::now();
        let out = self.exchange_once(addr, expect, req, timeout).await;
        crate::metrics::get().client_call(
            req.method().as_str(),
            addr,
            out.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        out
    }

    async fn exchange_once(
        &self,
        addr: &str,
        expect: Option<&str>,
        req: &Request,
        timeout: Duration,
    ) -> Result<Identified, ClientError> {
        let mut line = serde_json::to_vec(req).unwrap_or_default();
        line.extend_from_slice(b"\r\n");
        let line = Bytes::from(line);
        if req.method() == Method::Task {
            return self.call_alone(addr, expect, line, timeout).await;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        match self
            .call_pipelined(addr, expect, line.clone(), deadline, timeout)
            .await
        {
            Err(ClientError::Closed { .. } | ClientError::Io { .. }) => {
                self.call_pipelined(addr, expect, line, deadline, timeout)
                    .await
            }
            other => other,
        }
    }

    /// The generation of the revocation list the next handshake is checked under.
    fn generation(&self) -> u64 {
        self.tls
            .as_ref()
            .map_or(0, super::tls::ClientTls::revocation_generation)
    }

    async fn pipeline(&self, addr: &str) -> Result<Arc<Pipeline>, ClientError> {
        let generation = self.generation();
        // A connection verified under an older revocation list may be to a peer
        // revoked since: it is closed and the peer verified afresh.
        let usable = |p: &Arc<Pipeline>| !p.dead.is_cancelled() && p.generation == generation;
        {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = peers.get(addr) {
                if usable(p) {
                    return Ok(p.clone());
                }
                p.dead.cancel();
                peers.remove(addr);
            }
        }
        // Checked before connecting too, so a client at its bound opens nothing.
        self.make_room(
            &mut self.peers.lock().unwrap_or_else(|p| p.into_inner()),
            addr,
        )?;
        let conn = self.connect(addr).await?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have connected meanwhile: use one connection.
        if let Some(p) = peers.get(addr).filter(|p| usable(p)) {
            return Ok(p.clone());
        }
        self.make_room(&mut peers, addr)?;
        let p = Arc::new(Pipeline::open(addr, conn));
        peers.insert(addr.to_string(), p.clone());
        Ok(p)
    }

    /// Room in `peers` for a connection to `addr`: below `max_peers` after dropping
    /// dead connections, else by closing the idle one used least recently, else
    /// `TooManyPeers`.
    fn make_room(
        &self,
        peers: &mut HashMap<String, Arc<Pipeline>>,
        addr: &str,
    ) -> Result<(), ClientError> {
        if peers.len() < self.max_peers || peers.contains_key(addr) {
            return Ok(());
        }
        peers.retain(|_, p| !p.dead.is_cancelled());
        if peers.len() < self.max_peers {
            return Ok(());
        }
        let oldest = peers
            .iter()
            .filter(|(_, p)| p.is_idle())
            .min_by_key(|(_, p)| p.last_used.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(a, _)| a.clone());
        if let Some(old) = oldest {
            if let Some(p) = peers.remove(&old) {
                p.dead.cancel();
            }
            tracing::debug!(%addr, closed = %old, "connections to MAX_PEERS peers: closed the least recently used idle one");
            return Ok(());
        }
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        refusals.0 += 1;
        if refusals
            .1
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                %addr,
                refused = refusals.0,
                "requests refused: connections to {} peers (MAX_PEERS) are open and all are busy",
                self.max_peers
            );
            *refusals = (0, Some(Instant::now()));
        }
        Err(ClientError::TooManyPeers {
            addr: addr.to_string(),
            limit: self.max_peers,
        })
    }

    async fn call_pipelined(
        &self,
        addr: &str,
        expect: Option<&str>,
        line: Bytes,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Identified, ClientError> {
        let timed_out = || ClientError::Timeout {
            addr: addr.to_string(),
            timeout,
        };
        let exchange = async {
            let p = self.pipeline(addr).await?;
            let used = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            p.last_used
                .store(used, std::sync::atomic::Ordering::Relaxed);
            check_peer(addr, expect, p.peer.as_ref())?;
            let slot = p
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ClientError::Closed {
                    addr: addr.to_string(),
                })?;
            let (reply, answer) = oneshot::channel();
            p.queue
                .send(Queued { line, reply, slot })
                .await
                .map_err(|_| ClientError::Closed {
                    addr: addr.to_string(),
                })?;
            let answer = answer.await.map_err(|_| ClientError::Closed {
                addr: addr.to_string(),
            })?;
            Ok::<_, ClientError>((p, answer))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok((p, answer))) => answer.map(|response| Identified {
                response,
                peer: p.peer.clone(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // A peer that does not answer in time holds up everything behind
                // it on this connection: start afresh next time.
                self.forget(addr);
                Err(timed_out())
            }
        }
    }

    /// One request on a connection of its own (an idle one, or a new one), which
    /// goes back to the idle set after a clean answer.
    async fn call_alone(
        &self,
        addr: &str,
        expect: Option<&str>,
        line: Bytes,
        timeout: Duration,
    ) -> Result<Identified, ClientError> {
        let mut opened = match self.take_idle(addr) {
            Some(c) => c,
            None => self.connect(addr).await?,
        };
        check_peer(addr, expect, opened.peer.as_ref())?;
        let conn = &mut opened.conn;
        let io = |source| ClientError::Io {
            addr: addr.to_string(),
            source,
        };
        let round_trip = async {
            conn.send_raw(line).await.map_err(io)?;
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
        let answer = tokio::time::timeout(timeout, round_trip)
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.to_string(),
                timeout,
            })??;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let peer = opened.peer.clone();
        // Kept for at most `max_peers` peers; beyond, connections too old to be
        // reused go first, and then this one closes.
        if idle.len() >= self.max_peers && !idle.contains_key(addr) {
            idle.retain(|_, conns| {
                conns.retain(|(_, since)| since.elapsed() < IDLE_REUSE);
                !conns.is_empty()
            });
        }
        if idle.len() < self.max_peers || idle.contains_key(addr) {
            let conns = idle.entry(addr.to_string()).or_default();
            if conns.len() < MAX_IDLE_PER_PEER {
                conns.push((opened, Instant::now()));
            }
        }
        Ok(Identified {
            response: answer,
            peer,
        })
    }

    /// An idle connection that was used recently and that the peer has not closed.
    fn take_idle(&self, addr: &str) -> Option<Opened> {
        let generation = self.generation();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(addr)?;
        let mut found = None;
        while let Some((mut opened, since)) = conns.pop() {
            // Nothing may be waiting on an idle connection: anything readable is
            // the peer closing it (or breaking the protocol).
            let closed = opened.conn.read_line().now_or_never().is_some();
            if since.elapsed() < IDLE_REUSE && !closed && opened.generation == generation {
                found = Some(opened);
                break;
            }
        }
        if conns.is_empty() {
            // An empty entry would count against `max_peers`.
            idle.remove(addr);
        }
        found
    }

    async fn connect(&self, addr: &str) -> Result<Opened, ClientError> {
        // Read before the handshake: a list that changes during it makes the
        // connection look older than it is (reopened once), never newer.
        let generation = self.generation();
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
        let (peer, local) =
            connection::prepare(&stream).map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let (io, identity): (BoxIo, _) = match &self.tls {
            None => (Box::new(stream), None),
            Some(tls) => {
                let (tls, who) =
                    super::tls::connect(tls, addr, stream)
                        .await
                        .map_err(|source| ClientError::Tls {
                            addr: addr.to_string(),
                            source,
                        })?;
                (Box::new(tls), Some(who))
            }
        };
        Ok(Opened {
            conn: Connection::over(io, peer, local, MAX_RESPONSE_LEN, self.budget.clone()),
            peer: identity,
            generation,
        })
    }

    /// Drops the connection to `addr` (after it failed, say).
    pub fn forget(&self, addr: &str) {
        let gone = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
        if let Some(p) = gone {
            p.dead.cancel();
        }
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }
}

/// Whether the peer of a connection is the one expected (see `call_named`).
fn check_peer(
    addr: &str,
    expect: Option<&str>,
    peer: Option<&PeerIdentity>,
) -> Result<(), ClientError> {
    match (expect, peer) {
        (Some(expected), Some(who)) if who.name != expected => Err(ClientError::WrongPeer {
            addr: addr.to_string(),
            expected: expected.to_string(),
            got: who.name.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// A peer on a loopback port: answers every line with 100 when `answers`,
    /// else reads and never answers (a request to it stays in flight).
    async fn peer(answers: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(_)) = lines.next_line().await {
                        if answers {
                            let ok = b"{\"code\": 100, \"description\": \"OK\"}\r\n";
                            if write.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn id() -> Request {
        Request::Id {
            agent_id: None,
            controller: None,
            port: None,
            lease_ms: None,
            describe: false,
        }
    }

    fn connected(client: &ArpcpClient) -> Vec<String> {
        let mut v: Vec<String> = client
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| !p.dead.is_cancelled())
            .map(|(a, _)| a.clone())
            .collect();
        v.sort();
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_peer_beyond_the_bound_closes_the_least_recently_used_idle_connection() {
        let client =
            ArpcpClient::new(Duration::from_secs(3), Duration::from_secs(3)).with_max_peers(2);
        let (a, b, c) = (peer(true).await, peer(true).await, peer(true).await);
        for addr in [&a, &b, &a] {
            assert!(client.call(addr, &id()).await.expect("an answer").is_ok());
        }
        // `b` was used less recently than `a`: its connection makes room for `c`.
        assert!(client.call(&c, &id()).await.expect("an answer").is_ok());
        let mut want = vec![a.clone(), c.clone()];
        want.sort();
        assert_eq!(connected(&client), want);
        // And `b` is reached again, in place of `a` now.
        assert!(client.call(&b, &id()).await.expect("an answer").is_ok());
        assert_eq!(connected(&client).len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_peer_beyond_the_bound_is_refused_when_every_connection_is_busy() {
        let client = Arc::new(
            ArpcpClient::new(Duration::from_secs(3), Duration::from_secs(30)).with_max_peers(2),
        );
        let (silent1, silent2, other) = (peer(false).await, peer(false).await, peer(true).await);
        let mut waiting = Vec::new();
        for addr in [silent1, silent2] {
            let client = client.clone();
            waiting.push(tokio::spawn(async move { client.call(&addr, &id()).await }));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let busy = {
                let peers = client.peers.lock().unwrap();
                peers.len() == 2 && peers.values().all(|p| !p.is_idle())
            };
            if busy {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "two requests in flight within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = client
            .call(&other, &id())
            .await
            .expect_err("no room for a third peer");
        assert!(
            matches!(err, ClientError::TooManyPeers { limit: 2, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&other) && text.contains("MAX_PEERS") && text.contains("not sent"),
            "{text}"
        );
        assert!(err.is_unreachable(), "the request was not sent: {err:?}");
        for w in waiting {
            w.abort();
        }
    }
}
