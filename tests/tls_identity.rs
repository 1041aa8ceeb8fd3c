//! With TLS an agent is its certificate: real processes (a TLS gateway, TLS agents)
//! and certificates made with the real `arpcp ca` commands, against a second holder
//! of a valid agent certificate driven by the test (impersonation, forged SIGNALs),
//! peers without the controller's role (reply_to, controller), and revocation with
//! `arpcp ca revoke` while everything keeps running.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arpcp::arpcp::tls::ArpcpTls;
use arpcp::arpcp::{ArpcpClient, Code, Request, Response};
use arpcp::pb;
use arpcp::tls::Role;
use common::gateway::*;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A CA with the gateway's certificate, agent-1's, agent-2's and a reader client's.
fn cluster_pki() -> (std::sync::Arc<tempfile::TempDir>, String) {
    let dir = tempdir();
    let d = dir.path();
    let pki = d.join("pki").to_string_lossy().into_owned();
    arpcp_ok(d, &["ca", "init", "--dir", &pki]);
    arpcp_ok(
        d,
        &[
            "ca",
            "issue",
            "gateway",
            "--san",
            "127.0.0.1",
            "--dir",
            &pki,
        ],
    );
    arpcp_ok(d, &["ca", "issue", "agent", "agent-1", "--dir", &pki]);
    arpcp_ok(d, &["ca", "issue", "agent", "agent-2", "--dir", &pki]);
    arpcp_ok(
        d,
        &[
            "ca", "issue", "client", "alice", "--role", "reader", "--dir", &pki,
        ],
    );
    arpcp_ok(
        d,
        &[
            "ca", "issue", "client", "ops", "--role", "operator", "--dir", &pki,
        ],
    );
    (dir, pki)
}

/// A TLS gateway over `agents`, called through gRPC as the `operator` "ops".
fn tls_cluster(agents: Vec<Daemon>, pki: &str, extra: &[&str]) -> Cluster {
    let p = Path::new(pki);
    let tls = client_tls(
        &p.join("ca.pem"),
        Some((&p.join("ops.pem"), &p.join("ops-key.pem"))),
    );
    let mut args = vec!["--tls-dir", pki];
    args.extend_from_slice(extra);
    Cluster::start_tls(agents, &args, tls)
}

