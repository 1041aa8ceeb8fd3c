//! Asynchronous tasks on a live agent: ATASK and the SIGNALs that follow it, GET,
//! idempotent retries, `terminate`, the capacity limit, and ID.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    assert_response, call, code, live_processes_in_group, process_alive, req, wait_for,
    wait_for_pid_file, wait_until, Conn, Daemon, FakeController, BUILTINS, WAIT,
};
use serde_json::{json, Value};

/// An agent with these `[[procedure]]` entries in its configuration file.
fn agent_with(procedures: &str, extra: &[&str]) -> Daemon {
    let dir = common::dir_with_agent_config(procedures);
    let mut args = vec!["--config", "{dir}/agent.toml"];
    args.extend_from_slice(extra);
    Daemon::agent_in(dir, &args)
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("a UTF-8 temporary path").to_string()
}

/// GET until the task has ended; returns the last response.
fn wait_ended(addr: &str, id: &str) -> Value {
    wait_for(WAIT, &format!("task {id} to end"), || {
        let r = call(addr, &req::get(id));
        let status = r["data"]["atask_status"].as_str().unwrap_or("");
        (status != "accepted").then_some(r)
    })
}

fn get_data(addr: &str, id: &str) -> Value {
    let r = call(addr, &req::get(id));
    assert_eq!(code(&r), 100, "GET {id}: {r}");
    r["data"].clone()
}

fn position(signals: &[Value], status: &str) -> Option<usize> {
    signals.iter().position(|s| s["atask_status"] == status)
}

/// ATASK answers at once with the id; `accepted` then `done` reach `reply_to`;
/// GET returns the result.
#[test]
fn atask_signals_accepted_then_done_and_get_returns_the_result() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&[]);
    let a = agent.arpcp();

    let r = call(
        &a,
        &req::atask_with("sum-1", "add", json!([2, 3]), Some(controller.addr())),
    );
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"], json!({"atask_id": "sum-1"}));

    let done = controller.wait_signal("sum-1", "done", WAIT);
    assert_eq!(done["version"], "1.0", "{done}");
    assert!(
        done.get("error").is_none(),
        "a successful task has no error: {done}"
    );
    controller.wait_signal("sum-1", "accepted", WAIT);
    let signals = controller.signals("sum-1");
    assert!(
        position(&signals, "accepted") < position(&signals, "done"),
        "`accepted` must come before `done`: {signals:?}"
    );

    let r = call(&a, &req::get("sum-1"));
    assert_response(&r, 100, &[]);
    let d = &r["data"];
    assert_eq!(d["atask_id"], "sum-1");
    assert_eq!(d["atask_status"], "done");
    assert_eq!(d["running"], false);
    assert_eq!(d["result"], 5);

    // The agent keeps the result until the controller terminates the task.
    assert_eq!(get_data(&a, "sum-1")["result"], 5);
    assert_response(&call(&a, &req::signal("sum-1", "terminate")), 100, &[]);
    assert_response(&call(&a, &req::get("sum-1")), 205, &["\"sum-1\""]);
}

/// The ordering of `accepted` and `done` holds every time, not just usually.
#[test]
fn accepted_always_precedes_done() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&[]);
    let mut c = Conn::connect(&agent.arpcp());
    let ids: Vec<String> = (0..30).map(|i| format!("order-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = c.request(&req::atask_with(
            id,
            "mul",
            json!([i, 2]),
            Some(controller.addr()),
        ));
        assert_eq!(code(&r), 100, "{r}");
    }
    for id in &ids {
        controller.wait_signal(id, "done", WAIT);
        let signals = controller.signals(id);
        let accepted = position(&signals, "accepted");
        assert!(
            accepted.is_some() && accepted < position(&signals, "done"),
            "{id}: `accepted` must come before `done`: {signals:?}"
        );
    }
}

/// A running task reports progress: in `accepted` SIGNALs and in GET.
#[test]
fn running_task_reports_progress() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&[]);
    let a = agent.arpcp();
    let r = call(
        &a,
        &req::atask_with("nap", "sleep", json!([1]), Some(controller.addr())),
    );
    assert_response(&r, 100, &[]);
    let progress = wait_for(WAIT, "GET to show progress", || {
        let d = get_data(&a, "nap");
        let p = d["progress"]["percent"].as_f64()?;
        (d["running"] == true && p > 0.0).then_some(p)
    });
    assert!(progress < 1.0, "{progress}");
    let sig = controller.wait_for(WAIT, "an accepted SIGNAL with progress", |m| {
        m["atask_id"] == "nap"
            && m["atask_status"] == "accepted"
            && m["progress"]["percent"].as_f64().is_some_and(|p| p > 0.0)
    });
    assert!(sig["progress"]["comment"].is_string(), "{sig}");
    controller.wait_signal("nap", "done", WAIT);
    let signals = controller.signals("nap");
    assert_eq!(
        signals.last().map(|s| s["atask_status"].clone()),
        Some(json!("done")),
        "nothing may follow the final SIGNAL: {signals:?}"
    );
    let d = get_data(&a, "nap");
    assert_eq!(d["atask_status"], "done");
    assert_eq!(d["running"], false);
}

