//! The gateway side of the harness: starting a gateway (alone or with agents), a
//! blocking wrapper around the tonic client `arpcp::pb::gateway_client::GatewayClient`,
//! and conversions between JSON and `google.protobuf.Value`.
//!
//! Every gRPC call is bounded in time; waiting for a task polls `GetResult` with a
//! bounded `wait` against a deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arpcp::pb;
use arpcp::pb::gateway_client::GatewayClient;
use serde_json::Value;
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{tempdir, wait_for, Daemon, IO_TIMEOUT, WAIT};

/// A TLS client configuration trusting the CA in `ca` and, with `identity`,
/// presenting that certificate and key (PEM files as `arpcp ca issue` writes them).
pub fn client_tls(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> tonic::transport::ClientTlsConfig {
    let read = |p: &std::path::Path| {
        std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    };
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(cert), read(key)));
    }
    tls
}

/// Echo interval of the gateways tests start (fast membership changes).
pub const ECHO_MS: &str = "100";
/// Bound of a gRPC call that does not wait on purpose.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

impl Daemon {
    /// A gateway on free loopback ports (gRPC and ARPCP), its store in
    /// `{dir}/gateway-data`, echoing every `ECHO_MS` ms unless `extra` says otherwise.
    pub fn gateway(extra: &[&str]) -> Daemon {
        Daemon::gateway_in(tempdir(), extra)
    }

    pub fn gateway_in(dir: Arc<TempDir>, extra: &[&str]) -> Daemon {
        Daemon::spawn_in(dir, &gateway_args(extra))
    }

    /// `https://HOST:PORT` of a gateway's gRPC API served over TLS.
    pub fn grpcs_url(&self) -> String {
        format!("https://{}", self.addr("grpc"))
    }

    /// `http://HOST:PORT` of a gateway's gRPC API.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.addr("grpc"))
    }
}

/// The arguments of `Daemon::gateway`: a gateway on free loopback ports, its store
/// in `{dir}/gateway-data`, echoing every `ECHO_MS` ms unless `extra` says otherwise.
pub fn gateway_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/gateway-data",
    ];
    if !extra.contains(&"--echo-interval-ms") {
        args.extend_from_slice(&["--echo-interval-ms", ECHO_MS]);
    }
    args.extend_from_slice(extra);
    args
}

/// An agent whose configuration file holds `toml` (`{dir}` in it stands for the
/// agent's directory), with more flags in `extra`.
pub fn agent_with_config(toml: &str, extra: &[&str]) -> Daemon {
    let dir = tempdir();
    let text = toml.replace("{dir}", &dir.path().to_string_lossy());
    std::fs::write(dir.path().join("agent.toml"), text).expect("write the agent configuration");
    let mut args = vec!["--config", "{dir}/agent.toml"];
    args.extend_from_slice(extra);
    Daemon::agent_in(dir, &args)
}

// ---------------------------------------------------------------------------
// Values

/// JSON → `google.protobuf.Value`.
pub fn pv(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().expect("a JSON number")),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(pv).collect(),
        }),
        Value::Object(m) => Kind::StructValue(pstruct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn pstruct(m: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), pv(v))).collect(),
    }
}

/// `google.protobuf.Value` → JSON; integral numbers become JSON integers.
pub fn jv(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            Value::from(*n as i64)
        }
        Some(Kind::NumberValue(n)) => Value::from(*n),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(jv).collect()),
        Some(Kind::StructValue(s)) => {
            Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), jv(v))).collect())
        }
    }
}

/// A task's result as JSON (`None` when it has none).
pub fn result_of(t: &pb::Task) -> Option<Value> {
    t.result.as_ref().map(jv)
}

/// A task's positional arguments as JSON.
pub fn args_of(t: &pb::Task) -> Vec<Value> {
    t.args.iter().map(jv).collect()
}

/// A Submit request for `procedure` with positional `args` (a JSON array).
pub fn submit_req(procedure: &str, args: Value) -> pb::SubmitRequest {
    let Value::Array(args) = args else {
        panic!("positional arguments must be a JSON array, got {args}")
    };
    pb::SubmitRequest {
        procedure: procedure.into(),
        args: args.iter().map(pv).collect(),
        ..Default::default()
    }
}

pub fn dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

// ---------------------------------------------------------------------------
// Statuses

pub fn status_name(s: i32) -> String {
    pb::TaskStatus::try_from(s)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("TaskStatus({s})"))
}

