//! What an agent can run: built-in procedures compiled in, and programs declared in
//! its configuration. Each procedure checks its arguments before the task is
//! accepted (ARPCP 204), and runs with a context that carries cancellation and a
//! way to report progress.

mod builtin;
mod command;
mod opal;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::arpcp::{Args, CatalogEntry, Code, ProcedureKind, Progress, ProtocolError, TaskError};

pub use builtin::Builtin;
pub use command::{kill_marked_processes, CommandProcedure, CommandSpec, SpecKind};
pub use opal::OpalProcedure;

/// Opal models asked for their `--info` at once while an agent starts (a thread
/// each, for at most `opal::INFO_TIMEOUT`).
pub const MAX_MODELS_LOADED_AT_ONCE: usize = 8;

/// Why a procedure did not produce a value.
#[derive(Debug, Error, PartialEq)]
pub enum RunError {
    /// The procedure failed (ARPCP 400).
    #[error("{0}")]
    Failed(String),
    /// The arguments turned out wrong only at run time (ARPCP 204, `client_error`).
    #[error("{0}")]
    BadArguments(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl RunError {
    pub fn to_task_error(&self, procedure: &str) -> TaskError {
        match self {
            RunError::BadArguments(reason) => {
                TaskError::from(&ProtocolError::bad_args(procedure, reason.clone()))
            }
            RunError::Failed(_) | RunError::Timeout(_) => TaskError {
                code: Code::Execution,
                description: self.to_string(),
            },
        }
    }
}

/// Where a running procedure reports progress. Cheap to call often: the receiver
/// decides what reaches the controller.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a running procedure can tell its runner.
#[derive(Clone)]
pub struct RunContext {
    pub progress: ProgressSink,
    /// Environment given to programs the procedure starts: it marks them as this
    /// task's, so an agent restarted after a crash can find and stop them.
    pub env: Vec<(String, String)>,
}

impl RunContext {
    /// A context that reports nowhere (synchronous calls keep no record).
    pub fn detached() -> RunContext {
        RunContext {
            progress: Arc::new(|_| {}),
            env: Vec::new(),
        }
    }
}

pub enum Procedure {
    Builtin(Builtin),
    Command(CommandProcedure),
    Opal(OpalProcedure),
}

impl Procedure {
    /// Checks the call's arguments; the error names the argument and what was expected.
    pub fn validate(&self, name: &str, args: &Args) -> Result<(), ProtocolError> {
        let reason = match self {
            Procedure::Builtin(b) => b.validate(args),
            Procedure::Command(c) => c.validate(args),
            Procedure::Opal(o) => o.validate(args).map(|_| ()),
        };
        reason.map_err(|r| ProtocolError::bad_args(name, r))
    }

    /// Runs the procedure. Dropping the future stops it (and kills its processes).
    /// A result over `MAX_RESULT_BYTES` or `MAX_DEPTH` is a failure: no client could
    /// read it, and it would be stored and sent for nothing.
    pub async fn run(&self, args: &Args, ctx: RunContext) -> Result<Value, RunError> {
        let v = match self {
            Procedure::Builtin(b) => b.run(args, ctx.progress).await,
            Procedure::Command(c) => c.run(args, &ctx.env).await,
            Procedure::Opal(o) => o.run(args, &ctx.progress, &ctx.env).await,
        }?;
        crate::limits::check_result(&v).map_err(|e| {
            RunError::Failed(match self {
                // Its table is within the Opal limits, and still too big as a result.
                Procedure::Opal(o) => format!(
                    "Opal model {:?}: its table is too big for a task's result: {e}",
                    o.name()
                ),
                _ => e.to_string(),
            })
        })?;
        Ok(v)
    }
}

/// The procedures of one agent, by name.
pub struct Registry {
    procedures: BTreeMap<String, Procedure>,
}

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("procedure {0:?} is declared twice (or clashes with a built-in procedure)")]
    Duplicate(String),
    #[error("procedure {name:?}: {reason}")]
    Invalid { name: String, reason: String },
}

impl Registry {
    /// The built-ins plus the configured programs.
    /// The built-ins plus the configured programs. An Opal model whose `--info`
    /// fails or does not parse is logged with the reason and not offered: one
    /// broken model does not keep the agent from serving the rest.
    pub fn new(commands: Vec<CommandSpec>) -> Result<Registry, RegistryError> {
        let mut procedures = BTreeMap::new();
        for b in Builtin::ALL {
            procedures.insert(b.name().to_string(), Procedure::Builtin(b));
        }
        let mut models = Vec::new();
        let mut model_names = std::collections::BTreeSet::new();
        for spec in commands {
            let name = spec.name.clone();
            if procedures.contains_key(&name) || model_names.contains(&name) {
                return Err(RegistryError::Duplicate(name));
            }
            match spec.kind {
                SpecKind::Command => {
                    let proc =
                        CommandProcedure::new(spec).map_err(|reason| RegistryError::Invalid {
                            name: name.clone(),
                            reason,
                        })?;
                    procedures.insert(name, Procedure::Command(proc));
                }
                SpecKind::Opal => {
                    model_names.insert(name);
                    models.push(spec);
                }
            }
        }
        // Each model is asked for its `--info` (up to INFO_TIMEOUT each), several at
        // once: one after another, every slow model delayed the agent's start.
        while !models.is_empty() {
            let batch: Vec<CommandSpec> = models
                .drain(..models.len().min(MAX_MODELS_LOADED_AT_ONCE))
                .collect();
            let loaded: Vec<(String, Result<OpalProcedure, String>)> =
                std::thread::scope(|scope| {
                    let running: Vec<_> = batch
                        .into_iter()
                        .map(|spec| {
                            let name = spec.name.clone();
                            (name, scope.spawn(move || OpalProcedure::load(spec)))
                        })
                        .collect();
                    running
                        .into_iter()
                        .map(|(name, t)| {
                            let loaded = t
                                .join()
                                .unwrap_or_else(|_| Err("reading its --info panicked".into()));
                            (name, loaded)
                        })
                        .collect()
                });
            for (name, loaded) in loaded {
                match loaded {
                    Ok(o) => {
                        procedures.insert(name, Procedure::Opal(o));
                    }
                    Err(reason) => {
                        tracing::warn!(procedure = %name, "Opal model not offered: {reason}");
                    }
                }
            }
        }
        Ok(Registry { procedures })
    }

    /// What each procedure is, with each Opal model's `--info` text.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        self.procedures
            .iter()
            .map(|(name, p)| CatalogEntry {
                name: name.clone(),
                kind: match p {
                    Procedure::Builtin(_) => ProcedureKind::Builtin,
                    Procedure::Command(_) => ProcedureKind::Command,
                    Procedure::Opal(_) => ProcedureKind::Opal,
                },
                info: match p {
                    Procedure::Opal(o) => Some(o.info().to_string()),
                    _ => None,
                },
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<&Procedure, ProtocolError> {
        self.procedures
            .get(name)
            .ok_or_else(|| ProtocolError::UnknownProcedure(name.to_string()))
    }

    pub fn names(&self) -> Vec<String> {
        self.procedures.keys().cloned().collect()
    }
}

/// Describes a JSON value's type for argument errors.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Number(n) => format!("the number {n}"),
        other => crate::arpcp::message::json_type(other).to_string(),
    }
}
