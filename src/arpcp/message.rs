//! ARPCP messages: typed requests and responses, and the parser that turns one line
//! into a request. Parsing checks in the order the protocol fixes: JSON object (200)
//! → `method`/`version` present (202) → version (206) → method known (201) → the
//! method's headers present (202) → header types and values (200). Lookups (203/205)
//! and arguments (204) are the receiver's business, not the parser's.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{Code, ProtocolError};
use super::VERSION;

/// The five ARPCP methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Atask,
    Task,
    Get,
    Signal,
    Id,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Atask,
        Method::Task,
        Method::Get,
        Method::Signal,
        Method::Id,
    ];

    /// The name as senders write it (upper case).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Atask => "ATASK",
            Method::Task => "TASK",
            Method::Get => "GET",
            Method::Signal => "SIGNAL",
            Method::Id => "ID",
        }
    }

    /// Matches case-insensitively: the seed's own example writes `"id"`.
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
    }

    fn required_headers(self) -> &'static [&'static str] {
        match self {
            Method::Atask | Method::Task => &["remote_procedure", "remote_procedure_args"],
            Method::Get => &["atask_id"],
            Method::Signal => &["atask_id", "atask_status"],
            Method::Id => &[],
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call's arguments: positional (the seed's array) or named (for Opal models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Args {
    Positional(Vec<Value>),
    Named(Map<String, Value>),
}

impl Default for Args {
    fn default() -> Self {
        Args::Positional(Vec::new())
    }
}

impl Args {
    pub fn to_value(&self) -> Value {
        match self {
            Args::Positional(v) => Value::Array(v.clone()),
            Args::Named(m) => Value::Object(m.clone()),
        }
    }
}

/// `atask_status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AtaskStatus {
    Accepted,
    Interrupted,
    Done,
    ClientError,
    Terminate,
}

impl AtaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AtaskStatus::Accepted => "accepted",
            AtaskStatus::Interrupted => "interrupted",
            AtaskStatus::Done => "done",
            AtaskStatus::ClientError => "client_error",
            AtaskStatus::Terminate => "terminate",
        }
    }

    fn parse(s: &str) -> Option<AtaskStatus> {
        [
            AtaskStatus::Accepted,
            AtaskStatus::Interrupted,
            AtaskStatus::Done,
            AtaskStatus::ClientError,
            AtaskStatus::Terminate,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// How far a running task has got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// 0.0 to 1.0.
    pub percent: f64,
    #[serde(default)]
    pub comment: String,
}

/// Why a task failed: an ARPCP code (400 execution, 204 arguments, ...) and its text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    pub code: Code,
    pub description: String,
}

impl From<&ProtocolError> for TaskError {
    fn from(e: &ProtocolError) -> Self {
        TaskError {
            code: e.code(),
            description: e.to_string(),
        }
    }
}

/// A SIGNAL: agent → controller (status changes), or controller → agent (`terminate`).
#[derive(Debug, Clone, PartialEq)]
pub struct SignalRequest {
    pub atask_id: String,
    pub status: AtaskStatus,
    pub progress: Option<Progress>,
    pub agent_id: Option<String>,
    pub error: Option<TaskError>,
    /// With `accepted`: the agent asks whether it may start this attempt now (it
    /// was accepted under a lease that lapsed since). 100 means yes, and the
    /// controller counts the task as running from then on; 205 means the attempt
    /// was withdrawn and must not run.
    pub start: bool,
}

/// A parsed ARPCP request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Atask {
        procedure: String,
        args: Args,
        atask_id: Option<String>,
        reply_to: Option<String>,
        /// The controller's lease epoch for this agent when it placed the task:
        /// an agent holding another epoch asks before it starts the task.
        lease_epoch: Option<u64>,
    },
    Task {
        procedure: String,
        args: Args,
        timeout_ms: Option<u64>,
    },
    Get {
        atask_id: String,
    },
    Signal(SignalRequest),
    Id {
        /// The id the controller assigned to the agent it probes.
        agent_id: Option<String>,
        /// Where the controller listens (so the agent knows where SIGNALs go).
        controller: Option<String>,
        /// An announcing agent's own ARPCP port.
        port: Option<u16>,
        /// The controller's lease: for this long after the echo, the agent may
        /// start the attempts it holds without asking (see `SignalRequest::start`).
        lease_ms: Option<u64>,
        /// Asks the agent to include its catalog (procedure kinds, Opal schemas).
        describe: bool,
    },
}

