//! The agent's task runner: the driver of the task core (`core.rs`). It turns ATASK,
//! GET, `terminate`, TASK, finished sled writes, controller answers and ended
//! procedures into the core's events, and carries out its effects: stores, SIGNALs,
//! procedures. Which task runs when, and what a terminate does, the core decides.
//!
//! What it keeps beside the core is bounded by the core's limits: one owed answer
//! per task being admitted, one stop token per task with I/O in flight, one sender
//! per synchronous TASK waiting (`MAX_WAITING_SYNC`) or running (`capacity`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::core::{
    Effect, Ending, Event, Previous, Ran, Refusal, Runner, Signal, StartAnswer, Stored, Write,
    INTERRUPTED_BY_SHUTDOWN,
};
use super::lease::Lease;
use super::procedures::{kill_marked_processes, ProgressSink, Registry, RunContext, RunError};
use super::signals::{self, SignalSender};
use super::store::{AgentStore, Inserted, StoreError, TaskRecord, TaskState};
use crate::arpcp::{Args, GetData, Progress, ProtocolError, Response};
use crate::retry::{Backoff, Policy};

/// Environment variables that mark a program as started for a task of this agent
/// (`ARPCP_AGENT_STORE` names the agent's store; `ARPCP_ATASK_ID` the task).
pub const ENV_STORE: &str = "ARPCP_AGENT_STORE";
pub const ENV_TASK: &str = "ARPCP_ATASK_ID";

/// A task's durable write to a store that cannot write for now (a full disk) is
/// tried again after 100 ms, doubling up to 2 s, until it succeeds or the task stops.
pub const STORE_RETRY: Policy =
    Policy::doubling(Duration::from_millis(100), Duration::from_secs(2));
/// Default limit of a synchronous TASK that names none.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// What the driver keeps beside the core, under the same lock.
struct Driven {
    core: Runner,
    /// Answers owed to ATASKs whose record is being made durable.
    replies: HashMap<String, oneshot::Sender<Result<(), Refusal>>>,
    /// What is in flight per task (a write, a question, a procedure): at most one
    /// at a time, cancelled by a `Stop`.
    stops: HashMap<String, CancellationToken>,
    /// Synchronous TASKs waiting for a slot.
    syncs: HashMap<u64, oneshot::Sender<Result<(), ProtocolError>>>,
    next_ticket: u64,
    /// Writes `recover` waits for: tried once, their error fails the start-up.
    recovering: HashMap<String, oneshot::Sender<Result<(), StoreError>>>,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The driver of the task core: carries out its effects with sled, the SIGNAL
/// sender, timers and procedures, and turns what comes back into its events. It
/// decides nothing itself.
pub struct TaskRunner {
    store: AgentStore,
    registry: Arc<Registry>,
    signals: SignalSender,
    driven: Mutex<Driven>,
    tracker: TaskTracker,
    /// Durable writes of a start stop retrying on a store that cannot write.
    draining: CancellationToken,
    /// The grace period is over: synchronous TASKs stop; durable writes of an
    /// ending stop retrying.
    hard_stop: CancellationToken,
}

/// A synchronous TASK's slot (or place in line) while this lives.
struct SyncTicket<'a> {
    runner: &'a Arc<TaskRunner>,
    ticket: u64,
}

impl Drop for SyncTicket<'_> {
    fn drop(&mut self) {
        let mut d = self.runner.driven();
        d.syncs.remove(&self.ticket);
        self.runner.step(
            &mut d,
            Event::SyncGone {
                ticket: self.ticket,
            },
            None,
        );
    }
}

impl TaskRunner {
    pub fn new(
        store: AgentStore,
        registry: Arc<Registry>,
        signals: SignalSender,
        capacity: u32,
    ) -> Arc<Self> {
        Arc::new(TaskRunner {
            store,
            registry,
            signals,
            driven: Mutex::new(Driven {
                core: Runner::new(capacity),
                replies: HashMap::new(),
                stops: HashMap::new(),
                syncs: HashMap::new(),
                next_ticket: 0,
                recovering: HashMap::new(),
            }),
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        })
    }

