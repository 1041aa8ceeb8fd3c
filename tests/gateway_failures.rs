//! The failure policy of docs/architecture.md, with real processes: an agent that
//! dies (`kill -9`) mid-task, one that freezes (SIGSTOP) and comes back with its
//! result, one that restarts, and one that is unreachable when a task is placed.

mod common;

use std::time::Duration;

use arpcp::pb;
use common::gateway::{
    agent_with_config, assert_task_status, describe, result_of, submit_req, Cluster,
};
use common::{call, code, req, wait_until, Daemon, WAIT};
use serde_json::{json, Value};

/// Fast failure detection: an agent is gone after 3 echoes of 200 ms.
const FAST: [&str; 4] = ["--echo-interval-ms", "200", "--max-misses", "3"];

fn reasons(t: &pb::Task) -> Vec<String> {
    t.history.iter().map(|h| h.reason.clone()).collect()
}

/// An agent killed with -9: its running task becomes INTERRUPTED with a reason
/// naming it, the agent is listed gone, and a task it had only accepted (waiting for
/// its only slot) is placed again and finishes on the other agent.
#[test]
fn agent_killed_mid_task() {
    let mut c = Cluster::start(
        vec![
            Daemon::agent(&["--capacity", "1"]),
            Daemon::agent(&["--capacity", "4"]),
        ],
        &FAST,
    );
    let (victim, other) = (c.id(0).to_string(), c.id(1).to_string());

    // Both tasks go to the victim while the other agent is blacklisted.
    c.gw.blacklist(&other).unwrap();
    let running = c.gw.submit_ok("sleep", json!([30]));
    let t = c.gw.wait_status(&running, pb::TaskStatus::Running, WAIT);
    assert_eq!(t.agent_id, victim);
    let waiting = c.gw.submit_ok("add", json!([2, 3]));
    let t =
        c.gw.wait_task(&waiting, WAIT, "placement on the victim", |t| {
            t.agent_id == victim && t.status == pb::TaskStatus::Dispatched as i32
        });
    assert_eq!(t.attempts, 1);
    // The victim holds it (a placement is recorded before its ATASK goes out).
    let atask_id = format!("{waiting}.1");
    wait_until(WAIT, "the victim to hold the waiting task", || {
        code(&call(&c.agents[0].arpcp(), &req::get(&atask_id))) == 100
    });
    c.gw.unblacklist(&other).unwrap();
    // Still waiting for the victim's only slot.
    assert_task_status(&c.gw.task(&waiting), pb::TaskStatus::Dispatched);

    c.agents[0].kill9();

    let gone = c.gw.wait_agent_state(&victim, pb::AgentState::Gone, WAIT);
    assert!(gone.misses >= 3, "{gone:?}");
    let t = c.gw.wait_final(&running, WAIT);
    assert_task_status(&t, pb::TaskStatus::Interrupted);
    assert!(
        t.error.contains(&victim) && t.error.contains("left the cluster"),
        "the reason names the agent: {}",
        describe(&t)
    );
    assert_eq!(t.agent_id, victim);
    assert!(
        reasons(&t).iter().any(|r| r.contains(&victim)),
        "{}",
        describe(&t)
    );

    let t = c.gw.wait_final(&waiting, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(5)));
    assert_eq!(t.agent_id, other, "{}", describe(&t));
    assert_eq!(t.attempts, 2, "{}", describe(&t));
    let requeued = t
        .history
        .iter()
        .find(|h| h.status == pb::TaskStatus::Queued as i32 && !h.reason.is_empty())
        .unwrap_or_else(|| panic!("a re-dispatch with its reason: {}", describe(&t)));
    // The victim stores a task just before it answers its ATASK: a kill in between
    // cuts the answer off, and the gateway's retry finds the victim down ("unreachable")
    // before membership declares it gone ("before starting"). Either way it is placed
    // again, once.
    assert!(
        requeued.reason.contains(&victim)
            && (requeued.reason.contains("before starting")
                || requeued.reason.contains("unreachable")),
        "{}",
        describe(&t)
    );
    let placements: Vec<&str> = t
        .history
        .iter()
        .filter(|h| h.status == pb::TaskStatus::Dispatched as i32)
        .map(|h| h.agent_id.as_str())
        .collect();
    assert_eq!(placements, [victim.as_str(), other.as_str()]);

    // New tasks go to the agent that is left; ListProcedures no longer offers the
    // gone one.
    let id = c.gw.submit_ok("mul", json!([2, 4]));
    assert_eq!(c.gw.wait_final(&id, WAIT).agent_id, other);
    for p in c.gw.procedures() {
        assert_eq!(p.agent_ids, std::slice::from_ref(&other), "{p:?}");
    }
    let mut r = submit_req("add", json!([1, 1]));
    r.agent_id = victim.clone();
    let e = c.gw.submit(r).expect_err("the gone agent takes no tasks");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}

