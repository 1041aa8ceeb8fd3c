//! Many agents on one gateway: membership cost and placement evenness.
//!
//! For each count in `BENCH_AGENTS` (default 100, 500, 1000) a real gateway (the
//! `arpcp` binary of the profile this runs under) at `--echo-interval-ms 1000`
//! and a light responder in this process that serves that many agent identities,
//! one loopback port each (`responder.rs`: it announces, answers echoes, takes
//! `ATASK add` and delivers results as `arpcp agent` does). Measured: the time
//! until all are alive, the gateway's CPU (utime + stime from `/proc`) over
//! `BENCH_IDLE_SECS` (30) idle, as % of one core, its RSS and open descriptors,
//! how often an echo came on a new connection, then `BENCH_TASKS` (20,000) `add`
//! tasks through gRPC (`BENCH_CONCURRENCY` 64 clients, every result checked) and
//! how evenly they were placed: tasks per agent, min / max / standard deviation.
//!
//! `BENCH_NETNS=N` runs the same with N real `arpcp agent` processes instead, each
//! in its own network namespace behind a bridge, found by the gateway's scan
//! (needs root; says `SKIPPED: …` and ends when namespaces cannot be made).
//!
//! `BENCH_CHECK=1` makes gross regressions fail the run (for CI): idle CPU above
//! `BENCH_MAX_CPU_PERCENT` (50) of a core, an agent not alive at the end of the
//! idle window, echoes reconnecting (more than one in ten agents a window), an
//! agent given no task, or one given more than `BENCH_MAX_SKEW` (3) times the mean.
//! Speed is never checked.

#[path = "../common/daemon.rs"]
mod daemon;
#[path = "../../tests/common/ip.rs"]
mod ip;
#[allow(dead_code)]
#[path = "../../tests/common/netns.rs"]
mod netns;
mod responder;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arpcp::pb;
use arpcp::pb::gateway_client::GatewayClient;
use tonic::transport::Channel;

use daemon::{arpcp_bin, Daemon};

/// The echo interval the figures are for.
const ECHO_INTERVAL_MS: &str = "1000";
/// How long agents may take to be all alive before the run fails.
const ALIVE_DEADLINE: Duration = Duration::from_secs(300);
/// gRPC connections the task clients share.
const CHANNELS: usize = 4;
/// Bound of one gRPC call (GetResult waits at most this less a second).
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) a process used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3,
    // utime 14 and stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    kib as f64 / 1024.0
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's open-file limit to its hard limit: the gateway and the
/// responder it starts hold a socket per agent, some thousands.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn grpc(addr: &str) -> anyhow::Result<GatewayClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(RPC_TIMEOUT)
        .connect()
        .await?;
    Ok(GatewayClient::new(channel))
}

/// Agents alive now, of those listed.
async fn alive(client: &mut GatewayClient<Channel>) -> anyhow::Result<(usize, usize)> {
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    let alive = agents
        .iter()
        .filter(|a| a.state == pb::AgentState::Alive as i32)
        .count();
    Ok((alive, agents.len()))
}

async fn wait_alive(client: &mut GatewayClient<Channel>, n: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let (up, listed) = alive(client).await?;
        if up >= n {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < ALIVE_DEADLINE,
            "only {up} of {n} agents alive ({listed} listed) after {ALIVE_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The gateway idle for `secs`: its CPU as % of one core, RSS, descriptors, and
/// the agents alive at the end.
struct Idle {
    cpu_percent: f64,
    rss_mib: f64,
    fds: usize,
    alive: usize,
}

async fn idle(
    gateway: &Daemon,
    client: &mut GatewayClient<Channel>,
    secs: u64,
) -> anyhow::Result<Idle> {
    let pid = gateway.pid();
    let (c0, t0) = (
        cpu_time(pid).ok_or_else(|| anyhow::anyhow!("no /proc/{pid}/stat"))?,
        Instant::now(),
    );
    // A measurement window, not a wait for anything.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (c1, t1) = (
        cpu_time(pid).ok_or_else(|| anyhow::anyhow!("no /proc/{pid}/stat"))?,
        Instant::now(),
    );
    let cpu_percent = (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64() * 100.0;
    Ok(Idle {
        cpu_percent,
        rss_mib: rss_mib(pid),
        fds: fds(pid),
        alive: alive(client).await?.0,
    })
}

/// Submits `tasks` `add` tasks from `concurrency` clients, checks every result,
/// and counts the tasks each agent (by id) ran.
async fn run_tasks(
    grpc_addr: &str,
    tasks: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, HashMap<String, u64>)> {
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(grpc(grpc_addr).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let mut c = clients[w % CHANNELS].clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut ran: HashMap<String, u64> = HashMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    return Ok::<_, anyhow::Error>(ran);
                }
                let num = |n: f64| prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(n)),
                };
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
                            seconds: RPC_TIMEOUT.as_secs() as i64 - 1,
                            nanos: 0,
                        }),
                    })
                    .await?
                    .into_inner();
                let got = match t.result.as_ref().and_then(|v| v.kind.as_ref()) {
                    Some(prost_types::value::Kind::NumberValue(n)) => *n,
                    other => anyhow::bail!("task {i}: status {} result {other:?}", t.status),
                };
                anyhow::ensure!(
                    got == (i + 1) as f64,
                    "task {i}: add gave {got}, expected {}",
                    i + 1
                );
                *ran.entry(t.agent_id).or_default() += 1;
            }
        });
    }
    let mut ran: HashMap<String, u64> = HashMap::new();
    while let Some(r) = workers.join_next().await {
        for (agent, n) in r?? {
            *ran.entry(agent).or_default() += n;
        }
    }
    Ok((start.elapsed(), ran))
}

