//! The command line: one binary with a subcommand per role. Each daemon prints one
//! machine-readable JSON line on stdout once it listens (`{"role":…,"arpcp":…}`), so
//! scripts and tests can bind to port 0 and learn the address; logs go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentConfig, AgentFlags};

#[derive(Parser)]
#[command(
    name = "arpcp",
    version,
    about = "Run remote procedures on a cluster of agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent: serve ARPCP and run procedures for the controller.
    Agent(AgentCmd),
}

#[derive(clap::Args)]
struct AgentCmd {
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
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(a) => {
            let config = AgentConfig::resolve(AgentFlags {
                listen: a.listen,
                data_dir: a.data_dir,
                controller: a.controller,
                config: a.config,
                capacity: a.capacity,
                grace_secs: a.grace_secs,
            })?;
            let listener = bind(config.listen).await?;
            announce_ready("agent", &[("arpcp", listener.local_addr()?.to_string())]);
            agent::run(config, listener, shutdown_on_signal()).await?;
            Ok(())
        }
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
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

/// A token cancelled on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}
