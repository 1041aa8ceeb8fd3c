//! Task placement and follow-up. Places queued tasks on agents (ATASK with an
//! `atask_id` of `<task_id>.<attempt>` and our `reply_to`), turns agents' SIGNALs
//! into stored status changes, fetches results with GET after `done`, stores them
//! durably and only then tells the agent to `terminate` its copy. Also applies the
//! failure policy when an agent leaves the cluster, and reconciles placed tasks
//! after a restart or when nothing was heard of them for a while.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::lease::Leases;
use super::membership::{Membership, MembershipEvent, NoPlacement};
use super::model::{
    now_ms, parse_atask_id, AgentRecord, AgentState, Outcome, TaskRecord, TaskStatus,
};
use super::store::{GatewayStore, StoreError};
use super::watch::TaskWatchers;
use super::GatewayError;
use crate::arpcp::{
    ArpcpClient, AtaskStatus, ClientError, Code, GetData, Progress, ProtocolError, Request,
    Response, SignalRequest,
};

/// Task ids waiting for placement in memory; when full, the sweep finds the rest
/// in the store.
pub const DISPATCH_QUEUE_LEN: usize = 16 * 1024;
/// ATASK exchanges in flight at once.
pub const MAX_CONCURRENT_DISPATCHES: usize = 512;
/// How often queued tasks are retried and quiet tasks reconciled.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// Reconciliations (GET of a quiet task) a sweep runs at once.
pub const MAX_CONCURRENT_RECONCILES: usize = 256;
/// A placed task not heard of for this long is asked about (GET).
pub const RECONCILE_AFTER: Duration = Duration::from_secs(10);
/// Tries of a `terminate` SIGNAL to an agent.
pub const TERMINATE_TRIES: u32 = 5;
/// Tries of a GET after a `done` SIGNAL before leaving it to reconciliation.
pub const COLLECT_TRIES: u32 = 3;
/// Attempts an agent said it does not hold, waiting for its lease to end before
/// their task goes back to the queue. Beyond this, such a task stays placed and a
/// later reconciliation asks again.
pub const MAX_DEFERRED_REQUEUES: usize = 16 * 1024;
/// Default limit of a synchronous call.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

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

pub struct Scheduler {
    store: GatewayStore,
    membership: Arc<Membership>,
    watchers: Arc<TaskWatchers>,
    client: ArpcpClient,
    /// Our ARPCP address for agents' SIGNALs.
    reply_to: String,
    queue: mpsc::Sender<String>,
    /// Tasks that have not ended (so sweeps need not scan the store).
    open: Mutex<HashSet<String>>,
    dispatch_slots: Arc<Semaphore>,
    leases: Arc<Leases>,
    /// Collections under way, by `atask_id`; `true`: run once more when done.
    collecting: Mutex<HashMap<String, bool>>,
    reconcile_slots: Arc<Semaphore>,
    /// `atask_id`s re-queued once their agent's lease ends (see `unknown_to_agent`).
    deferred_requeues: Mutex<HashSet<String>>,
    /// Ends those waits when the scheduler stops: a re-queue is not durable anyway,
    /// and reconciliation after the restart decides again.
    stopping: CancellationToken,
    tracker: TaskTracker,
}

