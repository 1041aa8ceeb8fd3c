//! The daemon subcommands: `agent`, `gateway`, and `up` (both, on loopback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::exposure::{self, Listening};
use super::gateway_file::GatewayFile;
use super::output::outln;
use crate::agent::procedures::{CommandSpec, SpecKind};
use crate::agent::{self, AgentConfig, AgentFlags};
use crate::arpcp::tls::ArpcpTls;
use crate::arpcp::DEFAULT_AGENT_PORT;
use crate::durable;
use crate::duration;
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
    /// How long running tasks get to finish on shutdown (10s, 2m) [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    grace: Option<Duration>,
    /// The older spelling of --grace, in seconds.
    #[arg(long, hide = true, conflicts_with = "grace")]
    grace_secs: Option<f64>,
    /// How long a finished task no controller claimed is kept [default: 1d]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    keep_finished: Option<Duration>,
    /// The older spelling of --keep-finished, in seconds.
    #[arg(long, hide = true, conflicts_with = "keep_finished")]
    keep_finished_secs: Option<f64>,
    /// sled's page cache for the task store (8MiB, 64MiB, 1GiB) [default: 8MiB]
    #[arg(long, value_name = "SIZE", value_parser = durable::parse_cache_bytes)]
    store_cache: Option<u64>,
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
    /// Serve plaintext, unauthenticated ARPCP on a non-loopback --listen address
    /// (refused without it or --tls-dir); logged as a warning at every start.
    #[arg(long, conflicts_with = "tls_dir")]
    insecure: bool,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// How log lines on stderr are written: text, or one JSON object a line.
    #[arg(long, value_enum, default_value_t = super::LogFormat::Text)]
    pub(super) log_format: super::LogFormat,
}

#[derive(clap::Args)]
pub struct GatewayCmd {
    /// TOML configuration file: any of these flags' long names as keys (grpc,
    /// data_dir, agents, echo_interval = "1s", …); flags win over it, and
    /// --agent/--scan add to its lists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the gRPC API [default: 127.0.0.1:50051]
    #[arg(long)]
    grpc: Option<String>,
    /// Address of the ARPCP listener (agents' SIGNALs and announcements)
    /// [default: 127.0.0.1:7019]
    #[arg(long)]
    arpcp: Option<String>,
    /// Directory of the gateway's store [default: ./arpcp-gateway-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// An agent to probe (HOST:PORT); repeatable.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Probe every address of a CIDR range on --scan-port; repeatable.
    #[arg(long)]
    scan: Vec<String>,
    /// Port probed on scanned addresses [default: 7018]
    #[arg(long)]
    scan_port: Option<u16>,
    /// Time between echo rounds (200ms, 1s) [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    echo_interval: Option<Duration>,
    /// The older spelling of --echo-interval, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "echo_interval")]
    echo_interval_ms: Option<u64>,
    /// Echoes an agent may miss in a row before it leaves the cluster [default: 3]
    #[arg(long)]
    max_misses: Option<u32>,
    /// The ARPCP address agents should send SIGNALs to, when not the listener's.
    #[arg(long)]
    advertise: Option<String>,
    /// How long finished tasks are kept (12h, 7d) [default: 7d]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    retention: Option<Duration>,
    /// The older spelling of --retention, in seconds.
    #[arg(long, hide = true, conflicts_with = "retention")]
    retention_secs: Option<u64>,
    /// Finished tasks kept at most (the oldest go first) [default: 1000000]
    #[arg(long)]
    retention_count: Option<usize>,
    /// sled's page cache for the task store (4MiB, 64MiB, 1GiB) [default: 4MiB]
    #[arg(long, value_name = "SIZE", value_parser = durable::parse_cache_bytes)]
    store_cache: Option<u64>,
    /// Start even on a damaged store, with what is readable; what was lost is logged.
    /// Without it, a store found damaged at start (durable writes lost, records
    /// unreadable) stops the start with an error.
    #[arg(long)]
    accept_damaged_store: bool,
    /// Speak ARPCP over mutual TLS with the certificates in DIR (ca.pem,
    /// gateway.pem, gateway-key.pem); only agents' certificates are served.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Serve plaintext, unauthenticated gRPC and ARPCP on non-loopback addresses
    /// (refused without it or --tls-dir); logged as a warning at every start.
    #[arg(long, conflicts_with = "tls_dir")]
    insecure: bool,
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
    /// Serve plaintext, unauthenticated gRPC and ARPCP on non-loopback addresses
    /// (refused without it); logged as a warning at every start.
    #[arg(long)]
    insecure: bool,
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

/// Binds the address `flag` gave; a port another process holds says which flag
/// to change.
async fn bind(addr: &str, flag: &str) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "cannot listen on {addr} ({flag}): the address is in use by another process \
             (another arpcp?): stop it, or pick another address with {flag} HOST:PORT \
             (port 0: any free port)"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr} ({flag})")),
    }
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
    outln!("{}", serde_json::Value::Object(m));
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
    durable::create_data_dir(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    durable::accept_damage("task store", &data_dir.join(durable::AGENT_STORE))?;
    Ok(())
}

