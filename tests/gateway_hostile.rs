//! A hostile or confused ARPCP peer on the gateway's ARPCP listener (where agents
//! send SIGNALs): garbage, over-long lines, SIGNALs for ids the gateway never issued
//! or for tasks that ended, methods a controller does not serve. Every one gets a
//! precise answer, the gateway keeps serving, and no stored task changes.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arpcp::pb;
use common::gateway::{assert_task_status, describe, is_final, submit_req, Cluster};
use common::{assert_response, call, code, req, wait_until, Conn, Daemon, IO_TIMEOUT, WAIT};
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

/// Checks, over a window of `window`, that `f` keeps holding: for effects that must
/// *not* happen (a stored task changing after a stranger's SIGNAL).
fn holds_for(window: Duration, what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let end = Instant::now() + window;
    for _ in 0..10_000 {
        if let Err(e) = f() {
            panic!("{what}: {e}");
        }
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_with(id: &str, status: &str, extra: Value) -> Value {
    let mut m = req::signal(id, status);
    if let (Some(m), Value::Object(x)) = (m.as_object_mut(), extra) {
        m.extend(x);
    }
    m
}

#[test]
fn hostile_peer_on_the_arpcp_listener_changes_nothing() {
    let c = Cluster::start(vec![Daemon::agent(&["--capacity", "4"])], &[]);
    let gw = &c.gw;
    let listener = c.gateway.addr("arpcp");

    // Tasks in every final status, and one that runs.
    let done = gw.submit_ok("add", json!([2, 3]));
    let failed = gw.submit_ok("div", json!([1, 0]));
    let client_error = gw.submit_ok("add", json!([1]));
    let cancelled = gw.submit_ok("sleep", json!([30]));
    gw.wait_status(&cancelled, pb::TaskStatus::Running, WAIT);
    gw.cancel(&cancelled).unwrap();
    let running = gw.submit_ok("sleep", json!([30]));
    gw.wait_status(&running, pb::TaskStatus::Running, WAIT);
    let mut stored: BTreeMap<String, pb::Task> = BTreeMap::new();
    for (id, want) in [
        (&done, pb::TaskStatus::Done),
        (&failed, pb::TaskStatus::Failed),
        (&client_error, pb::TaskStatus::ClientError),
        (&cancelled, pb::TaskStatus::Cancelled),
    ] {
        let t = gw.wait_final(id, WAIT);
        assert_task_status(&t, want);
        stored.insert(id.clone(), t);
    }
    // The agent has let go of every finished task before the stranger comes.
    for id in stored.keys() {
        wait_until(WAIT, "the agent to delete its copy", || {
            code(&call(&c.agents[0].arpcp(), &req::get(&format!("{id}.1")))) == 205
        });
    }

    // Garbage: 200 each, and the connection stays open.
    let mut conn = Conn::connect(&listener);
    let garbage: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        b"{not json".to_vec(),
        b"[1, 2, 3]".to_vec(),
        b"\"a string\"".to_vec(),
        b"null".to_vec(),
        vec![0xff, 0xfe, 0x80, b'{', b'}'],
        b"\0\0\0".to_vec(),
        [vec![b'['; 100_000], vec![b']'; 100_000]].concat(),
        br#"{"method": "SIGNAL", "version": "1.0", "atask_id": 7, "atask_status": "done"}"#
            .to_vec(),
        br#"{"method": "SIGNAL", "version": "1.0", "atask_id": "a.1", "atask_status": "finished"}"#
            .to_vec(),
        br#"{"method": "ID", "version": "1.0", "port": 70000}"#.to_vec(),
        br#"{"method": "ID", "version": "1.0", "port": "x"}"#.to_vec(),
    ];
    for line in &garbage {
        let mut l = line.clone();
        l.extend_from_slice(b"\r\n");
        conn.send_raw(&l);
        let r = conn.recv();
        assert_eq!(
            code(&r),
            200,
            "{:?} got {r}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        );
    }
    // Missing headers, other versions, unknown methods.
    let r = conn.request(&json!({"version": "1.0"}));
    assert_response(&r, 202, &["method"]);
    let r = conn.request(&json!({"method": "SIGNAL"}));
    assert_response(&r, 202, &["version"]);
    let r = conn.request(&json!({"method": "SIGNAL", "version": "2.0"}));
    assert_response(&r, 206, &[]);
    let r = conn.request(&json!({"method": "ID", "version": 1.0}));
    assert_response(&r, 206, &["`version` must be a string", "got a number"]);
    let r = conn.request(&json!({"method": "FROB", "version": "1.0"}));
    assert_response(&r, 201, &["FROB"]);
    let r = conn.request(&json!({"method": "SIGNAL", "version": "1.0", "atask_id": "x"}));
    assert_response(&r, 202, &["atask_status"]);
    // Methods a controller does not serve.
    for m in [
        req::atask("add", json!([1, 2])),
        req::task("add", json!([1, 2])),
        req::get(&done),
    ] {
        assert_response(&conn.request(&m), 201, &[]);
    }
    // `terminate` is what a controller sends, not what it receives.
    assert_response(
        &conn.request(&req::signal(&format!("{done}.1"), "terminate")),
        200,
        &["terminate"],
    );
    // Ids the gateway never issued.
    for id in [
        "0190aaaa-0000-7000-8000-000000000000.1".to_string(),
        "0190aaaa-0000-7000-8000-000000000000".to_string(),
        "x.1".to_string(),
        "nodot".to_string(),
        "..".to_string(),
        format!("{done}.99"),
        format!("{done}.0"),
        format!("{done}.-1"),
        format!("{running}.2"),
        done.clone(),
    ] {
        for status in ["accepted", "done", "interrupted", "client_error"] {
            let r = conn.request(&req::signal(&id, status));
            assert_response(&r, 205, &[]);
        }
    }
    // The connection is still usable.
    let r = conn.request(&req::id());
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"]["role"], "controller");

    // A stranger reports the end of tasks that ended, and of the one that runs.
    for id in stored.keys().chain([&running]) {
        for (status, extra) in [
            ("done", json!({})),
            (
                "done",
                json!({"error": {"code": 400, "description": "forged"}}),
            ),
            ("interrupted", json!({})),
            (
                "client_error",
                json!({"error": {"code": 204, "description": "forged"}}),
            ),
        ] {
            let r = conn.request(&signal_with(&format!("{id}.1"), status, extra));
            assert!(
                matches!(code(&r), 100 | 205),
                "SIGNAL {status} for {id}: {r}"
            );
        }
    }
    holds_for(
        Duration::from_secs(1),
        "stored tasks stay as they were",
        || {
            for (id, t) in &stored {
                let now = gw.task(id);
                if &now != t {
                    return Err(format!(
                        "{id} changed:\n before {}\n now    {}",
                        describe(t),
                        describe(&now)
                    ));
                }
            }
            let now = gw.task(&running);
            if now.status != pb::TaskStatus::Running as i32 || now.result.is_some() {
                return Err(format!("the running task changed: {}", describe(&now)));
            }
            Ok(())
        },
    );

    // Over-long line: 200 and the connection closes.
    let mut long = Conn::connect(&listener);
    let _ = long.try_send_raw(&vec![b'{'; 2 * MIB]);
    assert_response(&long.recv(), 200, &["longer than the limit"]);
    long.expect_closed(IO_TIMEOUT);

    // The other connection still works, and so does the gateway.
    assert_response(&conn.request(&req::id()), 100, &[]);
    assert!(common::process_alive(c.gateway.pid()), "the gateway died");
    for (id, t) in &stored {
        assert_eq!(&gw.task(id), t, "{id}");
    }
    let t = gw.task(&running);
    assert_task_status(&t, pb::TaskStatus::Running);
    let after = gw.submit_ok("mul", json!([4, 5]));
    let t = gw.wait_final(&after, WAIT);
    assert_eq!(common::gateway::result_of(&t), Some(json!(20)));
    assert_eq!(gw.agents().len(), 1);
    gw.cancel(&running).unwrap();
    let mut r = submit_req("add", json!([1, 1]));
    r.sync = true;
    assert_task_status(&gw.submit(r).unwrap().task.unwrap(), pb::TaskStatus::Done);
}

/// A peer that is no agent, announced with ID: probed, never listed as an agent,
/// and not probed for ever.
#[test]
fn announcements_of_non_agents_are_not_registered_and_not_probed_for_ever() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let listener = c.gateway.addr("arpcp");

    // Something that accepts connections and never answers like an agent.
    let impostor = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = impostor.local_addr().unwrap().port();
    let probes = Arc::new(AtomicUsize::new(0));
    let counted = probes.clone();
    std::thread::spawn(move || {
        for s in impostor.incoming() {
            let Ok(mut s) = s else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = std::io::Write::write_all(&mut s, b"{\"code\": 100, \"data\": 5}\r\n");
        }
    });

    let r = call(
        &listener,
        &json!({"method": "ID", "version": "1.0", "port": port}),
    );
    assert_response(&r, 100, &[]);
    // Announcements of ports where nothing listens, and of the gateway itself.
    for _ in 0..20 {
        let free = common::reserve_port();
        let p: u16 = free.rsplit_once(':').unwrap().1.parse().unwrap();
        let r = call(
            &listener,
            &json!({"method": "ID", "version": "1.0", "port": p}),
        );
        assert_response(&r, 100, &[]);
    }
    let own = c.gateway.port("arpcp");
    let r = call(
        &listener,
        &json!({"method": "ID", "version": "1.0", "port": own}),
    );
    assert_response(&r, 100, &[]);

    wait_until(WAIT, "the gateway to probe the announced address", || {
        probes.load(Ordering::SeqCst) >= 1
    });
    // The gateway gives up on it after a few echo rounds (100 ms each here).
    let mut last = (probes.load(Ordering::SeqCst), Instant::now());
    wait_until(Duration::from_secs(10), "the probes to stop", || {
        let n = probes.load(Ordering::SeqCst);
        if n != last.0 {
            last = (n, Instant::now());
        }
        last.1.elapsed() > Duration::from_secs(1)
    });
    assert!(last.0 < 20, "probed {} times", last.0);
    let agents = c.gw.agents();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0].agent_id, c.id(0));
}

