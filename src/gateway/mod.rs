//! The gateway (`arpcp gateway`), the cluster's controller: a gRPC service for
//! clients in front, ARPCP towards the agents behind, every task kept in sled.
//!
//! `service` checks requests and answers them; `scheduler` places tasks and follows
//! them to their end; `membership` tracks the agents with echo requests; `listener`
//! receives agents' SIGNALs; `store` persists; `model` holds the records and their
//! rules; `watch` wakes clients waiting on a task; `core` is the task rules as a
//! value, checked by simulation and not yet driven by the others.

pub mod auth;
mod convert;
pub mod core;
mod encoding;
mod error;
pub mod grpc_tls;
mod listener;
pub mod membership;
pub mod model;
mod scheduler;
mod service;
mod store;
pub mod tokens;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::tls::Role;
pub use error::GatewayError;
pub use listener::MAX_ANNOUNCE_PROBES;
use membership::{Membership, MembershipConfig};
use scheduler::Scheduler;
pub use service::MAX_PAGE_SIZE;
use store::GatewayStore;
pub use store::DEFAULT_CACHE_BYTES;
use watch::TaskWatchers;

/// How often retention runs while it finds less than a full batch to drop.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);
/// A retention pass is followed by a pause of at least this many times its length,
/// so that retention takes at most about a tenth of a core, also while it catches
/// up (a full batch is followed by that pause only).
const RETENTION_PAUSE_FACTOR: u32 = 10;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub data_dir: PathBuf,
    /// Our ARPCP address as agents should use it; default the listener's.
    pub advertise: Option<String>,
    pub agents: Vec<String>,
    pub scan: Vec<IpNet>,
    pub scan_port: u16,
    pub echo_interval: Duration,
    pub max_misses: u32,
    /// Finished tasks are kept this long...
    pub retention: Duration,
    /// ...and at most this many.
    pub retention_count: usize,
    /// sled's page cache for the store (`--store-cache`).
    pub store_cache_bytes: u64,
    /// Start on a damaged store with what is readable (what was lost is logged)
    /// instead of refusing to start.
    pub accept_damaged_store: bool,
    /// ARPCP over mutual TLS (`--tls-dir`): the listener takes agents' certificates
    /// only, and agents are called with the gateway's.
    pub tls: Option<crate::arpcp::tls::ArpcpTls>,
    /// The gRPC API over TLS with the gateway's certificate (`--tls-dir`): callers
    /// are then authenticated and their roles checked (`auth.rs`).
    pub grpc_tls: Option<crate::arpcp::tls::ServerTls>,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

fn advertised(config: &GatewayConfig, arpcp: SocketAddr) -> String {
    if let Some(a) = &config.advertise {
        return a.clone();
    }
    if arpcp.ip().is_unspecified() {
        warn!("the ARPCP listener is on {arpcp}; agents are told 127.0.0.1 (set --advertise HOST:PORT)");
        return SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), arpcp.port()).to_string();
    }
    arpcp.to_string()
}

/// A started gateway: store open, unfinished tasks recovered; not yet serving.
pub struct Gateway {
    config: GatewayConfig,
    grpc: TcpListener,
    arpcp: TcpListener,
    store: GatewayStore,
    membership: Arc<Membership>,
    scheduler: Arc<Scheduler>,
    watchers: Arc<TaskWatchers>,
    driver: scheduler::Driver,
    inbox: scheduler::ControllerInbox,
    advertise: String,
}

impl Gateway {
    /// Everything that can fail at start-up, so a caller can report readiness only
    /// once the gateway will really serve.
    pub async fn start(
        config: GatewayConfig,
        grpc: TcpListener,
        arpcp: TcpListener,
    ) -> Result<Gateway, StartError> {
        crate::durable::create_data_dir(&config.data_dir).map_err(|source| {
            StartError::DataDir {
                path: config.data_dir.clone(),
                source,
            }
        })?;
        let policy = if config.accept_damaged_store {
            crate::durable::DamagePolicy::Accept
        } else {
            crate::durable::DamagePolicy::Refuse
        };
        let store = GatewayStore::open_with(&config.data_dir, policy, config.store_cache_bytes)?;
        let advertise = advertised(&config, arpcp.local_addr().map_err(StartError::Listener)?);
        let (controller, inbox) = scheduler::ControllerHandle::new();
        // An agent that stops answering leaves after `max_misses` echoes: its lease
        // runs as long, so its waiting tasks are usually withdrawn as it leaves.
        let lease_duration = config.echo_interval * config.max_misses.max(1);
        let agents_tls = config.tls.as_ref().map(|t| t.calling(Role::Agent));
        let membership = Membership::new(
            store.clone(),
            MembershipConfig {
                echo_interval: config.echo_interval,
                seeds: config.agents.clone(),
                scan: config.scan.clone(),
                scan_port: config.scan_port,
                advertise: advertise.clone(),
                lease: lease_duration,
                tls: agents_tls.clone(),
            },
            controller.clone(),
        )?;
        let watchers = Arc::new(TaskWatchers::default());
        let driver = scheduler::Driver::recover(
            controller.clone(),
            store.clone(),
            membership.clone(),
            watchers.clone(),
            scheduler::DriverConfig {
                lease: lease_duration,
                max_misses: config.max_misses,
                reply_to: advertise.clone(),
                tls: agents_tls,
            },
        )?;
        let scheduler = Scheduler::new(controller, store.clone());
        Ok(Gateway {
            config,
            grpc,
            arpcp,
            store,
            membership,
            scheduler,
            watchers,
            driver,
            inbox,
            advertise,
        })
    }

