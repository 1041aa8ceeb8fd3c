//! A light ARPCP responder: many agent identities served from one process, one
//! listening port each, for measuring a gateway with hundreds or thousands of
//! agents on one machine.
//!
//! Each port is an agent as the gateway sees one: it announces itself (ID with its
//! port), answers echoes with its identity (one MAC for all, so MAC + port is
//! distinct per port) and keeps the id the gateway assigns it, takes `ATASK add`,
//! delivers the result the way `arpcp agent` does (SIGNAL `accepted` — asking to
//! start when it holds no lease for the task's epoch —, then `done`; GET answers
//! the result; `terminate` forgets it) and counts what it received. It stores
//! nothing, runs only `add`, and sends every SIGNAL over one shared connection to
//! the gateway rather than one per agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arpcp::arpcp::server::{serve, Handler, PeerInfo};
use arpcp::arpcp::{
    Args, ArpcpClient, AtaskStatus, CatalogEntry, Code, GetData, IdData, LeaseGrant, ProcedureKind,
    Progress, ProtocolError, Request, Response, SignalRequest,
};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Agent identities (listening ports) one responder serves, at most: the
/// gateway's own bound on agents (`MAX_AGENTS`).
pub const MAX_PORTS: usize = 4096;
/// Tasks one port holds until the gateway terminates them; an ATASK beyond is
/// refused with 300, as an agent at its limit of unfinished tasks does.
pub const MAX_HELD_PER_PORT: usize = 10_000;
/// Tasks whose SIGNALs wait to be sent, over all ports; a full queue holds up the
/// answer to the next ATASK (the gateway then waits, as for a slow agent).
pub const SIGNAL_QUEUE: usize = 4096;
/// SIGNAL deliveries under way at once, over all ports (each a worker task).
pub const SIGNAL_WORKERS: usize = 64;
/// Announcements under way at once.
pub const ANNOUNCERS: usize = 64;
/// Attempts at delivering one SIGNAL before the task is given up (the gateway's
/// GET of a placed task it has not heard of still collects it).
pub const SIGNAL_ATTEMPTS: u32 = 50;
/// Slots each identity reports (`capacity` in its echo answers).
pub const CAPACITY: u32 = 4;
/// The MAC every identity reports: identities differ by port.
const MAC: &str = "02:a7:00:00:00:01";

/// A task one port holds.
struct Held {
    /// `add`'s result, once "run".
    sum: Value,
    done: bool,
}

/// One agent identity.
pub struct Port {
    pub port: u16,
    agent_id: Mutex<Option<String>>,
    /// Set once a controller's echo carried `lease_ms`: tasks then start unasked
    /// only under a lease of their epoch.
    fenced: AtomicBool,
    /// The lease last granted in a SIGNAL answer: epoch, and until when it holds.
    lease: Mutex<Option<(u64, Instant)>>,
    tasks: Mutex<HashMap<String, Held>>,
    /// The gateway's connection the last echo came on.
    echo_peer: Mutex<Option<SocketAddr>>,
    /// ATASKs taken (each task once).
    pub atasks: AtomicU64,
    /// Echoes that came on another connection than the echo before.
    pub echo_reconnects: AtomicU64,
    pub echoes: AtomicU64,
}

impl Port {
    fn new(port: u16) -> Port {
        Port {
            port,
            agent_id: Mutex::new(None),
            fenced: AtomicBool::new(false),
            lease: Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            echo_peer: Mutex::new(None),
            atasks: AtomicU64::new(0),
            echo_reconnects: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
        }
    }