/// An agent frozen long enough to be declared gone: its tasks are INTERRUPTED;
/// when it thaws and delivers their results, they become DONE.
#[test]
fn frozen_agent_delivers_its_results_after_all() {
    let config = r#"
[[procedure]]
name = "slow_echo"
command = ["sh", "-c", "sleep 1; echo finished"]
"#;
    let c = Cluster::start(vec![agent_with_config(config, &["--capacity", "4"])], &FAST);
    let agent_id = c.id(0).to_string();
    let builtin = c.gw.submit_ok("sleep", json!([2]));
    let command = c.gw.submit_ok("slow_echo", json!([]));
    for id in [&builtin, &command] {
        c.gw.wait_status(id, pb::TaskStatus::Running, WAIT);
    }

    c.agents[0].signal(libc::SIGSTOP);
    let thawed = scopeguard(&c.agents[0]);

    c.gw.wait_agent_state(&agent_id, pb::AgentState::Gone, WAIT);
    for id in [&builtin, &command] {
        let t = c.gw.wait_final(id, WAIT);
        assert_task_status(&t, pb::TaskStatus::Interrupted);
        assert!(t.error.contains(&agent_id), "{}", describe(&t));
    }

    drop(thawed); // SIGCONT
    c.gw.wait_agent_state(&agent_id, pb::AgentState::Alive, WAIT);
    let t = c.gw.wait_status(&builtin, pb::TaskStatus::Done, WAIT);
    assert_eq!(result_of(&t), Some(Value::Null), "{}", describe(&t));
    assert!(t.error.is_empty(), "{}", describe(&t));
    assert!(
        t.history
            .last()
            .is_some_and(|h| h.reason.contains("after all")),
        "{}",
        describe(&t)
    );
    let t = c.gw.wait_status(&command, pb::TaskStatus::Done, WAIT);
    assert_eq!(result_of(&t), Some(json!("finished")), "{}", describe(&t));
    let statuses: Vec<i32> = t.history.iter().map(|h| h.status).collect();
    assert!(
        statuses.contains(&(pb::TaskStatus::Interrupted as i32)),
        "the history keeps the interruption: {}",
        describe(&t)
    );
}

/// Sends SIGCONT when dropped, so a failed test does not leave a stopped process.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

fn scopeguard(d: &Daemon) -> Thaw {
    Thaw(d.pid())
}

