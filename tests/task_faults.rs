//! Acknowledged tasks under faults, through the real processes: connections reset
//! in the middle of pipelined ATASKs, agents killed and restarted, a gateway killed
//! again and again under load, an agent paused (SIGSTOP) past its lease. Whatever
//! happens, a task an agent acknowledged runs or is reported, `interrupted` is only
//! said of a task that started, nothing waits for ever, and an attempt the gateway
//! withdrew is never started.

mod common;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arpcp::pb;
use common::gateway::{
    agent_with_config, describe, is_final, status_name, submit_req, Cluster, Gw,
};
use common::{call, code, req, tempdir, wait_for, wait_until, Conn, Daemon, FakeController, WAIT};
use serde_json::{json, Value};

/// Closes a connection with a reset (SO_LINGER 0): the peer's next read fails,
/// as when a controller's process dies with requests in flight.
fn reset(conn: Conn) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            conn.stream().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "set SO_LINGER");
    drop(conn);
}

/// Writes `ids` as pipelined ATASKs in one write and resets the connection as soon
/// as the first of them is answered.
fn atasks_then_reset(addr: &str, ids: &[String], procedure: &str, args: &Value, reply_to: &str) {
    let mut batch = Vec::new();
    for id in ids {
        let m = req::atask_with(id, procedure, args.clone(), Some(reply_to));
        batch.extend_from_slice(m.to_string().as_bytes());
        batch.extend_from_slice(b"\r\n");
    }
    let mut conn = Conn::connect(addr);
    conn.send_raw(&batch);
    // Once the first answer is back the agent is working through the batch: cut
    // it off there (a reset drops what the agent has not read yet).
    let _ = conn.try_recv_line(WAIT);
    reset(conn);
}

fn status_of(addr: &str, id: &str) -> (u64, Value) {
    let r = call(addr, &req::get(id));
    (code(&r), r["data"]["atask_status"].clone())
}