pub fn is_final(s: i32) -> bool {
    !matches!(
        pb::TaskStatus::try_from(s),
        Ok(pb::TaskStatus::Unspecified
            | pb::TaskStatus::Queued
            | pb::TaskStatus::Dispatched
            | pb::TaskStatus::Running)
    )
}

/// Asserts a task's status, showing the task when it differs.
pub fn assert_task_status(t: &pb::Task, want: pb::TaskStatus) {
    assert_eq!(
        status_name(t.status),
        status_name(want as i32),
        "task {} ({}): {}",
        t.task_id,
        t.procedure,
        describe(t)
    );
}

/// A short account of a task for failure messages.
pub fn describe(t: &pb::Task) -> String {
    let history: Vec<String> = t
        .history
        .iter()
        .map(|h| {
            let mut s = status_name(h.status);
            if !h.agent_id.is_empty() {
                s += &format!("@{}", h.agent_id);
            }
            if !h.reason.is_empty() {
                s += &format!(" ({})", h.reason);
            }
            s
        })
        .collect();
    format!(
        "status {} agent {:?} result {:?} error {:?} ({}) attempts {} history [{}]",
        status_name(t.status),
        t.agent_id,
        result_of(t),
        t.error,
        t.error_code,
        t.attempts,
        history.join(", ")
    )
}

/// Asserts a gRPC error's code and that its message names every `needle`.
pub fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, want: Code, needles: &[&str]) {
    let e = match r {
        Ok(v) => panic!("expected {want:?}, got a success: {v:?}"),
        Err(e) => e,
    };
    assert_eq!(e.code(), want, "unexpected code: {e:?}");
    for n in needles {
        assert!(
            e.message().contains(n),
            "the message should mention {n:?}: {:?}",
            e.message()
        );
    }
}

// ---------------------------------------------------------------------------
// Client

/// A blocking gRPC client of one gateway, with its own runtime.
pub struct Gw {
    rt: tokio::runtime::Runtime,
    client: GatewayClient<Channel>,
    url: String,
}

impl Gw {
    pub fn connect(gateway: &Daemon) -> Gw {
        Gw::connect_url(&gateway.grpc_url())
    }

    pub fn connect_url(url: &str) -> Gw {
        Gw::connect_endpoint(url, None)
    }

    /// A client of a gateway serving gRPC over TLS (`--tls-dir`), at `https://…`.
    pub fn connect_tls(url: &str, tls: tonic::transport::ClientTlsConfig) -> Gw {
        Gw::connect_endpoint(url, Some(tls))
    }