impl Request {
    pub fn method(&self) -> Method {
        match self {
            Request::Atask { .. } => Method::Atask,
            Request::Task { .. } => Method::Task,
            Request::Get { .. } => Method::Get,
            Request::Signal(_) => Method::Signal,
            Request::Id { .. } => Method::Id,
        }
    }

    /// Parses one line (without its terminator).
    pub fn parse(line: &[u8]) -> Result<Request, ProtocolError> {
        let obj = parse_object(line)?;
        let method = obj.get("method").filter(|v| !v.is_null());
        let version = obj.get("version").filter(|v| !v.is_null());
        let (Some(method), Some(version)) = (method, version) else {
            return Err(ProtocolError::MissingHeader {
                header: if method.is_none() {
                    "method"
                } else {
                    "version"
                },
                for_method: None,
            });
        };
        match version.as_str().map(str::trim) {
            Some("1.0") | Some("ARPCP/1.0") => {}
            Some(other) => return Err(ProtocolError::Version(other.to_string())),
            None => {
                return Err(ProtocolError::HeaderNotString {
                    header: "version",
                    example: "\"1.0\"",
                    got: json_type(version),
                })
            }
        }
        let method = match method.as_str() {
            Some(s) => Method::parse(s).ok_or_else(|| ProtocolError::UnknownMethod(s.into()))?,
            None => {
                return Err(ProtocolError::HeaderNotString {
                    header: "method",
                    example: "\"ATASK\"",
                    got: json_type(method),
                })
            }
        };
        for &header in method.required_headers() {
            if obj.get(header).is_none_or(Value::is_null) {
                return Err(ProtocolError::MissingHeader {
                    header,
                    for_method: Some(method.as_str()),
                });
            }
        }
        let h = Headers(&obj);
        Ok(match method {
            Method::Atask => Request::Atask {
                procedure: h.procedure()?,
                args: h.args()?,
                atask_id: h.opt_id("atask_id")?,
                reply_to: h.opt_addr("reply_to")?,
                lease_epoch: h.opt_u64("lease_epoch")?,
            },
            Method::Task => Request::Task {
                procedure: h.procedure()?,
                args: h.args()?,
                timeout_ms: h.opt_u64("timeout_ms")?,
            },
            Method::Get => Request::Get {
                atask_id: h.id("atask_id")?,
            },
            Method::Signal => Request::Signal(SignalRequest {
                atask_id: h.id("atask_id")?,
                status: h.status()?,
                progress: h.progress()?,
                agent_id: h.opt_id("agent_id")?,
                error: h.error()?,
                start: h.opt_bool("start")?,
            }),
            Method::Id => Request::Id {
                agent_id: h.opt_id("agent_id")?,
                controller: h.opt_addr("controller")?,
                port: h.opt_port()?,
                lease_ms: h.opt_u64("lease_ms")?,
                describe: h.opt_bool("describe")?,
            },
        })
    }

