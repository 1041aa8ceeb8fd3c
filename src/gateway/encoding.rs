//! How the gateway's task store lays tasks out on disk (format 2): a record per task
//! as a protobuf message keyed by the task id's 16 bytes, and, for finished tasks,
//! index entries (empty values, all in one tree) whose keys name a status, a
//! procedure or an agent followed by the task id, so that key order within one of
//! them is creation order.
//!
//! The message types are written out here with `prost`'s derive rather than in a
//! `.proto`: the format is the store's own, never seen by a client, and its tags sit
//! next to the conversion that gives them meaning. Every record starts with a
//! format byte, so a record from another format is named as such rather than
//! misread. Format 1 is the JSON of [`TaskRecord`] under the id as text; the store
//! migrates it at start (see `store.rs`).
//!
//! Times after `created_ms` are kept as signed differences from it (a clock
//! stepped back stays exact), and agent ids of the form `agent-N` as N: a finished
//! task names its agent in most history entries.

use prost::Message;
use serde_json::Value;

use super::model::{StatusChange, TaskRecord, TaskStatus};
use crate::arpcp::{Args, Progress};

/// The first byte of every format-2 record.
pub const FORMAT: u8 = 2;

/// A task id as a key: the UUID's 16 bytes, whose order is the text's.
pub type IdKey = [u8; 16];

/// Index key prefixes.
const BY_STATUS: u8 = b's';
const BY_PROCEDURE: u8 = b'p';
const BY_AGENT: u8 = b'a';

/// The key of a task id; `None` for text that is not a UUID in its canonical
/// (lowercase, hyphenated) form, which the gateway never makes.
pub fn id_key(id: &str) -> Option<IdKey> {
    let u = uuid::Uuid::try_parse(id).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (u.hyphenated().encode_lower(&mut buf) == id).then(|| *u.as_bytes())
}

pub fn id_text(key: &[u8]) -> Option<String> {
    Some(uuid::Uuid::from_slice(key).ok()?.to_string())
}

fn status_code(s: TaskStatus) -> u8 {
    match s {
        TaskStatus::Queued => 1,
        TaskStatus::Dispatched => 2,
        TaskStatus::Running => 3,
        TaskStatus::Done => 4,
        TaskStatus::Failed => 5,
        TaskStatus::ClientError => 6,
        TaskStatus::Interrupted => 7,
        TaskStatus::Cancelled => 8,
    }
}

fn status_of(code: u32) -> Result<TaskStatus, String> {
    Ok(match code {
        1 => TaskStatus::Queued,
        2 => TaskStatus::Dispatched,
        3 => TaskStatus::Running,
        4 => TaskStatus::Done,
        5 => TaskStatus::Failed,
        6 => TaskStatus::ClientError,
        7 => TaskStatus::Interrupted,
        8 => TaskStatus::Cancelled,
        n => return Err(format!("status code {n} is not one of 1..=8")),
    })
}

/// `prefix`, then `name` with its length before it (a varint), so that one name's
/// entries are never a prefix of another's.
fn named(prefix: u8, name: &str, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 2 + name.len() + extra);
    k.push(prefix);
    prost::encoding::encode_varint(name.len() as u64, &mut k);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Where the entries of one filter value start.
pub fn status_prefix(s: TaskStatus) -> Vec<u8> {
    vec![BY_STATUS, status_code(s)]
}
pub fn procedure_prefix(p: &str) -> Vec<u8> {
    named(BY_PROCEDURE, p, 16)
}
pub fn agent_prefix(a: &str) -> Vec<u8> {
    named(BY_AGENT, a, 16)
}

/// What the index and the listings' filters know of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Indexed {
    pub status: TaskStatus,
    pub procedure: String,
    pub agent_id: Option<String>,
    pub finished_ms: Option<u64>,
}

