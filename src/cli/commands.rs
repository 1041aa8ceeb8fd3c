//! Client commands: talk gRPC to a gateway and show the answers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::output::{self, agent_json, kind_name, outln, short, status_name, table, task_json};
use super::usage;
use crate::pb;
use crate::pb::gateway_client::GatewayClient;

#[derive(clap::Args, Clone)]
#[command(next_help_heading = "Client options")]
pub struct Common {
    /// The gateway's gRPC address.
    #[arg(
        long,
        env = "ARPCP_GATEWAY",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    gateway: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The cluster CA (ca.pem): connect over TLS and trust only gateways it signed.
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// A client certificate of the cluster CA to authenticate with (needs --ca).
    #[arg(long, value_name = "FILE", global = true)]
    cert: Option<PathBuf>,
    /// The key of --cert [default: NAME-key.pem beside NAME.pem, as `arpcp ca issue` writes it]
    #[arg(long, value_name = "FILE", global = true)]
    key: Option<PathBuf>,
    /// A bearer token to authenticate with (`arpcp token create`; needs --ca).
    #[arg(long, env = "ARPCP_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(clap::Args)]
pub struct SubmitCmd {
    /// Procedure to run (see `arpcp procedures`).
    procedure: String,
    /// Positional arguments; each is read as JSON when it parses (2, -3, "x",
    /// [1,2]), otherwise taken as a string.
    #[arg(allow_negative_numbers = true)]
    args: Vec<String>,
    /// A named argument NAME=VALUE (VALUE read like ARGS); repeatable.
    #[arg(long = "kw", value_name = "NAME=VALUE")]
    kwargs: Vec<String>,
    /// An Opal model's parameter SECTION.NAME=VALUE (main.x=20,
    /// algo.genetic.method=last), typed by the model's schema; repeatable.
    #[arg(long = "param", value_name = "PATH=VALUE")]
    params: Vec<String>,
    /// Run on this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Wait for the task to end and show its result (the task id goes to stderr
    /// first; a progress bar on a terminal). Ctrl-C stops waiting, not the task.
    #[arg(long)]
    wait: bool,
    /// Run synchronously (ARPCP TASK): the answer carries the result.
    #[arg(long)]
    sync: bool,
    /// With --wait or --sync: how long to wait for the result (30s, 5m, or plain
    /// seconds). With --wait the task goes on after it (exit 124; Ctrl-C: 130);
    /// with --sync the gateway gives up on it.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    timeout: Option<Duration>,
}

#[derive(clap::Args)]
pub struct ResultCmd {
    task_id: String,
    /// Wait until the task ends.
    #[arg(long)]
    wait: bool,
    /// Print an Opal result table as CSV.
    #[arg(long)]
    csv: bool,
}

#[derive(clap::Args)]
pub struct WatchCmd {
    task_id: String,
}

#[derive(clap::Args)]
pub struct CancelCmd {
    task_id: String,
}

#[derive(clap::Args)]
pub struct TasksCmd {
    /// Only tasks in this status.
    #[arg(long, value_parser = STATUS_NAMES)]
    status: Option<String>,
    /// Only tasks placed on this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only tasks of this procedure.
    #[arg(long)]
    procedure: Option<String>,
    /// At most this many (1 to 1000, the gateway's largest page).
    #[arg(
        long,
        default_value_t = 50,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(1..=MAX_LIST_LIMIT)
    )]
    limit: i32,
    /// Continue a listing (the token a previous listing printed).
    #[arg(long)]
    page_token: Option<String>,
}

/// The most `tasks --limit` asks for: the gateway's `MAX_PAGE_SIZE`.
const MAX_LIST_LIMIT: i64 = crate::gateway::MAX_PAGE_SIZE as i64;

#[derive(clap::Args)]
pub struct AgentsCmd {}

#[derive(clap::Args)]
pub struct ProceduresCmd {}

#[derive(clap::Args)]
pub struct DescribeCmd {
    /// The procedure (see `arpcp procedures`).
    procedure: String,
}

#[derive(clap::Args)]
pub struct BlacklistCmd {
    #[command(subcommand)]
    action: BlacklistAction,
}

#[derive(clap::Subcommand)]
enum BlacklistAction {
    /// Exclude an agent from task placement.
    Add { agent_id: String },
    /// Return an agent to task placement.
    Remove { agent_id: String },
}

/// The values of `tasks --status` (clap lists them when another is given).
const STATUS_NAMES: [&str; 8] = [
    "queued",
    "dispatched",
    "running",
    "done",
    "failed",
    "client_error",
    "interrupted",
    "cancelled",
];