fn tls_agent(pki: &str, name: &str) -> Daemon {
    Daemon::agent(&["--tls-dir", pki, "--tls-name", name])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn request(v: Value) -> Request {
    Request::parse(v.to_string().as_bytes()).unwrap()
}

/// `req` sent to `addr` holding NAME's certificate from `pki`, to a server that
/// must hold `server_role`.
fn call_as(
    pki: &str,
    name: &str,
    server_role: Role,
    addr: &str,
    req: &Request,
) -> Result<Response, String> {
    let tls = ArpcpTls::load(Path::new(pki), name).unwrap();
    let client = ArpcpClient::new(Duration::from_secs(3), Duration::from_secs(5))
        .with_tls(Some(tls.calling(server_role)));
    rt().block_on(client.call(addr, req))
        .map_err(|e| e.to_string())
}

/// A TLS server holding NAME's certificate that answers every request with an ID
/// answer claiming `mac` and `port`: someone with a valid agent certificate posing
/// as the agent those belong to. Runs until the test process ends; returns its
/// address.
fn impostor(pki: &str, name: &str, mac: &str, port: u32) -> String {
    impostor_on(pki, name, mac, port, "127.0.0.1:0").0
}

/// `impostor` listening on `bind`; also returns every request line it received.
fn impostor_on(
    pki: &str,
    name: &str,
    mac: &str,
    port: u32,
    bind: &str,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let heard = received.clone();
    let tls = ArpcpTls::load(Path::new(pki), name).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
    let listener = std::net::TcpListener::bind(bind).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = json!({"code": 100, "description": "OK", "data": {
        "mac": mac, "ip": "127.0.0.1", "hostname": "impostor", "port": port,
        "version": "1.0", "procedures": ["add", "sleep"], "capacity": 100_000,
        "running": 0,
    }});
    std::thread::spawn(move || {
        rt().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, answer) = (acceptor.clone(), answer.clone());
                let heard = heard.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (read, mut write) = tokio::io::split(tls);
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(request)) = lines.next_line().await {
                        heard.lock().unwrap().push(request);
                        let line = format!("{answer}\r\n");
                        if write.write_all(line.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    (addr.to_string(), received)
}

type TlsLines = tokio::io::Lines<BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

/// A TLS connection to `addr` holding NAME's certificate, kept open by the test.
async fn open_as(pki: &str, name: &str, addr: &str) -> TlsLines {
    let tls = ArpcpTls::load(Path::new(pki), name).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.client);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ip: std::net::SocketAddr = addr.parse().unwrap();
    let stream = connector
        .connect(rustls_pki_types::ServerName::IpAddress(ip.ip().into()), tcp)
        .await
        .unwrap();
    BufReader::new(stream).lines()
}

/// Sends ID on the open connection; its answer, or `None` once the server closed it.
async fn ask(conn: &mut TlsLines) -> Option<Value> {
    let line = b"{\"protocol\": \"arpcp\", \"version\": \"1.0\", \"method\": \"ID\"}\r\n";
    conn.get_mut().get_mut().write_all(line).await.ok()?;
    let answer = tokio::time::timeout(WAIT, conn.next_line())
        .await
        .ok()?
        .ok()??;
    serde_json::from_str(&answer).ok()
}

#[test]
fn a_second_agent_certificate_cannot_take_over_an_agent_or_signal_its_tasks() {
    let (_dir, pki) = cluster_pki();
    let c = tls_cluster(vec![tls_agent(&pki, "agent-1")], &pki, &[]);
    let first = c.gw.wait_alive(1, WAIT).remove(0);
    assert_eq!(first.certificate_name, "agent-1", "{first:?}");

    // agent-2 answers ID with agent-1's MAC and port, and announces itself.
    let fake = impostor(&pki, "agent-2", &first.mac, first.port);
    let fake_port: u16 = fake.rsplit_once(':').unwrap().1.parse().unwrap();
    let announce = request(json!({
        "protocol": "arpcp", "version": "1.0", "method": "ID", "port": fake_port,
    }));
    let r = call_as(
        &pki,
        "agent-2",
        Role::Gateway,
        &c.gateway.arpcp(),
        &announce,
    )
    .unwrap();
    assert_eq!(r.code, Code::Ok, "{r:?}");
    let agents = c.gw.wait_alive(2, WAIT);
    let second = agents
        .iter()
        .find(|a| a.address == fake)
        .unwrap_or_else(|| panic!("the announced agent is not listed: {agents:?}"));
    assert_eq!(second.certificate_name, "agent-2", "{second:?}");
    assert_ne!(second.agent_id, first.agent_id, "{agents:?}");
    let still = c.gw.agent(&first.agent_id);
    assert_eq!(
        (still.address.as_str(), still.certificate_name.as_str()),
        (first.address.as_str(), "agent-1"),
        "agent-1's record changed: {still:?}"
    );

    // agent-1's tasks run on agent-1.
    let mut add = submit_req("add", json!([2, 3]));
    add.agent_id = first.agent_id.clone();
    let id = c.gw.submit(add).unwrap().task_id;
    let t = c.gw.wait_final(&id, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(5)));
    assert_eq!(t.agent_id, first.agent_id);

    // agent-2 forges progress for a task of agent-1's.
    let mut sleep = submit_req("sleep", json!([5]));
    sleep.agent_id = first.agent_id.clone();
    let long = c.gw.submit(sleep).unwrap().task_id;
    c.gw.wait_status(&long, pb::TaskStatus::Running, WAIT);
    let forged = request(json!({
        "protocol": "arpcp", "version": "1.0", "method": "SIGNAL",
        "atask_id": format!("{long}.1"), "atask_status": "accepted",
        "progress": {"percent": 0.99, "comment": "forged"},
    }));
    let r = call_as(&pki, "agent-2", Role::Gateway, &c.gateway.arpcp(), &forged).unwrap();
    assert_eq!(r.code, Code::UnknownMethod, "{r:?}");
    for needle in [
        format!("{long}.1"),
        "agent-2".into(),
        "not placed on".into(),
    ] {
        assert!(r.description.contains(&needle), "{r:?}");
    }
    // Nor may it end the task early.
    let done = request(json!({
        "protocol": "arpcp", "version": "1.0", "method": "SIGNAL",
        "atask_id": format!("{long}.1"), "atask_status": "done",
    }));
    let r = call_as(&pki, "agent-2", Role::Gateway, &c.gateway.arpcp(), &done).unwrap();
    assert_eq!(r.code, Code::UnknownMethod, "{r:?}");
    let t = c.gw.task(&long);
    assert!(
        t.progress.as_ref().is_none_or(|p| p.comment != "forged"),
        "the forged progress was stored: {}",
        describe(&t)
    );
    assert_eq!(t.status, pb::TaskStatus::Running as i32, "{}", describe(&t));
    let t = c.gw.wait_final(&long, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(t.agent_id, first.agent_id);
}

#[test]
fn reply_to_and_controller_are_taken_only_from_the_controller() {
    let (_dir, pki) = cluster_pki();
    let mut agent = tls_agent(&pki, "agent-1");
    let addr = agent.arpcp();
    let set_controller = |to: &str| {
        request(json!({
            "protocol": "arpcp", "version": "1.0", "method": "ID", "controller": to,
        }))
    };
    // The gateway's certificate sets it (and so shows where it is kept).
    let r = call_as(
        &pki,
        "gateway",
        Role::Agent,
        &addr,
        &set_controller("127.0.0.1:7001"),
    )
    .unwrap();
    assert_eq!(r.code, Code::Ok, "{r:?}");
    for (name, role) in [("agent-2", "agent"), ("alice", "reader")] {
        let r = call_as(
            &pki,
            name,
            Role::Agent,
            &addr,
            &set_controller("127.0.0.1:7666"),
        )
        .unwrap();
        assert_eq!(r.code, Code::UnknownMethod, "{name}: {r:?}");
        assert!(r.description.contains(&format!("has role {role}")), "{r:?}");
        let redirect = request(json!({
            "protocol": "arpcp", "version": "1.0", "method": "ATASK",
            "atask_id": format!("stolen-{name}.1"), "remote_procedure": "add",
            "remote_procedure_args": [2, 3], "reply_to": "127.0.0.1:7666",
        }));
        let r = call_as(&pki, name, Role::Agent, &addr, &redirect).unwrap();
        assert_eq!(r.code, Code::UnknownMethod, "{name}: {r:?}");
    }
    // What the agent persisted: the gateway's controller, no task of theirs.
    agent.sigterm();
    assert!(agent.wait_exit(WAIT).is_some(), "the agent did not stop");
    let db = sled::open(
        agent
            .dir()
            .join("agent-data")
            .join(arpcp::durable::AGENT_STORE),
    )
    .unwrap();
    let controller = db.open_tree("meta").unwrap().get("controller").unwrap();
    assert_eq!(
        controller.as_deref(),
        Some(b"127.0.0.1:7001".as_slice()),
        "stored controller"
    );
    let tasks = db.open_tree("tasks").unwrap();
    assert!(
        tasks
            .iter()
            .keys()
            .all(|k| !k.unwrap().windows(b"stolen".len()).any(|w| w == b"stolen")),
        "a refused ATASK was stored"
    );
}

#[test]
fn revoking_an_agent_cuts_it_off_without_a_restart() {
    let (dir, pki) = cluster_pki();
    let mut c = tls_cluster(
        vec![tls_agent(&pki, "agent-1"), tls_agent(&pki, "agent-2")],
        &pki,
        &[],
    );
    let agents = c.gw.wait_alive(2, WAIT);
    let by_name = |name: &str| {
        agents
            .iter()
            .find(|a| a.certificate_name == name)
            .unwrap_or_else(|| panic!("no {name} in {agents:?}"))
            .clone()
    };
    let (first, second) = (by_name("agent-1"), by_name("agent-2"));
    let mut add = submit_req("add", json!([2, 3]));
    add.agent_id = first.agent_id.clone();
    let id = c.gw.submit(add).unwrap().task_id;
    assert_task_status(&c.gw.wait_final(&id, WAIT), pb::TaskStatus::Done);

    let out = arpcp_ok(dir.path(), &["ca", "revoke", "agent-1", "--dir", &pki]);
    assert!(out.contains("revoked agent-1"), "{out}");
    let (status, out, err) = run_to_exit(
        dir.path(),
        &["ca", "revoke", "agent-1", "--dir", &pki],
        WAIT,
    );
    assert!(!status.success(), "revoked twice: {out}");
    assert!(err.contains("already revoked"), "{err}");

    // The running gateway stops reaching it: its pooled connection, verified
    // before, is not reused, and new handshakes refuse the certificate.
    c.gw.wait_agent_state(&first.agent_id, pb::AgentState::Gone, WAIT);
    wait_for_log(&c.gateway, &[&first.agent_id, "certificate revoked"]);
    assert!(c.gateway.is_running() && c.agents[0].is_running());
    // agent-2 is not affected, and takes the work.
    assert_eq!(
        c.gw.agent(&second.agent_id).state,
        pb::AgentState::Alive as i32
    );
    let id = c.gw.submit_ok("add", json!([2, 3]));
    let t = c.gw.wait_final(&id, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(t.agent_id, second.agent_id);

    // A revoked client certificate is refused by an agent's server in the handshake,
    // and a connection it opened before is closed at its next request.
    let agent_addr = c.agents[1].arpcp();
    let id = request(json!({"protocol": "arpcp", "version": "1.0", "method": "ID"}));
    let before = call_as(&pki, "alice", Role::Agent, &agent_addr, &id).unwrap();
    assert_eq!(before.code, Code::UnknownMethod, "{before:?}");
    let runtime = rt();
    let mut open = runtime.block_on(open_as(&pki, "alice", &agent_addr));
    let answer = runtime
        .block_on(ask(&mut open))
        .expect("an answer before the revocation");
    assert_eq!(answer["code"], json!(201), "{answer}");
    arpcp_ok(dir.path(), &["ca", "revoke", "alice", "--dir", &pki]);
    wait_until(WAIT, "the agent to close alice's open connection", || {
        runtime.block_on(ask(&mut open)).is_none()
    });
    wait_for_log(
        &c.agents[1],
        &[
            "closing the connection of 127.0.0.1:",
            "alice",
            "certificate revoked",
        ],
    );
    wait_until(WAIT, "the agent to refuse alice's certificate", || {
        call_as(&pki, "alice", Role::Agent, &agent_addr, &id).is_err()
    });
    wait_for_log(
        &c.agents[1],
        &[
            "refused a connection from 127.0.0.1:",
            "certificate revoked",
        ],
    );
}

#[test]
fn another_certificate_at_an_agents_address_gets_none_of_its_tasks() {
    let (_dir, pki) = cluster_pki();
    let mut c = tls_cluster(vec![tls_agent(&pki, "agent-1")], &pki, &[]);
    let first = c.gw.wait_alive(1, WAIT).remove(0);
    // agent-1's process goes away and agent-2's certificate takes over its port.
    c.agents[0].kill9();
    let (_, heard) = impostor_on(&pki, "agent-2", &first.mac, first.port, &first.address);
    let mut req = submit_req("add", json!([2, 3]));
    req.agent_id = first.agent_id.clone();
    // Placed on agent-1 unless the gateway already saw it is not there (then refused).
    let _ = c.gw.submit(req);

    c.gw.wait_agent_state(&first.agent_id, pb::AgentState::Gone, WAIT);
    let squatter = wait_for(WAIT, "agent-2 registered at agent-1's address", || {
        c.gw.agents()
            .into_iter()
            .find(|a| a.certificate_name == "agent-2")
    });
    assert_eq!(squatter.address, first.address);
    assert_ne!(squatter.agent_id, first.agent_id);
    wait_for_log(
        &c.gateway,
        &[&first.agent_id, "answered with the certificate of"],
    );
    let heard = heard.lock().unwrap().clone();
    let not_id: Vec<&String> = heard.iter().filter(|l| !l.contains("\"ID\"")).collect();
    assert!(
        not_id.is_empty(),
        "agent-2 was sent agent-1's requests: {not_id:?}"
    );
}