    /// The wire form: a JSON object with the method in upper case and version "1.0".
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Written straight to the wire (no intermediate JSON tree): the method in upper
/// case, version "1.0", then the method's headers.
impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("method", self.method().as_str())?;
        m.serialize_entry("version", VERSION)?;
        match self {
            Request::Atask {
                procedure,
                args,
                atask_id,
                reply_to,
                lease_epoch,
            } => {
                m.serialize_entry("remote_procedure", procedure)?;
                m.serialize_entry("remote_procedure_args", args)?;
                if let Some(id) = atask_id {
                    m.serialize_entry("atask_id", id)?;
                }
                if let Some(r) = reply_to {
                    m.serialize_entry("reply_to", r)?;
                }
                if let Some(e) = lease_epoch {
                    m.serialize_entry("lease_epoch", e)?;
                }
            }
            Request::Task {
                procedure,
                args,
                timeout_ms,
            } => {
                m.serialize_entry("remote_procedure", procedure)?;
                m.serialize_entry("remote_procedure_args", args)?;
                if let Some(t) = timeout_ms {
                    m.serialize_entry("timeout_ms", t)?;
                }
            }
            Request::Get { atask_id } => m.serialize_entry("atask_id", atask_id)?,
            Request::Signal(sig) => {
                m.serialize_entry("atask_id", &sig.atask_id)?;
                m.serialize_entry("atask_status", sig.status.as_str())?;
                if let Some(p) = &sig.progress {
                    m.serialize_entry("progress", p)?;
                }
                if let Some(a) = &sig.agent_id {
                    m.serialize_entry("agent_id", a)?;
                }
                if let Some(e) = &sig.error {
                    m.serialize_entry("error", e)?;
                }
                if sig.start {
                    m.serialize_entry("start", &true)?;
                }
            }
            Request::Id {
                agent_id,
                controller,
                port,
                lease_ms,
                describe,
            } => {
                if let Some(a) = agent_id {
                    m.serialize_entry("agent_id", a)?;
                }
                if let Some(c) = controller {
                    m.serialize_entry("controller", c)?;
                }
                if let Some(p) = port {
                    m.serialize_entry("port", p)?;
                }
                if let Some(l) = lease_ms {
                    m.serialize_entry("lease_ms", l)?;
                }
                if *describe {
                    m.serialize_entry("describe", &true)?;
                }
            }
        }
        m.end()
    }
}

fn parse_object(line: &[u8]) -> Result<Map<String, Value>, ProtocolError> {
    let text = std::str::from_utf8(line).map_err(|e| ProtocolError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ProtocolError::NotObject(json_type(&other))),
        Err(e) => Err(ProtocolError::NotJson(e.to_string())),
    }
}

/// The JSON type name of a value, for error texts.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Longest id or procedure name accepted, here and by the gateway's gRPC API: ids
/// become storage keys, and names are echoed in errors.
pub const MAX_NAME_LEN: usize = 256;

/// Typed access to a request's headers; every failure names the header.
struct Headers<'a>(&'a Map<String, Value>);