/// A peer that copies a live agent's ID answer (its MAC and the port it listens
/// on) and announces itself from another port is not that agent: the agent keeps
/// its id and address, and no task placed on it gets the impostor's answer.
#[test]
fn an_impostor_answering_with_an_agents_mac_and_port_does_not_take_its_place() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let real = c.agents[0].arpcp();
    let real_id = c.id(0).to_string();
    let copied = call(&real, &req::id());
    assert_response(&copied, 100, &[]);
    let copied = copied["data"].clone();

    // The impostor answers ID with the copy (the real agent's MAC and port) and
    // everything else as a finished task with a forged result.
    let probes = Arc::new(AtomicUsize::new(0));
    let counted = probes.clone();
    let port = fake_peer(move |r| match r["method"].as_str().unwrap_or_default() {
        "ID" => {
            counted.fetch_add(1, Ordering::SeqCst);
            copied.clone()
        }
        _ => json!({"atask_id": r["atask_id"], "atask_status": "done",
                    "running": false, "result": "FORGED"}),
    });
    let r = call(
        &c.gateway.addr("arpcp"),
        &json!({"method": "ID", "version": "1.0", "port": port}),
    );
    assert_response(&r, 100, &[]);
    wait_until(
        WAIT,
        "the gateway to probe the impostor a few times",
        || probes.load(Ordering::SeqCst) >= 3,
    );

    let agent = c.gw.agent(&real_id);
    assert_eq!(agent.address, real, "the real agent's address: {agent:?}");
    for _ in 0..5 {
        let mut r = submit_req("add", json!([1, 2]));
        r.agent_id = real_id.clone();
        let id = c.gw.submit(r).expect("a Submit").task_id;
        let t = c.gw.wait_final(&id, WAIT);
        assert_task_status(&t, pb::TaskStatus::Done);
        assert_eq!(
            common::gateway::result_of(&t),
            Some(json!(3)),
            "{}",
            describe(&t)
        );
    }
}

