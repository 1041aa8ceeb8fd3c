//! End-to-end benchmark of a local cluster, with in-run baselines.
//!
//! Starts two clusters side by side, each a real gateway and two real agents (the
//! `arpcp` binary, on loopback): one plaintext, one with TLS on ARPCP and gRPC
//! (`--tls-dir`, certificates made by the binary's `ca` commands). In rounds that
//! alternate which cluster goes first, it measures on each:
//! * async throughput: `add` tasks submitted concurrently through gRPC, every result
//!   fetched (each task durable before its Submit returned);
//! * p50/p99 latency of a synchronous call (Submit with `sync`: ARPCP TASK);
//! * p50/p99 latency of an ARPCP TASK straight to an agent (the transport alone);
//!
//! * peak RSS of each cluster's gateway and agents over the rounds (sampled from
//!   `/proc` every 50 ms), and an agent's RSS when idle, before any work;
//!
//! and once, on the plaintext cluster:
//! * baselines: a bare tonic unary call (grpc.health Check on a server that serves
//!   nothing else) and a bare TCP JSON-line echo, both in this process;
//! * an Opal model that answers at once, run through the cluster (sync Submit, the
//!   typed table back) against the same program run by hand, p50 and p99.
//!
//! `cargo bench --bench cluster` (env: BENCH_TASKS, BENCH_CONCURRENCY, BENCH_SAMPLES,
//! BENCH_ROUNDS, BENCH_OPAL_SAMPLES; BENCH_ARPCP: another `arpcp` binary to run, for
//! comparing builds in alternation). `BENCH_FILL=N` (and `BENCH_FILL_STEP`) runs
//! the fill instead: one cluster's store filled with N tasks, figures every step
//! (throughput, Submit latency, RSS, bytes on disk, ListTasks latency per filter),
//! then one retention pass timed on a restart (`BENCH_FILL_MAX_BYTES_PER_TASK`
//! fails the run on a store larger than that).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::Path;

use arpcp::arpcp::tls::{ArpcpTls, ClientTls};
use arpcp::arpcp::{ArpcpClient, Request};
use arpcp::pb;
use arpcp::pb::gateway_client::GatewayClient;
use arpcp::tls::Role;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::transport::Channel;

#[path = "common/daemon.rs"]
mod daemon;
use daemon::{arpcp_bin, Daemon};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn num(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?)
}

/// Latencies of `samples` sequential calls of `call`, sorted.
async fn latencies<F, Fut>(samples: usize, mut call: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..samples / 10 {
        call().await?; // warm-up
    }
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        call().await?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

async fn tonic_baseline(samples: usize) -> anyhow::Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    let client = tonic_health::pb::health_client::HealthClient::new(channel(&url).await?);
    latencies(samples, || {
        let mut c = client.clone();
        async move {
            c.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
            Ok(())
        }
    })
    .await
}

async fn tcp_json_baseline(samples: usize) -> anyhow::Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // Parse and re-serialise, as a JSON-line server would.
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        return;
                    };
                    let mut out = v.to_string();
                    out.push_str("\r\n");
                    if w.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let (r, w) = sock.into_split();
    let conn = Arc::new(tokio::sync::Mutex::new((tokio::io::BufReader::new(r), w)));
    let msg = serde_json::json!({"method":"TASK","version":"1.0","remote_procedure":"add","remote_procedure_args":[2,3]}).to_string() + "\r\n";
    latencies(samples, || {
        let conn = conn.clone();
        let msg = msg.clone();
        async move {
            let mut c = conn.lock().await;
            c.1.write_all(msg.as_bytes()).await?;
            let mut line = String::new();
            c.0.read_line(&mut line).await?;
            Ok(())
        }
    })
    .await
}

