//! A deterministic simulation of a cluster around the real `Controller`: agents
//! with slots, run times, leases and crashes (they keep what they stored before
//! answering, as the real agent does), a network that drops, delays, duplicates
//! and reorders messages and cuts agents off, and a gateway that crashes in the
//! middle of carrying out a step and comes back with only what reached its disk.
//! Every run is one seed: `SIM_SEEDS=N` runs seeds 0..N, `SIM_SEED=S` replays one.
//! The invariants of issue 13 are checked as effects are carried out and at the end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use serde_json::json;

use super::*;

/// Events kept for the trace a failure prints; `SIM_TRACE=N` asks for more, up to
/// `MAX_TRACE_LEN`.
const TRACE_LEN: usize = 60;
const MAX_TRACE_LEN: usize = 100_000;
const FAULT_MS: Millis = 3_000;
const PROCEDURE: &str = "work";
/// Once faults stop, every acknowledged task must end within this.
const QUIET_MS: Millis = 30_000;
const GW_TICK_MS: Millis = 50;
const AGENT_TICK_MS: Millis = 50;
const ECHO_MS: Millis = 100;
const MAX_MISSES: u32 = 3;
const RPC_TIMEOUT_MS: Millis = 400;
const SIGNAL_RETRY_MS: Millis = 150;
/// sled writes what waits in its log within a second without being asked.
const BACKGROUND_FLUSH_MS: Millis = 1_000;

/// splitmix64: tiny, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn per_mille(&mut self, p: u64) -> bool {
        self.below(1000) < p
    }
}

/// Rules broken on purpose, to show the simulation notices.
#[derive(Debug, Clone, Copy, Default)]
pub struct Breaks {
    pub skip_durable_placement: bool,
    pub agent_starts_withdrawn: bool,
    pub no_reconcile_waiting: bool,
    pub requeue_unknown_at_once: bool,
}

#[derive(Debug)]
pub struct Violation {
    pub seed: u64,
    pub invariant: u8,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke invariant {}: {}\nreplay with SIM_SEED={}; the last {} events:",
            self.seed,
            self.invariant,
            self.what,
            self.seed,
            self.trace.len()
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub events: u64,
    pub acked: u64,
    /// Tasks run to completion twice in the one case the docs name.
    pub excused_doubles: u64,
    pub gateway_crashes: u64,
}

#[derive(Debug, Clone)]
enum Req {
    Atask {
        task: TaskId,
        attempt: u32,
        epoch: u64,
    },
    Get {
        task: TaskId,
        attempt: u32,
    },
    Terminate {
        task: TaskId,
        attempt: u32,
    },
    Echo,
}

