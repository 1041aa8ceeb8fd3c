//! An agent that answers GET with 205 ("I do not hold that attempt") while the
//! ATASK of that attempt may still be on its way: the ATASK can arrive later, within
//! the lease the agent holds for that attempt's epoch, and the agent then starts it
//! without asking, as a valid lease allows. The gateway must not place the task
//! again while that lease holds, or the procedure runs to completion twice.
//!
//! The agent side is a scripted ARPCP peer so the test decides exactly when the
//! "late" ATASK arrives; the gateway is the real process, restarted with `kill -9`
//! between the ATASK and the GET, so the ATASK is one an earlier process sent.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arpcp::pb;
use common::gateway::{describe, result_of, submit_req, Gw};
use common::{call, code, wait_for, wait_until, Daemon, WAIT};
use serde_json::{json, Value};

/// Echoes an agent may miss: with the harness's 100 ms echoes, a 10 s lease, long
/// enough for a gateway restart to fit inside it on a loaded machine.
const MAX_MISSES: &str = "100";
/// The procedure the scripted peer offers.
const PROCEDURE: &str = "work";
/// Echoes an agent may miss where the test waits for the lease to end: 2 s.
const SHORT_LEASE_MISSES: &str = "20";
/// How long the peer lets the gateway show what it does with a 205 before the late
/// ATASK "arrives" (a re-placement, if the gateway makes one, comes in milliseconds).
const LATE_ATASK_AFTER: Duration = Duration::from_secs(2);
/// Room kept between the start of the late attempt and the end of its lease.
const LEASE_ROOM: Duration = Duration::from_secs(2);

/// What a held attempt has come to on the peer.
#[derive(Clone, Debug)]
enum Held {
    Waiting,
    Done(Value),
}

#[derive(Default)]
struct State {
    agent_id: Option<String>,
    /// Every ATASK received: id, the `lease_epoch` it carried, when.
    atasks: Vec<(String, Option<u64>, Instant)>,
    /// Where the gateway wants SIGNALs (`reply_to` of the last ATASK).
    reply_to: Option<String>,
    held: HashMap<String, Held>,
    /// Attempts the peer says it does not hold (GET answers 205).
    lost: Vec<String>,
    /// Every GET: id and the code answered.
    gets: Vec<(String, u64)>,
    /// Attempts run to completion, in order.
    runs: Vec<String>,
    /// Later attempts whose ask-then-run has ended (run, or refused).
    settled: Vec<String>,
}

