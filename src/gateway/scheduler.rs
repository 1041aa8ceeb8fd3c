//! The driver of the gateway's rules (`core`). One task, `Driver`, owns the
//! `Controller`: it turns what happens (a Submit, an agent's SIGNAL, an answer to
//! ATASK or GET, an echo, a timer) into events, and carries out the effects the
//! rules return, in their order: writes to the store, ARPCP requests to agents,
//! answers to waiting callers, task changes for watchers. `Scheduler` is the face
//! the gRPC service and the ARPCP listener call; `ControllerHandle` is how
//! membership reports echoes.
//!
//! Durability without waiting in the loop: a durable write is applied to sled at
//! once and starts (or joins) one group commit; what the rules put after it for
//! the same task (an answer, an ATASK, a publication) is held until that commit is
//! done, and released in order, so watchers never see an older version after a
//! newer one and no agent hears of a placement a crash could forget.
//!
//! Bounds: `CONTROLLER_QUEUE` inputs wait for the loop (callers and echo reports
//! wait beyond it); `MAX_CONCURRENT_SENDS` exchanges with agents run at once (the
//! rest wait for a permit; their number is bounded by the rules' own limits:
//! one ATASK per open task, `MAX_COLLECTIONS` GETs, one terminate per ended attempt).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::core::{
    self, agent_name, AgentId, AgentInfo, Answer, Call, Controller, Effect, Event, GetAnswer,
    Grant, Outcome, Refusal, Rules, Signal, SignalRefusal, TaskId,
};
use super::membership::Membership;
use super::model::{now_ms, parse_atask_id, AgentRecord, TaskRecord, TaskStatus};
use super::store::{GatewayStore, StoreError};
use super::watch::TaskWatchers;
use super::GatewayError;
use crate::arpcp::{
    ArpcpClient, AtaskStatus, ClientError, Code, GetData, Progress, ProtocolError, Request,
    Response, SignalRequest,
};
use crate::retry::{retry, Attempt, Policy};

/// Inputs (calls, agents' reports, answers) waiting for the controller's loop.
pub const CONTROLLER_QUEUE: usize = 4096;
/// Exchanges with agents (ATASK, TASK, GET, terminate) in flight at once.
pub const MAX_CONCURRENT_SENDS: usize = 512;
/// How often time passes for the rules: queued tasks retried, quiet ones asked about.
pub const TICK_INTERVAL: Duration = Duration::from_millis(500);
/// A placed task not heard of for this long is asked about (GET).
pub const RECONCILE_AFTER: Duration = Duration::from_secs(10);
/// Retries of a `terminate` SIGNAL to an agent (five tries over about 1.5 s).
pub const TERMINATE_RETRY: Policy =
    Policy::doubling(Duration::from_millis(100), Duration::from_secs(1)).with_max_tries(4);
/// Retries of a GET before leaving it to reconciliation (three tries).
pub const COLLECT_RETRY: Policy =
    Policy::doubling(Duration::from_millis(100), Duration::from_secs(1)).with_max_tries(2);
/// Default limit of a synchronous call.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Inputs taken from the queue in one turn of the loop before a commit may start.
const BATCH: usize = 256;
/// Epochs stay below 2^53 so that every JSON reader keeps them exact; a process
/// starts at a random base below 2^52 and counts up.
const EPOCH_BASE_MASK: u64 = (1 << 52) - 1;

/// Who sent a SIGNAL, as far as the gateway can tell.
#[derive(Clone, Copy, Debug)]
pub enum SignalSender<'a> {
    /// Plain ARPCP: anyone who reaches the port (ARPCP 1.0 has no identities).
    Anyone,
    /// Over TLS: an agent certificate's name and the agent id registered for it,
    /// if any. Only attempts placed on that agent may be signalled.
    Certified {
        name: &'a str,
        agent_id: Option<&'a str>,
    },
}

type SignalResult = Result<Result<Grant, SignalRefusal>, String>;

enum Input {
    Event(Event),
    Submit {
        record: Box<TaskRecord>,
        /// The limit of a synchronous call; `None`: asynchronous.
        sync: Option<Duration>,
        reply: oneshot::Sender<Result<TaskRecord, GatewayError>>,
    },
    Signal {
        event: Event,
        reply: oneshot::Sender<SignalResult>,
    },
    Cancel {
        id: TaskId,
        task_id: String,
        reply: oneshot::Sender<Result<TaskRecord, GatewayError>>,
    },
}

/// A caller waiting for what one input comes to.
enum Waiting {
    Task(oneshot::Sender<Result<TaskRecord, GatewayError>>),
    Signal(oneshot::Sender<SignalResult>),
}

/// How membership and the request handlers reach the controller.
#[derive(Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Input>,
}

impl ControllerHandle {
    /// The queue of inputs, and its receiving end for `Driver::run`.
    pub fn new() -> (ControllerHandle, ControllerInbox) {
        let (tx, rx) = mpsc::channel(CONTROLLER_QUEUE);
        (ControllerHandle { tx }, ControllerInbox(rx))
    }

    /// Reports an event; waits while the queue is full. Lost only when the
    /// gateway is stopping.
    pub async fn tell(&self, event: Event) {
        let _ = self.tx.send(Input::Event(event)).await;
    }

    async fn ask(&self, input: Input) -> bool {
        self.tx.send(input).await.is_ok()
    }
}

pub struct ControllerInbox(mpsc::Receiver<Input>);