/// Without `atask_id` the agent makes a unique one, usable with GET.
#[test]
fn atask_without_id_gets_a_generated_unique_one() {
    let agent = Daemon::agent(&[]);
    let a = agent.arpcp();
    let ids: Vec<String> = (0..5)
        .map(|i| {
            let r = call(&a, &req::atask("add", json!([i, 10])));
            assert_response(&r, 100, &[]);
            let id = r["data"]["atask_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(!id.is_empty(), "no generated atask_id in {r}");
            id
        })
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids repeat: {ids:?}");
    for (i, id) in ids.iter().enumerate() {
        let r = wait_ended(&a, id);
        assert_eq!(r["data"]["result"], json!(i + 10), "{r}");
    }
}

/// A failing task ends `done` with an error: in its SIGNAL and as GET's 400.
#[test]
fn failed_task_reports_its_error() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&[]);
    let a = agent.arpcp();
    let r = call(
        &a,
        &req::atask_with("div0", "div", json!([1, 0]), Some(controller.addr())),
    );
    assert_response(&r, 100, &[]);
    let done = controller.wait_signal("div0", "done", WAIT);
    assert_eq!(done["error"]["code"], 400, "{done}");
    assert!(
        done["error"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("division by zero")),
        "{done}"
    );
    let r = call(&a, &req::get("div0"));
    assert_response(&r, 400, &["division by zero"]);
    assert_eq!(r["data"]["atask_status"], "done");
    assert_eq!(r["data"]["error"]["code"], 400);
    assert!(r["data"].get("result").is_none(), "{r}");
}

/// The same ATASK twice (a controller retrying after a lost answer) runs once;
/// the same id for another call is refused.
#[test]
fn repeated_atask_is_idempotent() {
    let agent = agent_with(
        r#"
[[procedure]]
name = "append"
command = ["sh", "-c", "echo run >> \"$0\""]
"#,
        // One slot: a second run, had a duplicate started one, would hold the
        // slot before a task accepted later (a barrier, not a proof).
        &["--capacity", "1"],
    );
    let a = agent.arpcp();
    let log = agent.dir().join("runs.log");
    let call_args = json!([path_arg(&log)]);

    let mut c = Conn::connect(&a);
    for _ in 0..3 {
        let r = c.request(&req::atask_with("once", "append", call_args.clone(), None));
        assert_response(&r, 100, &[]);
        assert_eq!(r["data"]["atask_id"], "once");
    }
    assert_eq!(wait_ended(&a, "once")["data"]["atask_status"], "done");
    // And once more after it ended.
    let r = c.request(&req::atask_with("once", "append", call_args.clone(), None));
    assert_response(&r, 100, &[]);

    let barrier = agent.dir().join("barrier.log");
    let r = c.request(&req::atask_with(
        "barrier",
        "append",
        json!([path_arg(&barrier)]),
        None,
    ));
    assert_response(&r, 100, &[]);
    assert_eq!(wait_ended(&a, "barrier")["data"]["atask_status"], "done");

    let runs = std::fs::read_to_string(&log).expect("the task ran");
    assert_eq!(runs, "run\n", "the task ran more than once");
    assert_eq!(get_data(&a, "once")["atask_status"], "done");

    // Same id, another call.
    let other = agent.dir().join("other.log");
    let r = c.request(&req::atask_with(
        "once",
        "append",
        json!([path_arg(&other)]),
        None,
    ));
    assert_response(&r, 205, &["\"once\"", "already used"]);
    let r = c.request(&req::atask_with("once", "echo", call_args, None));
    assert_response(&r, 205, &["\"once\"", "already used"]);
    assert!(!other.exists(), "a refused call ran");
}

