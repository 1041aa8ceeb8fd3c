//! The rules of a task's life on the agent, as a value: no I/O, no clock, no tokio,
//! no locks. The driver (`TaskRunner`, `tasks.rs`) turns requests, finished writes,
//! ended procedures and controller answers into [`Event`]s, and carries out the
//! [`Effect`]s `Runner::step` returns, in order. Every effect that needs I/O to
//! complete (a durable write, a start question, a procedure) is reported back by
//! exactly one event, so the runner always knows what is in flight.
//!
//! It owns: the FIFO of waiting attempts over `capacity` slots (synchronous TASKs
//! wait in the same line), the lease rule (an attempt starts unasked only while the
//! lease of the epoch it was accepted in holds; see `lease.rs`), the re-check of
//! that lease *after* the durable "running" write, what `terminate` does in each
//! state, and the limits on what it holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::lease::{AcceptedUnder, LeaseState};
use super::store::TaskState;
use crate::arpcp::{Code, Progress, TaskError};

/// Unfinished tasks an agent holds at once; ATASK beyond it is refused (300), so a
/// flood of requests cannot grow memory without bound.
pub const MAX_UNFINISHED_TASKS: usize = 100_000;
/// Synchronous TASKs waiting for a slot at once; one more is refused (300).
pub const MAX_WAITING_SYNC: usize = 10_000;
/// Progress SIGNALs of one task are sent at most this often.
pub const PROGRESS_SIGNAL_INTERVAL: Duration = Duration::from_millis(200);

/// Why a task was recorded interrupted.
pub const INTERRUPTED_BY_SHUTDOWN: &str = "agent shut down before the task finished";
pub const INTERRUPTED_BY_RESTART: &str = "agent stopped while the task was running";

/// How a task ended, as it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<TaskError>,
}

impl Ending {
    pub fn interrupted(why: &str) -> Ending {
        Ending {
            state: TaskState::Interrupted,
            result: None,
            error: Some(TaskError {
                code: Code::Execution,
                description: why.into(),
            }),
        }
    }
}

/// What a write stores about a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A new record in this state (`Queued` or `Running`).
    New(TaskState),
    Running,
    Ended(Ending),
}

/// What the store held under an ATASK's id when it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// The same procedure and arguments: a repeat of the call.
    SameCall { ended: bool },
    /// Another call under a used id.
    OtherCall,
}

/// Why an ATASK was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ShuttingDown,
    Full {
        limit: usize,
    },
    IdReused,
    /// A terminated attempt with this id still has a write or a question in flight.
    StillClearing,
    /// Its record could not be made durable (the store's words).
    NotDurable(String),
}

/// The controller's answer to "may this attempt start?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAnswer {
    Go,
    /// Placed elsewhere (or cancelled): it must not run.
    Withdrawn,
    /// No answer came (the question was stopped, or the agent shuts down).
    None,
}

/// How a procedure stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Ran {
    /// It returned (a result, a failure, a run-time argument error).
    Returned(Ending),
    /// It was stopped on a `Stop` effect.
    Stopped,
}

/// A task found in the store at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub state: TaskState,
    pub final_signal_answered: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The controller's lease as it is now (the driver passes it before deciding).
    Lease(LeaseState),
    /// ATASK with a known, valid procedure; `placed_in` is its `lease_epoch`.
    Atask {
        id: String,
        placed_in: Option<u64>,
        previous: Option<Previous>,
    },
    /// A `Persist { durable: true }` finished (`Err`: the store's words).
    Persisted {
        id: String,
        result: Result<(), String>,
    },
    StartAnswered {
        id: String,
        answer: StartAnswer,
    },
    Progress {
        id: String,
        progress: Progress,
    },
    Ended {
        id: String,
        ran: Ran,
    },
    /// SIGNAL terminate; `stored`: the store holds a record under the id.
    Terminate {
        id: String,
        stored: bool,
    },
    Get {
        id: String,
    },
    Recovered {
        tasks: Vec<Stored>,
    },
    /// A synchronous TASK wants a slot.
    SyncAsked {
        ticket: u64,
    },
    /// A synchronous TASK is over (answered, timed out, or its caller left).
    SyncGone {
        ticket: u64,
    },
    /// Stop taking tasks; waiting ones stay queued in the store for the next start.
    Shutdown,
    /// The grace period is over: running procedures stop and are recorded
    /// interrupted.
    Interrupt,
}

/// SIGNALs to the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// `accepted`: held, waiting for a slot.
    Accepted,
    /// `accepted` with progress: it runs.
    Progress(Progress),
    /// The final SIGNAL of the stored ending.
    Finished,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store the change; with `durable`, wait for the disk and report `Persisted`.
    Persist {
        id: String,
        write: Write,
        durable: bool,
    },
    /// Delete the task's record.
    Remove {
        id: String,
    },
    /// Start the procedure; report `Ended` when it stops.
    Start {
        id: String,
    },
    /// Stop what is in flight for the task: its procedure, write or question.
    Stop {
        id: String,
    },
    /// Kill programs an earlier process of the agent left running for the task.
    KillLeftovers {
        id: String,
    },
    Signal {
        id: String,
        signal: Signal,
    },
    /// Ask the controller whether the attempt may start; report `StartAnswered`.
    AskStart {
        id: String,
    },
    /// Mark the final SIGNAL unanswered and send it again.
    ResendFinal {
        id: String,
    },
    ReplyAtask {
        id: String,
        answer: Result<(), Refusal>,
    },
    AnswerGet {
        id: String,
        running: bool,
        progress: Option<Progress>,
    },
    /// `known`: the agent held the task (else 205).
    AnswerTerminate {
        id: String,
        known: bool,
    },
    /// The synchronous TASK may run now (on a slot until `SyncGone`).
    RunSync {
        ticket: u64,
    },
    RefuseSync {
        ticket: u64,
        limit: usize,
    },
}

/// Where a held task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its new record is being made durable; `slot` when stored as running.
    Admitting {
        under: AcceptedUnder,
        slot: bool,
    },
    /// In the FIFO, no slot.
    Waiting {
        under: AcceptedUnder,
    },
    /// On a slot, asking the controller; `written`: its "running" is durable.
    Asking {
        under: AcceptedUnder,
        written: bool,
    },
    /// On a slot, its "running" being made durable.
    Starting {
        under: AcceptedUnder,
        confirmed: bool,
    },
    Running,
    /// Terminated while running: on its slot until the procedure stops.
    Stopping,
    /// Off its slot, its ending being made durable.
    Ending,
    /// Terminated, or given up, with an I/O of it still to report back;
    /// `reply`: its ATASK is still to be answered.
    Clearing {
        reply: bool,
    },
}

#[derive(Debug, Clone)]
struct Held {
    phase: Phase,
    /// Interrupted at the end of a shutdown: recorded so, whatever it was doing.
    interrupted: bool,
    progress: Option<Progress>,
    last_progress_signal: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    Task,
    Sync(u64),
}