impl Indexed {
    pub fn of(t: &TaskRecord) -> Indexed {
        Indexed {
            status: t.status,
            procedure: t.procedure.clone(),
            agent_id: t.agent_id.clone(),
            finished_ms: t.finished_ms,
        }
    }
}

/// Whether the status index holds a status: every final one but `done`, which
/// nearly every task ends in; its listing reads the records instead (a partial
/// index: one sled entry fewer for most tasks, which is disk and memory).
pub fn status_indexed(s: TaskStatus) -> bool {
    s.is_final() && s != TaskStatus::Done
}

/// The index entries of a task: by procedure, agent (when it had one) and status
/// (see [`status_indexed`]) once it has finished, none before. A task's entries
/// change once, when it finishes, as its status does not change after that.
pub fn index_keys(id: &IdKey, t: &Indexed) -> Vec<Vec<u8>> {
    if !t.status.is_final() {
        return Vec::new();
    }
    let with_id = |mut k: Vec<u8>| {
        k.extend_from_slice(id);
        k
    };
    let mut keys = vec![with_id(procedure_prefix(&t.procedure))];
    if status_indexed(t.status) {
        keys.push(with_id(status_prefix(t.status)));
    }
    if let Some(a) = &t.agent_id {
        keys.push(with_id(agent_prefix(a)));
    }
    keys
}

/// When the task of a key was created, from the id (a UUID v7 holds its
/// creation's millisecond); `None` for an id of another version.
pub fn created_ms(id: &IdKey) -> Option<u64> {
    let u = uuid::Uuid::from_bytes(*id);
    (u.get_version_num() == 7).then(|| {
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&id[..6]);
        u64::from_be_bytes(ms)
    })
}

#[derive(Clone, PartialEq, Message)]
struct StoredTask {
    #[prost(string, tag = "1")]
    procedure: String,
    /// JSON.
    #[prost(bytes = "vec", tag = "2")]
    args: Vec<u8>,
    #[prost(uint32, tag = "3")]
    status: u32,
    /// JSON.
    #[prost(bytes = "vec", optional, tag = "4")]
    result: Option<Vec<u8>>,
    #[prost(string, optional, tag = "5")]
    error: Option<String>,
    #[prost(uint32, optional, tag = "6")]
    error_code: Option<u32>,
    #[prost(message, optional, tag = "7")]
    agent: Option<AgentRef>,
    #[prost(message, optional, tag = "8")]
    requested_agent: Option<AgentRef>,
    #[prost(message, optional, tag = "9")]
    progress: Option<StoredProgress>,
    #[prost(uint32, tag = "10")]
    attempt: u32,
    #[prost(uint64, tag = "11")]
    created_ms: u64,
    #[prost(sint64, optional, tag = "12")]
    started: Option<i64>,
    #[prost(sint64, optional, tag = "13")]
    finished: Option<i64>,
    #[prost(sint64, tag = "14")]
    updated: i64,
    #[prost(message, repeated, tag = "15")]
    history: Vec<StoredChange>,
    #[prost(bool, tag = "16")]
    sync: bool,
    #[prost(bool, tag = "17")]
    opal: bool,
    #[prost(string, tag = "18")]
    owner: String,
}

/// An agent id: `agent-N` as N, anything else as text.
#[derive(Clone, PartialEq, Message)]
struct AgentRef {
    #[prost(uint64, optional, tag = "1")]
    number: Option<u64>,
    #[prost(string, optional, tag = "2")]
    text: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct StoredProgress {
    #[prost(double, tag = "1")]
    percent: f64,
    #[prost(string, tag = "2")]
    comment: String,
}

#[derive(Clone, PartialEq, Message)]
struct StoredChange {
    #[prost(uint32, tag = "1")]
    status: u32,
    #[prost(sint64, tag = "2")]
    at: i64,
    #[prost(string, optional, tag = "3")]
    reason: Option<String>,
    #[prost(message, optional, tag = "4")]
    agent: Option<AgentRef>,
}

fn agent_ref(id: &Option<String>) -> Option<AgentRef> {
    let id = id.as_ref()?;
    let number = id
        .strip_prefix("agent-")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| format!("agent-{n}") == *id);
    Some(match number {
        Some(n) => AgentRef {
            number: Some(n),
            text: None,
        },
        None => AgentRef {
            number: None,
            text: Some(id.clone()),
        },
    })
}

