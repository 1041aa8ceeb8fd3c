//! Opal models: programs that describe their typed parameters (`--info`), then talk
//! over stdin/stdout — `calculate`, `status` polls with progress, a result table
//! (`docs/opal.md`). The agent learns a model's schema once at start, validates
//! every call against it before accepting it, and runs the conversation here; the
//! format itself is `crate::opal`.

use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::command::{read_tail, spawn_program, CommandSpec, ProcessGroup};
use super::{ProgressSink, RunError};
use crate::arpcp::{Args, Progress};
use crate::opal::{self, Answer, Schema, Table};

/// How long `--info` may take.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most output `--info` may print.
pub const MAX_INFO_BYTES: usize = 256 * 1024;
/// Default interval of `status` polls.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);
/// Shortest poll interval a configuration may ask for.
pub const MIN_POLL: Duration = Duration::from_millis(10);
/// Bytes read from a model's stdout at a time (large: each read re-splits the buffer).
const READ_CHUNK: usize = 64 * 1024;
/// How long a model may take to answer one request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct OpalProcedure {
    spec: CommandSpec,
    schema: Schema,
    /// What `--info` printed: the gateway parses the same text.
    info: String,
    timeout: Option<Duration>,
    poll: Duration,
}

impl OpalProcedure {
    /// The name it is declared under.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Runs `command --info` (bounded in time and output) and reads the schema.
    /// Blocks: called once at start-up.
    pub fn load(spec: CommandSpec) -> Result<OpalProcedure, String> {
        let timeout = super::command::timeout_of(&spec)?;
        let poll = match spec.poll_ms {
            None => DEFAULT_POLL,
            Some(ms) if Duration::from_millis(ms) >= MIN_POLL => Duration::from_millis(ms),
            Some(ms) => {
                return Err(format!(
                    "`poll_ms` must be at least {} ms, got {ms}",
                    MIN_POLL.as_millis()
                ))
            }
        };
        let info = run_info(&spec.command)?;
        let schema = opal::schema_from_info(&info).map_err(|e| {
            format!(
                "`{} --info` printed no valid schema: {e}",
                spec.command.join(" ")
            )
        })?;
        Ok(OpalProcedure {
            spec,
            schema,
            info,
            timeout,
            poll,
        })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn info(&self) -> &str {
        &self.info
    }

    /// The call's named arguments checked against the schema: every error names
    /// its path (`algo.genetic.population: unknown parameter; …`).
    pub fn validate(&self, args: &Args) -> Result<serde_json::Map<String, Value>, String> {
        let Args::Named(map) = args else {
            return Err(
                "takes named arguments ({\"main\": {...}, \"algo\": {\"<algorithm>\": {...}}}), got positional ones"
                    .into(),
            );
        };
        self.schema.validate(map).map_err(|e| e.to_string())
    }

    /// Runs the model: `calculate`, then `status` polls until its table is ready.
    pub async fn run(
        &self,
        args: &Args,
        progress: &ProgressSink,
        env: &[(String, String)],
    ) -> Result<Value, RunError> {
        let validated = self.validate(args).map_err(RunError::BadArguments)?;
        let mut child = spawn_program(&self.spec.command, &[], env, Stdio::piped())?;
        // Killed with everything it started however this ends (a result, an
        // error, a timeout, a cancel dropping this future).
        let group = ProcessGroup::new(child.id());
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RunError::Failed("the model's pipes are missing".into()));
        };
        let stderr = tokio::spawn(read_tail(stderr));
        let mut talk = Conversation {
            stdin,
            stdout,
            buf: Vec::new(),
        };
        let request = opal::print(&self.schema.calculate_request(&validated));
        let talked = async {
            let mut answer = talk.ask(&request).await?;
            loop {
                match answer {
                    Answer::Ready(table) => return Ok(table_to_json(&table)),
                    Answer::Error(text) => {
                        return Err(format!("the model answered an error: {text}"))
                    }
                    Answer::InProgress { percent, comment } => {
                        if percent.is_some() || comment.is_some() {
                            progress(Progress {
                                percent: percent.unwrap_or(0.0).clamp(0.0, 1.0),
                                comment: comment.unwrap_or_default(),
                            });
                        }
                    }
                }
                tokio::time::sleep(self.poll).await;
                answer = talk.ask("{ request = status }").await?;
            }
        };
        let mut timed_out = false;
        let outcome = match self.timeout {
            Some(t) => match tokio::time::timeout(t, talked).await {
                Ok(o) => o,
                Err(_) => {
                    // Killed now, so that its stderr ends and its last words are read.
                    group.kill_now();
                    timed_out = true;
                    Err(format!(
                        "timed out after {} (timeout_secs)",
                        humantime::format_duration(t)
                    ))
                }
            },
            None => talked.await,
        };
        match outcome {
            Ok(table) => Ok(table),
            Err(why) => {
                // The model's own words on stderr say more than our reading of it.
                drop(talk);
                let status = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                let tail = match tokio::time::timeout(Duration::from_secs(1), stderr).await {
                    Ok(Ok(Ok(bytes))) => String::from_utf8_lossy(&bytes).trim_end().to_string(),
                    _ => String::new(),
                };
                let exit = match status {
                    // The kill of a timeout says nothing of the model.
                    Ok(Ok(_)) if timed_out => String::new(),
                    Ok(Ok(s)) if !s.success() => format!(" ({s})"),
                    // Ended on its own, however cleanly, before it answered: what we
                    // saw of that (a broken pipe) is not the cause.
                    Ok(Ok(s)) => format!(" (ended, {s}, without answering)"),
                    _ => String::new(),
                };
                let tail = if tail.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {tail}")
                };
                Err(RunError::Failed(format!(
                    "Opal model {:?}{exit}: {why}{tail}",
                    self.spec.name
                )))
            }
        }
    }
}