/// Rules a test may break, to show that the property test notices; all kept in
/// every other build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaks {
    /// Start once "running" is durable without checking the lease again.
    pub skip_recheck: bool,
    /// Treat a withdrawal as a yes.
    pub start_withdrawn: bool,
    /// Keep the slot of an attempt that was withdrawn.
    pub keep_slot_on_withdrawal: bool,
}

/// The agent's tasks and slots.
#[derive(Debug, Clone)]
pub struct Runner {
    breaks: Breaks,
    capacity: usize,
    lease: LeaseState,
    tasks: HashMap<String, Held>,
    /// Who waits for a slot, first first (a task with its id; a sync's is empty).
    fifo: VecDeque<(Waiter, String)>,
    /// Slots taken by tasks (asking, starting, running, stopping) and syncs.
    slots_used: usize,
    /// Synchronous TASKs on a slot.
    syncs_running: HashSet<u64>,
    draining: bool,
    interrupted: bool,
}

impl Runner {
    pub fn new(capacity: u32) -> Runner {
        Runner {
            breaks: Breaks::default(),
            capacity: capacity.max(1) as usize,
            lease: LeaseState::default(),
            tasks: HashMap::new(),
            fifo: VecDeque::new(),
            slots_used: 0,
            syncs_running: HashSet::new(),
            draining: false,
            interrupted: false,
        }
    }

    #[cfg(test)]
    pub fn with_breaks(mut self, breaks: Breaks) -> Runner {
        self.breaks = breaks;
        self
    }

    /// Procedures running now (tasks and synchronous TASKs).
    pub fn running(&self) -> usize {
        self.syncs_running.len()
            + self
                .tasks
                .values()
                .filter(|h| matches!(h.phase, Phase::Running | Phase::Stopping))
                .count()
    }

    /// Slots taken now.
    #[cfg(test)]
    pub fn slots_used(&self) -> usize {
        self.slots_used
    }

    /// Tasks held that do not run (waiting for a slot, being admitted or asking).
    pub fn waiting(&self) -> usize {
        self.tasks
            .values()
            .filter(|h| {
                matches!(
                    h.phase,
                    Phase::Admitting { .. }
                        | Phase::Waiting { .. }
                        | Phase::Asking { .. }
                        | Phase::Starting { .. }
                )
            })
            .count()
    }

