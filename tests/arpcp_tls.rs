//! ARPCP over mutual TLS between real processes: a gateway and an agent started
//! with `--tls-dir`, certificates made by the real `arpcp ca` commands, and peers
//! (the crate's own ARPCP client with other certificates, or a plain socket) that
//! the daemons must refuse.

mod common;

use std::path::Path;
use std::time::Duration;

use arpcp::arpcp::tls::ArpcpTls;
use arpcp::arpcp::{ArpcpClient, Code, Request, Response};
use arpcp::pb;
use arpcp::tls::ca::{self, IssueRequest, Validity};
use arpcp::tls::Role;
use common::gateway::*;
use common::*;
use serde_json::json;

/// A certificate directory made as an operator makes one: a CA, the gateway's
/// certificate, agent-1's, and a `reader` client's.
fn cluster_pki() -> std::sync::Arc<tempfile::TempDir> {
    let dir = tempdir();
    let d = dir.path();
    let pki = d.join("pki");
    let pki = pki.to_str().unwrap();
    arpcp_ok(d, &["ca", "init", "--dir", pki]);
    // The gRPC API is served with this certificate too, to clients that check
    // the host they dial.
    arpcp_ok(
        d,
        &["ca", "issue", "gateway", "--san", "127.0.0.1", "--dir", pki],
    );
    arpcp_ok(d, &["ca", "issue", "agent", "agent-1", "--dir", pki]);
    arpcp_ok(
        d,
        &[
            "ca", "issue", "client", "alice", "--role", "reader", "--dir", pki,
        ],
    );
    arpcp_ok(
        d,
        &[
            "ca", "issue", "client", "ops", "--role", "operator", "--dir", pki,
        ],
    );
    dir
}

/// A TLS cluster of one agent, called through gRPC as the `operator` "ops".
fn tls_cluster(pki: &str) -> Cluster {
    let p = Path::new(pki);
    let tls = client_tls(
        &p.join("ca.pem"),
        Some((&p.join("ops.pem"), &p.join("ops-key.pem"))),
    );
    Cluster::start_tls(vec![tls_agent(pki)], &["--tls-dir", pki], tls)
}

fn pki_of(dir: &tempfile::TempDir) -> String {
    dir.path().join("pki").to_string_lossy().into_owned()
}

fn tls_agent(pki: &str) -> Daemon {
    Daemon::agent(&["--tls-dir", pki, "--tls-name", "agent-1"])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn request(v: serde_json::Value) -> Request {
    Request::parse(v.to_string().as_bytes()).unwrap()
}

fn id_request() -> Request {
    request(json!({"protocol": "arpcp", "version": "1.0", "method": "ID"}))
}

fn atask_request() -> Request {
    request(json!({
        "protocol": "arpcp", "version": "1.0", "method": "ATASK",
        "remote_procedure": "add", "remote_procedure_args": [2, 3],
    }))
}

/// `req` sent to `addr` by the crate's client holding NAME's certificate from
/// `dir`, expecting the server to hold `server_role`.
fn call_as(
    dir: &Path,
    name: &str,
    server_role: Role,
    addr: &str,
    req: &Request,
) -> Result<Response, String> {
    let tls = ArpcpTls::load(dir, name).unwrap();
    let client = ArpcpClient::new(Duration::from_secs(3), Duration::from_secs(5))
        .with_tls(Some(tls.calling(server_role)));
    rt().block_on(client.call(addr, req))
        .map_err(|e| e.to_string())
}

#[test]
fn a_tls_cluster_runs_a_task_to_done() {
    let pki_dir = cluster_pki();
    let pki = pki_of(&pki_dir);
    let c = tls_cluster(&pki);
    let id = c.gw.submit_ok("add", json!([2, 3]));
    let t = c.gw.wait_final(&id, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(5)));
}

/// The agent's TLS settings from its `--config` file, as the README's table says
/// (the file refused `tls_dir` and `tls_name` as unknown keys).
#[test]
fn an_agent_takes_its_tls_settings_from_its_config_file() {
    let pki_dir = cluster_pki();
    let pki = pki_of(&pki_dir);
    let p = Path::new(&pki);
    let tls = client_tls(
        &p.join("ca.pem"),
        Some((&p.join("ops.pem"), &p.join("ops-key.pem"))),
    );
    let toml = format!(
        "tls_dir = {}\ntls_name = \"agent-1\"\n",
        serde_json::Value::String(pki.clone())
    );
    let agent = common::gateway::agent_with_config(&toml, &[]);
    let c = Cluster::start_tls(vec![agent], &["--tls-dir", &pki], tls);
    let id = c.gw.submit_ok("add", json!([2, 3]));
    assert_task_status(&c.gw.wait_final(&id, WAIT), pb::TaskStatus::Done);
    assert_eq!(c.gw.agent(c.id(0)).certificate_name, "agent-1");
}

#[test]
fn a_plain_connection_to_a_tls_agent_gets_nothing() {
    let pki_dir = cluster_pki();
    let agent = tls_agent(&pki_of(&pki_dir));
    let mut conn = Conn::connect(&agent.arpcp());
    conn.send(&json!({"protocol": "arpcp", "version": "1.0", "method": "ID"}));
    // All that comes back is TLS's own alert record (content type 21), then the
    // close: no ARPCP answer, and nothing about the agent.
    let mut got = Vec::new();
    conn.stream().set_read_timeout(Some(WAIT)).unwrap();
    let read = std::io::Read::read_to_end(&mut conn.stream(), &mut got);
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the agent did not close the connection: {read:?}"
    );
    assert!(got.is_empty() || got[0] == 21, "got {got:?}");
    assert!(
        !got.contains(&b'{'),
        "an ARPCP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    wait_for_log(&agent, &["refused a connection from 127.0.0.1:"]);
}