/// The result of an Opal task as JSON: `{"columns": [{"name", "type", "comment"}],
/// "rows": [[cell, ...], ...]}` (the gateway turns it into a typed `ResultTable`).
pub fn table_to_json(t: &Table) -> Value {
    json!({
        "columns": t.columns.iter().map(|c| json!({
            "name": c.name,
            "type": c.ty.to_string(),
            "comment": c.comment.clone().unwrap_or_default(),
        })).collect::<Vec<_>>(),
        "rows": t.rows,
    })
}

/// The model's stdin and stdout: one request written, one answer read.
struct Conversation<R> {
    stdin: tokio::process::ChildStdin,
    stdout: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Conversation<R> {
    async fn ask(&mut self, request: &str) -> Result<Answer, String> {
        let mut line = request.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("cannot write to the model: {e}"))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| format!("cannot write to the model: {e}"))?;
        let msg = tokio::time::timeout(ANSWER_TIMEOUT, self.next_message())
            .await
            .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))??;
        opal::answer_of(&msg).map_err(|e| format!("its answer makes no sense: {e}"))
    }

    /// The next brace-balanced message on stdout, at most `opal::MAX_MESSAGE_BYTES`.
    async fn next_message(&mut self) -> Result<opal::Section, String> {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            match std::str::from_utf8(&self.buf) {
                Ok(text) => match opal::split_message(text) {
                    Ok(Some((used, msg))) => {
                        self.buf.drain(..used);
                        return Ok(msg);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("its output does not parse: {e}")),
                },
                // A character cut by the read completes with the next one.
                Err(e) if e.error_len().is_none() => {}
                Err(e) => {
                    return Err(format!(
                        "its output is not UTF-8 (byte {} of its answer)",
                        e.valid_up_to()
                    ))
                }
            }
            if self.buf.len() > opal::MAX_MESSAGE_BYTES {
                return Err(format!(
                    "it wrote more than {} bytes without a complete message",
                    opal::MAX_MESSAGE_BYTES
                ));
            }
            let n = self
                .stdout
                .read(&mut chunk)
                .await
                .map_err(|e| format!("cannot read its output: {e}"))?;
            if n == 0 {
                return Err("it ended without answering".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `command --info`, bounded in time and output.
fn run_info(command: &[String]) -> Result<String, String> {
    use std::io::Read;
    let shown = command.join(" ");
    let mut child = std::process::Command::new(&command[0])
        .args(&command[1..])
        .arg("--info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run `{shown} --info`: {e}"))?;
    let group = ProcessGroup::new(Some(child.id()));
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("`{shown} --info`: its pipes are missing"));
    };
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut out)
            .take(MAX_INFO_BYTES as u64 + 1)
            .read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut err).take(4096).read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + INFO_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                drop(group);
                let _ = child.wait();
                return Err(format!(
                    "`{shown} --info` did not finish within {INFO_TIMEOUT:?}"
                ));
            }
            Err(e) => return Err(format!("`{shown} --info`: {e}")),
        }
    };
    drop(group);
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "`{shown} --info` failed ({status}): {}",
            String::from_utf8_lossy(&err).trim_end()
        ));
    }
    if out.len() > MAX_INFO_BYTES {
        return Err(format!(
            "`{shown} --info` printed more than {MAX_INFO_BYTES} bytes"
        ));
    }
    String::from_utf8(out).map_err(|_| format!("`{shown} --info` printed text that is not UTF-8"))
}
