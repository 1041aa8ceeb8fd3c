//! Who may call which gRPC method. With `--tls-dir` every call of `arpcp.v1.Gateway`
//! is authorised here, once, at the top of the method: the caller is its client
//! certificate's role and name, or its bearer token's. Without TLS there is nothing
//! to authenticate (a token sent in plain text would be given away) and every caller
//! is an operator, as the API always was. Health and reflection are other services
//! and stay open: they tell nothing about tasks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tonic::{Code, Request, Status};

use super::tokens::{TokenStore, MAX_TOKEN_CHARS};
use crate::arpcp::tls::Standing;
use crate::tls::{PeerIdentity, Role};

/// The metadata key of a bearer token (`authorization: Bearer TOKEN`), as every gRPC
/// client library sends it.
pub use crate::pb::api::AUTHORIZATION;

/// The methods of `arpcp.v1.Gateway`, for the rules below and the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcMethod {
    Submit,
    GetResult,
    WatchTask,
    CancelTask,
    ListTasks,
    ListAgents,
    ListProcedures,
    DescribeProcedure,
    BlacklistAgent,
    UnblacklistAgent,
}

impl GrpcMethod {
    pub const ALL: [GrpcMethod; 10] = [
        GrpcMethod::Submit,
        GrpcMethod::GetResult,
        GrpcMethod::WatchTask,
        GrpcMethod::CancelTask,
        GrpcMethod::ListTasks,
        GrpcMethod::ListAgents,
        GrpcMethod::ListProcedures,
        GrpcMethod::DescribeProcedure,
        GrpcMethod::BlacklistAgent,
        GrpcMethod::UnblacklistAgent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GrpcMethod::Submit => "Submit",
            GrpcMethod::GetResult => "GetResult",
            GrpcMethod::WatchTask => "WatchTask",
            GrpcMethod::CancelTask => "CancelTask",
            GrpcMethod::ListTasks => "ListTasks",
            GrpcMethod::ListAgents => "ListAgents",
            GrpcMethod::ListProcedures => "ListProcedures",
            GrpcMethod::DescribeProcedure => "DescribeProcedure",
            GrpcMethod::BlacklistAgent => "BlacklistAgent",
            GrpcMethod::UnblacklistAgent => "UnblacklistAgent",
        }
    }
}

/// The least role that may call `method`. CancelTask of another's task needs
/// `operator` on top (see [`may_cancel`]).
pub fn role_needed(method: GrpcMethod) -> Role {
    match method {
        GrpcMethod::GetResult
        | GrpcMethod::WatchTask
        | GrpcMethod::ListTasks
        | GrpcMethod::ListAgents
        | GrpcMethod::ListProcedures
        | GrpcMethod::DescribeProcedure => Role::Reader,
        GrpcMethod::Submit | GrpcMethod::CancelTask => Role::Submitter,
        GrpcMethod::BlacklistAgent | GrpcMethod::UnblacklistAgent => Role::Operator,
    }
}

/// Client roles in order of what they may do; daemons' roles are none of them.
fn rank(role: Role) -> Option<u8> {
    match role {
        Role::Reader => Some(1),
        Role::Submitter => Some(2),
        Role::Operator => Some(3),
        Role::Agent | Role::Gateway => None,
    }
}

/// Whether `role` includes everything `needed` may do.
pub fn covers(role: Role, needed: Role) -> bool {
    matches!((rank(role), rank(needed)), (Some(have), Some(need)) if have >= need)
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// No TLS on the gRPC API: nobody is authenticated, everyone may do everything.
    Open,
    Certificate,
    Token,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub name: String,
    pub via: Via,
}

impl Caller {
    /// Every caller of a gateway without TLS.
    pub fn open() -> Caller {
        Caller {
            role: Role::Operator,
            name: String::new(),
            via: Via::Open,
        }
    }

    /// What a task this caller submits records as its owner: `cert:NAME` or
    /// `token:NAME` (a certificate and a token of one name are different callers);
    /// empty when nobody is authenticated.
    pub fn owner(&self) -> String {
        match self.via {
            Via::Open => String::new(),
            Via::Certificate => format!("cert:{}", self.name),
            Via::Token => format!("token:{}", self.name),
        }
    }

    fn describe(&self) -> String {
        match self.via {
            Via::Open => format!("{}", self.role),
            Via::Certificate => format!("{} {:?} (client certificate)", self.role, self.name),
            Via::Token => format!("{} {:?} (token)", self.role, self.name),
        }
    }
}

/// What the TLS listener learnt of a connection, handed to every call on it.
#[derive(Debug, Clone)]
pub struct GrpcPeer {
    pub addr: SocketAddr,
    pub certificate: PeerCertificate,
}