/// What a stranger reaching each listener could do, for the refusal and the warning.
const AGENT_EXPOSES: &str = "run this agent's procedures, read and stop its tasks";
const GRPC_EXPOSES: &str = "submit, read and cancel tasks and blacklist agents";
const CONTROLLER_EXPOSES: &str = "register agents and report tasks' progress and results";

/// Raises the soft limit on open files to the hard one. A gateway holds two
/// descriptors per agent (echoes, exchanges) besides its clients, and an agent one
/// per connection and task: a common soft limit of 1,024 would stop a gateway near
/// 500 agents, while the hard limit is the administrator's actual choice.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let was = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::debug!(from = was, to = lim.rlim_max, "raised the open files limit");
    } else {
        tracing::warn!(
            limit = was,
            "cannot raise the open files limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub async fn agent(a: AgentCmd) -> anyhow::Result<()> {
    raise_open_files_limit();
    let listen_source = match (&a.listen, &a.config) {
        (None, Some(file)) => format!("listen in {}", file.display()),
        _ => "--listen".to_string(),
    };
    let config = AgentConfig::resolve(AgentFlags {
        listen: a.listen,
        data_dir: a.data_dir,
        controller: a.controller,
        config: a.config,
        capacity: a.capacity,
        grace_secs: a.grace.map(|d| d.as_secs_f64()).or(a.grace_secs),
        keep_finished_secs: a
            .keep_finished
            .map(|d| d.as_secs_f64())
            .or(a.keep_finished_secs),
        store_cache_bytes: a.store_cache,
        tls_dir: a.tls_dir,
        tls_name: a.tls_name,
        metrics: a.metrics,
    })?;
    let mut config = config;
    if a.insecure && config.tls_dir.is_some() {
        anyhow::bail!("--insecure and tls_dir (in the --config file) exclude each other");
    }
    if config.tls_dir.is_none() && config.tls_name.is_some() {
        anyhow::bail!("tls_name (in the --config file) needs tls_dir");
    }
    if let Some(dir) = &config.tls_dir {
        let name = config.tls_name.clone().unwrap_or_else(|| {
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        config.tls = Some(ArpcpTls::load(dir, &name).context("--tls-dir")?);
    }
    let listener = bind(&config.listen.to_string(), &listen_source).await?;
    exposure::check(
        &[Listening {
            source: listen_source,
            addr: listener.local_addr()?,
            exposes: AGENT_EXPOSES,
        }],
        config.tls.is_some(),
        a.insecure,
    )?;
    let addr = listener.local_addr()?.to_string();
    if a.accept_damaged_store {
        accept_agent_store_damage(&config.data_dir)?;
    }
    let metrics = start_metrics(config.metrics.as_deref()).await?;
    let agent = agent::Agent::start(config, listener).await?;
    let addrs: Vec<_> = [("arpcp", addr)].into_iter().chain(metrics).collect();
    announce_ready("agent", &addrs);
    agent.serve(shutdown_on_signal()).await?;
    Ok(())
}

/// A gateway's settings: flags over the `--config` file over the defaults.
struct GatewaySettings {
    /// The address and where it came from (`--grpc`, or `grpc in FILE`), for errors.
    grpc: (String, String),
    arpcp: (String, String),
    metrics: Option<String>,
    config: GatewayConfig,
}

fn gateway_config(g: GatewayCmd) -> anyhow::Result<GatewaySettings> {
    let file = match &g.config {
        Some(path) => GatewayFile::load(path)?,
        None => GatewayFile::default(),
    };
    let echo_interval = match (g.echo_interval, g.echo_interval_ms) {
        (Some(d), _) => Some(("--echo-interval", d)),
        (None, Some(ms)) => Some(("--echo-interval-ms", Duration::from_millis(ms))),
        (None, None) => file.echo_interval.map(|d| ("echo_interval", d)),
    };
    let echo_interval = match echo_interval {
        Some((from, d)) if d < MIN_ECHO_INTERVAL => anyhow::bail!(
            "{from}: must be at least {}, got {}",
            humantime::format_duration(MIN_ECHO_INTERVAL),
            humantime::format_duration(d)
        ),
        Some((_, d)) => d,
        None => DEFAULT_ECHO_INTERVAL,
    };
    let retention = g
        .retention
        .or(g.retention_secs.map(Duration::from_secs))
        .or(file.retention)
        .unwrap_or(DEFAULT_RETENTION);
    let mut agents = file.agents.unwrap_or_default();
    for a in &agents {
        check_host_port("agents (in the --config file)", a)?;
    }
    for a in &g.agents {
        check_host_port("--agent", a)?;
    }
    agents.extend(g.agents);
    let advertise = match (g.advertise, file.advertise) {
        (Some(a), _) => Some(("--advertise", a)),
        (None, Some(a)) => Some(("advertise (in the --config file)", a)),
        (None, None) => None,
    };
    if let Some((from, a)) = &advertise {
        check_host_port(from, a)?;
    }
    let advertise = advertise.map(|(_, a)| a);
    let max_misses = match (g.max_misses, file.max_misses) {
        (Some(0), _) => Some("--max-misses"),
        (None, Some(0)) => Some("max_misses (in the --config file)"),
        _ => None,
    };
    if let Some(from) = max_misses {
        anyhow::bail!("{from}: must be at least 1 (echoes an agent may miss in a row before it leaves), got 0");
    }
    let max_misses = g.max_misses.or(file.max_misses).unwrap_or(3);
    let mut scans = file.scan.unwrap_or_default();
    scans.extend(g.scan);
    let scan = scans
        .iter()
        .map(|c| parse_scan(c).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let tls_dir = g.tls_dir.or(file.tls_dir);
    let tls = tls_dir
        .as_deref()
        .map(|dir| ArpcpTls::load(dir, crate::tls::ca::DEFAULT_GATEWAY_NAME))
        .transpose()
        .context("--tls-dir")?;
    if g.insecure && tls.is_some() {
        anyhow::bail!("--insecure and tls_dir (in the --config file) exclude each other");
    }
    let config = GatewayConfig {
        data_dir: g
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("arpcp-gateway-data")),
        advertise,
        agents,
        scan,
        scan_port: g.scan_port.or(file.scan_port).unwrap_or(DEFAULT_AGENT_PORT),
        echo_interval,
        max_misses,
        retention,
        retention_count: g
            .retention_count
            .or(file.retention_count)
            .unwrap_or(DEFAULT_RETENTION_COUNT),
        store_cache_bytes: g
            .store_cache
            .or(file.store_cache)
            .unwrap_or(gateway::DEFAULT_CACHE_BYTES),
        accept_damaged_store: g.accept_damaged_store,
        grpc_tls: match (&tls, tls_dir.as_deref()) {
            (Some(tls), Some(dir)) => Some(
                tls.grpc_serving(dir, crate::tls::ca::DEFAULT_GATEWAY_NAME)
                    .context("--tls-dir")?,
            ),
            _ => None,
        },
        tls,
    };
    Ok(GatewaySettings {
        metrics: g.metrics.or(file.metrics),
        grpc: setting(
            "--grpc",
            g.grpc,
            "grpc",
            file.grpc,
            g.config.as_deref(),
            DEFAULT_GRPC,
        ),
        arpcp: setting(
            "--arpcp",
            g.arpcp,
            "arpcp",
            file.arpcp,
            g.config.as_deref(),
            DEFAULT_CONTROLLER,
        ),
        config,
    })
}

/// An address the gateway is to reach (an agent's, or its own as agents reach it):
/// `HOST:PORT`, a port from 1 to 65535, a host without spaces (`[…]` for IPv6).
/// Checked at start: a typo there would otherwise only show as echoes that fail,
/// logged at debug level, for ever.
fn check_host_port(flag: &str, value: &str) -> anyhow::Result<()> {
    let bad =
        |why: &str| anyhow::anyhow!("{flag} {value:?}: {why}; expected HOST:PORT (10.0.0.5:7018)");
    let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("the port must be a number from 1 to 65535")),
        Ok(_) => {}
    }
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(bad("the host holds a space or a '/'"));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return Err(bad("an IPv6 host goes in brackets ([::1]:7018)"));
    }
    Ok(())
}

