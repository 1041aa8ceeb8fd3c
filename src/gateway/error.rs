//! The gateway's error type, and the one place it becomes a gRPC status.

use thiserror::Error;
use tonic::{Code, Status};

use super::model::AgentState;
use super::store::StoreError;
use crate::durable::DurableError;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A call that does not fit the procedure's schema; the text starts with the
    /// path of the first wrong value (`algo.genetic.population: …`).
    #[error("{0}")]
    InvalidCall(String),
    #[error("no task with task_id {0:?}")]
    TaskNotFound(String),
    #[error("no agent with agent_id {0:?} (see ListAgents)")]
    AgentNotFound(String),
    #[error(
        "agent {0:?} is blacklisted; remove it from the blacklist or let the scheduler choose"
    )]
    AgentBlacklisted(String),
    #[error("agent {agent_id:?} is {state:?}, not alive; it takes no tasks until it answers echoes again")]
    AgentUnavailable { agent_id: String, state: AgentState },
    #[error("no alive agent can take tasks (none registered, all gone, suspect or blacklisted)")]
    NoAliveAgent,
    #[error("procedure {procedure:?} is not offered by any alive agent{}", offered_hint(.offered_elsewhere))]
    ProcedureNotOffered {
        procedure: String,
        offered_elsewhere: Vec<String>,
    },
    #[error("agent {agent_id:?} did not answer: {reason}")]
    AgentUnreachable { agent_id: String, reason: String },
    /// The gateway cannot take this now (stopping, its store failing, full).
    #[error("{0}")]
    Unavailable(String),
    #[error("the task did not finish within {0:?}")]
    DeadlineExceeded(std::time::Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn offered_hint(elsewhere: &[String]) -> String {
    if elsewhere.is_empty() {
        " (see ListProcedures)".to_string()
    } else {
        format!(
            " (offered by {}, which cannot take tasks now)",
            elsewhere.join(", ")
        )
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        let code = match &e {
            GatewayError::InvalidArgument { .. } | GatewayError::InvalidCall(_) => {
                Code::InvalidArgument
            }
            GatewayError::TaskNotFound(_) | GatewayError::AgentNotFound(_) => Code::NotFound,
            GatewayError::ProcedureNotOffered {
                offered_elsewhere, ..
            } if offered_elsewhere.is_empty() => Code::NotFound,
            GatewayError::AgentBlacklisted(_) => Code::FailedPrecondition,
            GatewayError::ProcedureNotOffered { .. }
            | GatewayError::AgentUnavailable { .. }
            | GatewayError::NoAliveAgent
            | GatewayError::AgentUnreachable { .. }
            | GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // The store recovers by itself (`durable.rs`): a retry later may succeed.
            GatewayError::Store(StoreError::Durable(
                DurableError::Unwritable { .. } | DurableError::Stopped { .. },
            )) => Code::Unavailable,
            GatewayError::Store(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