/// `terminate` stops a running task and every process it started, deletes it, and
/// no final SIGNAL follows.
#[test]
fn terminate_stops_a_running_task() {
    let controller = FakeController::start();
    let agent = agent_with(
        r#"
[[procedure]]
name = "hang"
command = ["sh", "-c", "echo $$ > \"$0\"; sleep 30; echo finished"]
"#,
        &[],
    );
    let a = agent.arpcp();
    let pid_file = agent.dir().join("hang.pid");
    let r = call(
        &a,
        &req::atask_with(
            "hang-1",
            "hang",
            json!([path_arg(&pid_file)]),
            Some(controller.addr()),
        ),
    );
    assert_response(&r, 100, &[]);
    let pid = wait_for_pid_file(&pid_file, WAIT);
    assert!(process_alive(pid));
    let d = get_data(&a, "hang-1");
    assert_eq!(d["atask_status"], "accepted");
    assert_eq!(d["running"], true);

    let started = Instant::now();
    assert_response(&call(&a, &req::signal("hang-1", "terminate")), 100, &[]);
    wait_until(WAIT, "the task's program to be killed", || {
        !process_alive(pid)
    });
    wait_until(WAIT, "the programs it started to be killed", || {
        live_processes_in_group(pid).is_empty()
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_response(&call(&a, &req::get("hang-1")), 205, &["\"hang-1\""]);
    assert_response(&call(&a, &req::signal("hang-1", "terminate")), 205, &[]);

    // A later task's final SIGNAL arriving is a barrier (not a proof) for a final
    // SIGNAL of the terminated one, which would have been sent at once.
    call(
        &a,
        &req::atask_with("after", "add", json!([1, 1]), Some(controller.addr())),
    );
    controller.wait_signal("after", "done", WAIT);
    let finals: Vec<Value> = controller
        .signals("hang-1")
        .into_iter()
        .filter(|s| s["atask_status"] != "accepted")
        .collect();
    assert!(finals.is_empty(), "SIGNALs after terminate: {finals:?}");
    let d = get_data(&a, "after");
    assert_eq!(d["result"], 2);
}

/// `terminate` of a task still waiting for a slot; `client_error` from a
/// controller means the same; other statuses from a controller are refused.
#[test]
fn terminate_a_queued_task_and_statuses_a_controller_may_not_send() {
    let agent = Daemon::agent(&["--capacity", "1"]);
    let a = agent.arpcp();
    let mut c = Conn::connect(&a);
    assert_eq!(
        code(&c.request(&req::atask_with("blocker", "sleep", json!([30]), None))),
        100
    );
    // Tasks accepted back to back race for the slot; let the blocker take it first.
    wait_until(WAIT, "the blocker to run", || {
        get_data(&a, "blocker")["running"] == true
    });
    assert_eq!(
        code(&c.request(&req::atask_with("waiting", "add", json!([1, 2]), None))),
        100
    );
    let d = get_data(&a, "waiting");
    assert_eq!(d["atask_status"], "accepted");
    assert_eq!(d["running"], false);

    assert_response(&c.request(&req::signal("waiting", "terminate")), 100, &[]);
    assert_response(&c.request(&req::get("waiting")), 205, &[]);

    for status in ["done", "accepted", "interrupted"] {
        let r = c.request(&req::signal("blocker", status));
        assert_response(&r, 200, &["`atask_status`", status]);
    }
    assert_eq!(get_data(&a, "blocker")["running"], true);

    assert_response(
        &c.request(&req::signal("blocker", "client_error")),
        100,
        &[],
    );
    assert_response(&c.request(&req::get("blocker")), 205, &[]);
    wait_until(WAIT, "the slot to be free", || {
        call(&a, &req::id())["data"]["running"] == 0
    });
    // The freed slot runs new work.
    let r = c.request(&req::task("add", json!([2, 2])));
    assert_eq!(r["data"]["result"], 4, "{r}");
}

/// With `--capacity 2`, four tasks run two at a time: ID never reports more than
/// two running, the later two wait (`running: false`), and all four finish.
#[test]
fn capacity_limits_parallel_tasks() {
    let agent = Daemon::agent(&["--capacity", "2"]);
    let a = agent.arpcp();
    let mut c = Conn::connect(&a);
    let ids = ["cap-1", "cap-2", "cap-3", "cap-4"];
    for id in ids {
        let r = c.request(&req::atask_with(id, "sleep", json!([1]), None));
        assert_response(&r, 100, &[]);
    }
    let get = |c: &mut Conn, id: &str| -> Value {
        let r = c.request(&req::get(id));
        assert_eq!(code(&r), 100, "{r}");
        r["data"].clone()
    };
    // Tasks accepted back to back race for the slots, so "the first two" are
    // whichever two started.
    let first_two: Vec<&str> = wait_for(WAIT, "two tasks to run", || {
        let on: Vec<&str> = ids
            .into_iter()
            .filter(|id| get(&mut c, id)["running"] == true)
            .collect();
        (on.len() >= 2).then_some(on)
    });
    assert_eq!(
        first_two.len(),
        2,
        "more than two run at once: {first_two:?}"
    );
    for id in ids.iter().filter(|id| !first_two.contains(id)) {
        let d = get(&mut c, id);
        assert_eq!(d["running"], false, "a third task runs beside two: {d}");
        assert_eq!(d["atask_status"], "accepted", "{d}");
    }
    assert!(
        first_two
            .iter()
            .all(|id| get(&mut c, id)["running"] == true),
        "the first two ended too early for this check to mean anything"
    );

    let mut max_running = 0;
    wait_until(WAIT, "all four tasks to finish", || {
        let id = c.request(&req::id());
        let n = id["data"]["running"].as_u64().expect("ID running");
        max_running = max_running.max(n);
        ids.iter().all(|t| {
            let r = c.request(&req::get(t));
            r["data"]["atask_status"] == "done"
        })
    });
    assert!(max_running <= 2, "ID reported {max_running} running tasks");
    assert_eq!(call(&a, &req::id())["data"]["running"], 0);
}

/// ID describes the agent; an assigned agent_id is kept, also across restarts.
#[test]
fn id_describes_the_agent_and_keeps_its_assigned_id() {
    let mut agent = Daemon::agent(&["--capacity", "3"]);
    let r = call(&agent.arpcp(), &req::id());
    assert_response(&r, 100, &[]);
    let d = &r["data"];
    let mac = d["mac"].as_str().expect("mac is a string");
    let parts: Vec<&str> = mac.split(':').collect();
    assert!(
        parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit())),
        "mac {mac:?} is not xx:xx:xx:xx:xx:xx"
    );
    assert_eq!(d["ip"], "127.0.0.1");
    assert_eq!(d["port"], agent.port("arpcp"));
    assert_eq!(d["version"], "1.0");
    assert_eq!(d["capacity"], 3);
    assert_eq!(d["running"], 0);
    assert!(d["hostname"].as_str().is_some_and(|h| !h.is_empty()), "{d}");
    let procs: Vec<&str> = d["procedures"]
        .as_array()
        .expect("procedures is an array")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for b in BUILTINS {
        assert!(procs.contains(&b), "{b} missing from {procs:?}");
    }
    assert!(
        d.get("agent_id").is_none(),
        "no agent_id before one is assigned: {d}"
    );

    let mut assign = req::id();
    assign["agent_id"] = "agent-42".into();
    assert_eq!(
        call(&agent.arpcp(), &assign)["data"]["agent_id"],
        "agent-42"
    );
    assert_eq!(
        call(&agent.arpcp(), &req::id())["data"]["agent_id"],
        "agent-42"
    );

    agent.kill9();
    agent.restart();
    let r = call(&agent.arpcp(), &req::id());
    assert_eq!(r["data"]["agent_id"], "agent-42", "{r}");
    assert_eq!(r["data"]["port"], agent.port("arpcp"));
}

