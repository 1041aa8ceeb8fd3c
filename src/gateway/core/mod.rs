//! The gateway's rules as a value: the life of a task, its placement and the
//! membership of agents, written with no I/O, no clock, no locks and no tokio.
//! Events go in (`step`, `tick`), effects come out, in the order they must be
//! carried out: an effect after a `Persist { durable: true }` may happen only once
//! that write is on disk.
//!
//! This is the failure policy of `docs/architecture.md` in code. `Scheduler`
//! (`scheduler.rs`) drives it in the running gateway: it turns sockets, timers and
//! sled into events and carries out the effects; `sim` drives it against a
//! simulated cluster and checks the invariants at every step.

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use super::model::{AgentState, TaskStatus};
use crate::arpcp::{Code, Progress};

/// A point in time, in milliseconds; the driver chooses the origin.
pub type Millis = u64;
/// A task's id (the store's ids are UUIDs).
pub type TaskId = u128;
/// An agent's number: the store calls agent `n` `agent-n`.
pub type AgentId = u32;

/// Unfinished tasks held at once; a Submit beyond is refused.
pub const MAX_OPEN_TASKS: usize = 100_000;
/// Agents registered at once; an echo answer from one more is ignored.
pub const MAX_AGENTS: usize = 4096;
/// GETs in flight at once (one per attempt at most); more wait for a later tick.
pub const MAX_COLLECTIONS: usize = 1024;
/// Interrupted and cancelled tasks kept to take a late result or stop a late copy;
/// the oldest go first. Tasks that ended otherwise are forgotten as they end.
pub const MAX_FINISHED_KEPT: usize = 100_000;
/// Added to every lease's end: covers clock-rate differences between hosts.
pub const LEASE_MARGIN_MS: Millis = 50;

/// How an agent is named in reasons users read.
pub fn agent_name(agent: AgentId) -> String {
    format!("agent-{agent}")
}

#[derive(Debug, Clone)]
pub struct Config {
    /// How long an agent may start what it holds without asking.
    pub lease_ms: Millis,
    /// Echoes missed in a row before an agent is gone.
    pub max_misses: u32,
    /// A placed task not heard of for this long is asked about (GET).
    pub reconcile_after_ms: Millis,
    /// Epochs of this process start here; a restarted process must pick another
    /// base, so that every agent is moved to a new epoch.
    pub epoch_base: u64,
}

/// Switches for the rules, all on by default. Each exists so that a test can turn
/// one off and show that the simulation notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// The placement is durable before its ATASK goes out.
    pub durable_placement: bool,
    /// A placed task the agent has not reported started is asked about too.
    pub reconcile_waiting: bool,
    /// An attempt its agent says it does not hold goes back to the queue only
    /// once a late ATASK of it could no longer start unasked.
    pub fence_unknown_attempts: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            durable_placement: true,
            reconcile_waiting: true,
            fence_unknown_attempts: true,
        }
    }
}

/// How an attempt ended on its agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(Value),
    Failed { code: Code, description: String },
    ClientError { code: Code, description: String },
    Interrupted(String),
}

impl Outcome {
    /// An agent's error answer: 400 is the procedure failing, any other code is
    /// something wrong with the call.
    pub fn from_error(code: Code, description: String) -> Outcome {
        if code == Code::Execution {
            Outcome::Failed { code, description }
        } else {
            Outcome::ClientError { code, description }
        }
    }
}

/// What a client asked to run, as far as placement cares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Call {
    pub procedure: String,
    /// Only this agent may run it.
    pub requested: Option<AgentId>,
    /// Run with ARPCP TASK while the client waits; the agent keeps no copy.
    pub sync: bool,
}

/// A task as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub call: Call,
    pub status: TaskStatus,
    /// Placements so far; attempt `n` went to `holders[n - 1]`.
    pub attempt: u32,
    pub holders: Vec<AgentId>,
    pub progress: Option<Progress>,
    /// Carried by the `Persist` of the end only: not kept in memory after it.
    pub result: Option<Value>,
    pub error: Option<(Option<Code>, String)>,
    /// Why the last change was made, when it was not the normal course.
    pub reason: Option<String>,
}

impl Task {
    pub fn holder(&self, attempt: u32) -> Option<AgentId> {
        self.holders
            .get(usize::try_from(attempt.checked_sub(1)?).ok()?)
            .copied()
    }

    fn current_holder(&self) -> Option<AgentId> {
        self.holder(self.attempt)
    }

    /// The agent whose load this task counts in.
    fn placed_on(&self) -> Option<AgentId> {
        self.status
            .is_placed()
            .then(|| self.current_holder())
            .flatten()
    }
}

/// A SIGNAL an agent sent about an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `accepted` without progress: held, waiting for a slot.
    Queued,
    /// `accepted` with progress: it runs.
    Started,
    /// `accepted` with `start`: its lease ended; may it start?
    AskStart,
    /// `done`, `client_error` or `interrupted`: the result waits for a GET.
    Ended,
}