/// 1,280 pipelined ATASKs in batches of 128, the connection reset right after each
/// batch is written: every task the agent stored runs and is reported `done` to
/// its controller; none stays `accepted` without running.
#[test]
fn atasks_cut_off_by_connection_resets_all_run() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&["--capacity", "8"]);
    let a = agent.arpcp();
    let mut all = Vec::new();
    for batch in 0..10 {
        let ids: Vec<String> = (0..128).map(|i| format!("reset-{batch}-{i}")).collect();
        atasks_then_reset(
            &a,
            &ids,
            "add",
            &json!([batch, i64::from(7)]),
            controller.addr(),
        );
        all.extend(ids);
    }
    // Stored ones end; the rest were never read (unknown). Bounded: the whole set
    // of additions takes milliseconds.
    let mut stored = 0;
    let mut stuck = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for id in &all {
        loop {
            let (c, status) = status_of(&a, id);
            if c == 205 {
                break;
            }
            if status == "done" {
                stored += 1;
                break;
            }
            if std::time::Instant::now() >= deadline {
                stuck.push(format!("{id}: {status}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(
        stuck.is_empty(),
        "{} of {stored} stored tasks never ran: {:?}",
        stuck.len(),
        &stuck[..stuck.len().min(10)]
    );
    assert!(stored > 0, "the agent stored none of the tasks");
    // Each stored task was reported to the controller.
    for id in &all {
        if code(&call(&a, &req::get(id))) == 100 {
            controller.wait_signal(id, "done", WAIT);
        }
    }
}

/// The lines of a runs file written by the `record` program: (atask id, start ns).
fn runs(path: &Path) -> Vec<(String, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (id, at) = l.split_once(' ')?;
            Some((id.to_string(), at.trim().parse().ok()?))
        })
        .collect()
}

/// Two programs that append "<atask id> <start time in ns>" to `runs` as they
/// start: `record` then sleeps `secs` (its first argument), `hold` waits until the
/// file `release` next to `runs` exists.
fn record_config(runs: &Path) -> String {
    let release = runs.with_file_name("release");
    format!(
        r#"
[[procedure]]
name = "record"
command = ["sh", "-c", "echo \"$ARPCP_ATASK_ID $(date +%s%N)\" >> '{runs}'; sleep \"$0\""]

[[procedure]]
name = "hold"
command = ["sh", "-c", "echo \"$ARPCP_ATASK_ID $(date +%s%N)\" >> '{runs}'; while [ ! -e '{release}' ]; do sleep 0.05; done"]
"#,
        runs = runs.display(),
        release = release.display()
    )
}

/// An agent killed with -9 while tasks are stored, some cut off by resets: after
/// its restart, every task reported `interrupted` had started (its program wrote
/// its start), and every other stored task runs.
#[test]
fn only_tasks_that_started_are_reported_interrupted() {
    let shared = tempdir();
    let runs_file = shared.path().join("runs.txt");
    let controller = FakeController::start();
    let mut agent = agent_with_config(&record_config(&runs_file), &["--capacity", "8"]);
    let a = agent.arpcp();
    let mut all = Vec::new();
    for batch in 0..4 {
        let ids: Vec<String> = (0..64).map(|i| format!("crash-{batch}-{i}")).collect();
        atasks_then_reset(&a, &ids, "hold", &json!([]), controller.addr());
        all.extend(ids);
    }
    // Every slot holds a task that has written its start and waits: no task is
    // between its start and its first line when the agent dies.
    wait_until(WAIT, "8 tasks to start", || runs(&runs_file).len() >= 8);
    agent.kill9();
    std::fs::write(shared.path().join("release"), b"").expect("write the release file");
    agent.restart_on_same_ports();

    let a = agent.arpcp();
    let interrupted: Vec<String> = wait_for(WAIT, "interrupted reports", || {
        let got: Vec<String> = controller
            .received()
            .iter()
            .filter(|m| common::is_signal(m) && m["atask_status"] == "interrupted")
            .filter_map(|m| m["atask_id"].as_str().map(str::to_string))
            .collect();
        (got.len() >= 8).then_some(got)
    });
    // Nothing stored stays waiting: queued ones run after the restart.
    for id in &all {
        wait_until(
            Duration::from_secs(30),
            &format!("{id} to end after the restart"),
            || {
                let (c, status) = status_of(&a, id);
                c == 205 || status == "done" || status == "interrupted"
            },
        );
    }
    let started: BTreeMap<String, u128> = runs(&runs_file).into_iter().collect();
    let never_started: Vec<&String> = interrupted
        .iter()
        .filter(|id| !started.contains_key(*id))
        .collect();
    assert!(
        never_started.is_empty(),
        "{} of {} tasks reported interrupted never started: {:?}",
        never_started.len(),
        interrupted.len(),
        &never_started[..never_started.len().min(10)]
    );
}

/// Submits from `clients` concurrent clients until `stop`; returns the ids of the
/// tasks whose Submit answered OK.
fn load(
    gw: &Gw,
    clients: usize,
    stop: &Arc<AtomicBool>,
    accepted: &Arc<Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|s| {
            let mut client = gw.client();
            let (stop, accepted) = (stop.clone(), accepted.clone());
            gw.rt().spawn(async move {
                for n in 0..1_000_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let call = client.submit(submit_req("add", json!([s, n])));
                    match tokio::time::timeout(Duration::from_secs(10), call).await {
                        Ok(Ok(r)) => accepted.lock().unwrap().push(r.into_inner().task_id),
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// The gateway killed with -9 three times (`ARPCP_FAULT_ROUNDS`) under 16-client load, each time restarted
/// on the same data and ports: every acknowledged task ends DONE with its result
/// within a bound; none stays DISPATCHED.
#[test]
fn gateway_killed_under_load_leaves_no_task_stuck() {
    let mut c = Cluster::start(
        vec![
            Daemon::agent(&["--capacity", "8"]),
            Daemon::agent(&["--capacity", "8"]),
        ],
        &[],
    );
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    // More rounds for a measurement: ARPCP_FAULT_ROUNDS=10.
    let rounds: usize = std::env::var("ARPCP_FAULT_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = load(&c.gw, 16, &stop, &accepted);
        let before = accepted.lock().unwrap().len();
        wait_until(WAIT, "200 more acknowledged submits", || {
            accepted.lock().unwrap().len() >= before + 200
        });
        c.gateway.kill9();
        stop.store(true, Ordering::SeqCst);
        for h in clients {
            let _ =
                c.gw.rt()
                    .block_on(async { tokio::time::timeout(WAIT, h).await });
        }
        c.gateway.restart_on_same_ports();
        c.gw = Gw::connect(&c.gateway);
        c.gw.wait_alive(2, WAIT);
        eprintln!(
            "round {round}: {} acknowledged",
            accepted.lock().unwrap().len()
        );
    }
    let accepted = accepted.lock().unwrap().clone();
    let mut stuck = Vec::new();
    for id in &accepted {
        let t = c.gw.wait_task(id, Duration::from_secs(30), "its end", |t| {
            is_final(t.status)
        });
        if t.status != pb::TaskStatus::Done as i32 {
            stuck.push(describe(&t));
        }
    }
    assert!(
        stuck.is_empty(),
        "{} of {} acknowledged tasks did not end DONE: {:?}",
        stuck.len(),
        accepted.len(),
        &stuck[..stuck.len().min(5)]
    );
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos()
}

/// An agent paused (SIGSTOP) until the gateway has declared it gone and placed its
/// waiting tasks elsewhere, then resumed: it starts none of the attempts the gateway
/// withdrew. A task may run twice only if its first run had started before the pause.
#[test]
fn agent_paused_past_its_lease_starts_no_withdrawn_attempt() {
    let shared = tempdir();
    let runs_file = shared.path().join("runs.txt");
    let config = record_config(&runs_file);
    let c = Cluster::start(
        vec![
            agent_with_config(&config, &["--capacity", "2"]),
            agent_with_config(&config, &["--capacity", "2"]),
        ],
        &["--echo-interval-ms", "200", "--max-misses", "3"],
    );
    let victim = c.id(0).to_string();
    let ids: Vec<String> = (0..120)
        .map(|_| c.gw.submit_ok("record", json!(["0.1"])))
        .collect();
    wait_until(WAIT, "the victim to run some tasks", || {
        runs(&runs_file).len() >= 6
    });
    let paused_at = now_ns();
    c.agents[0].signal(libc::SIGSTOP);
    c.gw.wait_agent_state(&victim, pb::AgentState::Gone, WAIT);
    // Its waiting tasks are placed elsewhere before it comes back.
    wait_until(WAIT, "a task of the victim to be placed again", || {
        ids.iter().any(|id| c.gw.task(id).attempts >= 2)
    });
    let resumed_at = now_ns();
    c.agents[0].signal(libc::SIGCONT);

    let mut ended = Vec::new();
    for id in &ids {
        ended.push(c.gw.wait_task(id, Duration::from_secs(60), "its end", |t| {
            is_final(t.status)
        }));
    }
    // Let the resumed agent go through what it held before counting its runs.
    wait_until(WAIT, "the victim to let go of withdrawn tasks", || {
        ids.iter().all(|id| {
            (1..=3).all(|n| {
                let r = call(&c.agents[0].arpcp(), &req::get(&format!("{id}.{n}")));
                code(&r) == 205 || r["data"]["atask_status"] != "accepted"
            })
        })
    });
    let mut by_task: BTreeMap<String, Vec<(String, u128)>> = BTreeMap::new();
    for (atask, at) in runs(&runs_file) {
        let task = atask
            .rsplit_once('.')
            .map_or(atask.clone(), |(t, _)| t.to_string());
        by_task.entry(task).or_default().push((atask, at));
    }
    // The first attempt of a task that ran twice was the paused agent's. While it
    // was stopped it started nothing, so a run of that attempt recorded before
    // `resumed_at` had been started before the pause (its program may have
    // written its line a little later on a busy machine: `paused_at` would
    // misjudge it). A run recorded after is a withdrawn attempt started anyway.
    let attempt_of = |atask: &str| {
        atask
            .rsplit_once('.')
            .and_then(|(_, n)| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let twice: Vec<String> = by_task
        .iter()
        .filter(|(_, r)| {
            r.len() > 1
                && r.iter()
                    .min_by_key(|(atask, _)| attempt_of(atask))
                    .is_some_and(|(_, at)| *at > resumed_at)
        })
        .map(|(t, r)| format!("{t}: {r:?}"))
        .collect();
    let started_late = by_task
        .values()
        .filter(|r| r.len() > 1 && r.iter().all(|(_, at)| *at > paused_at))
        .count();
    let allowed = by_task
        .values()
        .filter(|r| r.len() > 1)
        .count()
        .saturating_sub(twice.len());
    let placed_again = ended.iter().filter(|t| t.attempts >= 2).count();
    eprintln!(
        "{} tasks, {placed_again} placed again after the pause, {allowed} ran twice having started before it ({started_late} of them recorded their start after it), {} ran twice otherwise",
        ended.len(),
        twice.len()
    );
    assert!(
        twice.is_empty(),
        "{} tasks ran twice although the paused agent started its attempt after it resumed ({allowed} allowed doubles): {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    for t in &ended {
        assert!(
            t.status == pb::TaskStatus::Done as i32
                || (t.status == pb::TaskStatus::Interrupted as i32
                    && by_task.contains_key(&t.task_id)),
            "{}: {}",
            status_name(t.status),
            describe(t)
        );
    }
}

/// Finished tasks nobody collects (a caller that never comes back for its result)
/// are dropped after `--keep-finished-secs`; unfinished ones never are.
#[test]
fn unclaimed_results_are_dropped_after_the_retention() {
    let agent = Daemon::agent(&["--keep-finished-secs", "1"]);
    let a = agent.arpcp();
    let big = "x".repeat(500 * 1024);
    let ids: Vec<String> = (0..20).map(|i| format!("unclaimed-{i}")).collect();
    for id in &ids {
        let r = call(&a, &req::atask_with(id, "echo", json!([big]), None));
        assert_eq!(code(&r), 100, "{r}");
    }
    let long = "still-running";
    let r = call(&a, &req::atask_with(long, "sleep", json!([30]), None));
    assert_eq!(code(&r), 100, "{r}");
    // Checked once a second with a retention of a second: gone within a few (each
    // was stored: its ATASK was answered 100).
    for id in &ids {
        wait_until(
            Duration::from_secs(10),
            &format!("{id} to be dropped"),
            || status_of(&a, id).0 == 205,
        );
    }
    let (c, status) = status_of(&a, long);
    assert_eq!(
        (c, status),
        (100, json!("accepted")),
        "the running task is kept"
    );
    assert!(
        agent.stderr().contains("no controller claimed"),
        "the agent says why it dropped them"
    );
}
