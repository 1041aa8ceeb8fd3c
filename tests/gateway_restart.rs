//! The gateway's durable state across restarts: `kill -9` under concurrent
//! submits loses no accepted task and runs none twice; agents that announce
//! themselves keep their ids across gateway and agent restarts; retention drops
//! the oldest finished tasks at start-up and never an unfinished one.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arpcp::pb;
use common::gateway::{
    agent_with_config, assert_status, assert_task_status, describe, result_of, submit_req, Cluster,
    Gw,
};
use common::{tempdir, wait_for, wait_until, Daemon, WAIT};
use serde_json::json;
use tonic::Code;

/// A gateway killed with -9 while 8 clients submit: after a restart on the same
/// data (new ports; `--agent` finds the agents again), every task whose Submit
/// returned OK exists and ends DONE, and none ran twice.
#[test]
fn gateway_killed_under_concurrent_submits() {
    let shared = tempdir();
    let runs = shared.path().join("runs.txt");
    let config = format!(
        r#"
[[procedure]]
name = "count_run"
command = ["sh", "-c", "echo \"$0\" >> '{}'"]
"#,
        runs.display()
    );
    let mut c = Cluster::start(
        vec![
            agent_with_config(&config, &["--capacity", "4"]),
            agent_with_config(&config, &["--capacity", "4"]),
        ],
        &[],
    );

    let accepted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    // Set just before the kill: a Submit failing earlier is a failure of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut submitters = Vec::new();
    for s in 0..8 {
        let mut client = c.gw.client();
        let accepted = accepted.clone();
        let stop = stop.clone();
        submitters.push(c.gw.rt().spawn(async move {
            let mut errors = Vec::new();
            for n in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let arg = format!("run-{s}-{n}");
                let call = client.submit(submit_req("count_run", json!([arg.clone()])));
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(r)) => accepted.lock().unwrap().push((r.into_inner().task_id, arg)),
                    Ok(Err(e)) => {
                        errors.push((stop.load(Ordering::SeqCst), e));
                        break;
                    }
                    Err(_) => break,
                }
            }
            errors
        }));
    }
    wait_until(WAIT, "60 accepted submits", || {
        accepted.lock().unwrap().len() >= 60
    });
    stop.store(true, Ordering::SeqCst);
    c.gateway.kill9();
    for s in submitters {
        let errors =
            c.gw.rt()
                .block_on(async { tokio::time::timeout(WAIT, s).await })
                .expect("submitters stop once the gateway is gone")
                .expect("a submitter panicked");
        assert!(
            errors.iter().all(|(killed, _)| *killed),
            "Submit failed before the kill: {errors:?}"
        );
    }
    let accepted = accepted.lock().unwrap().clone();

    c.restart_gateway();
    let listed = c.gw.wait_alive(2, WAIT);
    let ids: Vec<&str> = listed.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        2,
        "the restarted gateway knows the same two agents: {listed:?}"
    );
    for id in &c.ids {
        assert!(ids.contains(&id.as_str()), "{id} in {listed:?}");
    }
    for (id, arg) in &accepted {
        let t = c.gw.wait_final(id, Duration::from_secs(30));
        assert_task_status(&t, pb::TaskStatus::Done);
        assert_eq!(t.args.len(), 1);
        assert_eq!(common::gateway::args_of(&t), [json!(arg)]);
    }

    // Every task the restarted gateway holds ends, and each ran once.
    let stored = c.gw.list_all(pb::ListTasksRequest::default());
    assert!(stored.len() >= accepted.len());
    for t in &stored {
        let t = c.gw.wait_final(&t.task_id, Duration::from_secs(30));
        assert_task_status(&t, pb::TaskStatus::Done);
    }
    let text = std::fs::read_to_string(&runs).expect("runs.txt");
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        *count.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    for (id, arg) in &accepted {
        assert_eq!(
            count.get(arg.as_str()),
            Some(&1),
            "task {id} ({arg}) ran once"
        );
    }
    for t in &stored {
        let arg = common::gateway::args_of(t)[0].as_str().unwrap().to_string();
        assert_eq!(count.get(arg.as_str()), Some(&1), "{}", describe(t));
    }
}