#[derive(Debug, Clone)]
enum Ev {
    GwTick,
    AgentTick(AgentId),
    EchoRound,
    Submit(TaskId),
    Cancel(TaskId),
    Blacklist(AgentId, bool),
    AgentCrash(AgentId),
    AgentRestart(AgentId),
    Partition(AgentId, Millis),
    GwCrash,
    GwRestart,
    FaultsEnd,
    ToAgent {
        agent: AgentId,
        gw: u32,
        req: Req,
        sent: Millis,
        reply: bool,
    },
    ToGw {
        gw: u32,
        ev: Event,
    },
    SignalToGw {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
        signal: Signal,
        sent: Millis,
    },
    SignalReply {
        agent: AgentId,
        task: TaskId,
        attempt: u32,
        signal: Signal,
        sent: Millis,
        result: Option<Result<Grant, SignalRefusal>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum AState {
    Queued,
    Asking {
        due: Millis,
    },
    Running {
        ends: Millis,
    },
    Ended {
        outcome: Outcome,
        due: Option<Millis>,
    },
}

#[derive(Debug, Clone)]
struct ATask {
    epoch: u64,
    state: AState,
}

#[derive(Debug)]
struct SimAgent {
    capacity: u32,
    up: bool,
    partitioned_until: Millis,
    lease_end: Millis,
    lease_epoch: Option<u64>,
    tasks: BTreeMap<(TaskId, u32), ATask>,
}

impl SimAgent {
    fn slots_used(&self) -> u32 {
        self.tasks
            .values()
            .filter(|t| matches!(t.state, AState::Running { .. } | AState::Asking { .. }))
            .count() as u32
    }
    fn lease_holds(&self, now: Millis, epoch: u64) -> bool {
        self.lease_epoch == Some(epoch) && now < self.lease_end
    }
}

fn result_of(agent: AgentId, task: TaskId, attempt: u32) -> Value {
    json!(format!("{agent}/{task}/{attempt}"))
}

struct Sim {
    seed: u64,
    rng: Rng,
    breaks: Breaks,
    now: Millis,
    seq: u64,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    payloads: BTreeMap<u64, Ev>,
    trace: VecDeque<(Millis, Ev)>,
    trace_len: usize,
    // Network.
    drop_pm: u64,
    dup_pm: u64,
    slow_pm: u64,
    faults: bool,
    // Gateway.
    gw: Option<Controller>,
    gw_inc: u32,
    crash_armed: bool,
    disk: BTreeMap<TaskId, Task>,
    unflushed: Vec<Task>,
    agents_disk: BTreeMap<AgentId, AgentInfo>,
    signal_sent: Millis,
    // Agents.
    agents: BTreeMap<AgentId, SimAgent>,
    // What the invariants are checked against.
    acked: BTreeSet<TaskId>,
    blacklisted: BTreeSet<AgentId>,
    finals: BTreeMap<TaskId, Task>,
    started: BTreeSet<(TaskId, u32)>,
    completed: BTreeSet<(AgentId, TaskId, u32)>,
    completions: BTreeMap<TaskId, u32>,
    excused: BTreeSet<TaskId>,
    stats: Stats,
}

fn config(inc: u32) -> Config {
    Config {
        lease_ms: ECHO_MS * MAX_MISSES as u64,
        max_misses: MAX_MISSES,
        reconcile_after_ms: 1_000,
        epoch_base: u64::from(inc) << 32,
    }
}

impl Sim {
    fn new(seed: u64, breaks: Breaks) -> Sim {
        let mut rng = Rng(seed);
        let n_agents = rng.range(2, 3) as AgentId;
        let mut agents = BTreeMap::new();
        for a in 1..=n_agents {
            agents.insert(
                a,
                SimAgent {
                    capacity: rng.range(1, 2) as u32,
                    up: true,
                    partitioned_until: 0,
                    lease_end: 0,
                    lease_epoch: None,
                    tasks: BTreeMap::new(),
                },
            );
        }
        let rules = Rules {
            durable_placement: !breaks.skip_durable_placement,
            reconcile_waiting: !breaks.no_reconcile_waiting,
            fence_unknown_attempts: !breaks.requeue_unknown_at_once,
        };
        let mut sim = Sim {
            seed,
            drop_pm: rng.range(0, 150),
            dup_pm: rng.range(0, 50),
            slow_pm: rng.range(0, 100),
            rng,
            breaks,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            trace: VecDeque::new(),
            trace_len: env_u64("SIM_TRACE").map_or(TRACE_LEN, |n| (n as usize).min(MAX_TRACE_LEN)),
            faults: true,
            gw: Some(Controller::new(config(0), rules, 0)),
            gw_inc: 0,
            crash_armed: false,
            disk: BTreeMap::new(),
            unflushed: Vec::new(),
            agents_disk: BTreeMap::new(),
            signal_sent: 0,
            agents,
            acked: BTreeSet::new(),
            blacklisted: BTreeSet::new(),
            finals: BTreeMap::new(),
            started: BTreeSet::new(),
            completed: BTreeSet::new(),
            completions: BTreeMap::new(),
            excused: BTreeSet::new(),
            stats: Stats::default(),
        };
        sim.schedule(0, Ev::EchoRound);
        sim.schedule(GW_TICK_MS, Ev::GwTick);
        for a in 1..=n_agents {
            sim.schedule(AGENT_TICK_MS, Ev::AgentTick(a));
        }
        let n_tasks = u128::from(sim.rng.range(3, 8));
        for t in 1..=n_tasks {
            let at = sim.rng.range(150, FAULT_MS - 200);
            sim.schedule(at, Ev::Submit(t));
        }
        for _ in 0..sim.rng.range(0, 2) {
            let (at, t) = (
                sim.rng.range(200, FAULT_MS),
                u128::from(sim.rng.range(1, n_tasks as u64)),
            );
            sim.schedule(at, Ev::Cancel(t));
        }
        for _ in 0..sim.rng.range(0, 1) {
            let (at, a) = (
                sim.rng.range(0, FAULT_MS),
                sim.rng.range(1, n_agents as u64),
            );
            sim.schedule(at, Ev::Blacklist(a as AgentId, true));
        }
        for _ in 0..sim.rng.range(0, 2) {
            let (at, a) = (
                sim.rng.range(0, FAULT_MS),
                sim.rng.range(1, n_agents as u64),
            );
            sim.schedule(at, Ev::AgentCrash(a as AgentId));
        }
        for _ in 0..sim.rng.range(0, 2) {
            let (at, a) = (
                sim.rng.range(0, FAULT_MS),
                sim.rng.range(1, n_agents as u64),
            );
            let until = at + sim.rng.range(100, 1_500);
            sim.schedule(at, Ev::Partition(a as AgentId, until));
        }
        for _ in 0..sim.rng.range(0, 2) {
            let at = sim.rng.range(100, FAULT_MS);
            sim.schedule(at, Ev::GwCrash);
        }
        sim.schedule(FAULT_MS, Ev::FaultsEnd);
        sim
    }

    fn schedule(&mut self, at: Millis, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.payloads.insert(self.seq, ev);
    }

    fn violation(&self, invariant: u8, what: String) -> Violation {
        Violation {
            seed: self.seed,
            invariant,
            what,
            trace: self
                .trace
                .iter()
                .map(|(t, e)| format!("{t:>6} ms {e:?}"))
                .collect(),
        }
    }

    fn delay(&mut self) -> Millis {
        if self.faults && self.rng.per_mille(self.slow_pm) {
            self.rng.range(100, 1_500)
        } else {
            self.rng.range(1, 20)
        }
    }

    fn lost(&mut self, agent: AgentId) -> bool {
        let cut = self
            .agents
            .get(&agent)
            .is_some_and(|a| a.partitioned_until > self.now);
        cut || (self.faults && self.rng.per_mille(self.drop_pm))
    }

    fn agent_up(&self, agent: AgentId) -> bool {
        self.agents.get(&agent).is_some_and(|a| a.up)
    }

    fn failure(req: &Req, unreachable: bool) -> Option<Event> {
        match *req {
            Req::Atask { task, attempt, .. } => Some(Event::AtaskFailed {
                task,
                attempt,
                unreachable,
            }),
            Req::Get { task, attempt } => Some(Event::GetFailed { task, attempt }),
            Req::Terminate { .. } => None,
            Req::Echo => None,
        }
    }

    fn fail_to_gw(&mut self, at: Millis, agent: AgentId, req: &Req, unreachable: bool) {
        let ev = match req {
            Req::Echo => Some(Event::EchoMissed { agent }),
            r => Sim::failure(r, unreachable),
        };
        if let Some(ev) = ev {
            let gw = self.gw_inc;
            self.schedule(at, Ev::ToGw { gw, ev });
        }
    }

    /// A request from the gateway: delivered, lost (a timeout), or refused.
    fn send(&mut self, agent: AgentId, req: Req) {
        let now = self.now;
        let d = self.delay();
        if !self.agent_up(agent) {
            self.fail_to_gw(now + d, agent, &req, true);
            return;
        }
        if self.lost(agent) {
            self.fail_to_gw(now + RPC_TIMEOUT_MS, agent, &req, false);
            return;
        }
        let gw = self.gw_inc;
        // Slower than the timeout: the caller gives up, the agent still gets it.
        let reply = d <= RPC_TIMEOUT_MS;
        if !reply {
            self.fail_to_gw(now + RPC_TIMEOUT_MS, agent, &req, false);
        }
        if self.faults && self.rng.per_mille(self.dup_pm) {
            let again = now + d + self.rng.range(0, 1);
            let copy = Ev::ToAgent {
                agent,
                gw,
                req: req.clone(),
                sent: now,
                reply: false,
            };
            self.schedule(again, copy);
        }
        let ev = Ev::ToAgent {
            agent,
            gw,
            req,
            sent: now,
            reply,
        };
        self.schedule(now + d, ev);
    }

    fn run(mut self) -> Result<Stats, Violation> {
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            let Some(ev) = self.payloads.remove(&seq) else {
                continue;
            };
            self.now = at;
            self.stats.events += 1;
            if self.trace.len() >= self.trace_len {
                self.trace.pop_front();
            }
            self.trace.push_back((at, ev.clone()));
            self.handle(ev)?;
            if !self.faults && at % 500 == 0 && self.all_acked_final() {
                return Ok(self.stats);
            }
            if at > FAULT_MS + QUIET_MS {
                break;
            }
        }
        if self.all_acked_final() {
            return Ok(self.stats);
        }
        let stuck: Vec<String> = self
            .acked
            .iter()
            .filter_map(|id| {
                let t = self.gw.as_ref()?.task(*id)?;
                (!t.status.is_final())
                    .then(|| format!("task {id} {:?} attempt {}", t.status, t.attempt))
            })
            .chain(
                self.acked
                    .iter()
                    .filter(|id| self.gw.as_ref().is_some_and(|gw| gw.task(**id).is_none()))
                    .filter(|id| !self.stored(**id).is_some_and(|t| t.status.is_final()))
                    .map(|id| format!("task {id} forgotten before it ended")),
            )
            .collect();
        Err(self.violation(
            1,
            format!("{QUIET_MS} ms after the faults stopped, acknowledged tasks have not ended: {stuck:?}"),
        ))
    }

    /// The task as last written: a write not yet flushed, else the disk's.
    fn stored(&self, id: TaskId) -> Option<&Task> {
        self.unflushed
            .iter()
            .rev()
            .find(|t| t.id == id)
            .or_else(|| self.disk.get(&id))
    }

    /// Every acknowledged task ended: final in the controller, or forgotten by it
    /// (it keeps few ended tasks) and final as last written.
    fn all_acked_final(&self) -> bool {
        let Some(gw) = &self.gw else {
            return false;
        };
        self.acked.iter().all(|id| match gw.task(*id) {
            Some(t) => t.status.is_final(),
            None => self.stored(*id).is_some_and(|t| t.status.is_final()),
        })
    }

    fn handle(&mut self, ev: Ev) -> Result<(), Violation> {
        let now = self.now;
        match ev {
            Ev::GwTick => {
                self.schedule(now + GW_TICK_MS, Ev::GwTick);
                if now % BACKGROUND_FLUSH_MS == 0 {
                    self.flush();
                }
                if let Some(gw) = &mut self.gw {
                    let effects = gw.tick(now);
                    self.execute(effects)?;
                }
            }
            Ev::EchoRound => {
                self.schedule(now + ECHO_MS, Ev::EchoRound);
                if self.gw.is_some() {
                    let ids: Vec<AgentId> = self.agents.keys().copied().collect();
                    for a in ids {
                        self.send(a, Req::Echo);
                    }
                }
            }
            Ev::AgentTick(a) => {
                self.schedule(now + AGENT_TICK_MS, Ev::AgentTick(a));
                self.agent_tick(a)?;
            }
            Ev::Submit(task) => self.gw_step(Event::Submitted {
                task,
                call: Call {
                    procedure: PROCEDURE.into(),
                    ..Call::default()
                },
            })?,
            Ev::Cancel(task) => self.gw_step(Event::Cancel { task })?,
            Ev::Blacklist(agent, on) => self.gw_step(Event::Blacklist { agent, on })?,
            Ev::AgentCrash(a) => {
                if let Some(ag) = self.agents.get_mut(&a) {
                    if ag.up {
                        ag.up = false;
                        let back = now + self.rng.range(50, 600);
                        self.schedule(back, Ev::AgentRestart(a));
                    }
                }
            }
            Ev::AgentRestart(a) => {
                if let Some(ag) = self.agents.get_mut(&a) {
                    if !ag.up {
                        ag.up = true;
                        ag.lease_epoch = None;
                        for t in ag.tasks.values_mut() {
                            t.state = match &t.state {
                                AState::Running { .. } => AState::Ended {
                                    outcome: Outcome::Interrupted("the agent restarted".into()),
                                    due: Some(now),
                                },
                                AState::Asking { .. } => AState::Queued,
                                AState::Ended { outcome, .. } => AState::Ended {
                                    outcome: outcome.clone(),
                                    due: Some(now),
                                },
                                AState::Queued => AState::Queued,
                            };
                        }
                    }
                }
            }
            Ev::Partition(a, until) => {
                if let Some(ag) = self.agents.get_mut(&a) {
                    ag.partitioned_until = until;
                }
            }
            Ev::GwCrash => {
                if self.faults && self.gw.is_some() {
                    self.crash_armed = true;
                }
            }
            Ev::GwRestart => self.gw_restart()?,
            Ev::FaultsEnd => {
                self.faults = false;
                self.crash_armed = false;
                let ids: Vec<AgentId> = self.agents.keys().copied().collect();
                for a in ids {
                    if let Some(ag) = self.agents.get_mut(&a) {
                        ag.partitioned_until = 0;
                    }
                    self.schedule(now, Ev::AgentRestart(a));
                    // A blacklist left on could hold tasks for ever by design.
                    self.schedule(now + 1, Ev::Blacklist(a, false));
                }
                if self.gw.is_none() {
                    self.schedule(now, Ev::GwRestart);
                }
            }
            Ev::ToAgent {
                agent,
                gw,
                req,
                sent,
                reply,
            } => self.agent_request(agent, gw, req, sent, reply)?,
            Ev::ToGw { gw, ev } => {
                if gw == self.gw_inc {
                    self.gw_step(ev)?;
                }
            }
            Ev::SignalToGw {
                agent,
                task,
                attempt,
                signal,
                sent,
            } => {
                if self.gw.is_none() {
                    let ev = Ev::SignalReply {
                        agent,
                        task,
                        attempt,
                        signal,
                        sent,
                        result: None,
                    };
                    self.schedule(now, ev);
                } else {
                    self.signal_sent = sent;
                    self.gw_step(Event::Signal {
                        agent: Some(agent),
                        task,
                        attempt,
                        signal,
                        progress: None,
                    })?;
                }
            }
            Ev::SignalReply {
                agent,
                task,
                attempt,
                signal,
                sent,
                result,
            } => self.signal_reply(agent, (task, attempt), signal, sent, result)?,
        }
        Ok(())
    }

    fn gw_step(&mut self, ev: Event) -> Result<(), Violation> {
        let now = self.now;
        let Some(gw) = &mut self.gw else {
            return Ok(()); // Down: the caller's request fails.
        };
        let effects = gw.step(now, ev);
        self.execute(effects)
    }

    fn flush(&mut self) {
        for t in std::mem::take(&mut self.unflushed) {
            self.disk.insert(t.id, t);
        }
    }

    /// Carries out effects in order; an armed crash cuts the list at a random point.
    fn execute(&mut self, effects: Vec<Effect>) -> Result<(), Violation> {
        let cut = if self.crash_armed && !effects.is_empty() {
            Some(self.rng.below(effects.len() as u64 + 1) as usize)
        } else {
            None
        };
        for (i, e) in effects.into_iter().enumerate() {
            if Some(i) == cut {
                break;
            }
            self.effect(e)?;
        }
        if cut.is_some() {
            self.gw_crash();
        }
        Ok(())
    }

    fn gw_crash(&mut self) {
        self.crash_armed = false;
        self.stats.gateway_crashes += 1;
        // The disk keeps what was flushed and, of the writes after it, some prefix:
        // sled's log is written in order.
        let keep = self.rng.below(self.unflushed.len() as u64 + 1) as usize;
        self.unflushed.truncate(keep);
        self.flush();
        self.gw = None;
        self.gw_inc += 1;
        let back = self.now + self.rng.range(50, 500);
        self.schedule(back, Ev::GwRestart);
    }

    fn gw_restart(&mut self) -> Result<(), Violation> {
        if self.gw.is_some() {
            return Ok(());
        }
        let rules = Rules {
            durable_placement: !self.breaks.skip_durable_placement,
            reconcile_waiting: !self.breaks.no_reconcile_waiting,
            fence_unknown_attempts: !self.breaks.requeue_unknown_at_once,
        };
        let mut gw = Controller::new(config(self.gw_inc), rules, self.now);
        // Invariant 2: no acknowledged task is lost across a crash.
        if let Some(lost) = self.acked.iter().find(|id| !self.disk.contains_key(id)) {
            return Err(self.violation(
                2,
                format!("acknowledged task {lost} is not in the store after a restart"),
            ));
        }
        let tasks: Vec<Task> = self.disk.values().cloned().collect();
        let agents: Vec<AgentInfo> = self.agents_disk.values().copied().collect();
        let effects = gw.step(self.now, Event::Recovered { tasks, agents });
        self.gw = Some(gw);
        self.execute(effects)
    }

    fn effect(&mut self, e: Effect) -> Result<(), Violation> {
        match e {
            Effect::Persist { task, durable } => {
                self.check_persist(&task)?;
                if durable {
                    self.flush();
                    self.disk.insert(task.id, task);
                } else {
                    self.unflushed.push(task);
                }
            }
            Effect::PersistAgent(info) => {
                if info.blacklisted {
                    self.blacklisted.insert(info.id);
                } else {
                    self.blacklisted.remove(&info.id);
                }
                self.agents_disk.insert(info.id, info);
            }
            Effect::SendAtask {
                agent,
                task,
                attempt,
                epoch,
            } => {
                if self.blacklisted.contains(&agent) {
                    return Err(self.violation(
                        5,
                        format!("task {task} attempt {attempt} sent to blacklisted agent {agent}"),
                    ));
                }
                self.send(
                    agent,
                    Req::Atask {
                        task,
                        attempt,
                        epoch,
                    },
                );
            }
            Effect::SendGet {
                agent,
                task,
                attempt,
            } => self.send(agent, Req::Get { task, attempt }),
            Effect::SendTerminate {
                agent,
                task,
                attempt,
            } => self.send(agent, Req::Terminate { task, attempt }),
            Effect::Publish { .. } => {}
            Effect::Answer(Answer::Submit { task, result }) => {
                if result.is_ok() {
                    self.acked.insert(task);
                    self.stats.acked += 1;
                }
            }
            Effect::Answer(Answer::Signal {
                agent: Some(agent),
                task,
                attempt,
                signal,
                result,
            }) => {
                let sent = self.signal_sent;
                let at = if self.lost(agent) {
                    None
                } else {
                    Some(self.now + self.delay())
                };
                let (at, result) = match at {
                    Some(at) if at <= sent + RPC_TIMEOUT_MS => (at, Some(result)),
                    _ => (sent + RPC_TIMEOUT_MS, None),
                };
                let ev = Ev::SignalReply {
                    agent,
                    task,
                    attempt,
                    signal,
                    sent,
                    result,
                };
                self.schedule(at, ev);
            }
            Effect::Answer(Answer::Signal { agent: None, .. }) => {
                return Err(self.violation(0, "a SIGNAL answered without its sender".into()));
            }
            Effect::Answer(Answer::Cancel { .. } | Answer::Sync { .. }) => {}
            Effect::AgentState { .. } => {}
            Effect::SendTask { .. } => {
                return Err(self.violation(0, "a synchronous call nobody made".into()));
            }
        }
        Ok(())
    }

    /// Invariants 3 (the excused case), 4 and 6, on every write.
    fn check_persist(&mut self, t: &Task) -> Result<(), Violation> {
        if t.status == TaskStatus::Queued
            && t.attempt > 0
            && self.started.contains(&(t.id, t.attempt))
        {
            // Placed again although the attempt had started: the agent vanished
            // before its start reached the gateway. The one case the docs name.
            self.excused.insert(t.id);
        }
        if let Some(f) = self.finals.get(&t.id) {
            let same = f.status == t.status && f.result == t.result;
            let late = f.status == TaskStatus::Interrupted
                && t.status == TaskStatus::Done
                && t.attempt == f.attempt;
            if !same && !late {
                return Err(self.violation(
                    4,
                    format!(
                        "task {} left its final state {:?} for {:?}",
                        t.id, f.status, t.status
                    ),
                ));
            }
        }
        if t.status == TaskStatus::Done {
            let ok = self.completed.iter().any(|(a, task, n)| {
                *task == t.id && t.result.as_ref() == Some(&result_of(*a, *task, *n))
            });
            if !ok {
                return Err(self.violation(
                    6,
                    format!(
                        "task {} stored result {:?}, which no agent produced for it",
                        t.id, t.result
                    ),
                ));
            }
        }
        if t.status.is_final() {
            self.finals.insert(t.id, t.clone());
        }
        Ok(())
    }

    fn agent_request(
        &mut self,
        agent: AgentId,
        gw: u32,
        req: Req,
        sent: Millis,
        reply: bool,
    ) -> Result<(), Violation> {
        let now = self.now;
        if !self.agent_up(agent) {
            if reply {
                self.fail_at(gw, sent + RPC_TIMEOUT_MS, agent, &req);
            }
            return Ok(());
        }
        let ev = match req.clone() {
            Req::Echo => {
                let capacity = self.agents.get(&agent).map_or(0, |a| a.capacity);
                Some(Event::EchoAnswered {
                    agent,
                    capacity,
                    procedures: vec![PROCEDURE.into()],
                })
            }
            Req::Atask {
                task,
                attempt,
                epoch,
            } => {
                if let Some(ag) = self.agents.get_mut(&agent) {
                    ag.tasks.entry((task, attempt)).or_insert(ATask {
                        epoch,
                        state: AState::Queued,
                    });
                }
                self.try_start(agent)?;
                Some(Event::AtaskAnswered {
                    task,
                    attempt,
                    code: Code::Ok,
                    description: String::new(),
                })
            }
            Req::Get { task, attempt } => {
                let state = self
                    .agents
                    .get(&agent)
                    .and_then(|a| a.tasks.get(&(task, attempt)))
                    .map(|t| t.state.clone());
                let answer = match state {
                    None => GetAnswer::Unknown,
                    Some(AState::Queued | AState::Asking { .. }) => GetAnswer::Waiting,
                    Some(AState::Running { .. }) => GetAnswer::Running(None),
                    Some(AState::Ended { outcome, .. }) => GetAnswer::Ended(outcome),
                };
                Some(Event::GetAnswered {
                    task,
                    attempt,
                    answer,
                })
            }
            Req::Terminate { task, attempt } => {
                if let Some(ag) = self.agents.get_mut(&agent) {
                    ag.tasks.remove(&(task, attempt));
                }
                None
            }
        };
        if !reply {
            return Ok(());
        }
        let d = self.delay();
        if self.lost(agent) || now + d > sent + RPC_TIMEOUT_MS {
            self.fail_at(gw, sent + RPC_TIMEOUT_MS, agent, &req);
        } else if let Some(ev) = ev {
            self.schedule(now + d, Ev::ToGw { gw, ev });
        }
        Ok(())
    }

    fn fail_at(&mut self, gw: u32, at: Millis, agent: AgentId, req: &Req) {
        let ev = match req {
            Req::Echo => Some(Event::EchoMissed { agent }),
            r => Sim::failure(r, false),
        };
        if let Some(ev) = ev {
            self.schedule(at, Ev::ToGw { gw, ev });
        }
    }

    fn signal(&mut self, agent: AgentId, (task, attempt): (TaskId, u32), signal: Signal) {
        let now = self.now;
        let sent = now;
        let lost = self.lost(agent);
        let d = self.delay();
        let ev = if lost {
            (
                now + RPC_TIMEOUT_MS,
                Ev::SignalReply {
                    agent,
                    task,
                    attempt,
                    signal,
                    sent,
                    result: None,
                },
            )
        } else {
            (
                now + d,
                Ev::SignalToGw {
                    agent,
                    task,
                    attempt,
                    signal,
                    sent,
                },
            )
        };
        self.schedule(ev.0, ev.1);
        if !lost && self.faults && self.rng.per_mille(self.dup_pm) {
            // A duplicate whose answer nobody waits for.
            let copy = Ev::SignalToGw {
                agent,
                task,
                attempt,
                signal,
                sent,
            };
            self.schedule(now + d + 1, copy);
        }
    }

    /// Starts what the agent may start in its free slots; asks about the rest.
    fn try_start(&mut self, agent: AgentId) -> Result<(), Violation> {
        let now = self.now;
        let breaks = self.breaks;
        let Some(ag) = self.agents.get(&agent) else {
            return Ok(());
        };
        if !ag.up {
            return Ok(());
        }
        let waiting: Vec<((TaskId, u32), u64)> = ag
            .tasks
            .iter()
            .filter(|(_, t)| t.state == AState::Queued)
            .map(|(k, t)| (*k, t.epoch))
            .collect();
        for (key, epoch) in waiting {
            let Some(ag) = self.agents.get(&agent) else {
                break;
            };
            if ag.slots_used() >= ag.capacity {
                break;
            }
            if ag.lease_holds(now, epoch) || breaks.agent_starts_withdrawn {
                self.start(agent, key)?;
            } else if let Some(t) = self
                .agents
                .get_mut(&agent)
                .and_then(|a| a.tasks.get_mut(&key))
            {
                t.state = AState::Asking { due: now };
            }
        }
        Ok(())
    }

    fn start(&mut self, agent: AgentId, key: (TaskId, u32)) -> Result<(), Violation> {
        let ends = self.now + self.rng.range(10, 300);
        let Some(ag) = self.agents.get_mut(&agent) else {
            return Ok(());
        };
        if let Some(t) = ag.tasks.get_mut(&key) {
            t.state = AState::Running { ends };
        }
        let running = ag
            .tasks
            .values()
            .filter(|t| matches!(t.state, AState::Running { .. }))
            .count() as u32;
        if running > ag.capacity {
            let cap = ag.capacity;
            return Err(self.violation(
                5,
                format!("agent {agent} runs {running} tasks, over its capacity {cap}"),
            ));
        }
        self.started.insert(key);
        self.signal(agent, key, Signal::Started);
        Ok(())
    }

    fn agent_tick(&mut self, agent: AgentId) -> Result<(), Violation> {
        let now = self.now;
        if !self.agent_up(agent) {
            return Ok(());
        }
        let mut sends = Vec::new();
        let mut ended = Vec::new();
        if let Some(ag) = self.agents.get_mut(&agent) {
            for (key, t) in ag.tasks.iter_mut() {
                match t.state {
                    AState::Running { ends } if ends <= now => {
                        t.state = AState::Ended {
                            outcome: Outcome::Done(result_of(agent, key.0, key.1)),
                            due: Some(now),
                        };
                        ended.push(*key);
                    }
                    AState::Asking { due } if due <= now => {
                        t.state = AState::Asking {
                            due: now + SIGNAL_RETRY_MS,
                        };
                        sends.push((*key, Signal::AskStart));
                    }
                    AState::Ended { due: Some(due), .. } if due <= now => {
                        if let AState::Ended { due, .. } = &mut t.state {
                            *due = Some(now + SIGNAL_RETRY_MS);
                        }
                        sends.push((*key, Signal::Ended));
                    }
                    _ => {}
                }
            }
        }
        for key in ended {
            self.completed.insert((agent, key.0, key.1));
            let n = {
                let n = self.completions.entry(key.0).or_insert(0);
                *n += 1;
                *n
            };
            if n > 1 {
                if !self.excused.contains(&key.0) {
                    return Err(self.violation(3, format!("task {} ran to completion {n} times (last: attempt {} on agent {agent})", key.0, key.1)));
                }
                self.stats.excused_doubles += 1;
            }
        }
        for (key, signal) in sends {
            self.signal(agent, key, signal);
        }
        self.try_start(agent)
    }

    fn signal_reply(
        &mut self,
        agent: AgentId,
        key: (TaskId, u32),
        signal: Signal,
        sent: Millis,
        result: Option<Result<Grant, SignalRefusal>>,
    ) -> Result<(), Violation> {
        let Some(result) = result else {
            return Ok(()); // Retried at its due time (start and end), or lost (progress).
        };
        let Some(ag) = self.agents.get_mut(&agent) else {
            return Ok(());
        };
        if !ag.up {
            return Ok(());
        }
        if let Ok(g) = result {
            // Counted from the send, under the epoch the grant carries.
            let end = sent + g.lease_ms;
            if ag.lease_epoch == Some(g.epoch) {
                ag.lease_end = ag.lease_end.max(end);
            } else {
                ag.lease_epoch = Some(g.epoch);
                ag.lease_end = end;
            }
        }
        let state = ag.tasks.get(&key).map(|t| t.state.clone());
        match (signal, state, result) {
            (Signal::AskStart, Some(AState::Asking { .. }), Ok(_)) => self.start(agent, key)?,
            (Signal::AskStart, Some(AState::Asking { .. }), Err(_)) => {
                // Withdrawn: dropped, never started.
                ag.tasks.remove(&key);
            }
            (Signal::Ended, Some(AState::Ended { outcome, .. }), _) => {
                if let Some(t) = ag.tasks.get_mut(&key) {
                    t.state = AState::Ended { outcome, due: None };
                }
            }
            _ => {}
        }
        Ok(())
    }
}

pub fn run_seed(seed: u64, breaks: Breaks) -> Result<Stats, Violation> {
    Sim::new(seed, breaks).run()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The first seed below `limit` whose run breaks an invariant.
fn first_failure(breaks: Breaks, limit: u64) -> Option<Violation> {
    (0..limit).find_map(|seed| run_seed(seed, breaks).err())
}

#[test]
fn the_rules_keep_every_invariant_under_faults() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(10_000)).collect(),
    };
    let started = std::time::Instant::now();
    // Seeds are independent: spread them over the cores, and report the
    // smallest failing seed whatever thread found it.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: Vec<Result<Stats, Violation>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let mine: Vec<u64> = seeds.iter().copied().skip(i).step_by(threads).collect();
                s.spawn(move || {
                    let mut total = Stats::default();
                    for seed in mine {
                        let st = run_seed(seed, Breaks::default())?;
                        total.events += st.events;
                        total.acked += st.acked;
                        total.excused_doubles += st.excused_doubles;
                        total.gateway_crashes += st.gateway_crashes;
                    }
                    Ok(total)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(st) => {
                total.events += st.events;
                total.acked += st.acked;
                total.excused_doubles += st.excused_doubles;
                total.gateway_crashes += st.gateway_crashes;
            }
            Err(v) => failures.push(v),
        }
    }
    if let Some(v) = failures.into_iter().min_by_key(|v| v.seed) {
        panic!("{v}");
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} seeds in {secs:.2} s ({:.0} seeds/s): {} events, {} acknowledged tasks, {} gateway crashes, \
         {} tasks run twice in the case the docs name",
        seeds.len(),
        seeds.len() as f64 / secs.max(1e-9),
        total.events,
        total.acked,
        total.gateway_crashes,
        total.excused_doubles
    );
    assert!(
        total.acked > 0 || seeds.len() < 10,
        "the runs acknowledged no task: they test nothing"
    );
}