async fn wait_for_agents(client: &mut GatewayClient<Channel>, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await?
            .into_inner()
            .agents;
        let alive = agents
            .iter()
            .filter(|a| a.state == pb::AgentState::Alive as i32)
            .count();
        if alive >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {alive} of {n} agents alive after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `arpcp ARGS` to its end, as an operator would (the `ca` commands).
fn run_arpcp(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(arpcp_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "arpcp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A cluster CA with the gateway's certificate and `agent-1` … `agent-N`'s, made
/// by the binary's `ca` commands in a temporary directory.
fn make_pki(agents: usize) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().to_string_lossy().into_owned();
    // `ca init` makes its directory itself.
    let pki = format!("{pki}/pki");
    run_arpcp(&["ca", "init", "--dir", &pki])?;
    run_arpcp(&[
        "ca",
        "issue",
        "gateway",
        "--san",
        "127.0.0.1",
        "--dir",
        &pki,
    ])?;
    for i in 1..=agents {
        run_arpcp(&["ca", "issue", "agent", &format!("agent-{i}"), "--dir", &pki])?;
    }
    run_arpcp(&[
        "ca",
        "issue",
        "client",
        "bench",
        "--role",
        "submitter",
        "--dir",
        &pki,
    ])?;
    Ok(dir)
}

/// A gateway and two agents on loopback, plaintext or with TLS (mutual on ARPCP, and gRPC).
struct Cluster {
    name: &'static str,
    url: String,
    /// The first agent's ARPCP address, and how to call it as the gateway does.
    agent: String,
    agent_tls: Option<ClientTls>,
    /// How the bench's gRPC clients reach a TLS gateway: its CA and the `bench`
    /// submitter's certificate.
    grpc_tls: Option<tonic::transport::ClientTlsConfig>,
    /// The processes, killed when the cluster is dropped.
    _gateway: Daemon,
    _agents: Vec<Daemon>,
    /// The certificates, while the daemons use them.
    _pki: Option<tempfile::TempDir>,
}

const AGENTS: usize = 2;

/// The resident set of a process, in KiB (`/proc/PID/status`, Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The proportional set of a process in KiB (`/proc/PID/smaps_rollup`, Linux): its
/// resident pages, each shared one divided among the processes that map it, so
/// that the sum over processes counts the binary's pages once.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak RSS of some processes, and the peak of their summed PSS, sampled every
/// 50 ms on a thread of its own until dropped (`peaks` then reads the last).
struct PeakRss {
    peaks: Arc<Vec<std::sync::atomic::AtomicU64>>,
    pss: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start(pids: Vec<u32>) -> PeakRss {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let pss = Arc::new(AtomicU64::new(0));
        let (p, s, together) = (peaks.clone(), stop.clone(), pss.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut sum = 0;
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kib) = rss_kib(*pid) {
                        p[i].fetch_max(kib, Ordering::Relaxed);
                    }
                    sum += pss_kib(*pid).unwrap_or(0);
                }
                together.fetch_max(sum, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        PeakRss {
            peaks,
            pss,
            stop,
            thread: Some(thread),
        }
    }

    /// Peaks in MiB, in the order of the pids given, then the peak of the summed
    /// PSS.
    fn stop(mut self) -> (Vec<f64>, f64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        let peaks = self
            .peaks
            .iter()
            .map(|p| mib(p.load(Ordering::Relaxed)))
            .collect();
        (peaks, mib(self.pss.load(Ordering::Relaxed)))
    }
}

impl Cluster {
    /// The gateway's pid, then the agents'.
    fn pids(&self) -> Vec<u32> {
        std::iter::once(self._gateway.child.id())
            .chain(self._agents.iter().map(|a| a.child.id()))
            .collect()
    }
}

async fn start_cluster(
    name: &'static str,
    arpcp_tls: bool,
    agent_config: &str,
) -> anyhow::Result<Cluster> {
    let pki = arpcp_tls.then(|| make_pki(AGENTS)).transpose()?;
    let pki_dir = pki
        .as_ref()
        .map(|d| d.path().join("pki").to_string_lossy().into_owned());
    let mut args = vec![
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--echo-interval-ms",
        "500",
    ];
    if let Some(dir) = &pki_dir {
        args.extend(["--tls-dir", dir]);
    }
    let gateway = Daemon::spawn(&arpcp_bin(), &args)?;
    let controller = gateway.addr("arpcp");
    let agents: Vec<Daemon> = (1..=AGENTS)
        .map(|i| {
            let tls_name = format!("agent-{i}");
            let mut args = vec![
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--controller",
                &controller,
                "--capacity",
                "64",
                "--config",
                agent_config,
            ];
            if let Some(dir) = &pki_dir {
                args.extend(["--tls-dir", dir, "--tls-name", &tls_name]);
            }
            Daemon::spawn(&arpcp_bin(), &args)
        })
        .collect::<anyhow::Result<_>>()?;
    let agent_tls = pki_dir
        .as_deref()
        .map(|dir| ArpcpTls::load(Path::new(dir), "gateway"))
        .transpose()?
        .map(|t| t.calling(Role::Agent));
    let grpc_tls = pki_dir
        .as_deref()
        .map(|dir| -> anyhow::Result<_> {
            let read = |f: &str| std::fs::read(Path::new(dir).join(f));
            Ok(tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")?))
                .identity(tonic::transport::Identity::from_pem(
                    read("bench.pem")?,
                    read("bench-key.pem")?,
                )))
        })
        .transpose()?;
    let scheme = if grpc_tls.is_some() { "https" } else { "http" };
    let cluster = Cluster {
        name,
        url: format!("{scheme}://{}", gateway.addr("grpc")),
        grpc_tls,
        agent: agents[0].addr("arpcp"),
        agent_tls,
        _gateway: gateway,
        _agents: agents,
        _pki: pki,
    };
    let mut client = GatewayClient::new(grpc_channel(&cluster).await?);
    wait_for_agents(&mut client, AGENTS).await?;
    Ok(cluster)
}

/// A gRPC channel to a cluster's gateway; every client of the bench comes from
/// here. The TLS cluster's gateway serves gRPC over TLS too, so its figures cover
/// TLS end to end: the client's handshake (a submitter certificate), the role check
/// of each call, and mutual TLS on ARPCP behind it.
async fn grpc_channel(cluster: &Cluster) -> anyhow::Result<Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(cluster.url.clone())?;
    if let Some(tls) = &cluster.grpc_tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    Ok(endpoint.connect().await?)
}

/// Async throughput of `tasks` `add` tasks: `concurrency` clients over a few
/// HTTP/2 connections, each submitting and fetching results; tasks per second.
///
/// The clients run on a single-threaded runtime of their own (one OS thread, no
/// wake-ups across threads), so that the bench takes as little of the machine it
/// shares with the cluster as 256 concurrent gRPC clients can; `BENCH_CLIENT_RUNTIME=multi`
/// runs them on the bench's multi-threaded runtime instead, as before.
async fn throughput(cluster: &Cluster, tasks: usize, concurrency: usize) -> anyhow::Result<f64> {
    if std::env::var("BENCH_CLIENT_RUNTIME").is_ok_and(|v| v == "multi") {
        return Ok(async_run(cluster, tasks, concurrency).await?.0);
    }
    // Nothing else runs on the bench's own runtime meanwhile: blocking it is fine.
    // The runtime is made and dropped on its thread (not in an async context).
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async_run(cluster, tasks, concurrency))
        })
        .join()
    });
    match out {
        Ok(r) => Ok(r?.0),
        Err(_) => anyhow::bail!("{}: the client thread panicked", cluster.name),
    }
}

