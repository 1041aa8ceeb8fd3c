//! The command line: one binary with a subcommand per role. Daemons print one
//! machine-readable JSON line on stdout once they listen (`{"role":…,"grpc":…}`),
//! so scripts and tests can bind to port 0 and learn the address; logs go to stderr.

mod ca;
mod commands;
mod completions;
mod daemons;
mod exposure;
mod gateway_file;
mod output;
mod token;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "arpcp",
    version,
    about = "Run remote procedures on a cluster of agents"
)]
struct Cli {
    /// The client flags (`--gateway`, `--json`, TLS) are global: they go before or
    /// after the subcommand.
    #[command(flatten)]
    common: commands::Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent: serve ARPCP and run procedures for the controller.
    Agent(daemons::AgentCmd),
    /// Run the gateway: the gRPC API and the cluster's controller.
    Gateway(daemons::GatewayCmd),
    /// Start a gateway and one local agent (data in ./arpcp-data) and run a demo task.
    Up(daemons::UpCmd),
    /// Submit a task.
    Submit(commands::SubmitCmd),
    /// Show how to call a procedure: its kind and an Opal model's parameters.
    Describe(commands::DescribeCmd),
    /// Show a task (and its result once it ended).
    Result(commands::ResultCmd),
    /// Follow a task's progress until it ends.
    Watch(commands::WatchCmd),
    /// Cancel a task.
    Cancel(commands::CancelCmd),
    /// List tasks.
    Tasks(commands::TasksCmd),
    /// List the cluster's agents.
    Agents(commands::AgentsCmd),
    /// List the procedures the alive agents offer.
    Procedures(commands::ProceduresCmd),
    /// Add an agent to the blacklist, or remove it.
    Blacklist(commands::BlacklistCmd),
    /// Make the cluster CA and issue certificates (used by ARPCP with `--tls-dir`).
    Ca(ca::CaCmd),
    /// Make, list and revoke bearer tokens of the gRPC API (on the gateway's host).
    Token(token::TokenCmd),
    /// Print a shell completion script (bash, zsh or fish).
    Completions(completions::CompletionsCmd),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli.command);
    let workers = if is_daemon(&cli.command) {
        daemon_workers()
    } else {
        1
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .on_thread_park(crate::arpcp::codec::release_freed_buffers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&format!("error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(_) if output::stdout_failed() => ExitCode::FAILURE,
        Ok(code) => code,
        Err(e) => {
            report(&format!("error: {}", error_chain(&e)));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(USAGE_EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The exit status of a mistake in the command line, as clap gives for the ones
/// it finds itself; 1 is for everything else that went wrong.
pub const USAGE_EXIT: u8 = 2;

/// A mistake in the command line that is found after clap parsed it (a flag's
/// value that does not fit, or flags that do not go together): exits with
/// `USAGE_EXIT`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as the commands return errors.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

fn is_daemon(c: &Command) -> bool {
    matches!(c, Command::Agent(_) | Command::Gateway(_) | Command::Up(_))
}

/// How a daemon writes its log lines (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object a line, the event's fields at the top level.
    Json,
}

/// Libraries whose debug output is about HTTP/2 frames and connection plumbing:
/// kept at `warn` unless the user's filter names them (`RUST_LOG=debug,h2=debug`).
pub const QUIET_TARGETS: [&str; 5] = ["h2", "hyper", "hyper_util", "tower", "axum"];

/// The log filter: the user's `RUST_LOG` (or the command's default level), plus
/// `warn` for each of `QUIET_TARGETS` the user's filter does not name.
fn log_directives(user: Option<&str>, default: &str) -> String {
    let base = user.map(str::trim).filter(|u| !u.is_empty());
    let mut out = base.unwrap_or(default).to_string();
    let named = |target: &str| {
        base.is_some_and(|u| {
            u.split(',').any(|d| {
                let name = d.split(['=', '[']).next().unwrap_or("").trim();
                name == target || name.starts_with(&format!("{target}::"))
            })
        })
    };
    for t in QUIET_TARGETS {
        if !named(t) {
            out.push_str(&format!(",{t}=warn"));
        }
    }
    out
}

/// Logs go to stderr: a daemon's format from `--log-format`, colour only when
/// stderr is a terminal (a file or a pipe gets no escape codes).
fn init_logs(c: &Command) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = default_log(c);
    let user = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(log_directives(user.as_deref(), default))
        .unwrap_or_else(|_| EnvFilter::new(log_directives(None, default)));
    let format = match c {
        Command::Agent(a) => a.log_format,
        Command::Gateway(g) => g.log_format,
        Command::Up(u) => u.log_format,
        _ => LogFormat::Text,
    };
    let logs = tracing_subscriber::fmt()
        .with_writer(|| LossyStderr)
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// stderr for logs, dropping what cannot be written. A daemon's stderr may be a pipe
/// whose reader went away (`arpcp up 2>&1 | tee log`, then Ctrl-C): a failed write
/// must cost the line, not the task that logged it (`eprintln!` panics on it).
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line on stderr, if it can be written.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The error and its causes, skipping a cause its parent's text already shows.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Worker threads of a daemon's runtime: `ARPCP_WORKER_THREADS` when set (1 to
/// `MAX_DAEMON_WORKERS`; for measuring and for hosts shared with other work), else at
/// least `MIN_DAEMON_WORKERS`, more on machines with more CPUs.
fn daemon_workers() -> usize {
    let default = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .max(MIN_DAEMON_WORKERS);
    let Ok(text) = std::env::var(WORKERS_ENV) else {
        return default;
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_DAEMON_WORKERS).contains(&n) => n,
        _ => {
            tracing::warn!(
                "{WORKERS_ENV}={text:?} ignored: expected a number of threads from 1 to \
                 {MAX_DAEMON_WORKERS}; running {default}"
            );
            default
        }
    }
}

/// Overrides the number of a daemon's runtime workers.
pub const WORKERS_ENV: &str = "ARPCP_WORKER_THREADS";
/// The most workers `ARPCP_WORKER_THREADS` may ask for.
pub const MAX_DAEMON_WORKERS: usize = 256;

/// The stores' sled calls are synchronous and at times wait for sled's I/O buffers,
/// so a daemon never runs on one worker alone. Four workers on 2 CPUs once measured
/// 10–20% more throughput than two; since echoes, waits and allocations got cheaper
/// two measure the same or better (3 alternating pairs: 4,532 against 4,416 tasks/s,
/// sync p50 802 against 813 µs) with 4 MiB less per process (`docs/benchmarks.md`).
const MIN_DAEMON_WORKERS: usize = 2;

/// Daemons log at info; client commands only warn, so their output stays clean.
fn default_log(c: &Command) -> &'static str {
    match c {
        Command::Agent(_) | Command::Gateway(_) | Command::Up(_) => "info",
        _ => "warn",
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(c) => daemons::agent(c).await.map(|()| ExitCode::SUCCESS),
        Command::Gateway(c) => daemons::gateway(c).await.map(|()| ExitCode::SUCCESS),
        Command::Up(c) => daemons::up(c).await.map(|()| ExitCode::SUCCESS),
        Command::Submit(c) => commands::submit(c, &cli.common).await,
        Command::Describe(c) => commands::describe(c, &cli.common).await,
        Command::Result(c) => commands::result(c, &cli.common).await,
        Command::Watch(c) => commands::watch(c, &cli.common).await,
        Command::Cancel(c) => commands::cancel(c, &cli.common).await,
        Command::Tasks(c) => commands::tasks(c, &cli.common).await,
        Command::Agents(_) => commands::agents(&cli.common).await,
        Command::Procedures(_) => commands::procedures(&cli.common).await,
        Command::Blacklist(c) => commands::blacklist(c, &cli.common).await,
        Command::Ca(c) => ca::run(c).map(|()| ExitCode::SUCCESS),
        Command::Token(c) => token::run(c).map(|()| ExitCode::SUCCESS),
        Command::Completions(c) => {
            completions::print::<Cli>(c);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod log_tests {
    use super::log_directives;

    #[test]
    fn http_internals_are_quiet_unless_the_filter_names_them() {
        assert_eq!(
            log_directives(Some("debug"), "info"),
            "debug,h2=warn,hyper=warn,hyper_util=warn,tower=warn,axum=warn"
        );
        assert_eq!(
            log_directives(Some("debug,h2=debug"), "info"),
            "debug,h2=debug,hyper=warn,hyper_util=warn,tower=warn,axum=warn"
        );
        assert_eq!(
            log_directives(Some("hyper::proto[conn]=trace"), "info"),
            "hyper::proto[conn]=trace,h2=warn,hyper_util=warn,tower=warn,axum=warn"
        );
        assert_eq!(
            log_directives(None, "warn"),
            "warn,h2=warn,hyper=warn,hyper_util=warn,tower=warn,axum=warn"
        );
    }
}
