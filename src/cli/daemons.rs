//! The daemon subcommands: `agent`, `gateway`, and `up` (both, on loopback).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::procedures::{CommandSpec, SpecKind};
use crate::agent::{self, AgentConfig, AgentFlags};
use crate::arpcp::tls::ArpcpTls;
use crate::arpcp::DEFAULT_AGENT_PORT;
use crate::durable;
use crate::gateway::{self, membership::parse_scan, GatewayConfig};

#[derive(clap::Args)]
pub struct AgentCmd {
    /// Address to serve ARPCP on (port 0 picks a free port) [default: 127.0.0.1:7018]
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the agent's task store [default: ./arpcp-agent-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Controller (host:port) for SIGNALs of tasks without reply_to; the agent
    /// also announces itself there.
    #[arg(long)]
    controller: Option<String>,
    /// TOML configuration file (procedures, and any of these flags).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tasks run in parallel [default: number of CPUs]
    #[arg(long)]
    capacity: Option<u32>,
    /// Seconds running tasks get to finish on shutdown [default: 10]
    #[arg(long)]
    grace_secs: Option<f64>,
    /// Seconds a finished task no controller claimed is kept [default: 86400]
    #[arg(long)]
    keep_finished_secs: Option<f64>,
    /// Start even on a damaged store, with what is readable; what was lost is logged.
    /// Without it, a store found damaged at start (durable writes lost, records
    /// unreadable) stops the start with an error.
    #[arg(long)]
    accept_damaged_store: bool,
    /// Speak ARPCP over mutual TLS with the certificates in DIR (ca.pem and
    /// NAME.pem / NAME-key.pem, as `arpcp ca` writes them); only the gateway's
    /// certificate is served.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The name of the agent's certificate in --tls-dir [default: the host name]
    #[arg(long, requires = "tls_dir")]
    tls_name: Option<String>,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// How log lines on stderr are written: text, or one JSON object a line.
    #[arg(long, value_enum, default_value_t = super::LogFormat::Text)]
    pub(super) log_format: super::LogFormat,
}

#[derive(clap::Args)]
pub struct GatewayCmd {
    /// Address of the gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: String,
    /// Address of the ARPCP listener (agents' SIGNALs and announcements).
    #[arg(long, default_value = "127.0.0.1:7019")]
    arpcp: String,
    /// Directory of the gateway's store.
    #[arg(long, default_value = "arpcp-gateway-data")]
    data_dir: PathBuf,
    /// An agent to probe (HOST:PORT); repeatable.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Probe every address of a CIDR range on --scan-port; repeatable.
    #[arg(long)]
    scan: Vec<String>,
    /// Port probed on scanned addresses.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    scan_port: u16,
    /// Milliseconds between echo rounds.
    #[arg(long, default_value_t = 1000)]
    echo_interval_ms: u64,
    /// Echoes an agent may miss in a row before it leaves the cluster.
    #[arg(long, default_value_t = 3)]
    max_misses: u32,
    /// The ARPCP address agents should send SIGNALs to, when not the listener's.
    #[arg(long)]
    advertise: Option<String>,
    /// Seconds finished tasks are kept.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    retention_secs: u64,
    /// Finished tasks kept at most (the oldest go first).
    #[arg(long, default_value_t = 1_000_000)]
    retention_count: usize,
    /// Start even on a damaged store, with what is readable; what was lost is logged.
    /// Without it, a store found damaged at start (durable writes lost, records
    /// unreadable) stops the start with an error.
    #[arg(long)]
    accept_damaged_store: bool,
    /// Speak ARPCP over mutual TLS with the certificates in DIR (ca.pem,
    /// gateway.pem, gateway-key.pem); only agents' certificates are served.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// How log lines on stderr are written: text, or one JSON object a line.
    #[arg(long, value_enum, default_value_t = super::LogFormat::Text)]
    pub(super) log_format: super::LogFormat,
}

#[derive(clap::Args)]
pub struct UpCmd {
    /// Address of the gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: String,
    /// Address of the gateway's ARPCP listener.
    #[arg(long, default_value = "127.0.0.1:7019")]
    arpcp: String,
    /// Address of the agent.
    #[arg(long, default_value = "127.0.0.1:7018")]
    agent_listen: String,
    /// Data of both (gateway/ and agent/ inside).
    #[arg(long, default_value = "arpcp-data")]
    data_dir: PathBuf,
    /// The agent's TOML configuration (configured procedures).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's parallel task slots [default: number of CPUs]
    #[arg(long)]
    capacity: Option<u32>,
    /// Skip the demo task.
    #[arg(long)]
    no_demo: bool,
    /// Start even on a damaged store, with what is readable; what was lost is logged.
    /// Without it, a store found damaged at start (durable writes lost, records
    /// unreadable) stops the start with an error.
    #[arg(long)]
    accept_damaged_store: bool,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// How log lines on stderr are written: text, or one JSON object a line.
    #[arg(long, value_enum, default_value_t = super::LogFormat::Text)]
    pub(super) log_format: super::LogFormat,
}

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Starts the metrics endpoint when `--metrics` asks for it; its address goes into
/// the ready line.
async fn start_metrics(addr: Option<&str>) -> anyhow::Result<Option<(&'static str, String)>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("--metrics: cannot listen on {addr} (expected HOST:PORT, e.g. 127.0.0.1:9464)")
    })?;
    let local = listener.local_addr()?.to_string();
    tokio::spawn(crate::metrics::serve(listener));
    Ok(Some(("metrics", local)))
}

