//! End-to-end benchmark of a local cluster, with in-run baselines.
//!
//! Starts a real gateway and two real agents (the `arpcp` binary, on loopback), then
//! measures in one run:
//! * async throughput: `add` tasks submitted concurrently through gRPC, every result
//!   fetched (each task durable before its Submit returned);
//! * p50/p99 latency of a synchronous call (Submit with `sync`: ARPCP TASK);
//! * baselines: a bare tonic unary call (grpc.health Check on a server that serves
//!   nothing else) and a bare TCP JSON-line echo, both in this process.
//!
//! * an Opal model that answers at once, run through the cluster (sync Submit, the
//!   typed table back) against the same program run by hand, p50 and p99.
//!
//! `cargo bench --bench cluster` (env: BENCH_TASKS, BENCH_CONCURRENCY, BENCH_SAMPLES,
//! BENCH_OPAL_SAMPLES).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arpcp::pb;
use arpcp::pb::gateway_client::GatewayClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::transport::Channel;

struct Daemon {
    child: Child,
    addrs: serde_json::Value,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> anyhow::Result<Daemon> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_arpcp"))
        .args(args)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addrs = serde_json::from_str(&line)?;
    Ok(Daemon {
        child,
        addrs,
        _dir: dir,
    })
}

fn addr(d: &Daemon, key: &str) -> String {
    d.addrs[key].as_str().unwrap_or_default().to_string()
}

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tasks = env_usize("BENCH_TASKS", 20_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 256);
    let samples = env_usize("BENCH_SAMPLES", 2_000);

    let gateway = spawn(&[
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--echo-interval-ms",
        "500",
    ])?;
    let controller = addr(&gateway, "arpcp");
    // The smallest Opal model, for the overhead of running one through the cluster.
    let model_dir = tempfile::tempdir()?;
    let model = format!("{}/examples/opal/instant.py", env!("CARGO_MANIFEST_DIR"));
    let config = model_dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[[procedure]]\nname = \"instant\"\nkind = \"opal\"\ncommand = [\"python3\", \"{model}\"]\npoll_ms = 10\n"),
    )?;
    let config = config.to_string_lossy().into_owned();
    let agents: Vec<Daemon> = (0..2)
        .map(|_| {
            spawn(&[
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--controller",
                &controller,
                "--capacity",
                "64",
                "--config",
                &config,
            ])
        })
        .collect::<anyhow::Result<_>>()?;
    let url = format!("http://{}", addr(&gateway, "grpc"));
    let mut client = GatewayClient::new(channel(&url).await?);
    wait_for_agents(&mut client, agents.len()).await?;

    // Async throughput: `concurrency` clients over a few HTTP/2 connections.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(GatewayClient::new(channel(&url).await?));
    }
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let mut c = clients[w % clients.len()].clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut done = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= tasks {
                    return Ok::<usize, anyhow::Error>(done);
                }
                let id = c
                    .submit(pb::SubmitRequest {
                        procedure: "add".into(),
                        args: vec![num(i as f64), num(1.0)],
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .task_id;
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
                done += 1;
            }
        });
    }
    let mut done = 0;
    while let Some(r) = workers.join_next().await {
        done += r??;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(done == tasks, "{done} of {tasks} tasks finished");
    let throughput = tasks as f64 / elapsed.as_secs_f64();

    // Sync call latency.
    let sync = latencies(samples, || {
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
    .await?;
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
        "arpcp cluster bench: gateway + 2 agents on loopback, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "async add tasks          : {tasks} tasks, {concurrency} concurrent clients, {:.2} s",
        elapsed.as_secs_f64()
    );
    println!("  end-to-end throughput  : {throughput:.0} tasks/s (submitted, durable, run, result fetched)");
    println!(
        "sync add call (TASK)     : p50 {:.0} µs  p99 {:.0} µs  ({samples} calls)",
        micros(percentile(&sync, 0.5)),
        micros(percentile(&sync, 0.99))
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
        "sync p50 / (tonic p50 + TCP p50) = {:.2}",
        percentile(&sync, 0.5).as_secs_f64() / base.as_secs_f64()
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
    drop(agents);
    drop(gateway);
    drop(model_dir);
    Ok(())
}
