//! The agent daemon (`arpcp agent`): serves ARPCP on its port, runs procedures on a
//! pool of task slots, keeps every task in a durable store until its controller
//! terminates it, and signals the controller as tasks change.

pub mod config;
mod core;
mod identity;
mod lease;
pub mod procedures;
mod signals;
mod store;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::arpcp::server::{serve, Handler, PeerInfo};
use crate::arpcp::{
    ArpcpClient, AtaskStatus, CatalogEntry, IdData, ProtocolError, Request, Response,
    SignalRequest, VERSION,
};
use crate::retry::{retry, Attempt, Policy};
use crate::tls::Role;
pub use config::{AgentConfig, AgentFlags};
use identity::Identity;
use procedures::Registry;
use signals::SignalSender;
pub use signals::MAX_SIGNALS_IN_FLIGHT;
use store::AgentStore;
use tasks::TaskRunner;

const META_AGENT_ID: &str = "agent_id";
const META_CONTROLLER: &str = "controller";

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("procedures: {0}")]
    Procedures(procedures::RegistryError),
    #[error("cannot create data directory {path}: {error}")]
    DataDir {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("listener: {0}")]
    Listener(std::io::Error),
}

// The error texts above include their cause, so the causes are not also exposed as
// `source()`: a caller printing the chain would repeat them.
impl From<procedures::RegistryError> for AgentError {
    fn from(e: procedures::RegistryError) -> Self {
        AgentError::Procedures(e)
    }
}

/// Answers ARPCP requests on behalf of the agent.
struct AgentService {
    runner: Arc<TaskRunner>,
    store: AgentStore,
    signals: SignalSender,
    identity: Identity,
    hostname: String,
    procedures: Vec<String>,
    /// What each procedure is (kinds, Opal schemas), sent when a controller asks.
    catalog: Vec<CatalogEntry>,
    catalog_digest: String,
    capacity: u32,
    port: u16,
}

impl Handler for AgentService {
    async fn handle(&self, req: Request, peer: PeerInfo) -> Response {
        match self.dispatch(req, peer).await {
            Ok(r) => r,
            Err(e) => Response::error(&e),
        }
    }

    fn server_name(&self) -> &'static str {
        "agent"
    }
}

impl AgentService {
    async fn dispatch(&self, req: Request, peer: PeerInfo) -> Result<Response, ProtocolError> {
        // Every request an agent serves drives or reads its tasks: the controller's.
        peer.require(req.method(), Role::Gateway)?;
        match req {
            Request::Atask {
                procedure,
                args,
                atask_id,
                reply_to,
                lease_epoch,
            } => {
                let id = self
                    .runner
                    .submit(atask_id, procedure, args, reply_to, lease_epoch)
                    .await?;
                Ok(Response::ok(tasks::accepted_data(&id)))
            }
            Request::Task {
                procedure,
                args,
                timeout_ms,
            } => {
                let result = self
                    .runner
                    .run_sync(&procedure, &args, timeout_ms.map(Duration::from_millis))
                    .await?;
                Ok(Response::ok(serde_json::json!({ "result": result })))
            }
            Request::Get { atask_id } => self.runner.get(&atask_id),
            Request::Signal(SignalRequest {
                atask_id, status, ..
            }) => match status {
                AtaskStatus::Terminate | AtaskStatus::ClientError => {
                    self.runner.terminate(&atask_id)?;
                    Ok(Response::ok(serde_json::Value::Null))
                }
                other => Err(ProtocolError::BadHeader {
                    header: "atask_status",
                    expected: "\"terminate\" or \"client_error\" (the statuses a controller may send to an agent)",
                    got: format!("{:?}", other.as_str()),
                }),
            },
            Request::Id {
                agent_id,
                controller,
                lease_ms,
                describe,
                ..
            } => {
                if lease_ms.is_some() {
                    // This controller fences attempts: from now on a task starts
                    // unasked only under a lease it granted.
                    self.runner.lease().fenced();
                }
                if let Some(id) = agent_id {
                    if self.signals.agent_id().as_deref() != Some(id.as_str()) {
                        info!(agent_id = %id, "controller assigned this agent its id");
                        self.store.set_meta(META_AGENT_ID, &id).await?;
                        self.signals.set_agent_id(id);
                    }
                }
                if let Some(c) = controller {
                    if self.signals.controller().as_deref() != Some(c.as_str()) {
                        self.store.set_meta(META_CONTROLLER, &c).await?;
                        self.signals.set_controller(c);
                    }
                }
                let ip = peer.local.ip();
                let data = IdData {
                    mac: self.identity.mac_for(ip),
                    ip: ip.to_string(),
                    hostname: self.hostname.clone(),
                    port: self.port,
                    version: VERSION.to_string(),
                    procedures: self.procedures.clone(),
                    capacity: self.capacity,
                    running: self.runner.running(),
                    agent_id: self.signals.agent_id(),
                    catalog_digest: Some(self.catalog_digest.clone()),
                    catalog: describe.then(|| self.catalog.clone()),
                };
                Ok(Response::ok(
                    serde_json::to_value(data).map_err(|e| ProtocolError::Internal(e.to_string()))?,
                ))
            }
        }
    }
}
/// A started agent: store open, procedures checked, earlier tasks recovered; not
/// yet answering requests.
pub struct Agent {
    config: AgentConfig,
    listener: TcpListener,
    service: Arc<AgentService>,
    runner: Arc<TaskRunner>,
    signals: SignalSender,
    port: u16,
}

