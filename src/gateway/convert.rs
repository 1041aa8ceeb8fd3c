//! Conversions between the gateway's records and the gRPC messages: JSON values
//! and `google.protobuf.Value`, statuses, timestamps. A task always converts to a
//! message a default client reads: values over the limits (stored by an older
//! version) become placeholders, long texts are cut.

use prost::Message as _;
use serde_json::{Map, Value};

use super::membership::Described;
use super::model::{AgentRecord, AgentState, TaskRecord, TaskStatus};
use super::GatewayError;
use crate::arpcp::{Args, ProcedureKind};
use crate::limits::{self, LimitError, CLIENT_MESSAGE_LIMIT};
use crate::opal;
use crate::pb;

/// The largest `Task` message the gateway sends, leaving room for the message
/// around it (a page token, a task id) within what a default client reads.
pub const MAX_TASK_BYTES: usize = CLIENT_MESSAGE_LIMIT - 64 * 1024;
/// Longest text shown in a task (its error, progress comment, each history
/// reason): an agent's error can carry up to an ARPCP response's 16 MiB.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// A request's protobuf Value as JSON; `field` (`args[0]`, `kwargs.x`) names it in
/// the error for a number JSON cannot hold.
pub fn value_to_json(v: &prost_types::Value, field: &str) -> Result<Value, GatewayError> {
    if let Some((path, n)) = pb::json::first_non_finite(v, field) {
        return Err(GatewayError::InvalidArgument {
            field: if field.starts_with("kwargs") {
                "kwargs"
            } else {
                "args"
            },
            reason: format!("{path}: {n} is not a finite number"),
        });
    }
    Ok(pb::json::to_json(v))
}

pub fn struct_to_json(
    s: &prost_types::Struct,
    field: &str,
) -> Result<Map<String, Value>, GatewayError> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), value_to_json(v, &format!("{field}.{k}"))?)))
        .collect()
}

pub use pb::json::{from_json as json_to_value, struct_from_json as json_to_struct};

/// The call's arguments: positional `args` or named `kwargs`, not both, within
/// the size and depth limits (`crate::limits`), so that they fit an ARPCP line.
pub fn call_args(
    args: &[prost_types::Value],
    kwargs: Option<&prost_types::Struct>,
) -> Result<Args, GatewayError> {
    let call = convert_args(args, kwargs)?;
    limits::check_args(&call).map_err(|e| GatewayError::InvalidArgument {
        field: match call {
            Args::Positional(_) => "args",
            Args::Named(_) => "kwargs",
        },
        reason: e.to_string(),
    })?;
    Ok(call)
}

fn convert_args(
    args: &[prost_types::Value],
    kwargs: Option<&prost_types::Struct>,
) -> Result<Args, GatewayError> {
    let named = kwargs.filter(|k| !k.fields.is_empty());
    match named {
        Some(_) if !args.is_empty() => Err(GatewayError::InvalidArgument {
            field: "kwargs",
            reason: "a call has positional `args` or named `kwargs`, not both".into(),
        }),
        Some(k) => Ok(Args::Named(struct_to_json(k, "kwargs")?)),
        None => Ok(Args::Positional(
            args.iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v, &format!("args[{i}]")))
                .collect::<Result<_, _>>()?,
        )),
    }
}

pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn status_to_pb(s: TaskStatus) -> pb::TaskStatus {
    match s {
        TaskStatus::Queued => pb::TaskStatus::Queued,
        TaskStatus::Dispatched => pb::TaskStatus::Dispatched,
        TaskStatus::Running => pb::TaskStatus::Running,
        TaskStatus::Done => pb::TaskStatus::Done,
        TaskStatus::Failed => pb::TaskStatus::Failed,
        TaskStatus::ClientError => pb::TaskStatus::ClientError,
        TaskStatus::Interrupted => pb::TaskStatus::Interrupted,
        TaskStatus::Cancelled => pb::TaskStatus::Cancelled,
    }
}

/// A filter's status: `None` for unspecified; an error for numbers no status has.
pub fn status_from_pb(n: i32) -> Result<Option<TaskStatus>, GatewayError> {
    let s = pb::TaskStatus::try_from(n).map_err(|_| GatewayError::InvalidArgument {
        field: "status",
        reason: format!("{n} is not a TaskStatus"),
    })?;
    Ok(match s {
        pb::TaskStatus::Unspecified => None,
        pb::TaskStatus::Queued => Some(TaskStatus::Queued),
        pb::TaskStatus::Dispatched => Some(TaskStatus::Dispatched),
        pb::TaskStatus::Running => Some(TaskStatus::Running),
        pb::TaskStatus::Done => Some(TaskStatus::Done),
        pb::TaskStatus::Failed => Some(TaskStatus::Failed),
        pb::TaskStatus::ClientError => Some(TaskStatus::ClientError),
        pb::TaskStatus::Interrupted => Some(TaskStatus::Interrupted),
        pb::TaskStatus::Cancelled => Some(TaskStatus::Cancelled),
    })
}