/// An agent that announces itself to a gateway started without `--agent` is
/// listed alive and runs tasks; its id stays the same across a gateway restart
/// (new ports) and an agent restart (same port, same MAC).
#[test]
fn announced_agent_keeps_its_id_across_restarts() {
    let mut gateway = Daemon::gateway(&[]);
    let gw = Gw::connect(&gateway);
    let mut agent = Daemon::agent(&["--controller", &gateway.addr("arpcp")]);
    let listed = gw.wait_alive(1, WAIT);
    let a = &listed[0];
    let id = a.agent_id.clone();
    assert_eq!(a.port, u32::from(agent.port("arpcp")), "{a:?}");
    assert_eq!(a.address, agent.arpcp(), "{a:?}");
    let t = gw.wait_final(&gw.submit_ok("add", json!([20, 22])), WAIT);
    assert_eq!(result_of(&t), Some(json!(42)));
    assert_eq!(t.agent_id, id);

    // The gateway restarts on other ports: it finds the agent from its store.
    gateway.kill9();
    gateway.restart();
    let gw = Gw::connect(&gateway);
    let listed = gw.wait_alive(1, WAIT);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].agent_id, id);
    let t = gw.wait_final(&gw.submit_ok("add", json!([1, 2])), WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(t.agent_id, id);

    // The agent restarts on its port, still naming the old controller address.
    agent.kill9();
    agent.restart_on_same_ports();
    let listed = gw.wait_alive(1, WAIT);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].agent_id, id);
    let t = gw.wait_final(&gw.submit_ok("mul", json!([6, 7])), WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(t.agent_id, id);

    // A second agent announcing itself gets a new id.
    let _second = Daemon::agent(&["--controller", &gateway.addr("arpcp")]);
    let listed = gw.wait_alive(2, WAIT);
    let other: Vec<&str> = listed
        .iter()
        .map(|a| a.agent_id.as_str())
        .filter(|a| *a != id)
        .collect();
    assert_eq!(other.len(), 1, "{listed:?}");
}

/// Retention: restarted with `--retention-count 3`, the gateway keeps the newest 3
/// finished tasks; with `--retention-secs 0`, none; unfinished tasks stay.
#[test]
fn retention_drops_the_oldest_finished_tasks_at_start_up() {
    let mut c = Cluster::start(
        vec![Daemon::agent(&["--capacity", "2"])],
        &["--retention-count", "3"],
    );
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let id = c.gw.submit_ok("add", json!([i, i]));
            c.gw.wait_final(&id, WAIT);
            id
        })
        .collect();
    let running = c.gw.submit_ok("sleep", json!([60]));
    c.gw.wait_status(&running, pb::TaskStatus::Running, WAIT);
    assert_eq!(c.gw.list_all(pb::ListTasksRequest::default()).len(), 7);

    c.gateway.sigterm();
    assert!(
        c.gateway.wait_exit(WAIT).is_some(),
        "the gateway stops on SIGTERM"
    );
    c.restart_gateway();
    let finished = |gw: &Gw| -> Vec<String> {
        gw.list_all(pb::ListTasksRequest::default())
            .into_iter()
            .filter(|t| common::gateway::is_final(t.status))
            .map(|t| t.task_id)
            .collect()
    };
    let kept = wait_for(WAIT, "retention at start-up", || {
        let f = finished(&c.gw);
        (f.len() <= 3).then_some(f)
    });
    let newest: Vec<String> = ids[3..].iter().rev().cloned().collect();
    assert_eq!(kept, newest, "the newest three are kept");
    for old in &ids[..3] {
        assert_status(c.gw.get(old), Code::NotFound, &[old]);
    }
    assert_task_status(&c.gw.task(&running), pb::TaskStatus::Running);

    // Restarted with a retention of 0 s: every finished task goes, not the running one.
    let args: Vec<String> = vec![
        "--agent".into(),
        c.agents[0].arpcp(),
        "--retention-secs".into(),
        "0".into(),
    ];
    c.gateway.kill9();
    let dir = c.gateway.shared_dir();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = Daemon::gateway_in(dir, &args);
    let gw = Gw::connect(&gateway);
    wait_until(WAIT, "every finished task to go", || {
        finished(&gw).is_empty()
    });
    let left = gw.list_all(pb::ListTasksRequest::default());
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].task_id, running);
    let t = gw.wait_status(&running, pb::TaskStatus::Running, WAIT);
    assert!(!common::gateway::is_final(t.status), "{}", describe(&t));
    gw.cancel(&running).unwrap();

    // The gateway keeps working, and new tasks are kept until the next round.
    let mut r = submit_req("add", json!([1, 1]));
    r.sync = true;
    assert_task_status(&gw.submit(r).unwrap().task.unwrap(), pb::TaskStatus::Done);
}