    /// Serves gRPC and ARPCP until `shutdown` is cancelled.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Gateway {
            config,
            grpc,
            arpcp,
            store,
            membership,
            scheduler,
            watchers,
            driver,
            inbox,
            advertise,
        } = self;
        let reflection = |b: tonic_reflection::server::Builder<'static>| {
            b.register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        // grpcurl as shipped on PyPI asks only the v1alpha service.
        let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;

        let mut background = tokio::task::JoinSet::new();
        background.spawn(membership.clone().echo_loop(shutdown.clone()));
        let known = Arc::downgrade(&membership);
        crate::metrics::get().before_scrape("gateway agents", move || {
            if let Some(m) = known.upgrade() {
                crate::metrics::get().set_agents(&m.count_by_state());
            }
        });
        let watched = Arc::downgrade(&watchers);
        crate::metrics::get().before_scrape("gateway watched tasks", move || {
            if let Some(w) = watched.upgrade() {
                crate::metrics::get().set_watched_tasks(w.watched());
            }
        });
        background.spawn(driver.run(inbox, shutdown.clone()));
        background.spawn(retention_loop(
            store.clone(),
            watchers.clone(),
            config.clone(),
            shutdown.clone(),
        ));
        background.spawn(crate::arpcp::server::serve(
            arpcp,
            Arc::new(listener::ControllerService {
                scheduler: scheduler.clone(),
                membership: membership.clone(),
                announcements: listener::AnnounceProbes::default(),
            }),
            config.tls.as_ref().map(|t| t.serving()),
            shutdown.clone(),
        ));

        let (health, health_service) = tonic_health::server::health_reporter();
        let faults = store.faults();
        let fault = faults.borrow().clone();
        set_health(&health, fault.as_deref()).await;
        background.spawn(report_store_health(
            faults,
            health.clone(),
            shutdown.clone(),
        ));
        let auth = config
            .grpc_tls
            .is_some()
            .then(|| Arc::new(auth::Auth::new(&config.data_dir)));
        let service = pb_server(service::GatewayService {
            store: store.clone(),
            scheduler,
            membership,
            watchers,
            auth,
        });

        info!(arpcp = %advertise, "gateway ready");
        let grpc_shutdown = shutdown.clone();
        let router = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let stopped = async move { grpc_shutdown.cancelled().await };
        let served = match config.grpc_tls.clone() {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        grpc_tls::incoming(grpc, tls, shutdown.clone())
                            .map(|c| c.map(|c| crate::metrics::get().grpc_connection(c))),
                        stopped,
                    )
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(
                        grpc_tls::plain_incoming(grpc)
                            .map(|c| c.map(|c| crate::metrics::get().grpc_connection(c))),
                        stopped,
                    )
                    .await
            }
        };
        shutdown.cancel();
        while background.join_next().await.is_some() {}
        store.close();
        info!("gateway stopped");
        Ok(served?)
    }
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(
    config: GatewayConfig,
    grpc: TcpListener,
    arpcp: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    Gateway::start(config, grpc, arpcp)
        .await?
        .serve(shutdown)
        .await
}

fn pb_server(
    s: service::GatewayService,
) -> crate::pb::gateway_server::GatewayServer<service::GatewayService> {
    crate::pb::gateway_server::GatewayServer::new(s)
}

/// Sets health from the store: NOT_SERVING while it cannot write (Submit would be
/// refused), SERVING while it can.
async fn set_health(health: &tonic_health::server::HealthReporter, fault: Option<&str>) {
    use tonic::server::NamedService;
    type Service = crate::pb::gateway_server::GatewayServer<service::GatewayService>;
    let status = if fault.is_some() {
        tonic_health::ServingStatus::NotServing
    } else {
        tonic_health::ServingStatus::Serving
    };
    for name in ["", Service::NAME] {
        health.set_service_status(name, status).await;
    }
}

/// Keeps health in step with the store as it fails and recovers.
async fn report_store_health(
    mut faults: tokio::sync::watch::Receiver<Option<String>>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = faults.changed() => if changed.is_err() { return },
        }
        let fault = faults.borrow_and_update().clone();
        set_health(&health, fault.as_deref()).await;
    }
}

async fn retention_loop(
    store: GatewayStore,
    watchers: Arc<TaskWatchers>,
    config: GatewayConfig,
    stop: CancellationToken,
) {
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let max_age = config.retention.as_millis() as u64;
        let (count, store) = (config.retention_count, store.clone());
        let started = std::time::Instant::now();
        // A pass that drops a batch reads and writes thousands of records: off the
        // runtime's workers.
        let pass = tokio::task::spawn_blocking(move || {
            store.apply_retention(model::now_ms(), max_age, count)
        })
        .await;
        let took = started.elapsed();
        let full = matches!(pass, Ok(Ok(n)) if n >= store::MAX_RETENTION_BATCH);
        match pass {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                removed = n,
                ms = took.as_millis() as u64,
                "retention dropped finished tasks"
            ),
            Ok(Err(e)) => warn!("retention: {e}"),
            Err(e) => warn!("retention: the pass failed: {e}"),
        }
        watchers.prune();
        pause = took * RETENTION_PAUSE_FACTOR;
        if !full {
            pause = pause.max(RETENTION_INTERVAL);
        }
    }
}
