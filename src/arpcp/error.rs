//! ARPCP status codes (§5 of the protocol) and the one error type of the wire layer.
//! Each error knows its code and says precisely what was wrong, so a person reading
//! a log can fix the call.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// An ARPCP status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// 100: success (for ATASK: the task was created).
    Ok,
    /// 200: malformed request.
    Malformed,
    /// 201: unknown method.
    UnknownMethod,
    /// 202: a required header is missing.
    MissingHeader,
    /// 203: the remote procedure does not exist on this agent.
    UnknownProcedure,
    /// 204: wrong arguments for the remote procedure.
    BadArguments,
    /// 205: unknown task id.
    UnknownTask,
    /// 206: different protocol version.
    VersionMismatch,
    /// 300: internal server error.
    Internal,
    /// 400: error while executing the remote procedure.
    Execution,
}

impl Code {
    pub const ALL: [Code; 10] = [
        Code::Ok,
        Code::Malformed,
        Code::UnknownMethod,
        Code::MissingHeader,
        Code::UnknownProcedure,
        Code::BadArguments,
        Code::UnknownTask,
        Code::VersionMismatch,
        Code::Internal,
        Code::Execution,
    ];

    pub fn as_u16(self) -> u16 {
        match self {
            Code::Ok => 100,
            Code::Malformed => 200,
            Code::UnknownMethod => 201,
            Code::MissingHeader => 202,
            Code::UnknownProcedure => 203,
            Code::BadArguments => 204,
            Code::UnknownTask => 205,
            Code::VersionMismatch => 206,
            Code::Internal => 300,
            Code::Execution => 400,
        }
    }

    pub fn from_u16(n: u16) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_u16() == n)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for Code {
    /// Accepts an integer or a string of digits (the prototype sent strings).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let n = match &v {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        n.and_then(|n| u16::try_from(n).ok())
            .and_then(Code::from_u16)
            .ok_or_else(|| D::Error::custom(format!("unknown ARPCP status code {v}")))
    }
}