/// Tasks per agent: min, max, mean, standard deviation, agents given none.
struct Spread {
    min: u64,
    max: u64,
    mean: f64,
    stddev: f64,
    none: usize,
}

fn spread(counts: &[u64]) -> Spread {
    let n = counts.len().max(1) as f64;
    let mean = counts.iter().sum::<u64>() as f64 / n;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    Spread {
        min: counts.iter().copied().min().unwrap_or(0),
        max: counts.iter().copied().max().unwrap_or(0),
        mean,
        stddev: var.sqrt(),
        none: counts.iter().filter(|&&c| c == 0).count(),
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min {} max {} mean {:.1} stddev {:.2}, {} agents given none",
            self.min, self.max, self.mean, self.stddev, self.none
        )
    }
}

/// What `BENCH_CHECK` holds a run to.
struct Checks {
    on: bool,
    max_cpu: f64,
    max_skew: f64,
    failures: Vec<String>,
}

impl Checks {
    fn from_env() -> Checks {
        Checks {
            on: std::env::var("BENCH_CHECK").is_ok_and(|v| v == "1"),
            max_cpu: env_f64("BENCH_MAX_CPU_PERCENT", 50.0),
            max_skew: env_f64("BENCH_MAX_SKEW", 3.0),
            failures: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: String) {
        if !ok {
            println!("  CHECK FAILED: {what}");
            self.failures.push(what);
        }
    }

    fn idle(&mut self, label: &str, n: usize, idle: &Idle) {
        self.check(
            idle.cpu_percent <= self.max_cpu,
            format!(
                "{label}: idle gateway used {:.1} % of a core, above {:.0} % (BENCH_MAX_CPU_PERCENT)",
                idle.cpu_percent, self.max_cpu
            ),
        );
        self.check(
            idle.alive == n,
            format!(
                "{label}: {} of {n} agents alive at the end of the idle window",
                idle.alive
            ),
        );
    }

    fn spread(&mut self, label: &str, s: &Spread) {
        self.check(
            s.none == 0,
            format!("{label}: {} agents were given no task", s.none),
        );
        self.check(
            s.max as f64 <= self.max_skew * s.mean,
            format!(
                "{label}: an agent was given {} tasks, over {} × the mean {:.1} (BENCH_MAX_SKEW)",
                s.max, self.max_skew, s.mean
            ),
        );
    }
}

async fn start_gateway(extra: &[&str]) -> anyhow::Result<(Daemon, GatewayClient<Channel>)> {
    let mut args = vec![
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--echo-interval-ms",
        ECHO_INTERVAL_MS,
    ];
    args.extend_from_slice(extra);
    let gateway = Daemon::spawn(&arpcp_bin(), &args)?;
    let client = grpc(&gateway.addr("grpc")).await?;
    Ok((gateway, client))
}

/// One count of responder agents.
async fn responders(
    n: usize,
    secs: u64,
    tasks: usize,
    conc: usize,
    checks: &mut Checks,
) -> anyhow::Result<()> {
    let label = format!("{n} responder agents");
    let (gateway, mut client) = start_gateway(&["--arpcp", "127.0.0.1:0"]).await?;
    let controller = gateway.addr("arpcp");
    let responder = responder::Responder::start(n, &controller).await?;
    let started = Instant::now();
    let answered = responder
        .announce(&controller, started + ALIVE_DEADLINE)
        .await;
    anyhow::ensure!(
        answered == n,
        "{label}: {answered} of {n} announcements answered"
    );
    wait_alive(&mut client, n).await?;
    println!(
        "{label}: all alive {:.1} s after the first announcement; gateway pid {}",
        started.elapsed().as_secs_f64(),
        gateway.pid()
    );
    let (echoes0, reconnects0) = (responder.echoes(), responder.echo_reconnects());
    let idle_figures = idle(&gateway, &mut client, secs).await?;
    let (echoes, reconnects) = (
        responder.echoes() - echoes0,
        responder.echo_reconnects() - reconnects0,
    );
    println!(
        "{label}: idle {secs} s: gateway CPU {:.1} % of a core, RSS {:.1} MiB, {} fds; {echoes} echoes answered, {reconnects} on a new connection; {} alive",
        idle_figures.cpu_percent, idle_figures.rss_mib, idle_figures.fds, idle_figures.alive
    );
    checks.idle(&label, n, &idle_figures);
    checks.check(
        reconnects as usize <= n / 10,
        format!("{label}: {reconnects} echoes came on a new connection in {secs} s (connections are not reused)"),
    );
    if tasks > 0 {
        let (took, by_gateway) = run_tasks(&gateway.addr("grpc"), tasks, conc).await?;
        let received = responder.atasks();
        let s = spread(&received);
        println!(
            "{label}: {tasks} add tasks in {:.1} s ({:.0}/s, {conc} clients); tasks per agent: {s}",
            took.as_secs_f64(),
            tasks as f64 / took.as_secs_f64()
        );
        let gw: Vec<u64> = by_gateway.values().copied().collect();
        println!(
            "{label}: as the gateway reports them: {} agents ran tasks, max {}",
            gw.len(),
            gw.iter().max().unwrap_or(&0)
        );
        checks.spread(&label, &s);
        println!(
            "{label}: after the tasks: gateway RSS {:.1} MiB, {} fds",
            rss_mib(gateway.pid()),
            fds(gateway.pid())
        );
    }
    report_complaints(&label, &gateway);
    drop(responder);
    Ok(())
}

fn report_complaints(label: &str, gateway: &Daemon) {
    let lines = gateway.complaints();
    if !lines.is_empty() {
        println!(
            "{label}: the gateway logged {} warnings, the first:",
            lines.len()
        );
        for l in lines.iter().take(5) {
            println!("    {l}");
        }
    }
}

/// `BENCH_NETNS=N`: real agents in network namespaces, found by the scan.
async fn namespaces(
    hosts: usize,
    secs: u64,
    tasks: usize,
    conc: usize,
    checks: &mut Checks,
) -> anyhow::Result<()> {
    let label = format!("{hosts} agents in namespaces");
    let net = match netns::Net::setup(&format!("ab{}", std::process::id()), 214, hosts) {
        Ok(net) => net,
        Err(e) => {
            println!("SKIPPED: network namespaces unavailable: {e}");
            return Ok(());
        }
    };
    let mut agents = Vec::new();
    let bin = arpcp_bin();
    for h in &net.hosts {
        let listen = format!("{}:7018", h.ip);
        agents.push(Daemon::spawn(
            "ip",
            &[
                "netns",
                "exec",
                &h.ns,
                &bin,
                "agent",
                "--listen",
                &listen,
                "--capacity",
                "4",
                "--insecure",
            ],
        )?);
    }
    let range = net.range();
    let arpcp_listen = format!("{}:0", net.bridge_ip);
    let started = Instant::now();
    let (gateway, mut client) = start_gateway(&[
        "--arpcp",
        &arpcp_listen,
        "--scan",
        &range,
        "--scan-port",
        "7018",
        "--insecure",
    ])
    .await?;
    wait_alive(&mut client, hosts).await?;
    println!(
        "{label}: all alive {:.1} s after the gateway started; gateway pid {}",
        started.elapsed().as_secs_f64(),
        gateway.pid()
    );
    let idle_figures = idle(&gateway, &mut client, secs).await?;
    println!(
        "{label}: idle {secs} s: gateway CPU {:.1} % of a core (it also scans the /24 every second), RSS {:.1} MiB, {} fds; {} alive",
        idle_figures.cpu_percent, idle_figures.rss_mib, idle_figures.fds, idle_figures.alive
    );
    checks.idle(&label, hosts, &idle_figures);
    if tasks > 0 {
        let (took, ran) = run_tasks(&gateway.addr("grpc"), tasks, conc).await?;
        let mut counts: Vec<u64> = ran.values().copied().collect();
        counts.resize(hosts.max(counts.len()), 0);
        let s = spread(&counts);
        println!(
            "{label}: {tasks} add tasks in {:.1} s ({:.0}/s, {conc} clients); tasks per agent: {s}",
            took.as_secs_f64(),
            tasks as f64 / took.as_secs_f64()
        );
        checks.spread(&label, &s);
    }
    report_complaints(&label, &gateway);
    drop(gateway);
    drop(agents);
    drop(net);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_fd_limit();
    let secs = env_usize("BENCH_IDLE_SECS", 30) as u64;
    let tasks = env_usize("BENCH_TASKS", 20_000);
    let conc = env_usize("BENCH_CONCURRENCY", 64).max(1);
    let mut checks = Checks::from_env();
    println!(
        "agents bench: {} CPUs, arpcp binary {}, echo interval {ECHO_INTERVAL_MS} ms",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        arpcp_bin()
    );
    if let Some(hosts) = std::env::var("BENCH_NETNS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        namespaces(hosts, secs, tasks, conc, &mut checks).await?;
    } else {
        let counts: Vec<usize> = std::env::var("BENCH_AGENTS")
            .unwrap_or_else(|_| "100,500,1000".into())
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        for n in counts {
            responders(n, secs, tasks, conc, &mut checks).await?;
        }
    }
    if checks.on && !checks.failures.is_empty() {
        anyhow::bail!(
            "{} checks failed: {:?}",
            checks.failures.len(),
            checks.failures
        );
    }
    Ok(())
}
