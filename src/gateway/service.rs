//! The gRPC service (`arpcp.v1.Gateway`): checks each request's fields, then hands
//! it to the scheduler, the store or membership. Errors become gRPC statuses in
//! `error.rs` only.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::auth::{Auth, Caller, GrpcMethod};
use super::convert::{
    agent_to_pb, call_args, kind_to_pb, schema_to_pb, status_from_pb, task_to_pb,
};
use super::membership::Membership;
use super::model::TaskRecord;
use super::scheduler::{Scheduler, DEFAULT_SYNC_TIMEOUT};
use super::store::{GatewayStore, TaskFilter};
use super::watch::TaskWatchers;
use super::GatewayError;
use crate::arpcp::{Args, MAX_NAME_LEN};
use crate::pb;

/// Longest GetResult wait.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Longest synchronous call.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
/// Encoded `Task`s in one ListTasks page: a page ends early (with a page token)
/// rather than pass it. A page always holds one task, and a task is at most
/// `MAX_TASK_BYTES`, so every page fits what a default client reads.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

pub struct GatewayService {
    pub store: GatewayStore,
    pub scheduler: Arc<Scheduler>,
    pub membership: Arc<Membership>,
    pub watchers: Arc<TaskWatchers>,
    /// Set when the API is served over TLS: callers must authenticate.
    pub auth: Option<Arc<Auth>>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn duration(
    field: &'static str,
    d: Option<&prost_types::Duration>,
    max: Duration,
) -> Result<Option<Duration>, GatewayError> {
    let Some(d) = d else { return Ok(None) };
    let d = Duration::try_from(*d)
        .map_err(|_| invalid(field, format!("must be a non-negative duration, got {d}")))?;
    if d > max {
        return Err(invalid(field, format!("at most {max:?}, got {d:?}")));
    }
    Ok(Some(d))
}

fn required_id(field: &'static str, id: &str) -> Result<(), GatewayError> {
    if id.trim().is_empty() {
        return Err(invalid(field, "required"));
    }
    bounded_name(field, id)
}

/// A name or id within `MAX_NAME_LEN`, checked before it is looked up (and
/// echoed in an error: a long one made the error itself too long for HTTP/2).
fn bounded_name(field: &'static str, name: &str) -> Result<(), GatewayError> {
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("at most {MAX_NAME_LEN} bytes, got {}", name.len()),
        ));
    }
    Ok(())
}

impl GatewayService {
    /// The one place a call is authorised: who sent `req`, if it may call `method`.
    /// Without TLS every caller may do everything.
    fn authorize<T>(&self, req: &Request<T>, method: GrpcMethod) -> Result<Caller, Status> {
        match &self.auth {
            Some(auth) => Ok(auth.authorize(req, method)?),
            None => Ok(Caller::open()),
        }
    }

    fn task(&self, id: &str) -> Result<TaskRecord, GatewayError> {
        required_id("task_id", id)?;
        self.store
            .get_task(id)?
            .ok_or_else(|| GatewayError::TaskNotFound(id.to_string()))
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let started = std::time::Instant::now();
        let caller = self.authorize(&req, GrpcMethod::Submit)?;
        let r = req.into_inner();
        let procedure = r.procedure.trim().to_string();
        if procedure.is_empty() {
            return Err(invalid("procedure", "must name a procedure (see ListProcedures)").into());
        }
        bounded_name("procedure", &procedure)?;
        bounded_name("agent_id", &r.agent_id)?;
        let mut args = call_args(&r.args, r.kwargs.as_ref())?;
        // An Opal model's call is checked against its schema before anything is
        // stored, and stored with the defaults filled in.
        let opal = match self.membership.kind_of(&procedure).and_then(|(_, s)| s) {
            Some(schema) => {
                // No arguments at all: every parameter takes its default.
                if matches!(&args, Args::Positional(a) if a.is_empty()) {
                    args = Args::Named(Default::default());
                }
                let Args::Named(named) = &args else {
                    return Err(invalid(
                        "kwargs",
                        "an Opal model takes named arguments, {\"main\": {...}, \"algo\": {\"<algorithm>\": {...}}} (see DescribeProcedure)",
                    )
                    .into());
                };
                let validated = schema
                    .validate(named)
                    .map_err(|e| GatewayError::InvalidCall(e.to_string()))?;
                args = Args::Named(validated);
                true
            }
            None => false,
        };
        let timeout = duration("timeout", r.timeout.as_ref(), MAX_SYNC_TIMEOUT)?;
        if timeout.is_some() && !r.sync {
            return Err(invalid("timeout", "applies to synchronous calls only (set sync)").into());
        }
        let requested = Some(r.agent_id.trim().to_string()).filter(|a| !a.is_empty());
        let mut task =
            TaskRecord::new(uuid::Uuid::now_v7().to_string(), procedure, args, requested);
        task.opal = opal;
        task.owner = caller.owner();
        let task = if r.sync {
            self.scheduler
                .submit_sync(task, timeout.unwrap_or(DEFAULT_SYNC_TIMEOUT))
                .await?
        } else {
            self.scheduler.submit(task).await?
        };
        crate::metrics::get().submit_answered(r.sync, started.elapsed().as_secs_f64());
        Ok(Response::new(pb::SubmitResponse {
            task_id: task.task_id.clone(),
            task: Some(task_to_pb(&task)),
        }))
    }

