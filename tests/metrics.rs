//! Metrics and logs of the real daemons: `--metrics` scraped over HTTP after known
//! work, `--log-format json` task-end lines, no colour codes in piped stderr, and
//! HTTP/2 internals quiet at `RUST_LOG=debug` unless asked for.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};

use arpcp::pb;
use common::gateway::{assert_task_status, Cluster, Gw};
use common::{tempdir, wait_for, wait_until, Daemon, ARPCP, IO_TIMEOUT, STARTUP_TIMEOUT, WAIT};
use serde_json::{json, Value};

/// `GET PATH` over HTTP/1.1; the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the HTTP response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a metrics page is sent whole: {head}"
    );
    (status, body.to_string())
}

fn scrape(daemon: &Daemon) -> String {
    let (status, body) = http_get(&daemon.addr("metrics"), "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the series has the value `want`.
fn wait_series(daemon: &Daemon, name: &str, want: f64) {
    wait_for(WAIT, &format!("{name} = {want}"), || {
        (series(&scrape(daemon), name) == Some(want)).then_some(())
    });
}

#[test]
fn scraped_counts_match_known_work() {
    let agent = Daemon::agent(&["--metrics", "127.0.0.1:0"]);
    let c = Cluster::start(vec![agent], &["--metrics", "127.0.0.1:0"]);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(c.gw.submit_ok("add", json!([i, 1])));
    }
    let div = c.gw.submit_ok("div", json!([1, 0]));
    for id in &ids {
        assert_task_status(&c.gw.wait_final(id, WAIT), pb::TaskStatus::Done);
    }
    assert_task_status(&c.gw.wait_final(&div, WAIT), pb::TaskStatus::Failed);

    let gw = &c.gateway;
    wait_series(
        gw,
        r#"arpcp_tasks_ended_total{procedure="add",status="done"}"#,
        3.0,
    );
    wait_series(
        gw,
        r#"arpcp_tasks_ended_total{procedure="div",status="failed"}"#,
        1.0,
    );
    let text = scrape(gw);
    let at = |name: &str| series(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    assert_eq!(at(r#"arpcp_tasks_submitted_total{procedure="add"}"#), 3.0);
    assert_eq!(at(r#"arpcp_tasks_submitted_total{procedure="div"}"#), 1.0);
    assert_eq!(
        series(
            &text,
            r#"arpcp_tasks_ended_total{procedure="add",status="failed"}"#
        ),
        None
    );
    assert_eq!(
        at(r#"arpcp_task_duration_seconds_count{procedure="add"}"#),
        3.0
    );
    assert_eq!(
        at(r#"arpcp_submit_duration_seconds_count{mode="async"}"#),
        4.0
    );
    assert_eq!(at(r#"arpcp_agents{state="alive"}"#), 1.0);
    assert_eq!(at(r#"arpcp_agents{state="gone"}"#), 0.0);
    let agent_addr = c.agents[0].arpcp();
    let atasks = format!(r#"arpcp_client_requests_total{{method="ATASK",peer="{agent_addr}"}}"#);
    assert_eq!(at(&atasks), 4.0);
    assert!(at(r#"arpcp_store_flush_duration_seconds_count{store="task store"}"#) >= 1.0);
    assert!(at(r#"arpcp_store_commit_group_size_count{store="task store"}"#) >= 1.0);
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics page ends with # EOF"
    );
    // The test's own gRPC client holds a connection open.
    assert!(at("arpcp_grpc_connections") >= 1.0);

    let agent = &c.agents[0];
    wait_series(agent, r#"arpcp_agent_tasks{state="running"}"#, 0.0);
    let text = scrape(agent);
    let at = |name: &str| series(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    assert_eq!(
        at(r#"arpcp_procedure_run_duration_seconds_count{procedure="add"}"#),
        3.0
    );
    assert_eq!(
        at(r#"arpcp_procedure_run_duration_seconds_count{procedure="div"}"#),
        1.0
    );
    assert_eq!(
        at(r#"arpcp_server_requests_total{server="agent",method="ATASK"}"#),
        4.0
    );
    assert_eq!(at(r#"arpcp_agent_tasks{state="queued"}"#), 0.0);
    assert!(at(r#"arpcp_server_connections{server="agent"}"#) >= 1.0);
}

/// A client waiting on a task (GetResult with a wait, WatchTask) holds a channel in
/// the gateway with a copy of the task; once the wait ends nothing of it stays. (Such
/// channels used to stay until a sweep every 30 s: under load, tens of thousands of
/// task copies, the most of the gateway's memory.)
#[test]
fn nothing_stays_of_a_finished_wait() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &["--metrics", "127.0.0.1:0"]);
    let ids: Vec<String> = (0..20)
        .map(|i| c.gw.submit_ok("add", json!([i, 1])))
        .collect();
    for id in &ids {
        assert_task_status(&c.gw.wait_final(id, WAIT), pb::TaskStatus::Done);
    }
    // A wait on a task that has ended, and a watch that saw the end.
    assert_task_status(&c.gw.wait_final(&ids[0], WAIT), pb::TaskStatus::Done);
    let seen = c.gw.watch(&ids[1], WAIT).expect("watch an ended task");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let text = scrape(&c.gateway);
    assert_eq!(
        series(&text, "arpcp_watched_tasks"),
        Some(0.0),
        "no task is waited on any more:\n{text}"
    );
    // A wait in progress is counted while it lasts.
    let slow = c.gw.submit_ok("sleep", json!([30]));
    let gw = Gw::connect(&c.gateway);
    let waiting = std::thread::spawn(move || gw.get_wait(&slow, std::time::Duration::from_secs(3)));
    wait_series(&c.gateway, "arpcp_watched_tasks", 1.0);
    let t = waiting
        .join()
        .expect("the waiting thread")
        .expect("GetResult");
    assert!(!common::gateway::is_final(t.status), "{t:?}");
    wait_series(&c.gateway, "arpcp_watched_tasks", 0.0);
}

#[test]
fn the_metrics_endpoint_serves_only_get_metrics() {
    let agent = Daemon::agent(&["--metrics", "127.0.0.1:0"]);
    let addr = agent.addr("metrics");
    assert_eq!(http_get(&addr, "/metrics").0, 200);
    for path in ["/", "/metric", "/metrics/x", "/debug"] {
        assert_eq!(http_get(&addr, path).0, 404, "{path}");
    }
    // Connections that never finish their request (more than there are places) free
    // their places within SCRAPE_REQUEST_TIMEOUT: a scrape gets through (it waited
    // for the 30 s lifetime of each, and timed out).
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            let _ = s.write_all(b"GET /metr");
            s
        })
        .collect();
    assert_eq!(http_get(&addr, "/metrics").0, 200);
    drop(idle);
    // Without the flag nothing more listens, and the ready line says so.
    let plain = Daemon::agent(&[]);
    assert!(plain.ready().get("metrics").is_none(), "{}", plain.ready());
    // An address that is none stops the start, naming the flag and the form.
    let refused =
        Daemon::run_until_ready_or_exit(tempdir(), &common::agent_args(&["--metrics", "nonsense"]))
            .err()
            .expect("no start with --metrics nonsense");
    assert!(!refused.status.success());
    assert!(
        refused
            .stderr
            .contains("--metrics: cannot listen on nonsense (expected HOST:PORT"),
        "{}",
        refused.stderr
    );
}

/// `arpcp ARGS` with stderr a pipe read into a buffer, and `env` set (no
/// `NO_COLOR`, unlike the harness): for what a daemon writes to a pipe.
struct Piped {
    child: Child,
    ready: Value,
    stderr: Arc<Mutex<String>>,
}

impl Piped {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Piped {
        let mut cmd = Command::new(ARPCP);
        cmd.args(args)
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start arpcp");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let into = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(STARTUP_TIMEOUT)
            .expect("the daemon's ready line");
        let ready = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "ready line {line:?}: {e}; stderr: {}",
                stderr.lock().unwrap()
            )
        });
        Piped {
            child,
            ready,
            stderr,
        }
    }

    fn addr(&self, key: &str) -> String {
        self.ready[key].as_str().expect("an address").to_string()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway_args(dir: &std::path::Path, agent: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--echo-interval-ms",
        "100",
        "--agent",
        agent,
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.join("gateway-data").to_string_lossy().into_owned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn json_logs_carry_one_task_end_line_per_task() {
    let agent = Daemon::agent(&[]);
    let dir = tempdir();
    let gateway = Piped::spawn(
        &gateway_args(dir.path(), &agent.arpcp(), &["--log-format", "json"]),
        &[],
    );
    let gw = Gw::connect_url(&format!("http://{}", gateway.addr("grpc")));
    gw.wait_alive(1, WAIT);
    let done = gw.submit_ok("add", json!([2, 3]));
    let failed = gw.submit_ok("div", json!([1, 0]));
    gw.wait_final(&done, WAIT);
    gw.wait_final(&failed, WAIT);
    let ends = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l:?}"))
            })
            .filter(|v| v["message"] == "task ended")
            .collect()
    };
    wait_until(WAIT, "two task-end lines", || {
        ends(&gateway.stderr()).len() >= 2
    });
    let lines = ends(&gateway.stderr());
    assert_eq!(lines.len(), 2, "one line per task end: {lines:?}");
    for (id, procedure, status) in [(&done, "add", "done"), (&failed, "div", "failed")] {
        let line = lines
            .iter()
            .find(|l| l["task_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no task-end line for {id}: {lines:?}"));
        assert_eq!(line["procedure"], procedure, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["level"], "INFO", "{line}");
        assert!(
            line["agent"].as_str().is_some_and(|a| !a.is_empty()),
            "{line}"
        );
        assert!(line["duration_ms"].is_u64(), "{line}");
    }
}

/// An agent with piped stderr and `env`, once it logged that it is ready.
fn piped_agent(dir: &tempfile::TempDir, env: &[(&str, &str)]) -> Piped {
    let args: Vec<String> = [
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir.path().join("agent-data").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = Piped::spawn(&args, env);
    wait_until(WAIT, "the agent's ready log line", || {
        agent.stderr().contains("agent ready")
    });
    agent
}

#[test]
fn piped_stderr_has_no_colour_codes() {
    let dir = tempdir();
    let agent = piped_agent(&dir, &[]);
    let text = agent.stderr();
    assert!(
        !text.contains("\x1b["),
        "escape codes in piped stderr: {text:?}"
    );
}

/// A worker count the daemon cannot use is named in a warning, not silently replaced.
#[test]
fn a_bad_worker_count_is_named() {
    let dir = tempdir();
    let agent = piped_agent(&dir, &[("ARPCP_WORKER_THREADS", "0")]);
    let text = strip_colour(&agent.stderr());
    assert!(
        text.contains(
            "ARPCP_WORKER_THREADS=\"0\" ignored: expected a number of threads from 1 to 256"
        ),
        "{text}"
    );
}

/// `text` without terminal escape sequences (`ESC [ … m`).
fn strip_colour(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("\x1b[") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
    }
    out.push_str(rest);
    out
}

/// Lines logged by HTTP/2 and hyper internals (their targets, in text format).
fn internals(text: &str) -> Vec<String> {
    strip_colour(text)
        .lines()
        .filter(|l| l.contains(" h2::") || l.contains(" hyper") || l.contains(" tower::"))
        .map(str::to_string)
        .collect()
}

#[test]
fn http2_internals_stay_quiet_at_debug_unless_asked() {
    let agent = Daemon::agent(&[]);
    let dir = tempdir();
    let run = |rust_log: &str| {
        let gateway = Piped::spawn(
            &gateway_args(dir.path(), &agent.arpcp(), &[]),
            &[("RUST_LOG", rust_log)],
        );
        let gw = Gw::connect_url(&format!("http://{}", gateway.addr("grpc")));
        gw.wait_alive(1, WAIT);
        let id = gw.submit_ok("add", json!([1, 1]));
        gw.wait_final(&id, WAIT);
        // The gRPC calls above were logged (or not) while they were served.
        gateway.stderr()
    };
    let debug = run("debug");
    assert!(
        debug.contains("DEBUG"),
        "debug lines of arpcp itself are there"
    );
    let noise = internals(&debug);
    assert!(
        noise.is_empty(),
        "{} lines of HTTP/2 internals at RUST_LOG=debug, e.g. {:?}",
        noise.len(),
        &noise[..noise.len().min(3)]
    );
    let asked = run("info,h2=debug");
    assert!(
        !internals(&asked).is_empty(),
        "h2's debug lines when RUST_LOG names it"
    );
}

#[test]
fn arpcp_up_serves_both_daemons_metrics_on_one_endpoint() {
    let up = Daemon::spawn(&[
        "up",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/data",
        "--no-demo",
        "--metrics",
        "127.0.0.1:0",
    ]);
    wait_series(&up, r#"arpcp_agents{state="alive"}"#, 1.0);
    let gw = Gw::connect(&up);
    let id = gw.submit_ok("mul", json!([6, 7]));
    assert_task_status(&gw.wait_final(&id, WAIT), pb::TaskStatus::Done);
    wait_series(
        &up,
        r#"arpcp_tasks_ended_total{procedure="mul",status="done"}"#,
        1.0,
    );
    let text = scrape(&up);
    assert_eq!(
        series(
            &text,
            r#"arpcp_procedure_run_duration_seconds_count{procedure="mul"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(&text, r#"arpcp_agent_tasks{state="running"}"#),
        Some(0.0),
        "{text}"
    );
}
