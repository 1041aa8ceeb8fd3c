//! The gateway's rules as a value: the life of a task and its placement, written
//! with no I/O, no clock, no locks and no tokio. Events go in (`step`, `tick`),
//! effects come out, in the order they must be carried out: an effect after a
//! `Persist { durable: true }` may happen only once that write is on disk.
//!
//! This is the failure policy of `docs/architecture.md` in code, so that it can be
//! checked against a simulated cluster (`sim`) rather than only through processes.
//! The running gateway does not drive it yet: `Scheduler` and `Membership` still
//! decide the same rules themselves.

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

use super::model::{AgentState, TaskStatus};
use crate::arpcp::Code;

/// A point in time, in milliseconds; the driver chooses the origin.
pub type Millis = u64;
pub type TaskId = u64;
pub type AgentId = u32;

/// Unfinished tasks held at once; a Submit beyond is refused.
pub const MAX_OPEN_TASKS: usize = 100_000;
/// Agents registered at once; an echo answer from one more is ignored.
pub const MAX_AGENTS: usize = 4096;
/// GETs in flight at once (one per attempt at most); more wait for a later tick.
pub const MAX_COLLECTIONS: usize = 1024;
/// Ended tasks kept to answer late results and cancels; the oldest go first.
pub const MAX_FINISHED_KEPT: usize = 100_000;
/// Added to every lease's end: covers clock-rate differences between hosts.
pub const LEASE_MARGIN_MS: Millis = 50;

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

/// A task as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub status: TaskStatus,
    /// Placements so far; attempt `n` went to `holders[n - 1]`.
    pub attempt: u32,
    pub holders: Vec<AgentId>,
    pub result: Option<Value>,
    pub error: Option<(Option<Code>, String)>,
    /// Why the last change was made, when it was not the normal course.
    pub reason: Option<String>,
}

impl Task {
    fn holder(&self, attempt: u32) -> Option<AgentId> {
        self.holders
            .get(usize::try_from(attempt.checked_sub(1)?).ok()?)
            .copied()
    }