/// What an agent said to GET.
#[derive(Debug, Clone, PartialEq)]
pub enum GetAnswer {
    /// 205: it does not hold the attempt.
    Unknown,
    /// Held, not started.
    Waiting,
    /// Started, with its latest progress if it sent any.
    Running(Option<Progress>),
    Ended(Outcome),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Submitted {
        task: TaskId,
        call: Call,
    },
    AtaskAnswered {
        task: TaskId,
        attempt: u32,
        code: Code,
        /// The agent's words, for a refusal.
        description: String,
    },
    /// No answer: `unreachable` when the agent surely did not get it.
    AtaskFailed {
        task: TaskId,
        attempt: u32,
        unreachable: bool,
    },
    /// The answer to a synchronous call (TASK), or its failure as an interruption.
    TaskAnswered {
        task: TaskId,
        attempt: u32,
        outcome: Outcome,
        /// The call failed to connect: the agent takes no tasks until it answers.
        unreachable: bool,
    },
    Signal {
        /// Who sent it, when the connection says (TLS); `None`: whoever holds it.
        agent: Option<AgentId>,
        task: TaskId,
        attempt: u32,
        signal: Signal,
        progress: Option<Progress>,
    },
    GetAnswered {
        task: TaskId,
        attempt: u32,
        answer: GetAnswer,
    },
    GetFailed {
        task: TaskId,
        attempt: u32,
    },
    EchoAnswered {
        agent: AgentId,
        capacity: u32,
        procedures: Vec<String>,
    },
    EchoMissed {
        agent: AgentId,
    },
    Cancel {
        task: TaskId,
    },
    Blacklist {
        agent: AgentId,
        on: bool,
    },
    /// A new process, with what the store kept.
    Recovered {
        tasks: Vec<Task>,
        agents: Vec<AgentInfo>,
    },
}

/// An agent as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: AgentId,
    pub capacity: u32,
    pub blacklisted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub lease_ms: Millis,
    pub epoch: u64,
}

/// Why no agent could be chosen for a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No alive, non-blacklisted agent.
    NoAgent,
    /// No agent that can take tasks offers the procedure; these offer it but cannot.
    NotOffered {
        offered_elsewhere: Vec<AgentId>,
    },
    UnknownAgent(AgentId),
    Blacklisted(AgentId),
    Unavailable {
        agent: AgentId,
        state: AgentState,
    },
    TooManyOpen {
        limit: usize,
    },
}

/// Why a SIGNAL is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalRefusal {
    /// No such attempt.
    Unknown,
    /// The attempt is placed on another agent than the sender.
    NotYours,
    /// It may not start: the attempt was withdrawn, for this reason.
    Withdrawn(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Submit {
        task: TaskId,
        result: Result<(), Refusal>,
    },
    /// The answer to an agent's SIGNAL: a lease, or why not.
    Signal {
        agent: Option<AgentId>,
        task: TaskId,
        attempt: u32,
        signal: Signal,
        result: Result<Grant, SignalRefusal>,
    },
    Cancel {
        task: TaskId,
        found: bool,
        changed: bool,
    },
    /// A synchronous call is over (answered, or the task ended otherwise).
    Sync { task: TaskId },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Persist {
        task: Task,
        durable: bool,
    },
    PersistAgent(AgentInfo),
    /// An agent's state changed (for listings and logs).
    AgentState {
        agent: AgentId,
        state: AgentState,
        misses: u32,
    },
    SendAtask {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
        epoch: u64,
    },
    /// A synchronous call. The placement before it is not yet durable: the driver
    /// flushes it while the call runs and reports the answer only once both are done.
    SendTask {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
    },
    SendGet {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
    },
    SendTerminate {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
    },
    Publish {
        task: TaskId,
    },
    Answer(Answer),
}

#[derive(Debug, Clone)]
struct Agent {
    capacity: u32,
    procedures: BTreeSet<String>,
    state: AgentState,
    misses: u32,
    blacklisted: bool,
    /// No lease granted before now runs past this.
    lease_end: Millis,
    epoch: u64,
    /// Gone, its tasks not yet withdrawn (waiting for the lease to end).
    withdraw_pending: bool,
    /// Unfinished tasks placed on it.
    load: u32,
}

impl Agent {
    fn can_take_tasks(&self) -> bool {
        self.state == AgentState::Alive && !self.blacklisted
    }

    fn offers(&self, procedure: &str) -> bool {
        self.procedures.contains(procedure)
    }
}

/// What is known of an unfinished task beyond its record.
#[derive(Debug, Clone, Default)]
struct Live {
    last_heard: Millis,
    /// The agent said it does not hold this attempt: back to the queue at this
    /// time, once an ATASK still on its way could no longer start unasked.
    requeue_at: Option<(u32, Millis)>,
}

#[derive(Debug)]
pub struct Controller {
    config: Config,
    rules: Rules,
    tasks: BTreeMap<TaskId, Task>,
    live: BTreeMap<TaskId, Live>,
    /// Ended tasks in the order they ended, for `MAX_FINISHED_KEPT`.
    finished: VecDeque<TaskId>,
    agents: BTreeMap<AgentId, Agent>,
    /// GETs in flight, by attempt; `true`: ask once more when it ends.
    collecting: BTreeMap<(TaskId, u32), bool>,
    next_epoch: u64,
    /// Leases granted by an earlier process end by then.
    restart_lease_end: Millis,
    /// The agent placed on last: among equally loaded agents the next one after
    /// it is chosen, so quick tasks go round all agents rather than to the few
    /// with the lowest ids.
    last_placed: AgentId,
}