impl Headers<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn bad(header: &'static str, expected: &'static str, v: &Value) -> ProtocolError {
        let got = match v {
            Value::String(s) if s.len() > 64 => format!("a string of {} bytes", s.len()),
            Value::String(s) => format!("{s:?}"),
            other => json_type(other).to_string(),
        };
        ProtocolError::BadHeader {
            header,
            expected,
            got,
        }
    }

    fn name(&self, header: &'static str, v: &Value) -> Result<String, ProtocolError> {
        const EXPECTED: &str = "a non-empty string of at most 256 bytes";
        match v.as_str() {
            Some(s) if !s.is_empty() && s.len() <= MAX_NAME_LEN => Ok(s.to_string()),
            _ => Err(Self::bad(header, EXPECTED, v)),
        }
    }

    fn procedure(&self) -> Result<String, ProtocolError> {
        let v = self.get("remote_procedure").unwrap_or(&Value::Null);
        self.name("remote_procedure", v)
    }

    fn args(&self) -> Result<Args, ProtocolError> {
        match self.get("remote_procedure_args") {
            Some(Value::Array(a)) => Ok(Args::Positional(a.clone())),
            Some(Value::Object(m)) => Ok(Args::Named(m.clone())),
            Some(v) => Err(Self::bad(
                "remote_procedure_args",
                "an array (positional) or an object (named)",
                v,
            )),
            None => Ok(Args::default()),
        }
    }

    fn id(&self, header: &'static str) -> Result<String, ProtocolError> {
        let v = self.get(header).unwrap_or(&Value::Null);
        self.name(header, v)
    }

    fn opt_id(&self, header: &'static str) -> Result<Option<String>, ProtocolError> {
        self.get(header).map(|v| self.name(header, v)).transpose()
    }

    fn opt_addr(&self, header: &'static str) -> Result<Option<String>, ProtocolError> {
        const EXPECTED: &str = "a \"host:port\" string";
        let Some(v) = self.get(header) else {
            return Ok(None);
        };
        let ok = v.as_str().filter(|s| {
            s.len() <= MAX_NAME_LEN
                && s.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        });
        match ok {
            Some(s) => Ok(Some(s.to_string())),
            None => Err(Self::bad(header, EXPECTED, v)),
        }
    }

    fn opt_u64(&self, header: &'static str) -> Result<Option<u64>, ProtocolError> {
        match self.get(header) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(Self::bad(header, "a positive integer", v)),
            },
        }
    }

    fn opt_bool(&self, header: &'static str) -> Result<bool, ProtocolError> {
        match self.get(header) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Self::bad(header, "true or false", v)),
        }
    }

    fn opt_port(&self) -> Result<Option<u16>, ProtocolError> {
        match self.get("port") {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| u16::try_from(n).ok()) {
                Some(p) if p > 0 => Ok(Some(p)),
                _ => Err(Self::bad("port", "an integer from 1 to 65535", v)),
            },
        }
    }

    fn status(&self) -> Result<AtaskStatus, ProtocolError> {
        const EXPECTED: &str =
            "one of \"accepted\", \"interrupted\", \"done\", \"client_error\", \"terminate\"";
        let v = self.get("atask_status").unwrap_or(&Value::Null);
        v.as_str()
            .and_then(AtaskStatus::parse)
            .ok_or_else(|| Self::bad("atask_status", EXPECTED, v))
    }

    fn progress(&self) -> Result<Option<Progress>, ProtocolError> {
        const EXPECTED: &str =
            "an object {\"percent\": number from 0.0 to 1.0, \"comment\": string}";
        let Some(v) = self.get("progress") else {
            return Ok(None);
        };
        let p = v.as_object().and_then(|o| {
            let percent = o
                .get("percent")?
                .as_f64()
                .filter(|p| (0.0..=1.0).contains(p))?;
            let comment = match o.get("comment") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return None,
            };
            Some(Progress { percent, comment })
        });
        p.map(Some)
            .ok_or_else(|| Self::bad("progress", EXPECTED, v))
    }

    fn error(&self) -> Result<Option<TaskError>, ProtocolError> {
        const EXPECTED: &str = "an object {\"code\": ARPCP code, \"description\": string}";
        let Some(v) = self.get("error") else {
            return Ok(None);
        };
        serde_json::from_value::<TaskError>(v.clone())
            .map(Some)
            .map_err(|_| Self::bad("error", EXPECTED, v))
    }
}

/// An ARPCP response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub code: Code,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub data: Value,
}

impl Response {
    pub fn ok(data: Value) -> Response {
        Response {
            code: Code::Ok,
            description: "OK".into(),
            data,
        }
    }

    pub fn error(e: &ProtocolError) -> Response {
        Response {
            code: e.code(),
            description: e.to_string(),
            data: Value::Null,
        }
    }

    /// Parses a response line (the client side).
    pub fn parse(line: &[u8]) -> Result<Response, ProtocolError> {
        let obj = parse_object(line)?;
        serde_json::from_value(Value::Object(obj)).map_err(|e| ProtocolError::BadHeader {
            header: "code",
            expected: "an ARPCP status code",
            got: e.to_string(),
        })
    }

    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }
}

/// `data` of a GET response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetData {
    pub atask_id: String,
    pub atask_status: AtaskStatus,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// A lease granted in `data` of a controller's answer to an agent's SIGNAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub lease_ms: u64,
    pub lease_epoch: u64,
}

impl LeaseGrant {
    /// The grant in an answer's `data`, if it holds one.
    pub fn of(data: &Value) -> Option<LeaseGrant> {
        Some(LeaseGrant {
            lease_ms: data.get("lease_ms")?.as_u64()?,
            lease_epoch: data.get("lease_epoch")?.as_u64()?,
        })
    }
}