/// Everything that can go wrong with an ARPCP exchange, each with its status code.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum ProtocolError {
    #[error("line is longer than the limit of {limit} bytes; closing the connection")]
    LineTooLong { limit: usize },
    #[error(
        "unfinished lines buffered over all connections would exceed {name} = {limit} bytes; \
         this connection holds {held} bytes without a line end; closing the connection"
    )]
    InputBudget {
        name: &'static str,
        limit: usize,
        held: usize,
    },
    #[error(
        "too many connections: {name} = {limit} reached (counting this one from {peer}) \
         and no idle connection could make room; closing this one"
    )]
    ConnectionLimit {
        name: &'static str,
        limit: usize,
        peer: std::net::IpAddr,
    },
    #[error("{what}: {limit} {work} already under way ({name}); {retry}")]
    Busy {
        what: &'static str,
        work: &'static str,
        name: &'static str,
        limit: usize,
        retry: &'static str,
    },
    #[error("request is not valid UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("request is not valid JSON: {0}")]
    NotJson(String),
    #[error("request must be a JSON object, got {0}")]
    NotObject(&'static str),
    #[error("missing required header `{header}`{}", for_method.map(|m| format!(" for method {m}")).unwrap_or_default())]
    MissingHeader {
        header: &'static str,
        for_method: Option<&'static str>,
    },
    #[error(
        "unsupported ARPCP version {0:?}; this peer speaks \"1.0\" (also accepted: \"ARPCP/1.0\")"
    )]
    Version(String),
    #[error("header `{header}` must be a string (as {example}), got {got}")]
    HeaderNotString {
        header: &'static str,
        example: &'static str,
        got: &'static str,
    },
    #[error("unknown method {0:?}; expected one of ATASK, TASK, GET, SIGNAL, ID")]
    UnknownMethod(String),
    #[error("method {method} is not served here; this peer serves {served}")]
    MethodNotServed {
        method: &'static str,
        served: &'static str,
    },
    #[error("method {method} is served only to a peer whose certificate has role {needed}; {name:?} has role {role}")]
    RoleRequired {
        method: &'static str,
        needed: crate::tls::Role,
        role: crate::tls::Role,
        name: String,
    },
    #[error("SIGNAL for task {atask_id} refused: that attempt is not placed on the agent of certificate {name:?} ({placed})")]
    NotYourTask {
        atask_id: String,
        name: String,
        /// Where the attempt is placed, as far as the sender may know.
        placed: &'static str,
    },
    #[error("header `{header}` must be {expected}, got {got}")]
    BadHeader {
        header: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("remote procedure {0:?} does not exist on this agent")]
    UnknownProcedure(String),
    #[error("wrong arguments for {procedure:?}: {reason}")]
    BadArguments { procedure: String, reason: String },
    #[error("unknown atask_id {0:?}")]
    UnknownTask(String),
    #[error("atask_id {0:?} already used for another call (different procedure or arguments)")]
    TaskIdReused(String),
    #[error("attempt {atask_id:?} was withdrawn ({why}); do not start it")]
    AttemptWithdrawn { atask_id: String, why: String },
    #[error("{0}")]
    Execution(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProtocolError {
    /// The one place errors map to ARPCP codes.
    pub fn code(&self) -> Code {
        use ProtocolError::*;
        match self {
            LineTooLong { .. }
            | InputBudget { .. }
            | NotUtf8 { .. }
            | NotJson(_)
            | NotObject(_)
            | BadHeader { .. } => Code::Malformed,
            UnknownMethod(_)
            | MethodNotServed { .. }
            | RoleRequired { .. }
            | NotYourTask { .. } => Code::UnknownMethod,
            MissingHeader { .. } => Code::MissingHeader,
            UnknownProcedure(_) => Code::UnknownProcedure,
            BadArguments { .. } => Code::BadArguments,
            UnknownTask(_) | TaskIdReused(_) | AttemptWithdrawn { .. } => Code::UnknownTask,
            Version(_) => Code::VersionMismatch,
            HeaderNotString { header, .. } if *header == "version" => Code::VersionMismatch,
            HeaderNotString { .. } => Code::UnknownMethod,
            ConnectionLimit { .. } | Busy { .. } | Internal(_) => Code::Internal,
            Execution(_) => Code::Execution,
        }
    }

    pub fn bad_args(procedure: &str, reason: impl Into<String>) -> Self {
        ProtocolError::BadArguments {
            procedure: procedure.to_string(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_as_integers_and_digit_strings() {
        for c in Code::ALL {
            let n = serde_json::to_value(c).unwrap();
            assert_eq!(n, serde_json::json!(c.as_u16()));
            let back: Code = serde_json::from_value(n).unwrap();
            assert_eq!(back, c);
            let s: Code =
                serde_json::from_value(serde_json::json!(c.as_u16().to_string())).unwrap();
            assert_eq!(s, c);
        }
        assert!(serde_json::from_value::<Code>(serde_json::json!(101)).is_err());
        assert!(serde_json::from_value::<Code>(serde_json::json!("x")).is_err());
    }

    #[test]
    fn every_error_has_its_code() {
        let cases = [
            (ProtocolError::LineTooLong { limit: 1 }, 200),
            (
                ProtocolError::InputBudget {
                    name: "MAX_BUFFERED_INPUT",
                    limit: 1,
                    held: 2,
                },
                200,
            ),
            (
                ProtocolError::ConnectionLimit {
                    name: "MAX_CONNECTIONS_PER_PEER",
                    limit: 1,
                    peer: [127, 0, 0, 1].into(),
                },
                300,
            ),
            (ProtocolError::NotJson("x".into()), 200),
            (ProtocolError::UnknownMethod("X".into()), 201),
            (
                ProtocolError::MissingHeader {
                    header: "atask_id",
                    for_method: Some("GET"),
                },
                202,
            ),
            (ProtocolError::UnknownProcedure("p".into()), 203),
            (ProtocolError::bad_args("add", "x"), 204),
            (ProtocolError::UnknownTask("t".into()), 205),
            (ProtocolError::TaskIdReused("t".into()), 205),
            (
                ProtocolError::AttemptWithdrawn {
                    atask_id: "t.1".into(),
                    why: "placed again".into(),
                },
                205,
            ),
            (ProtocolError::Version("2.0".into()), 206),
            (ProtocolError::Internal("x".into()), 300),
            (ProtocolError::Execution("x".into()), 400),
        ];
        for (e, code) in cases {
            assert_eq!(e.code().as_u16(), code, "{e}");
        }
    }
}