    fn current_holder(&self) -> Option<AgentId> {
        self.holder(self.attempt)
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
    Running,
    Ended(Outcome),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Submitted {
        task: TaskId,
    },
    AtaskAnswered {
        task: TaskId,
        attempt: u32,
        code: Code,
    },
    /// No answer: `unreachable` when the agent surely did not get it.
    AtaskFailed {
        task: TaskId,
        attempt: u32,
        unreachable: bool,
    },
    Signal {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
        signal: Signal,
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

#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No alive, non-blacklisted agent with a slot to offer.
    NoAgent,
    TooManyOpen {
        limit: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Submit {
        task: TaskId,
        result: Result<(), Refusal>,
    },
    /// The answer to an agent's SIGNAL: a lease, or the code refusing it.
    Signal {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
        signal: Signal,
        result: Result<Grant, Code>,
    },
    Cancel {
        task: TaskId,
        found: bool,
        changed: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Persist {
        task: Task,
        durable: bool,
    },
    PersistAgent(AgentInfo),
    SendAtask {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
        epoch: u64,
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
    state: AgentState,
    misses: u32,
    blacklisted: bool,
    /// No lease granted before now runs past this.
    lease_end: Millis,
    epoch: u64,
    /// Gone, its tasks not yet withdrawn (waiting for the lease to end).
    withdraw_pending: bool,
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
        }
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::Submitted { task } => self.submitted(now, task, &mut out),
            Event::AtaskAnswered {
                task,
                attempt,
                code,
            } => self.atask_answered(now, task, attempt, code, &mut out),
            Event::AtaskFailed {
                task,
                attempt,
                unreachable,
            } => {
                if unreachable {
                    if let Some(a) = self.current_holder_of(task, attempt) {
                        self.unreachable(a);
                        let why = format!("agent {a} unreachable");
                        self.requeue(task, attempt, why, &mut out);
                    }
                }
                // Otherwise the agent may hold it: reconciliation asks later.
            }
            Event::Signal {
                agent,
                task,
                attempt,
                signal,
            } => self.signal(now, agent, task, attempt, signal, &mut out),
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
            Event::EchoAnswered { agent, capacity } => {
                self.echo_answered(agent, capacity, &mut out)
            }
            Event::EchoMissed { agent } => {
                let max = self.config.max_misses.max(1);
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.misses = a.misses.saturating_add(1);
                    let was = a.state;
                    a.state = if a.misses >= max {
                        AgentState::Gone
                    } else {
                        AgentState::Suspect
                    };
                    if a.state == AgentState::Gone && was != AgentState::Gone {
                        a.withdraw_pending = true;
                        self.withdraw(now, agent, &mut out);
                    }
                }
            }
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
                    let why = format!("agent {agent} no longer has the task");
                    self.requeue(id, attempt, why, &mut out);
                    continue;
                }
            }
            match t.status {
                TaskStatus::Queued => {
                    if let Some(agent) = self.pick() {
                        self.place(now, id, agent, &mut out);
                    }
                }
                TaskStatus::Dispatched | TaskStatus::Running
                    if quiet >= self.config.reconcile_after_ms =>
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

    /// Unfinished tasks placed on `agent` (what "fewest unfinished tasks per slot" counts).
    fn load(&self, agent: AgentId) -> usize {
        self.live
            .keys()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| t.status.is_placed() && t.current_holder() == Some(agent))
            .count()
    }

    /// The alive, non-blacklisted agent with the fewest unfinished tasks per slot.
    fn pick(&self) -> Option<AgentId> {
        self.agents
            .iter()
            .filter(|(_, a)| a.state == AgentState::Alive && !a.blacklisted && a.capacity > 0)
            .min_by_key(|(id, a)| (self.load(**id) * 1000) / a.capacity as usize)
            .map(|(id, _)| *id)
    }

    fn persist(&self, id: TaskId, durable: bool, out: &mut Vec<Effect>) {
        if let Some(t) = self.tasks.get(&id) {
            out.push(Effect::Persist {
                task: t.clone(),
                durable,
            });
        }
    }

    fn submitted(&mut self, now: Millis, id: TaskId, out: &mut Vec<Effect>) {
        let refuse = |result| Effect::Answer(Answer::Submit { task: id, result });
        if self.live.len() >= MAX_OPEN_TASKS {
            out.push(refuse(Err(Refusal::TooManyOpen {
                limit: MAX_OPEN_TASKS,
            })));
            return;
        }
        // Nothing is stored for a task no agent can take.
        let Some(agent) = self.pick() else {
            out.push(refuse(Err(Refusal::NoAgent)));
            return;
        };
        self.tasks.insert(
            id,
            Task {
                id,
                status: TaskStatus::Queued,
                attempt: 0,
                holders: Vec::new(),
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
        if self.rules.durable_placement {
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
        if let Some(t) = self.tasks.get_mut(&id) {
            t.attempt += 1;
            t.holders.push(agent);
            t.status = TaskStatus::Dispatched;
            t.reason = None;
        }
        if let Some(l) = self.live.get_mut(&id) {
            l.last_heard = now;
            l.requeue_at = None;
        }
    }

    fn send_atask(&mut self, id: TaskId, agent: AgentId, out: &mut Vec<Effect>) {
        let epoch = self.agent_epoch(agent);
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

    fn agent_epoch(&mut self, agent: AgentId) -> u64 {
        match self.agents.get(&agent) {
            Some(a) => a.epoch,
            None => 0,
        }
    }

    fn current_holder_of(&self, id: TaskId, attempt: u32) -> Option<AgentId> {
        let t = self.tasks.get(&id)?;
        (t.attempt == attempt && t.status == TaskStatus::Dispatched)
            .then(|| t.current_holder())
            .flatten()
    }

    fn unreachable(&mut self, agent: AgentId) {
        if let Some(a) = self.agents.get_mut(&agent) {
            if a.state == AgentState::Alive {
                a.state = AgentState::Suspect;
            }
        }
    }

    /// Back to the queue: only a placement that has not started, of this attempt.
    fn requeue(&mut self, id: TaskId, attempt: u32, reason: String, out: &mut Vec<Effect>) {
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        if t.attempt != attempt || t.status != TaskStatus::Dispatched {
            return;
        }
        t.status = TaskStatus::Queued;
        t.reason = Some(reason);
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
        out: &mut Vec<Effect>,
    ) -> bool {
        let Some(t) = self.tasks.get_mut(&id) else {
            return false;
        };
        let late_delivery = t.status == TaskStatus::Interrupted
            && attempt == t.attempt
            && !matches!(outcome, Outcome::Interrupted(_));
        if (t.status.is_final() && !late_delivery) || attempt > t.attempt || attempt == 0 {
            return false;
        }
        let (status, result, error, reason) = match outcome {
            Outcome::Done(v) => (
                TaskStatus::Done,
                Some(v),
                None,
                late_delivery.then(|| "the agent delivered the result after all".to_string()),
            ),
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
        let superseded = (attempt < t.attempt).then(|| (t.current_holder(), t.attempt));
        self.ended(id);
        self.persist(id, true, out);
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
                    "agent {} refused the task ({code})",
                    holder.unwrap_or_default()
                );
                self.requeue(id, attempt, why, out);
            }
            code => {
                if t.status == TaskStatus::Dispatched {
                    let outcome =
                        Outcome::from_error(code, format!("the agent refused the task ({code})"));
                    self.finish(id, attempt, outcome, out);
                }
            }
        }
    }

    fn grant(&mut self, now: Millis, agent: AgentId) -> Result<Grant, Code> {
        let lease_ms = self.config.lease_ms;
        let a = self.agents.get_mut(&agent).ok_or(Code::UnknownTask)?;
        a.lease_end = a.lease_end.max(now + lease_ms + LEASE_MARGIN_MS);
        Ok(Grant {
            lease_ms,
            epoch: a.epoch,
        })
    }

    fn signal(
        &mut self,
        now: Millis,
        agent: AgentId,
        id: TaskId,
        attempt: u32,
        signal: Signal,
        out: &mut Vec<Effect>,
    ) {
        let answer = |result| {
            Effect::Answer(Answer::Signal {
                agent,
                task: id,
                attempt,
                signal,
                result,
            })
        };
        let known = self
            .tasks
            .get(&id)
            .is_some_and(|t| attempt <= t.attempt && t.holder(attempt) == Some(agent));
        if !known {
            out.push(answer(Err(Code::UnknownTask)));
            return;
        }
        let (current, status) = match self.tasks.get(&id) {
            Some(t) => (t.attempt == attempt, t.status),
            None => return,
        };
        if current && status.is_placed() {
            if let Some(l) = self.live.get_mut(&id) {
                l.last_heard = now;
            }
        }
        match signal {
            Signal::Queued => {}
            Signal::Started => {
                if current && status == TaskStatus::Dispatched {
                    self.set_running(id);
                    self.persist(id, false, out);
                    out.push(Effect::Publish { task: id });
                }
            }
            Signal::AskStart => {
                // Yes only while the attempt is still the placement; it then counts
                // as running, durably, so it is never placed again.
                if !(current && status.is_placed()) {
                    out.push(answer(Err(Code::UnknownTask)));
                    return;
                }
                if status == TaskStatus::Dispatched {
                    self.set_running(id);
                    self.persist(id, true, out);
                    out.push(Effect::Publish { task: id });
                }
            }
            Signal::Ended => self.collect(id, attempt, out),
        }
        let grant = self.grant(now, agent);
        out.push(answer(grant));
    }

    fn set_running(&mut self, id: TaskId) {
        if let Some(t) = self.tasks.get_mut(&id) {
            t.status = TaskStatus::Running;
            t.reason = None;
        }
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
                let why = format!("agent {agent} no longer has the task");
                match status {
                    TaskStatus::Dispatched => self.unknown_to_agent(now, id, attempt, agent, out),
                    TaskStatus::Running => self.interrupt(id, why, out),
                    _ => {}
                }
            }
            GetAnswer::Waiting => {}
            GetAnswer::Running => {
                if current && status == TaskStatus::Dispatched {
                    self.set_running(id);
                    self.persist(id, false, out);
                    out.push(Effect::Publish { task: id });
                }
            }
            GetAnswer::Ended(outcome) => {
                self.finish(id, attempt, outcome, out);
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
        let Some(a) = self.agents.get_mut(&agent) else {
            let why = format!("agent {agent} no longer has the task");
            return self.requeue(id, attempt, why, out);
        };
        a.epoch = epoch;
        let ends = a.lease_end;
        if now >= ends || !self.rules.fence_unknown_attempts {
            let why = format!("agent {agent} no longer has the task");
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
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        if t.status.is_final() {
            return;
        }
        t.status = TaskStatus::Interrupted;
        t.error = Some((None, why.clone()));
        t.reason = Some(why);
        self.ended(id);
        self.persist(id, true, out);
        out.push(Effect::Publish { task: id });
    }

    /// No longer open; the oldest ended tasks are forgotten past the limit.
    fn ended(&mut self, id: TaskId) {
        if self.live.remove(&id).is_none() {
            return; // Ended before (a late result of an interrupted task).
        }
        self.remember_ended(id);
    }

    fn remember_ended(&mut self, id: TaskId) {
        self.finished.push_back(id);
        while self.finished.len() > MAX_FINISHED_KEPT {
            if let Some(old) = self.finished.pop_front() {
                self.tasks.remove(&old);
            }
        }
    }

    fn echo_answered(&mut self, agent: AgentId, capacity: u32, out: &mut Vec<Effect>) {
        if !self.agents.contains_key(&agent) {
            if self.agents.len() >= MAX_AGENTS {
                return;
            }
            let epoch = self.next_epoch();
            self.agents.insert(
                agent,
                Agent {
                    capacity,
                    state: AgentState::Alive,
                    misses: 0,
                    blacklisted: false,
                    lease_end: self.restart_lease_end,
                    epoch,
                    withdraw_pending: false,
                },
            );
            out.push(Effect::PersistAgent(AgentInfo {
                id: agent,
                capacity,
                blacklisted: false,
            }));
        }
        if let Some(a) = self.agents.get_mut(&agent) {
            a.capacity = capacity;
            a.misses = 0;
            a.state = AgentState::Alive;
            // Back before its lease ended: its tasks stay its own.
            a.withdraw_pending = false;
        }
    }

    /// The policy for a gone agent, once its lease has ended: a new epoch, its
    /// tasks that had not started back to the queue, its running ones interrupted.
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
            .filter(|t| t.status.is_placed() && t.current_holder() == Some(agent))
            .map(|t| (t.id, t.attempt, t.status))
            .collect();
        for (id, attempt, status) in held {
            if status == TaskStatus::Dispatched {
                let why = format!("agent {agent} left the cluster before starting the task");
                self.requeue(id, attempt, why, out);
            } else {
                let why = format!("agent {agent} left the cluster while running the task");
                self.interrupt(id, why, out);
            }
        }
    }

    fn cancel(&mut self, id: TaskId, out: &mut Vec<Effect>) {
        let Some(t) = self.tasks.get_mut(&id) else {
            out.push(Effect::Answer(Answer::Cancel {
                task: id,
                found: false,
                changed: false,
            }));
            return;
        };
        if t.status.is_final() {
            out.push(Effect::Answer(Answer::Cancel {
                task: id,
                found: true,
                changed: false,
            }));
            return;
        }
        let placed = t.status.is_placed().then(|| t.current_holder()).flatten();
        let attempt = t.attempt;
        t.status = TaskStatus::Cancelled;
        t.error = Some((None, "cancelled by a client".into()));
        t.reason = None;
        self.ended(id);
        self.persist(id, true, out);
        out.push(Effect::Publish { task: id });
        out.push(Effect::Answer(Answer::Cancel {
            task: id,
            found: true,
            changed: true,
        }));
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
                    state: AgentState::Suspect,
                    misses: 0,
                    blacklisted: info.blacklisted,
                    lease_end: self.restart_lease_end,
                    epoch,
                    withdraw_pending: false,
                },
            );
        }
        for t in tasks {
            let (id, attempt, placed) = (t.id, t.attempt, t.status.is_placed());
            let open = !t.status.is_final();
            self.tasks.insert(id, t);
            if open {
                self.live.insert(
                    id,
                    Live {
                        last_heard: now,
                        requeue_at: None,
                    },
                );
                if placed {
                    self.collect(id, attempt, out);
                }
            } else {
                self.remember_ended(id);
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
            },
        );
        c
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
        let fx = c.step(10, Event::Submitted { task: 7 });
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
        c.step(10, Event::Submitted { task: 7 });
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
        c.step(10, Event::Submitted { task: 7 });
        let fx = c.step(
            20,
            Event::Signal {
                agent: 1,
                task: 7,
                attempt: 1,
                signal: Signal::Queued,
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
                agent: 1,
                task: 7,
                attempt: 1,
                signal: Signal::AskStart,
            },
        );
        assert!(
            fx.iter().any(|e| matches!(
                e,
                Effect::Answer(Answer::Signal {
                    result: Err(Code::UnknownTask),
                    ..
                })
            )),
            "a withdrawn attempt may not start: {fx:?}"
        );
    }
}