/// How many seeds a deliberately broken rule may survive.
const BITE_WITHIN: u64 = 2_000;

fn assert_bites(breaks: Breaks, invariant: u8) {
    assert_bites_within(breaks, invariant, BITE_WITHIN)
}

fn assert_bites_within(breaks: Breaks, invariant: u8, limit: u64) {
    let v = first_failure(breaks, limit)
        .unwrap_or_else(|| panic!("{breaks:?} broke no invariant in {limit} seeds"));
    eprintln!(
        "{breaks:?}: found at seed {} (invariant {}): {}",
        v.seed, v.invariant, v.what
    );
    assert_eq!(v.invariant, invariant, "{v}");
}

#[test]
fn skipping_the_durable_write_before_atask_is_found() {
    assert_bites(
        Breaks {
            skip_durable_placement: true,
            ..Breaks::default()
        },
        3,
    );
}

#[test]
fn an_agent_starting_a_withdrawn_attempt_is_found() {
    assert_bites(
        Breaks {
            agent_starts_withdrawn: true,
            ..Breaks::default()
        },
        3,
    );
}

#[test]
fn waiting_for_ever_on_a_task_that_never_starts_is_found() {
    assert_bites(
        Breaks {
            no_reconcile_waiting: true,
            ..Breaks::default()
        },
        1,
    );
}

#[test]
fn requeueing_an_attempt_its_agent_does_not_know_at_once_is_found() {
    // The rule the documentation gave before the simulation: a late ATASK can
    // then start a second copy.
    // A rarer race (a delivery slower than the timeout crossing a restart).
    assert_bites_within(
        Breaks {
            requeue_unknown_at_once: true,
            ..Breaks::default()
        },
        3,
        10_000,
    );
}