/// The client certificate of a TLS connection (optional: tokens are the other way in).
#[derive(Debug, Clone)]
pub enum PeerCertificate {
    None,
    /// With what re-checks it when the revocation list changes: a connection
    /// outlives a revocation, so each call asks again.
    Verified(PeerIdentity, Arc<Mutex<Standing>>),
    /// Chains to the CA but does not say who its holder is (no CN, no role OU…).
    Unusable(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("this gateway requires a client certificate or a bearer token; present a client certificate of the cluster CA (role reader, submitter or operator) or send metadata `authorization: Bearer TOKEN` (`arpcp token create`)")]
    NoCredential,
    #[error("the authorization metadata must be `Bearer TOKEN`: {0}")]
    BadHeader(String),
    #[error(
        "the bearer token is not valid: unknown or revoked (see `arpcp token list` on the gateway)"
    )]
    UnknownToken,
    #[error("bearer tokens cannot be checked now: {0}")]
    TokenFile(String),
    #[error("the client certificate cannot be used: {0}; use a certificate from `arpcp ca issue client NAME --role ROLE` or a bearer token")]
    UnusableCertificate(String),
    #[error("the client certificate of {name:?} is no longer valid ({why}); reconnect with a valid certificate or a bearer token")]
    CertificateNoLongerValid { name: String, why: String },
    #[error("{method} needs role {needed}; the caller is {caller}")]
    RoleRequired {
        method: &'static str,
        needed: Role,
        caller: String,
    },
    #[error("the certificate of {name:?} has role {role}, which is no client role; {method} needs role {needed} (a reader, submitter or operator certificate, or a bearer token)")]
    NotAClient {
        method: &'static str,
        needed: Role,
        role: Role,
        name: String,
    },
    #[error("CancelTask of task {task_id} submitted by {owner} needs role operator; the caller is {caller}, and a submitter may cancel only its own tasks")]
    NotOwner {
        task_id: String,
        owner: String,
        caller: String,
    },
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        let code = match &e {
            AuthError::NoCredential
            | AuthError::BadHeader(_)
            | AuthError::UnknownToken
            | AuthError::UnusableCertificate(_)
            | AuthError::CertificateNoLongerValid { .. } => Code::Unauthenticated,
            AuthError::TokenFile(_) => Code::Unavailable,
            AuthError::RoleRequired { .. }
            | AuthError::NotAClient { .. }
            | AuthError::NotOwner { .. } => Code::PermissionDenied,
        };
        Status::new(code, e.to_string())
    }
}

/// Refuses `caller` unless its role covers `method`'s.
pub fn check_role(caller: &Caller, method: GrpcMethod) -> Result<(), AuthError> {
    let needed = role_needed(method);
    if covers(caller.role, needed) {
        return Ok(());
    }
    if rank(caller.role).is_none() {
        return Err(AuthError::NotAClient {
            method: method.name(),
            needed,
            role: caller.role,
            name: caller.name.clone(),
        });
    }
    Err(AuthError::RoleRequired {
        method: method.name(),
        needed,
        caller: caller.describe(),
    })
}

/// A submitter cancels only its own tasks; an operator any.
pub fn may_cancel(caller: &Caller, task_id: &str, owner: &str) -> Result<(), AuthError> {
    if covers(caller.role, Role::Operator) || (!owner.is_empty() && owner == caller.owner()) {
        return Ok(());
    }
    Err(AuthError::NotOwner {
        task_id: task_id.to_string(),
        owner: if owner.is_empty() {
            "an unauthenticated client".to_string()
        } else {
            owner.to_string()
        },
        caller: caller.describe(),
    })
}

/// The token of an `authorization` value, if it is `Bearer TOKEN`.
fn bearer(
    value: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> Result<&str, AuthError> {
    let text = value
        .to_str()
        .map_err(|_| AuthError::BadHeader("the value is not visible ASCII".into()))?;
    let (scheme, token) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| AuthError::BadHeader("no `Bearer ` before the token".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::BadHeader(format!(
            "scheme {scheme:?}, `Bearer` expected"
        )));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::BadHeader("the token is empty".into()));
    }
    if token.len() > MAX_TOKEN_CHARS {
        return Err(AuthError::BadHeader(format!(
            "the token is {} characters, at most {MAX_TOKEN_CHARS}",
            token.len()
        )));
    }
    Ok(token)
}

/// Authentication of a gateway whose gRPC API is served over TLS.
pub struct Auth {
    tokens: TokenStore,
}

impl Auth {
    pub fn new(data_dir: &Path) -> Auth {
        Auth {
            tokens: TokenStore::new(data_dir),
        }
    }