    fn connect_endpoint(url: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Gw {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let client = rt.block_on(async {
            let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
                .expect("a gRPC URL")
                .connect_timeout(IO_TIMEOUT);
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).expect("a TLS configuration");
            }
            let channel = endpoint
                .connect()
                .await
                .unwrap_or_else(|e| panic!("connect to the gateway at {url}: {e}"));
            GatewayClient::new(channel)
        });
        Gw {
            rt,
            client,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn rt(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// A clone of the client, for calls made from tasks on `rt()`.
    pub fn client(&self) -> GatewayClient<Channel> {
        self.client.clone()
    }

    /// Runs one call on the runtime, at most `limit`.
    pub fn call_within<T, F>(
        &self,
        limit: Duration,
        what: &str,
        f: impl FnOnce(GatewayClient<Channel>) -> F,
    ) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let fut = f(self.client.clone());
        match self
            .rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
        {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => panic!("{what} to {} got no answer within {limit:?}", self.url),
        }
    }

    pub fn call<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(GatewayClient<Channel>) -> F,
    ) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_within(RPC_TIMEOUT, what, f)
    }

    pub fn submit(&self, req: pb::SubmitRequest) -> Result<pb::SubmitResponse, Status> {
        self.call("Submit", |mut c| async move { c.submit(req).await })
    }

    /// Submits `procedure(args…)`; returns the task id (panics on an error).
    pub fn submit_ok(&self, procedure: &str, args: Value) -> String {
        self.submit(submit_req(procedure, args.clone()))
            .unwrap_or_else(|e| panic!("Submit {procedure}{args}: {e:?}"))
            .task_id
    }

    pub fn get(&self, task_id: &str) -> Result<pb::Task, Status> {
        let task_id = task_id.to_string();
        self.call("GetResult", |mut c| async move {
            c.get_result(pb::GetResultRequest {
                task_id,
                wait: None,
            })
            .await
        })
    }

    /// The task now (panics on an error).
    pub fn task(&self, task_id: &str) -> pb::Task {
        self.get(task_id)
            .unwrap_or_else(|e| panic!("GetResult {task_id}: {e:?}"))
    }

    /// GetResult with a `wait`.
    pub fn get_wait(&self, task_id: &str, wait: Duration) -> Result<pb::Task, Status> {
        let task_id = task_id.to_string();
        self.call_within(wait + RPC_TIMEOUT, "GetResult", |mut c| async move {
            c.get_result(pb::GetResultRequest {
                task_id,
                wait: Some(dur(wait)),
            })
            .await
        })
    }

    /// Waits (GetResult with waits) until the task has ended; panics after `timeout`.
    pub fn wait_final(&self, task_id: &str, timeout: Duration) -> pb::Task {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let t = self
                .get_wait(task_id, left.min(Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("GetResult {task_id}: {e:?}"));
            if is_final(t.status) {
                return t;
            }
            if Instant::now() >= deadline {
                panic!(
                    "task {task_id} did not end within {timeout:?}: {}",
                    describe(&t)
                );
            }
        }
    }

    /// Polls the task until `pred` holds; panics after `timeout` showing the task.
    pub fn wait_task(
        &self,
        task_id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&pb::Task) -> bool,
    ) -> pb::Task {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.task(task_id);
            if pred(&t) {
                return t;
            }
            if Instant::now() >= deadline {
                panic!(
                    "task {task_id}: timed out after {timeout:?} waiting for {what}; last: {}",
                    describe(&t)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the task until it has `status`.
    pub fn wait_status(
        &self,
        task_id: &str,
        status: pb::TaskStatus,
        timeout: Duration,
    ) -> pb::Task {
        self.wait_task(task_id, timeout, &status_name(status as i32), |t| {
            t.status == status as i32
        })
    }

    /// Every message of a WatchTask stream until it ends (panics after `timeout`).
    pub fn watch(&self, task_id: &str, timeout: Duration) -> Result<Vec<pb::Task>, Status> {
        let mut client = self.client.clone();
        let task_id = task_id.to_string();
        let fut = async move {
            let mut stream = client
                .watch_task(pb::WatchTaskRequest { task_id })
                .await?
                .into_inner();
            let mut got = Vec::new();
            // Bounded by the timeout around this future.
            while let Some(t) = stream.message().await? {
                got.push(t);
            }
            Ok(got)
        };
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, fut).await })
        {
            Ok(r) => r,
            Err(_) => panic!("WatchTask stream did not end within {timeout:?}"),
        }
    }

    pub fn cancel(&self, task_id: &str) -> Result<pb::Task, Status> {
        let task_id = task_id.to_string();
        self.call("CancelTask", |mut c| async move {
            c.cancel_task(pb::CancelTaskRequest { task_id }).await
        })
    }

    pub fn list(&self, req: pb::ListTasksRequest) -> Result<pb::ListTasksResponse, Status> {
        self.call("ListTasks", |mut c| async move { c.list_tasks(req).await })
    }

    /// Every task matching `req`'s filters, following page tokens (at most 1000 pages).
    pub fn list_all(&self, req: pb::ListTasksRequest) -> Vec<pb::Task> {
        let mut all = Vec::new();
        let mut req = req;
        for _ in 0..1000 {
            let page = self
                .list(req.clone())
                .unwrap_or_else(|e| panic!("ListTasks {req:?}: {e:?}"));
            all.extend(page.tasks);
            if page.next_page_token.is_empty() {
                return all;
            }
            req.page_token = page.next_page_token;
        }
        panic!("ListTasks still had pages after 1000");
    }

    pub fn agents(&self) -> Vec<pb::Agent> {
        self.call("ListAgents", |mut c| async move {
            c.list_agents(pb::ListAgentsRequest {}).await
        })
        .unwrap_or_else(|e| panic!("ListAgents: {e:?}"))
        .agents
    }

    /// The agent listed with this id.
    pub fn agent(&self, agent_id: &str) -> pb::Agent {
        let agents = self.agents();
        agents
            .iter()
            .find(|a| a.agent_id == agent_id)
            .cloned()
            .unwrap_or_else(|| panic!("no agent {agent_id} in {agents:?}"))
    }

    /// Waits until `n` agents are listed alive; returns the listing.
    pub fn wait_alive(&self, n: usize, timeout: Duration) -> Vec<pb::Agent> {
        wait_for(timeout, &format!("{n} alive agents"), || {
            let agents = self.agents();
            let alive = agents
                .iter()
                .filter(|a| a.state == pb::AgentState::Alive as i32)
                .count();
            (alive == n).then_some(agents)
        })
    }

    /// Waits until the agent is listed in `state`.
    pub fn wait_agent_state(
        &self,
        agent_id: &str,
        state: pb::AgentState,
        timeout: Duration,
    ) -> pb::Agent {
        wait_for(
            timeout,
            &format!("agent {agent_id} to be {}", state.as_str_name()),
            || {
                self.agents()
                    .into_iter()
                    .find(|a| a.agent_id == agent_id && a.state == state as i32)
            },
        )
    }

    pub fn procedures(&self) -> Vec<pb::Procedure> {
        self.call("ListProcedures", |mut c| async move {
            c.list_procedures(pb::ListProceduresRequest {}).await
        })
        .unwrap_or_else(|e| panic!("ListProcedures: {e:?}"))
        .procedures
    }

    pub fn blacklist(&self, agent_id: &str) -> Result<pb::Agent, Status> {
        let agent_id = agent_id.to_string();
        self.call("BlacklistAgent", |mut c| async move {
            c.blacklist_agent(pb::BlacklistAgentRequest { agent_id })
                .await
        })
    }

    pub fn unblacklist(&self, agent_id: &str) -> Result<pb::Agent, Status> {
        let agent_id = agent_id.to_string();
        self.call("UnblacklistAgent", |mut c| async move {
            c.unblacklist_agent(pb::UnblacklistAgentRequest { agent_id })
                .await
        })
    }
}