#[cfg(test)]
impl ControllerInbox {
    /// The next event reported (tests of what reports events).
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Input::Event(e) = self.0.recv().await? {
                return Some(e);
            }
        }
    }
}

/// The number in an agent id `agent-N` (the only form the store makes).
pub fn agent_number(agent_id: &str) -> Option<AgentId> {
    agent_id.strip_prefix("agent-")?.parse().ok()
}

fn task_number(task_id: &str) -> Option<TaskId> {
    uuid::Uuid::parse_str(task_id).ok().map(|u| u.as_u128())
}

fn task_name(id: TaskId) -> String {
    uuid::Uuid::from_u128(id).to_string()
}

/// What the gRPC service and the ARPCP listener call.
pub struct Scheduler {
    handle: ControllerHandle,
    /// Read to say why a refused start is refused, for a task the rules no
    /// longer keep.
    store: GatewayStore,
}

fn stopping() -> GatewayError {
    GatewayError::Unavailable("the gateway is stopping".into())
}

impl Scheduler {
    pub fn new(handle: ControllerHandle, store: GatewayStore) -> Arc<Scheduler> {
        Arc::new(Scheduler { handle, store })
    }

    async fn submit_input(
        &self,
        task: TaskRecord,
        sync: Option<Duration>,
    ) -> Result<TaskRecord, GatewayError> {
        let (reply, answer) = oneshot::channel();
        let record = Box::new(task);
        if !self
            .handle
            .ask(Input::Submit {
                record,
                sync,
                reply,
            })
            .await
        {
            return Err(stopping());
        }
        answer.await.map_err(|_| stopping())?
    }

    /// Stores a new task durably, placed on an agent, and sends it there. Refused
    /// at once when no agent could run it now.
    pub async fn submit(&self, task: TaskRecord) -> Result<TaskRecord, GatewayError> {
        self.submit_input(task, None).await
    }

    /// Runs a task with ARPCP TASK and returns it finished (or interrupted when the
    /// agent did not answer in time). Stored before the call and durable before the
    /// answer (the flush overlaps the agent's work).
    pub async fn submit_sync(
        &self,
        task: TaskRecord,
        timeout: Duration,
    ) -> Result<TaskRecord, GatewayError> {
        self.submit_input(task, Some(timeout)).await
    }

    /// CancelTask: marks the task cancelled (durably) and stops it on its agent.
    pub async fn cancel(&self, task_id: &str) -> Result<TaskRecord, GatewayError> {
        let not_found = || GatewayError::TaskNotFound(task_id.to_string());
        let id = task_number(task_id).ok_or_else(not_found)?;
        let (reply, answer) = oneshot::channel();
        let input = Input::Cancel {
            id,
            task_id: task_id.to_string(),
            reply,
        };
        if !self.handle.ask(input).await {
            return Err(stopping());
        }
        answer.await.map_err(|_| stopping())?
    }

    /// Why an attempt the rules do not know may not start, when the store says it
    /// belonged to a task that ended (the rules forget most ended tasks).
    fn ended(&self, task_id: &str, attempt: u32, signal: Signal) -> Option<String> {
        if signal != Signal::AskStart {
            return None;
        }
        let t = self.store.get_task(task_id).ok().flatten()?;
        if attempt > t.attempt || !t.status.is_final() {
            return None;
        }
        Some(if attempt < t.attempt {
            format!("the task was placed again as attempt {}", t.attempt)
        } else {
            format!("the task is {}", t.status.as_str())
        })
    }

    /// A SIGNAL from an agent. The answer grants the agent holding the attempt
    /// its lease.
    pub async fn on_signal(
        &self,
        sig: SignalRequest,
        sender: SignalSender<'_>,
    ) -> Result<Response, ProtocolError> {
        // Header values before lookups, as the protocol orders its checks.
        if sig.status == AtaskStatus::Terminate {
            return Err(ProtocolError::BadHeader {
                header: "atask_status",
                expected: "\"accepted\", \"done\", \"client_error\" or \"interrupted\" (terminate is sent by a controller)",
                got: "\"terminate\"".into(),
            });
        }
        let unknown = || ProtocolError::UnknownTask(sig.atask_id.clone());
        let (task_id, attempt) = parse_atask_id(&sig.atask_id).ok_or_else(unknown)?;
        if attempt == 0 {
            return Err(unknown());
        }
        let task = task_number(task_id).ok_or_else(unknown)?;
        let not_yours = |name: &str, placed| ProtocolError::NotYourTask {
            atask_id: sig.atask_id.clone(),
            name: name.to_string(),
            placed,
        };
        let agent = match sender {
            SignalSender::Anyone => None,
            SignalSender::Certified { name, agent_id } => {
                let none = "no agent is registered with that certificate";
                let n = agent_id.and_then(agent_number);
                Some(n.ok_or_else(|| not_yours(name, none))?)
            }
        };
        let signal = match sig.status {
            AtaskStatus::Accepted if sig.start => Signal::AskStart,
            AtaskStatus::Accepted if sig.progress.is_some() => Signal::Started,
            AtaskStatus::Accepted => Signal::Queued,
            _ => Signal::Ended,
        };
        let progress = match signal {
            Signal::AskStart => Some(sig.progress.clone().unwrap_or(Progress {
                percent: 0.0,
                comment: "starting".into(),
            })),
            _ => sig.progress.clone(),
        };
        let event = Event::Signal {
            agent,
            task,
            attempt,
            signal,
            progress,
        };
        let (reply, answer) = oneshot::channel();
        let gone = || ProtocolError::Internal("the gateway is stopping".into());
        if !self.handle.ask(Input::Signal { event, reply }).await {
            return Err(gone());
        }
        match answer.await.map_err(|_| gone())? {
            Ok(Ok(g)) => Ok(Response::ok(
                json!({"lease_ms": g.lease_ms, "lease_epoch": g.epoch}),
            )),
            Ok(Err(SignalRefusal::Unknown)) => match self.ended(task_id, attempt, signal) {
                Some(why) => Err(ProtocolError::AttemptWithdrawn {
                    atask_id: sig.atask_id.clone(),
                    why,
                }),
                None => Err(unknown()),
            },
            Ok(Err(SignalRefusal::NotYours)) => {
                let name = match sender {
                    SignalSender::Certified { name, .. } => name,
                    SignalSender::Anyone => "",
                };
                Err(not_yours(name, "it is placed on another agent"))
            }
            Ok(Err(SignalRefusal::Withdrawn(why))) => Err(ProtocolError::AttemptWithdrawn {
                atask_id: sig.atask_id.clone(),
                why,
            }),
            Err(e) => Err(ProtocolError::Internal(e)),
        }
    }
}