/// A listener's address from its flag, else the file, else the default; with where
/// it came from, as errors name it.
fn setting(
    flag: &str,
    from_flag: Option<String>,
    key: &str,
    from_file: Option<String>,
    file: Option<&std::path::Path>,
    default: &str,
) -> (String, String) {
    match (from_flag, from_file, file) {
        (Some(v), _, _) => (v, flag.to_string()),
        (None, Some(v), Some(f)) => (v, format!("{key} in {}", f.display())),
        _ => (default.to_string(), flag.to_string()),
    }
}

const DEFAULT_GRPC: &str = "127.0.0.1:50051";
const DEFAULT_CONTROLLER: &str = "127.0.0.1:7019";
const DEFAULT_ECHO_INTERVAL: Duration = Duration::from_secs(1);
/// Below a millisecond the echo rounds would only spin.
const MIN_ECHO_INTERVAL: Duration = Duration::from_millis(1);
const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_RETENTION_COUNT: usize = 1_000_000;

pub async fn gateway(g: GatewayCmd) -> anyhow::Result<()> {
    raise_open_files_limit();
    let insecure = g.insecure;
    let GatewaySettings {
        grpc,
        arpcp,
        metrics: metrics_addr,
        config,
    } = gateway_config(g)?;
    let (grpc, grpc_source) = grpc;
    let (arpcp, arpcp_source) = arpcp;
    let grpc = bind(&grpc, &grpc_source).await?;
    let arpcp = bind(&arpcp, &arpcp_source).await?;
    let mut listeners = gateway_listeners(grpc.local_addr()?, arpcp.local_addr()?);
    listeners[0].source = grpc_source;
    listeners[1].source = arpcp_source;
    exposure::check(&listeners, config.tls.is_some(), insecure)?;
    let metrics = start_metrics(metrics_addr.as_deref()).await?;
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

/// The gateway's two listeners, by their flags.
fn gateway_listeners(grpc: SocketAddr, arpcp: SocketAddr) -> Vec<Listening> {
    vec![
        Listening {
            source: "--grpc".into(),
            addr: grpc,
            exposes: GRPC_EXPOSES,
        },
        Listening {
            source: "--arpcp".into(),
            addr: arpcp,
            exposes: CONTROLLER_EXPOSES,
        },
    ]
}

pub async fn up(u: UpCmd) -> anyhow::Result<()> {
    raise_open_files_limit();
    let grpc = bind(&u.grpc, "--grpc").await?;
    let arpcp = bind(&u.arpcp, "--arpcp").await?;
    let agent_listener = bind(&u.agent_listen, "--agent-listen").await?;
    let mut listeners = gateway_listeners(grpc.local_addr()?, arpcp.local_addr()?);
    listeners.push(Listening {
        source: "--agent-listen".into(),
        addr: agent_listener.local_addr()?,
        exposes: AGENT_EXPOSES,
    });
    exposure::check(&listeners, false, u.insecure)?;
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
        store_cache_bytes: None,
        tls_dir: None,
        tls_name: None,
        metrics: None,
    })?;
    if agent_config.tls_dir.is_some() || agent_config.metrics.is_some() {
        anyhow::bail!(
            "tls_dir and metrics in the --config file are the agent's (`arpcp agent`); `arpcp up` runs plaintext on loopback and takes --metrics itself"
        );
    }
    let mut agent_config = agent_config;
    let with_model = offer_example_model(&u.data_dir, &mut agent_config.procedures);
    let gateway_config = GatewayConfig {
        data_dir: u.data_dir.join("gateway"),
        advertise: None,
        agents: vec![agent_addr.clone()],
        scan: vec![],
        scan_port: DEFAULT_AGENT_PORT,
        echo_interval: DEFAULT_ECHO_INTERVAL,
        max_misses: 3,
        retention: DEFAULT_RETENTION,
        retention_count: DEFAULT_RETENTION_COUNT,
        store_cache_bytes: gateway::DEFAULT_CACHE_BYTES,
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
    // A signal stops the agent only: its grace period lets running tasks end, and
    // their results reach the gateway, which stops once the agent has.
    let shutdown = shutdown_on_signal();
    let stop_gateway = CancellationToken::new();
    let mut both = tokio::task::JoinSet::new();
    let stop = shutdown.clone();
    both.spawn(async move { agent.serve(stop).await.context("agent") });
    let stop = stop_gateway.clone();
    both.spawn(async move { gateway.serve(stop).await.context("gateway") });
    if !u.no_demo {
        let endpoint = format!("http://{grpc_addr}");
        tokio::spawn(async move {
            if let Err(e) = super::commands::demo(&endpoint, with_model).await {
                tracing::warn!("demo task failed: {e:#}");
            }
        });
    }
    // Either one stopping (the agent by a signal, or either by a failure) stops the
    // other.
    let mut outcome = Ok(());
    while let Some(done) = both.join_next().await {
        shutdown.cancel();
        stop_gateway.cancel();
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