/// What a client sees of a value over the limits: a short string saying what was
/// left out and why (an error would make the task, and any listing holding it,
/// unreadable for good).
fn placeholder(e: &LimitError) -> prost_types::Value {
    json_to_value(&Value::String(format!("<omitted by the gateway: {e}>")))
}

/// `s`, cut to `MAX_TEXT_BYTES` with a note saying how much was left out.
fn text(s: &str) -> String {
    if s.len() <= MAX_TEXT_BYTES {
        return s.to_string();
    }
    let mut end = MAX_TEXT_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} more bytes omitted by the gateway)",
        &s[..end],
        s.len() - end
    )
}

pub fn task_to_pb(t: &TaskRecord) -> pb::Task {
    let (args, kwargs) = match (limits::check_args(&t.args), &t.args) {
        (Err(e), _) => (vec![placeholder(&e)], None),
        (Ok(()), Args::Positional(a)) => (a.iter().map(json_to_value).collect(), None),
        (Ok(()), Args::Named(m)) => (Vec::new(), Some(json_to_struct(m))),
    };
    let mut task = pb::Task {
        task_id: t.task_id.clone(),
        procedure: t.procedure.clone(),
        args,
        kwargs,
        status: status_to_pb(t.status) as i32,
        table: None,
        // A stored `null` result reads back as none: a done task's result is null then.
        result: match (&t.result, t.status) {
            (Some(v), _) => Some(match limits::check_result(v) {
                Ok(()) => json_to_value(v),
                Err(e) => placeholder(&e),
            }),
            (None, TaskStatus::Done) => Some(json_to_value(&Value::Null)),
            (None, _) => None,
        },
        error: t.error.as_deref().map(text).unwrap_or_default(),
        agent_id: t.agent_id.clone().unwrap_or_default(),
        progress: t.progress.as_ref().map(|p| pb::Progress {
            fraction: p.percent,
            comment: text(&p.comment),
        }),
        created_at: Some(timestamp(t.created_ms)),
        started_at: t.started_ms.map(timestamp),
        finished_at: t.finished_ms.map(timestamp),
        error_code: t.error_code.map_or(0, i32::from),
        attempts: t.attempt,
        requested_agent_id: t.requested_agent_id.clone().unwrap_or_default(),
        owner: t.owner.clone(),
        history: t
            .history
            .iter()
            .map(|h| pb::StatusChange {
                status: status_to_pb(h.status) as i32,
                at: Some(timestamp(h.at_ms)),
                reason: h.reason.as_deref().map(text).unwrap_or_default(),
                agent_id: h.agent_id.clone().unwrap_or_default(),
            })
            .collect(),
    };
    // An Opal model's result is its table, typed.
    if t.opal && t.status == TaskStatus::Done {
        if let Some(table) = t.result.as_ref().and_then(table_to_pb) {
            task.table = Some(table);
            task.result = None;
        }
    }
    let over = task.encoded_len().saturating_sub(MAX_TASK_BYTES);
    if over > 0 {
        // Only a history of very many placements gets here: values and texts are
        // bounded above.
        omit_history(&mut task.history, over);
    }
    task
}

/// Leaves out the oldest history entries but the first (the task's creation)
/// until `over` bytes are gone, with one entry saying how many were left out.
fn omit_history(history: &mut Vec<pb::StatusChange>, over: usize) {
    let mut freed = 0;
    let mut n = 0;
    for h in history.iter().skip(1) {
        if freed > over + 256 {
            break;
        }
        let len = h.encoded_len();
        freed += 1 + prost::length_delimiter_len(len) + len;
        n += 1;
    }
    if n == 0 {
        return;
    }
    let last = history[n].clone();
    history.splice(
        1..=n,
        [pb::StatusChange {
            reason: format!("{n} earlier status changes omitted by the gateway"),
            ..last
        }],
    );
}

pub fn agent_to_pb(a: &AgentRecord) -> pb::Agent {
    pb::Agent {
        agent_id: a.agent_id.clone(),
        mac: a.mac.clone(),
        ip: a.ip.clone(),
        port: u32::from(a.port),
        hostname: a.hostname.clone(),
        state: match a.state {
            AgentState::Alive => pb::AgentState::Alive,
            AgentState::Suspect => pb::AgentState::Suspect,
            AgentState::Gone => pb::AgentState::Gone,
        } as i32,
        misses: a.misses,
        last_seen: Some(timestamp(a.last_seen_ms)),
        procedures: a.procedures.clone(),
        capacity: a.capacity,
        running: a.running,
        blacklisted: a.blacklisted,
        version: a.version.clone(),
        address: a.address.clone(),
        certificate_name: a.certificate.clone().unwrap_or_default(),
    }
}

