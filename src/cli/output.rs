//! How client commands show things: aligned tables for people, JSON for scripts.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{json, Value};

use crate::pb;

/// Set once a write to stdout failed: later output is dropped.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set when that failure was not the reader going away (a full disk, say).
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// `println!` for client output. A reader that went away (`arpcp tasks | head`)
/// ends the output quietly and the command ends with its own status (a failed
/// task still exits 1): it took what it wanted, and `set -o pipefail` scripts
/// must not fail for it. `println!` would panic, and SIGPIPE's default action
/// cannot be restored instead: it would also kill the gRPC client on a socket the
/// gateway closed. Any other write error is reported once and fails the command.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::stdout_write(format!($($arg)*).as_bytes(), true)
    };
}
pub(crate) use outln;

/// Writes `bytes` (and a newline) to stdout unless stdout failed before.
pub fn stdout_write(bytes: &[u8], newline: bool) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(bytes)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = written {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            STDOUT_FAILED.store(true, Ordering::Relaxed);
            let _ = writeln!(std::io::stderr(), "error: cannot write to stdout: {e}");
        }
    }
}

/// Whether output was lost for another reason than its reader going away.
pub fn stdout_failed() -> bool {
    STDOUT_FAILED.load(Ordering::Relaxed)
}

pub use crate::pb::json::to_json as value_json;

pub fn time(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) if t.seconds > 0 => {
            let st = std::time::UNIX_EPOCH
                + std::time::Duration::new(t.seconds as u64, t.nanos.max(0) as u32);
            json!(humantime::format_rfc3339_millis(st).to_string())
        }
        _ => Value::Null,
    }
}

/// A protobuf enum value as people say it: `TASK_STATUS_DONE` → `done`; an
/// unknown number as itself.
fn enum_name(name: Option<&str>, prefix: &str, n: i32) -> String {
    name.map(|s| s.trim_start_matches(prefix).to_lowercase())
        .unwrap_or_else(|| n.to_string())
}

pub fn status_name(s: i32) -> String {
    let name = pb::TaskStatus::try_from(s).ok().map(|v| v.as_str_name());
    enum_name(name, "TASK_STATUS_", s)
}

pub fn agent_state_name(s: i32) -> String {
    let name = pb::AgentState::try_from(s).ok().map(|v| v.as_str_name());
    enum_name(name, "AGENT_STATE_", s)
}

pub fn kind_name(k: i32) -> String {
    let name = pb::ProcedureKind::try_from(k).ok().map(|v| v.as_str_name());
    enum_name(name, "PROCEDURE_KIND_", k)
}

pub fn task_json(t: &pb::Task) -> Value {
    let args = match &t.kwargs {
        Some(k) if !k.fields.is_empty() => Value::Object(
            k.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect(),
        ),
        _ => Value::Array(t.args.iter().map(value_json).collect()),
    };
    json!({
        "task_id": t.task_id,
        "procedure": t.procedure,
        "args": args,
        "status": status_name(t.status),
        "result": t.result.as_ref().map(value_json),
        "table": t.table.as_ref().map(table_json),
        "error": (!t.error.is_empty()).then_some(&t.error),
        "error_code": (t.error_code != 0).then_some(t.error_code),
        "agent_id": (!t.agent_id.is_empty()).then_some(&t.agent_id),
        "owner": (!t.owner.is_empty()).then_some(&t.owner),
        "progress": t.progress.as_ref().map(|p| json!({"fraction": p.fraction, "comment": p.comment})),
        "attempts": t.attempts,
        "created_at": time(&t.created_at),
        "started_at": time(&t.started_at),
        "finished_at": time(&t.finished_at),
        "history": t.history.iter().map(|h| json!({
            "status": status_name(h.status),
            "at": time(&h.at),
            "reason": (!h.reason.is_empty()).then_some(&h.reason),
            "agent_id": (!h.agent_id.is_empty()).then_some(&h.agent_id),
        })).collect::<Vec<_>>(),
    })
}

pub fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "agent_id": a.agent_id,
        "address": a.address,
        "mac": a.mac,
        "ip": a.ip,
        "port": a.port,
        "hostname": a.hostname,
        "state": agent_state_name(a.state),
        "misses": a.misses,
        "last_seen": time(&a.last_seen),
        "procedures": a.procedures,
        "capacity": a.capacity,
        "running": a.running,
        "blacklisted": a.blacklisted,
        "version": a.version,
        "certificate_name": (!a.certificate_name.is_empty()).then_some(&a.certificate_name),
    })
}

/// Prints rows as columns aligned under their headers.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A compact one-line rendering of a JSON value.
pub fn short(v: &Value, max: usize) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > max {
        format!(
            "{}…",
            s.chars().take(max.saturating_sub(1)).collect::<String>()
        )
    } else {
        s
    }
}

/// An Opal result table as JSON: columns and rows.
pub fn table_json(t: &pb::ResultTable) -> Value {
    json!({
        "columns": t.columns.iter().map(|c| json!({
            "name": c.name, "type": c.r#type, "comment": c.comment,
        })).collect::<Vec<_>>(),
        "rows": t.rows.iter().map(|r| r.cells.iter().map(value_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}

/// A cell as people read it: strings bare, numbers and the rest as JSON.
pub fn cell_text(v: &prost_types::Value) -> String {
    match value_json(v) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// An Opal result table, aligned, with its column types in the header.
pub fn result_table(t: &pb::ResultTable) {
    let headers: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("{} ({})", c.name, c.r#type))
        .collect();
    let rows: Vec<Vec<String>> = t
        .rows
        .iter()
        .map(|r| r.cells.iter().map(cell_text).collect())
        .collect();
    table(
        &headers.iter().map(String::as_str).collect::<Vec<_>>(),
        &rows,
    );
}

/// An Opal result table as CSV (RFC 4180 quoting), header first.
pub fn result_csv(t: &pb::ResultTable) {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let header: Vec<String> = t.columns.iter().map(|c| field(&c.name)).collect();
    outln!("{}", header.join(","));
    for r in &t.rows {
        let cells: Vec<String> = r.cells.iter().map(|c| field(&cell_text(c))).collect();
        outln!("{}", cells.join(","));
    }
}