/// The first line on stdout: where this process listens, as JSON.
fn announce_ready(role: &str, addrs: &[(&str, String)]) {
    let mut m = serde_json::Map::new();
    m.insert("role".into(), role.into());
    for (k, v) in addrs {
        m.insert((*k).into(), v.clone().into());
    }
    println!("{}", serde_json::Value::Object(m));
}

/// A token cancelled on SIGTERM or Ctrl-C (SIGINT). A second one ends the process
/// at once, with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), for a
/// user who does not want to wait for running tasks' grace period.
fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let token = CancellationToken::new();
    let t = token.clone();
    let listen = |kind: SignalKind| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for signal {}: {e}", kind.as_raw_value());
            None
        }
    };
    let mut term = listen(SignalKind::terminate());
    let mut int = listen(SignalKind::interrupt());
    async fn next(s: &mut Option<Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = next(&mut int) => libc::SIGINT,
            _ = next(&mut term) => libc::SIGTERM,
        };
        // Cancelled before anything is logged: a log line that cannot be written
        // (stderr a closed or full pipe) must not hold up the stop.
        t.cancel();
        tracing::info!(
            signal = first,
            "shutdown requested (send it again to stop at once)"
        );
        let second = tokio::select! {
            _ = next(&mut int) => libc::SIGINT,
            _ = next(&mut term) => libc::SIGTERM,
        };
        std::process::exit(128 + second);
    });
    token
}

/// The agent opens its store strictly; accepting damage happens before, on its own.
fn accept_agent_store_damage(data_dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    durable::accept_damage("task store", &data_dir.join(durable::AGENT_STORE))?;
    Ok(())
}

