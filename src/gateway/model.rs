//! The gateway's records and their rules, free of I/O: what a task and an agent
//! are, and which changes a task may go through. The store persists these; the
//! scheduler and the listener decide when to apply them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arpcp::{Args, Progress};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Dispatched,
    Running,
    Done,
    Failed,
    ClientError,
    Interrupted,
    Cancelled,
}

impl TaskStatus {
    /// The task has ended (an interrupted task may still receive a late result).
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            TaskStatus::Queued | TaskStatus::Dispatched | TaskStatus::Running
        )
    }

    /// The name as stored and logged (`done`, `client_error`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Dispatched => "dispatched",
            TaskStatus::Running => "running",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
            TaskStatus::ClientError => "client_error",
            TaskStatus::Interrupted => "interrupted",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// On an agent now.
    pub fn is_placed(self) -> bool {
        matches!(self, TaskStatus::Dispatched | TaskStatus::Running)
    }
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    pub status: TaskStatus,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// How a task ended on its agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(Value),
    Failed { code: u16, description: String },
    ClientError { code: u16, description: String },
    Interrupted(String),
}

impl Outcome {
    /// An agent's error answer: 400 is the procedure failing, any other code is
    /// something wrong with the call.
    pub fn from_error(code: u16, description: String) -> Outcome {
        if code == 400 {
            Outcome::Failed { code, description }
        } else {
            Outcome::ClientError { code, description }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: String,
    pub procedure: String,
    pub args: Args,
    pub status: TaskStatus,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_code: Option<u16>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub requested_agent_id: Option<String>,
    #[serde(default)]
    pub progress: Option<Progress>,
    /// Placements so far; the current one's ARPCP id is `<task_id>.<attempt>`.
    #[serde(default)]
    pub attempt: u32,
    pub created_ms: u64,
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Last time anything was heard of the task (for reconciliation).
    #[serde(default)]
    pub updated_ms: u64,
    #[serde(default)]
    pub history: Vec<StatusChange>,
    /// Run with ARPCP TASK (the client waits on the call; the agent keeps no copy).
    #[serde(default)]
    pub sync: bool,
    /// An Opal model's call: its result is a table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opal: bool,
    /// Who submitted it (`cert:NAME`, `token:NAME`); empty when callers are not
    /// authenticated. A submitter may cancel only tasks it owns.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
}

/// Splits an ARPCP id `<task_id>.<attempt>` made by [`TaskRecord::atask_id`].
pub fn parse_atask_id(id: &str) -> Option<(&str, u32)> {
    let (task, attempt) = id.rsplit_once('.')?;
    Some((task, attempt.parse().ok()?))
}

impl TaskRecord {
    pub fn new(task_id: String, procedure: String, args: Args, requested: Option<String>) -> Self {
        let now = now_ms();
        TaskRecord {
            task_id,
            procedure,
            args,
            status: TaskStatus::Queued,
            result: None,
            error: None,
            error_code: None,
            agent_id: None,
            requested_agent_id: requested,
            progress: None,
            attempt: 0,
            created_ms: now,
            started_ms: None,
            finished_ms: None,
            updated_ms: now,
            history: vec![StatusChange {
                status: TaskStatus::Queued,
                at_ms: now,
                reason: None,
                agent_id: None,
            }],
            sync: false,
            opal: false,
            owner: String::new(),
        }
    }

    /// The agent that held attempt `n` (each placement is one `dispatched` entry).
    pub fn agent_of_attempt(&self, n: u32) -> Option<&str> {
        self.history
            .iter()
            .filter(|h| h.status == TaskStatus::Dispatched)
            .nth(n.checked_sub(1)? as usize)
            .and_then(|h| h.agent_id.as_deref())
    }

    /// The id of the current placement on its agent.
    pub fn atask_id(&self) -> String {
        format!("{}.{}", self.task_id, self.attempt)
    }

    fn set_status(&mut self, status: TaskStatus, reason: Option<String>) {
        let now = now_ms();
        self.status = status;
        self.updated_ms = now;
        if status.is_final() {
            self.finished_ms = Some(now);
        }
        self.history.push(StatusChange {
            status,
            at_ms: now,
            reason,
            agent_id: self.agent_id.clone(),
        });
    }

    /// Placed on `agent_id` as a new attempt. Only from Queued.
    pub fn dispatch(&mut self, agent_id: &str) -> bool {
        if self.status != TaskStatus::Queued {
            return false;
        }
        self.attempt += 1;
        self.agent_id = Some(agent_id.to_string());
        self.set_status(TaskStatus::Dispatched, None);
        true
    }

    /// The agent reported the task accepted, with progress once it runs.
    pub fn accepted(&mut self, attempt: u32, progress: Option<Progress>) -> bool {
        if attempt != self.attempt || !self.status.is_placed() {
            return false;
        }
        self.updated_ms = now_ms();
        let Some(p) = progress else {
            return false;
        };
        self.progress = Some(p);
        if self.status == TaskStatus::Dispatched {
            self.started_ms = Some(now_ms());
            self.set_status(TaskStatus::Running, None);
        }
        true
    }

    /// The task ended on its agent. Accepted while the task has not ended, and for
    /// an interrupted task whose agent came back with the result after all.
    /// A result of an earlier attempt counts too: the first result is kept.
    pub fn finish(&mut self, attempt: u32, outcome: Outcome) -> bool {
        let late_delivery = self.status == TaskStatus::Interrupted
            && attempt == self.attempt
            && !matches!(outcome, Outcome::Interrupted(_));
        if self.status.is_final() && !late_delivery {
            return false;
        }
        if attempt > self.attempt || attempt == 0 {
            return false;
        }
        if self.started_ms.is_none() {
            self.started_ms = Some(now_ms());
        }
        // An agent that does not check its results (an older or a foreign one) could
        // leave a result no client can read.
        let outcome = match outcome {
            Outcome::Done(v) => match crate::limits::check_result(&v) {
                Ok(()) => Outcome::Done(v),
                Err(e) => Outcome::Failed {
                    code: 400,
                    description: format!("the agent sent a result over the limit: {e}"),
                },
            },
            other => other,
        };
        let (status, reason) = match outcome {
            Outcome::Done(v) => {
                self.result = Some(v);
                self.error = None;
                self.error_code = None;
                if let Some(p) = &mut self.progress {
                    p.percent = 1.0;
                }
                let why =
                    late_delivery.then(|| "the agent delivered the result after all".to_string());
                (TaskStatus::Done, why)
            }
            Outcome::Failed { code, description } => {
                self.error = Some(description);
                self.error_code = Some(code);
                (TaskStatus::Failed, None)
            }
            Outcome::ClientError { code, description } => {
                self.error = Some(description);
                self.error_code = Some(code);
                (TaskStatus::ClientError, None)
            }
            Outcome::Interrupted(reason) => {
                self.error = Some(reason.clone());
                (TaskStatus::Interrupted, Some(reason))
            }
        };
        self.set_status(status, reason);
        true
    }

    /// Back to the queue (its agent left before starting it, or could not take it).
    pub fn requeue(&mut self, reason: String) -> bool {
        if self.status != TaskStatus::Dispatched {
            return false;
        }
        self.set_status(TaskStatus::Queued, Some(reason));
        self.agent_id = None;
        true
    }

    /// Stopped before it finished, for `reason`.
    pub fn interrupt(&mut self, reason: String) -> bool {
        if self.status.is_final() {
            return false;
        }
        self.error = Some(reason.clone());
        self.set_status(TaskStatus::Interrupted, Some(reason));
        true
    }

    /// Cancelled by a client; a task that ended stays as it is.
    pub fn cancel(&mut self) -> bool {
        if self.status.is_final() {
            return false;
        }
        self.error = Some("cancelled by a client".into());
        self.set_status(TaskStatus::Cancelled, None);
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Alive,
    Suspect,
    Gone,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent_id: String,
    pub mac: String,
    pub ip: String,
    pub port: u16,
    /// host:port the gateway reaches it at.
    pub address: String,
    pub hostname: String,
    pub version: String,
    pub procedures: Vec<String>,
    pub capacity: u32,
    pub running: u32,
    pub state: AgentState,
    pub misses: u32,
    pub last_seen_ms: u64,
    pub blacklisted: bool,
    /// The name (CN) in the certificate it answered with, when the gateway runs
    /// with TLS: then this, not MAC and port, is who it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

impl AgentRecord {
    /// Agents are the same agent when MAC and port agree (several agents on one
    /// host share the MAC).
    pub fn identity(mac: &str, port: u16) -> String {
        format!("{}|{port}", mac.to_lowercase())
    }

    /// With TLS an agent is its certificate: one name, one agent id, whatever MAC
    /// and port it reports. The prefix keeps these apart from MAC + port identities.
    pub fn certificate_identity(name: &str) -> String {
        format!("cert:{name}")
    }

    pub fn can_take_tasks(&self) -> bool {
        self.state == AgentState::Alive && !self.blacklisted
    }

    pub fn offers(&self, procedure: &str) -> bool {
        self.procedures.iter().any(|p| p == procedure)
    }

    /// One echo missed; returns the new state.
    pub fn missed(&mut self, max_misses: u32) -> AgentState {
        self.misses = self.misses.saturating_add(1);
        self.state = if self.misses >= max_misses.max(1) {
            AgentState::Gone
        } else {
            AgentState::Suspect
        };
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task() -> TaskRecord {
        TaskRecord::new("t".into(), "add".into(), Args::default(), None)
    }

    #[test]
    fn normal_life() {
        let mut t = task();
        assert!(t.dispatch("a1"));
        assert_eq!(t.atask_id(), "t.1");
        assert!(!t.accepted(1, None));
        assert_eq!(t.status, TaskStatus::Dispatched);
        assert!(t.accepted(
            1,
            Some(Progress {
                percent: 0.0,
                comment: String::new()
            })
        ));
        assert_eq!(t.status, TaskStatus::Running);
        assert!(t.finish(1, Outcome::Done(json!(5))));
        assert_eq!(t.status, TaskStatus::Done);
        assert_eq!(t.result, Some(json!(5)));
        assert!(
            !t.finish(1, Outcome::Done(json!(6))),
            "a result is stored once"
        );
        assert!(!t.cancel());
        let statuses: Vec<_> = t.history.iter().map(|h| h.status).collect();
        assert_eq!(
            statuses,
            [
                TaskStatus::Queued,
                TaskStatus::Dispatched,
                TaskStatus::Running,
                TaskStatus::Done
            ]
        );
    }

    #[test]
    fn requeue_and_late_results() {
        let mut t = task();
        t.dispatch("a1");
        assert!(t.requeue("agent left".into()));
        assert!(t.dispatch("a2"));
        assert_eq!(t.attempt, 2);
        // Stale progress of attempt 1 is ignored; its result is kept if it comes first.
        assert!(!t.accepted(1, Some(Progress::default())));
        assert!(t.finish(1, Outcome::Done(json!(1))));
        assert!(!t.finish(2, Outcome::Done(json!(2))));
        assert_eq!(t.result, Some(json!(1)));
    }

    #[test]
    fn interrupted_task_takes_a_late_result_of_its_attempt() {
        let mut t = task();
        t.dispatch("a1");
        assert!(t.interrupt("agent a1 left the cluster".into()));
        assert!(!t.finish(1, Outcome::Interrupted("again".into())));
        assert!(t.finish(1, Outcome::Done(json!(3))));
        assert_eq!(t.status, TaskStatus::Done);
        assert!(!t.finish(7, Outcome::Done(json!(3))), "unknown attempt");
    }

    #[test]
    fn a_result_over_the_limits_is_a_failure() {
        let mut t = task();
        t.dispatch("a1");
        let deep = (0..40).fold(json!(1), |v, _| json!([v]));
        assert!(t.finish(1, Outcome::Done(deep)));
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.error_code, Some(400));
        assert_eq!(t.result, None);
        let e = t.error.unwrap_or_default();
        assert!(
            e.contains("nested 40 levels deep, over the limit of 32"),
            "{e}"
        );
    }

    #[test]
    fn atask_ids_round_trip() {
        assert_eq!(parse_atask_id("0190-ab.3"), Some(("0190-ab", 3)));
        assert_eq!(parse_atask_id("nodot"), None);
        assert_eq!(parse_atask_id("x.y"), None);
    }

    #[test]
    fn misses_make_an_agent_suspect_then_gone() {
        let mut a = AgentRecord {
            agent_id: "a".into(),
            mac: "m".into(),
            ip: "127.0.0.1".into(),
            port: 1,
            address: "127.0.0.1:1".into(),
            hostname: "h".into(),
            version: "1.0".into(),
            procedures: vec![],
            capacity: 1,
            running: 0,
            state: AgentState::Alive,
            misses: 0,
            last_seen_ms: 0,
            blacklisted: false,
            certificate: None,
        };
        assert_eq!(a.missed(3), AgentState::Suspect);
        assert_eq!(a.missed(3), AgentState::Suspect);
        assert_eq!(a.missed(3), AgentState::Gone);
    }
}