#[test]
fn an_impostor_with_its_own_ca_is_refused_by_the_gateway_and_the_agent() {
    let pki_dir = cluster_pki();
    let pki = pki_of(&pki_dir);
    let c = tls_cluster(&pki);
    // Same name, same role, but a CA of its own making. It trusts the cluster's
    // CA (ca.pem is no secret), so it is the daemons that must turn it away.
    let fake = tempdir();
    let fake_pki = fake.path().join("pki");
    let fake_pki_s = fake_pki.to_str().unwrap();
    arpcp_ok(fake.path(), &["ca", "init", "--dir", fake_pki_s]);
    arpcp_ok(
        fake.path(),
        &["ca", "issue", "agent", "agent-1", "--dir", fake_pki_s],
    );
    arpcp_ok(
        fake.path(),
        &["ca", "issue", "gateway", "--dir", fake_pki_s],
    );
    std::fs::copy(Path::new(&pki).join("ca.pem"), fake_pki.join("ca.pem")).unwrap();

    // Announcing itself to the gateway's listener.
    let announce = request(json!({
        "protocol": "arpcp", "version": "1.0", "method": "ID", "port": 1,
    }));
    let gw_arpcp = c.gateway.arpcp();
    let r = call_as(&fake_pki, "agent-1", Role::Gateway, &gw_arpcp, &announce);
    assert!(r.is_err(), "the gateway answered an impostor: {r:?}");
    wait_for_log(
        &c.gateway,
        &[
            "refused a connection from 127.0.0.1:",
            "invalid peer certificate",
        ],
    );

    // Posing as the gateway to the agent.
    let agent_addr = c.agents[0].arpcp();
    let r = call_as(
        &fake_pki,
        "gateway",
        Role::Agent,
        &agent_addr,
        &atask_request(),
    );
    assert!(r.is_err(), "the agent answered an impostor: {r:?}");
    wait_for_log(
        &c.agents[0],
        &[
            "refused a connection from 127.0.0.1:",
            "invalid peer certificate",
        ],
    );
    // The cluster itself still works, and has one agent only.
    let id = c.gw.submit_ok("add", json!([2, 3]));
    assert_task_status(&c.gw.wait_final(&id, WAIT), pb::TaskStatus::Done);
    assert_eq!(c.gw.agents().len(), 1);
}

#[test]
fn the_agent_serves_only_the_gateway_role_and_the_gateway_only_agents() {
    let pki_dir = cluster_pki();
    let pki = pki_of(&pki_dir);
    let pki_path = Path::new(&pki);
    let c = tls_cluster(&pki);
    let agent_addr = c.agents[0].arpcp();
    for (name, role) in [("alice", "reader"), ("agent-1", "agent")] {
        for req in [atask_request(), id_request()] {
            let r = call_as(pki_path, name, Role::Agent, &agent_addr, &req)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.code, Code::UnknownMethod, "{name}: {r:?}");
            for needle in ["role gateway", &format!("has role {role}"), name] {
                assert!(r.description.contains(needle), "{name}: {r:?}");
            }
        }
    }
    // The gateway's listener takes SIGNAL and ID from agents only.
    let gw_arpcp = c.gateway.arpcp();
    let r = call_as(pki_path, "alice", Role::Gateway, &gw_arpcp, &id_request()).unwrap();
    assert_eq!(r.code, Code::UnknownMethod, "{r:?}");
    assert!(r.description.contains("role agent"), "{r:?}");
    let r = call_as(pki_path, "agent-1", Role::Gateway, &gw_arpcp, &id_request()).unwrap();
    assert_eq!(r.code, Code::Ok, "{r:?}");
    // And the gateway's own certificate is served by the agent.
    let r = call_as(pki_path, "gateway", Role::Agent, &agent_addr, &id_request()).unwrap();
    assert_eq!(r.code, Code::Ok, "{r:?}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let pki_dir = cluster_pki();
    let pki = pki_of(&pki_dir);
    let pki_path = Path::new(&pki);
    // `ca issue` makes no expired certificate (--days is at least 1): the library
    // signs one that ended yesterday, with the cluster's CA.
    let now = time::OffsetDateTime::now_utc();
    ca::issue(
        pki_path,
        &IssueRequest {
            role: Role::Gateway,
            name: "old-gateway".into(),
            sans: vec![],
            validity: Validity {
                not_before: now - time::Duration::days(3),
                not_after: now - time::Duration::days(1),
            },
        },
    )
    .unwrap();
    let agent = tls_agent(&pki);
    let r = call_as(
        pki_path,
        "old-gateway",
        Role::Agent,
        &agent.arpcp(),
        &id_request(),
    );
    assert!(
        r.is_err(),
        "the agent answered an expired certificate: {r:?}"
    );
    wait_for_log(&agent, &["refused a connection from 127.0.0.1:", "expired"]);
    // The same request with the valid gateway certificate is answered.
    let r = call_as(
        pki_path,
        "gateway",
        Role::Agent,
        &agent.arpcp(),
        &id_request(),
    )
    .unwrap();
    assert_eq!(r.code, Code::Ok, "{r:?}");
}