/// A controller named in ID receives the SIGNALs of tasks without `reply_to`,
/// carrying the agent id it assigned.
#[test]
fn id_tells_the_agent_where_its_controller_is() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&[]);
    let mut probe = req::id();
    probe["agent_id"] = "agent-7".into();
    probe["controller"] = controller.addr().into();
    assert_response(&call(&agent.arpcp(), &probe), 100, &[]);

    let r = call(
        &agent.arpcp(),
        &req::atask_with("via-id", "add", json!([20, 22]), None),
    );
    assert_response(&r, 100, &[]);
    let done = controller.wait_signal("via-id", "done", WAIT);
    assert_eq!(done["agent_id"], "agent-7", "{done}");
}

/// `--controller`: the agent announces itself with ID carrying its port, and
/// SIGNALs of tasks without `reply_to` go there.
#[test]
fn agent_announces_itself_to_its_controller() {
    let controller = FakeController::start();
    let agent = Daemon::agent(&["--controller", controller.addr()]);
    let port = agent.port("arpcp");
    let hello = controller.wait_for(WAIT, "an ID announcement", |m| {
        m["method"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("ID"))
    });
    assert_eq!(hello["port"], port, "{hello}");

    let r = call(
        &agent.arpcp(),
        &req::atask_with("announced", "echo", json!(["x"]), None),
    );
    assert_response(&r, 100, &[]);
    let done = controller.wait_signal("announced", "done", WAIT);
    assert_eq!(done["atask_id"], "announced");
    assert_eq!(
        get_data(&agent.arpcp(), "announced")["result"],
        json!(["x"])
    );
}
