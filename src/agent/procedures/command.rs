//! Procedures that run a configured program. The call's positional arguments are
//! appended to the program's argv — never through a shell — and the program runs in
//! its own process group, so stopping the task kills everything it started.

use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{describe, RunError};
use crate::arpcp::Args;

/// Most stdout kept as a result; a program writing more fails the task.
pub const MAX_STDOUT_BYTES: usize = 4 * 1024 * 1024;
/// The end of stderr carried in an execution error.
pub const STDERR_TAIL_BYTES: usize = 4 * 1024;
/// Most arguments a call may append to argv.
pub const MAX_COMMAND_ARGS: usize = 1024;

/// What a configured program is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecKind {
    /// Arguments appended to argv, stdout the result.
    #[default]
    Command,
    /// An Opal model (`opal.rs`).
    Opal,
}

/// A `[[procedure]]` entry of the agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    pub name: String,
    #[serde(default)]
    pub kind: SpecKind,
    /// Program and its fixed arguments.
    pub command: Vec<String>,
    /// Kill the program after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Opal models: how often the agent asks for the status, in milliseconds.
    #[serde(default)]
    pub poll_ms: Option<u64>,
}

/// The checked `timeout_secs` of a spec (and its `name` and `command`).
pub(super) fn timeout_of(spec: &CommandSpec) -> Result<Option<Duration>, String> {
    if spec.name.trim().is_empty() {
        return Err("`name` must not be empty".into());
    }
    if spec.command.first().is_none_or(|p| p.is_empty()) {
        return Err("`command` must name a program: command = [\"prog\", \"arg\", ...]".into());
    }
    match spec.timeout_secs {
        None => Ok(None),
        Some(t) if t > 0.0 && t.is_finite() && t < 1e9 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(format!("`timeout_secs` must be a positive number, got {t}")),
    }
}

pub struct CommandProcedure {
    spec: CommandSpec,
    timeout: Option<Duration>,
}

impl CommandProcedure {
    pub fn new(spec: CommandSpec) -> Result<Self, String> {
        if spec.poll_ms.is_some() {
            return Err("`poll_ms` applies to Opal models only (kind = \"opal\")".into());
        }
        let timeout = timeout_of(&spec)?;
        Ok(CommandProcedure { spec, timeout })
    }

    pub fn validate(&self, args: &Args) -> Result<(), String> {
        argv_tail(args).map(|_| ())
    }

    pub async fn run(&self, args: &Args, env: &[(String, String)]) -> Result<Value, RunError> {
        let tail = argv_tail(args).map_err(RunError::BadArguments)?;
        let program = &self.spec.command[0];
        let mut child = spawn_program(&self.spec.command, &tail, env, Stdio::null())?;
        let group = ProcessGroup::new(child.id());
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(RunError::Failed(
                "program's output pipes are missing".into(),
            ));
        };
        let work = async {
            let (out, err, status) =
                tokio::join!(read_capped(stdout), read_tail(stderr), child.wait());
            (out, err, status)
        };
        let (out, err, status) = match self.timeout {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .map_err(|_| RunError::Timeout(t))?,
            None => work.await,
        };
        let status =
            status.map_err(|e| RunError::Failed(format!("waiting for {program:?}: {e}")))?;
        let stderr = String::from_utf8_lossy(&err.unwrap_or_default())
            .trim_end()
            .to_string();
        if !status.success() {
            let how = match status.code() {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".to_string(),
            };
            return Err(RunError::Failed(format!(
                "{program:?} failed ({how}): {stderr}"
            )));
        }
        group.disarm();
        let mut out = out.map_err(|e| RunError::Failed(e.to_string()))?;
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        String::from_utf8(out)
            .map(Value::String)
            .map_err(|_| RunError::Failed(format!("{program:?} wrote output that is not UTF-8")))
    }
}

/// Starts `command` (program and fixed arguments) with `extra` arguments, the
/// task's environment marks, stdout and stderr piped, in a process group of its
/// own (so that stopping the task kills everything it started) and killed if the
/// handle is dropped.
pub(super) fn spawn_program(
    command: &[String],
    extra: &[String],
    env: &[(String, String)],
    stdin: Stdio,
) -> Result<tokio::process::Child, RunError> {
    let program = &command[0];
    tokio::process::Command::new(program)
        .args(&command[1..])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RunError::Failed(format!("cannot start {program:?}: {e}")))
}

/// Kills the whole process group when dropped while armed: on timeout, on
/// cancellation (the task's future is dropped) and on failure.
pub(super) struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    /// The group led by the process `pid` (started with `process_group(0)`).
    pub(super) fn new(pid: Option<u32>) -> ProcessGroup {
        ProcessGroup(pid)
    }

    fn disarm(mut self) {
        self.0 = None;
    }

    /// Kills the group now (and again when dropped, which finds nothing).
    pub(super) fn kill_now(&self) {
        if let Some(pgid) = self.0 {
            kill_process_group(pgid);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_process_group(pgid);
        }
    }
}

/// Kills every process of a group this agent started (`process_group(0)` made the
/// program the leader of a group of its own).
fn kill_process_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        if pgid > 1 {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

/// Kills every process whose environment holds all of `marks` (`KEY=VALUE`): the
/// programs of tasks that an agent's crash left running. Returns how many.
pub fn kill_marked_processes(marks: &[(String, String)]) -> usize {
    let wanted: Vec<Vec<u8>> = marks
        .iter()
        .map(|(k, v)| format!("{k}={v}").into_bytes())
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        if wanted.iter().all(|w| vars.contains(&w.as_slice())) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

fn argv_tail(args: &Args) -> Result<Vec<String>, String> {
    let Args::Positional(values) = args else {
        return Err(
            "takes positional arguments (appended to the program's argv), got named arguments"
                .into(),
        );
    };
    if values.len() > MAX_COMMAND_ARGS {
        return Err(format!(
            "at most {MAX_COMMAND_ARGS} arguments, got {}",
            values.len()
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) if s.contains('\0') => {
                Err(format!("argument {} contains a NUL byte", i + 1))
            }
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!(
                "argument {} must be a string, number or boolean, got {}",
                i + 1,
                describe(other)
            )),
        })
        .collect()
}

async fn read_capped(mut r: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    (&mut r)
        .take(MAX_STDOUT_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() > MAX_STDOUT_BYTES {
        return Err(std::io::Error::other(format!(
            "program wrote more than {MAX_STDOUT_BYTES} bytes to stdout"
        )));
    }
    Ok(buf)
}

/// Reads everything, keeping only the last `STDERR_TAIL_BYTES`.
pub(super) async fn read_tail(mut r: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut tail = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(tail);
        }
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > STDERR_TAIL_BYTES {
            tail.drain(..tail.len() - STDERR_TAIL_BYTES);
        }
    }
}