/// What kind of procedure an agent offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcedureKind {
    Builtin,
    Command,
    Opal,
}

/// One procedure in an agent's catalog (ID with `describe`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub name: String,
    pub kind: ProcedureKind,
    /// An Opal model's `--info` output, as it printed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
}

impl CatalogEntry {
    /// A short, stable digest of a catalog: an agent puts it in every ID answer, so
    /// the controller fetches the catalog itself only when it changed.
    pub fn digest(entries: &[CatalogEntry]) -> String {
        // FNV-1a over the canonical JSON: stable across processes and versions.
        let text = serde_json::to_string(entries).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// `data` of an ID response: who the agent is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdData {
    pub mac: String,
    pub ip: String,
    pub hostname: String,
    pub port: u16,
    pub version: String,
    pub procedures: Vec<String>,
    pub capacity: u32,
    pub running: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The digest of the agent's catalog (`CatalogEntry::digest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_digest: Option<String>,
    /// The catalog itself, when the ID asked for it (`describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<Vec<CatalogEntry>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Request, ProtocolError> {
        Request::parse(v.to_string().as_bytes())
    }

    fn code_of(line: &[u8]) -> u16 {
        match Request::parse(line) {
            Ok(_) => 100,
            Err(e) => e.code().as_u16(),
        }
    }

