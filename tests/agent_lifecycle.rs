//! The agent across crashes, restarts and controller outages: results survive
//! `kill -9`, a task that was running is reported `interrupted` (never re-run),
//! queued tasks run after a restart, SIGNALs are retried until the controller is
//! back, and SIGTERM stops the agent within its grace period.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_response, call, code, process_alive, req, reserve_port, run_to_exit, wait_for,
    wait_for_pid_file, wait_until, Conn, Daemon, FakeController, WAIT,
};
use serde_json::{json, Value};

fn get(addr: &str, id: &str) -> Value {
    call(addr, &req::get(id))
}

fn wait_status(addr: &str, id: &str, status: &str) -> Value {
    wait_for(WAIT, &format!("task {id} to be {status}"), || {
        let r = get(addr, id);
        (r["data"]["atask_status"] == status).then_some(r)
    })
}

fn wait_running(addr: &str, id: &str) {
    wait_until(WAIT, &format!("task {id} to run"), || {
        get(addr, id)["data"]["running"] == true
    });
}

/// On an agent with capacity 1 and the `hang` procedure: places `long` (hang,
/// reporting to `controller`) and then `second`, waits until `long` runs, and
/// returns the pid of its program.
fn hang_and_queue(agent: &Daemon, controller: &FakeController, second: (&str, &str, Value)) -> u32 {
    let a = agent.arpcp();
    let pid_file = agent.dir().join("hang.pid");
    let ctl = Some(controller.addr());
    let pid_arg = json!([pid_file.to_str().expect("UTF-8 path")]);
    assert_response(
        &call(&a, &req::atask_with("long", "hang", pid_arg, ctl)),
        100,
        &[],
    );
    let (id, procedure, args) = second;
    assert_response(
        &call(&a, &req::atask_with(id, procedure, args, ctl)),
        100,
        &[],
    );
    wait_running(&a, "long");
    wait_for_pid_file(&pid_file, WAIT)
}

/// A finished result survives `kill -9` and a restart on the same data.
#[test]
fn finished_result_survives_kill_9() {
    let mut agent = Daemon::agent(&[]);
    let a = agent.arpcp();
    assert_response(
        &call(&a, &req::atask_with("kept", "add", json!([2, 3]), None)),
        100,
        &[],
    );
    wait_status(&a, "kept", "done");

    // Stored before the answer: killed right after 100, the task is not lost.
    assert_response(
        &call(&a, &req::atask_with("just-in", "mul", json!([6, 7]), None)),
        100,
        &[],
    );
    agent.kill9();
    agent.restart();
    let a = agent.arpcp();

    let r = get(&a, "kept");
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"]["atask_status"], "done");
    assert_eq!(r["data"]["result"], 5);

    let r = get(&a, "just-in");
    assert_eq!(code(&r), 100, "a task answered with 100 was lost: {r}");
    let status = r["data"]["atask_status"].as_str().unwrap_or_default();
    assert!(["accepted", "done", "interrupted"].contains(&status), "{r}");
    if status != "interrupted" {
        assert_eq!(wait_status(&a, "just-in", "done")["data"]["result"], 42);
    }
}

/// A task running when the agent is killed is `interrupted` after the restart
/// (and its controller hears so); a task still queued then runs.
#[test]
fn running_task_is_interrupted_and_queued_task_runs_after_kill_9() {
    let controller = FakeController::start();
    let dir = common::dir_with_agent_config(
        r#"
[[procedure]]
name = "hang"
command = ["sh", "-c", "echo $$ > \"$0\"; sleep 30"]
"#,
    );
    let mut agent = Daemon::agent_in(dir, &["--capacity", "1", "--config", "{dir}/agent.toml"]);
    let a = agent.arpcp();
    let pid = hang_and_queue(&agent, &controller, ("queued", "add", json!([1, 1])));
    assert_eq!(get(&a, "queued")["data"]["running"], false);

    agent.kill9();
    assert!(
        process_alive(pid),
        "the program outlives the agent's kill -9"
    );
    agent.restart();
    let a = agent.arpcp();
    // The restarted agent stops the program its crash left running: a task
    // reported interrupted does not go on.
    wait_until(WAIT, "the orphaned program to be stopped", || {
        !process_alive(pid)
    });

    let r = get(&a, "long");
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"]["atask_status"], "interrupted", "{r}");
    assert_eq!(r["data"]["running"], false);
    assert!(r["data"]["error"]["description"].is_string(), "{r}");
    controller.wait_signal("long", "interrupted", WAIT);

    assert_eq!(wait_status(&a, "queued", "done")["data"]["result"], 2);
    controller.wait_signal("queued", "done", WAIT);
    // Interrupted, never run again.
    let runs = controller
        .signals("long")
        .into_iter()
        .filter(|s| s["atask_status"] == "done")
        .count();
    assert_eq!(runs, 0);
}