    /// Who sent `req`. A bearer token, when sent, decides (so a holder of an agent's
    /// certificate can still call with a token); otherwise the client certificate.
    pub fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, AuthError> {
        if let Some(value) = req.metadata().get(AUTHORIZATION) {
            let token = bearer(value)?;
            let holder = self
                .tokens
                .lookup(token)
                .map_err(AuthError::TokenFile)?
                .ok_or(AuthError::UnknownToken)?;
            return Ok(Caller {
                role: holder.role,
                name: holder.name,
                via: Via::Token,
            });
        }
        match req.extensions().get::<GrpcPeer>().map(|p| &p.certificate) {
            Some(PeerCertificate::Verified(who, standing)) => {
                standing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recheck()
                    .map_err(|why| AuthError::CertificateNoLongerValid {
                        name: who.name.clone(),
                        why,
                    })?;
                Ok(Caller {
                    role: who.role,
                    name: who.name.clone(),
                    via: Via::Certificate,
                })
            }
            Some(PeerCertificate::Unusable(why)) => {
                Err(AuthError::UnusableCertificate(why.clone()))
            }
            Some(PeerCertificate::None) | None => Err(AuthError::NoCredential),
        }
    }

    /// The caller of `req`, if it may call `method`.
    pub fn authorize<T>(&self, req: &Request<T>, method: GrpcMethod) -> Result<Caller, AuthError> {
        let caller = self.authenticate(req)?;
        check_role(&caller, method)?;
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role, via: Via) -> Caller {
        Caller {
            role,
            name: "x".into(),
            via,
        }
    }

    #[test]
    fn each_method_needs_the_documented_role() {
        use GrpcMethod::*;
        let table = [
            (Submit, Role::Submitter),
            (GetResult, Role::Reader),
            (WatchTask, Role::Reader),
            (CancelTask, Role::Submitter),
            (ListTasks, Role::Reader),
            (ListAgents, Role::Reader),
            (ListProcedures, Role::Reader),
            (DescribeProcedure, Role::Reader),
            (BlacklistAgent, Role::Operator),
            (UnblacklistAgent, Role::Operator),
        ];
        assert_eq!(table.len(), GrpcMethod::ALL.len());
        for (m, r) in table {
            assert_eq!(role_needed(m), r, "{}", m.name());
        }
    }

    #[test]
    fn roles_include_the_weaker_ones_and_daemons_have_none() {
        for m in GrpcMethod::ALL {
            let allowed = |r| check_role(&caller(r, Via::Certificate), m).is_ok();
            assert!(allowed(Role::Operator), "{}", m.name());
            assert_eq!(allowed(Role::Submitter), role_needed(m) != Role::Operator);
            assert_eq!(allowed(Role::Reader), role_needed(m) == Role::Reader);
            assert!(!allowed(Role::Agent));
            assert!(!allowed(Role::Gateway));
        }
        assert!(check_role(&Caller::open(), GrpcMethod::BlacklistAgent).is_ok());
    }

    #[test]
    fn refusals_name_the_method_the_role_needed_and_the_caller() {
        let e = check_role(&caller(Role::Reader, Via::Token), GrpcMethod::Submit).unwrap_err();
        let s = Status::from(e);
        assert_eq!(s.code(), Code::PermissionDenied);
        for needle in ["Submit", "role submitter", "reader \"x\" (token)"] {
            assert!(s.message().contains(needle), "{needle}: {}", s.message());
        }
        let e = check_role(
            &caller(Role::Agent, Via::Certificate),
            GrpcMethod::ListAgents,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no client role"), "{e}");
    }

    #[test]
    fn a_submitter_cancels_only_its_own_tasks() {
        let ci = caller(Role::Submitter, Via::Token);
        assert!(may_cancel(&ci, "t", "token:x").is_ok());
        // The same name through a certificate is another caller.
        assert!(may_cancel(&ci, "t", "cert:x").is_err());
        assert!(may_cancel(&ci, "t", "").is_err());
        let op = caller(Role::Operator, Via::Certificate);
        assert!(may_cancel(&op, "t", "token:someone").is_ok());
        let e = Status::from(may_cancel(&ci, "t", "token:other").unwrap_err());
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("token:other"), "{}", e.message());
    }

    #[test]
    fn only_bearer_tokens_are_read() {
        let parse = |v: &str| bearer(&v.parse().unwrap()).map(str::to_string);
        assert_eq!(parse("Bearer abc"), Ok("abc".into()));
        assert_eq!(parse("bearer  abc "), Ok("abc".into()));
        assert!(parse("Basic abc")
            .unwrap_err()
            .to_string()
            .contains("Basic"));
        assert!(parse("abc").is_err());
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_CHARS + 1));
        assert!(parse(&long).unwrap_err().to_string().contains("at most"));
    }
}
