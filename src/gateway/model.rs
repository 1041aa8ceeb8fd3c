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

    /// Records a change of status at `now`, in the history too.
    pub fn set_status(&mut self, status: TaskStatus, reason: Option<String>, now: u64) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atask_ids_round_trip() {
        assert_eq!(parse_atask_id("0190-ab.3"), Some(("0190-ab", 3)));
        assert_eq!(parse_atask_id("nodot"), None);
        assert_eq!(parse_atask_id("x.y"), None);
    }
}