/// An effect the rules put after a write that must be durable first.
enum Visible {
    /// Shared with every watcher as it is: one copy of the record per change.
    Publish(Arc<TaskRecord>),
    Task(
        oneshot::Sender<Result<TaskRecord, GatewayError>>,
        Result<Box<TaskRecord>, GatewayError>,
    ),
    Signal(oneshot::Sender<SignalResult>, Result<Grant, SignalRefusal>),
    Send(Job),
}

/// An exchange with an agent about one attempt, run in its own task.
struct Job {
    agent: Arc<AgentRecord>,
    task: TaskId,
    attempt: u32,
    kind: Kind,
}

enum Kind {
    Atask {
        epoch: u64,
        procedure: String,
        args: crate::arpcp::Args,
    },
    Task {
        procedure: String,
        args: crate::arpcp::Args,
        timeout: Duration,
    },
    Get,
    Terminate,
}

/// The group commit in flight, covering durable writes up to its number.
type Commit = std::pin::Pin<Box<dyn Future<Output = (u64, Result<(), StoreError>)> + Send>>;

/// Owns the rules and carries out what they say.
pub struct Driver {
    core: Controller,
    started: Instant,
    store: GatewayStore,
    membership: Arc<Membership>,
    watchers: Arc<TaskWatchers>,
    /// Carries the results of exchanges with agents back to the loop.
    handle: ControllerHandle,
    exchanges: Arc<Exchanges>,
    /// Records of the unfinished tasks (the rules know their state; the record
    /// holds what they do not need: arguments, history, owner).
    open: HashMap<TaskId, TaskRecord>,
    /// Limits of synchronous calls not yet sent.
    sync_limits: HashMap<TaskId, Duration>,
    /// Synchronous callers waiting for their task's end.
    sync_waiting: HashMap<TaskId, oneshot::Sender<Result<TaskRecord, GatewayError>>>,
    /// Durable writes made so far, and those known to be on disk.
    written: u64,
    committed: u64,
    /// The last durable write of each task not yet on disk.
    pending_writes: HashMap<TaskId, u64>,
    /// Held effects, by the durable write they wait for.
    held: BTreeMap<u64, Vec<Visible>>,
    commit: Option<Commit>,
    /// A write of this turn failed: its answers carry the error.
    write_failed: Option<String>,
    /// Tasks that ended this turn: their records leave `open` after it.
    ended: Vec<TaskId>,
}

/// What the exchanges with agents share.
struct Exchanges {
    client: ArpcpClient,
    /// Our ARPCP address for agents' SIGNALs.
    reply_to: String,
    store: GatewayStore,
    slots: Semaphore,
    tracker: TaskTracker,
    /// Ends the retries of exchanges when the gateway stops.
    stop: CancellationToken,
}

pub struct DriverConfig {
    pub lease: Duration,
    pub max_misses: u32,
    pub reply_to: String,
    pub tls: Option<crate::arpcp::tls::ClientTls>,
}

