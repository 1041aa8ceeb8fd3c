//! The agent's task runner: accepts tasks into the store, runs them on `capacity`
//! slots (more wait in FIFO order), follows their progress, and records how each
//! ended before signalling the controller. Also answers GET, `terminate`, and TASK.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::lease::{AcceptedUnder, Lease};
use super::procedures::{kill_marked_processes, ProgressSink, Registry, RunContext, RunError};
use super::signals::{SignalSender, StartAnswer};
use super::store::{AgentStore, Inserted, StoreError, TaskRecord, TaskState};
use crate::arpcp::{Args, Code, GetData, Progress, ProtocolError, Response, TaskError};
use crate::retry::{Backoff, Policy};

/// Environment variables that mark a program as started for a task of this agent
/// (`ARPCP_AGENT_STORE` names the agent's store; `ARPCP_ATASK_ID` the task).
pub const ENV_STORE: &str = "ARPCP_AGENT_STORE";
pub const ENV_TASK: &str = "ARPCP_ATASK_ID";

/// Unfinished tasks an agent holds at once; ATASK beyond it is refused (300), so a
/// flood of requests cannot grow memory without bound.
pub const MAX_UNFINISHED_TASKS: usize = 100_000;
/// Progress SIGNALs of one task are sent at most this often.
pub const PROGRESS_SIGNAL_INTERVAL: Duration = Duration::from_millis(200);
/// A task's durable write to a store that cannot write for now (a full disk) is
/// tried again after 100 ms, doubling up to 2 s, until it succeeds or the task stops.
pub const STORE_RETRY: Policy =
    Policy::doubling(Duration::from_millis(100), Duration::from_secs(2));
/// Default limit of a synchronous TASK that names none.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// What the runner knows about a task that has not ended.
struct Live {
    terminate: CancellationToken,
    running: bool,
    progress: Option<Progress>,
    last_progress_signal: Option<Instant>,
}