/// A final SIGNAL to a controller that is down is retried until it is back.
#[test]
fn signal_is_retried_until_the_controller_is_back() {
    let agent = Daemon::agent(&[]);
    let a = agent.arpcp();
    let down = reserve_port();
    let sent = Instant::now();
    let r = call(
        &a,
        &req::atask_with("patient", "add", json!([40, 2]), Some(&down)),
    );
    assert_response(&r, 100, &[]);
    // The result is there to GET while the controller is away (about a second of
    // retries: 0.1 + 0.2 + 0.4 s of backoff).
    wait_until(WAIT, "a second of controller outage", || {
        let r = get(&a, "patient");
        assert_ne!(code(&r), 205, "the task vanished: {r}");
        r["data"]["atask_status"] == "done" && sent.elapsed() >= Duration::from_secs(1)
    });
    assert_eq!(get(&a, "patient")["data"]["result"], 42);

    let controller = FakeController::start_on(&down);
    // The backoff is capped at 5 s.
    let done = controller.wait_signal("patient", "done", Duration::from_secs(8));
    assert_eq!(done["atask_id"], "patient");
    // Still kept until the controller terminates it.
    assert_eq!(get(&a, "patient")["data"]["result"], 42);
    assert_response(&call(&a, &req::signal("patient", "terminate")), 100, &[]);
    assert_response(&get(&a, "patient"), 205, &[]);
}

/// SIGTERM lets a short task finish within the grace period: its `done` SIGNAL
/// goes out and the agent exits 0.
#[test]
fn sigterm_lets_a_short_task_finish() {
    let controller = FakeController::start();
    let mut agent = Daemon::agent(&["--grace-secs", "5"]);
    let a = agent.arpcp();
    let r = call(
        &a,
        &req::atask_with("short", "sleep", json!([0.5]), Some(controller.addr())),
    );
    assert_response(&r, 100, &[]);
    wait_running(&a, "short");
    agent.sigterm();
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("the agent exits after its task");
    assert!(status.success(), "exit status {status}");
    controller.wait_signal("short", "done", Duration::from_secs(1));

    agent.restart();
    assert_eq!(
        wait_status(&agent.arpcp(), "short", "done")["data"]["result"],
        Value::Null
    );
}

/// SIGTERM with a task that outlasts the grace period: the agent exits promptly,
/// kills the task's program, and the task is `interrupted` after a restart; a task
/// still queued stays queued and runs then.
#[test]
fn sigterm_interrupts_a_long_task_after_the_grace_period() {
    let controller = FakeController::start();
    let dir = common::dir_with_agent_config(
        r#"
[[procedure]]
name = "hang"
command = ["sh", "-c", "echo $$ > \"$0\"; sleep 30"]
"#,
    );
    let mut agent = Daemon::agent_in(
        dir,
        &[
            "--grace-secs",
            "0.5",
            "--capacity",
            "1",
            "--config",
            "{dir}/agent.toml",
        ],
    );
    let pid = hang_and_queue(&agent, &controller, ("next", "sub", json!([5, 2])));

    let stopping = Instant::now();
    agent.sigterm();
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("the agent exits after its grace period");
    let took = stopping.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    wait_until(WAIT, "the task's program to be killed", || {
        !process_alive(pid)
    });

    agent.restart();
    let a = agent.arpcp();
    let r = get(&a, "long");
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"]["atask_status"], "interrupted", "{r}");
    controller.wait_signal("long", "interrupted", WAIT);
    assert_eq!(wait_status(&a, "next", "done")["data"]["result"], 3);
}

/// SIGTERM while a synchronous TASK outlasts the grace period: the agent still
/// stops promptly and the caller gets an answer.
#[test]
fn sigterm_does_not_wait_for_a_long_synchronous_task() {
    let mut agent = Daemon::agent(&["--grace-secs", "0.5"]);
    let mut c = Conn::connect(&agent.arpcp());
    c.send(&req::task("sleep", json!([30])));
    wait_until(WAIT, "the TASK to run", || {
        call(&agent.arpcp(), &req::id())["data"]["running"] == 1
    });
    let stopping = Instant::now();
    agent.sigterm();
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("the agent exits");
    let took = stopping.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    match c.try_recv_line(Duration::from_secs(1)) {
        Ok(Some(line)) => {
            let r: Value = serde_json::from_slice(&line).expect("a JSON response");
            assert_response(&r, 400, &["shut down"]);
        }
        other => panic!("the caller got no answer: {other:?}"),
    }
}

/// A second agent on the data directory of a running one refuses to start.
#[test]
fn data_directory_in_use_is_refused() {
    let agent = Daemon::agent(&[]);
    let (status, _out, err) = run_to_exit(
        agent.dir(),
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/agent-data",
        ],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "a second agent ran on the same data");
    assert!(err.contains("error: "), "{err}");
    assert_response(&call(&agent.arpcp(), &req::id()), 100, &[]);
}
