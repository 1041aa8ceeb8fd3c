//! Prometheus metrics of both daemons, and the small HTTP server that serves them
//! (`--metrics ADDR`, `GET /metrics`, the OpenMetrics text format).
//!
//! The metric families live in one process-wide registry: instrumented code (the
//! ARPCP client and server, the stores, the scheduler, the task runner) records
//! without a handle threaded through every constructor, and `arpcp up` serves its
//! gateway's and its agent's metrics from one endpoint. A family a process does not
//! use shows only its `# HELP`/`# TYPE` lines.
//!
//! Labels are bounded: procedure names and peer addresses come from the outside
//! (agents' catalogs, announcements, scans), so each label keeps at most a named
//! number of distinct values and files the rest under `"other"`. Task ids never
//! become labels.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Distinct procedure names kept as label values; later ones are counted as `"other"`.
pub const MAX_PROCEDURE_LABELS: usize = 256;
/// Distinct peer addresses kept as label values (ARPCP calls by peer); later ones
/// are counted as `"other"` (a `--scan` of a large range must not make a series each).
pub const MAX_PEER_LABELS: usize = 256;
/// The label value that stands for every value past a cap.
pub const OTHER_LABEL: &str = "other";
/// Scrape connections served at once; more wait in the kernel's backlog.
pub const MAX_SCRAPE_CONNECTIONS: usize = 16;
/// A scrape connection is closed this long after it opened, so idle keep-alive
/// connections cannot hold the `MAX_SCRAPE_CONNECTIONS` places for good.
pub const SCRAPE_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a scrape connection may go without an answer from us (its request not
/// come whole, or idle after the last answer) before it is closed: idle or
/// trickling connections free their place this fast, so a few of them do not keep
/// Prometheus out for `SCRAPE_CONNECTION_LIFETIME`.
pub const SCRAPE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Refreshers run before each scrape (one per daemon in a process).
pub const MAX_SCRAPE_HOOKS: usize = 8;

/// Keeps at most `max` distinct values of one label.
struct LabelCap {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    fn new(max: usize) -> LabelCap {
        LabelCap {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn value(&self, v: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(v) {
            return v.to_string();
        }
        if seen.len() < self.max {
            seen.insert(v.to_string());
            return v.to_string();
        }
        OTHER_LABEL.to_string()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcedureLabels {
    procedure: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    procedure: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    method: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerMethodLabels {
    server: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    store: String,
}

type ScrapeHook = Box<dyn Fn() + Send + Sync>;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_seconds() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn long_seconds() -> Histogram {
    // 1 ms to about 70 minutes: tasks run from microseconds to hours.
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

fn group_sizes() -> Histogram {
    // 1 to 1,024 writers per flush.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// Every metric family of the process.
pub struct Metrics {
    registry: Registry,
    procedures: LabelCap,
    peers: LabelCap,
    hooks: Mutex<Vec<(&'static str, ScrapeHook)>>,
    // Gateway.
    tasks_submitted: Family<ProcedureLabels, Counter>,
    tasks_ended: Family<EndLabels, Counter>,
    submit_seconds: HistogramFamily<ModeLabels>,
    task_seconds: HistogramFamily<ProcedureLabels>,
    agents: Family<StateLabels, Gauge>,
    watched_tasks: Gauge,
    // Both.
    client_requests: Family<CallLabels, Counter>,
    client_errors: Family<CallLabels, Counter>,
    client_seconds: HistogramFamily<MethodLabels>,
    server_requests: Family<ServerMethodLabels, Counter>,
    server_connections: Family<ServerLabels, Gauge>,
    grpc_connections: Gauge,
    flush_seconds: HistogramFamily<StoreLabels>,
    commit_group: HistogramFamily<StoreLabels>,
    // Agent.
    agent_tasks: Family<StateLabels, Gauge>,
    run_seconds: HistogramFamily<ProcedureLabels>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            procedures: LabelCap::new(MAX_PROCEDURE_LABELS),
            peers: LabelCap::new(MAX_PEER_LABELS),
            hooks: Mutex::new(Vec::new()),
            tasks_submitted: Family::default(),
            tasks_ended: Family::default(),
            submit_seconds: Family::new_with_constructor(latency_seconds),
            task_seconds: Family::new_with_constructor(long_seconds),
            agents: Family::default(),
            watched_tasks: Gauge::default(),
            client_requests: Family::default(),
            client_errors: Family::default(),
            client_seconds: Family::new_with_constructor(latency_seconds),
            server_requests: Family::default(),
            server_connections: Family::default(),
            grpc_connections: Gauge::default(),
            flush_seconds: Family::new_with_constructor(latency_seconds),
            commit_group: Family::new_with_constructor(group_sizes),
            agent_tasks: Family::default(),
            run_seconds: Family::new_with_constructor(long_seconds),
        };
        let r = &mut m.registry;
        r.register(
            "arpcp_tasks_submitted",
            "Tasks accepted by Submit (gateway), by procedure",
            m.tasks_submitted.clone(),
        );
        r.register(
            "arpcp_tasks_ended",
            "Tasks that reached their first final status (gateway), by procedure and status",
            m.tasks_ended.clone(),
        );
        r.register(
            "arpcp_submit_duration_seconds",
            "Time to answer a successful Submit (gateway); mode sync includes the run",
            m.submit_seconds.clone(),
        );
        r.register(
            "arpcp_task_duration_seconds",
            "Time from a task's creation to its end (gateway), by procedure",
            m.task_seconds.clone(),
        );
        r.register(
            "arpcp_agents",
            "Known agents by state (gateway)",
            m.agents.clone(),
        );
        r.register(
            "arpcp_watched_tasks",
            "Tasks clients are waiting on now (GetResult with a wait, WatchTask) (gateway)",
            m.watched_tasks.clone(),
        );
        r.register(
            "arpcp_client_requests",
            "ARPCP requests sent, by method and peer address",
            m.client_requests.clone(),
        );
        r.register(
            "arpcp_client_errors",
            "ARPCP requests sent that got no answer (connect, I/O, timeout, TLS), by method and peer address",
            m.client_errors.clone(),
        );
        r.register(
            "arpcp_client_request_duration_seconds",
            "ARPCP round trips (request sent to answer read), by method",
            m.client_seconds.clone(),
        );
        r.register(
            "arpcp_server_requests",
            "ARPCP requests received, by server (agent, gateway) and method",
            m.server_requests.clone(),
        );
        r.register(
            "arpcp_server_connections",
            "Open ARPCP connections, by server (agent, gateway)",
            m.server_connections.clone(),
        );
        r.register(
            "arpcp_grpc_connections",
            "Open connections to the gateway's gRPC API",
            m.grpc_connections.clone(),
        );
        r.register(
            "arpcp_store_flush_duration_seconds",
            "Duration of a store's group commit (flush and fdatasync)",
            m.flush_seconds.clone(),
        );
        r.register(
            "arpcp_store_commit_group_size",
            "Writers that shared one group commit",
            m.commit_group.clone(),
        );
        r.register(
            "arpcp_agent_tasks",
            "The agent's unfinished tasks: running, or queued for a slot",
            m.agent_tasks.clone(),
        );
        r.register(
            "arpcp_procedure_run_duration_seconds",
            "Run time of procedures that ended on the agent, by procedure",
            m.run_seconds.clone(),
        );
        m
    }

    fn procedure(&self, name: &str) -> ProcedureLabels {
        ProcedureLabels {
            procedure: self.procedures.value(name),
        }
    }

    /// Runs `refresh` before every scrape, to set gauges computed from a daemon's
    /// state; it replaces an earlier refresher of the same `name` (a daemon started
    /// again in the same process). Past `MAX_SCRAPE_HOOKS` names it is ignored (and
    /// logged).
    pub fn before_scrape(&self, name: &'static str, refresh: impl Fn() + Send + Sync + 'static) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = hooks.iter_mut().find(|(n, _)| *n == name) {
            hook.1 = Box::new(refresh);
            return;
        }
        if hooks.len() >= MAX_SCRAPE_HOOKS {
            tracing::warn!(
                limit = MAX_SCRAPE_HOOKS,
                "metrics: too many scrape refreshers; one more ignored"
            );
            return;
        }
        hooks.push((name, Box::new(refresh)));
    }

    /// The OpenMetrics text of every family, after the refreshers ran.
    pub fn render(&self) -> String {
        for (_, hook) in self.hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook();
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn task_submitted(&self, procedure: &str) {
        self.tasks_submitted
            .get_or_create(&self.procedure(procedure))
            .inc();
    }

    /// A task reached its first final status; `seconds`: since it was created.
    pub fn task_ended(&self, procedure: &str, status: &str, seconds: f64) {
        let procedure = self.procedure(procedure);
        self.tasks_ended
            .get_or_create(&EndLabels {
                procedure: procedure.procedure.clone(),
                status: status.to_string(),
            })
            .inc();
        self.task_seconds.get_or_create(&procedure).observe(seconds);
    }

    pub fn submit_answered(&self, sync: bool, seconds: f64) {
        let mode = if sync { "sync" } else { "async" };
        self.submit_seconds
            .get_or_create(&ModeLabels { mode: mode.into() })
            .observe(seconds);
    }

    /// The number of known agents in each state (every state named, zeros too).
    pub fn set_agents(&self, by_state: &[(&str, i64)]) {
        for (state, n) in by_state {
            self.agents
                .get_or_create(&StateLabels {
                    state: (*state).into(),
                })
                .set(*n);
        }
    }

    /// How many tasks clients wait on now.
    pub fn set_watched_tasks(&self, n: usize) {
        self.watched_tasks.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One ARPCP request sent to `peer`; `ok`: an answer came back.
    pub fn client_call(&self, method: &str, peer: &str, ok: bool, seconds: f64) {
        let labels = CallLabels {
            method: method.into(),
            peer: self.peers.value(peer),
        };
        self.client_requests.get_or_create(&labels).inc();
        if ok {
            self.client_seconds
                .get_or_create(&MethodLabels {
                    method: method.into(),
                })
                .observe(seconds);
        } else {
            self.client_errors.get_or_create(&labels).inc();
        }
    }

    pub fn server_request(&self, server: &'static str, method: &str) {
        self.server_requests
            .get_or_create(&ServerMethodLabels {
                server: server.into(),
                method: method.into(),
            })
            .inc();
    }

    /// Counts an open ARPCP connection of `server` until the guard drops.
    pub fn server_connection(&self, server: &'static str) -> ConnectionGuard {
        let gauge = self.server_connections.get_or_create_owned(&ServerLabels {
            server: server.into(),
        });
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// `conn`, counted as an open gRPC connection until it is dropped.
    pub fn grpc_connection<T>(&self, conn: T) -> Counted<T> {
        self.grpc_connections.inc();
        Counted {
            inner: conn,
            _open: ConnectionGuard(self.grpc_connections.clone()),
        }
    }

    pub fn store_flushed(&self, store: &str, writers: usize, seconds: f64) {
        let labels = StoreLabels {
            store: store.into(),
        };
        self.flush_seconds.get_or_create(&labels).observe(seconds);
        self.commit_group
            .get_or_create(&labels)
            .observe(writers as f64);
    }

    pub fn set_agent_tasks(&self, running: i64, queued: i64) {
        for (state, n) in [("running", running), ("queued", queued)] {
            self.agent_tasks
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(n);
        }
    }

    pub fn procedure_ran(&self, procedure: &str, seconds: f64) {
        self.run_seconds
            .get_or_create(&self.procedure(procedure))
            .observe(seconds);
    }
}

/// See `Metrics::server_connection`.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection counted in a gauge while it lives; reads and writes go through.
pub struct Counted<T> {
    inner: T,
    _open: ConnectionGuard,
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `GET /metrics` on `listener` (anything else is 404) until the process ends.
pub async fn serve(listener: TcpListener) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                self::get().render(),
            )
        }),
    );
    let listener = LimitedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_SCRAPE_CONNECTIONS)),
    };
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

/// A listener that holds one of `MAX_SCRAPE_CONNECTIONS` places per connection.
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = ScrapeConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ScrapeConnection, SocketAddr) {
        loop {
            // The semaphore is never closed.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let conn = ScrapeConnection {
                        stream,
                        _slot: slot,
                        expires: Box::pin(tokio::time::sleep(SCRAPE_CONNECTION_LIFETIME)),
                        request_due: Box::pin(tokio::time::sleep(SCRAPE_REQUEST_TIMEOUT)),
                    };
                    return (conn, addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A scrape connection: its place is given back when it closes, and it reads
/// end of file once `SCRAPE_CONNECTION_LIFETIME` has passed, or
/// `SCRAPE_REQUEST_TIMEOUT` after it opened or after the last answer written.
struct ScrapeConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    expires: Pin<Box<tokio::time::Sleep>>,
    /// Moved on by every write of an answer.
    request_due: Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for ScrapeConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expires.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if self.request_due.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ScrapeConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let due = tokio::time::Instant::now() + SCRAPE_REQUEST_TIMEOUT;
        self.request_due.as_mut().reset(due);
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_past_its_cap_is_other() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.value("a"), "a");
        assert_eq!(cap.value("b"), "b");
        assert_eq!(cap.value("c"), OTHER_LABEL);
        assert_eq!(cap.value("a"), "a");
    }

    #[test]
    fn a_refresher_started_again_replaces_the_old_one() {
        let m = Metrics::new();
        m.before_scrape("agent tasks", || {});
        m.before_scrape("agent tasks", || {});
        assert_eq!(m.hooks.lock().unwrap().len(), 1);
        for i in 0..MAX_SCRAPE_HOOKS + 2 {
            let name: &'static str = Box::leak(format!("hook {i}").into_boxed_str());
            m.before_scrape(name, || {});
        }
        assert_eq!(m.hooks.lock().unwrap().len(), MAX_SCRAPE_HOOKS);
    }

    #[test]
    fn counters_render_with_their_labels() {
        let m = Metrics::new();
        m.task_submitted("add");
        m.task_ended("add", "done", 0.01);
        let text = m.render();
        assert!(text.contains("arpcp_tasks_submitted_total{procedure=\"add\"} 1"));
        assert!(text.contains("arpcp_tasks_ended_total{procedure=\"add\",status=\"done\"} 1"));
        assert!(text.contains("arpcp_task_duration_seconds_count{procedure=\"add\"} 1"));
    }
}