/// A gateway client that sends the bearer token, if any, with every call.
type Client = GatewayClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer TOKEN` to each request.
#[derive(Clone, Default)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(pb::api::AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

/// How to reach and authenticate to the gateway, from the common flags.
#[derive(Default)]
struct Credentials {
    tls: Option<ClientTlsConfig>,
    /// A client certificate goes with `tls`.
    cert: bool,
    bearer: Bearer,
}

impl Credentials {
    fn from_flags(c: &Common) -> anyhow::Result<Credentials> {
        let Some(ca) = &c.ca else {
            if c.cert.is_some() || c.key.is_some() {
                return Err(usage("--cert and --key need --ca FILE (the cluster CA, ca.pem): a client certificate is only sent over TLS"));
            }
            if c.token.is_some() {
                return Err(usage("--token (or ARPCP_TOKEN) needs --ca FILE (the cluster CA, ca.pem): a token is only sent over TLS, never in plain text"));
            }
            return Ok(Credentials::default());
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(
            ca,
            "--ca",
            Pem::Certificate,
        )?));
        match (&c.cert, &c.key) {
            (Some(cert), key) => {
                let key = key.clone().unwrap_or_else(|| key_beside(cert));
                tls = tls.identity(Identity::from_pem(
                    pem(cert, "--cert", Pem::Certificate)?,
                    pem(&key, "--key", Pem::Key)?,
                ));
            }
            (None, Some(_)) => return Err(usage("--key needs --cert FILE")),
            (None, None) => {}
        }
        let bearer = match &c.token {
            Some(t) => Bearer(Some(format!("Bearer {}", t.trim()).parse().map_err(
                |_| {
                    usage("--token: a token is printable ASCII (as `arpcp token create` prints it)")
                },
            )?)),
            None => Bearer(None),
        };
        Ok(Credentials {
            tls: Some(tls),
            cert: c.cert.is_some(),
            bearer,
        })
    }
}

/// `NAME-key.pem` beside `NAME.pem`.
fn key_beside(cert: &Path) -> PathBuf {
    let stem = cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    cert.with_file_name(format!("{stem}-key.pem"))
}

/// What a PEM file given on the command line is to hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    Key,
}

/// A PEM file of ours, bounded like every PEM file read, holding what `kind` says
/// (checked here, so that a wrong file is named as such rather than reported later
/// as a certificate the gateway's does not match).
fn pem(path: &Path, flag: &str, kind: Pem) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::Read;
    let limit = crate::tls::MAX_PEM_FILE_BYTES;
    let shown = path.display();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(|e| usage(format!("{flag} {shown}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(usage(format!(
            "{flag} {shown}: larger than {limit} bytes, not a PEM file"
        )));
    }
    let holds = match kind {
        Pem::Certificate => CertificateDer::pem_slice_iter(&bytes).any(|c| c.is_ok()),
        Pem::Key => PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
    };
    if !holds {
        let expected = match kind {
            Pem::Certificate => "certificate (-----BEGIN CERTIFICATE-----)",
            Pem::Key => "private key (-----BEGIN PRIVATE KEY-----)",
        };
        return Err(usage(format!("{flag} {shown}: holds no PEM {expected}")));
    }
    Ok(bytes)
}

async fn connect(c: &Common) -> anyhow::Result<Client> {
    connect_with(&c.gateway, Credentials::from_flags(c)?).await
}

/// The gRPC port a `--gateway` without one means.
pub const DEFAULT_GRPC_PORT: u16 = 50051;
/// How long the TCP connection (and TLS handshake) to the gateway may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection to the gateway is pinged this often, also while a call waits
/// (a result, a watch): a gateway that stopped answering (stopped, hung, or a port
/// that accepts and says nothing) fails the command after at most this plus
/// `GATEWAY_PING_TIMEOUT`, instead of never.
pub const GATEWAY_PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the connection counts as dead.
pub const GATEWAY_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// `--gateway` as a URL: `http://` or `https://` (as TLS is asked for or not),
/// `DEFAULT_GRPC_PORT` when it names no port.
fn gateway_url(endpoint: &str, tls: bool) -> anyhow::Result<String> {
    let (scheme, rest) = match endpoint.split_once("://") {
        Some(("http", rest)) => (if tls { "https" } else { "http" }, rest),
        Some(("https", rest)) if tls => ("https", rest),
        Some(("https", _)) => {
            return Err(usage(format!(
                "the gateway address {endpoint} is https: pass --ca FILE (the cluster CA, ca.pem)"
            )))
        }
        Some((other, _)) => {
            return Err(usage(format!(
                "--gateway {endpoint:?}: the scheme {other}:// is not one of http:// and https:// (or none: HOST:PORT)"
            )))
        }
        None => (if tls { "https" } else { "http" }, endpoint),
    };
    let bad = |why: &str| usage(format!("--gateway {endpoint:?}: {why}; expected HOST:PORT"));
    let authority: tonic::codegen::http::uri::Authority = rest
        .trim_end_matches('/')
        .parse()
        .map_err(|_| bad("not a host and port"))?;
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    Ok(match authority.port_u16() {
        Some(_) => format!("{scheme}://{authority}"),
        None => format!("{scheme}://{authority}:{DEFAULT_GRPC_PORT}"),
    })
}