/// [`throughput`], with every Submit's latency (sorted).
async fn async_run(
    cluster: &Cluster,
    tasks: usize,
    concurrency: usize,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(GatewayClient::new(grpc_channel(cluster).await?));
    }
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let mut c = clients[w % clients.len()].clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut submits = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= tasks {
                    return Ok::<_, anyhow::Error>(submits);
                }
                let sent = Instant::now();
                let id = c
                    .submit(pb::SubmitRequest {
                        procedure: "add".into(),
                        args: vec![num(i as f64), num(1.0)],
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .task_id;
                submits.push(sent.elapsed());
                let t = c
                    .get_result(pb::GetResultRequest {
                        task_id: id,
                        wait: Some(prost_types::Duration {
                            seconds: 60,
                            nanos: 0,
                        }),
                    })
                    .await?
                    .into_inner();
                let want = (i + 1) as f64;
                let got = match t.result.and_then(|v| v.kind) {
                    Some(prost_types::value::Kind::NumberValue(n)) => n,
                    other => anyhow::bail!("task {i}: status {} result {other:?}", t.status),
                };
                anyhow::ensure!(got == want, "task {i}: add gave {got}, expected {want}");
            }
        });
    }
    let mut submits = Vec::with_capacity(tasks);
    while let Some(r) = workers.join_next().await {
        submits.extend(r??);
    }
    let elapsed = start.elapsed();
    let done = submits.len();
    anyhow::ensure!(
        done == tasks,
        "{}: {done} of {tasks} tasks finished",
        cluster.name
    );
    submits.sort();
    Ok((tasks as f64 / elapsed.as_secs_f64(), submits))
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `BENCH_FILL=N`: fills a plaintext cluster's store with N `add` tasks (every
/// Submit durable, every result fetched) and prints, every `BENCH_FILL_STEP`
/// tasks, that step's throughput and Submit p50/p99, the gateway's RSS, the
/// store's size on disk, and ListTasks p50/p99 per filter: how the gateway fares
/// as its store grows. At the end the gateway is restarted with a retention count
/// `BENCH_RETENTION_DROP` (10,000) below what it holds, and the pass is timed.
async fn fill(total: usize, step: usize, concurrency: usize, config: &str) -> anyhow::Result<()> {
    let mut cluster = start_cluster("plaintext", false, config).await?;
    let gateway = cluster._gateway.child.id();
    let data = cluster._gateway.data_dir();
    let samples = env_usize("BENCH_LIST_SAMPLES", 200);
    println!(
        "fill: gateway + {AGENTS} agents on loopback, {} CPUs; {total} add tasks, {concurrency} concurrent clients, figures every {step}; ListTasks: {samples} calls a filter, default page size",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut stored = 0;
    while stored < total {
        let n = step.min(total - stored);
        let (per_sec, submits) = async_run(&cluster, n, concurrency).await?;
        stored += n;
        let bytes = dir_bytes(&data);
        println!(
            "{stored:>9} stored: {per_sec:>6.0} tasks/s, Submit p50 {:>5.0} µs p99 {:>6.0} µs, gateway RSS {:>6.1} MiB, store {:>7.1} MiB ({:.0} B a task)",
            micros(percentile(&submits, 0.5)),
            micros(percentile(&submits, 0.99)),
            rss_kib(gateway).unwrap_or(0) as f64 / 1024.0,
            bytes as f64 / (1024.0 * 1024.0),
            bytes as f64 / stored as f64
        );
        list_figures(&cluster, samples).await?;
    }
    // `BENCH_FILL_MAX_BYTES_PER_TASK`: fail on a store grown past this (CI).
    if let Some(max) = std::env::var("BENCH_FILL_MAX_BYTES_PER_TASK")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        let per_task = dir_bytes(&data) as f64 / stored.max(1) as f64;
        anyhow::ensure!(
            per_task <= max,
            "the store takes {per_task:.0} B a task after {stored} tasks, above BENCH_FILL_MAX_BYTES_PER_TASK = {max:.0}"
        );
    }
    let drop = env_usize("BENCH_RETENTION_DROP", 10_000).min(stored);
    retention_pass(&mut cluster, stored - drop).await
}