    /// The controller's lease (held by the SIGNAL sender, which its answers renew).
    pub fn lease(&self) -> &Lease {
        self.signals.lease()
    }

    pub fn running(&self) -> u32 {
        u32::try_from(self.driven().core.running()).unwrap_or(u32::MAX)
    }

    /// Tasks running (synchronous TASKs included) and tasks waiting for a slot.
    pub fn counts(&self) -> (i64, i64) {
        let d = self.driven();
        (d.core.running() as i64, d.core.waiting() as i64)
    }

    fn driven(&self) -> std::sync::MutexGuard<'_, Driven> {
        self.driven.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One event into the core, with the lease as it is now, and its effects
    /// carried out. `new` is the record an ATASK would store.
    fn step(
        self: &Arc<Self>,
        d: &mut Driven,
        event: Event,
        new: Option<&TaskRecord>,
    ) -> Vec<Effect> {
        let now = Instant::now();
        d.core.step(now, Event::Lease(self.lease().snapshot()));
        let effects = d.core.step(now, event);
        for e in &effects {
            self.apply(d, e, new);
        }
        effects
    }

    /// Reports what came of an I/O the core asked for.
    fn report(self: &Arc<Self>, id: &str, event: Event) {
        let mut d = self.driven();
        d.stops.remove(id);
        self.step(&mut d, event, None);
    }

    /// A token that a `Stop` of the task cancels, for what is now in flight.
    fn in_flight(d: &mut Driven, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        d.stops.insert(id.to_string(), token.clone());
        token
    }

    fn apply(self: &Arc<Self>, d: &mut Driven, effect: &Effect, new: Option<&TaskRecord>) {
        match effect {
            Effect::Persist { id, write, durable } => self.persist(d, id, write, *durable, new),
            Effect::Remove { id } => {
                if let Err(e) = self.store.remove(id) {
                    warn!(atask_id = %id, "cannot remove the task: {e}");
                }
            }
            Effect::Start { id } => {
                let stop = Self::in_flight(d, id);
                let this = self.clone();
                let id = id.clone();
                self.tracker.spawn(async move {
                    let ran = this.run(&id, stop).await;
                    this.report(
                        &id,
                        Event::Ended {
                            id: id.clone(),
                            ran,
                        },
                    );
                });
            }
            Effect::Stop { id } => {
                if let Some(t) = d.stops.get(id) {
                    t.cancel();
                }
            }
            Effect::KillLeftovers { id } => {
                let killed = kill_marked_processes(&self.task_marks(id));
                if killed > 0 {
                    info!(atask_id = %id, killed, "stopped the processes a crash left running");
                }
            }
            Effect::Signal { id, signal } => {
                let rec = match self.store.get(id) {
                    Ok(Some(rec)) => rec,
                    Ok(None) => return,
                    Err(e) => {
                        warn!(atask_id = %id, "cannot read the task to signal it: {e}");
                        return;
                    }
                };
                match signal {
                    Signal::Accepted => self.signals.accepted(&rec),
                    Signal::Progress(p) => self.signals.progress(&rec, p.clone()),
                    Signal::Finished => self.signals.finished(&rec),
                }
            }
            Effect::AskStart { id } => {
                let stop = Self::in_flight(d, id);
                let this = self.clone();
                let id = id.clone();
                self.tracker.spawn(async move {
                    let answer = this.ask_start(&id, stop).await;
                    this.report(
                        &id,
                        Event::StartAnswered {
                            id: id.clone(),
                            answer,
                        },
                    );
                });
            }
            Effect::ResendFinal { id } => {
                let this = self.clone();
                let id = id.clone();
                self.tracker.spawn(async move {
                    match this
                        .store
                        .update(&id, false, |r| r.final_signal_answered = false)
                        .await
                    {
                        Ok(Some(rec)) => this.signals.finished(&rec),
                        Ok(None) => {}
                        Err(e) => warn!(atask_id = %id, "cannot send the final SIGNAL again: {e}"),
                    }
                });
            }
            Effect::ReplyAtask { id, answer } => {
                if let Some(tx) = d.replies.remove(id) {
                    let _ = tx.send(answer.clone());
                }
            }
            Effect::RunSync { ticket } => {
                if let Some(tx) = d.syncs.remove(ticket) {
                    let _ = tx.send(Ok(()));
                }
            }
            Effect::RefuseSync { ticket, limit } => {
                if let Some(tx) = d.syncs.remove(ticket) {
                    let _ = tx.send(Err(ProtocolError::Internal(format!(
                        "agent already has {limit} synchronous TASKs waiting for a slot; try later"
                    ))));
                }
            }
            // Read by the caller that stepped the request.
            Effect::AnswerGet { .. } | Effect::AnswerTerminate { .. } => {}
        }
    }