    /// Tasks held, in any phase.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.tasks.len()
    }

    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::Lease(l) => self.lease = l,
            Event::Atask {
                id,
                placed_in,
                previous,
            } => self.atask(now, id, placed_in, previous, &mut out),
            Event::Persisted { id, result } => self.persisted(now, id, result, &mut out),
            Event::StartAnswered { id, answer } => self.start_answered(now, id, answer, &mut out),
            Event::Progress { id, progress } => {
                if let Some(h) = self.tasks.get_mut(&id) {
                    if h.phase == Phase::Running {
                        h.progress = Some(progress.clone());
                        let due = h.last_progress_signal.is_none_or(|t| {
                            now.saturating_duration_since(t) >= PROGRESS_SIGNAL_INTERVAL
                        });
                        if due {
                            h.last_progress_signal = Some(now);
                            out.push(Effect::Signal {
                                id,
                                signal: Signal::Progress(progress),
                            });
                        }
                    }
                }
            }
            Event::Ended { id, ran } => self.ended(now, id, ran, &mut out),
            Event::Terminate { id, stored } => self.terminate(now, id, stored, &mut out),
            Event::Get { id } => {
                let (running, progress) = match self.tasks.get(&id) {
                    Some(h) => (
                        matches!(h.phase, Phase::Running | Phase::Stopping | Phase::Ending),
                        h.progress.clone(),
                    ),
                    None => (false, None),
                };
                out.push(Effect::AnswerGet {
                    id,
                    running,
                    progress,
                });
            }
            Event::Recovered { tasks } => {
                for t in tasks {
                    self.recovered(t, &mut out);
                }
            }
            Event::SyncAsked { ticket } => {
                if self.fifo.is_empty() && self.slots_used < self.capacity {
                    self.slots_used += 1;
                    self.syncs_running.insert(ticket);
                    out.push(Effect::RunSync { ticket });
                } else if self.waiting_syncs() >= MAX_WAITING_SYNC {
                    out.push(Effect::RefuseSync {
                        ticket,
                        limit: MAX_WAITING_SYNC,
                    });
                } else {
                    self.fifo.push_back((Waiter::Sync(ticket), String::new()));
                }
            }
            Event::SyncGone { ticket } => {
                if self.syncs_running.remove(&ticket) {
                    self.free_slot(now, &mut out);
                } else {
                    self.fifo.retain(|(w, _)| *w != Waiter::Sync(ticket));
                }
            }
            Event::Shutdown => {
                self.draining = true;
                // Waiting tasks stay queued in the store; a restarted agent runs them.
                let mut kept = VecDeque::new();
                for (w, id) in self.fifo.drain(..) {
                    match w {
                        Waiter::Task => {
                            self.tasks.remove(&id);
                        }
                        Waiter::Sync(_) => kept.push_back((w, id)),
                    }
                }
                self.fifo = kept;
                // A task asking whether it may start goes on asking: the controller
                // may have said yes already and shows it running, so a yes starts it
                // within the grace period like the tasks already running.
            }
            Event::Interrupt => {
                self.interrupted = true;
                // The grace period is over: questions still open end unanswered
                // (the task stays in the store for the next start).
                let asking: Vec<String> = self
                    .tasks
                    .iter()
                    .filter(|(_, h)| matches!(h.phase, Phase::Asking { .. }))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in asking {
                    if let Some(h) = self.tasks.get_mut(&id) {
                        h.phase = Phase::Clearing { reply: false };
                    }
                    out.push(Effect::Stop { id });
                    self.free_slot(now, &mut out);
                }
                let mut running: Vec<String> = Vec::new();
                for (id, h) in self.tasks.iter_mut() {
                    if h.phase == Phase::Running {
                        h.interrupted = true;
                        running.push(id.clone());
                    }
                }
                running.sort();
                for id in running {
                    out.push(Effect::Stop { id });
                }
            }
        }
        out
    }

    fn waiting_syncs(&self) -> usize {
        self.fifo
            .iter()
            .filter(|(w, _)| matches!(w, Waiter::Sync(_)))
            .count()
    }

    fn atask(
        &mut self,
        now: Instant,
        id: String,
        placed_in: Option<u64>,
        previous: Option<Previous>,
        out: &mut Vec<Effect>,
    ) {
        // A draining or full agent refuses every ATASK before it looks at the id,
        // a repeat too.
        let refusal = if self.draining {
            Some(Refusal::ShuttingDown)
        } else if self.tasks.len() >= MAX_UNFINISHED_TASKS {
            Some(Refusal::Full {
                limit: MAX_UNFINISHED_TASKS,
            })
        } else {
            match previous {
                Some(Previous::OtherCall) => Some(Refusal::IdReused),
                Some(Previous::SameCall { ended }) => {
                    // It may have lost what we told it (it crashed before
                    // storing): tell it again how the task ended.
                    if ended {
                        out.push(Effect::ResendFinal { id: id.clone() });
                    }
                    out.push(Effect::ReplyAtask { id, answer: Ok(()) });
                    return;
                }
                None if self.tasks.contains_key(&id) => Some(Refusal::StillClearing),
                None => None,
            }
        };
        if let Some(r) = refusal {
            out.push(Effect::ReplyAtask { id, answer: Err(r) });
            return;
        }
        let under = self.lease.accepting(placed_in, now);
        // With a free slot, nobody ahead, and nothing to ask the controller first,
        // the task is stored as running at once: one durable write covers its
        // acceptance and its start.
        let slot =
            under != AcceptedUnder::Ask && self.fifo.is_empty() && self.slots_used < self.capacity;
        if slot {
            self.slots_used += 1;
        }
        self.tasks.insert(
            id.clone(),
            Held {
                phase: Phase::Admitting { under, slot },
                interrupted: false,
                progress: None,
                last_progress_signal: None,
            },
        );
        out.push(Effect::Persist {
            id,
            write: Write::New(if slot {
                TaskState::Running
            } else {
                TaskState::Queued
            }),
            durable: true,
        });
    }

    fn persisted(
        &mut self,
        now: Instant,
        id: String,
        result: Result<(), String>,
        out: &mut Vec<Effect>,
    ) {
        let Some(h) = self.tasks.get(&id) else {
            return;
        };
        match (h.phase, result) {
            (Phase::Admitting { slot, .. }, Err(e)) => {
                // Not durable: the ATASK fails and nothing runs.
                self.tasks.remove(&id);
                out.push(Effect::Remove { id: id.clone() });
                out.push(Effect::ReplyAtask {
                    id,
                    answer: Err(Refusal::NotDurable(e)),
                });
                if slot {
                    self.free_slot(now, out);
                }
            }
            (Phase::Admitting { under, slot }, Ok(())) => {
                out.push(Effect::ReplyAtask {
                    id: id.clone(),
                    answer: Ok(()),
                });
                if slot {
                    self.running_durable(now, id, under, false, out);
                } else if self.draining {
                    self.tasks.remove(&id);
                } else if self.fifo.is_empty() && self.slots_used < self.capacity {
                    self.slots_used += 1;
                    self.take_slot(now, id, under, out);
                } else {
                    out.push(Effect::Signal {
                        id: id.clone(),
                        signal: Signal::Accepted,
                    });
                    self.set_phase(&id, Phase::Waiting { under });
                    self.fifo.push_back((Waiter::Task, id));
                }
            }
            (Phase::Starting { under, confirmed }, Ok(())) => {
                self.running_durable(now, id, under, confirmed, out);
            }
            (Phase::Starting { .. }, Err(_)) => {
                // Stays queued in the store; the next start of the agent runs it.
                self.tasks.remove(&id);
                self.free_slot(now, out);
            }
            (Phase::Ending, Ok(())) => {
                self.tasks.remove(&id);
                out.push(Effect::Signal {
                    id,
                    signal: Signal::Finished,
                });
            }
            (Phase::Ending, Err(_)) => {
                // Left "running" in the store: the next start reports it interrupted.
                self.tasks.remove(&id);
            }
            (Phase::Clearing { reply }, r) => {
                self.tasks.remove(&id);
                if reply {
                    out.push(Effect::ReplyAtask {
                        id,
                        answer: r.map_err(Refusal::NotDurable),
                    });
                }
            }
            // No write of these phases is in flight.
            (
                Phase::Waiting { .. } | Phase::Asking { .. } | Phase::Running | Phase::Stopping,
                _,
            ) => {}
        }
    }

    /// Its "running" is on disk. The lease is checked again here, after the write,
    /// which may have waited for the disk (or the process been paused during it):
    /// deciding before it and starting after would start an attempt the controller
    /// withdrew once the lease ended.
    fn running_durable(
        &mut self,
        now: Instant,
        id: String,
        under: AcceptedUnder,
        confirmed: bool,
        out: &mut Vec<Effect>,
    ) {
        if self.interrupted || self.tasks.get(&id).is_some_and(|h| h.interrupted) {
            self.end(now, id, Ending::interrupted(INTERRUPTED_BY_SHUTDOWN), out);
            return;
        }
        if confirmed || self.breaks.skip_recheck || self.lease.may_start(under, now) {
            self.start(id, out);
        } else {
            self.ask(id, under, true, out);
        }
    }

    /// Starts the procedure; `accepted` with progress tells the controller it runs.
    fn start(&mut self, id: String, out: &mut Vec<Effect>) {
        self.set_phase(&id, Phase::Running);
        out.push(Effect::Start { id: id.clone() });
        out.push(Effect::Signal {
            id,
            signal: Signal::Progress(Progress {
                percent: 0.0,
                comment: "started".into(),
            }),
        });
    }

    /// Asks the controller whether the task may start; `written`: it is already
    /// stored as running.
    fn ask(&mut self, id: String, under: AcceptedUnder, written: bool, out: &mut Vec<Effect>) {
        self.set_phase(&id, Phase::Asking { under, written });
        out.push(Effect::AskStart { id });
    }

    /// A waiting task got a slot (already counted).
    fn take_slot(&mut self, now: Instant, id: String, under: AcceptedUnder, out: &mut Vec<Effect>) {
        // The lease it was accepted under ran out (a pause, a partition, a
        // restart): the controller may have placed it elsewhere meanwhile.
        if self.lease.may_start(under, now) {
            self.set_phase(
                &id,
                Phase::Starting {
                    under,
                    confirmed: false,
                },
            );
            out.push(Effect::Persist {
                id,
                write: Write::Running,
                durable: true,
            });
        } else {
            self.ask(id, under, false, out);
        }
    }

    fn start_answered(
        &mut self,
        now: Instant,
        id: String,
        answer: StartAnswer,
        out: &mut Vec<Effect>,
    ) {
        let Some(h) = self.tasks.get(&id) else {
            return;
        };
        match h.phase {
            Phase::Asking { under, written } => {
                let go = match answer {
                    StartAnswer::Go => true,
                    StartAnswer::Withdrawn => self.breaks.start_withdrawn,
                    StartAnswer::None => false,
                };
                if go && written {
                    self.start(id, out);
                } else if go {
                    self.set_phase(
                        &id,
                        Phase::Starting {
                            under,
                            confirmed: true,
                        },
                    );
                    out.push(Effect::Persist {
                        id,
                        write: Write::Running,
                        durable: true,
                    });
                } else if answer == StartAnswer::Withdrawn {
                    self.tasks.remove(&id);
                    out.push(Effect::Remove { id });
                    if !self.breaks.keep_slot_on_withdrawal {
                        self.free_slot(now, out);
                    }
                } else {
                    // No answer: it stays queued in the store for the next start.
                    self.tasks.remove(&id);
                    self.free_slot(now, out);
                }
            }
            // Terminated while asking: the question is over, nothing else is owed.
            Phase::Clearing { reply: false } => {
                self.tasks.remove(&id);
            }
            _ => {}
        }
    }

    fn ended(&mut self, now: Instant, id: String, ran: Ran, out: &mut Vec<Effect>) {
        let Some(h) = self.tasks.get(&id) else {
            return;
        };
        let interrupted = h.interrupted;
        match (h.phase, ran) {
            (Phase::Stopping, _) => {
                self.tasks.remove(&id);
                self.free_slot(now, out);
            }
            (Phase::Running, Ran::Returned(ending)) => {
                self.free_slot(now, out);
                self.persist_ending(id, ending, out);
            }
            (Phase::Running, Ran::Stopped) => {
                let why = if interrupted {
                    INTERRUPTED_BY_SHUTDOWN
                } else {
                    "the task's procedure was stopped"
                };
                self.free_slot(now, out);
                self.persist_ending(id, Ending::interrupted(why), out);
            }
            _ => {}
        }
    }

    /// Records the ending of a task that holds no slot (any more).
    fn persist_ending(&mut self, id: String, ending: Ending, out: &mut Vec<Effect>) {
        self.set_phase(&id, Phase::Ending);
        out.push(Effect::Persist {
            id,
            write: Write::Ended(ending),
            durable: true,
        });
    }

    /// Ends a task on a slot without running it.
    fn end(&mut self, now: Instant, id: String, ending: Ending, out: &mut Vec<Effect>) {
        self.free_slot(now, out);
        self.persist_ending(id, ending, out);
    }

    fn terminate(&mut self, now: Instant, id: String, stored: bool, out: &mut Vec<Effect>) {
        let Some(h) = self.tasks.get(&id) else {
            if stored {
                out.push(Effect::Remove { id: id.clone() });
            }
            out.push(Effect::AnswerTerminate { id, known: stored });
            return;
        };
        out.push(Effect::Remove { id: id.clone() });
        match h.phase {
            Phase::Admitting { slot, .. } => {
                // The ATASK is answered once its write is done.
                self.set_phase(&id, Phase::Clearing { reply: true });
                if slot {
                    self.free_slot(now, out);
                }
            }
            Phase::Waiting { .. } => {
                self.tasks.remove(&id);
                self.fifo.retain(|(w, t)| !(*w == Waiter::Task && *t == id));
            }
            Phase::Asking { .. } | Phase::Starting { .. } => {
                out.push(Effect::Stop { id: id.clone() });
                self.set_phase(&id, Phase::Clearing { reply: false });
                self.free_slot(now, out);
            }
            Phase::Running => {
                out.push(Effect::Stop { id: id.clone() });
                self.set_phase(&id, Phase::Stopping);
            }
            Phase::Ending => {
                // Its write finds no record: no final SIGNAL goes out.
                self.set_phase(&id, Phase::Clearing { reply: false });
            }
            Phase::Stopping | Phase::Clearing { .. } => {}
        }
        out.push(Effect::AnswerTerminate { id, known: true });
    }

    fn recovered(&mut self, t: Stored, out: &mut Vec<Effect>) {
        match t.state {
            TaskState::Queued => {
                // Not counted against `MAX_UNFINISHED_TASKS`: each was accepted
                // under it, and one left out would wait in the store for ever.
                if self.tasks.contains_key(&t.id) {
                    return;
                }
                // Stored by an earlier process: it asks before it starts.
                let under = AcceptedUnder::Ask;
                self.tasks.insert(
                    t.id.clone(),
                    Held {
                        phase: Phase::Waiting { under },
                        interrupted: false,
                        progress: None,
                        last_progress_signal: None,
                    },
                );
                if self.fifo.is_empty() && self.slots_used < self.capacity {
                    self.slots_used += 1;
                    self.ask(t.id, under, false, out);
                } else {
                    out.push(Effect::Signal {
                        id: t.id.clone(),
                        signal: Signal::Accepted,
                    });
                    self.fifo.push_back((Waiter::Task, t.id));
                }
            }
            TaskState::Running => {
                // Its program may have outlived the agent's crash: a task reported
                // interrupted must not go on running.
                out.push(Effect::KillLeftovers { id: t.id.clone() });
                self.tasks.insert(
                    t.id.clone(),
                    Held {
                        phase: Phase::Ending,
                        interrupted: false,
                        progress: None,
                        last_progress_signal: None,
                    },
                );
                out.push(Effect::Persist {
                    id: t.id,
                    write: Write::Ended(Ending::interrupted(INTERRUPTED_BY_RESTART)),
                    durable: true,
                });
            }
            _ if !t.final_signal_answered => out.push(Effect::Signal {
                id: t.id,
                signal: Signal::Finished,
            }),
            _ => {}
        }
    }

    fn set_phase(&mut self, id: &str, phase: Phase) {
        if let Some(h) = self.tasks.get_mut(id) {
            h.phase = phase;
        }
    }

    /// A slot was given back: the first in line gets it.
    fn free_slot(&mut self, now: Instant, out: &mut Vec<Effect>) {
        self.slots_used = self.slots_used.saturating_sub(1);
        while self.slots_used < self.capacity {
            let Some((w, id)) = self.fifo.pop_front() else {
                return;
            };
            match w {
                Waiter::Sync(ticket) => {
                    self.slots_used += 1;
                    self.syncs_running.insert(ticket);
                    out.push(Effect::RunSync { ticket });
                }
                Waiter::Task => {
                    let Some(Phase::Waiting { under }) = self.tasks.get(&id).map(|h| h.phase)
                    else {
                        continue;
                    };
                    self.slots_used += 1;
                    self.take_slot(now, id, under, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn id(s: &str) -> String {
        s.to_string()
    }

    fn atask(name: &str, placed_in: Option<u64>) -> Event {
        Event::Atask {
            id: id(name),
            placed_in,
            previous: None,
        }
    }

    fn persisted(name: &str) -> Event {
        Event::Persisted {
            id: id(name),
            result: Ok(()),
        }
    }

    fn done(name: &str) -> Event {
        Event::Ended {
            id: id(name),
            ran: Ran::Returned(Ending {
                state: TaskState::Done,
                result: Some(Value::from(1)),
                error: None,
            }),
        }
    }

    fn started(out: &[Effect]) -> Vec<String> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Start { id } => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    fn has(out: &[Effect], want: &Effect) -> bool {
        out.contains(want)
    }

    fn persist(name: &str, write: Write) -> Effect {
        Effect::Persist {
            id: id(name),
            write,
            durable: true,
        }
    }

    /// A runner whose controller granted epoch 1 for `lease` from `t0`.
    fn leased(capacity: u32, t0: Instant, lease: Duration) -> Runner {
        let mut r = Runner::new(capacity);
        let mut l = LeaseState::default();
        l.renew(t0, lease, 1);
        r.step(t0, Event::Lease(l));
        r
    }

    /// Admits `name` durably on an unfenced runner; returns the effects of both steps.
    fn admit(r: &mut Runner, now: Instant, name: &str) -> Vec<Effect> {
        let mut out = r.step(now, atask(name, None));
        out.extend(r.step(now, persisted(name)));
        out
    }

    #[test]
    fn a_waiting_task_whose_lease_ran_out_asks_before_it_starts() {
        let t0 = Instant::now();
        let mut r = leased(1, t0, SECOND);
        let out = r.step(t0, atask("a", Some(1)));
        assert_eq!(out, vec![persist("a", Write::New(TaskState::Running))]);
        let out = r.step(t0, atask("b", Some(1)));
        assert_eq!(out, vec![persist("b", Write::New(TaskState::Queued))]);
        assert_eq!(started(&r.step(t0, persisted("a"))), vec![id("a")]);
        let out = r.step(t0, persisted("b"));
        assert!(has(
            &out,
            &Effect::Signal {
                id: id("b"),
                signal: Signal::Accepted
            }
        ));
        // `a` ends after the lease ran out: `b` gets the slot but must ask.
        let out = r.step(t0 + 5 * SECOND, done("a"));
        assert!(has(&out, &Effect::AskStart { id: id("b") }), "{out:?}");
        assert!(started(&out).is_empty());
        assert!(!has(&out, &persist("b", Write::Running)));
        // Confirmed: made durable as running, then started without asking again.
        let out = r.step(
            t0 + 5 * SECOND,
            Event::StartAnswered {
                id: id("b"),
                answer: StartAnswer::Go,
            },
        );
        assert_eq!(out, vec![persist("b", Write::Running)]);
        let out = r.step(t0 + 9 * SECOND, persisted("b"));
        assert_eq!(started(&out), vec![id("b")]);
    }

    #[test]
    fn the_lease_is_checked_again_after_the_durable_running_write() {
        let t0 = Instant::now();
        let mut r = leased(1, t0, SECOND);
        // Stored as running at once, but the write took past the lease's end.
        r.step(t0, atask("a", Some(1)));
        let out = r.step(t0 + 2 * SECOND, persisted("a"));
        assert!(started(&out).is_empty(), "{out:?}");
        assert!(has(&out, &Effect::AskStart { id: id("a") }));
        // Its "running" is durable already: a yes starts it with no second write.
        let out = r.step(
            t0 + 2 * SECOND,
            Event::StartAnswered {
                id: id("a"),
                answer: StartAnswer::Go,
            },
        );
        assert_eq!(started(&out), vec![id("a")]);
        assert!(!has(&out, &persist("a", Write::Running)));

        // A waiting task given its slot while the lease held: decided before the
        // write, re-checked after it.
        let mut r = leased(1, t0, SECOND);
        r.step(t0, atask("x", Some(1)));
        r.step(t0, persisted("x"));
        r.step(t0, atask("y", Some(1)));
        r.step(t0, persisted("y"));
        let out = r.step(t0 + SECOND / 2, done("x"));
        assert!(has(&out, &persist("y", Write::Running)), "{out:?}");
        let out = r.step(t0 + 3 * SECOND, persisted("y"));
        assert!(started(&out).is_empty(), "{out:?}");
        assert!(has(&out, &Effect::AskStart { id: id("y") }));
    }

    #[test]
    fn a_withdrawn_attempt_is_forgotten_and_gives_its_slot_on() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        r.step(
            t0,
            Event::Recovered {
                tasks: vec![
                    Stored {
                        id: id("old"),
                        state: TaskState::Queued,
                        final_signal_answered: false,
                    },
                    Stored {
                        id: id("older"),
                        state: TaskState::Queued,
                        final_signal_answered: false,
                    },
                ],
            },
        );
        let out = r.step(
            t0,
            Event::StartAnswered {
                id: id("old"),
                answer: StartAnswer::Withdrawn,
            },
        );
        assert!(has(&out, &Effect::Remove { id: id("old") }));
        assert!(has(&out, &Effect::AskStart { id: id("older") }));
        assert!(started(&out).is_empty());
        assert_eq!(r.slots_used(), 1);
    }

    #[test]
    fn terminate_in_each_state() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        admit(&mut r, t0, "run");
        admit(&mut r, t0, "wait");
        // Waiting: deleted, out of the line; it never starts.
        let out = r.step(
            t0,
            Event::Terminate {
                id: id("wait"),
                stored: true,
            },
        );
        assert!(has(&out, &Effect::Remove { id: id("wait") }));
        assert!(has(
            &out,
            &Effect::AnswerTerminate {
                id: id("wait"),
                known: true
            }
        ));
        // Running: stopped; the slot stays taken until the procedure really stops.
        let out = r.step(
            t0,
            Event::Terminate {
                id: id("run"),
                stored: true,
            },
        );
        assert!(has(&out, &Effect::Stop { id: id("run") }));
        admit(&mut r, t0, "next");
        assert_eq!(r.slots_used(), 1);
        let out = r.step(
            t0,
            Event::Ended {
                id: id("run"),
                ran: Ran::Stopped,
            },
        );
        // Nothing is stored for it; the next in line starts (`wait` is gone).
        assert!(!out
            .iter()
            .any(|e| matches!(e, Effect::Persist { id, .. } if id == "run")));
        assert_eq!(out, vec![persist("next", Write::Running)]);
        let out = r.step(t0, persisted("next"));
        assert_eq!(started(&out), vec![id("next")]);
        // Ending: its ending finds no record; no final SIGNAL.
        r.step(t0, done("next"));
        let out = r.step(
            t0,
            Event::Terminate {
                id: id("next"),
                stored: true,
            },
        );
        assert!(!has(&out, &Effect::Stop { id: id("next") }));
        let out = r.step(t0, persisted("next"));
        assert!(out.is_empty(), "{out:?}");
        // Done and signalled: only its record goes. Unknown: 205.
        admit(&mut r, t0, "d");
        r.step(t0, persisted("d"));
        r.step(t0, done("d"));
        let out = r.step(t0, persisted("d"));
        assert!(has(
            &out,
            &Effect::Signal {
                id: id("d"),
                signal: Signal::Finished
            }
        ));
        let out = r.step(
            t0,
            Event::Terminate {
                id: id("d"),
                stored: true,
            },
        );
        assert_eq!(
            out,
            vec![
                Effect::Remove { id: id("d") },
                Effect::AnswerTerminate {
                    id: id("d"),
                    known: true
                }
            ]
        );
        let out = r.step(
            t0,
            Event::Terminate {
                id: id("nobody"),
                stored: false,
            },
        );
        assert_eq!(
            out,
            vec![Effect::AnswerTerminate {
                id: id("nobody"),
                known: false
            }]
        );
        assert_eq!(r.held(), 0);
        assert_eq!(r.slots_used(), 0);
    }

    #[test]
    fn a_terminate_during_admission_still_answers_the_atask() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        r.step(t0, atask("a", None));
        r.step(
            t0,
            Event::Terminate {
                id: id("a"),
                stored: true,
            },
        );
        // The slot it was given is free again at once: nothing will run on it.
        assert_eq!(r.slots_used(), 0);
        let out = r.step(t0, persisted("a"));
        assert_eq!(
            out,
            vec![Effect::ReplyAtask {
                id: id("a"),
                answer: Ok(())
            }]
        );
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn waiting_tasks_start_in_the_order_they_came() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        for name in ["a", "b", "c", "d"] {
            admit(&mut r, t0, name);
        }
        let mut order = vec![];
        let mut current = id("a");
        order.push(current.clone());
        for _ in 0..3 {
            let out = r.step(t0, done(&current));
            let next = out
                .iter()
                .find_map(|e| match e {
                    Effect::Persist {
                        id,
                        write: Write::Running,
                        ..
                    } => Some(id.clone()),
                    _ => None,
                })
                .unwrap();
            let out = r.step(t0, persisted(&next));
            assert_eq!(started(&out), vec![next.clone()]);
            order.push(next.clone());
            current = next;
        }
        assert_eq!(order, ["a", "b", "c", "d"]);
    }

    #[test]
    fn synchronous_tasks_wait_in_the_same_line_and_capacity_holds() {
        let t0 = Instant::now();
        let mut r = Runner::new(2);
        for name in ["a", "b", "c"] {
            admit(&mut r, t0, name);
        }
        assert_eq!(r.slots_used(), 2);
        let out = r.step(t0, Event::SyncAsked { ticket: 7 });
        assert!(out.is_empty(), "{out:?}");
        // `c` came first, then the sync.
        let out = r.step(t0, done("a"));
        assert!(has(&out, &persist("c", Write::Running)));
        let out = r.step(t0, done("b"));
        assert!(has(&out, &Effect::RunSync { ticket: 7 }));
        assert_eq!(r.slots_used(), 2);
        assert_eq!(r.running(), 1);
        let out = r.step(t0, Event::SyncGone { ticket: 7 });
        assert!(out.is_empty());
        assert_eq!(r.slots_used(), 1);
    }

    #[test]
    fn a_repeated_atask_is_answered_again_without_a_second_run() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        admit(&mut r, t0, "a");
        let again = |ended| Event::Atask {
            id: id("a"),
            placed_in: None,
            previous: Some(Previous::SameCall { ended }),
        };
        let out = r.step(t0, again(false));
        assert_eq!(
            out,
            vec![Effect::ReplyAtask {
                id: id("a"),
                answer: Ok(())
            }]
        );
        r.step(t0, done("a"));
        r.step(t0, persisted("a"));
        // Ended: told again how it ended, not run again.
        let out = r.step(t0, again(true));
        assert_eq!(
            out,
            vec![
                Effect::ResendFinal { id: id("a") },
                Effect::ReplyAtask {
                    id: id("a"),
                    answer: Ok(())
                }
            ]
        );
    }

    #[test]
    fn another_call_under_a_used_id_is_refused() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        let out = r.step(
            t0,
            Event::Atask {
                id: id("a"),
                placed_in: None,
                previous: Some(Previous::OtherCall),
            },
        );
        assert_eq!(
            out,
            vec![Effect::ReplyAtask {
                id: id("a"),
                answer: Err(Refusal::IdReused)
            }]
        );
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn unfinished_tasks_are_bounded() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        for n in 0..MAX_UNFINISHED_TASKS {
            r.step(t0, atask(&n.to_string(), None));
        }
        let out = r.step(t0, atask("one-more", None));
        assert_eq!(
            out,
            vec![Effect::ReplyAtask {
                id: id("one-more"),
                answer: Err(Refusal::Full {
                    limit: MAX_UNFINISHED_TASKS
                })
            }]
        );
    }

    #[test]
    fn recovery_interrupts_what_ran_and_asks_for_what_waited() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        let stored = |name: &str, state, answered| Stored {
            id: id(name),
            state,
            final_signal_answered: answered,
        };
        let out = r.step(
            t0,
            Event::Recovered {
                tasks: vec![
                    stored("ran", TaskState::Running, false),
                    stored("queued", TaskState::Queued, false),
                    stored("ended", TaskState::Done, false),
                    stored("told", TaskState::Done, true),
                ],
            },
        );
        assert_eq!(
            out,
            vec![
                Effect::KillLeftovers { id: id("ran") },
                persist(
                    "ran",
                    Write::Ended(Ending::interrupted(INTERRUPTED_BY_RESTART))
                ),
                Effect::AskStart { id: id("queued") },
                Effect::Signal {
                    id: id("ended"),
                    signal: Signal::Finished
                },
            ]
        );
    }

    #[test]
    fn a_task_asking_at_shutdown_starts_on_a_yes_and_is_dropped_at_the_interrupt() {
        let t0 = Instant::now();
        let mut r = leased(2, t0, SECOND);
        // Both stored as running after the lease ran out: both ask.
        for name in ["yes", "late"] {
            r.step(t0, atask(name, Some(1)));
            let out = r.step(t0 + 2 * SECOND, persisted(name));
            assert!(has(&out, &Effect::AskStart { id: id(name) }), "{out:?}");
        }
        // The controller may have said yes already and shows the task running: the
        // shutdown does not drop the question.
        let out = r.step(t0 + 2 * SECOND, Event::Shutdown);
        assert!(out.is_empty(), "{out:?}");
        let out = r.step(
            t0 + 2 * SECOND,
            Event::StartAnswered {
                id: id("yes"),
                answer: StartAnswer::Go,
            },
        );
        assert_eq!(started(&out), vec![id("yes")]);
        // At the end of the grace period an open question ends unanswered.
        let out = r.step(t0 + 12 * SECOND, Event::Interrupt);
        assert!(has(&out, &Effect::Stop { id: id("late") }), "{out:?}");
        assert!(has(&out, &Effect::Stop { id: id("yes") }), "{out:?}");
        let out = r.step(
            t0 + 12 * SECOND,
            Event::StartAnswered {
                id: id("late"),
                answer: StartAnswer::Go,
            },
        );
        assert!(started(&out).is_empty(), "{out:?}");
    }

    #[test]
    fn a_shutdown_keeps_waiting_tasks_queued_and_an_interrupt_records_running_ones() {
        let t0 = Instant::now();
        let mut r = Runner::new(1);
        admit(&mut r, t0, "run");
        admit(&mut r, t0, "wait");
        let out = r.step(t0, Event::Shutdown);
        assert!(out.is_empty(), "{out:?}");
        let out = r.step(t0, atask("late", None));
        assert_eq!(
            out,
            vec![Effect::ReplyAtask {
                id: id("late"),
                answer: Err(Refusal::ShuttingDown)
            }]
        );
        let out = r.step(t0, Event::Interrupt);
        assert_eq!(out, vec![Effect::Stop { id: id("run") }]);
        let out = r.step(
            t0,
            Event::Ended {
                id: id("run"),
                ran: Ran::Stopped,
            },
        );
        // `wait` stays queued in the store: nothing starts it.
        assert_eq!(
            out,
            vec![persist(
                "run",
                Write::Ended(Ending::interrupted(INTERRUPTED_BY_SHUTDOWN))
            )]
        );
    }

    /// Random event sequences against the runner; the invariants are checked
    /// after every step. `AGENT_CORE_SEED` runs one seed.
    mod property {
        use super::*;
        use std::collections::HashSet;

        /// SplitMix64: enough for reproducible sequences.
        struct Rng(u64);

        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
            fn below(&mut self, n: u64) -> u64 {
                self.next() % n.max(1)
            }
            fn chance(&mut self, percent: u64) -> bool {
                self.below(100) < percent
            }
        }

        /// I/O the runner asked for that has not reported back.
        #[derive(Debug, Clone)]
        enum Pending {
            Write { id: String, write: Write },
            Ask { id: String },
            Run { id: String },
        }

        struct Sim {
            rng: Rng,
            r: Runner,
            capacity: usize,
            t0: Instant,
            now: Instant,
            lease: LeaseState,
            pending: Vec<Pending>,
            store: HashMap<String, TaskState>,
            under: HashMap<String, AcceptedUnder>,
            go: HashSet<String>,
            withdrawn: HashSet<String>,
            started: HashSet<String>,
            running: HashSet<String>,
            stopped: HashSet<String>,
            syncs_asked: Vec<u64>,
            syncs_running: HashSet<u64>,
            next: u64,
            trace: Vec<String>,
            failure: Option<String>,
        }

        impl Sim {
            fn new(seed: u64, breaks: Breaks) -> Sim {
                let mut rng = Rng(seed);
                let capacity = 1 + rng.below(3) as usize;
                let t0 = Instant::now();
                Sim {
                    rng,
                    r: Runner::new(capacity as u32).with_breaks(breaks),
                    capacity,
                    t0,
                    now: t0,
                    lease: LeaseState::default(),
                    pending: vec![],
                    store: HashMap::new(),
                    under: HashMap::new(),
                    go: HashSet::new(),
                    withdrawn: HashSet::new(),
                    started: HashSet::new(),
                    running: HashSet::new(),
                    stopped: HashSet::new(),
                    syncs_asked: vec![],
                    syncs_running: HashSet::new(),
                    next: 0,
                    trace: vec![],
                    failure: None,
                }
            }

            /// Keeps the first broken invariant, with the events that led to it.
            fn fail(&mut self, seed: u64, what: String) {
                if self.failure.is_none() {
                    let from = self.trace.len().saturating_sub(60);
                    self.failure = Some(format!(
                        "seed {seed}: {what}\nlast events:\n{}",
                        self.trace[from..].join("\n")
                    ));
                }
            }

            fn step(&mut self, seed: u64, event: Event) {
                self.trace.push(format!(
                    "@{}ms {event:?}",
                    self.now.duration_since(self.t0).as_millis()
                ));
                let out = self.r.step(self.now, event);
                for e in out {
                    self.trace.push(format!("    -> {e:?}"));
                    self.effect(seed, e);
                }
                if self.r.slots_used() > self.capacity {
                    self.fail(
                        seed,
                        format!("{} slots used of {}", self.r.slots_used(), self.capacity),
                    );
                }
                if self.running.len() + self.syncs_running.len() > self.capacity {
                    self.fail(seed, "more procedures running than slots".into());
                }
            }

            fn effect(&mut self, seed: u64, e: Effect) {
                match e {
                    Effect::Persist { id, write, .. } => {
                        if self.store.get(&id).is_some_and(|s| s.is_final()) {
                            self.fail(
                                seed,
                                format!("{id}: a final state written over with {write:?}"),
                            );
                        }
                        if let Write::New(state) = &write {
                            self.store.insert(id.clone(), *state);
                        }
                        self.pending.push(Pending::Write { id, write });
                    }
                    Effect::Remove { id } => {
                        self.store.remove(&id);
                    }
                    Effect::Start { id } => {
                        if self.withdrawn.contains(&id) {
                            self.fail(seed, format!("{id} started after it was withdrawn"));
                        }
                        if !self.started.insert(id.clone()) {
                            self.fail(seed, format!("{id} started twice"));
                        }
                        if self.store.get(&id) != Some(&TaskState::Running) {
                            self.fail(
                                seed,
                                format!("{id} started before its running state was stored"),
                            );
                        }
                        let under = self.under.get(&id).copied().unwrap_or(AcceptedUnder::Ask);
                        if !self.go.contains(&id) && !self.lease.may_start(under, self.now) {
                            self.fail(seed, format!("{id} started unasked outside its lease"));
                        }
                        self.running.insert(id.clone());
                        self.pending.push(Pending::Run { id });
                    }
                    Effect::Stop { id } => {
                        self.stopped.insert(id);
                    }
                    Effect::AskStart { id } => self.pending.push(Pending::Ask { id }),
                    Effect::RunSync { ticket } => {
                        self.syncs_running.insert(ticket);
                    }
                    _ => {}
                }
            }

            /// Reports one pending I/O; `faults` lets writes fail and answers vary.
            fn deliver(&mut self, seed: u64, i: usize, faults: bool) {
                let p = self.pending.swap_remove(i);
                let event = match p {
                    Pending::Write { id, write } => {
                        let ok = !faults || !self.rng.chance(5);
                        if ok && self.store.contains_key(&id) {
                            match &write {
                                Write::New(_) => {}
                                Write::Running => {
                                    self.store.insert(id.clone(), TaskState::Running);
                                }
                                Write::Ended(e) => {
                                    self.store.insert(id.clone(), e.state);
                                }
                            }
                        }
                        Event::Persisted {
                            id,
                            result: if ok { Ok(()) } else { Err("disk".into()) },
                        }
                    }
                    Pending::Ask { id } => {
                        let answer = if !faults || self.stopped.contains(&id) {
                            if self.stopped.contains(&id) {
                                StartAnswer::None
                            } else {
                                StartAnswer::Go
                            }
                        } else {
                            match self.rng.below(10) {
                                0..=5 => StartAnswer::Go,
                                6..=8 => StartAnswer::Withdrawn,
                                _ => StartAnswer::None,
                            }
                        };
                        match answer {
                            StartAnswer::Go => {
                                self.go.insert(id.clone());
                            }
                            StartAnswer::Withdrawn => {
                                self.withdrawn.insert(id.clone());
                            }
                            StartAnswer::None => {}
                        }
                        Event::StartAnswered { id, answer }
                    }
                    Pending::Run { id } => {
                        self.running.remove(&id);
                        let ran = if self.stopped.contains(&id) {
                            Ran::Stopped
                        } else {
                            Ran::Returned(Ending {
                                state: TaskState::Done,
                                result: Some(Value::from(1)),
                                error: None,
                            })
                        };
                        Event::Ended { id, ran }
                    }
                };
                self.step(seed, event);
            }

            fn known_id(&mut self) -> Option<String> {
                if self.next == 0 {
                    return None;
                }
                Some(format!("t{}", self.rng.below(self.next)))
            }

            fn random_step(&mut self, seed: u64, shut: &mut bool) {
                let roll = self.rng.below(100);
                match roll {
                    0..=24 => {
                        let id = format!("t{}", self.next);
                        self.next += 1;
                        let placed_in = match self.rng.below(3) {
                            0 => None,
                            e => Some(e),
                        };
                        self.under
                            .insert(id.clone(), self.lease.accepting(placed_in, self.now));
                        self.step(
                            seed,
                            Event::Atask {
                                id,
                                placed_in,
                                previous: None,
                            },
                        );
                    }
                    25..=54 => {
                        if !self.pending.is_empty() {
                            let i = self.rng.below(self.pending.len() as u64) as usize;
                            self.deliver(seed, i, true);
                        }
                    }
                    55..=64 => self.now += Duration::from_millis(self.rng.below(1500)),
                    65..=74 => {
                        let epoch = 1 + self.rng.below(2);
                        let ms = 500 + self.rng.below(1500);
                        self.lease.renew(self.now, Duration::from_millis(ms), epoch);
                        let l = self.lease;
                        self.step(seed, Event::Lease(l));
                    }
                    75..=82 => {
                        if let Some(id) = self.known_id() {
                            let stored = self.store.remove(&id).is_some();
                            self.step(seed, Event::Terminate { id, stored });
                        }
                    }
                    83..=86 => {
                        if let Some(id) = self.known_id() {
                            if let Some(state) = self.store.get(&id) {
                                let ended = state.is_final();
                                let out_before = self.r.held();
                                self.step(
                                    seed,
                                    Event::Atask {
                                        id: id.clone(),
                                        placed_in: None,
                                        previous: Some(Previous::SameCall { ended }),
                                    },
                                );
                                if self.r.held() != out_before {
                                    self.fail(
                                        seed,
                                        format!("a repeat of {id} changed what is held"),
                                    );
                                }
                            }
                        }
                    }
                    87..=89 => {
                        if let Some(id) = self.known_id() {
                            self.step(
                                seed,
                                Event::Progress {
                                    id,
                                    progress: Progress {
                                        percent: 50.0,
                                        comment: String::new(),
                                    },
                                },
                            );
                        }
                    }
                    90..=93 => {
                        let ticket = self.next;
                        self.next += 1;
                        self.syncs_asked.push(ticket);
                        self.step(seed, Event::SyncAsked { ticket });
                    }
                    94..=97 => {
                        if !self.syncs_asked.is_empty() {
                            let i = self.rng.below(self.syncs_asked.len() as u64) as usize;
                            let ticket = self.syncs_asked.swap_remove(i);
                            self.syncs_running.remove(&ticket);
                            self.step(seed, Event::SyncGone { ticket });
                        }
                    }
                    _ => {
                        if !*shut {
                            *shut = true;
                            self.step(seed, Event::Shutdown);
                        } else {
                            self.step(seed, Event::Interrupt);
                        }
                    }
                }
            }
        }

        /// One seeded run; the first broken invariant, with its trace.
        fn run(seed: u64, breaks: Breaks) -> Result<(), String> {
            let mut sim = Sim::new(seed, breaks);
            let mut shut = false;
            for _ in 0..200 {
                sim.random_step(seed, &mut shut);
            }
            // Faults stop: everything in flight reports back and succeeds; every
            // sync ends. Nothing may be left held.
            let mut rounds = 0;
            while sim.failure.is_none() && (!sim.pending.is_empty() || !sim.syncs_asked.is_empty())
            {
                rounds += 1;
                if rounds > 100_000 {
                    sim.fail(seed, "no quiescence".into());
                }
                if let Some(ticket) = sim.syncs_asked.pop() {
                    sim.syncs_running.remove(&ticket);
                    sim.step(seed, Event::SyncGone { ticket });
                }
                if !sim.pending.is_empty() {
                    sim.deliver(seed, 0, false);
                }
            }
            if sim.r.held() != 0 || sim.r.slots_used() != 0 {
                let what = format!(
                    "left held: {} tasks, {} slots used, nothing in flight",
                    sim.r.held(),
                    sim.r.slots_used()
                );
                sim.fail(seed, what);
            }
            sim.failure.map_or(Ok(()), Err)
        }

        /// The first seed below `seeds` whose run breaks an invariant.
        fn first_failure(seeds: u64, breaks: Breaks) -> Option<String> {
            (0..seeds).find_map(|seed| run(seed, breaks).err())
        }

        #[test]
        fn random_event_sequences_keep_the_invariants() {
            if let Some(seed) = std::env::var("AGENT_CORE_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
            {
                if let Err(e) = run(seed, Breaks::default()) {
                    panic!("{e}");
                }
                return;
            }
            if let Some(e) = first_failure(2_000, Breaks::default()) {
                panic!("{e}");
            }
        }

        /// Each rule broken on purpose is found within a few hundred seeds: the
        /// property test can fail.
        #[test]
        fn a_broken_rule_is_found() {
            let cases = [
                (
                    Breaks {
                        skip_recheck: true,
                        ..Breaks::default()
                    },
                    "started unasked outside its lease",
                ),
                (
                    Breaks {
                        start_withdrawn: true,
                        ..Breaks::default()
                    },
                    "started after it was withdrawn",
                ),
                (
                    Breaks {
                        keep_slot_on_withdrawal: true,
                        ..Breaks::default()
                    },
                    "left held",
                ),
            ];
            for (breaks, expected) in cases {
                let found = first_failure(300, breaks)
                    .unwrap_or_else(|| panic!("{breaks:?} not found in 300 seeds"));
                assert!(found.contains(expected), "{breaks:?}: {found}");
            }
        }
    }
}