/// ListTasks p50/p99 for each filter a user would give, and the unfiltered
/// first page.
async fn list_figures(cluster: &Cluster, samples: usize) -> anyhow::Result<()> {
    let mut client = GatewayClient::new(grpc_channel(cluster).await?);
    let agent = client
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .first()
        .map(|a| a.agent_id.clone())
        .unwrap_or_default();
    let filters = [
        (
            "status done",
            pb::ListTasksRequest {
                status: pb::TaskStatus::Done as i32,
                ..Default::default()
            },
        ),
        (
            "procedure add",
            pb::ListTasksRequest {
                procedure: "add".into(),
                ..Default::default()
            },
        ),
        (
            "agent",
            pb::ListTasksRequest {
                agent_id: agent,
                ..Default::default()
            },
        ),
        (
            "status failed (none)",
            pb::ListTasksRequest {
                status: pb::TaskStatus::Failed as i32,
                ..Default::default()
            },
        ),
        ("no filter", pb::ListTasksRequest::default()),
    ];
    let mut line = String::from("          ListTasks p50/p99 µs:");
    for (name, req) in filters {
        let took = latencies(samples, || {
            let (mut c, req) = (client.clone(), req.clone());
            async move {
                c.list_tasks(req).await?;
                Ok(())
            }
        })
        .await?;
        line.push_str(&format!(
            " {name} {:.0}/{:.0};",
            micros(percentile(&took, 0.5)),
            micros(percentile(&took, 0.99))
        ));
    }
    println!("{line}");
    Ok(())
}