    fn persist(
        self: &Arc<Self>,
        d: &mut Driven,
        id: &str,
        write: &Write,
        durable: bool,
        new: Option<&TaskRecord>,
    ) {
        let this = self.clone();
        let id = id.to_string();
        let stop = Self::in_flight(d, &id);
        if let Write::New(state) = write {
            let inserted = match new {
                Some(rec) => {
                    let mut rec = rec.clone();
                    rec.state = *state;
                    self.store.insert_new(&rec).map_err(|e| e.to_string())
                }
                None => Err("no record to store".to_string()),
            };
            self.tracker.spawn(async move {
                let result = match inserted {
                    Ok(Inserted::New) if durable => this.store.commit().await.map_err(|e| {
                        error!(atask_id = %id, "cannot make the task durable: {e}");
                        e.to_string()
                    }),
                    Ok(Inserted::New) => Ok(()),
                    Ok(Inserted::Existing(old)) => Err(format!(
                        "atask_id {id:?} is stored already (as {:?})",
                        old.state
                    )),
                    Err(e) => Err(e),
                };
                this.report(
                    &id,
                    Event::Persisted {
                        id: id.clone(),
                        result,
                    },
                );
            });
            return;
        }
        let write = write.clone();
        let recovering = d.recovering.remove(&id);
        self.tracker.spawn(async move {
            // Past the grace period of a shutdown an ending is given up: the
            // restarted agent reports the task interrupted.
            let stops = match &write {
                Write::Ended(_) => [&this.hard_stop, &this.hard_stop],
                _ => [&stop, &this.draining],
            };
            let finished_ms = now_ms();
            let change = |r: &mut TaskRecord| match &write {
                Write::New(state) => r.state = *state,
                Write::Running => r.state = TaskState::Running,
                Write::Ended(e) => {
                    r.state = e.state;
                    r.result = e.result.clone();
                    r.error = e.error.clone();
                    r.finished_ms = Some(finished_ms);
                }
            };
            let result = match recovering {
                // At start-up a store that cannot write fails the start, as it
                // always did, rather than hold the agent unready.
                Some(tx) => {
                    let written = this.store.update(&id, durable, change).await;
                    let result = written.as_ref().map(|_| ()).map_err(|e| e.to_string());
                    let _ = tx.send(written.map(|_| ()));
                    result
                }
                None => this
                    .write_through(&id, durable, stops, change)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        error!(atask_id = %id, "task store failed: {e}");
                        e.to_string()
                    }),
            };
            if durable {
                this.report(
                    &id,
                    Event::Persisted {
                        id: id.clone(),
                        result,
                    },
                );
            }
        });
    }

    /// Runs the task's procedure until it returns or `stop` is cancelled.
    async fn run(self: &Arc<Self>, id: &str, stop: CancellationToken) -> Ran {
        let rec = match self.store.get(id) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ran::Stopped,
            Err(e) => {
                warn!(atask_id = %id, "cannot read the task to start it: {e}");
                return Ran::Stopped;
            }
        };
        let procedure = match self.registry.get(&rec.procedure) {
            Ok(p) => p,
            Err(e) => {
                return Ran::Returned(ending(
                    &rec.procedure,
                    Err(RunError::BadArguments(e.to_string())),
                ))
            }
        };
        let ctx = RunContext {
            progress: self.progress_sink(id),
            env: self.task_marks(id),
        };
        let started = Instant::now();
        tokio::select! {
            biased;
            _ = stop.cancelled() => Ran::Stopped,
            r = procedure.run(&rec.args, ctx) => {
                crate::metrics::get()
                    .procedure_ran(&rec.procedure, started.elapsed().as_secs_f64());
                Ran::Returned(ending(&rec.procedure, r))
            }
        }
    }

    /// Asks the controller whether the attempt may still start (its lease ran out).
    async fn ask_start(&self, id: &str, stop: CancellationToken) -> StartAnswer {
        let rec = match self.store.get(id) {
            Ok(Some(rec)) => rec,
            _ => return StartAnswer::None,
        };
        let answer = tokio::select! {
            a = self.signals.confirm_start(&rec) => a,
            _ = stop.cancelled() => return StartAnswer::None,
            _ = self.draining.cancelled() => return StartAnswer::None,
        };
        match answer {
            Some(signals::StartAnswer::Go) => StartAnswer::Go,
            Some(signals::StartAnswer::Withdrawn) => {
                info!(atask_id = %id, "the controller withdrew this attempt; not starting it");
                StartAnswer::Withdrawn
            }
            None => StartAnswer::None,
        }
    }

    /// ATASK: validate, store durably, start. Idempotent by `atask_id`.
    ///
    /// The record is stored, and the write that makes it durable spawned, in one
    /// synchronous step with the core's decision: if this future is dropped (the
    /// connection broke before the answer), the task still becomes durable and
    /// runs, or fails and is removed — it is never stored and left waiting.
    pub async fn submit(
        self: &Arc<Self>,
        atask_id: Option<String>,
        procedure: String,
        args: Args,
        reply_to: Option<String>,
        lease_epoch: Option<u64>,
    ) -> Result<String, ProtocolError> {
        self.registry.get(&procedure)?.validate(&procedure, &args)?;
        let atask_id = atask_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let rec = TaskRecord {
            atask_id: atask_id.clone(),
            procedure,
            args,
            reply_to,
            state: TaskState::Queued,
            result: None,
            error: None,
            final_signal_answered: false,
            finished_ms: None,
        };
        let (tx, rx) = oneshot::channel();
        let now = {
            let mut d = self.driven();
            // Read under the lock every insert and delete of a task takes.
            let previous = self.store.get(&atask_id)?.map(|old| {
                if old.same_call(&rec.procedure, &rec.args) {
                    Previous::SameCall {
                        ended: old.state.is_final(),
                    }
                } else {
                    Previous::OtherCall
                }
            });
            let effects = self.step(
                &mut d,
                Event::Atask {
                    id: atask_id.clone(),
                    placed_in: lease_epoch,
                    previous,
                },
                Some(&rec),
            );
            let now = effects.into_iter().find_map(|e| match e {
                Effect::ReplyAtask { id, answer } if id == atask_id => Some(answer),
                _ => None,
            });
            if now.is_none() {
                d.replies.insert(atask_id.clone(), tx);
            }
            now
        };
        let answer = match now {
            Some(a) => a,
            None => rx.await.unwrap_or(Err(Refusal::ShuttingDown)),
        };
        answer.map(|()| atask_id.clone()).map_err(|r| match r {
            Refusal::ShuttingDown => ProtocolError::Internal("agent is shutting down".into()),
            Refusal::Full { limit } => ProtocolError::Internal(format!(
                "agent already holds {limit} unfinished tasks; try another agent"
            )),
            Refusal::IdReused => ProtocolError::TaskIdReused(atask_id.clone()),
            Refusal::StillClearing => ProtocolError::Internal(format!(
                "atask_id {atask_id:?} was just terminated and is still being cleared; try again"
            )),
            Refusal::NotDurable(e) => ProtocolError::Internal(e),
        })
    }

    /// Changes a stored task, durably or not, waiting out a store that cannot
    /// write for now (a full disk) until either token is cancelled: a task does not
    /// give up its start or its outcome because the disk was briefly full.
    async fn write_through(
        &self,
        id: &str,
        durable: bool,
        stop: [&CancellationToken; 2],
        change: impl Fn(&mut TaskRecord),
    ) -> Result<Option<TaskRecord>, StoreError> {
        let mut backoff = Backoff::new(STORE_RETRY);
        loop {
            match self.store.update(id, durable, &change).await {
                Err(e) if e.is_transient() => {
                    debug!(atask_id = %id, "waiting for the store: {e}");
                    let stopped = async {
                        tokio::select! {
                            _ = stop[0].cancelled() => {}
                            _ = stop[1].cancelled() => {}
                        }
                    };
                    if !backoff.wait_or(stopped).await {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// The environment that marks a task's programs as this agent's and this task's.
    fn task_marks(&self, atask_id: &str) -> Vec<(String, String)> {
        vec![
            (ENV_STORE.to_string(), self.store.id().to_string()),
            (ENV_TASK.to_string(), atask_id.to_string()),
        ]
    }

    fn progress_sink(self: &Arc<Self>, id: &str) -> ProgressSink {
        let this = Arc::downgrade(self);
        let id = id.to_string();
        Arc::new(move |progress: Progress| {
            let Some(this) = this.upgrade() else {
                return;
            };
            let mut d = this.driven();
            this.step(
                &mut d,
                Event::Progress {
                    id: id.clone(),
                    progress,
                },
                None,
            );
        })
    }

    /// GET: the task's status, progress and, once ended, its result or error.
    pub fn get(self: &Arc<Self>, id: &str) -> Result<Response, ProtocolError> {
        let rec = self
            .store
            .get(id)?
            .ok_or_else(|| ProtocolError::UnknownTask(id.to_string()))?;
        let effects = {
            let mut d = self.driven();
            self.step(&mut d, Event::Get { id: id.to_string() }, None)
        };
        let (running, progress) = effects
            .into_iter()
            .find_map(|e| match e {
                Effect::AnswerGet {
                    running, progress, ..
                } => Some((running, progress)),
                _ => None,
            })
            .unwrap_or((false, None));
        let data = GetData {
            atask_id: rec.atask_id.clone(),
            atask_status: rec.state.atask_status(),
            running: running && rec.state == TaskState::Running,
            result: match rec.state {
                TaskState::Done => Some(rec.result.clone().unwrap_or(Value::Null)),
                _ => None,
            },
            error: rec.error.clone(),
            progress,
        };
        let data =
            serde_json::to_value(&data).map_err(|e| ProtocolError::Internal(e.to_string()))?;
        Ok(match (&rec.state, &rec.error) {
            (TaskState::Failed | TaskState::ClientError, Some(e)) => Response {
                code: e.code,
                description: e.description.clone(),
                data,
            },
            _ => Response::ok(data),
        })
    }

    /// SIGNAL terminate: stop the task if it runs and delete it.
    pub fn terminate(self: &Arc<Self>, id: &str) -> Result<(), ProtocolError> {
        let effects = {
            let mut d = self.driven();
            let stored = self.store.remove(id)?;
            self.step(
                &mut d,
                Event::Terminate {
                    id: id.to_string(),
                    stored,
                },
                None,
            )
        };
        let known = effects
            .iter()
            .any(|e| matches!(e, Effect::AnswerTerminate { known: true, .. }));
        if !known {
            return Err(ProtocolError::UnknownTask(id.to_string()));
        }
        debug!(atask_id = %id, "terminated");
        Ok(())
    }

    /// TASK: run on a slot now and answer with the result.
    pub async fn run_sync(
        self: &Arc<Self>,
        procedure: &str,
        args: &Args,
        timeout: Option<Duration>,
    ) -> Result<Value, ProtocolError> {
        let p = self.registry.get(procedure)?;
        p.validate(procedure, args)?;
        let timeout = timeout.unwrap_or(DEFAULT_SYNC_TIMEOUT);
        let work = async {
            let (tx, rx) = oneshot::channel();
            // Gives the slot (or the place in line) back however this ends: a
            // timeout or shutdown drops this future.
            let ticket = {
                let mut d = self.driven();
                let ticket = d.next_ticket;
                d.next_ticket += 1;
                d.syncs.insert(ticket, tx);
                self.step(&mut d, Event::SyncAsked { ticket }, None);
                SyncTicket {
                    runner: self,
                    ticket,
                }
            };
            rx.await
                .map_err(|_| ProtocolError::Internal("agent is shutting down".into()))??;
            let started = Instant::now();
            let r = p.run(args, RunContext::detached()).await;
            crate::metrics::get().procedure_ran(procedure, started.elapsed().as_secs_f64());
            drop(ticket);
            r.map_err(|e| match e {
                RunError::BadArguments(reason) => ProtocolError::bad_args(procedure, reason),
                other => ProtocolError::Execution(other.to_string()),
            })
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, work) => r.map_err(|_| {
                ProtocolError::Execution(format!("timed out after {timeout:?}"))
            })?,
            _ = self.hard_stop.cancelled() => Err(ProtocolError::Execution(INTERRUPTED_BY_SHUTDOWN.into())),
        }
    }

    /// After a restart: queued tasks run, tasks that were running are interrupted,
    /// final SIGNALs never answered are sent again.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        let mut tasks = Vec::new();
        for rec in self.store.all() {
            match rec {
                Ok(r) => tasks.push(Stored {
                    id: r.atask_id,
                    state: r.state,
                    final_signal_answered: r.final_signal_answered,
                }),
                Err(e) => warn!("{e}"),
            }
        }
        let queued = tasks
            .iter()
            .filter(|t| t.state == TaskState::Queued)
            .count();
        let interrupted = tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .count();
        let resent = tasks
            .iter()
            .filter(|t| t.state.is_final() && !t.final_signal_answered)
            .count();
        let mut written = Vec::new();
        {
            let mut d = self.driven();
            for t in tasks.iter().filter(|t| t.state == TaskState::Running) {
                let (tx, rx) = oneshot::channel();
                d.recovering.insert(t.id.clone(), tx);
                written.push(rx);
            }
            self.step(&mut d, Event::Recovered { tasks }, None);
            d.recovering.clear();
        }
        // Recorded interrupted before the agent answers anyone: a GET finds the
        // task ended, not running.
        for rx in written {
            if let Ok(r) = rx.await {
                r?;
            }
        }
        if queued + interrupted + resent > 0 {
            info!(
                queued,
                interrupted, resent, "recovered tasks from the store"
            );
        }
        Ok(())
    }

    /// Stops every running task (and synchronous TASK) now; each is recorded as
    /// interrupted.
    pub fn interrupt(self: &Arc<Self>) {
        if !self.hard_stop.is_cancelled() {
            warn!(
                running = self.running(),
                "grace period over; interrupting running tasks"
            );
            self.hard_stop.cancel();
            let mut d = self.driven();
            self.step(&mut d, Event::Interrupt, None);
        }
    }

    /// Lets running tasks finish for up to `grace`, then interrupts the rest.
    /// Tasks still waiting for a slot stay queued in the store for the next start.
    pub async fn shutdown(self: &Arc<Self>, grace: Duration) {
        self.draining.cancel();
        {
            let mut d = self.driven();
            self.step(&mut d, Event::Shutdown, None);
        }
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.interrupt();
            self.tracker.wait().await;
        }
    }
}

/// How a procedure's return is stored.
fn ending(procedure: &str, r: Result<Value, RunError>) -> Ending {
    match r {
        Ok(v) => Ending {
            state: TaskState::Done,
            result: Some(v),
            error: None,
        },
        Err(e @ RunError::BadArguments(_)) => Ending {
            state: TaskState::ClientError,
            result: None,
            error: Some(e.to_task_error(procedure)),
        },
        Err(e) => Ending {
            state: TaskState::Failed,
            result: None,
            error: Some(e.to_task_error(procedure)),
        },
    }
}

/// `data` of an ATASK answer.
pub fn accepted_data(atask_id: &str) -> Value {
    json!({ "atask_id": atask_id })
}