impl Driver {
    /// A driver with the unfinished tasks and the agents of the store recovered:
    /// placed tasks are asked about, synchronous calls cut off are interrupted.
    pub fn recover(
        handle: ControllerHandle,
        store: GatewayStore,
        membership: Arc<Membership>,
        watchers: Arc<TaskWatchers>,
        config: DriverConfig,
    ) -> Result<Driver, StoreError> {
        let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
        let core_config = core::Config {
            lease_ms: config.lease.as_millis() as u64,
            max_misses: config.max_misses,
            reconcile_after_ms: RECONCILE_AFTER.as_millis() as u64,
            epoch_base: (hi ^ lo) & EPOCH_BASE_MASK,
        };
        let exchanges = Arc::new(Exchanges {
            client: ArpcpClient::default().with_tls(config.tls),
            reply_to: config.reply_to,
            store: store.clone(),
            slots: Semaphore::new(MAX_CONCURRENT_SENDS),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        let mut driver = Driver {
            core: Controller::new(core_config, Rules::default(), 0),
            started: Instant::now(),
            store: store.clone(),
            membership,
            watchers,
            handle,
            exchanges,
            open: HashMap::new(),
            sync_limits: HashMap::new(),
            sync_waiting: HashMap::new(),
            written: 0,
            committed: 0,
            pending_writes: HashMap::new(),
            held: BTreeMap::new(),
            commit: None,
            write_failed: None,
            ended: Vec::new(),
        };
        let agents = store
            .agents()?
            .into_iter()
            .filter_map(|a| {
                Some(AgentInfo {
                    id: agent_number(&a.agent_id)?,
                    capacity: a.capacity,
                    blacklisted: a.blacklisted,
                })
            })
            .collect();
        let mut tasks = Vec::new();
        for rec in store.unfinished_tasks()? {
            let Some(t) = core_task(&rec) else {
                warn!(task_id = %rec.task_id, "a stored task with an id this gateway does not make; left as it is");
                continue;
            };
            driver.open.insert(t.id, rec);
            tasks.push(t);
        }
        if !tasks.is_empty() {
            info!(
                tasks = tasks.len(),
                "recovered unfinished tasks from the store"
            );
        }
        driver.step(Event::Recovered { tasks, agents }, None);
        Ok(driver)
    }

    fn now(&self) -> core::Millis {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs the rules until `stop`; then lets exchanges under way end (for a
    /// while) and flushes the store.
    pub async fn run(mut self, inbox: ControllerInbox, stop: CancellationToken) {
        let mut inbox = inbox.0;
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_commit();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                done = async {
                    match self.commit.as_mut() {
                        Some(c) => c.await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.commit = None;
                    let (gen, result) = done;
                    self.committed(gen, result.map_err(|e| e.to_string()));
                }
                // Before the inputs, so that a steady stream of them cannot starve it.
                _ = tick.tick() => {
                    let now = self.now();
                    let effects = self.core.tick(now);
                    self.carry_out(effects, None);
                }
                input = inbox.recv() => {
                    let Some(input) = input else { break };
                    self.input(input);
                    for _ in 1..BATCH {
                        match inbox.try_recv() {
                            Ok(input) => self.input(input),
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        self.watchers.close();
        self.exchanges.tracker.close();
        // Exchanges under way may end (a GET's answer is lost with the loop; the
        // result stays on the agent); their retries stop.
        self.exchanges.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.exchanges.tracker.wait()).await;
        // Status changes not yet on disk (progress, running, ...) survive a clean stop.
        if let Err(e) = self.store.commit().await {
            warn!("cannot flush the store on shutdown: {e}");
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Event(event) => {
                let sync_end = matches!(event, Event::TaskAnswered { .. });
                self.step(event, None);
                if sync_end {
                    // The caller has its answer; the outcome goes to disk with the
                    // next group commit, started now, though nothing waits for it.
                    self.written += 1;
                }
            }
            Input::Signal { event, reply } => self.step(event, Some(Waiting::Signal(reply))),
            Input::Cancel { id, task_id, reply } => {
                if self.core.task(id).is_some() {
                    return self.step(Event::Cancel { task: id }, Some(Waiting::Task(reply)));
                }
                // Ended long ago (or never was): the store answers.
                let found = match self.store.get_task(&task_id) {
                    Ok(Some(t)) => Ok(t),
                    Ok(None) => Err(GatewayError::TaskNotFound(task_id)),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(found);
            }
            Input::Submit {
                record,
                sync,
                reply,
            } => self.submit(*record, sync, reply),
        }
    }

    fn submit(
        &mut self,
        mut record: TaskRecord,
        sync: Option<Duration>,
        reply: oneshot::Sender<Result<TaskRecord, GatewayError>>,
    ) {
        let Some(id) = task_number(&record.task_id) else {
            let _ = reply.send(Err(GatewayError::InvalidArgument {
                field: "task_id",
                reason: format!("{:?} is not a UUID", record.task_id),
            }));
            return;
        };
        let requested = match record.requested_agent_id.as_deref() {
            None => None,
            Some(a) => match agent_number(a) {
                Some(n) => Some(n),
                None => {
                    let _ = reply.send(Err(GatewayError::AgentNotFound(a.to_string())));
                    return;
                }
            },
        };
        record.sync = sync.is_some();
        let call = Call {
            procedure: record.procedure.clone(),
            requested,
            sync: record.sync,
        };
        self.open.insert(id, record);
        if let Some(limit) = sync {
            self.sync_limits.insert(id, limit);
        }
        self.step(
            Event::Submitted { task: id, call },
            Some(Waiting::Task(reply)),
        );
    }

    fn step(&mut self, event: Event, waiting: Option<Waiting>) {
        let now = self.now();
        let submitted = match &event {
            Event::Submitted { task, call } => Some((*task, call.sync)),
            _ => None,
        };
        let effects = self.core.step(now, event);
        let waiting = self.carry_out(effects, waiting);
        // Accepted synchronous calls answer when their task ends.
        if let (Some((task, true)), Some(Waiting::Task(reply))) = (submitted, waiting) {
            if self.core.task(task).is_some() {
                self.sync_waiting.insert(task, reply);
            }
        }
    }

    /// Carries out effects in order; returns the waiting caller if no answer was
    /// for it.
    fn carry_out(&mut self, effects: Vec<Effect>, mut waiting: Option<Waiting>) -> Option<Waiting> {
        self.write_failed = None;
        for effect in effects {
            match effect {
                Effect::Persist { task, durable } => self.write(&task, durable),
                Effect::PersistAgent(_) => {
                    // Membership keeps the agents' records as they register and
                    // as the blacklist changes.
                }
                Effect::AgentState {
                    agent,
                    state,
                    misses,
                } => self.membership.set_state(&agent_name(agent), state, misses),
                Effect::Publish { task } => {
                    let watched = self
                        .open
                        .get(&task)
                        .filter(|r| self.watchers.is_watched(&r.task_id));
                    if let Some(rec) = watched {
                        let v = Visible::Publish(Arc::new(rec.clone()));
                        self.emit(task, v);
                    }
                }
                Effect::Answer(answer) => self.answer(answer, &mut waiting),
                Effect::SendAtask {
                    agent,
                    task,
                    attempt,
                    epoch,
                } => {
                    if let Some((procedure, args)) = self.call_of(task) {
                        let kind = Kind::Atask {
                            epoch,
                            procedure,
                            args,
                        };
                        self.send(agent, task, attempt, kind);
                    }
                }
                Effect::SendTask {
                    agent,
                    task,
                    attempt,
                } => {
                    let timeout = self
                        .sync_limits
                        .remove(&task)
                        .unwrap_or(DEFAULT_SYNC_TIMEOUT);
                    if let Some((procedure, args)) = self.call_of(task) {
                        let kind = Kind::Task {
                            procedure,
                            args,
                            timeout,
                        };
                        self.send(agent, task, attempt, kind);
                    }
                }
                Effect::SendGet {
                    agent,
                    task,
                    attempt,
                } => self.send(agent, task, attempt, Kind::Get),
                Effect::SendTerminate {
                    agent,
                    task,
                    attempt,
                } => self.send(agent, task, attempt, Kind::Terminate),
            }
        }
        for id in std::mem::take(&mut self.ended) {
            if self.core.task(id).is_none_or(|t| t.status.is_final()) {
                self.open.remove(&id);
            }
        }
        waiting
    }

    fn call_of(&self, task: TaskId) -> Option<(String, crate::arpcp::Args)> {
        let rec = self.open.get(&task)?;
        Some((rec.procedure.clone(), rec.args.clone()))
    }

    /// An exchange with an agent, once what it follows is durable. An agent not
    /// known here is as unreachable as one that refuses connections.
    fn send(&mut self, agent: AgentId, task: TaskId, attempt: u32, kind: Kind) {
        let Some(record) = self.membership.get(&agent_name(agent)) else {
            let failed = match kind {
                Kind::Atask { .. } => Event::AtaskFailed {
                    task,
                    attempt,
                    unreachable: true,
                },
                Kind::Task { .. } => Event::TaskAnswered {
                    task,
                    attempt,
                    outcome: Outcome::Interrupted(format!(
                        "agent {} is not known here",
                        agent_name(agent)
                    )),
                    unreachable: false,
                },
                Kind::Get => Event::GetFailed { task, attempt },
                Kind::Terminate => return,
            };
            return self.later(failed);
        };
        let job = Job {
            agent: record,
            task,
            attempt,
            kind,
        };
        self.emit(task, Visible::Send(job));
    }

    /// An event that follows from an effect that cannot be carried out (an agent
    /// not known here): given to the rules in a later turn, not within this one.
    fn later(&self, event: Event) {
        let handle = self.handle.clone();
        self.exchanges
            .tracker
            .spawn(async move { handle.tell(event).await });
    }

    /// The record of a task for a caller: the open one, or the stored one.
    fn record(&self, id: TaskId) -> Result<TaskRecord, GatewayError> {
        if let Some(rec) = self.open.get(&id) {
            return Ok(rec.clone());
        }
        let name = task_name(id);
        self.store
            .get_task(&name)?
            .ok_or(GatewayError::TaskNotFound(name))
    }

    fn answer(&mut self, answer: Answer, waiting: &mut Option<Waiting>) {
        let failed = self.write_failed.clone();
        match answer {
            Answer::Submit { task, result } => {
                let Some(Waiting::Task(reply)) = waiting.take() else {
                    return;
                };
                let result = match (result, failed) {
                    (Err(r), _) => {
                        self.sync_limits.remove(&task);
                        let procedure = self.open.remove(&task).map(|t| t.procedure);
                        Err(refusal(r, procedure.unwrap_or_default()))
                    }
                    (Ok(()), Some(e)) => Err(GatewayError::Unavailable(e)),
                    (Ok(()), None) => self.record(task).map(Box::new),
                };
                self.emit(task, Visible::Task(reply, result));
            }
            Answer::Cancel {
                task,
                found,
                changed: _,
            } => {
                let Some(Waiting::Task(reply)) = waiting.take() else {
                    return;
                };
                let result = match (found, failed) {
                    (_, Some(e)) => Err(GatewayError::Unavailable(e)),
                    (_, None) => self.record(task).map(Box::new),
                };
                self.emit(task, Visible::Task(reply, result));
            }
            Answer::Signal { task, result, .. } => {
                let Some(Waiting::Signal(reply)) = waiting.take() else {
                    return;
                };
                if let Some(e) = failed {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.emit(task, Visible::Signal(reply, result));
            }
            Answer::Sync { task } => {
                let Some(reply) = self.sync_waiting.remove(&task) else {
                    return;
                };
                let result = self.record(task).map(Box::new);
                self.emit(task, Visible::Task(reply, result));
            }
        }
    }

    /// Applies the rules' version of a task to its record and stores it.
    fn write(&mut self, task: &core::Task, durable: bool) {
        let id = task.id;
        if !self.open.contains_key(&id) {
            match self.store.get_task(&task_name(id)) {
                Ok(Some(rec)) => {
                    self.open.insert(id, rec);
                }
                Ok(None) => return,
                Err(e) => {
                    warn!(task_id = %task_name(id), "cannot read the task to change it: {e}");
                    self.write_failed = Some(e.to_string());
                    return;
                }
            }
        }
        let opal = task.status.is_final() && self.membership.is_opal(&task.call.procedure);
        let Some(rec) = self.open.get_mut(&id) else {
            return;
        };
        let was_final = rec.status.is_final();
        let was_new = rec.attempt == 0 && task.attempt > 0 && rec.status == TaskStatus::Queued;
        mirror(rec, task, now_ms());
        rec.opal |= opal;
        if was_new && rec.history.len() <= 2 {
            crate::metrics::get().task_submitted(&rec.procedure);
        }
        if rec.status.is_final() && !was_final {
            task_ended(rec);
        }
        if let Err(e) = self.store.put_task(rec) {
            warn!(task_id = %rec.task_id, "cannot store the task: {e}");
            self.write_failed = Some(e.to_string());
            return;
        }
        if task.status.is_final() {
            self.ended.push(id);
        }
        if durable {
            self.written += 1;
            self.pending_writes.insert(id, self.written);
        }
    }

    /// Carries out a visible effect now, or holds it until the task's last
    /// durable write is on disk.
    fn emit(&mut self, task: TaskId, v: Visible) {
        match self.pending_writes.get(&task) {
            Some(&gen) if gen > self.committed => self.held.entry(gen).or_default().push(v),
            _ => self.execute(v, None),
        }
    }

    fn start_commit(&mut self) {
        if self.commit.is_some() || self.written <= self.committed {
            return;
        }
        let (store, gen) = (self.store.clone(), self.written);
        self.commit = Some(Box::pin(async move { (gen, store.commit().await) }));
    }

    /// Writes up to `gen` are on disk (or failed to get there): what waited for
    /// them goes out, in order.
    fn committed(&mut self, gen: u64, result: Result<(), String>) {
        if let Err(e) = &result {
            warn!("cannot make task changes durable: {e}");
        }
        self.committed = self.committed.max(gen);
        let later = self.held.split_off(&(gen + 1));
        let ready = std::mem::replace(&mut self.held, later);
        for v in ready.into_values().flatten() {
            self.execute(v, result.as_ref().err());
        }
        let committed = self.committed;
        self.pending_writes.retain(|_, g| *g > committed);
    }

    /// `failed`: the durable write this waited for did not reach disk.
    fn execute(&self, v: Visible, failed: Option<&String>) {
        match (v, failed) {
            (Visible::Publish(rec), None) => self.watchers.publish(rec),
            (Visible::Task(reply, result), None) => {
                let _ = reply.send(result.map(|r| *r));
            }
            (Visible::Signal(reply, result), None) => {
                let _ = reply.send(Ok(result));
            }
            (Visible::Send(job), None) => self.exchanges.clone().start(job, self.handle.clone()),
            (Visible::Task(reply, _), Some(e)) => {
                let _ = reply.send(Err(GatewayError::Unavailable(e.clone())));
            }
            (Visible::Signal(reply, _), Some(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
            // Not on disk: nothing is told. Reconciliation finds what the agents hold.
            (Visible::Publish(_) | Visible::Send(_), Some(_)) => {}
        }
    }
}

impl Exchanges {
    fn start(self: Arc<Self>, job: Job, handle: ControllerHandle) {
        let this = self.clone();
        self.tracker.spawn(async move {
            let Ok(_slot) = this.slots.acquire().await else {
                return;
            };
            if let Some(event) = this.run(job).await {
                handle.tell(event).await;
            }
        });
    }

    /// A request to `agent` at its address; over TLS only to the holder of the
    /// certificate it registered with, so whoever else holds that address now (a
    /// valid agent certificate of another name) never sees a task or sends a result.
    async fn call(
        &self,
        agent: &AgentRecord,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let r = self
            .client
            .call_named(&agent.address, agent.certificate.as_deref(), req, timeout)
            .await;
        if r.is_err() {
            self.client.forget(&agent.address);
        }
        r
    }

    async fn run(&self, job: Job) -> Option<Event> {
        let timeout = self.client.request_timeout();
        let Job {
            agent,
            task,
            attempt,
            kind,
        } = job;
        match kind {
            Kind::Atask {
                epoch,
                procedure,
                args,
            } => {
                let req = Request::Atask {
                    procedure,
                    args,
                    atask_id: Some(format!("{}.{attempt}", task_name(task))),
                    reply_to: Some(self.reply_to.clone()),
                    lease_epoch: Some(epoch),
                };
                Some(match self.call(&agent, &req, timeout).await {
                    Ok(r) => Event::AtaskAnswered {
                        task,
                        attempt,
                        code: r.code,
                        description: r.description,
                    },
                    Err(e) => {
                        let unreachable = e.is_unreachable();
                        if !unreachable {
                            // The agent may have stored it: reconciliation asks later.
                            warn!(task_id = %task_name(task), agent = %agent.agent_id, "no answer to ATASK: {e}");
                        }
                        Event::AtaskFailed {
                            task,
                            attempt,
                            unreachable,
                        }
                    }
                })
            }
            Kind::Task {
                procedure,
                args,
                timeout,
            } => {
                let req = Request::Task {
                    procedure,
                    args,
                    timeout_ms: Some(timeout.as_millis().max(1) as u64),
                };
                // A little longer than the agent's own limit, so its answer can arrive.
                let wait = timeout + Duration::from_secs(2);
                // The placement becomes durable while the agent works on it: the
                // answer waits for both, so it costs the longer of the two.
                let (answer, stored) =
                    tokio::join!(self.call(&agent, &req, wait), self.store.commit());
                if let Err(e) = stored {
                    warn!(task_id = %task_name(task), "cannot store a synchronous call: {e}");
                }
                let (outcome, unreachable) = match answer {
                    Ok(r) => (outcome_of_task_response(r), false),
                    Err(ClientError::Timeout { .. }) => (
                        Outcome::Interrupted(format!(
                            "agent {} gave no answer within {wait:?}",
                            agent.agent_id
                        )),
                        false,
                    ),
                    Err(e) => (
                        Outcome::Interrupted(format!("agent {} unreachable: {e}", agent.agent_id)),
                        e.is_unreachable(),
                    ),
                };
                Some(Event::TaskAnswered {
                    task,
                    attempt,
                    outcome,
                    unreachable,
                })
            }
            Kind::Get => {
                let atask_id = format!("{}.{attempt}", task_name(task));
                let req = Request::Get {
                    atask_id: atask_id.clone(),
                };
                let asked = retry(COLLECT_RETRY, &self.stop, || async {
                    self.call(&agent, &req, timeout)
                        .await
                        .map_err(Attempt::Transient)
                })
                .await;
                let answer = match asked {
                    Ok(r) => answer_of_get(r, &atask_id).or_else(|| {
                        warn!(task_id = %task_name(task), agent = %agent.agent_id, "GET answered without valid data, or for another task");
                        None
                    }),
                    Err(e) => {
                        debug!(task_id = %task_name(task), agent = %agent.agent_id, "GET failed: {e}");
                        None
                    }
                };
                Some(match answer {
                    Some(answer) => Event::GetAnswered {
                        task,
                        attempt,
                        answer,
                    },
                    // Reconciliation asks again later.
                    None => Event::GetFailed { task, attempt },
                })
            }
            Kind::Terminate => {
                let atask_id = format!("{}.{attempt}", task_name(task));
                let req = Request::Signal(SignalRequest {
                    atask_id: atask_id.clone(),
                    status: AtaskStatus::Terminate,
                    progress: None,
                    agent_id: None,
                    error: None,
                    start: false,
                });
                let told = retry(TERMINATE_RETRY, &self.stop, || async {
                    self.call(&agent, &req, timeout)
                        .await
                        .map_err(Attempt::Transient)
                })
                .await;
                if let Err(e) = told {
                    warn!(%atask_id, agent = %agent.agent_id, "agent keeps its copy of the task: terminate not delivered: {e}");
                }
                None
            }
        }
    }
}

/// Why a call found no agent, as the API says it.
fn refusal(r: Refusal, procedure: String) -> GatewayError {
    match r {
        Refusal::NoAgent => GatewayError::NoAliveAgent,
        Refusal::NotOffered { offered_elsewhere } => GatewayError::ProcedureNotOffered {
            procedure,
            offered_elsewhere: offered_elsewhere.into_iter().map(agent_name).collect(),
        },
        Refusal::UnknownAgent(a) => GatewayError::AgentNotFound(agent_name(a)),
        Refusal::Blacklisted(a) => GatewayError::AgentBlacklisted(agent_name(a)),
        Refusal::Unavailable { agent, state } => GatewayError::AgentUnavailable {
            agent_id: agent_name(agent),
            state,
        },
        Refusal::TooManyOpen { limit } => GatewayError::Unavailable(format!(
            "{limit} tasks are unfinished, the most this gateway holds; submit again once some have ended"
        )),
    }
}

/// The rules' view of a stored task; `None` for an id this gateway does not make.
fn core_task(rec: &TaskRecord) -> Option<core::Task> {
    Some(core::Task {
        id: task_number(&rec.task_id)?,
        call: Call {
            procedure: rec.procedure.clone(),
            requested: rec.requested_agent_id.as_deref().and_then(agent_number),
            sync: rec.sync,
        },
        status: rec.status,
        attempt: rec.attempt,
        holders: (1..=rec.attempt)
            .map(|n| rec.agent_of_attempt(n).and_then(agent_number).unwrap_or(0))
            .collect(),
        progress: rec.progress.clone(),
        result: None,
        error: None,
        reason: None,
    })
}

/// Brings a record to the rules' version of its task, with the history entries
/// and times of each change.
fn mirror(rec: &mut TaskRecord, t: &core::Task, now: u64) {
    rec.updated_ms = now;
    while rec.attempt < t.attempt {
        rec.attempt += 1;
        rec.agent_id = t.holder(rec.attempt).map(agent_name);
        rec.set_status(TaskStatus::Dispatched, None, now);
    }
    if t.progress.is_some() {
        rec.progress = t.progress.clone();
    }
    if rec.status == t.status {
        return;
    }
    match t.status {
        TaskStatus::Queued => {
            rec.set_status(TaskStatus::Queued, t.reason.clone(), now);
            rec.agent_id = None;
        }
        TaskStatus::Dispatched => rec.set_status(TaskStatus::Dispatched, None, now),
        TaskStatus::Running => {
            rec.started_ms = Some(now);
            rec.set_status(TaskStatus::Running, None, now);
        }
        status => {
            if matches!(
                status,
                TaskStatus::Done | TaskStatus::Failed | TaskStatus::ClientError
            ) && rec.started_ms.is_none()
            {
                rec.started_ms = Some(now);
            }
            rec.result = t.result.clone();
            if let Some(p) = &t.progress {
                rec.progress = Some(p.clone());
            }
            (rec.error, rec.error_code) = match &t.error {
                Some((code, text)) => (Some(text.clone()), code.map(Code::as_u16)),
                None => (None, None),
            };
            rec.set_status(status, t.reason.clone(), now);
        }
    }
}

/// The one log line and the metrics of a task's first end (a later result of an
/// interrupted task changes neither: each task ends once here).
fn task_ended(t: &TaskRecord) {
    let end = t.finished_ms.unwrap_or_else(now_ms);
    let duration_ms = end.saturating_sub(t.created_ms);
    let status = t.status.as_str();
    crate::metrics::get().task_ended(&t.procedure, status, duration_ms as f64 / 1000.0);
    info!(
        task_id = %t.task_id,
        procedure = %t.procedure,
        agent = t.agent_id.as_deref().unwrap_or(""),
        status,
        duration_ms,
        "task ended"
    );
}

/// A result as the agent sent it, unless it is over the limits: an agent that
/// does not check its results (an older or a foreign one) could leave a result
/// no client can read.
fn checked_done(v: Value) -> Outcome {
    match crate::limits::check_result(&v) {
        Ok(()) => Outcome::Done(v),
        Err(e) => Outcome::Failed {
            code: Code::Execution,
            description: format!("the agent sent a result over the limit: {e}"),
        },
    }
}

/// What a TASK answer means for the task.
fn outcome_of_task_response(r: Response) -> Outcome {
    match r.code {
        Code::Ok => checked_done(r.data.get("result").cloned().unwrap_or(Value::Null)),
        code => Outcome::from_error(code, r.description),
    }
}

/// What a GET answer says of the attempt `asked`; `None` when it says nothing
/// readable, or speaks of another attempt (a confused or lying peer: its result
/// is not this attempt's).
fn answer_of_get(r: Response, asked: &str) -> Option<GetAnswer> {
    let named = r.data.get("atask_id").and_then(Value::as_str);
    if named.is_some_and(|id| id != asked) {
        return None;
    }
    match r.code {
        Code::UnknownTask => Some(GetAnswer::Unknown),
        Code::Ok => {
            let data = serde_json::from_value::<GetData>(r.data).ok()?;
            Some(match data.atask_status {
                AtaskStatus::Accepted => match data.progress {
                    Some(p) => GetAnswer::Running(Some(p)),
                    None => GetAnswer::Waiting,
                },
                AtaskStatus::Done => {
                    GetAnswer::Ended(checked_done(data.result.unwrap_or(Value::Null)))
                }
                AtaskStatus::Interrupted | AtaskStatus::Terminate => {
                    GetAnswer::Ended(Outcome::Interrupted(
                        data.error
                            .map(|e| e.description)
                            .unwrap_or_else(|| "interrupted on the agent".into()),
                    ))
                }
                AtaskStatus::ClientError => GetAnswer::Ended(Outcome::ClientError {
                    code: data.error.as_ref().map_or(Code::BadArguments, |e| e.code),
                    description: data.error.map(|e| e.description).unwrap_or_default(),
                }),
            })
        }
        code => Some(GetAnswer::Ended(Outcome::from_error(code, r.description))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_result_over_the_limits_is_a_failure() {
        let big = json!("x".repeat(crate::limits::MAX_RESULT_BYTES + 1));
        assert!(matches!(
            checked_done(big),
            Outcome::Failed {
                code: Code::Execution,
                ..
            }
        ));
        assert_eq!(checked_done(json!(3)), Outcome::Done(json!(3)));
    }

    #[test]
    fn agent_ids_and_numbers_round_trip() {
        assert_eq!(agent_number("agent-17"), Some(17));
        assert_eq!(agent_name(17), "agent-17");
        assert_eq!(agent_number("agent-x"), None);
        assert_eq!(agent_number("17"), None);
        let id = uuid::Uuid::now_v7().to_string();
        assert_eq!(task_number(&id).map(task_name), Some(id));
    }

    #[test]
    fn a_record_follows_a_task_through_a_requeue_and_a_second_placement() {
        let mut rec = TaskRecord::new("t".into(), "add".into(), Default::default(), None);
        let mut t = core::Task {
            id: 1,
            call: Call::default(),
            status: TaskStatus::Dispatched,
            attempt: 1,
            holders: vec![3],
            progress: None,
            result: None,
            error: None,
            reason: None,
        };
        mirror(&mut rec, &t, 10);
        assert_eq!((rec.attempt, rec.agent_id.as_deref()), (1, Some("agent-3")));
        t.status = TaskStatus::Queued;
        t.reason = Some("agent agent-3 left".into());
        mirror(&mut rec, &t, 20);
        assert_eq!(
            (rec.status, rec.agent_id.as_deref()),
            (TaskStatus::Queued, None)
        );
        t.status = TaskStatus::Dispatched;
        t.attempt = 2;
        t.holders.push(4);
        mirror(&mut rec, &t, 30);
        assert_eq!(rec.agent_of_attempt(1), Some("agent-3"));
        assert_eq!(rec.agent_of_attempt(2), Some("agent-4"));
        t.status = TaskStatus::Done;
        t.result = Some(json!(5));
        mirror(&mut rec, &t, 40);
        assert_eq!(
            (rec.status, rec.result.clone(), rec.finished_ms),
            (TaskStatus::Done, Some(json!(5)), Some(40))
        );
    }
}