    fn agent_id(&self) -> Option<String> {
        self.agent_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a task placed under `epoch` may start without asking.
    fn may_start(&self, epoch: Option<u64>) -> bool {
        let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        match epoch {
            None => !self.fenced.load(Ordering::Relaxed),
            Some(e) => lease.is_some_and(|(held, until)| held == e && Instant::now() < until),
        }
    }

    /// A lease grant in a SIGNAL answer, counted from when the SIGNAL was sent.
    fn granted(&self, sent: Instant, data: &Value) {
        if let Some(g) = LeaseGrant::of(data) {
            *self.lease.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((g.lease_epoch, sent + Duration::from_millis(g.lease_ms)));
        }
    }
}

/// A task whose SIGNALs are to be sent.
struct Job {
    port: Arc<Port>,
    atask_id: String,
    reply_to: Option<String>,
    lease_epoch: Option<u64>,
}

struct Shared {
    controller: String,
    queue: mpsc::Sender<Job>,
    catalog: Vec<CatalogEntry>,
    digest: String,
    next_id: AtomicU64,
}

struct PortHandler {
    port: Arc<Port>,
    shared: Arc<Shared>,
}

impl Handler for PortHandler {
    async fn handle(&self, req: Request, peer: PeerInfo) -> Response {
        match self.answer(req, peer).await {
            Ok(r) => r,
            Err(e) => Response::error(&e),
        }
    }

    fn server_name(&self) -> &'static str {
        "agent"
    }
}

fn add(args: &Args) -> Result<Value, ProtocolError> {
    let wrong = |reason: String| ProtocolError::BadArguments {
        procedure: "add".into(),
        reason,
    };
    match args {
        Args::Positional(v) if v.len() == 2 => {
            let (Some(a), Some(b)) = (v[0].as_f64(), v[1].as_f64()) else {
                return Err(wrong(format!("both arguments must be numbers, got {v:?}")));
            };
            let sum = a + b;
            // Integral sums as JSON integers, as the agent's built-in answers.
            Ok(if sum.fract() == 0.0 && sum.abs() < 9.0e15 {
                json!(sum as i64)
            } else {
                json!(sum)
            })
        }
        other => Err(wrong(format!("expected two numbers, got {other:?}"))),
    }
}