/// How this command reaches the gateway, for the hints of its errors: a transport
/// error means one thing to a plain-text client (the gateway wants TLS) and another
/// to one that sent a certificate (the gateway refused it).
static CONNECTED_WITH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(PLAIN);
const PLAIN: u8 = 0;
const TLS: u8 = 1;
const TLS_WITH_CERT: u8 = 2;

async fn connect_with(endpoint: &str, creds: Credentials) -> anyhow::Result<Client> {
    let url = gateway_url(endpoint, creds.tls.is_some())?;
    let how = match (&creds.tls, creds.cert) {
        (None, _) => PLAIN,
        (Some(_), false) => TLS,
        (Some(_), true) => TLS_WITH_CERT,
    };
    CONNECTED_WITH.store(how, std::sync::atomic::Ordering::Relaxed);
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| usage(format!("--gateway {endpoint:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(GATEWAY_PING_INTERVAL)
        .keep_alive_timeout(GATEWAY_PING_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = creds.tls {
        ep = ep.tls_config(tls).context("TLS configuration")?;
    }
    let channel = match ep.connect().await {
        Ok(c) => c,
        Err(e) => {
            let chain = error_text(&e);
            let hint = connect_hint(&chain);
            anyhow::bail!("cannot reach the gateway at {url}: {chain}{hint}");
        }
    };
    Ok(GatewayClient::with_interceptor(channel, creds.bearer)
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// An error and its causes on one line.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text = format!("{text}: {t}");
        }
        cause = c.source();
    }
    text
}

/// What to do about a failed connection, when its cause says.
fn connect_hint(chain: &str) -> &'static str {
    if chain.contains("UnknownIssuer") || chain.contains("BadSignature") {
        " (the gateway's certificate is not signed by the CA given in --ca: pass the cluster's ca.pem)"
    } else if chain.contains("NotValidForName") {
        " (the gateway's certificate does not name the host of --gateway: connect by a name or address it lists, or issue it with `arpcp ca issue gateway --san HOST`)"
    } else if chain.contains("UnknownCA")
        || chain.contains("BadCertificate")
        || chain.contains("CertificateUnknown")
    {
        " (the gateway refused the client certificate: --cert must be issued by the cluster CA)"
    } else if chain.contains("CertificateExpired") || chain.contains("Expired") {
        " (a certificate has expired: issue a new one)"
    } else if chain.contains("InvalidContentType") || chain.contains("corrupt message") {
        " (the gateway does not speak TLS on this port: drop --ca, or check --gateway)"
    } else if chain.contains("Connection refused")
        || chain.contains("tcp connect error")
        || chain.contains("dns error")
        || chain.contains("timed out")
    {
        " (is it running? start one with `arpcp up`, or set ARPCP_GATEWAY (or --gateway) to its address)"
    } else {
        ""
    }
}

/// The hint for a call whose connection stopped answering pings.
const STOPPED_ANSWERING: &str = "\n(the gateway stopped answering: a ping got no reply within 5 s; is it stopped, overloaded, or not an arpcp gateway?)";
const _: () = assert!(
    GATEWAY_PING_TIMEOUT.as_secs() == 5,
    "STOPPED_ANSWERING names it"
);

fn status_err(s: tonic::Status) -> anyhow::Error {
    let transport = matches!(s.code(), tonic::Code::Unknown if s.message().contains("transport error"))
        || matches!(s.code(), tonic::Code::Internal if s.message().contains("h2 protocol error"));
    let how = CONNECTED_WITH.load(std::sync::atomic::Ordering::Relaxed);
    let hint = match s.code() {
        _ if transport && how == TLS_WITH_CERT => {
            "\n(the gateway closed the connection in the TLS handshake: it refuses the certificate of --cert (revoked, expired, or not a client certificate of this cluster's CA); the gateway's log says which)"
        }
        _ if transport && how == TLS => {
            "\n(the gateway closed the connection in the TLS handshake: check that --ca is this cluster's ca.pem)"
        }
        tonic::Code::Unauthenticated => {
            "\n(pass --ca FILE with --token TOKEN (or ARPCP_TOKEN) or with --cert FILE; an operator makes tokens with `arpcp token create` and certificates with `arpcp ca issue client`)"
        }
        tonic::Code::PermissionDenied => {
            "\n(ask an operator for a token or certificate with the role named)"
        }
        // What a plain-text client sees of a gateway that serves TLS: which of the
        // two depends on when the TLS side hangs up.
        tonic::Code::Unknown if s.message().contains("transport error") => {
            "\n(if the gateway serves TLS (started with --tls-dir), pass --ca FILE, the cluster's ca.pem)"
        }
        tonic::Code::Internal if s.message().contains("h2 protocol error") => {
            "\n(if the gateway serves TLS (started with --tls-dir), pass --ca FILE, the cluster's ca.pem)"
        }
        _ if error_text(&s).contains("keep-alive timed out") => STOPPED_ANSWERING,
        _ => "",
    };
    anyhow::anyhow!("{:?}: {}{hint}", s.code(), s.message())
}

/// Refuses a value holding an integer that would reach the gateway as another one.
fn exact(what: &str, v: &Value) -> anyhow::Result<()> {
    match crate::pb::json::inexact_int(v) {
        Some(n) => Err(usage(format!(
            "{what}: {n} cannot be sent exactly: numbers travel as doubles, exact within ±{} (2^53 − 1); quote it ('\"{n}\"') to send it as a string",
            crate::pb::json::MAX_EXACT_INT
        ))),
        None => Ok(()),
    }
}

/// A command-line argument as a JSON value.
fn arg_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

use crate::pb::json::from_json as to_pb;

fn is_final(status: i32) -> bool {
    pb::TaskStatus::try_from(status).is_ok_and(pb::TaskStatus::is_final)
}

/// Blocks until the task ends (GetResult waits are bounded, so this asks again).
async fn poll_until_final(client: &mut Client, task_id: &str) -> Result<pb::Task, tonic::Status> {
    loop {
        let t = client
            .get_result(pb::GetResultRequest {
                task_id: task_id.to_string(),
                wait: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            })
            .await?
            .into_inner();
        if is_final(t.status) {
            return Ok(t);
        }
    }
}

/// The exit status of a `--wait` that gave up after `--timeout`, as timeout(1)'s.
pub const WAIT_TIMED_OUT_EXIT: u8 = 124;
/// How much longer than `--timeout` a `submit --sync` listens for the gateway's
/// own answer that the time ran out.
const SYNC_ANSWER_GRACE: Duration = Duration::from_secs(2);
/// The exit status after Ctrl-C: 128 + SIGINT, as a shell reports a process it
/// interrupted.
pub const INTERRUPTED_EXIT: u8 = 130;

/// A line on stderr, if it can be written.
fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// What a user who stopped waiting needs: the task lives on, and how to find it.
fn goes_on(task_id: &str, why: &str) -> String {
    format!(
        "task {task_id} goes on ({why}): follow it with `arpcp watch {task_id}`, or get its result with `arpcp result {task_id} --wait`"
    )
}

/// `submit --wait` and `result --wait`: says `first` on stderr (the task's id, so it
/// is known even if the wait is cut short), then waits for the task's end, for
/// `left` (what remains of `--timeout`, which the message names) or Ctrl-C,
/// whichever comes first. A progress bar only when stderr is a terminal; `csv`
/// prints an Opal table as CSV.
async fn wait_and_show(
    client: &mut Client,
    task_id: &str,
    first: &str,
    left: Option<Duration>,
    timeout: Option<Duration>,
    json: bool,
    csv: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    // Listening before the first line: a Ctrl-C after it stops the wait, not the
    // process without a word.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot listen for Ctrl-C")?;
    note(&format!("{first} (Ctrl-C stops waiting, not the task)"));
    let bar = (!json && std::io::stderr().is_terminal()).then(progress_bar);
    let limit = async {
        match left {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let outcome: anyhow::Result<Result<pb::Task, (u8, String)>> = tokio::select! {
        t = follow(client, task_id, bar.as_ref()) => t.map(Ok),
        () = limit => Ok(Err((
            WAIT_TIMED_OUT_EXIT,
            format!(
                "not ended after --timeout {}",
                humantime::format_duration(timeout.unwrap_or_default())
            ),
        ))),
        _ = interrupt.recv() => Ok(Err((INTERRUPTED_EXIT, "stopped waiting on Ctrl-C".to_string()))),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match outcome? {
        Ok(t) => Ok(show_task_as(&t, json, csv)),
        Err((code, why)) => {
            note(&goes_on(task_id, &why));
            Ok(ExitCode::from(code))
        }
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Shows a task's progress on `bar`.
fn show_progress(bar: &indicatif::ProgressBar, t: &pb::Task) {
    let fraction = t.progress.as_ref().map_or(0.0, |p| p.fraction);
    bar.set_position((fraction.clamp(0.0, 1.0) * 1000.0) as u64);
    let comment = t
        .progress
        .as_ref()
        .map(|p| p.comment.clone())
        .unwrap_or_default();
    bar.set_message(format!("{} {comment}", status_name(t.status)));
}

/// The task once it ended: through WatchTask with a bar to move, else GetResult.
/// How a wait rides out a gateway that went away (a restart): asked again after
/// 200 ms, doubling to 5 s, for at most `WAIT_RECONNECT_FOR` in a row.
const WAIT_RECONNECT: crate::retry::Policy =
    crate::retry::Policy::doubling(Duration::from_millis(200), Duration::from_secs(5))
        .with_max_wait(WAIT_RECONNECT_FOR);
/// The longest a wait goes on without a gateway before it gives up.
pub const WAIT_RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Waits for the task's end, through restarts of the gateway (its tasks are
/// durable, so the same id is asked again once it is back). Callers have had an
/// answer from the gateway first, so a failure here is a gateway that went away,
/// not a wrong address or a TLS mismatch (which they report at once).
async fn follow(
    client: &mut Client,
    task_id: &str,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<pb::Task> {
    let mut backoff = crate::retry::Backoff::new(WAIT_RECONNECT);
    loop {
        let began = tokio::time::Instant::now();
        let err = match follow_once(client, task_id, bar).await {
            Ok(t) => return Ok(t),
            Err(s) => s,
        };
        // A wait that got through to the gateway before it failed starts the
        // reconnection budget afresh.
        if began.elapsed() > WAIT_RECONNECT.cap {
            backoff = crate::retry::Backoff::new(WAIT_RECONNECT);
        }
        // A refused or broken connection; not a gateway that stopped answering
        // (that one is not coming back soon).
        let text = error_text(&err);
        let broken = err.code() == tonic::Code::Unavailable
            || (err.code() == tonic::Code::Unknown && text.contains("transport error"));
        let gone = broken && !text.contains("keep-alive timed out");
        match backoff.next_delay() {
            Some(delay) if gone => {
                if backoff.tries() == 1 {
                    note(&format!(
                        "lost the gateway ({}); asking again for up to {}",
                        err.message(),
                        humantime::format_duration(WAIT_RECONNECT_FOR)
                    ));
                }
                tokio::time::sleep(delay).await;
            }
            _ => {
                note(&goes_on(task_id, "the gateway could not be asked"));
                return Err(status_err(err));
            }
        }
    }
}

/// One wait: a watch for the progress bar, then long polls.
async fn follow_once(
    client: &mut Client,
    task_id: &str,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<pb::Task, tonic::Status> {
    if let Some(bar) = bar {
        let mut stream = client
            .watch_task(pb::WatchTaskRequest {
                task_id: task_id.to_string(),
            })
            .await?
            .into_inner();
        while let Some(t) = stream.message().await? {
            show_progress(bar, &t);
            if is_final(t.status) {
                return Ok(t);
            }
        }
    }
    poll_until_final(client, task_id).await
}

/// The most likely procedure meant by `name`: one a typing slip away (as for
/// Opal parameters, `opal::schema`), nearest first.
fn near_name<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    let len = name.chars().count();
    if len > crate::opal::schema::MAX_SUGGEST_CHARS {
        return None;
    }
    known
        .iter()
        .filter_map(|k| {
            let klen = k.chars().count();
            let limit = 1.max(klen / 3);
            (klen.abs_diff(len) <= limit && klen <= crate::opal::schema::MAX_SUGGEST_CHARS)
                .then(|| (crate::opal::schema::distance(name, k), k.as_str()))
                .filter(|&(d, _)| d <= limit)
        })
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// A Submit or DescribeProcedure error; for a procedure no agent offers, the near
/// names the agents do offer, and where to see them all.
async fn procedure_err(client: &mut Client, procedure: &str, s: tonic::Status) -> anyhow::Error {
    if s.code() != tonic::Code::NotFound || !s.message().contains("not offered") {
        return status_err(s);
    }
    let known: Vec<String> = client
        .list_procedures(pb::ListProceduresRequest {})
        .await
        .map(|r| {
            r.into_inner()
                .procedures
                .into_iter()
                .map(|p| p.name)
                .collect()
        })
        .unwrap_or_default();
    let hint = match near_name(procedure.trim(), &known) {
        Some(near) => format!("did you mean {near:?}? "),
        None => String::new(),
    };
    anyhow::anyhow!(
        "{:?}: {}\n({hint}`arpcp procedures` lists what the alive agents offer)",
        s.code(),
        s.message()
    )
}

/// Shows a task; the exit code says whether it is done (0), still going (0), or
/// ended otherwise (1).
fn show_task(t: &pb::Task, json: bool) -> ExitCode {
    show_task_as(t, json, false)
}

fn show_task_as(t: &pb::Task, json: bool, csv: bool) -> ExitCode {
    if json {
        outln!("{}", task_json(t));
    } else if let (Some(tab), true) = (&t.table, t.status == pb::TaskStatus::Done as i32) {
        if csv {
            output::result_csv(tab);
        } else {
            output::result_table(tab);
        }
    } else {
        let status = status_name(t.status);
        let value = t.result.as_ref().map(output::value_json);
        match (status.as_str(), value) {
            ("done", Some(v)) => outln!("{}", short(&v, usize::MAX)),
            ("done", None) => outln!("null"),
            _ => {
                let mut line = format!("task {} is {status}", t.task_id);
                if let Some(p) = t.progress.as_ref().filter(|_| !is_final(t.status)) {
                    line += &format!(" ({:.0}% {})", p.fraction * 100.0, p.comment);
                }
                if !t.error.is_empty() {
                    line += &format!(": {}", t.error);
                }
                outln!("{}", line.trim_end());
            }
        }
    }
    let ended_badly = is_final(t.status) && t.status != pb::TaskStatus::Done as i32;
    if ended_badly {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub async fn submit(c: SubmitCmd, common: &Common) -> anyhow::Result<ExitCode> {
    // The whole command, the Submit included, is bounded by --timeout.
    let started = tokio::time::Instant::now();
    // The command line is checked before the gateway is asked anything.
    let mut kwargs = std::collections::BTreeMap::new();
    for kv in &c.kwargs {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| usage(format!("--kw {kv:?}: expected NAME=VALUE")))?;
        if k.trim().is_empty() {
            return Err(usage(format!(
                "--kw {kv:?}: the name before '=' is empty; expected NAME=VALUE"
            )));
        }
        let v = arg_value(v);
        exact(&format!("--kw {k}"), &v)?;
        kwargs.insert(k.to_string(), to_pb(&v));
    }
    let args: Vec<Value> = c.args.iter().map(|a| arg_value(a)).collect();
    for (i, a) in args.iter().enumerate() {
        exact(&format!("argument {}", i + 1), a)?;
    }
    match (c.timeout, c.wait || c.sync) {
        (Some(_), false) => return Err(usage(
            "--timeout needs --wait (how long to wait here) or --sync (how long the gateway waits)",
        )),
        (Some(t), true) if t.is_zero() => return Err(usage("--timeout must be more than 0")),
        _ => {}
    }
    let sync_timeout = match c.timeout.filter(|_| c.sync) {
        Some(t) => Some(
            prost_types::Duration::try_from(t)
                .map_err(|_| usage(format!("--timeout {t:?} is too long")))?,
        ),
        None => None,
    };
    // With --sync the gateway answers by --timeout; it is given a little longer
    // to say so before this end stops listening.
    let deadline = c.timeout.map(|t| {
        let grace = if c.sync {
            SYNC_ANSWER_GRACE
        } else {
            Duration::ZERO
        };
        started + t + grace
    });
    let mut client = connect(common).await?;
    if !c.params.is_empty() {
        let schema = client
            .describe_procedure(pb::DescribeProcedureRequest {
                procedure: c.procedure.clone(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        let named = params_to_kwargs(&c.params, &schema)?;
        exact("--param", &Value::Object(named.clone()))?;
        for (k, v) in named {
            kwargs.insert(k, to_pb(&v));
        }
    }
    let procedure = c.procedure.clone();
    let request = pb::SubmitRequest {
        procedure: c.procedure,
        args: args.iter().map(to_pb).collect(),
        kwargs: (!kwargs.is_empty()).then_some(prost_types::Struct { fields: kwargs }),
        agent_id: c.agent.unwrap_or_default(),
        sync: c.sync,
        timeout: sync_timeout,
    };
    let submitted = match deadline {
        Some(at) => match tokio::time::timeout_at(at, client.submit(request)).await {
            Ok(r) => r,
            Err(_) => {
                note(&format!(
                    "the gateway did not answer the Submit within --timeout {}; the task may or may not exist: see `arpcp tasks --procedure {procedure}`",
                    humantime::format_duration(c.timeout.unwrap_or_default())
                ));
                return Ok(ExitCode::from(WAIT_TIMED_OUT_EXIT));
            }
        },
        None => client.submit(request).await,
    };
    let resp = match submitted {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(procedure_err(&mut client, &procedure, s).await),
    };
    if c.sync {
        let t = resp.task.context("the gateway returned no task")?;
        return Ok(show_task(&t, common.json));
    }
    if c.wait {
        let first = format!("task {} submitted; waiting for its result", resp.task_id);
        let left = deadline.map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
        return wait_and_show(
            &mut client,
            &resp.task_id,
            &first,
            left,
            c.timeout,
            common.json,
            false,
        )
        .await;
    }
    if common.json {
        outln!("{}", serde_json::json!({"task_id": resp.task_id}));
    } else {
        outln!("{}", resp.task_id);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn result(c: ResultCmd, common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let t = client
        .get_result(pb::GetResultRequest {
            task_id: c.task_id.clone(),
            wait: None,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if c.wait && !is_final(t.status) {
        let first = format!("waiting for task {}", c.task_id);
        return wait_and_show(
            &mut client,
            &c.task_id,
            &first,
            None,
            None,
            common.json,
            c.csv,
        )
        .await;
    }
    Ok(show_task_as(&t, common.json, c.csv))
}

pub async fn watch(c: WatchCmd, common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let mut stream = client
        .watch_task(pb::WatchTaskRequest {
            task_id: c.task_id.clone(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let bar = if common.json {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar()
    };
    let mut last = None;
    while let Some(t) = stream.message().await.map_err(status_err)? {
        if common.json {
            outln!("{}", task_json(&t));
        }
        show_progress(&bar, &t);
        last = Some(t);
    }
    bar.finish_and_clear();
    match last {
        Some(t) if common.json => Ok(
            if is_final(t.status) && t.status != pb::TaskStatus::Done as i32 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            },
        ),
        Some(t) => Ok(show_task(&t, false)),
        None => anyhow::bail!("the gateway closed the stream without a task"),
    }
}

pub async fn cancel(c: CancelCmd, common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let t = client
        .cancel_task(pb::CancelTaskRequest { task_id: c.task_id })
        .await
        .map_err(status_err)?
        .into_inner();
    if common.json {
        outln!("{}", task_json(&t));
    } else {
        outln!("task {} is {}", t.task_id, status_name(t.status));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn tasks(c: TasksCmd, common: &Common) -> anyhow::Result<ExitCode> {
    let status = match c.status.as_deref() {
        None => pb::TaskStatus::Unspecified,
        Some(s) => pb::TaskStatus::from_str_name(&format!("TASK_STATUS_{}", s.to_uppercase()))
            .with_context(|| {
                format!(
                    "--status {s:?} is not a task status; one of: {}",
                    STATUS_NAMES.join(", ")
                )
            })?,
    };
    let mut client = connect(common).await?;
    let r = client
        .list_tasks(pb::ListTasksRequest {
            status: status as i32,
            agent_id: c.agent.unwrap_or_default(),
            procedure: c.procedure.unwrap_or_default(),
            page_size: c.limit,
            page_token: c.page_token.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if common.json {
        let tasks: Vec<Value> = r.tasks.iter().map(task_json).collect();
        outln!(
            "{}",
            serde_json::json!({"tasks": tasks, "next_page_token": r.next_page_token})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = r
        .tasks
        .iter()
        .map(|t| {
            let j = task_json(t);
            let outcome = match (&j["result"], &j["error"]) {
                (Value::Null, Value::Null) => String::new(),
                (Value::Null, e) => short(e, 50),
                (v, _) => short(v, 50),
            };
            vec![
                t.task_id.clone(),
                t.procedure.clone(),
                status_name(t.status),
                t.agent_id.clone(),
                short(&j["created_at"], 24),
                outcome,
            ]
        })
        .collect();
    table(
        &["TASK", "PROCEDURE", "STATUS", "AGENT", "CREATED", "RESULT"],
        &rows,
    );
    if !r.next_page_token.is_empty() {
        outln!("more: --page-token {}", r.next_page_token);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let r = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if common.json {
        let agents: Vec<Value> = r.agents.iter().map(agent_json).collect();
        outln!("{}", serde_json::json!({ "agents": agents }));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = r
        .agents
        .iter()
        .map(|a| {
            vec![
                a.agent_id.clone(),
                a.address.clone(),
                a.mac.clone(),
                a.hostname.clone(),
                output::agent_state_name(a.state),
                a.misses.to_string(),
                format!("{}/{}", a.running, a.capacity),
                if a.blacklisted {
                    "yes".into()
                } else {
                    String::new()
                },
                a.procedures.len().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "AGENT",
            "ADDRESS",
            "MAC",
            "HOST",
            "STATE",
            "MISSES",
            "RUNNING",
            "BLACKLISTED",
            "PROCEDURES",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn procedures(common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let r = client
        .list_procedures(pb::ListProceduresRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if common.json {
        let v: Vec<Value> = r
            .procedures
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "kind": kind_name(p.kind), "agent_ids": p.agent_ids}))
            .collect();
        outln!("{}", serde_json::json!({ "procedures": v }));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = r
        .procedures
        .iter()
        .map(|p| vec![p.name.clone(), kind_name(p.kind), p.agent_ids.join(", ")])
        .collect();
    table(&["PROCEDURE", "KIND", "AGENTS"], &rows);
    Ok(ExitCode::SUCCESS)
}

pub async fn blacklist(c: BlacklistCmd, common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let a = match c.action {
        BlacklistAction::Add { agent_id } => {
            client
                .blacklist_agent(pb::BlacklistAgentRequest { agent_id })
                .await
        }
        BlacklistAction::Remove { agent_id } => {
            client
                .unblacklist_agent(pb::UnblacklistAgentRequest { agent_id })
                .await
        }
    }
    .map_err(status_err)?
    .into_inner();
    if common.json {
        outln!("{}", agent_json(&a));
    } else {
        let what = if a.blacklisted {
            "blacklisted"
        } else {
            "not blacklisted"
        };
        outln!("agent {} is {what}", a.agent_id);
    }
    Ok(ExitCode::SUCCESS)
}

/// `arpcp up`'s demonstration: waits for the local agent, runs add(2, 3), prints it.
pub async fn demo(endpoint: &str, with_model: bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match connect_with(endpoint, Credentials::default()).await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let submit = || pb::SubmitRequest {
        procedure: "add".into(),
        args: vec![to_pb(&Value::from(2)), to_pb(&Value::from(3))],
        ..Default::default()
    };
    let task_id = loop {
        match client.submit(submit()).await {
            Ok(r) => break r.into_inner().task_id,
            // The agent registers at the first echo round.
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => return Err(status_err(s)),
        }
    };
    let t = poll_until_final(&mut client, &task_id)
        .await
        .map_err(status_err)?;
    let result = t
        .result
        .as_ref()
        .map(output::value_json)
        .unwrap_or(Value::Null);
    outln!(
        "arpcp is up: gRPC at {endpoint}; demo task {task_id}: add(2, 3) = {result} ({})",
        status_name(t.status)
    );
    // The commands as they would reach this gateway (its port may not be the default).
    let cli = match gateway_url(endpoint, false) {
        Ok(url) if url == format!("http://127.0.0.1:{DEFAULT_GRPC_PORT}") => "arpcp".to_string(),
        _ => format!("arpcp --gateway {endpoint}"),
    };
    outln!("try: {cli} submit add 40 2 --wait    |    {cli} agents    |    {cli} tasks");
    if with_model {
        outln!(
            "an Opal model too: {cli} describe trajectory    |    {cli} submit trajectory --param algo.genetic.method=last --wait"
        );
    }
    Ok(())
}

/// `--param SECTION.NAME=VALUE` → `{"main": {...}, "algo": {"<alg>": {...}}}`, each
/// value typed by the schema: text types stay text, numbers and booleans are read
/// as JSON (so a wrong value gets the gateway's precise error).
fn params_to_kwargs(
    params: &[String],
    schema: &pb::ProcedureSchema,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut out = serde_json::Map::new();
    for p in params {
        let (path, raw) = p.split_once('=').ok_or_else(|| {
            usage(format!(
                "--param {p:?}: expected PATH=VALUE, e.g. main.x=20"
            ))
        })?;
        let parts: Vec<&str> = path.trim().split('.').collect();
        let (section, name, params): (Vec<&str>, &str, &[pb::Parameter]) = match parts[..] {
            ["main", name] => (vec!["main"], name, &schema.main),
            ["algo", alg, name] => {
                let a = schema.algorithms.iter().find(|a| a.name == alg);
                (
                    vec!["algo", alg],
                    name,
                    a.map_or(&[][..], |a| &a.parameters),
                )
            }
            _ => {
                return Err(usage(format!(
                    "--param {p:?}: the path is main.NAME or algo.ALGORITHM.NAME"
                )))
            }
        };
        let text_type = params
            .iter()
            .find(|q| q.name == name)
            .is_some_and(|q| matches!(q.r#type.as_str(), "string" | "period" | "datetime"));
        let value = if text_type {
            Value::String(raw.to_string())
        } else {
            arg_value(raw)
        };
        let mut node = &mut out;
        for s in section {
            node = node
                .entry(s.to_string())
                .or_insert_with(|| Value::Object(Default::default()))
                .as_object_mut()
                .ok_or_else(|| usage(format!("--param {p:?}: its path runs through a value")))?;
        }
        node.insert(name.to_string(), value);
    }
    Ok(out)
}

fn describe_params(params: &[pb::Parameter], indent: &str) {
    for p in params {
        let mut line = format!("{indent}{} = {}", p.name, p.r#type);
        if !p.choices.is_empty() {
            let c: Vec<String> = p.choices.iter().map(output::cell_text).collect();
            line += &format!(" choice [{}]", c.join(", "));
        }
        if let Some(q) = &p.partition {
            line += &format!(" partition {} to {} by {}", q.from, q.to, q.step);
        }
        match &p.default_value {
            Some(d) => line += &format!(" default {}", output::cell_text(d)),
            None => line += " (required)",
        }
        if !p.comment.is_empty() {
            line += &format!("  // {}", p.comment);
        }
        outln!("{line}");
    }
}

pub async fn describe(c: DescribeCmd, common: &Common) -> anyhow::Result<ExitCode> {
    let mut client = connect(common).await?;
    let s = match client
        .describe_procedure(pb::DescribeProcedureRequest {
            procedure: c.procedure.clone(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return Err(procedure_err(&mut client, &c.procedure, s).await),
    };
    if common.json {
        let params = |ps: &[pb::Parameter]| -> Vec<Value> {
            ps.iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name, "type": p.r#type,
                        "choices": p.choices.iter().map(output::value_json).collect::<Vec<_>>(),
                        "default": p.default_value.as_ref().map(output::value_json),
                        "partition": p.partition.as_ref().map(|q| serde_json::json!({"from": q.from, "to": q.to, "step": q.step})),
                        "comment": p.comment, "required": p.required,
                    })
                })
                .collect()
        };
        outln!(
            "{}",
            serde_json::json!({
                "procedure": s.procedure,
                "kind": kind_name(s.kind),
                "main": params(&s.main),
                "algorithms": s.algorithms.iter().map(|a| serde_json::json!({"name": a.name, "parameters": params(&a.parameters)})).collect::<Vec<_>>(),
                "agent_ids": s.agent_ids,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{} ({}) on {}",
        s.procedure,
        kind_name(s.kind),
        s.agent_ids.join(", ")
    );
    if s.kind != pb::ProcedureKind::Opal as i32 {
        return Ok(ExitCode::SUCCESS);
    }
    outln!("main:");
    describe_params(&s.main, "  ");
    if !s.algorithms.is_empty() {
        outln!("algorithms (give exactly one):");
        for a in &s.algorithms {
            outln!("  {}:", a.name);
            describe_params(&a.parameters, "    ");
        }
    }
    outln!(
        "run: arpcp submit {} --param main.NAME=VALUE{} --wait",
        s.procedure,
        if s.algorithms.is_empty() {
            ""
        } else {
            " --param algo.ALGORITHM.NAME=VALUE"
        }
    );
    Ok(ExitCode::SUCCESS)
}