/// SIGTERM stops the gateway promptly even while clients wait on a task (a
/// GetResult with a long wait, a WatchTask stream): the wait returns the task as
/// it is, the stream ends with UNAVAILABLE. Restarted, the gateway still follows
/// the task.
#[test]
fn sigterm_ends_open_waits_and_streams() {
    let mut c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let id = c.gw.submit_ok("sleep", json!([60]));
    c.gw.wait_status(&id, pb::TaskStatus::Running, WAIT);

    let mut client = c.gw.client();
    let task_id = id.clone();
    let wait = c.gw.rt().spawn(async move {
        client
            .get_result(pb::GetResultRequest {
                task_id,
                wait: Some(common::gateway::dur(Duration::from_secs(600))),
            })
            .await
            .map(tonic::Response::into_inner)
    });
    let mut client = c.gw.client();
    let task_id = id.clone();
    let first = Arc::new(AtomicBool::new(false));
    let got_first = first.clone();
    let watch = c.gw.rt().spawn(async move {
        let mut stream = client
            .watch_task(pb::WatchTaskRequest { task_id })
            .await?
            .into_inner();
        let mut seen = 0;
        // Bounded by the timeout the test puts around this task.
        loop {
            match stream.message().await {
                Ok(Some(_)) => {
                    seen += 1;
                    got_first.store(true, Ordering::SeqCst);
                }
                Ok(None) => return Ok(seen),
                Err(e) => return Err(e),
            }
        }
    });
    wait_until(WAIT, "the watch to send the task", || {
        first.load(Ordering::SeqCst)
    });

    c.gateway.sigterm();
    let began = std::time::Instant::now();
    assert!(
        c.gateway.wait_exit(WAIT).is_some(),
        "the gateway still runs {:?} after SIGTERM",
        began.elapsed()
    );
    // The wait was sent before the watch on the same connection; should it not
    // have reached the gateway yet, it fails like any call to a stopped gateway.
    match join(&c.gw, wait) {
        Ok(t) => assert_task_status(&t, pb::TaskStatus::Running),
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
    }
    match join(&c.gw, watch) {
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        Ok(n) => panic!("the stream ended as if the task had ended, after {n} messages"),
    }

    c.restart_gateway();
    assert_task_status(&c.gw.task(&id), pb::TaskStatus::Running);
    assert_task_status(&c.gw.cancel(&id).unwrap(), pb::TaskStatus::Cancelled);
}

/// A synchronous call cut off by a gateway crash: after the restart the task is
/// INTERRUPTED with the reason (the agent keeps no copy to ask about).
#[test]
fn sync_call_cut_off_by_a_crash_is_interrupted() {
    let mut c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let mut client = c.gw.client();
    let mut r = submit_req("sleep", json!([30]));
    r.sync = true;
    let call = c.gw.rt().spawn(async move { client.submit(r).await });
    let sync = wait_for(WAIT, "the sync call to be stored", || {
        c.gw.list_all(pb::ListTasksRequest {
            procedure: "sleep".into(),
            ..Default::default()
        })
        .pop()
    });
    assert_task_status(&sync, pb::TaskStatus::Dispatched);
    // A Submit's commit makes everything written before it durable.
    let other = c.gw.submit_ok("add", json!([1, 2]));
    c.gw.wait_final(&other, WAIT);

    c.gateway.kill9();
    let cut = join(&c.gw, call);
    assert!(cut.is_err(), "{cut:?}");
    c.restart_gateway();
    let t = c.gw.task(&sync.task_id);
    assert_task_status(&t, pb::TaskStatus::Interrupted);
    assert!(t.error.contains("restarted"), "{}", describe(&t));
    assert_task_status(&c.gw.task(&other), pb::TaskStatus::Done);
}

/// The blacklist is the operator's decision: once BlacklistAgent answered, it
/// survives a crash of the gateway.
#[test]
fn blacklist_survives_a_crash() {
    let mut c = Cluster::start(vec![Daemon::agent(&[]), Daemon::agent(&[])], &[]);
    let (black, other) = (c.id(0).to_string(), c.id(1).to_string());
    assert!(c.gw.blacklist(&black).unwrap().blacklisted);
    c.gateway.kill9();
    c.restart_gateway();
    c.gw.wait_alive(2, WAIT);
    assert!(c.gw.agent(&black).blacklisted, "{:?}", c.gw.agents());
    assert!(!c.gw.agent(&other).blacklisted);
    for i in 0..4 {
        let t = c.gw.wait_final(&c.gw.submit_ok("add", json!([i, 1])), WAIT);
        assert_eq!(t.agent_id, other, "{}", describe(&t));
    }

    assert!(!c.gw.unblacklist(&black).unwrap().blacklisted);
    c.gateway.kill9();
    c.restart_gateway();
    c.gw.wait_alive(2, WAIT);
    assert!(!c.gw.agent(&black).blacklisted);
}

/// Waits (bounded) for a client task spawned on the client's runtime.
fn join<T>(gw: &Gw, h: tokio::task::JoinHandle<T>) -> T {
    gw.rt()
        .block_on(async { tokio::time::timeout(WAIT, h).await })
        .expect("the call ends when the gateway stops")
        .expect("the client task")
}