impl Scheduler {
    pub fn new(
        store: GatewayStore,
        membership: Arc<Membership>,
        watchers: Arc<TaskWatchers>,
        leases: Arc<Leases>,
        reply_to: String,
        tls: Option<crate::arpcp::tls::ClientTls>,
    ) -> (Arc<Self>, mpsc::Receiver<String>) {
        let (queue, rx) = mpsc::channel(DISPATCH_QUEUE_LEN);
        let s = Scheduler {
            store,
            membership,
            watchers,
            client: ArpcpClient::default().with_tls(tls),
            reply_to,
            queue,
            open: Mutex::new(HashSet::new()),
            dispatch_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_DISPATCHES)),
            leases,
            collecting: Mutex::new(HashMap::new()),
            reconcile_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_RECONCILES)),
            deferred_requeues: Mutex::new(HashSet::new()),
            stopping: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        (Arc::new(s), rx)
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to a stored task, keeps the bookkeeping (open tasks, agent
    /// load) in step and tells watchers. `None` for an unknown task; the flag says
    /// whether `change` changed anything.
    fn save(
        &self,
        task_id: &str,
        change: impl FnMut(&mut TaskRecord) -> bool,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        let mut change = change;
        let mut before: Option<(TaskStatus, Option<String>)> = None;
        let out = self.store.update_task(task_id, |t| {
            before = Some((t.status, t.agent_id.clone()));
            change(t)
        })?;
        if let (Some((t, true)), Some((status, agent))) = (&out, before) {
            let was_on = agent.filter(|_| status.is_placed());
            let now_on = t.agent_id.clone().filter(|_| t.status.is_placed());
            if was_on != now_on {
                if let Some(a) = &was_on {
                    self.membership.task_left(a);
                }
                if let Some(a) = &now_on {
                    self.membership.task_placed(a);
                }
            }
            if t.status.is_final() && !status.is_final() {
                task_ended(t);
            }
            if t.status.is_final() {
                self.open().remove(task_id);
            } else {
                self.open().insert(task_id.to_string());
            }
            self.watchers.publish(t);
        }
        Ok(out)
    }

    async fn save_durable(
        &self,
        task_id: &str,
        change: impl FnMut(&mut TaskRecord) -> bool,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        let out = self.save(task_id, change)?;
        if matches!(out, Some((_, true))) {
            self.store.commit().await?;
        }
        Ok(out)
    }

    fn enqueue(&self, task_id: &str) {
        // A full queue is fine: the sweep finds queued tasks in the open set.
        let _ = self.queue.try_send(task_id.to_string());
    }

    fn placement(
        &self,
        procedure: &str,
        requested: Option<&str>,
    ) -> Result<Arc<AgentRecord>, GatewayError> {
        self.membership
            .pick(procedure, requested)
            .map_err(|e| match e {
                NoPlacement::NoAgents => GatewayError::NoAliveAgent,
                NoPlacement::NotOffered {
                    procedure,
                    offered_elsewhere,
                } => GatewayError::ProcedureNotOffered {
                    procedure,
                    offered_elsewhere,
                },
                NoPlacement::Requested(e) => e,
            })
    }

    /// Whether the agents describe `procedure` as an Opal model (its result is a
    /// table). Asked again when a result arrives: a call submitted before the
    /// gateway had the agents' catalog is recognised then.
    fn is_opal(&self, procedure: &str) -> bool {
        self.membership
            .kind_of(procedure)
            .is_some_and(|(kind, _)| kind == crate::arpcp::ProcedureKind::Opal)
    }

    /// Stores a new task durably and queues it for placement. Refused at once when
    /// no agent could run it now.
    pub async fn submit(
        self: &Arc<Self>,
        mut task: TaskRecord,
    ) -> Result<TaskRecord, GatewayError> {
        let agent = self.placement(&task.procedure, task.requested_agent_id.as_deref())?;
        // Placed in the same durable write that stores it: one flush per Submit,
        // and no ATASK ever goes out for a placement the store could forget (after
        // a crash the gateway would place it again, maybe on another agent).
        task.dispatch(&agent.agent_id);
        self.store.put_task(&task)?;
        crate::metrics::get().task_submitted(&task.procedure);
        self.open().insert(task.task_id.clone());
        self.membership.task_placed(&agent.agent_id);
        // The rest goes on if the client goes away during the wait for disk.
        let this = self.clone();
        let stored = self.tracker.spawn(async move {
            this.store.commit().await?;
            let (sender, placed) = (this.clone(), task.clone());
            this.tracker.spawn(async move {
                // Bounded like every dispatch (see `run`).
                let Ok(_slot) = sender.dispatch_slots.acquire().await else {
                    return;
                };
                sender.send_atask(placed, agent).await
            });
            Ok::<_, GatewayError>(task)
        });
        match stored.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Runs a task with ARPCP TASK and returns it finished (or interrupted when the
    /// agent did not answer in time). Stored before the call and durable before the
    /// answer (the flush overlaps the agent's work); the outcome is written at once
    /// and flushed right after the answer (after a crash mid-call the task is found
    /// and marked interrupted).
    pub async fn submit_sync(
        self: &Arc<Self>,
        mut task: TaskRecord,
        timeout: Duration,
    ) -> Result<TaskRecord, GatewayError> {
        let agent = self.placement(&task.procedure, task.requested_agent_id.as_deref())?;
        task.sync = true;
        task.dispatch(&agent.agent_id);
        self.store.put_task(&task)?;
        crate::metrics::get().task_submitted(&task.procedure);
        self.open().insert(task.task_id.clone());
        self.membership.task_placed(&agent.agent_id);
        // The call goes on if the client goes away, so the task ends either way.
        let this = self.clone();
        let call = self
            .tracker
            .spawn(async move { this.run_sync(task, agent, timeout).await });
        match call.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn run_sync(
        &self,
        task: TaskRecord,
        agent: Arc<AgentRecord>,
        timeout: Duration,
    ) -> Result<TaskRecord, GatewayError> {
        let req = Request::Task {
            procedure: task.procedure.clone(),
            args: task.args.clone(),
            timeout_ms: Some(timeout.as_millis().max(1) as u64),
        };
        // A little longer than the agent's own limit, so its answer can arrive.
        let wait = timeout + Duration::from_secs(2);
        // The placed task becomes durable while the agent works on it: the answer
        // waits for both, so it costs the longer of the two, not their sum.
        let (answer, stored) =
            tokio::join!(self.call_agent(&agent, &req, wait), self.store.commit());
        stored?;
        let outcome = match answer {
            Ok(r) => outcome_of_task_response(r),
            Err(ClientError::Timeout { .. }) => Outcome::Interrupted(format!(
                "agent {} gave no answer within {wait:?}",
                agent.agent_id
            )),
            Err(e) => {
                if e.is_unreachable() {
                    self.membership.unreachable(&agent.agent_id);
                }
                Outcome::Interrupted(format!("agent {} unreachable: {e}", agent.agent_id))
            }
        };
        let attempt = task.attempt;
        let opal = self.is_opal(&task.procedure);
        let saved = self.save(&task.task_id, |t| {
            t.opal |= opal;
            t.finish(attempt, outcome.clone())
        })?;
        // The caller holds its result in the answer; the outcome reaches disk with
        // the next group commit, started now. (A crash in between leaves the task
        // marked interrupted after the restart.)
        let store = self.store.clone();
        self.tracker.spawn(async move {
            if let Err(e) = store.commit().await {
                warn!("cannot store a synchronous call's outcome: {e}");
            }
        });
        saved
            .map(|(t, _)| t)
            .ok_or_else(|| GatewayError::TaskNotFound(task.task_id.clone()))
    }

    /// Places one queued task.
    async fn dispatch(self: Arc<Self>, task_id: String) {
        if let Err(e) = self.try_dispatch(&task_id).await {
            warn!(%task_id, "dispatch failed: {e}");
        }
    }

    async fn try_dispatch(self: &Arc<Self>, task_id: &str) -> Result<(), StoreError> {
        let Some(task) = self.store.get_task(task_id)? else {
            return Ok(());
        };
        if task.status != TaskStatus::Queued {
            return Ok(());
        }
        let agent = match self.placement(&task.procedure, task.requested_agent_id.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                debug!(%task_id, "waiting for an agent: {e}");
                return Ok(());
            }
        };
        let Some((task, true)) = self.save(task_id, |t| t.dispatch(&agent.agent_id))? else {
            return Ok(());
        };
        // Durable before the agent hears of it: after a crash the gateway asks this
        // agent about the attempt instead of placing it again on another one.
        self.store.commit().await?;
        self.send_atask(task, agent).await;
        Ok(())
    }

    /// Sends the ATASK of a stored placement and handles the agent's answer.
    async fn send_atask(self: &Arc<Self>, task: TaskRecord, agent: Arc<AgentRecord>) {
        let task_id = task.task_id.clone();
        if let Err(e) = self.try_send_atask(&task, &agent).await {
            warn!(%task_id, "dispatch failed: {e}");
        }
    }

    async fn try_send_atask(
        self: &Arc<Self>,
        task: &TaskRecord,
        agent: &AgentRecord,
    ) -> Result<(), StoreError> {
        let task_id = task.task_id.as_str();
        let req = Request::Atask {
            procedure: task.procedure.clone(),
            args: task.args.clone(),
            atask_id: Some(task.atask_id()),
            reply_to: Some(self.reply_to.clone()),
            lease_epoch: Some(self.leases.epoch(&agent.agent_id)),
        };
        let attempt = task.attempt;
        let requeue = |reason: String| {
            let r = self.save(task_id, |t| {
                t.attempt == attempt && t.requeue(reason.clone())
            });
            if let Ok(Some((_, true))) = r {
                debug!(%task_id, "requeued: {reason}");
            }
            r.map(|_| ())
        };
        match self
            .call_agent(agent, &req, self.client.request_timeout())
            .await
        {
            Ok(r) if r.is_ok() => {
                // Cancelled while the ATASK was on its way: the cancel's terminate may
                // have reached the agent before it held the task. It holds it now.
                let cancelled = self
                    .store
                    .get_task(task_id)?
                    .is_some_and(|t| t.attempt == attempt && t.status == TaskStatus::Cancelled);
                if cancelled {
                    self.terminate_on(agent, task.atask_id()).await;
                }
            }
            Ok(r) => match r.code {
                Code::UnknownProcedure | Code::Internal => requeue(format!(
                    "agent {} refused the task ({}): {}",
                    agent.agent_id, r.code, r.description
                ))?,
                code => {
                    let outcome = Outcome::from_error(code.as_u16(), r.description);
                    self.save_durable(task_id, |t| t.finish(attempt, outcome.clone()))
                        .await?;
                }
            },
            Err(e) if e.is_unreachable() => {
                self.client.forget(&agent.address);
                self.membership.unreachable(&agent.agent_id);
                requeue(format!("agent {} unreachable: {e}", agent.agent_id))?;
            }
            // The agent may have stored it: reconciliation asks it later.
            Err(e) => warn!(%task_id, agent = %agent.agent_id, "no answer to ATASK: {e}"),
        }
        Ok(())
    }

    /// A SIGNAL from an agent. The answer grants the agent holding the attempt
    /// its lease (see `lease.rs`).
    pub async fn on_signal(
        self: &Arc<Self>,
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
        if let SignalSender::Certified { name, agent_id } = sender {
            self.check_sender(task_id, attempt, &sig.atask_id, name, agent_id)?;
        }
        if sig.status == AtaskStatus::Accepted && sig.start {
            return self.confirm_start(task_id, attempt, &sig).await;
        }
        if sig.status == AtaskStatus::Accepted {
            // One read-modify-write: checks the attempt and applies the progress.
            let mut holder = None;
            let saved = self.save(task_id, |t| {
                if attempt > t.attempt {
                    return false;
                }
                holder = t.agent_of_attempt(attempt).map(str::to_string);
                t.accepted(attempt, sig.progress.clone())
            })?;
            let holder = holder.filter(|_| saved.is_some()).ok_or_else(unknown)?;
            return Ok(self.granting(&holder));
        }
        let task = self.store.get_task(task_id)?.ok_or_else(unknown)?;
        if attempt > task.attempt {
            return Err(unknown());
        }
        let holder = task
            .agent_of_attempt(attempt)
            .map(str::to_string)
            .ok_or_else(unknown)?;
        let this = self.clone();
        self.tracker
            .spawn(async move { this.collect(Some(task), attempt).await });
        Ok(self.granting(&holder))
    }

    /// Refuses a SIGNAL about an attempt not placed on the agent the sender's
    /// certificate names, before anything is read into the task. The agent an
    /// attempt went to never changes, so checking ahead of the update is enough.
    fn check_sender(
        &self,
        task_id: &str,
        attempt: u32,
        atask_id: &str,
        name: &str,
        agent_id: Option<&str>,
    ) -> Result<(), ProtocolError> {
        let refuse = |placed| ProtocolError::NotYourTask {
            atask_id: atask_id.to_string(),
            name: name.to_string(),
            placed,
        };
        let Some(agent_id) = agent_id else {
            return Err(refuse("no agent is registered with that certificate"));
        };
        let task = self
            .store
            .get_task(task_id)?
            .ok_or_else(|| ProtocolError::UnknownTask(atask_id.to_string()))?;
        match task.agent_of_attempt(attempt) {
            Some(holder) if holder == agent_id => Ok(()),
            Some(_) => Err(refuse("it is placed on another agent")),
            None => Err(ProtocolError::UnknownTask(atask_id.to_string())),
        }
    }

    /// A request to `agent` at its address; over TLS only to the holder of the
    /// certificate it registered with, so whoever else holds that address now (a
    /// valid agent certificate of another name) never sees a task or sends a result.
    async fn call_agent(
        &self,
        agent: &AgentRecord,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.client
            .call_named(&agent.address, agent.certificate.as_deref(), req, timeout)
            .await
    }

    /// A 100 answer that grants `agent_id` its lease.
    fn granting(&self, agent_id: &str) -> Response {
        let g = self.leases.grant(agent_id, Instant::now());
        Response::ok(serde_json::json!({"lease_ms": g.lease_ms, "lease_epoch": g.lease_epoch}))
    }

    /// An agent asks whether it may start an attempt it accepted under a lease that
    /// no longer holds. Yes while the attempt is still the task's placement (the
    /// task then counts as running, durably, so it is never placed again); else
    /// the attempt was withdrawn.
    async fn confirm_start(
        self: &Arc<Self>,
        task_id: &str,
        attempt: u32,
        sig: &SignalRequest,
    ) -> Result<Response, ProtocolError> {
        let progress = sig.progress.clone().unwrap_or(Progress {
            percent: 0.0,
            comment: "starting".into(),
        });
        let mut verdict: Result<String, String> = Err("unknown".into());
        let saved = self
            .save_durable(task_id, |t| {
                verdict = match t.agent_of_attempt(attempt) {
                    _ if attempt != t.attempt => Err(format!(
                        "the task was placed again as attempt {}",
                        t.attempt
                    )),
                    _ if !t.status.is_placed() => {
                        Err(format!("the task is {:?}", t.status).to_lowercase())
                    }
                    Some(a) => Ok(a.to_string()),
                    None => Err("no agent holds it".into()),
                };
                verdict.is_ok() && t.accepted(attempt, Some(progress.clone()))
            })
            .await?;
        if saved.is_none() {
            return Err(ProtocolError::UnknownTask(sig.atask_id.clone()));
        }
        match verdict {
            Ok(holder) => Ok(self.granting(&holder)),
            Err(why) => Err(ProtocolError::AttemptWithdrawn {
                atask_id: sig.atask_id.clone(),
                why,
            }),
        }
    }

    /// Asks the agent of `attempt` about the task (GET) and stores what it says;
    /// once the result is durable, the agent is told to delete its copy.
    /// `task` is the stored task when the caller has just read it (only its
    /// history is used: which agent held `attempt`).
    ///
    /// At most one collection per attempt runs at once: a request for one already
    /// under way makes it run once more when it ends (a `done` SIGNAL may arrive
    /// while a reconciliation's GET still saw the task running).
    async fn collect(self: &Arc<Self>, task: Option<TaskRecord>, attempt: u32) {
        let Some(task) = task else { return };
        let key = format!("{}.{attempt}", task.task_id);
        {
            let mut collecting = self.collecting();
            if let Some(again) = collecting.get_mut(&key) {
                *again = true;
                return;
            }
            collecting.insert(key.clone(), false);
        }
        let mut task = Some(task);
        loop {
            let task_id = task.as_ref().map(|t| t.task_id.clone()).unwrap_or_default();
            if let Err(e) = self.try_collect(task.take(), attempt).await {
                warn!(%task_id, "cannot collect the result: {e}");
            }
            let again = {
                let mut collecting = self.collecting();
                let again = collecting.get(&key).copied().unwrap_or(false);
                if again {
                    collecting.insert(key.clone(), false);
                } else {
                    collecting.remove(&key);
                }
                again
            };
            if !again {
                return;
            }
            task = self.store.get_task(&task_id).ok().flatten();
        }
    }

    fn collecting(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.collecting.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn try_collect(
        self: &Arc<Self>,
        task: Option<TaskRecord>,
        attempt: u32,
    ) -> Result<(), StoreError> {
        let Some(task) = task else {
            return Ok(());
        };
        let task_id = task.task_id.as_str();
        let Some(agent) = task
            .agent_of_attempt(attempt)
            .and_then(|a| self.membership.get(a))
        else {
            return Ok(());
        };
        let atask_id = format!("{task_id}.{attempt}");
        let req = Request::Get {
            atask_id: atask_id.clone(),
        };
        let mut delay = Duration::from_millis(100);
        let mut response = None;
        for _ in 0..COLLECT_TRIES {
            match self
                .call_agent(&agent, &req, self.client.request_timeout())
                .await
            {
                Ok(r) => {
                    response = Some(r);
                    break;
                }
                Err(e) => {
                    debug!(%task_id, agent = %agent.agent_id, "GET failed: {e}");
                    self.client.forget(&agent.address);
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        let Some(r) = response else {
            return Ok(());
        };
        let outcome = match r.code {
            Code::UnknownTask => {
                self.unknown_to_agent(task_id, attempt, &agent.agent_id)?;
                return Ok(());
            }
            Code::Ok => {
                let Ok(data) = serde_json::from_value::<GetData>(r.data) else {
                    warn!(%task_id, agent = %agent.agent_id, "GET answered without valid data");
                    return Ok(());
                };
                match data.atask_status {
                    AtaskStatus::Accepted => {
                        self.save(task_id, |t| {
                            t.accepted(attempt, data.progress.clone());
                            t.updated_ms = now_ms();
                            true
                        })?;
                        return Ok(());
                    }
                    AtaskStatus::Done => Outcome::Done(data.result.unwrap_or(Value::Null)),
                    AtaskStatus::Interrupted | AtaskStatus::Terminate => Outcome::Interrupted(
                        data.error
                            .map(|e| e.description)
                            .unwrap_or_else(|| "interrupted on the agent".into()),
                    ),
                    AtaskStatus::ClientError => Outcome::ClientError {
                        code: data.error.as_ref().map_or(204, |e| e.code.as_u16()),
                        description: data.error.map(|e| e.description).unwrap_or_default(),
                    },
                }
            }
            code => Outcome::from_error(code.as_u16(), r.description),
        };
        let opal = self.is_opal(&task.procedure);
        self.save_durable(task_id, |t| {
            t.opal |= opal;
            t.finish(attempt, outcome.clone())
        })
        .await?;
        // Durable (or the task ended otherwise): the agent's copy is not needed.
        self.terminate_on(&agent, atask_id).await;
        Ok(())
    }

    /// The agent of `attempt` answered that it does not hold it. A started attempt
    /// is interrupted. One not started may still be on its way to the agent (an
    /// ATASK of an earlier process of ours, or one overtaken on another connection)
    /// and be started unasked under the lease the agent holds: the agent moves to a
    /// new epoch at once (once that lease ends, the attempt must ask, and is refused
    /// if the task was placed again), and the task goes back to the queue only when
    /// that lease has ended, and only if the attempt has not started meanwhile.
    fn unknown_to_agent(
        self: &Arc<Self>,
        task_id: &str,
        attempt: u32,
        agent_id: &str,
    ) -> Result<(), StoreError> {
        let why = format!("agent {agent_id} no longer has the task");
        let mut waiting = false;
        self.save(task_id, |t| {
            if t.attempt != attempt || t.sync || !t.status.is_placed() {
                return false;
            }
            if t.status == TaskStatus::Dispatched {
                waiting = true;
                return false;
            }
            t.interrupt(why.clone())
        })?;
        if !waiting {
            return Ok(());
        }
        let ends = self.leases.fence(agent_id);
        if ends <= Instant::now() {
            return self.requeue_unheld(task_id, attempt, why);
        }
        let key = format!("{task_id}.{attempt}");
        {
            let mut deferred = self.deferred_requeues();
            if deferred.contains(&key) || deferred.len() >= MAX_DEFERRED_REQUEUES {
                return Ok(());
            }
            deferred.insert(key.clone());
        }
        debug!(%task_id, attempt, agent_id, "the agent does not hold the attempt; re-queued once its lease ends");
        let (this, task_id) = (self.clone(), task_id.to_string());
        self.tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(ends.into()) => {
                    if let Err(e) = this.requeue_unheld(&task_id, attempt, why) {
                        warn!(%task_id, "cannot re-queue the task: {e}");
                    }
                }
                _ = this.stopping.cancelled() => {}
            }
            this.deferred_requeues().remove(&key);
        });
        Ok(())
    }

    /// Puts a task back in the queue if `attempt` is still its placement and has
    /// not started (`requeue` changes nothing otherwise).
    fn requeue_unheld(&self, task_id: &str, attempt: u32, why: String) -> Result<(), StoreError> {
        let requeued = self.save(task_id, |t| {
            t.attempt == attempt && !t.sync && t.requeue(why.clone())
        })?;
        if let Some((_, true)) = requeued {
            self.enqueue(task_id);
        }
        Ok(())
    }

    fn deferred_requeues(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.deferred_requeues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn terminate_on(&self, agent: &AgentRecord, atask_id: String) {
        let req = Request::Signal(SignalRequest {
            atask_id: atask_id.clone(),
            status: AtaskStatus::Terminate,
            progress: None,
            agent_id: None,
            error: None,
            start: false,
        });
        let mut delay = Duration::from_millis(100);
        for _ in 0..TERMINATE_TRIES {
            match self
                .call_agent(agent, &req, self.client.request_timeout())
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    debug!(%atask_id, agent = %agent.agent_id, "terminate not delivered: {e}");
                    self.client.forget(&agent.address);
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        warn!(%atask_id, agent = %agent.agent_id, "agent keeps its copy of the task: terminate not delivered");
    }

    /// CancelTask: marks the task cancelled (durably) and stops it on its agent.
    pub async fn cancel(self: &Arc<Self>, task_id: &str) -> Result<TaskRecord, GatewayError> {
        let before = self
            .store
            .get_task(task_id)?
            .ok_or_else(|| GatewayError::TaskNotFound(task_id.to_string()))?;
        let (task, changed) = self
            .save_durable(task_id, |t| t.cancel())
            .await?
            .ok_or_else(|| GatewayError::TaskNotFound(task_id.to_string()))?;
        if changed && before.status.is_placed() && !before.sync {
            if let Some(agent) = before
                .agent_id
                .as_deref()
                .and_then(|a| self.membership.get(a))
            {
                let this = self.clone();
                let atask_id = before.atask_id();
                self.tracker
                    .spawn(async move { this.terminate_on(&agent, atask_id).await });
            }
        }
        Ok(task)
    }

    /// The failure policy for an agent that left the cluster: its tasks that had
    /// not started go back to the queue; those that were running are interrupted
    /// (a result the agent delivers later is still taken). Waiting tasks are
    /// withdrawn only once the agent's lease has ended (until then it may still
    /// start them unasked), so this may run again later.
    fn agent_gone(self: &Arc<Self>, agent_id: &str) {
        if self
            .membership
            .get(agent_id)
            .is_some_and(|a| a.state != AgentState::Gone)
        {
            return; // Back meanwhile: its tasks stay its own.
        }
        if let Err(ends) = self.leases.withdraw(agent_id, Instant::now()) {
            let (this, agent) = (self.clone(), agent_id.to_string());
            self.tracker.spawn(async move {
                tokio::time::sleep_until(ends.into()).await;
                this.agent_gone(&agent);
            });
            return;
        }
        let ids: Vec<String> = self.open().iter().cloned().collect();
        let (mut requeued, mut interrupted) = (0, 0);
        for id in ids {
            let r = self.save(&id, |t| {
                if t.agent_id.as_deref() != Some(agent_id) || t.sync {
                    return false;
                }
                match t.status {
                    TaskStatus::Dispatched => t.requeue(format!(
                        "agent {agent_id} left the cluster before starting the task"
                    )),
                    TaskStatus::Running => t.interrupt(format!(
                        "agent {agent_id} left the cluster while running the task"
                    )),
                    _ => false,
                }
            });
            match r {
                Ok(Some((t, true))) if t.status == TaskStatus::Queued => {
                    requeued += 1;
                    self.enqueue(&id);
                }
                Ok(Some((_, true))) => interrupted += 1,
                Ok(_) => {}
                Err(e) => warn!(task_id = %id, "{e}"),
            }
        }
        if requeued + interrupted > 0 {
            info!(
                agent_id,
                requeued, interrupted, "applied the policy for an agent that left"
            );
        }
    }

    /// Queues what waits for an agent; asks agents about placed tasks not heard of
    /// for a while.
    fn sweep(self: &Arc<Self>, reconcile_all: bool) {
        let ids: Vec<String> = self.open().iter().cloned().collect();
        let now = now_ms();
        let quiet = RECONCILE_AFTER.as_millis() as u64;
        for id in ids {
            let t = match self.store.get_task(&id) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    self.open().remove(&id);
                    continue;
                }
                // The store cannot be read now (reopening after a write error): the
                // task stays open for the next sweep.
                Err(_) => continue,
            };
            match t.status {
                TaskStatus::Queued
                    if now.saturating_sub(t.updated_ms) >= SWEEP_INTERVAL.as_millis() as u64
                        || reconcile_all =>
                {
                    self.enqueue(&id)
                }
                s if s.is_placed()
                    && !t.sync
                    && (reconcile_all || now.saturating_sub(t.updated_ms) >= quiet) =>
                {
                    // Bounded: what finds no permit is asked about by a later sweep.
                    let Ok(permit) = self.reconcile_slots.clone().try_acquire_owned() else {
                        continue;
                    };
                    let this = self.clone();
                    let attempt = t.attempt;
                    self.tracker.spawn(async move {
                        this.collect(Some(t), attempt).await;
                        drop(permit);
                    });
                }
                _ => {}
            }
        }
    }

    /// After a restart: rebuilds the bookkeeping from the store, interrupts
    /// synchronous calls that were cut off, and reconciles everything else.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        let open = self.store.scan_tasks(|t| !t.status.is_final());
        let n = open.len();
        for t in open {
            if t.sync && t.status.is_placed() {
                self.save_durable(&t.task_id, |r| {
                    r.interrupt("the gateway restarted during the synchronous call".into())
                })
                .await?;
                continue;
            }
            if let (Some(a), true) = (&t.agent_id, t.status.is_placed()) {
                self.membership.task_placed(a);
            }
            self.open().insert(t.task_id.clone());
        }
        if n > 0 {
            info!(tasks = n, "recovered unfinished tasks from the store");
        }
        Ok(())
    }

    /// Places queued tasks, follows membership changes and sweeps, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        mut queue: mpsc::Receiver<String>,
        mut events: mpsc::Receiver<MembershipEvent>,
        stop: CancellationToken,
    ) {
        // Agents that had left before a restart send no event: apply the policy to
        // what they still hold now (after the leases an earlier process granted).
        for a in self.membership.list() {
            if a.state == AgentState::Gone {
                self.agent_gone(&a.agent_id);
            }
        }
        self.sweep(true);
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(id) = queue.recv() => {
                    let Ok(permit) = self.dispatch_slots.clone().acquire_owned().await else { break };
                    let this = self.clone();
                    self.tracker.spawn(async move {
                        this.dispatch(id).await;
                        drop(permit);
                    });
                }
                Some(ev) = events.recv() => match ev {
                    MembershipEvent::Gone(a) => self.agent_gone(&a),
                    MembershipEvent::Alive(_) => self.sweep(false),
                },
                _ = tick.tick() => self.sweep(false),
            }
        }
        self.stopping.cancel();
        self.watchers.close();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        // Status changes not yet on disk (progress, running, ...) survive a clean stop.
        if let Err(e) = self.store.commit().await {
            warn!("cannot flush the store on shutdown: {e}");
        }
    }
}

/// The one log line and the metrics of a task's first end (a later result of an
/// interrupted task changes neither: each task ends once here).
fn task_ended(t: &TaskRecord) {
    let end = t.finished_ms.unwrap_or_else(super::model::now_ms);
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

/// What a TASK answer means for the task.
fn outcome_of_task_response(r: Response) -> Outcome {
    match r.code {
        Code::Ok => Outcome::Done(r.data.get("result").cloned().unwrap_or(Value::Null)),
        code => Outcome::from_error(code.as_u16(), r.description),
    }
}