// ---------------------------------------------------------------------------
// A gateway with agents

/// A gateway that knows its agents from `--agent` flags, and a client of it.
pub struct Cluster {
    pub gw: Gw,
    pub gateway: Daemon,
    pub agents: Vec<Daemon>,
    /// `ids[i]` is the agent id the gateway gave `agents[i]`.
    pub ids: Vec<String>,
}

impl Cluster {
    /// Starts a gateway probing `agents` (and `extra` flags); waits until every
    /// agent is alive and learns their ids.
    pub fn start(agents: Vec<Daemon>, extra: &[&str]) -> Cluster {
        let addrs: Vec<String> = agents.iter().map(Daemon::arpcp).collect();
        let mut args: Vec<&str> = Vec::new();
        for a in &addrs {
            args.extend_from_slice(&["--agent", a]);
        }
        args.extend_from_slice(extra);
        let gateway = Daemon::gateway(&args);
        let gw = Gw::connect(&gateway);
        let mut c = Cluster {
            gw,
            gateway,
            agents,
            ids: Vec::new(),
        };
        c.learn_ids();
        c
    }

    /// `start` for a gateway serving gRPC over TLS (`--tls-dir` in `extra`), called
    /// with `tls` (the cluster CA, and a client certificate allowed to list agents).
    pub fn start_tls(
        agents: Vec<Daemon>,
        extra: &[&str],
        tls: tonic::transport::ClientTlsConfig,
    ) -> Cluster {
        let addrs: Vec<String> = agents.iter().map(Daemon::arpcp).collect();
        let mut args: Vec<&str> = Vec::new();
        for a in &addrs {
            args.extend_from_slice(&["--agent", a]);
        }
        args.extend_from_slice(extra);
        let gateway = Daemon::gateway(&args);
        let gw = Gw::connect_tls(&gateway.grpcs_url(), tls);
        let mut c = Cluster {
            gw,
            gateway,
            agents,
            ids: Vec::new(),
        };
        c.learn_ids();
        c
    }

    /// Waits until every agent is alive and maps them to their ids.
    pub fn learn_ids(&mut self) {
        let listed = self.gw.wait_alive(self.agents.len(), WAIT);
        self.ids = self
            .agents
            .iter()
            .map(|d| {
                let port = u32::from(d.port("arpcp"));
                listed
                    .iter()
                    .find(|a| a.port == port)
                    .unwrap_or_else(|| panic!("no agent on port {port} in {listed:?}"))
                    .agent_id
                    .clone()
            })
            .collect();
    }

    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// Which of `agents` has this id.
    pub fn index_of(&self, agent_id: &str) -> usize {
        self.ids
            .iter()
            .position(|i| i == agent_id)
            .unwrap_or_else(|| panic!("{agent_id:?} is none of {:?}", self.ids))
    }

    /// Restarts the gateway process on the same data (new ports) and reconnects.
    pub fn restart_gateway(&mut self) {
        self.gateway.restart();
        self.gw = Gw::connect(&self.gateway);
    }
}