    async fn get_result(
        &self,
        req: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.authorize(&req, GrpcMethod::GetResult)?;
        let r = req.into_inner();
        let wait = duration("wait", r.wait.as_ref(), MAX_WAIT)?;
        let Some(wait) = wait.filter(|w| !w.is_zero()) else {
            return Ok(Response::new(task_to_pb(&self.task(&r.task_id)?)));
        };
        required_id("task_id", &r.task_id)?;
        let store = self.store.clone();
        let id = r.task_id.clone();
        let mut rx = self
            .watchers
            .subscribe(|| store.get_task(&id).ok().flatten())
            .ok_or_else(|| GatewayError::TaskNotFound(r.task_id.clone()))?;
        let ended = async {
            loop {
                if rx.borrow_and_update().status.is_final() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(wait, ended).await;
        let latest = rx.borrow().as_ref().clone();
        Ok(Response::new(task_to_pb(&latest)))
    }

    type WatchTaskStream = TaskStream;

    async fn watch_task(
        &self,
        req: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        self.authorize(&req, GrpcMethod::WatchTask)?;
        let id = req.into_inner().task_id;
        self.task(&id)?;
        let store = self.store.clone();
        let rx = self
            .watchers
            .subscribe(|| store.get_task(&id).ok().flatten())
            .ok_or_else(|| GatewayError::TaskNotFound(id.clone()))?;
        // Yields the task now and at each change, ending after it ends.
        let stream = futures::stream::unfold(Some((rx, true)), |state| async move {
            let (mut rx, first) = state?;
            if !first && rx.changed().await.is_err() {
                let stopping = Status::unavailable("the gateway is shutting down; watch again");
                return Some((Err(stopping), None));
            }
            let task = rx.borrow_and_update().as_ref().clone();
            let next = (!task.status.is_final()).then_some((rx, false));
            Some((Ok(task_to_pb(&task)), next))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_task(
        &self,
        req: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = self.authorize(&req, GrpcMethod::CancelTask)?;
        let id = req.into_inner().task_id;
        let owner = self.task(&id)?.owner;
        super::auth::may_cancel(&caller, &id, &owner)?;
        let task = self.scheduler.cancel(&id).await?;
        Ok(Response::new(task_to_pb(&task)))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.authorize(&req, GrpcMethod::ListTasks)?;
        let r = req.into_inner();
        let limit = match r.page_size {
            n if n < 0 => {
                return Err(invalid("page_size", format!("must not be negative, got {n}")).into())
            }
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let after = Some(r.page_token.as_str()).filter(|t| !t.is_empty());
        if let Some(t) = after {
            if uuid::Uuid::parse_str(t).is_err() {
                return Err(invalid(
                    "page_token",
                    "not a token from a previous ListTasks response",
                )
                .into());
            }
        }
        bounded_name("agent_id", &r.agent_id)?;
        bounded_name("procedure", &r.procedure)?;
        // Trimmed as Submit trims what it stores.
        let filter = TaskFilter {
            status: status_from_pb(r.status)?,
            agent_id: Some(r.agent_id.trim().to_string()).filter(|a| !a.is_empty()),
            procedure: Some(r.procedure.trim().to_string()).filter(|p| !p.is_empty()),
        };
        // Each task's share of the page: its field's tag and length, and the task.
        let measure = |t: &TaskRecord| {
            let task = task_to_pb(t);
            let len = task.encoded_len();
            (task, 1 + prost::length_delimiter_len(len) + len)
        };
        let (tasks, next) = self
            .store
            .list_tasks(&filter, after, limit, MAX_PAGE_BYTES, measure)
            .map_err(GatewayError::from)?;
        let next_page_token = next.unwrap_or_default();
        Ok(Response::new(pb::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&req, GrpcMethod::ListAgents)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: self
                .membership
                .list()
                .iter()
                .map(|a| agent_to_pb(a))
                .collect(),
        }))
    }

    async fn list_procedures(
        &self,
        req: Request<pb::ListProceduresRequest>,
    ) -> Result<Response<pb::ListProceduresResponse>, Status> {
        self.authorize(&req, GrpcMethod::ListProcedures)?;
        Ok(Response::new(pb::ListProceduresResponse {
            procedures: self
                .membership
                .procedures()
                .into_iter()
                .map(|(name, kind, agent_ids)| pb::Procedure {
                    name,
                    agent_ids,
                    kind: kind_to_pb(kind) as i32,
                })
                .collect(),
        }))
    }

    async fn describe_procedure(
        &self,
        req: Request<pb::DescribeProcedureRequest>,
    ) -> Result<Response<pb::ProcedureSchema>, Status> {
        self.authorize(&req, GrpcMethod::DescribeProcedure)?;
        let procedure = req.into_inner().procedure;
        required_id("procedure", &procedure)?;
        let described = self.membership.describe(procedure.trim()).ok_or_else(|| {
            GatewayError::ProcedureNotOffered {
                procedure: procedure.clone(),
                offered_elsewhere: Vec::new(),
            }
        })?;
        Ok(Response::new(schema_to_pb(procedure.trim(), &described)))
    }

    async fn blacklist_agent(
        &self,
        req: Request<pb::BlacklistAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.authorize(&req, GrpcMethod::BlacklistAgent)?;
        let id = req.into_inner().agent_id;
        required_id("agent_id", &id)?;
        let a = self.membership.set_blacklisted(&id, true).await?;
        // The operator's decision is durable before the answer.
        self.store.commit().await.map_err(GatewayError::from)?;
        Ok(Response::new(agent_to_pb(&a)))
    }

    async fn unblacklist_agent(
        &self,
        req: Request<pb::UnblacklistAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.authorize(&req, GrpcMethod::UnblacklistAgent)?;
        let id = req.into_inner().agent_id;
        required_id("agent_id", &id)?;
        let a = self.membership.set_blacklisted(&id, false).await?;
        // The operator's decision is durable before the answer.
        self.store.commit().await.map_err(GatewayError::from)?;
        Ok(Response::new(agent_to_pb(&a)))
    }
}