impl Controller {
    pub fn new(config: Config, rules: Rules, now: Millis) -> Controller {
        let restart_lease_end = now + config.lease_ms + LEASE_MARGIN_MS;
        Controller {
            next_epoch: config.epoch_base,
            config,
            rules,
            tasks: BTreeMap::new(),
            live: BTreeMap::new(),
            finished: VecDeque::new(),
            agents: BTreeMap::new(),
            collecting: BTreeMap::new(),
            restart_lease_end,
            last_placed: 0,
        }
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// The epoch an agent's ATASKs carry now.
    pub fn epoch(&self, agent: AgentId) -> Option<u64> {
        self.agents.get(&agent).map(|a| a.epoch)
    }

    /// Unfinished tasks: what the driver keeps records of.
    pub fn open_tasks(&self) -> usize {
        self.live.len()
    }

    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::Submitted { task, call } => self.submitted(now, task, call, &mut out),
            Event::AtaskAnswered {
                task,
                attempt,
                code,
                description,
            } => self.atask_answered(now, task, attempt, code, description, &mut out),
            Event::AtaskFailed {
                task,
                attempt,
                unreachable,
            } => {
                if unreachable {
                    if let Some(a) = self.current_holder_of(task, attempt) {
                        self.unreachable(a, &mut out);
                        let why = format!("agent {} unreachable", agent_name(a));
                        self.requeue(task, attempt, why, &mut out);
                    }
                }
                // Otherwise the agent may hold it: reconciliation asks later.
            }
            Event::TaskAnswered {
                task,
                attempt,
                outcome,
                unreachable,
            } => {
                if unreachable {
                    if let Some(a) = self.tasks.get(&task).and_then(|t| t.holder(attempt)) {
                        self.unreachable(a, &mut out);
                    }
                }
                self.finish(task, attempt, outcome, false, &mut out);
                out.push(Effect::Answer(Answer::Sync { task }));
            }
            Event::Signal {
                agent,
                task,
                attempt,
                signal,
                progress,
            } => self.signal(now, agent, task, attempt, signal, progress, &mut out),
            Event::GetAnswered {
                task,
                attempt,
                answer,
            } => {
                let again = self.collecting.remove(&(task, attempt)).unwrap_or(false);
                self.get_answered(now, task, attempt, answer, &mut out);
                if again {
                    self.collect(task, attempt, &mut out);
                }
            }
            Event::GetFailed { task, attempt } => {
                self.collecting.remove(&(task, attempt));
            }
            Event::EchoAnswered {
                agent,
                capacity,
                procedures,
            } => self.echo_answered(now, agent, capacity, procedures, &mut out),
            Event::EchoMissed { agent } => self.echo_missed(now, agent, &mut out),
            Event::Cancel { task } => self.cancel(task, &mut out),
            Event::Blacklist { agent, on } => {
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.blacklisted = on;
                    out.push(Effect::PersistAgent(AgentInfo {
                        id: agent,
                        capacity: a.capacity,
                        blacklisted: on,
                    }));
                }
            }
            Event::Recovered { tasks, agents } => self.recovered(now, tasks, agents, &mut out),
        }
        out
    }

    /// Time passing: withdraws from gone agents whose lease ended, places queued
    /// tasks, asks about placed tasks not heard of for a while.
    pub fn tick(&mut self, now: Millis) -> Vec<Effect> {
        let mut out = Vec::new();
        let pending: Vec<AgentId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.withdraw_pending)
            .map(|(id, _)| *id)
            .collect();
        for agent in pending {
            self.withdraw(now, agent, &mut out);
        }
        let open: Vec<TaskId> = self.live.keys().copied().collect();
        for id in open {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            let live = self.live.get(&id);
            let quiet = live.map_or(0, |l| now.saturating_sub(l.last_heard));
            if let Some((attempt, at)) = live.and_then(|l| l.requeue_at) {
                if now >= at {
                    if let Some(l) = self.live.get_mut(&id) {
                        l.requeue_at = None;
                    }
                    let agent = t.holder(attempt).unwrap_or_default();
                    let why = format!("agent {} no longer has the task", agent_name(agent));
                    self.requeue(id, attempt, why, &mut out);
                    continue;
                }
            }
            match t.status {
                TaskStatus::Queued => {
                    if let Ok(agent) = self.pick(&t.call) {
                        self.place(now, id, agent, &mut out);
                    }
                }
                // A synchronous call's agent answers on the call or it is interrupted.
                TaskStatus::Dispatched | TaskStatus::Running
                    if quiet >= self.config.reconcile_after_ms && !t.call.sync =>
                {
                    if t.status == TaskStatus::Dispatched && !self.rules.reconcile_waiting {
                        continue;
                    }
                    let attempt = t.attempt;
                    if let Some(l) = self.live.get_mut(&id) {
                        l.last_heard = now;
                    }
                    self.collect(id, attempt, &mut out);
                }
                _ => {}
            }
        }
        out
    }

    fn next_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// Where a call runs: the requested agent, or the alive, non-blacklisted agent
    /// offering it with the fewest unfinished tasks per slot.
    fn pick(&self, call: &Call) -> Result<AgentId, Refusal> {
        if let Some(id) = call.requested {
            let a = self.agents.get(&id).ok_or(Refusal::UnknownAgent(id))?;
            if a.blacklisted {
                return Err(Refusal::Blacklisted(id));
            }
            if a.state != AgentState::Alive {
                return Err(Refusal::Unavailable {
                    agent: id,
                    state: a.state,
                });
            }
            if !a.offers(&call.procedure) {
                return Err(Refusal::NotOffered {
                    offered_elsewhere: Vec::new(),
                });
            }
            return Ok(id);
        }
        if !self.agents.values().any(Agent::can_take_tasks) {
            return Err(Refusal::NoAgent);
        }
        self.agents
            .iter()
            .filter(|(_, a)| a.can_take_tasks() && a.offers(&call.procedure))
            .min_by_key(|(id, a)| {
                let per_slot = u64::from(a.load) * 1_000_000 / u64::from(a.capacity.max(1));
                (per_slot, id.wrapping_sub(self.last_placed.wrapping_add(1)))
            })
            .map(|(id, _)| *id)
            .ok_or_else(|| Refusal::NotOffered {
                offered_elsewhere: self
                    .agents
                    .iter()
                    .filter(|(_, a)| a.offers(&call.procedure))
                    .map(|(id, _)| *id)
                    .collect(),
            })
    }

    /// Changes a task, keeping each agent's load in step with what is placed on it.
    fn update<R>(&mut self, id: TaskId, change: impl FnOnce(&mut Task) -> R) -> Option<R> {
        let t = self.tasks.get_mut(&id)?;
        let before = t.placed_on();
        let r = change(t);
        let after = t.placed_on();
        if before != after {
            if let Some(a) = before.and_then(|a| self.agents.get_mut(&a)) {
                a.load = a.load.saturating_sub(1);
            }
            if let Some(a) = after.and_then(|a| self.agents.get_mut(&a)) {
                a.load += 1;
            }
        }
        Some(r)
    }

    fn persist(&self, id: TaskId, durable: bool, out: &mut Vec<Effect>) {
        if let Some(t) = self.tasks.get(&id) {
            out.push(Effect::Persist {
                task: t.clone(),
                durable,
            });
        }
    }

    fn submitted(&mut self, now: Millis, id: TaskId, call: Call, out: &mut Vec<Effect>) {
        let refuse = |result| Effect::Answer(Answer::Submit { task: id, result });
        if self.live.len() >= MAX_OPEN_TASKS {
            out.push(refuse(Err(Refusal::TooManyOpen {
                limit: MAX_OPEN_TASKS,
            })));
            return;
        }
        if self.tasks.contains_key(&id) {
            return; // Submitted before: the first answer stands.
        }
        // Nothing is stored for a task no agent can take.
        let agent = match self.pick(&call) {
            Ok(a) => a,
            Err(r) => return out.push(refuse(Err(r))),
        };
        let sync = call.sync;
        self.tasks.insert(
            id,
            Task {
                id,
                call,
                status: TaskStatus::Queued,
                attempt: 0,
                holders: Vec::new(),
                progress: None,
                result: None,
                error: None,
                reason: None,
            },
        );
        self.live.insert(
            id,
            Live {
                last_heard: now,
                requeue_at: None,
            },
        );
        if sync {
            // Stored before the call; the client holds the answer, so the flush
            // may overlap the agent's work (see `SendTask`).
            self.dispatch(now, id, agent);
            self.persist(id, false, out);
            if let Some(t) = self.tasks.get(&id) {
                out.push(Effect::SendTask {
                    agent,
                    task: id,
                    attempt: t.attempt,
                });
            }
        } else if self.rules.durable_placement {
            // Task and placement in one durable write, before the answer: no ATASK
            // goes out for a placement a restarted gateway could forget.
            self.dispatch(now, id, agent);
            self.persist(id, true, out);
            out.push(refuse(Ok(())));
            self.send_atask(id, agent, out);
        } else {
            self.persist(id, true, out);
            out.push(refuse(Ok(())));
            self.dispatch(now, id, agent);
            self.persist(id, false, out);
            self.send_atask(id, agent, out);
        }
    }

    fn dispatch(&mut self, now: Millis, id: TaskId, agent: AgentId) {
        self.last_placed = agent;
        self.update(id, |t| {
            t.attempt += 1;
            t.holders.push(agent);
            t.status = TaskStatus::Dispatched;
            t.reason = None;
        });
        if let Some(l) = self.live.get_mut(&id) {
            l.last_heard = now;
            l.requeue_at = None;
        }
    }

    fn send_atask(&mut self, id: TaskId, agent: AgentId, out: &mut Vec<Effect>) {
        let epoch = self.epoch(agent).unwrap_or(0);
        if let Some(t) = self.tasks.get(&id) {
            out.push(Effect::SendAtask {
                agent,
                task: id,
                attempt: t.attempt,
                epoch,
            });
        }
    }

    /// A placement after the first: durable before its ATASK, for the same reason.
    fn place(&mut self, now: Millis, id: TaskId, agent: AgentId, out: &mut Vec<Effect>) {
        self.dispatch(now, id, agent);
        self.persist(id, self.rules.durable_placement, out);
        out.push(Effect::Publish { task: id });
        self.send_atask(id, agent, out);
    }

    /// Places what waits in the queue (an agent became able to take tasks).
    fn place_queued(&mut self, now: Millis, out: &mut Vec<Effect>) {
        let queued: Vec<TaskId> = self
            .live
            .keys()
            .filter(|id| {
                self.tasks
                    .get(id)
                    .is_some_and(|t| t.status == TaskStatus::Queued)
            })
            .copied()
            .collect();
        for id in queued {
            let Some(call) = self.tasks.get(&id).map(|t| t.call.clone()) else {
                continue;
            };
            if let Ok(agent) = self.pick(&call) {
                self.place(now, id, agent, out);
            }
        }
    }

    fn current_holder_of(&self, id: TaskId, attempt: u32) -> Option<AgentId> {
        let t = self.tasks.get(&id)?;
        (t.attempt == attempt && t.status == TaskStatus::Dispatched)
            .then(|| t.current_holder())
            .flatten()
    }

    /// It refused a connection: no new tasks until it answers an echo again.
    fn unreachable(&mut self, agent: AgentId, out: &mut Vec<Effect>) {
        if let Some(a) = self.agents.get_mut(&agent) {
            if a.state == AgentState::Alive {
                a.state = AgentState::Suspect;
                out.push(Effect::AgentState {
                    agent,
                    state: a.state,
                    misses: a.misses,
                });
            }
        }
    }

    /// Back to the queue: only a placement that has not started, of this attempt.
    fn requeue(&mut self, id: TaskId, attempt: u32, reason: String, out: &mut Vec<Effect>) {
        let changed = self.update(id, |t| {
            if t.attempt != attempt || t.status != TaskStatus::Dispatched || t.call.sync {
                return false;
            }
            t.status = TaskStatus::Queued;
            t.reason = Some(reason);
            true
        });
        if changed != Some(true) {
            return;
        }
        // Redone from the agents after a crash, so it need not wait for disk.
        self.persist(id, false, out);
        out.push(Effect::Publish { task: id });
    }

    /// Ends a task. A final state is never left, except by the result of the same
    /// attempt arriving for an interrupted task. A result of an earlier attempt
    /// counts too (the first result is kept).
    fn finish(
        &mut self,
        id: TaskId,
        attempt: u32,
        outcome: Outcome,
        durable: bool,
        out: &mut Vec<Effect>,
    ) -> bool {
        let ended = self.update(id, |t| {
            let late_delivery = t.status == TaskStatus::Interrupted
                && attempt == t.attempt
                && !matches!(outcome, Outcome::Interrupted(_));
            if (t.status.is_final() && !late_delivery) || attempt > t.attempt || attempt == 0 {
                return None;
            }
            let (status, result, error, reason) = match outcome {
                Outcome::Done(v) => {
                    if let Some(p) = &mut t.progress {
                        p.percent = 1.0;
                    }
                    (
                        TaskStatus::Done,
                        Some(v),
                        None,
                        late_delivery.then(|| "the agent delivered the result after all".into()),
                    )
                }
                Outcome::Failed { code, description } => (
                    TaskStatus::Failed,
                    None,
                    Some((Some(code), description)),
                    None,
                ),
                Outcome::ClientError { code, description } => (
                    TaskStatus::ClientError,
                    None,
                    Some((Some(code), description)),
                    None,
                ),
                Outcome::Interrupted(why) => (
                    TaskStatus::Interrupted,
                    None,
                    Some((None, why.clone())),
                    Some(why),
                ),
            };
            t.status = status;
            t.result = result;
            t.error = error;
            t.reason = reason;
            Some((attempt < t.attempt).then(|| (t.current_holder(), t.attempt)))
        });
        let Some(Some(superseded)) = ended else {
            return false;
        };
        self.persist(id, durable, out);
        // The record has it now; memory keeps only what the rules need.
        if let Some(t) = self.tasks.get_mut(&id) {
            t.result = None;
        }
        self.ended(id);
        out.push(Effect::Publish { task: id });
        // The first result is kept; the copy placed later is not needed.
        if let Some((Some(agent), current)) = superseded {
            out.push(Effect::SendTerminate {
                agent,
                task: id,
                attempt: current,
            });
        }
        true
    }

    fn atask_answered(
        &mut self,
        now: Millis,
        id: TaskId,
        attempt: u32,
        code: Code,
        description: String,
        out: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(&id) else {
            return;
        };
        if t.attempt != attempt {
            return;
        }
        let holder = t.current_holder();
        match code {
            Code::Ok => {
                // Cancelled while the ATASK was on its way: the cancel's terminate may
                // have reached the agent before it held the task.
                if t.status == TaskStatus::Cancelled {
                    if let Some(agent) = holder {
                        out.push(Effect::SendTerminate {
                            agent,
                            task: id,
                            attempt,
                        });
                    }
                } else if let Some(l) = self.live.get_mut(&id) {
                    l.last_heard = now;
                }
            }
            Code::UnknownProcedure | Code::Internal => {
                let why = format!(
                    "agent {} refused the task ({}): {description}",
                    agent_name(holder.unwrap_or_default()),
                    code.as_u16()
                );
                self.requeue(id, attempt, why, out);
            }
            code => {
                if t.status == TaskStatus::Dispatched {
                    let outcome = Outcome::from_error(code, description);
                    self.finish(id, attempt, outcome, true, out);
                }
            }
        }
    }

    fn grant(&mut self, now: Millis, agent: AgentId) -> Result<Grant, SignalRefusal> {
        let lease_ms = self.config.lease_ms;
        let a = self.agents.get_mut(&agent).ok_or(SignalRefusal::Unknown)?;
        a.lease_end = a.lease_end.max(now + lease_ms + LEASE_MARGIN_MS);
        Ok(Grant {
            lease_ms,
            epoch: a.epoch,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn signal(
        &mut self,
        now: Millis,
        sender: Option<AgentId>,
        id: TaskId,
        attempt: u32,
        signal: Signal,
        progress: Option<Progress>,
        out: &mut Vec<Effect>,
    ) {
        let answer = |result| {
            Effect::Answer(Answer::Signal {
                agent: sender,
                task: id,
                attempt,
                signal,
                result,
            })
        };
        let holder = self
            .tasks
            .get(&id)
            .filter(|t| attempt <= t.attempt)
            .and_then(|t| t.holder(attempt));
        let Some(agent) = holder else {
            out.push(answer(Err(SignalRefusal::Unknown)));
            return;
        };
        if sender.is_some_and(|s| s != agent) {
            out.push(answer(Err(SignalRefusal::NotYours)));
            return;
        }
        let (current, status, now_attempt) = match self.tasks.get(&id) {
            Some(t) => (t.attempt == attempt, t.status, t.attempt),
            None => return,
        };
        let placed = current && status.is_placed();
        if placed {
            if let Some(l) = self.live.get_mut(&id) {
                l.last_heard = now;
            }
        }
        match signal {
            Signal::Queued => {}
            Signal::Started => {
                if placed {
                    self.running(id, progress);
                    self.persist(id, false, out);
                    out.push(Effect::Publish { task: id });
                }
            }
            Signal::AskStart => {
                // Yes only while the attempt is still the placement; it then counts
                // as running, durably, so it is never placed again.
                if !placed {
                    let why = if current {
                        format!("the task is {}", status.as_str())
                    } else {
                        format!("the task was placed again as attempt {now_attempt}")
                    };
                    out.push(answer(Err(SignalRefusal::Withdrawn(why))));
                    return;
                }
                self.running(id, progress);
                self.persist(id, true, out);
                out.push(Effect::Publish { task: id });
            }
            Signal::Ended => self.collect(id, attempt, out),
        }
        let grant = self.grant(now, agent);
        out.push(answer(grant));
    }

    /// It runs (or said how far it got).
    fn running(&mut self, id: TaskId, progress: Option<Progress>) {
        self.update(id, |t| {
            if t.status == TaskStatus::Dispatched {
                t.status = TaskStatus::Running;
                t.reason = None;
            }
            if progress.is_some() {
                t.progress = progress;
            }
        });
    }

    /// One GET per attempt at a time; a request meanwhile makes it run once more.
    fn collect(&mut self, id: TaskId, attempt: u32, out: &mut Vec<Effect>) {
        let Some(agent) = self.tasks.get(&id).and_then(|t| t.holder(attempt)) else {
            return;
        };
        if let Some(again) = self.collecting.get_mut(&(id, attempt)) {
            *again = true;
            return;
        }
        if self.collecting.len() >= MAX_COLLECTIONS {
            return; // The next reconciliation asks.
        }
        self.collecting.insert((id, attempt), false);
        out.push(Effect::SendGet {
            agent,
            task: id,
            attempt,
        });
    }

    fn get_answered(
        &mut self,
        now: Millis,
        id: TaskId,
        attempt: u32,
        answer: GetAnswer,
        out: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(&id) else {
            return;
        };
        let Some(agent) = t.holder(attempt) else {
            return;
        };
        let (current, status) = (t.attempt == attempt, t.status);
        if current && status.is_placed() {
            if let Some(l) = self.live.get_mut(&id) {
                l.last_heard = now;
            }
        }
        match answer {
            GetAnswer::Unknown => {
                if !current {
                    return;
                }
                let why = format!("agent {} no longer has the task", agent_name(agent));
                match status {
                    TaskStatus::Dispatched => self.unknown_to_agent(now, id, attempt, agent, out),
                    TaskStatus::Running => self.interrupt(id, why, out),
                    _ => {}
                }
            }
            GetAnswer::Waiting => {}
            GetAnswer::Running(progress) => {
                if current && status.is_placed() {
                    self.running(id, progress);
                    self.persist(id, false, out);
                    out.push(Effect::Publish { task: id });
                }
            }
            GetAnswer::Ended(outcome) => {
                self.finish(id, attempt, outcome, true, out);
                // Durable (or the task ended otherwise): the agent's copy is not needed.
                out.push(Effect::SendTerminate {
                    agent,
                    task: id,
                    attempt,
                });
            }
        }
    }

    /// The agent does not hold a placed attempt: the ATASK was lost, or is still
    /// on its way (sent by an earlier process, or overtaken on a new connection).
    /// A late ATASK may start unasked while the lease of the epoch it carries holds,
    /// so the agent moves to a new epoch and the task goes back to the queue only
    /// once the old lease has ended; after that the attempt must ask, and is refused.
    fn unknown_to_agent(
        &mut self,
        now: Millis,
        id: TaskId,
        attempt: u32,
        agent: AgentId,
        out: &mut Vec<Effect>,
    ) {
        let epoch = self.next_epoch();
        let why = format!("agent {} no longer has the task", agent_name(agent));
        let Some(a) = self.agents.get_mut(&agent) else {
            return self.requeue(id, attempt, why, out);
        };
        a.epoch = epoch;
        let ends = a.lease_end;
        if now >= ends || !self.rules.fence_unknown_attempts {
            return self.requeue(id, attempt, why, out);
        }
        if let Some(l) = self.live.get_mut(&id) {
            if l.requeue_at.is_none() {
                l.requeue_at = Some((attempt, ends));
            }
        }
    }

    /// Stopped before it finished. Durable: a published `interrupted` must not come
    /// back as `running` after a crash.
    fn interrupt(&mut self, id: TaskId, why: String, out: &mut Vec<Effect>) {
        let changed = self.update(id, |t| {
            if t.status.is_final() {
                return false;
            }
            t.status = TaskStatus::Interrupted;
            t.error = Some((None, why.clone()));
            t.reason = Some(why);
            true
        });
        if changed != Some(true) {
            return;
        }
        self.persist(id, true, out);
        out.push(Effect::Publish { task: id });
        self.ended(id);
    }

    /// No longer open. Only an interrupted task (its attempt's result may still
    /// come) and a cancelled one (its ATASK may still be answered, and the copy
    /// then stopped) are kept, the oldest forgotten past the limit; a late word
    /// about any other ended task finds nothing and changes nothing.
    fn ended(&mut self, id: TaskId) {
        self.live.remove(&id);
        self.collecting.retain(|(t, _), _| *t != id);
        self.remember_ended(id);
    }

    fn remember_ended(&mut self, id: TaskId) {
        let keep = self
            .tasks
            .get(&id)
            .is_some_and(|t| matches!(t.status, TaskStatus::Interrupted | TaskStatus::Cancelled));
        if !keep {
            self.tasks.remove(&id);
            return;
        }
        self.finished.push_back(id);
        while self.finished.len() > MAX_FINISHED_KEPT {
            if let Some(old) = self.finished.pop_front() {
                self.tasks.remove(&old);
            }
        }
    }

    fn echo_answered(
        &mut self,
        now: Millis,
        agent: AgentId,
        capacity: u32,
        procedures: Vec<String>,
        out: &mut Vec<Effect>,
    ) {
        if !self.agents.contains_key(&agent) {
            if self.agents.len() >= MAX_AGENTS {
                return;
            }
            let epoch = self.next_epoch();
            self.agents.insert(
                agent,
                Agent {
                    capacity,
                    procedures: BTreeSet::new(),
                    state: AgentState::Suspect,
                    misses: 0,
                    blacklisted: false,
                    lease_end: self.restart_lease_end,
                    epoch,
                    withdraw_pending: false,
                    load: 0,
                },
            );
            out.push(Effect::PersistAgent(AgentInfo {
                id: agent,
                capacity,
                blacklisted: false,
            }));
        }
        let Some(a) = self.agents.get_mut(&agent) else {
            return;
        };
        let offers_more = procedures.iter().any(|p| !a.procedures.contains(p));
        a.capacity = capacity;
        a.procedures = procedures.into_iter().collect();
        a.misses = 0;
        // Back before its lease ended: its tasks stay its own.
        a.withdraw_pending = false;
        if a.state != AgentState::Alive {
            a.state = AgentState::Alive;
            out.push(Effect::AgentState {
                agent,
                state: AgentState::Alive,
                misses: 0,
            });
            self.place_queued(now, out);
        } else if offers_more {
            self.place_queued(now, out);
        }
    }

    fn echo_missed(&mut self, now: Millis, agent: AgentId, out: &mut Vec<Effect>) {
        let max = self.config.max_misses.max(1);
        let Some(a) = self.agents.get_mut(&agent) else {
            return;
        };
        a.misses = a.misses.saturating_add(1);
        let was = a.state;
        a.state = if a.misses >= max {
            AgentState::Gone
        } else {
            AgentState::Suspect
        };
        if a.state != was {
            out.push(Effect::AgentState {
                agent,
                state: a.state,
                misses: a.misses,
            });
        }
        if a.state == AgentState::Gone && was != AgentState::Gone {
            a.withdraw_pending = true;
            self.withdraw(now, agent, out);
        }
    }

    /// The policy for a gone agent, once its lease has ended: a new epoch, its
    /// tasks that had not started back to the queue, its running ones interrupted.
    /// Synchronous calls end with their call.
    fn withdraw(&mut self, now: Millis, agent: AgentId, out: &mut Vec<Effect>) {
        let Some(a) = self.agents.get(&agent) else {
            return;
        };
        if a.state != AgentState::Gone {
            return;
        }
        if now < a.lease_end {
            return; // `tick` tries again.
        }
        let epoch = self.next_epoch();
        if let Some(a) = self.agents.get_mut(&agent) {
            a.epoch = epoch;
            a.withdraw_pending = false;
        }
        let held: Vec<(TaskId, u32, TaskStatus)> = self
            .live
            .keys()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| t.placed_on() == Some(agent) && !t.call.sync)
            .map(|t| (t.id, t.attempt, t.status))
            .collect();
        let name = agent_name(agent);
        for (id, attempt, status) in held {
            if status == TaskStatus::Dispatched {
                let why = format!("agent {name} left the cluster before starting the task");
                self.requeue(id, attempt, why, out);
            } else {
                let why = format!("agent {name} left the cluster while running the task");
                self.interrupt(id, why, out);
            }
        }
    }

    fn cancel(&mut self, id: TaskId, out: &mut Vec<Effect>) {
        let answer = |found, changed| {
            Effect::Answer(Answer::Cancel {
                task: id,
                found,
                changed,
            })
        };
        let Some(t) = self.tasks.get(&id) else {
            return out.push(answer(false, false));
        };
        if t.status.is_final() {
            return out.push(answer(true, false));
        }
        // A synchronous call's agent keeps no copy to stop.
        let placed = t.placed_on().filter(|_| !t.call.sync);
        let attempt = t.attempt;
        self.update(id, |t| {
            t.status = TaskStatus::Cancelled;
            t.error = Some((None, "cancelled by a client".into()));
            t.reason = None;
        });
        self.persist(id, true, out);
        self.ended(id);
        out.push(Effect::Publish { task: id });
        out.push(answer(true, true));
        if let Some(agent) = placed {
            out.push(Effect::SendTerminate {
                agent,
                task: id,
                attempt,
            });
        }
    }

    /// A restarted gateway: queued tasks wait for placement, placed ones are asked
    /// about; agents must answer an echo before they get tasks, and each gets a
    /// new epoch, so whatever it accepted from the earlier process asks first.
    /// Synchronous calls were cut off with the process: they are interrupted.
    fn recovered(
        &mut self,
        now: Millis,
        tasks: Vec<Task>,
        agents: Vec<AgentInfo>,
        out: &mut Vec<Effect>,
    ) {
        self.restart_lease_end = now + self.config.lease_ms + LEASE_MARGIN_MS;
        for info in agents {
            let epoch = self.next_epoch();
            self.agents.insert(
                info.id,
                Agent {
                    capacity: info.capacity,
                    procedures: BTreeSet::new(),
                    state: AgentState::Suspect,
                    misses: 0,
                    blacklisted: info.blacklisted,
                    lease_end: self.restart_lease_end,
                    epoch,
                    withdraw_pending: false,
                    load: 0,
                },
            );
            out.push(Effect::AgentState {
                agent: info.id,
                state: AgentState::Suspect,
                misses: 0,
            });
        }
        for t in tasks {
            let (id, attempt, placed) = (t.id, t.attempt, t.status.is_placed());
            let (open, sync) = (!t.status.is_final(), t.call.sync);
            if let Some(a) = t.placed_on().and_then(|a| self.agents.get_mut(&a)) {
                a.load += 1;
            }
            self.tasks.insert(id, t);
            if !open {
                self.remember_ended(id);
                continue;
            }
            self.live.insert(
                id,
                Live {
                    last_heard: now,
                    requeue_at: None,
                },
            );
            if placed && sync {
                let why = "the gateway restarted during the synchronous call".to_string();
                self.interrupt(id, why, out);
            } else if placed {
                self.collect(id, attempt, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn controller() -> Controller {
        let config = Config {
            lease_ms: 300,
            max_misses: 3,
            reconcile_after_ms: 1_000,
            epoch_base: 0,
        };
        let mut c = Controller::new(config, Rules::default(), 0);
        c.step(
            0,
            Event::EchoAnswered {
                agent: 1,
                capacity: 1,
                procedures: vec!["p".into()],
            },
        );
        c
    }

    fn call() -> Call {
        Call {
            procedure: "p".into(),
            ..Call::default()
        }
    }

    fn persisted(effects: &[Effect]) -> Vec<(TaskStatus, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Persist { task, durable } => Some((task.status, *durable)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn placement_is_durable_before_the_answer_and_the_atask() {
        let mut c = controller();
        let fx = c.step(
            10,
            Event::Submitted {
                task: 7,
                call: call(),
            },
        );
        assert!(
            matches!(
                fx.as_slice(),
                [
                    Effect::Persist { task, durable: true },
                    Effect::Answer(Answer::Submit { task: 7, result: Ok(()) }),
                    Effect::SendAtask { agent: 1, task: 7, attempt: 1, .. },
                ] if task.status == TaskStatus::Dispatched
            ),
            "{fx:?}"
        );
    }

    #[test]
    fn a_late_result_after_cancel_changes_nothing() {
        let mut c = controller();
        c.step(
            10,
            Event::Submitted {
                task: 7,
                call: call(),
            },
        );
        let fx = c.step(20, Event::Cancel { task: 7 });
        assert_eq!(persisted(&fx), [(TaskStatus::Cancelled, true)]);
        let fx = c.step(
            30,
            Event::GetAnswered {
                task: 7,
                attempt: 1,
                answer: GetAnswer::Ended(Outcome::Done(json!(1))),
            },
        );
        assert_eq!(persisted(&fx), []);
        assert_eq!(
            c.task(7).map(|t| (t.status, t.result.clone())),
            Some((TaskStatus::Cancelled, None))
        );
    }

    #[test]
    fn a_gone_agent_loses_its_waiting_attempts_only_after_its_lease() {
        let mut c = controller();
        c.step(
            10,
            Event::Submitted {
                task: 7,
                call: call(),
            },
        );
        let fx = c.step(
            20,
            Event::Signal {
                agent: Some(1),
                task: 7,
                attempt: 1,
                signal: Signal::Queued,
                progress: None,
            },
        );
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Answer(Answer::Signal { result: Ok(_), .. }))));
        for t in [30, 40, 50] {
            c.step(t, Event::EchoMissed { agent: 1 });
        }
        // The lease granted at 20 holds until 20 + 300 + the margin.
        assert_eq!(c.task(7).map(|t| t.status), Some(TaskStatus::Dispatched));
        assert_eq!(persisted(&c.tick(20 + 300 + LEASE_MARGIN_MS - 1)), []);
        let fx = c.tick(20 + 300 + LEASE_MARGIN_MS);
        assert_eq!(persisted(&fx), [(TaskStatus::Queued, false)]);
        let fx = c.step(
            400,
            Event::Signal {
                agent: Some(1),
                task: 7,
                attempt: 1,
                signal: Signal::AskStart,
                progress: None,
            },
        );
        assert!(
            fx.iter().any(|e| matches!(
                e,
                Effect::Answer(Answer::Signal {
                    result: Err(SignalRefusal::Withdrawn(_)),
                    ..
                })
            )),
            "a withdrawn attempt may not start: {fx:?}"
        );
    }
}