impl Agent {
    /// Everything that can fail at start-up, so a caller can report readiness only
    /// once the agent will really serve.
    pub async fn start(config: AgentConfig, listener: TcpListener) -> Result<Agent, AgentError> {
        crate::durable::create_data_dir(&config.data_dir).map_err(|error| AgentError::DataDir {
            path: config.data_dir.clone(),
            error,
        })?;
        // Opal models are asked for their schema (`--info`), which runs programs.
        let specs = config.procedures.clone();
        let registry = tokio::task::spawn_blocking(move || Registry::new(specs))
            .await
            .map_err(|e| {
                AgentError::Procedures(procedures::RegistryError::Invalid {
                    name: "(all)".into(),
                    reason: format!("loading the procedures failed: {e}"),
                })
            })??;
        let registry = Arc::new(registry);
        let store = AgentStore::open(&config.data_dir, config.store_cache_bytes)?;
        let port = listener.local_addr().map_err(AgentError::Listener)?.port();
        let controller = config.controller.clone().or(store.meta(META_CONTROLLER)?);
        let controller_tls = config.tls.as_ref().map(|t| t.calling(Role::Gateway));
        let signals = SignalSender::new(
            store.clone(),
            controller,
            store.meta(META_AGENT_ID)?,
            controller_tls,
        );
        let runner = TaskRunner::new(
            store.clone(),
            registry.clone(),
            signals.clone(),
            config.capacity,
        );
        runner.recover().await?;
        let service = Arc::new(AgentService {
            runner: runner.clone(),
            store,
            signals: signals.clone(),
            identity: Identity::default(),
            hostname: Identity::hostname(),
            procedures: registry.names(),
            catalog_digest: CatalogEntry::digest(&registry.catalog()),
            catalog: registry.catalog(),
            capacity: config.capacity,
            port,
        });
        Ok(Agent {
            config,
            listener,
            service,
            runner,
            signals,
            port,
        })
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets running
    /// tasks finish for the grace period and interrupts the rest.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            config,
            listener,
            service,
            runner,
            signals,
            port,
        } = self;
        tokio::spawn(drop_unclaimed(
            service.store.clone(),
            config.keep_finished,
            shutdown.clone(),
        ));
        if let Some(controller) = config.controller.clone() {
            tokio::spawn(announce(
                controller,
                config.tls.as_ref().map(|t| t.calling(Role::Gateway)),
                port,
                signals.clone(),
                shutdown.clone(),
            ));
        }
        let tasks = Arc::downgrade(&runner);
        crate::metrics::get().before_scrape("agent tasks", move || {
            if let Some(r) = tasks.upgrade() {
                let (running, queued) = r.counts();
                crate::metrics::get().set_agent_tasks(running, queued);
            }
        });
        info!(port, capacity = config.capacity, procedures = ?service.procedures, "agent ready");
        // The grace period counts from the shutdown request for every running task,
        // synchronous TASKs included: `serve` waits for their answers, so without this
        // a long TASK would hold the agent up for as long as it runs.
        let grace_over = {
            let (runner, shutdown, grace) = (runner.clone(), shutdown.clone(), config.grace);
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
                runner.interrupt();
            })
        };
        // ARPCP is served on through the grace period, and until the controller
        // collected what ended in it (GET, then terminate): a controller told of a
        // result by a final SIGNAL comes to fetch it. New tasks are refused meanwhile
        // (the runner is draining).
        let tls = config.tls.as_ref().map(|t| t.serving());
        let serving = CancellationToken::new();
        let server = tokio::spawn(serve(listener, service.clone(), tls, serving.clone()));
        shutdown.cancelled().await;
        let unfinished: Vec<String> = service
            .store
            .all()
            .into_iter()
            .filter_map(Result::ok)
            .filter(|r| !r.state.is_final())
            .map(|r| r.atask_id)
            .collect();
        info!(
            "agent stopping: waiting up to {:?} for running tasks",
            config.grace
        );
        runner.shutdown(config.grace).await;
        signals.shutdown(Duration::from_secs(1)).await;
        wait_collected(&service.store, &unfinished).await;
        // The server waits for the answers of synchronous TASKs still running, which
        // `grace_over` interrupts at the end of the grace period.
        serving.cancel();
        if let Err(e) = server.await {
            warn!("the ARPCP server ended abnormally: {e}");
        }
        grace_over.abort();
        info!("agent stopped");
        Ok(())
    }
}