/// An agent that dies and restarts before the gateway notices: the task it was
/// running is reported interrupted (never re-run); a task waiting for its slot runs
/// after the restart.
#[test]
fn agent_restarting_quickly_reports_its_running_task_interrupted() {
    // A slow echo round, so the restart goes unnoticed by membership.
    let mut c = Cluster::start(
        vec![Daemon::agent(&["--capacity", "1"])],
        &["--echo-interval-ms", "2000"],
    );
    let running = c.gw.submit_ok("sleep", json!([30]));
    c.gw.wait_status(&running, pb::TaskStatus::Running, WAIT);
    let waiting = c.gw.submit_ok("mul", json!([3, 4]));
    c.gw.wait_status(&waiting, pb::TaskStatus::Dispatched, WAIT);
    // The agent has stored it (a placement is recorded before its ATASK goes out).
    let atask_id = format!("{waiting}.1");
    wait_until(WAIT, "the agent to hold the waiting task", || {
        code(&call(&c.agents[0].arpcp(), &req::get(&atask_id))) == 100
    });

    c.agents[0].kill9();
    c.agents[0].restart_on_same_ports();

    let t = c.gw.wait_final(&running, WAIT);
    assert_task_status(&t, pb::TaskStatus::Interrupted);
    assert!(!t.error.is_empty(), "{}", describe(&t));
    assert_eq!(t.attempts, 1, "never re-run: {}", describe(&t));
    let t = c.gw.wait_final(&waiting, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(12)));
    // The agent stores a task just before it answers its ATASK: a kill in between
    // cuts the answer off, the gateway's retry finds the agent down and places the
    // task again, and the restarted agent, asking before it starts the stored
    // attempt, is told it was withdrawn. Either way it runs once.
    if t.attempts != 1 {
        assert_eq!(t.attempts, 2, "{}", describe(&t));
        assert!(
            reasons(&t).iter().any(|r| r.contains("unreachable")),
            "{}",
            describe(&t)
        );
    }
}

/// An agent that is unreachable when a task is placed (the gateway does not know
/// yet): the task goes back to the queue and runs on the other agent.
#[test]
fn unreachable_agent_at_placement_sends_the_task_elsewhere() {
    let mut c = Cluster::start(
        vec![Daemon::agent(&[]), Daemon::agent(&[])],
        &["--echo-interval-ms", "5000"],
    );
    // The dead one is the agent placement prefers among equally loaded ones.
    let first = usize::from(c.id(1) < c.id(0));
    let (dead, other) = (c.id(first).to_string(), c.id(1 - first).to_string());
    c.agents[first].kill9();
    // Membership still lists it alive (the next echo is seconds away); every task
    // still ends DONE on `other`, promptly, and is not offered to the dead agent
    // again once it refused a connection.
    let ids: Vec<String> = (0..6)
        .map(|i| c.gw.submit_ok("add", json!([i, 1])))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let t = c.gw.wait_final(id, Duration::from_secs(4));
        assert_task_status(&t, pb::TaskStatus::Done);
        assert_eq!(result_of(&t), Some(json!(i + 1)));
        assert_eq!(t.agent_id, other, "{}", describe(&t));
        assert!(
            t.attempts <= 2,
            "after one refused connection the agent gets no more tasks: {}",
            describe(&t)
        );
        if t.attempts > 1 {
            assert!(
                reasons(&t)
                    .iter()
                    .any(|r| r.contains(&dead) && r.contains("unreachable")),
                "{}",
                describe(&t)
            );
        }
    }
    let a = c.gw.agent(&dead);
    assert_eq!(a.state, pb::AgentState::Suspect as i32, "{a:?}");
}

/// Why an agent is missed is said at the default log level: when it leaves, with the
/// reason of its last missed echo, and once for a configured address that never
/// answers (both showed only with RUST_LOG=debug).
#[test]
fn the_gateway_says_why_an_agent_is_missed() {
    let nobody = common::reserve_port();
    let mut extra = FAST.to_vec();
    extra.extend_from_slice(&["--agent", &nobody]);
    let mut c = Cluster::start(vec![Daemon::agent(&[])], &extra);
    let id = c.id(0).to_string();
    c.agents[0].kill9();
    c.gw.wait_agent_state(&id, pb::AgentState::Gone, WAIT);
    common::wait_for_log(&c.gateway, &["left the cluster", &id, "reason=", "refused"]);
    common::wait_for_log(&c.gateway, &["configured agent does not answer", &nobody]);
    // Said once, though it was probed in every round while the agent left (3 misses).
    let said = |log: &str| {
        log.lines()
            .filter(|l| l.contains("configured agent does not answer"))
            .count()
    };
    assert_eq!(said(&c.gateway.stderr()), 1, "{}", c.gateway.stderr());
}