/// A scripted ARPCP agent on a loopback port. It answers ID and GET from its
/// state; an ATASK is stored and waits for the test's script, except that an
/// attempt after the first is treated as an honest agent would: it asks the
/// gateway before starting (its epoch is not the one the peer holds a lease for),
/// then runs at once and reports `done`.
struct ScriptedAgent {
    addr: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn attempt_of(atask_id: &str) -> u32 {
    atask_id
        .rsplit_once('.')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

impl ScriptedAgent {
    fn start() -> ScriptedAgent {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the scripted agent");
        let local = listener.local_addr().expect("its address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (s, st, ss) = (state.clone(), stop.clone(), streams.clone());
        let port = local.port();
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(c) = stream.try_clone() {
                    lock(&ss).push(c);
                }
                let (s, st) = (s.clone(), st.clone());
                std::thread::spawn(move || serve(stream, port, &s, &st));
            }
        });
        ScriptedAgent {
            addr: local.to_string(),
            state,
            stop,
            streams,
            acceptor: Some(acceptor),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(
            &self.addr.parse().expect("the peer's address"),
            Duration::from_secs(1),
        );
        for s in lock(&self.streams).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn ok(data: Value) -> Value {
    json!({"code": 100, "description": "OK", "data": data})
}

fn serve(stream: TcpStream, port: u16, state: &Arc<Mutex<State>>, stop: &AtomicBool) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    // Bounded: the gateway closes idle connections, and Drop shuts them down.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    for line in BufReader::new(stream).lines() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(req) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        let answer = answer(&req, port, state);
        let mut bytes = answer.to_string().into_bytes();
        bytes.extend_from_slice(b"\r\n");
        if out.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn answer(req: &Value, port: u16, state: &Arc<Mutex<State>>) -> Value {
    let method = req["method"].as_str().unwrap_or_default().to_uppercase();
    let id = req["atask_id"].as_str().unwrap_or_default().to_string();
    let mut s = lock(state);
    match method.as_str() {
        "ID" => {
            if let Some(a) = req["agent_id"].as_str() {
                s.agent_id = Some(a.to_string());
            }
            ok(
                json!({"mac": "02:00:00:00:02:05", "ip": "127.0.0.1", "hostname": "scripted",
                "port": port, "version": "1.0", "procedures": [PROCEDURE], "capacity": 4,
                "running": 0, "agent_id": s.agent_id}),
            )
        }
        "ATASK" => {
            s.atasks
                .push((id.clone(), req["lease_epoch"].as_u64(), Instant::now()));
            s.held.entry(id.clone()).or_insert(Held::Waiting);
            let reply_to = req["reply_to"].as_str().unwrap_or_default().to_string();
            s.reply_to = Some(reply_to.clone());
            if attempt_of(&id) > 1 {
                let (state, agent_id) = (state.clone(), s.agent_id.clone());
                let id = id.clone();
                std::thread::spawn(move || run_after_asking(&state, &reply_to, &id, agent_id));
            }
            ok(json!({"atask_id": id}))
        }
        "GET" => {
            let (code, answer) = if s.lost.contains(&id) {
                (
                    205,
                    json!({"code": 205, "description": format!("unknown task {id}")}),
                )
            } else {
                match s.held.get(&id) {
                    Some(Held::Done(result)) => (
                        100,
                        ok(
                            json!({"atask_id": id, "atask_status": "done", "running": false,
                            "result": result}),
                        ),
                    ),
                    Some(Held::Waiting) => (
                        100,
                        ok(json!({"atask_id": id, "atask_status": "accepted", "running": false})),
                    ),
                    None => (
                        205,
                        json!({"code": 205, "description": format!("unknown task {id}")}),
                    ),
                }
            };
            s.gets.push((id, code));
            answer
        }
        "SIGNAL" => {
            s.held.remove(&id);
            ok(Value::Null)
        }
        _ => json!({"code": 201, "description": format!("method {method} not served here")}),
    }
}

fn signal(id: &str, status: &str, agent_id: Option<&str>, extra: Value) -> Value {
    let mut m = json!({"method": "SIGNAL", "version": "1.0", "atask_id": id,
        "atask_status": status, "agent_id": agent_id});
    if let (Some(m), Value::Object(x)) = (m.as_object_mut(), extra) {
        m.extend(x);
    }
    m
}

/// An attempt placed under an epoch the peer holds no lease for: ask, then run.
fn run_after_asking(state: &Arc<Mutex<State>>, reply_to: &str, id: &str, agent_id: Option<String>) {
    let started = json!({"start": true, "progress": {"percent": 0.0, "comment": "started"}});
    let r = call(
        reply_to,
        &signal(id, "accepted", agent_id.as_deref(), started),
    );
    if code(&r) != 100 {
        let mut s = lock(state);
        s.held.remove(id);
        s.settled.push(id.to_string());
        return;
    }
    let result = json!(format!("result of attempt {}", attempt_of(id)));
    {
        let mut s = lock(state);
        s.held.insert(id.to_string(), Held::Done(result));
        s.runs.push(id.to_string());
    }
    call(
        reply_to,
        &signal(id, "done", agent_id.as_deref(), json!({})),
    );
    lock(state).settled.push(id.to_string());
}

/// A task placed on the scripted peer, whose attempt 1 holds a lease, after the
/// gateway restarted and the peer answered its GET of attempt 1 with 205.
struct Lost {
    peer: ScriptedAgent,
    /// Kept so the gateway lives as long as the scenario.
    _gateway: Daemon,
    gw: Gw,
    task_id: String,
    first: String,
    reply_to: String,
    agent_id: Option<String>,
    lease_ms: u64,
    /// When the lease granted for attempt 1 ends, as the peer counts it.
    lease_ends: Instant,
}

fn place_then_lose(max_misses: &str) -> Lost {
    let peer = ScriptedAgent::start();
    let mut gateway = Daemon::gateway(&["--agent", &peer.addr, "--max-misses", max_misses]);
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);

    let task_id = gw
        .submit(submit_req(PROCEDURE, json!([1])))
        .expect("Submit")
        .task
        .expect("the stored task")
        .task_id;
    let first = format!("{task_id}.1");
    let epoch = wait_for(WAIT, "the ATASK of attempt 1", || {
        let s = peer.state();
        s.atasks.iter().find(|a| a.0 == first).map(|a| a.1)
    })
    .expect("an ATASK carrying lease_epoch");
    let (reply_to, agent_id) = {
        let s = peer.state();
        (s.reply_to.clone().expect("reply_to"), s.agent_id.clone())
    };

    // The attempt waits for a slot: `accepted` without progress obtains the lease.
    let sent_at = Instant::now();
    let grant = call(
        &reply_to,
        &signal(&first, "accepted", agent_id.as_deref(), json!({})),
    );
    assert_eq!(code(&grant), 100, "{grant}");
    let lease_ms = grant["data"]["lease_ms"].as_u64().expect("lease_ms");
    assert_eq!(
        grant["data"]["lease_epoch"].as_u64(),
        Some(epoch),
        "{grant}"
    );
    let lease_ends = sent_at + Duration::from_millis(lease_ms);

    // From now on the peer says it never got that ATASK (as if it were still on its
    // way), and the gateway restarts: it reconciles the placed task with a GET.
    {
        let mut s = peer.state();
        s.lost.push(first.clone());
        s.held.remove(&first);
    }
    gateway.kill9();
    gateway.restart_on_same_ports();
    let gw = Gw::connect(&gateway);
    wait_until(WAIT, "a GET of attempt 1 answered 205", || {
        peer.state().gets.iter().any(|g| g.0 == first && g.1 == 205)
    });
    Lost {
        peer,
        _gateway: gateway,
        gw,
        task_id,
        first,
        reply_to,
        agent_id,
        lease_ms,
        lease_ends,
    }
}

impl Lost {
    fn later_atasks(&self) -> Vec<(String, Instant)> {
        self.peer
            .state()
            .atasks
            .iter()
            .filter(|a| attempt_of(&a.0) > 1)
            .map(|a| (a.0.clone(), a.2))
            .collect()
    }

    /// Waits until every later attempt the peer was given has run or been refused.
    fn settle(&self) {
        wait_until(WAIT, "the later attempts to run or be refused", || {
            let s = self.peer.state();
            s.atasks
                .iter()
                .filter(|a| attempt_of(&a.0) > 1)
                .all(|a| s.settled.contains(&a.0))
        });
    }
}

#[test]
fn an_attempt_the_agent_does_not_hold_yet_is_not_placed_again_within_its_lease() {
    let l = place_then_lose(MAX_MISSES);
    let (peer, first) = (&l.peer, &l.first);

    // The late ATASK arrives after the gateway has had time to act on the 205 (or
    // as soon as it placed the task again), still well inside the lease.
    let late = (Instant::now() + LATE_ATASK_AFTER).min(l.lease_ends - LEASE_ROOM);
    wait_until(
        2 * LATE_ATASK_AFTER,
        "the gateway to act on the 205",
        || Instant::now() >= late || !l.later_atasks().is_empty(),
    );
    assert!(
        Instant::now() + LEASE_ROOM / 2 < l.lease_ends,
        "the test itself was too slow: the lease of {} ms granted for attempt 1 ends \
         in under {:?}; the scenario needs the start inside it",
        l.lease_ms,
        LEASE_ROOM / 2
    );
    // Accepted under the epoch whose lease holds: the agent starts it unasked.
    {
        let mut s = peer.state();
        s.lost.retain(|id| id != first);
        s.held.insert(first.clone(), Held::Waiting);
    }
    let started = json!({"progress": {"percent": 0.0, "comment": "started"}});
    let r = call(
        &l.reply_to,
        &signal(first, "accepted", l.agent_id.as_deref(), started),
    );
    assert_eq!(code(&r), 100, "{r}");
    {
        let mut s = peer.state();
        s.held
            .insert(first.clone(), Held::Done(json!("result of attempt 1")));
        s.runs.push(first.clone());
    }
    let r = call(
        &l.reply_to,
        &signal(first, "done", l.agent_id.as_deref(), json!({})),
    );
    assert_eq!(code(&r), 100, "{r}");

    let t = l.gw.wait_final(&l.task_id, WAIT);
    l.settle();
    let placed_in_lease: Vec<String> = l
        .later_atasks()
        .into_iter()
        .filter(|a| a.1 < l.lease_ends)
        .map(|a| a.0)
        .collect();
    let runs = peer.state().runs.clone();
    assert_eq!(
        runs,
        vec![first.clone()],
        "the procedure ran to completion {} times; ATASKs sent while the lease of \
         attempt 1 held: {placed_in_lease:?}; task: {}",
        runs.len(),
        describe(&t)
    );
    assert!(
        placed_in_lease.is_empty(),
        "placed again while the lease of attempt 1 held: {placed_in_lease:?}"
    );
    assert_eq!(t.status, pb::TaskStatus::Done as i32, "{}", describe(&t));
    assert_eq!(
        result_of(&t),
        Some(json!("result of attempt 1")),
        "{}",
        describe(&t)
    );
    assert_eq!(t.attempts, 1, "{}", describe(&t));
}

/// The other half of the rule: an attempt the agent really never gets is placed
/// again once the lease has ended (the task is not stuck), and its ATASK, should it
/// arrive after all, must ask and is refused.
#[test]
fn an_attempt_the_agent_never_gets_is_placed_again_once_its_lease_ends() {
    // 2 s leases: the re-placement is waited for, not raced.
    let l = place_then_lose(SHORT_LEASE_MISSES);

    let t =
        l.gw.wait_final(&l.task_id, WAIT + Duration::from_millis(l.lease_ms));
    l.settle();
    let later = l.later_atasks();
    let second = format!("{}.2", l.task_id);
    assert_eq!(
        later.iter().map(|a| a.0.clone()).collect::<Vec<_>>(),
        vec![second.clone()],
        "{}",
        describe(&t)
    );
    assert!(
        later[0].1 >= l.lease_ends,
        "attempt 2 was sent {:?} before the lease of attempt 1 ended",
        l.lease_ends - later[0].1
    );
    assert_eq!(l.peer.state().runs, vec![second], "{}", describe(&t));
    assert_eq!(t.status, pb::TaskStatus::Done as i32, "{}", describe(&t));
    assert_eq!(
        result_of(&t),
        Some(json!("result of attempt 2")),
        "{}",
        describe(&t)
    );

    // The ATASK of attempt 1 arrives now, its lease over: the agent asks first.
    let start = json!({"start": true, "progress": {"percent": 0.0, "comment": "started"}});
    let r = call(
        &l.reply_to,
        &signal(&l.first, "accepted", l.agent_id.as_deref(), start),
    );
    assert_eq!(code(&r), 205, "{r}");
    assert!(
        r["description"]
            .as_str()
            .is_some_and(|d| d.contains("placed again as attempt 2")),
        "{r}"
    );
    assert_eq!(l.gw.task(&l.task_id), t, "a refused start changes nothing");
}