/// Runs an agent on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    Agent::start(config, listener).await?.serve(shutdown).await
}

/// At shutdown, how long the agent keeps serving for a controller to collect the
/// tasks that ended during the grace period (after it answered their final SIGNAL).
pub const COLLECT_WINDOW: Duration = Duration::from_secs(2);

/// Waits, up to `COLLECT_WINDOW`, until no task of `ids` is waiting to be collected:
/// ended, its final SIGNAL answered, not yet terminated by the controller. A task
/// whose SIGNAL was not answered is not waited for: no controller is coming.
async fn wait_collected(store: &AgentStore, ids: &[String]) {
    let deadline = tokio::time::Instant::now() + COLLECT_WINDOW;
    let waiting = || {
        ids.iter().any(|id| {
            matches!(store.get(id), Ok(Some(r)) if r.state.is_final() && r.final_signal_answered)
        })
    };
    while waiting() {
        if tokio::time::Instant::now() >= deadline {
            warn!(
                "stopping with results the controller did not collect within {COLLECT_WINDOW:?}; \
                 they stay in the store for its next GET"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often finished tasks nobody claimed are looked for.
pub const UNCLAIMED_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Drops finished tasks that no controller claimed (GET, then `terminate`) within
/// `keep`: results of callers that never came back must not fill the disk.
async fn drop_unclaimed(store: AgentStore, keep: Duration, stop: CancellationToken) {
    let mut tick =
        tokio::time::interval(UNCLAIMED_SWEEP_INTERVAL.min(keep.max(Duration::from_secs(1))));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(keep.as_millis() as u64);
        let sweep = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.drop_finished_before(cutoff, now)).await
        };
        match sweep {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                dropped = n,
                "dropped finished tasks no controller claimed within {keep:?}"
            ),
            Ok(Err(e)) => warn!("cannot drop unclaimed tasks: {e}"),
            Err(e) => warn!("unclaimed-task sweep failed: {e}"),
        }
    }
}

/// An announcement the controller did not answer 100 (unreachable, or too busy
/// probing other announcers) is repeated like a SIGNAL, jittered so that the
/// agents of a restarted gateway do not announce in step.
pub const ANNOUNCE_RETRY: Policy = signals::SIGNAL_RETRY;

/// Tells the controller this agent exists (ARPCP ID with our port), retrying with
/// backoff until it answers; the controller then probes us and registers us.
async fn announce(
    controller: String,
    tls: Option<crate::arpcp::tls::ClientTls>,
    port: u16,
    signals: SignalSender,
    stop: CancellationToken,
) {
    let client = ArpcpClient::default().with_tls(tls);
    let announced = retry(ANNOUNCE_RETRY, &stop, || {
        let req = Request::Id {
            agent_id: signals.agent_id(),
            controller: None,
            port: Some(port),
            lease_ms: None,
            describe: false,
        };
        let (client, controller) = (&client, &controller);
        async move {
            // Every failure is worth another try: a refusal is a controller that
            // is busy or not yet set up for us.
            match client.call(controller, &req).await {
                Ok(r) if r.is_ok() => Ok(()),
                Ok(r) => {
                    warn!(%controller, code = %r.code, "announcement refused: {}", r.description);
                    Err(Attempt::Transient(r.description))
                }
                Err(e) => {
                    warn!(%controller, "cannot announce: {e}");
                    Err(Attempt::Transient(e.to_string()))
                }
            }
        }
    })
    .await;
    if announced.is_ok() {
        info!(%controller, "announced to the controller");
    }
}