impl Live {
    fn new(terminate: CancellationToken) -> Live {
        Live {
            terminate,
            running: false,
            progress: None,
            last_progress_signal: None,
        }
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

pub struct TaskRunner {
    store: AgentStore,
    registry: Arc<Registry>,
    signals: SignalSender,
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<String, Live>>,
    running: AtomicU32,
    tracker: TaskTracker,
    /// Tasks waiting for a slot stop waiting (and stay queued in the store).
    draining: CancellationToken,
    /// Running tasks stop and are recorded as interrupted.
    hard_stop: CancellationToken,
}

enum Outcome {
    Finished(Result<Value, RunError>),
    Terminated,
    Interrupted(&'static str),
}

/// One procedure counted in `TaskRunner::running` while this lives.
struct RunningGuard<'a>(&'a AtomicU32);

impl<'a> RunningGuard<'a> {
    fn new(running: &'a AtomicU32) -> Self {
        running.fetch_add(1, Ordering::Relaxed);
        RunningGuard(running)
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
            slots: Arc::new(Semaphore::new(capacity.max(1) as usize)),
            live: Mutex::new(HashMap::new()),
            running: AtomicU32::new(0),
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
        self.running.load(Ordering::Relaxed)
    }

    /// Tasks running (synchronous TASKs included) and tasks waiting for a slot.
    pub fn counts(&self) -> (i64, i64) {
        let queued = self.live().values().filter(|l| !l.running).count();
        (i64::from(self.running()), queued as i64)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// ATASK: validate, store durably, start. Idempotent by `atask_id`.
    ///
    /// The record, its live entry and the task that makes it durable and runs it
    /// are set up with no await in between: if this future is dropped (the
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
        if self.draining.is_cancelled() {
            return Err(ProtocolError::Internal("agent is shutting down".into()));
        }
        if self.live().len() >= MAX_UNFINISHED_TASKS {
            return Err(ProtocolError::Internal(format!(
                "agent already holds {MAX_UNFINISHED_TASKS} unfinished tasks; try another agent"
            )));
        }
        let atask_id = atask_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let under = self.lease().accepting(lease_epoch, Instant::now());
        // With a free slot, and nothing to ask the controller first, the task is
        // stored as running at once: one durable write covers its acceptance and
        // its start.
        let slot = match under {
            AcceptedUnder::Ask => None,
            _ => self.slots.clone().try_acquire_owned().ok(),
        };
        let rec = TaskRecord {
            atask_id: atask_id.clone(),
            procedure,
            args,
            reply_to,
            state: if slot.is_some() {
                TaskState::Running
            } else {
                TaskState::Queued
            },
            result: None,
            error: None,
            final_signal_answered: false,
            finished_ms: None,
        };
        let terminate = CancellationToken::new();
        let inserted = {
            // Under the lock `terminate` takes: it sees the task either not yet
            // stored or stored with its live entry.
            let mut live = self.live();
            let inserted = self.store.insert_new(&rec)?;
            if let Inserted::New = inserted {
                live.insert(rec.atask_id.clone(), Live::new(terminate.clone()));
            }
            inserted
        };
        match inserted {
            Inserted::New => {
                let (durable_tx, durable) = oneshot::channel();
                self.launch(rec, slot, under, terminate, Some(durable_tx));
                match durable.await {
                    Ok(Ok(())) => Ok(atask_id),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(ProtocolError::Internal("agent is shutting down".into())),
                }
            }
            Inserted::Existing(old) if old.same_call(&rec.procedure, &rec.args) => {
                // A controller repeating an ATASK may have lost what we told it
                // (it crashed before storing): tell it again how the task ended.
                if old.state.is_final() {
                    let again = self
                        .store
                        .update(&atask_id, false, |r| r.final_signal_answered = false)
                        .await?;
                    if let Some(rec) = again {
                        self.signals.finished(&rec);
                    }
                }
                Ok(atask_id)
            }
            Inserted::Existing(_) => Err(ProtocolError::TaskIdReused(atask_id)),
        }
    }

    /// A task stored by an earlier process of this agent, waiting to run.
    fn resume(self: &Arc<Self>, rec: TaskRecord) {
        let terminate = CancellationToken::new();
        {
            // Under the same lock as `terminate`: a task deleted meanwhile stays so.
            let mut live = self.live();
            if !matches!(self.store.get(&rec.atask_id), Ok(Some(_))) {
                return;
            }
            live.insert(rec.atask_id.clone(), Live::new(terminate.clone()));
        }
        self.launch(rec, None, AcceptedUnder::Ask, terminate, None);
    }

    /// Runs a stored task with a live entry in a task of its own. With `durable`,
    /// first waits for its record to reach disk and reports that (a failure
    /// removes the task: the ATASK is answered with the error and nothing runs).
    fn launch(
        self: &Arc<Self>,
        rec: TaskRecord,
        slot: Option<OwnedSemaphorePermit>,
        under: AcceptedUnder,
        terminate: CancellationToken,
        durable: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) {
        let this = self.clone();
        self.tracker.spawn(async move {
            let id = rec.atask_id.clone();
            if let Some(report) = durable {
                let stored = this.store.commit().await;
                if let Err(e) = &stored {
                    error!(atask_id = %id, "cannot make the task durable: {e}");
                    this.forget(&id);
                    let _ = report.send(stored);
                    return;
                }
                let _ = report.send(Ok(()));
            }
            if let Err(e) = this.execute(rec, terminate, slot, under).await {
                error!(atask_id = %id, "task store failed: {e}");
            }
            this.live().remove(&id);
        });
    }

    /// Removes a task and its live entry.
    fn forget(&self, id: &str) {
        let mut live = self.live();
        live.remove(id);
        if let Err(e) = self.store.remove(id) {
            warn!(atask_id = %id, "cannot remove the task: {e}");
        }
    }

    /// Asks the controller whether the attempt may still start (its lease ran
    /// out): `true` to go; `false` when it was withdrawn (then forgotten), or when
    /// the task is terminated, the agent drains, or no answer comes.
    async fn confirm_start(&self, rec: &TaskRecord, terminate: &CancellationToken) -> bool {
        let answer = tokio::select! {
            a = self.signals.confirm_start(rec) => a,
            _ = terminate.cancelled() => return false,
            _ = self.draining.cancelled() => return false,
        };
        match answer {
            Some(StartAnswer::Go) => true,
            Some(StartAnswer::Withdrawn) => {
                info!(atask_id = %rec.atask_id, "the controller withdrew this attempt; not starting it");
                self.forget(&rec.atask_id);
                false
            }
            None => false,
        }
    }

    async fn execute(
        self: &Arc<Self>,
        rec: TaskRecord,
        terminate: CancellationToken,
        slot: Option<OwnedSemaphorePermit>,
        under: AcceptedUnder,
    ) -> Result<(), StoreError> {
        let permit = match slot.map_or_else(|| self.slots.clone().try_acquire_owned(), Ok) {
            Ok(p) => p,
            Err(_) => {
                self.signals.accepted(&rec);
                tokio::select! {
                    p = self.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return Ok(()),
                    },
                    _ = terminate.cancelled() => return Ok(()),
                    _ = self.draining.cancelled() => return Ok(()),
                }
            }
        };
        let id = rec.atask_id.clone();
        // The lease it was accepted under ran out (a pause, a partition, a
        // restart): the controller may have placed it elsewhere meanwhile.
        let mut confirmed = false;
        if !self.lease().may_start(under, Instant::now()) {
            if !self.confirm_start(&rec, &terminate).await {
                return Ok(());
            }
            confirmed = true;
        }
        // Durable before the procedure starts: after a crash it is reported
        // interrupted, never silently run a second time.
        let rec = if rec.state == TaskState::Running {
            rec
        } else {
            let started = self
                .write_through(&id, [&terminate, &self.draining], |r| {
                    r.state = TaskState::Running
                })
                .await?;
            match started {
                Some(rec) => rec,
                None => return Ok(()),
            }
        };
        // Again after that write, which may have waited for the disk (or the
        // process been paused during it): deciding before it and starting after
        // would start an attempt the controller withdrew once the lease ended.
        if !confirmed
            && !self.lease().may_start(under, Instant::now())
            && !self.confirm_start(&rec, &terminate).await
        {
            return Ok(());
        }
        if let Some(l) = self.live().get_mut(&id) {
            l.running = true;
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let outcome = match self.registry.get(&rec.procedure) {
            Err(e) => Outcome::Finished(Err(RunError::BadArguments(e.to_string()))),
            Ok(procedure) => {
                let ctx = RunContext {
                    progress: self.progress_sink(&rec),
                    env: self.task_marks(&rec.atask_id),
                };
                // `accepted` with progress: the controller learns the task runs.
                self.signals.progress(
                    &rec,
                    Progress {
                        percent: 0.0,
                        comment: "started".into(),
                    },
                );
                let started = Instant::now();
                tokio::select! {
                    biased;
                    _ = terminate.cancelled() => Outcome::Terminated,
                    _ = self.hard_stop.cancelled() => Outcome::Interrupted("agent shut down before the task finished"),
                    r = procedure.run(&rec.args, ctx) => {
                        crate::metrics::get()
                            .procedure_ran(&rec.procedure, started.elapsed().as_secs_f64());
                        Outcome::Finished(r)
                    }
                }
            }
        };
        self.running.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        let (state, result, error) = match outcome {
            Outcome::Terminated => return Ok(()),
            Outcome::Finished(Ok(v)) => (TaskState::Done, Some(v), None),
            Outcome::Finished(Err(e @ RunError::BadArguments(_))) => (
                TaskState::ClientError,
                None,
                Some(e.to_task_error(&rec.procedure)),
            ),
            Outcome::Finished(Err(e)) => (
                TaskState::Failed,
                None,
                Some(e.to_task_error(&rec.procedure)),
            ),
            Outcome::Interrupted(why) => (
                TaskState::Interrupted,
                None,
                Some(TaskError {
                    code: Code::Execution,
                    description: why.into(),
                }),
            ),
        };
        let finished_ms = now_ms();
        // Past the grace period of a shutdown the outcome is given up: the restarted
        // agent reports the task interrupted.
        let done = self
            .write_through(&id, [&self.hard_stop, &self.hard_stop], |r| {
                r.state = state;
                r.result = result.clone();
                r.error = error.clone();
                r.finished_ms = Some(finished_ms);
            })
            .await?;
        if let Some(rec) = done {
            self.signals.finished(&rec);
        }
        Ok(())
    }

    /// Changes a stored task durably, waiting out a store that cannot write for now
    /// (a full disk) until either token is cancelled: a task does not give up its
    /// start or its outcome because the disk was briefly full.
    async fn write_through(
        &self,
        id: &str,
        stop: [&CancellationToken; 2],
        change: impl Fn(&mut TaskRecord),
    ) -> Result<Option<TaskRecord>, StoreError> {
        let mut backoff = Backoff::new(STORE_RETRY);
        loop {
            match self.store.update(id, true, &change).await {
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

    fn progress_sink(self: &Arc<Self>, rec: &TaskRecord) -> ProgressSink {
        let this = Arc::downgrade(self);
        let rec = rec.clone();
        Arc::new(move |p: Progress| {
            let Some(this) = this.upgrade() else {
                return;
            };
            let send = {
                let mut live = this.live();
                let Some(l) = live.get_mut(&rec.atask_id) else {
                    return;
                };
                l.progress = Some(p.clone());
                let due = l
                    .last_progress_signal
                    .is_none_or(|t| t.elapsed() >= PROGRESS_SIGNAL_INTERVAL);
                if due {
                    l.last_progress_signal = Some(Instant::now());
                }
                due
            };
            if send {
                this.signals.progress(&rec, p);
            }
        })
    }

    /// GET: the task's status, progress and, once ended, its result or error.
    pub fn get(&self, id: &str) -> Result<Response, ProtocolError> {
        let rec = self
            .store
            .get(id)?
            .ok_or_else(|| ProtocolError::UnknownTask(id.to_string()))?;
        let (running, progress) = match self.live().get(id) {
            Some(l) => (l.running, l.progress.clone()),
            None => (false, None),
        };
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
    pub fn terminate(&self, id: &str) -> Result<(), ProtocolError> {
        let (live, stored) = {
            let mut live = self.live();
            (live.remove(id), self.store.remove(id)?)
        };
        if let Some(l) = &live {
            l.terminate.cancel();
        }
        if live.is_none() && !stored {
            return Err(ProtocolError::UnknownTask(id.to_string()));
        }
        debug!(atask_id = %id, "terminated");
        Ok(())
    }

    /// TASK: run on a slot now and answer with the result.
    pub async fn run_sync(
        &self,
        procedure: &str,
        args: &Args,
        timeout: Option<Duration>,
    ) -> Result<Value, ProtocolError> {
        let p = self.registry.get(procedure)?;
        p.validate(procedure, args)?;
        let timeout = timeout.unwrap_or(DEFAULT_SYNC_TIMEOUT);
        let work = async {
            let _permit = self
                .slots
                .acquire()
                .await
                .map_err(|_| ProtocolError::Internal("agent is shutting down".into()))?;
            // Counted down on drop too: a timeout or shutdown drops this future.
            let _running = RunningGuard::new(&self.running);
            let started = Instant::now();
            let r = p.run(args, RunContext::detached()).await;
            crate::metrics::get().procedure_ran(procedure, started.elapsed().as_secs_f64());
            r.map_err(|e| match e {
                RunError::BadArguments(reason) => ProtocolError::bad_args(procedure, reason),
                other => ProtocolError::Execution(other.to_string()),
            })
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, work) => r.map_err(|_| {
                ProtocolError::Execution(format!("timed out after {timeout:?}"))
            })?,
            _ = self.hard_stop.cancelled() => Err(ProtocolError::Execution("agent shut down before the task finished".into())),
        }
    }

    /// After a restart: queued tasks run, tasks that were running are interrupted,
    /// final SIGNALs never answered are sent again.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        let (mut queued, mut interrupted, mut resent) = (0, 0, 0);
        for rec in self.store.all() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    warn!("{e}");
                    continue;
                }
            };
            match rec.state {
                TaskState::Queued => {
                    queued += 1;
                    self.resume(rec);
                }
                TaskState::Running => {
                    interrupted += 1;
                    // Its program may have outlived the agent's crash: a task
                    // reported interrupted must not go on running.
                    let killed = kill_marked_processes(&self.task_marks(&rec.atask_id));
                    if killed > 0 {
                        info!(atask_id = %rec.atask_id, killed, "stopped the processes a crash left running");
                    }
                    let err = TaskError {
                        code: Code::Execution,
                        description: "agent stopped while the task was running".into(),
                    };
                    if let Some(rec) = self
                        .store
                        .update(&rec.atask_id, true, |r| {
                            r.state = TaskState::Interrupted;
                            r.error = Some(err.clone());
                            r.finished_ms = Some(now_ms());
                        })
                        .await?
                    {
                        self.signals.finished(&rec);
                    }
                }
                _ if !rec.final_signal_answered => {
                    resent += 1;
                    self.signals.finished(&rec);
                }
                _ => {}
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
    pub fn interrupt(&self) {
        if !self.hard_stop.is_cancelled() {
            warn!(
                running = self.running(),
                "grace period over; interrupting running tasks"
            );
            self.hard_stop.cancel();
        }
    }

    /// Lets running tasks finish for up to `grace`, then interrupts the rest.
    /// Tasks still waiting for a slot stay queued in the store for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.draining.cancel();
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

/// `data` of an ATASK answer.
pub fn accepted_data(atask_id: &str) -> Value {
    json!({ "atask_id": atask_id })
}