/// A peer on a loopback port that answers each request line with code 100 and the
/// `data` that `answer` makes of it; its port.
fn fake_peer(answer: impl Fn(&Value) -> Value + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let Ok(mut out) = s.try_clone() else { return };
                for line in std::io::BufRead::lines(std::io::BufReader::new(s)) {
                    let Ok(line) = line else { return };
                    let Ok(r) = serde_json::from_str::<Value>(&line) else {
                        return;
                    };
                    let data = answer(&r);
                    let reply = json!({"code": 100, "description": "OK", "data": data});
                    if std::io::Write::write_all(&mut out, format!("{reply}\r\n").as_bytes())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// An agent whose GET answers name another task than the one asked about: its
/// answer is not taken as this task's result.
#[test]
fn a_get_answer_for_another_task_is_not_stored() {
    let c = Cluster::start(vec![], &[]);
    let gateway = c.gateway.addr("arpcp");
    let gets = Arc::new(AtomicUsize::new(0));
    let counted = gets.clone();
    let port = Arc::new(std::sync::OnceLock::<u16>::new());
    let own = port.clone();
    let p = fake_peer(move |r| {
        let id = r["atask_id"].as_str().unwrap_or_default().to_string();
        match r["method"].as_str().unwrap_or_default() {
            "ID" => json!({"mac": "02:00:00:00:07:01", "ip": "127.0.0.1", "hostname": "mixed-up",
                "port": own.get().copied().unwrap_or(0), "version": "1.0", "procedures": ["add"],
                "capacity": 4, "running": 0, "agent_id": r["agent_id"]}),
            "ATASK" => {
                // Ends at once and says so.
                let reply_to = r["reply_to"].as_str().unwrap_or_default().to_string();
                let done = req::signal(&id, "done");
                std::thread::spawn(move || {
                    let _ = call(&reply_to, &done);
                });
                json!({"atask_id": id})
            }
            "GET" => {
                counted.fetch_add(1, Ordering::SeqCst);
                json!({"atask_id": "0195f3c2-7d1e-7aaa-8bbb-123456789abc.1",
                       "atask_status": "done", "running": false, "result": "WRONGID"})
            }
            _ => json!({"atask_id": id}),
        }
    });
    let _ = port.set(p);
    let r = call(
        &gateway,
        &json!({"method": "ID", "version": "1.0", "port": p}),
    );
    assert_response(&r, 100, &[]);
    c.gw.wait_alive(1, WAIT);

    let id = c.gw.submit_ok("add", json!([1, 2]));
    wait_until(WAIT, "the gateway to ask for the result", || {
        gets.load(Ordering::SeqCst) >= 1
    });
    holds_for(
        Duration::from_secs(2),
        "the task is not ended by another task's answer",
        || {
            let t = c.gw.task(&id);
            if is_final(t.status) {
                return Err(describe(&t));
            }
            Ok(())
        },
    );
}