/// Stops the gateway, starts it again on its data with `--retention-count keep`
/// and times the retention pass it runs at start: from the process's start to its
/// log line, and the pass alone as the line says (`ms=`, where the binary logs it).
async fn retention_pass(cluster: &mut Cluster, keep: usize) -> anyhow::Result<()> {
    let pid = cluster._gateway.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    cluster._gateway.child.wait()?;
    let data = cluster._gateway.data_dir();
    let keep = keep.to_string();
    let started = Instant::now();
    let mut child = Command::new(arpcp_bin())
        .args(["gateway", "--grpc", "127.0.0.1:0", "--arpcp", "127.0.0.1:0"])
        .args(["--retention-count", &keep, "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut found = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if line.contains("retention dropped finished tasks") {
            found = Some(line);
            break;
        }
    }
    let to_line = started.elapsed();
    // A gateway that opened the full store and nothing else: what the store alone
    // holds in memory, without the fill's history.
    let rss = rss_kib(child.id()).unwrap_or(0) as f64 / 1024.0;
    let _ = child.kill();
    let _ = child.wait();
    let line =
        found.ok_or_else(|| anyhow::anyhow!("the gateway ended without a retention pass"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    println!(
        "retention (restart with --retention-count {keep}): removed {}, the pass {} ms, start to its log line {:.0} ms, gateway RSS then {rss:.1} MiB",
        field("removed=").unwrap_or_default(),
        field("ms=").unwrap_or_else(|| "(not logged)".into()),
        to_line.as_secs_f64() * 1e3
    );
    Ok(())
}

/// Latencies of `samples` sequential sync calls (Submit with `sync`: ARPCP TASK).
async fn sync_calls(cluster: &Cluster, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let client = GatewayClient::new(grpc_channel(cluster).await?);
    latencies(samples, || {
        let mut c = client.clone();
        async move {
            let t = c
                .submit(pb::SubmitRequest {
                    procedure: "add".into(),
                    args: vec![num(2.0), num(3.0)],
                    sync: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let status = t.task.map(|t| t.status).unwrap_or_default();
            anyhow::ensure!(
                status == pb::TaskStatus::Done as i32,
                "sync call ended {status}"
            );
            Ok(())
        }
    })
    .await
}

/// Latencies of `samples` sequential ARPCP TASK `add` calls straight to the
/// cluster's first agent, holding the gateway's certificate when it uses TLS: the
/// transport's share of a sync call, without the gateway and gRPC around it.
async fn arpcp_task_calls(cluster: &Cluster, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let client = Arc::new(
        ArpcpClient::new(Duration::from_secs(3), Duration::from_secs(10))
            .with_tls(cluster.agent_tls.clone()),
    );
    let task = Request::parse(
        serde_json::json!({
            "protocol": "arpcp", "version": "1.0", "method": "TASK",
            "remote_procedure": "add", "remote_procedure_args": [2, 3],
        })
        .to_string()
        .as_bytes(),
    )?;
    let addr = cluster.agent.clone();
    latencies(samples, || {
        let (client, task, addr) = (client.clone(), task.clone(), addr.clone());
        async move {
            let r = client.call(&addr, &task).await?;
            anyhow::ensure!(r.data["result"] == 5, "TASK add answered {r:?}");
            Ok(())
        }
    })
    .await
}

/// One cluster's figures over the rounds.
#[derive(Default)]
struct Figures {
    throughput: Vec<f64>,
    sync_p50: Vec<Duration>,
    /// Every round's sync calls, for the overall percentiles.
    sync_all: Vec<Duration>,
    /// Every round's ARPCP TASKs straight to an agent.
    task_all: Vec<Duration>,
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tasks = env_usize("BENCH_TASKS", 20_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 256);
    let samples = env_usize("BENCH_SAMPLES", 2_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);

    // The smallest Opal model, for the overhead of running one through the cluster.
    let model_dir = tempfile::tempdir()?;
    let model = format!("{}/examples/opal/instant.py", env!("CARGO_MANIFEST_DIR"));
    let config = model_dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[[procedure]]\nname = \"instant\"\nkind = \"opal\"\ncommand = [\"python3\", \"{model}\"]\npoll_ms = 10\n"),
    )?;
    let config = config.to_string_lossy().into_owned();
    if let Some(total) = std::env::var("BENCH_FILL")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let step = env_usize("BENCH_FILL_STEP", 100_000).max(1);
        return fill(total, step, concurrency, &config).await;
    }
    // Both clusters run side by side; rounds alternate which is measured first, so
    // that drift of the machine (other load, CPU frequency, the stores growing)
    // falls on both alike.
    let clusters = [
        start_cluster("plaintext", false, &config).await?,
        start_cluster("mutual TLS", true, &config).await?,
    ];
    let idle_agent = rss_kib(clusters[0]._agents[0].child.id()).unwrap_or(0) as f64 / 1024.0;
    let rss: Vec<PeakRss> = clusters.iter().map(|c| PeakRss::start(c.pids())).collect();
    for c in &clusters {
        throughput(c, tasks / 10, concurrency).await?; // warm-up
    }
    let mut figures: [Figures; 2] = Default::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let f = &mut figures[i];
            f.throughput
                .push(throughput(&clusters[i], tasks, concurrency).await?);
            let sync = sync_calls(&clusters[i], samples).await?;
            f.sync_p50.push(percentile(&sync, 0.5));
            f.sync_all.extend(sync);
            f.task_all
                .extend(arpcp_task_calls(&clusters[i], samples).await?);
        }
    }
    let peaks: Vec<(Vec<f64>, f64)> = rss.into_iter().map(PeakRss::stop).collect();
    for f in &mut figures {
        f.sync_all.sort();
        f.task_all.sort();
    }
    let plain = &clusters[0];
    let client = GatewayClient::new(grpc_channel(plain).await?);
    // An Opal model through the cluster (sync Submit → its table back) against the
    // same program run by hand (spawn, calculate, read the answer), in this run.
    let opal_samples = env_usize("BENCH_OPAL_SAMPLES", 200);
    let opal = latencies(opal_samples, || {
        let mut c = client.clone();
        async move {
            let t = c
                .submit(pb::SubmitRequest {
                    procedure: "instant".into(),
                    sync: true,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .task
                .ok_or_else(|| anyhow::anyhow!("no task"))?;
            anyhow::ensure!(
                t.table.as_ref().is_some_and(|tab| tab.rows.len() == 3),
                "the model's table did not come back: {t:?}"
            );
            Ok(())
        }
    })
    .await?;
    let by_hand = latencies(opal_samples, || {
        let model = model.clone();
        async move {
            let mut child = tokio::process::Command::new("python3")
                .arg(&model)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
            stdin
                .write_all(b"{ request = calculate main = { n = 3 } }\n")
                .await?;
            drop(stdin);
            let out = child.wait_with_output().await?;
            anyhow::ensure!(
                String::from_utf8_lossy(&out.stdout).contains("status = ready"),
                "the model answered nothing"
            );
            Ok(())
        }
    })
    .await?;
    let tonic = tonic_baseline(samples).await?;
    let tcp = tcp_json_baseline(samples).await?;
    let base = percentile(&tonic, 0.5) + percentile(&tcp, 0.5);

    println!(
        "arpcp cluster bench: gateway + {AGENTS} agents on loopback, {} CPUs; {rounds} rounds \
         of plaintext and TLS (mutual TLS on ARPCP, gRPC over TLS with a client certificate), alternating",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("async add tasks          : {tasks} tasks a round, {concurrency} concurrent clients");
    for (round, (p, t)) in figures[0]
        .throughput
        .iter()
        .zip(&figures[1].throughput)
        .enumerate()
    {
        println!(
            "  round {}                : plaintext {p:.0} tasks/s, TLS {t:.0} tasks/s; sync p50 {:.0} µs, {:.0} µs",
            round + 1,
            micros(figures[0].sync_p50[round]),
            micros(figures[1].sync_p50[round]),
        );
    }
    let (tp, tt) = (
        median_f64(&figures[0].throughput),
        median_f64(&figures[1].throughput),
    );
    println!("  end-to-end throughput  : plaintext {tp:.0} tasks/s, mutual TLS {tt:.0} tasks/s (medians; submitted, durable, run, result fetched)");
    println!("  TLS / plaintext        : {:.2}", tt / tp);
    let (sp, st) = (&figures[0].sync_all, &figures[1].sync_all);
    println!(
        "sync add call (TASK)     : plaintext p50 {:.0} µs p99 {:.0} µs; mutual TLS p50 {:.0} µs p99 {:.0} µs ({} calls each)",
        micros(percentile(sp, 0.5)),
        micros(percentile(sp, 0.99)),
        micros(percentile(st, 0.5)),
        micros(percentile(st, 0.99)),
        sp.len()
    );
    println!(
        "  TLS − plaintext (p50)  : {:+.0} µs",
        micros(percentile(st, 0.5)) - micros(percentile(sp, 0.5))
    );
    for (c, (p, pss)) in clusters.iter().zip(&peaks) {
        let agents: Vec<String> = p[1..].iter().map(|m| format!("{m:.1}")).collect();
        println!(
            "peak RSS, {:<10}     : gateway {:.1} MiB, agents {} MiB; total {:.1} MiB; together {:.1} MiB (summed PSS: shared pages once)",
            c.name,
            p[0],
            agents.join(" + "),
            p.iter().sum::<f64>(),
            pss
        );
    }
    println!("idle agent RSS           : {idle_agent:.1} MiB (before any work)");
    let (ap, at) = (&figures[0].task_all, &figures[1].task_all);
    println!(
        "ARPCP TASK to an agent   : plaintext p50 {:.0} µs p99 {:.0} µs; mutual TLS p50 {:.0} µs p99 {:.0} µs (no gateway; TLS − plaintext p50 {:+.0} µs)",
        micros(percentile(ap, 0.5)),
        micros(percentile(ap, 0.99)),
        micros(percentile(at, 0.5)),
        micros(percentile(at, 0.99)),
        micros(percentile(at, 0.5)) - micros(percentile(ap, 0.5))
    );
    println!(
        "baseline tonic unary     : p50 {:.0} µs  p99 {:.0} µs",
        micros(percentile(&tonic, 0.5)),
        micros(percentile(&tonic, 0.99))
    );
    println!(
        "baseline TCP JSON echo   : p50 {:.0} µs  p99 {:.0} µs",
        micros(percentile(&tcp, 0.5)),
        micros(percentile(&tcp, 0.99))
    );
    println!(
        "plaintext sync p50 / (tonic p50 + TCP p50) = {:.2}",
        percentile(sp, 0.5).as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "Opal model, sync Submit  : p50 {:.0} µs  p99 {:.0} µs  ({opal_samples} calls, table back)",
        micros(percentile(&opal, 0.5)),
        micros(percentile(&opal, 0.99))
    );
    println!(
        "same model run by hand   : p50 {:.0} µs  p99 {:.0} µs  (spawn, calculate, answer)",
        micros(percentile(&by_hand, 0.5)),
        micros(percentile(&by_hand, 0.99))
    );
    println!(
        "Opal through the cluster / by hand (p50) = {:.2}",
        percentile(&opal, 0.5).as_secs_f64() / percentile(&by_hand, 0.5).as_secs_f64()
    );
    drop(clusters);
    drop(model_dir);
    Ok(())
}