/// An Opal result as the agent sends it (`{"columns": [{"name", "type", "comment"}],
/// "rows": [[...]]}`) → a typed table; `None` for anything else.
fn table_to_pb(v: &Value) -> Option<pb::ResultTable> {
    let columns = v
        .get("columns")?
        .as_array()?
        .iter()
        .map(|c| {
            Some(pb::Column {
                name: c.get("name")?.as_str()?.to_string(),
                r#type: c.get("type")?.as_str()?.to_string(),
                comment: c
                    .get("comment")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let rows = v
        .get("rows")?
        .as_array()?
        .iter()
        .map(|r| {
            Some(pb::Row {
                cells: r.as_array()?.iter().map(json_to_value).collect(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(pb::ResultTable { columns, rows })
}

pub fn kind_to_pb(k: Option<ProcedureKind>) -> pb::ProcedureKind {
    match k {
        None => pb::ProcedureKind::Unspecified,
        Some(ProcedureKind::Builtin) => pb::ProcedureKind::Builtin,
        Some(ProcedureKind::Command) => pb::ProcedureKind::Command,
        Some(ProcedureKind::Opal) => pb::ProcedureKind::Opal,
    }
}

fn params_to_pb(params: &[opal::Param]) -> Vec<pb::Parameter> {
    params
        .iter()
        .map(|p| pb::Parameter {
            name: p.name.clone(),
            r#type: p.ty.to_string(),
            choices: p.choices.iter().map(json_to_value).collect(),
            default_value: p.default.as_ref().map(json_to_value),
            partition: p.partition.as_ref().map(|q| pb::Partition {
                from: q.from,
                to: q.to,
                step: q.step,
            }),
            comment: p.comment.clone().unwrap_or_default(),
            required: p.default.is_none(),
        })
        .collect()
}

/// A procedure as `DescribeProcedure` answers it.
pub fn schema_to_pb(procedure: &str, d: &Described) -> pb::ProcedureSchema {
    let (main, algorithms) = match &d.schema {
        Some(s) => (
            params_to_pb(&s.main),
            s.algorithms
                .iter()
                .map(|a| pb::Algorithm {
                    name: a.name.clone(),
                    parameters: params_to_pb(&a.params),
                })
                .collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    pb::ProcedureSchema {
        procedure: procedure.to_string(),
        kind: kind_to_pb(d.kind) as i32,
        main,
        algorithms,
        agent_ids: d.agent_ids.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clients_and_the_gateway_agree_on_final_statuses() {
        for n in 0..=16 {
            let Ok(p) = pb::TaskStatus::try_from(n) else {
                continue;
            };
            let gateway = status_from_pb(n).unwrap().is_some_and(TaskStatus::is_final);
            assert_eq!(p.is_final(), gateway, "{p:?}");
        }
    }

    #[test]
    fn json_round_trips_and_integers_stay_integers() {
        let v = json!({"a": [1, 2.5, "x", null, true], "b": {"c": -3}});
        let back = value_to_json(&json_to_value(&v), "args").unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn non_finite_numbers_are_refused_with_the_field() {
        let nan = prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
        };
        let e = call_args(&[json_to_value(&json!(1)), nan.clone()], None).unwrap_err();
        assert!(e.to_string().starts_with("args: args[1]"), "{e}");
        let mut named = json_to_struct(json!({"x": 1}).as_object().unwrap());
        named.fields.insert("y".into(), nan);
        let e = call_args(&[], Some(&named)).unwrap_err();
        assert!(e.to_string().starts_with("kwargs: kwargs.y"), "{e}");
    }

    #[test]
    fn a_done_task_has_a_result_even_when_it_is_null() {
        let mut t = TaskRecord::new("t".into(), "sleep".into(), Args::default(), None);
        t.dispatch("a1");
        t.finish(1, crate::gateway::model::Outcome::Done(Value::Null));
        let stored: TaskRecord = serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
        let pb = task_to_pb(&stored);
        assert_eq!(pb.result, Some(json_to_value(&Value::Null)));
        assert_eq!(
            task_to_pb(&TaskRecord::new(
                "u".into(),
                "sleep".into(),
                Args::default(),
                None
            ))
            .result,
            None
        );
    }

    #[test]
    fn every_task_fits_a_default_client() {
        let mut t = TaskRecord::new("t".into(), "p".into(), Args::default(), None);
        t.error = Some("e".repeat(100_000));
        for i in 0..5000 {
            t.history.push(crate::gateway::model::StatusChange {
                status: TaskStatus::Queued,
                at_ms: i,
                reason: Some(format!("{i} {}", "r".repeat(2000))),
                agent_id: None,
            });
        }
        let pb = task_to_pb(&t);
        assert!(pb.encoded_len() <= MAX_TASK_BYTES);
        assert!(pb
            .error
            .ends_with("(83616 more bytes omitted by the gateway)"));
        assert_eq!(pb.history[0].reason, "", "the creation is kept");
        assert!(pb.history[1]
            .reason
            .ends_with("earlier status changes omitted by the gateway"));
        let last = pb.history.last().unwrap();
        assert!(last.reason.starts_with("4999 "), "the newest are kept");
    }

    #[test]
    fn args_and_kwargs_together_are_refused() {
        let k = json_to_struct(json!({"x": 1}).as_object().unwrap());
        let e = call_args(&[json_to_value(&json!(1))], Some(&k)).unwrap_err();
        assert!(e.to_string().starts_with("kwargs:"), "{e}");
        assert_eq!(
            call_args(&[], Some(&k)).unwrap(),
            Args::Named(json!({"x": 1}).as_object().unwrap().clone())
        );
    }
}