fn agent_id(r: Option<AgentRef>) -> Option<String> {
    let r = r?;
    match r.number {
        Some(n) => Some(format!("agent-{n}")),
        None => r.text,
    }
}

fn delta(at: u64, base: u64) -> i64 {
    (at as i128 - base as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

fn at(delta: i64, base: u64) -> u64 {
    (base as i128 + delta as i128).clamp(0, u64::MAX as i128) as u64
}

/// A task as a format-2 record (its id is the key, not in the record).
pub fn encode(t: &TaskRecord) -> Result<Vec<u8>, String> {
    let base = t.created_ms;
    let stored = StoredTask {
        procedure: t.procedure.clone(),
        args: serde_json::to_vec(&t.args).map_err(|e| format!("args: {e}"))?,
        status: status_code(t.status).into(),
        result: t
            .result
            .as_ref()
            .map(|r| serde_json::to_vec(r).map_err(|e| format!("result: {e}")))
            .transpose()?,
        error: t.error.clone(),
        error_code: t.error_code.map(u32::from),
        agent: agent_ref(&t.agent_id),
        requested_agent: agent_ref(&t.requested_agent_id),
        progress: t.progress.as_ref().map(|p| StoredProgress {
            percent: p.percent,
            comment: p.comment.clone(),
        }),
        attempt: t.attempt,
        created_ms: base,
        started: t.started_ms.map(|s| delta(s, base)),
        finished: t.finished_ms.map(|s| delta(s, base)),
        updated: delta(t.updated_ms, base),
        history: t
            .history
            .iter()
            .map(|h| StoredChange {
                status: status_code(h.status).into(),
                at: delta(h.at_ms, base),
                reason: h.reason.clone(),
                agent: agent_ref(&h.agent_id),
            })
            .collect(),
        sync: t.sync,
        opal: t.opal,
        owner: t.owner.clone(),
    };
    let mut out = Vec::with_capacity(1 + stored.encoded_len());
    out.push(FORMAT);
    stored
        .encode(&mut out)
        .map_err(|e| format!("protobuf: {e}"))?;
    Ok(out)
}

fn body(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => Ok(body),
        Some((&b'{', _)) => Err("a JSON (format 1) record among format-2 records".to_string()),
        Some((f, _)) => Err(format!(
            "record format {f}, this gateway reads format {FORMAT}"
        )),
        None => Err("an empty record".to_string()),
    }
}

/// The indexed fields of a format-2 record, without reading its arguments and
/// result.
pub fn peek(bytes: &[u8]) -> Result<Indexed, String> {
    let s = StoredTask::decode(body(bytes)?).map_err(|e| format!("protobuf: {e}"))?;
    Ok(Indexed {
        status: status_of(s.status)?,
        agent_id: agent_id(s.agent),
        finished_ms: s.finished.map(|d| at(d, s.created_ms)),
        procedure: s.procedure,
    })
}

/// A format-2 record back as the task `id`.
pub fn decode(id: String, bytes: &[u8]) -> Result<TaskRecord, String> {
    let body = body(bytes)?;
    let s = StoredTask::decode(body).map_err(|e| format!("protobuf: {e}"))?;
    let base = s.created_ms;
    let args: Args = serde_json::from_slice(&s.args).map_err(|e| format!("args: {e}"))?;
    // As JSON did: a stored `null` result reads as no result.
    let result: Option<Value> = match &s.result {
        Some(r) => serde_json::from_slice(r).map_err(|e| format!("result: {e}"))?,
        None => None,
    };
    let error_code = s
        .error_code
        .map(|c| u16::try_from(c).map_err(|_| format!("error code {c} is over 65535")))
        .transpose()?;
    let history = s
        .history
        .into_iter()
        .map(|h| {
            Ok(StatusChange {
                status: status_of(h.status)?,
                at_ms: at(h.at, base),
                reason: h.reason,
                agent_id: agent_id(h.agent),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(TaskRecord {
        task_id: id,
        procedure: s.procedure,
        args,
        status: status_of(s.status)?,
        result,
        error: s.error,
        error_code,
        agent_id: agent_id(s.agent),
        requested_agent_id: agent_id(s.requested_agent),
        progress: s.progress.map(|p| Progress {
            percent: p.percent,
            comment: p.comment,
        }),
        attempt: s.attempt,
        created_ms: base,
        started_ms: s.started.map(|d| at(d, base)),
        finished_ms: s.finished.map(|d| at(d, base)),
        updated_ms: at(s.updated, base),
        history,
        sync: s.sync,
        opal: s.opal,
        owner: s.owner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn finished_add() -> TaskRecord {
        let id = uuid::Uuid::now_v7().to_string();
        let mut t = TaskRecord::new(
            id,
            "add".into(),
            Args::Positional(vec![json!(1), json!(2)]),
            None,
        );
        let now = t.created_ms;
        t.agent_id = Some("agent-3".into());
        t.attempt = 1;
        t.set_status(TaskStatus::Dispatched, None, now + 2);
        t.started_ms = Some(now + 3);
        t.set_status(TaskStatus::Running, None, now + 3);
        t.result = Some(json!(3));
        t.set_status(TaskStatus::Done, None, now + 5);
        t
    }

    #[test]
    fn records_round_trip() {
        let mut t = finished_add();
        assert_eq!(decode(t.task_id.clone(), &encode(&t).unwrap()).unwrap(), t);
        // Everything optional set, odd agent ids, a clock that went back.
        t.error = Some("boom".into());
        t.error_code = Some(400);
        t.agent_id = Some("agent-007".into());
        t.requested_agent_id = Some("elsewhere".into());
        t.progress = Some(Progress {
            percent: 0.5,
            comment: "half".into(),
        });
        t.finished_ms = Some(t.created_ms - 10);
        t.history[1].reason = Some("why".into());
        t.args = Args::Named(json!({"a": [1, {"b": null}]}).as_object().unwrap().clone());
        t.sync = true;
        t.opal = true;
        t.owner = "cert:client".into();
        assert_eq!(decode(t.task_id.clone(), &encode(&t).unwrap()).unwrap(), t);
    }

    #[test]
    fn a_finished_add_is_small() {
        let t = finished_add();
        let bytes = encode(&t).unwrap();
        let json = serde_json::to_vec(&t).unwrap();
        assert!(
            bytes.len() < 100,
            "{} bytes (JSON: {})",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn other_formats_are_named() {
        let err = decode("x".into(), b"{\"task_id\":1}").unwrap_err();
        assert!(err.contains("format 1"), "{err}");
        let err = decode("x".into(), &[9, 1, 2]).unwrap_err();
        assert!(err.contains("format 9"), "{err}");
    }

    #[test]
    fn only_canonical_ids_are_keys() {
        let id = uuid::Uuid::now_v7().to_string();
        let key = id_key(&id).unwrap();
        assert_eq!(id_text(&key).as_deref(), Some(id.as_str()));
        assert_eq!(id_key(&id.to_uppercase()), None);
        assert_eq!(id_key("t"), None);
    }

    #[test]
    fn index_keys_of_one_name_are_not_prefixes_of_another() {
        let a = procedure_prefix("ad");
        let b = procedure_prefix("add");
        assert!(!b.starts_with(&a) && !a.starts_with(&b));
    }
}