impl PortHandler {
    async fn answer(&self, req: Request, peer: PeerInfo) -> Result<Response, ProtocolError> {
        let port = &self.port;
        match req {
            Request::Id {
                agent_id,
                lease_ms,
                describe,
                ..
            } => {
                port.echoes.fetch_add(1, Ordering::Relaxed);
                {
                    let mut last = port.echo_peer.lock().unwrap_or_else(|p| p.into_inner());
                    if last.is_some_and(|l| l != peer.peer) {
                        port.echo_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    *last = Some(peer.peer);
                }
                if lease_ms.is_some() {
                    port.fenced.store(true, Ordering::Relaxed);
                }
                if let Some(id) = agent_id {
                    *port.agent_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
                }
                let data = IdData {
                    mac: MAC.into(),
                    ip: peer.local.ip().to_string(),
                    hostname: "responder".into(),
                    port: port.port,
                    version: "1.0".into(),
                    procedures: vec!["add".into()],
                    capacity: CAPACITY,
                    running: 0,
                    agent_id: port.agent_id(),
                    catalog_digest: Some(self.shared.digest.clone()),
                    catalog: describe.then(|| self.shared.catalog.clone()),
                };
                serde_json::to_value(data)
                    .map(Response::ok)
                    .map_err(|e| ProtocolError::Internal(e.to_string()))
            }
            Request::Atask {
                procedure,
                args,
                atask_id,
                reply_to,
                lease_epoch,
            } => {
                if procedure != "add" {
                    return Err(ProtocolError::UnknownProcedure(procedure));
                }
                let sum = add(&args)?;
                let atask_id = atask_id.unwrap_or_else(|| {
                    let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                    format!("r-{}-{n}", port.port)
                });
                {
                    let mut tasks = port.tasks();
                    if let Some(held) = tasks.get(&atask_id) {
                        // A repeated ATASK runs nothing twice.
                        return if held.sum == sum {
                            Ok(Response::ok(json!({ "atask_id": atask_id })))
                        } else {
                            Err(ProtocolError::TaskIdReused(atask_id))
                        };
                    }
                    if tasks.len() >= MAX_HELD_PER_PORT {
                        return Err(ProtocolError::Busy {
                            what: "task not accepted",
                            work: "unfinished tasks",
                            name: "MAX_HELD_PER_PORT",
                            limit: MAX_HELD_PER_PORT,
                            retry: "send it again later",
                        });
                    }
                    tasks.insert(atask_id.clone(), Held { sum, done: false });
                }
                port.atasks.fetch_add(1, Ordering::Relaxed);
                let job = Job {
                    port: port.clone(),
                    atask_id: atask_id.clone(),
                    reply_to,
                    lease_epoch,
                };
                if self.shared.queue.send(job).await.is_err() {
                    return Err(ProtocolError::Internal("the responder is stopping".into()));
                }
                Ok(Response::ok(json!({ "atask_id": atask_id })))
            }
            Request::Get { atask_id } => {
                let tasks = port.tasks();
                let held = tasks
                    .get(&atask_id)
                    .ok_or_else(|| ProtocolError::UnknownTask(atask_id.clone()))?;
                let data = GetData {
                    atask_id: atask_id.clone(),
                    atask_status: if held.done {
                        AtaskStatus::Done
                    } else {
                        AtaskStatus::Accepted
                    },
                    running: false,
                    result: held.done.then(|| held.sum.clone()),
                    error: None,
                    progress: None,
                };
                serde_json::to_value(data)
                    .map(Response::ok)
                    .map_err(|e| ProtocolError::Internal(e.to_string()))
            }
            Request::Signal(SignalRequest {
                atask_id, status, ..
            }) => match status {
                AtaskStatus::Terminate | AtaskStatus::ClientError => {
                    port.tasks()
                        .remove(&atask_id)
                        .ok_or(ProtocolError::UnknownTask(atask_id))?;
                    Ok(Response::ok(Value::Null))
                }
                other => Err(ProtocolError::BadHeader {
                    header: "atask_status",
                    expected: "\"terminate\" or \"client_error\"",
                    got: format!("{:?}", other.as_str()),
                }),
            },
            Request::Task {
                procedure, args, ..
            } => {
                if procedure != "add" {
                    return Err(ProtocolError::UnknownProcedure(procedure));
                }
                Ok(Response::ok(json!({ "result": add(&args)? })))
            }
        }
    }
}

/// Sends `sig` until any ARPCP answer comes (at most `SIGNAL_ATTEMPTS` tries,
/// backing off from 20 ms to 1 s), as the agent's SIGNAL loop does.
async fn deliver(client: &ArpcpClient, dest: &str, sig: SignalRequest) -> Option<Response> {
    let req = Request::Signal(sig);
    let mut delay = Duration::from_millis(20);
    for _ in 0..SIGNAL_ATTEMPTS {
        match client.call(dest, &req).await {
            Ok(r) => return Some(r),
            Err(_) => {
                client.forget(dest);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
    None
}

/// One task's SIGNALs: `accepted` (asking to start without a lease of the task's
/// epoch), then `done` once the controller let it start.
async fn run_job(client: &ArpcpClient, controller: &str, job: Job) {
    let dest = job.reply_to.as_deref().unwrap_or(controller);
    let port = &job.port;
    let signal = |status, progress, start| SignalRequest {
        atask_id: job.atask_id.clone(),
        status,
        progress,
        agent_id: port.agent_id(),
        error: None,
        start,
    };
    loop {
        let unasked = port.may_start(job.lease_epoch);
        let started = Progress {
            percent: 0.0,
            comment: "started".into(),
        };
        let sent = Instant::now();
        let Some(r) = deliver(
            client,
            dest,
            signal(AtaskStatus::Accepted, Some(started), !unasked),
        )
        .await
        else {
            return;
        };
        if r.is_ok() {
            port.granted(sent, &r.data);
            break;
        }
        if !unasked && r.code == Code::UnknownTask {
            // Withdrawn: never started, nothing more is sent.
            port.tasks().remove(&job.atask_id);
            return;
        }
        if unasked {
            // Any answer to a report of a start is an answer.
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match port.tasks().get_mut(&job.atask_id) {
        Some(held) => held.done = true,
        None => return,
    }
    let sent = Instant::now();
    if let Some(r) = deliver(client, dest, signal(AtaskStatus::Done, None, false)).await {
        port.granted(sent, &r.data);
    }
}

/// The running responder.
pub struct Responder {
    pub ports: Vec<Arc<Port>>,
    stop: CancellationToken,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Responder {
    /// Listens on `n` loopback ports and serves each as an agent whose controller
    /// is `controller`; does not announce yet.
    pub async fn start(n: usize, controller: &str) -> anyhow::Result<Responder> {
        anyhow::ensure!(
            n <= MAX_PORTS,
            "{n} agent identities asked for; a responder serves at most MAX_PORTS = {MAX_PORTS}"
        );
        let stop = CancellationToken::new();
        let (queue, jobs) = mpsc::channel(SIGNAL_QUEUE);
        let catalog = vec![CatalogEntry {
            name: "add".into(),
            kind: ProcedureKind::Builtin,
            info: None,
        }];
        let shared = Arc::new(Shared {
            controller: controller.to_string(),
            queue,
            digest: CatalogEntry::digest(&catalog),
            catalog,
            next_id: AtomicU64::new(0),
        });
        let client = Arc::new(ArpcpClient::new(
            Duration::from_secs(2),
            Duration::from_secs(5),
        ));
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        for _ in 0..SIGNAL_WORKERS {
            let (jobs, client, shared, stop) =
                (jobs.clone(), client.clone(), shared.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let job = tokio::select! {
                        _ = stop.cancelled() => return,
                        j = async { jobs.lock().await.recv().await } => match j {
                            Some(j) => j,
                            None => return,
                        },
                    };
                    run_job(&client, &shared.controller, job).await;
                }
            });
        }
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = Arc::new(Port::new(listener.local_addr()?.port()));
            let handler = Arc::new(PortHandler {
                port: port.clone(),
                shared: shared.clone(),
            });
            tokio::spawn(serve(listener, handler, None, stop.clone()));
            ports.push(port);
        }
        Ok(Responder { ports, stop })
    }

    /// Announces every port to the controller (ID with the port), each until
    /// answered 100 or `deadline`; how many were answered 100.
    pub async fn announce(&self, controller: &str, deadline: Instant) -> usize {
        let client = ArpcpClient::default();
        let answered = AtomicU64::new(0);
        futures::stream::iter(&self.ports)
            .for_each_concurrent(ANNOUNCERS, |p| {
                let (client, answered) = (&client, &answered);
                async move {
                    let req = Request::Id {
                        agent_id: p.agent_id(),
                        controller: None,
                        port: Some(p.port),
                        lease_ms: None,
                        describe: false,
                    };
                    let mut delay = Duration::from_millis(50);
                    while Instant::now() < deadline {
                        match client.call(controller, &req).await {
                            Ok(r) if r.is_ok() => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            // Refused (the gateway's probes of announced addresses
                            // are all under way) or unreachable: again, later.
                            _ => {
                                tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0))
                                    .await;
                                delay = (delay * 2).min(Duration::from_secs(2));
                            }
                        }
                    }
                }
            })
            .await;
        answered.load(Ordering::Relaxed) as usize
    }

    /// Echo reconnects over all ports so far.
    pub fn echo_reconnects(&self) -> u64 {
        self.ports
            .iter()
            .map(|p| p.echo_reconnects.load(Ordering::Relaxed))
            .sum()
    }

    pub fn echoes(&self) -> u64 {
        self.ports
            .iter()
            .map(|p| p.echoes.load(Ordering::Relaxed))
            .sum()
    }

    /// ATASKs each port took.
    pub fn atasks(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|p| p.atasks.load(Ordering::Relaxed))
            .collect()
    }
}