pub async fn agent(a: AgentCmd) -> anyhow::Result<()> {
    let config = AgentConfig::resolve(AgentFlags {
        listen: a.listen,
        data_dir: a.data_dir,
        controller: a.controller,
        config: a.config,
        capacity: a.capacity,
        grace_secs: a.grace_secs,
        keep_finished_secs: a.keep_finished_secs,
    })?;
    let mut config = config;
    if let Some(dir) = &a.tls_dir {
        let name = a.tls_name.clone().unwrap_or_else(|| {
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        config.tls = Some(ArpcpTls::load(dir, &name).context("--tls-dir")?);
    }
    let listener = bind(&config.listen.to_string()).await?;
    let addr = listener.local_addr()?.to_string();
    if a.accept_damaged_store {
        accept_agent_store_damage(&config.data_dir)?;
    }
    let metrics = start_metrics(a.metrics.as_deref()).await?;
    let agent = agent::Agent::start(config, listener).await?;
    let addrs: Vec<_> = [("arpcp", addr)].into_iter().chain(metrics).collect();
    announce_ready("agent", &addrs);
    agent.serve(shutdown_on_signal()).await?;
    Ok(())
}

fn gateway_config(g: &GatewayCmd) -> anyhow::Result<GatewayConfig> {
    if g.echo_interval_ms == 0 {
        anyhow::bail!("--echo-interval-ms must be at least 1");
    }
    let scan = g
        .scan
        .iter()
        .map(|c| parse_scan(c).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let tls = g
        .tls_dir
        .as_deref()
        .map(|dir| ArpcpTls::load(dir, crate::tls::ca::DEFAULT_GATEWAY_NAME))
        .transpose()
        .context("--tls-dir")?;
    Ok(GatewayConfig {
        data_dir: g.data_dir.clone(),
        advertise: g.advertise.clone(),
        agents: g.agents.clone(),
        scan,
        scan_port: g.scan_port,
        echo_interval: Duration::from_millis(g.echo_interval_ms),
        max_misses: g.max_misses.max(1),
        retention: Duration::from_secs(g.retention_secs),
        retention_count: g.retention_count,
        accept_damaged_store: g.accept_damaged_store,
        grpc_tls: match (&tls, g.tls_dir.as_deref()) {
            (Some(tls), Some(dir)) => Some(
                tls.grpc_serving(dir, crate::tls::ca::DEFAULT_GATEWAY_NAME)
                    .context("--tls-dir")?,
            ),
            _ => None,
        },
        tls,
    })
}

pub async fn gateway(g: GatewayCmd) -> anyhow::Result<()> {
    let config = gateway_config(&g)?;
    let grpc = bind(&g.grpc).await?;
    let arpcp = bind(&g.arpcp).await?;
    let metrics = start_metrics(g.metrics.as_deref()).await?;
    let addrs: Vec<_> = [
        ("grpc", grpc.local_addr()?.to_string()),
        ("arpcp", arpcp.local_addr()?.to_string()),
    ]
    .into_iter()
    .chain(metrics)
    .collect();
    let gateway = gateway::Gateway::start(config, grpc, arpcp).await?;
    announce_ready("gateway", &addrs);
    gateway.serve(shutdown_on_signal()).await?;
    Ok(())
}

pub async fn up(u: UpCmd) -> anyhow::Result<()> {
    let grpc = bind(&u.grpc).await?;
    let arpcp = bind(&u.arpcp).await?;
    let agent_listener = bind(&u.agent_listen).await?;
    let grpc_addr = grpc.local_addr()?;
    let arpcp_addr = arpcp.local_addr()?.to_string();
    let agent_addr = agent_listener.local_addr()?.to_string();
    let metrics = start_metrics(u.metrics.as_deref()).await?;
    let agent_config = AgentConfig::resolve(AgentFlags {
        listen: Some(agent_addr.clone()),
        data_dir: Some(u.data_dir.join("agent")),
        controller: Some(arpcp_addr.clone()),
        config: u.config,
        capacity: u.capacity,
        grace_secs: None,
        keep_finished_secs: None,
    })?;
    let mut agent_config = agent_config;
    let with_model = offer_example_model(&u.data_dir, &mut agent_config.procedures);
    let gateway_config = GatewayConfig {
        data_dir: u.data_dir.join("gateway"),
        advertise: None,
        agents: vec![agent_addr.clone()],
        scan: vec![],
        scan_port: DEFAULT_AGENT_PORT,
        echo_interval: Duration::from_secs(1),
        max_misses: 3,
        retention: Duration::from_secs(7 * 24 * 3600),
        retention_count: 1_000_000,
        accept_damaged_store: u.accept_damaged_store,
        tls: None,
        grpc_tls: None,
    };
    if u.accept_damaged_store {
        accept_agent_store_damage(&agent_config.data_dir)?;
    }
    let agent = agent::Agent::start(agent_config, agent_listener)
        .await
        .context("agent")?;
    let gateway = gateway::Gateway::start(gateway_config, grpc, arpcp)
        .await
        .context("gateway")?;
    let addrs: Vec<_> = [
        ("grpc", grpc_addr.to_string()),
        ("arpcp", arpcp_addr),
        ("agent", agent_addr),
    ]
    .into_iter()
    .chain(metrics)
    .collect();
    announce_ready("up", &addrs);
    let shutdown = shutdown_on_signal();
    let mut both = tokio::task::JoinSet::new();
    let stop = shutdown.clone();
    both.spawn(async move { agent.serve(stop).await.context("agent") });
    let stop = shutdown.clone();
    both.spawn(async move { gateway.serve(stop).await.context("gateway") });
    if !u.no_demo {
        let endpoint = format!("http://{grpc_addr}");
        tokio::spawn(async move {
            if let Err(e) = super::commands::demo(&endpoint, with_model).await {
                tracing::warn!("demo task failed: {e:#}");
            }
        });
    }
    // Either one stopping (by a signal or a failure) stops the other.
    let mut outcome = Ok(());
    while let Some(done) = both.join_next().await {
        shutdown.cancel();
        if let (Ok(()), Err(e)) = (&outcome, done?) {
            outcome = Err(e);
        }
    }
    outcome
}

/// The example Opal model, built into the binary so that `arpcp up` can offer it
/// wherever it runs (`examples/opal/`).
const EXAMPLE_MODEL: &str = include_str!("../../examples/opal/trajectory.py");
const EXAMPLE_HELPER: &str = include_str!("../../examples/opal/opal.py");
/// The name `arpcp up` offers the example model under.
pub const EXAMPLE_MODEL_NAME: &str = "trajectory";

/// Offers the example model `trajectory` on the local agent when `python3` runs
/// here and no configured procedure has its name: writes it into the data
/// directory and declares it. Returns whether it did.
fn offer_example_model(data_dir: &std::path::Path, procedures: &mut Vec<CommandSpec>) -> bool {
    if procedures.iter().any(|p| p.name == EXAMPLE_MODEL_NAME) {
        return false;
    }
    let python = std::process::Command::new("python3")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !python {
        return false;
    }
    let dir = data_dir.join("models");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("trajectory.py"), EXAMPLE_MODEL))
        .and_then(|()| std::fs::write(dir.join("opal.py"), EXAMPLE_HELPER));
    if let Err(e) = written {
        tracing::warn!(
            "not offering the example model: cannot write it to {}: {e}",
            dir.display()
        );
        return false;
    }
    procedures.push(CommandSpec {
        name: EXAMPLE_MODEL_NAME.into(),
        kind: SpecKind::Opal,
        command: vec![
            "python3".into(),
            dir.join("trajectory.py").to_string_lossy().into_owned(),
        ],
        timeout_secs: Some(600.0),
        poll_ms: Some(200),
    });
    true
}