    #[test]
    fn parses_every_method_and_round_trips() {
        let reqs = [
            Request::Atask {
                procedure: "add".into(),
                args: Args::Positional(vec![json!(1), json!(2)]),
                atask_id: Some("t1".into()),
                reply_to: Some("127.0.0.1:7019".into()),
                lease_epoch: Some(42),
            },
            Request::Task {
                procedure: "model".into(),
                args: Args::Named(json!({"size": 3}).as_object().unwrap().clone()),
                timeout_ms: Some(500),
            },
            Request::Get {
                atask_id: "t1".into(),
            },
            Request::Signal(SignalRequest {
                atask_id: "t1".into(),
                status: AtaskStatus::Done,
                progress: Some(Progress {
                    percent: 0.5,
                    comment: "half".into(),
                }),
                agent_id: Some("a1".into()),
                error: Some(TaskError {
                    code: Code::Execution,
                    description: "boom".into(),
                }),
                start: true,
            }),
            Request::Id {
                agent_id: Some("a1".into()),
                controller: Some("gw:7019".into()),
                port: Some(7018),
                lease_ms: Some(2000),
                describe: true,
            },
        ];
        for r in reqs {
            let line = r.to_json().to_string();
            assert_eq!(Request::parse(line.as_bytes()).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn method_is_case_insensitive_and_both_versions_accepted() {
        let r = parse(json!({"method": "id", "version": "ARPCP/1.0"})).unwrap();
        assert_eq!(r.method(), Method::Id);
        let r = parse(json!({"method": "Get", "version": "1.0", "atask_id": "x"})).unwrap();
        assert_eq!(r.method(), Method::Get);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r = parse(json!({"method": "ID", "version": "1.0", "future": [1, 2]}));
        assert!(r.is_ok());
    }

    /// A header of the wrong JSON type is named with what it should be.
    #[test]
    fn a_version_or_method_not_a_string_is_named_so() {
        let e = parse(json!({"method": "ID", "version": 1.0})).unwrap_err();
        assert_eq!(e.code(), Code::VersionMismatch);
        assert_eq!(
            e.to_string(),
            "header `version` must be a string (as \"1.0\"), got a number"
        );
        let e = parse(json!({"method": ["ID"], "version": "1.0"})).unwrap_err();
        assert_eq!(e.code(), Code::UnknownMethod);
        assert!(e.to_string().contains("`method` must be a string"), "{e}");
    }

    /// Malformed input, each with the code the check order gives it.
    #[test]
    fn malformed_input_table() {
        let cases: &[(&[u8], u16)] = &[
            (b"", 200),
            (b"not json", 200),
            (b"\xff\xfe{}", 200),
            (b"[1,2]", 200),
            (b"\"ID\"", 200),
            (b"{", 200),
            (b"{}", 202),
            (br#"{"method":"ID"}"#, 202),
            (br#"{"version":"1.0"}"#, 202),
            (br#"{"method":"NOPE","version":"2.0"}"#, 206),
            (br#"{"method":"ID","version":1.0}"#, 206),
            (br#"{"method":"NOPE","version":"1.0"}"#, 201),
            (br#"{"method":42,"version":"1.0"}"#, 201),
            (br#"{"method":"GET","version":"1.0"}"#, 202),
            (br#"{"method":"GET","version":"1.0","atask_id":null}"#, 202),
            (br#"{"method":"GET","version":"1.0","atask_id":7}"#, 200),
            (br#"{"method":"GET","version":"1.0","atask_id":""}"#, 200),
            (br#"{"method":"ATASK","version":"1.0","remote_procedure":"add"}"#, 202),
            (br#"{"method":"ATASK","version":"1.0","remote_procedure_args":[]}"#, 202),
            (br#"{"method":"ATASK","version":"1.0","remote_procedure":"add","remote_procedure_args":"1 2"}"#, 200),
            (br#"{"method":"ATASK","version":"1.0","remote_procedure":[],"remote_procedure_args":[]}"#, 200),
            (br#"{"method":"ATASK","version":"1.0","remote_procedure":"a","remote_procedure_args":[],"reply_to":"nohost"}"#, 200),
            (br#"{"method":"TASK","version":"1.0","remote_procedure":"a","remote_procedure_args":[],"timeout_ms":-1}"#, 200),
            (br#"{"method":"SIGNAL","version":"1.0","atask_id":"x"}"#, 202),
            (br#"{"method":"SIGNAL","version":"1.0","atask_id":"x","atask_status":"finished"}"#, 200),
            (br#"{"method":"SIGNAL","version":"1.0","atask_id":"x","atask_status":"done","progress":{"percent":2}}"#, 200),
            (br#"{"method":"SIGNAL","version":"1.0","atask_id":"x","atask_status":"done","error":"bad"}"#, 200),
            (br#"{"method":"ID","version":"1.0","port":70000}"#, 200),
            (br#"{"method":"ID","version":"1.0","lease_ms":-5}"#, 200),
            (br#"{"method":"SIGNAL","version":"1.0","atask_id":"x","atask_status":"accepted","start":"yes"}"#, 200),
            (br#"{"method":"ID","version":"1.0","port":7018}"#, 100),
        ];
        for (line, code) in cases {
            assert_eq!(code_of(line), *code, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn descriptions_name_what_was_wrong() {
        let e = parse(json!({"method": "GET", "version": "1.0"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing required header `atask_id` for method GET"
        );
        let e = parse(
            json!({"method": "SIGNAL", "version": "1.0", "atask_id": "x", "atask_status": "ok"}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("`atask_status`"), "{e}");
        assert!(e.to_string().contains("\"ok\""), "{e}");
        let e = Request::parse(b"\xff").unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and byte flip of valid requests.
        let seeds = [
            json!({"method":"ATASK","version":"1.0","remote_procedure":"add","remote_procedure_args":[1,2],"atask_id":"x"}),
            json!({"method":"SIGNAL","version":"1.0","atask_id":"x","atask_status":"done","progress":{"percent":0.5,"comment":"c"}}),
        ];
        for s in seeds {
            let line = s.to_string().into_bytes();
            for i in 0..line.len() {
                let _ = Request::parse(&line[..i]);
                for b in [0u8, b'"', b'{', b'}', 0xff, b'\\'] {
                    let mut m = line.clone();
                    m[i] = b;
                    let _ = Request::parse(&m);
                }
            }
        }
    }

    #[test]
    fn response_parses_string_codes() {
        let r = Response::parse(br#"{"code":"205","description":"x","data":null}"#).unwrap();
        assert_eq!(r.code, Code::UnknownTask);
        assert!(Response::parse(br#"{"code":999}"#).is_err());
    }
}
