//! The gRPC API of a gateway started with `--tls-dir`, between real processes:
//! TLS on the gRPC port, callers authenticated by a client certificate or a bearer
//! token, and each method's role enforced. Certificates and tokens are made with the
//! real `arpcp ca …` and `arpcp token …` commands; callers are the crate's tonic
//! client, the `arpcp` CLI and grpcurl (found as `tests/gateway_grpcurl.rs` finds it).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use arpcp::pb;
use common::gateway::*;
use common::*;
use serde_json::json;
use tempfile::TempDir;
use tonic::transport::ClientTlsConfig;
use tonic::Code;

/// A TLS cluster (one agent) and the certificate directory it was made from: the CA,
/// the gateway (with 127.0.0.1 and localhost as SANs, as a client checking the host
/// needs), agent-1, and the clients rita (reader), sam (submitter), olga (operator).
struct Tls {
    dir: Arc<TempDir>,
    pki: PathBuf,
    c: Cluster,
}

impl Tls {
    fn start() -> Tls {
        let dir = tempdir();
        let d = dir.path();
        let pki = d.join("pki");
        let p = pki.to_str().unwrap();
        arpcp_ok(d, &["ca", "init", "--dir", p]);
        arpcp_ok(
            d,
            &[
                "ca",
                "issue",
                "gateway",
                "--san",
                "localhost",
                "--san",
                "127.0.0.1",
                "--dir",
                p,
            ],
        );
        arpcp_ok(d, &["ca", "issue", "agent", "agent-1", "--dir", p]);
        for (name, role) in [
            ("rita", "reader"),
            ("sam", "submitter"),
            ("olga", "operator"),
        ] {
            arpcp_ok(
                d,
                &["ca", "issue", "client", name, "--role", role, "--dir", p],
            );
        }
        let agent = Daemon::agent(&["--tls-dir", p, "--tls-name", "agent-1"]);
        let c = Cluster::start_tls(
            vec![agent],
            &["--tls-dir", p],
            client_tls(
                &pki.join("ca.pem"),
                Some((&pki.join("olga.pem"), &pki.join("olga-key.pem"))),
            ),
        );
        Tls { dir, pki, c }
    }

    fn ca(&self) -> PathBuf {
        self.pki.join("ca.pem")
    }

    /// The gateway's data directory, where its token file is.
    fn data_dir(&self) -> String {
        self.c
            .gateway
            .dir()
            .join("gateway-data")
            .to_string_lossy()
            .into_owned()
    }

    /// A client presenting NAME's certificate.
    fn as_cert(&self, name: &str) -> Gw {
        let (cert, key) = (
            self.pki.join(format!("{name}.pem")),
            self.pki.join(format!("{name}-key.pem")),
        );
        Gw::connect_tls(
            &self.c.gateway.grpcs_url(),
            client_tls(&self.ca(), Some((&cert, &key))),
        )
    }

    /// A client over TLS with no certificate (it authenticates by token, if at all).
    fn anonymous(&self) -> Gw {
        Gw::connect_tls(&self.c.gateway.grpcs_url(), client_tls(&self.ca(), None))
    }

    /// `arpcp token create --role ROLE NAME` on the gateway's data directory.
    fn token(&self, name: &str, role: &str) -> String {
        let out = arpcp_ok(
            self.dir.path(),
            &[
                "token",
                "create",
                "--role",
                role,
                name,
                "--data-dir",
                &self.data_dir(),
            ],
        );
        out.trim().to_string()
    }
}

/// A new connection of its own to the gateway (`tls` for the TLS port, else
/// plaintext), not the pooled one of `Gw`: what a handshake decides shows here.
async fn fresh_channel(
    t: &Tls,
    tls: Option<ClientTlsConfig>,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = match tls {
        Some(tls) => tonic::transport::Endpoint::from_shared(t.c.gateway.grpcs_url())
            .unwrap()
            .tls_config(tls)
            .unwrap(),
        None => tonic::transport::Endpoint::from_shared(t.c.gateway.grpc_url()).unwrap(),
    };
    endpoint
        .connect_timeout(IO_TIMEOUT)
        .timeout(IO_TIMEOUT)
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// `msg` with `authorization: Bearer TOKEN`.
fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn list_agents(gw: &Gw, token: Option<&str>) -> Result<pb::ListAgentsResponse, tonic::Status> {
    let token = token.map(str::to_string);
    gw.call("ListAgents", |mut c| async move {
        match token {
            Some(t) => c.list_agents(bearer(pb::ListAgentsRequest {}, &t)).await,
            None => c.list_agents(pb::ListAgentsRequest {}).await,
        }
    })
}

fn submit_as(gw: &Gw, token: &str, req: pb::SubmitRequest) -> Result<pb::Task, tonic::Status> {
    let token = token.to_string();
    gw.call("Submit", |mut c| async move {
        c.submit(bearer(req, &token)).await
    })
    .map(|r| r.task.expect("a task in the answer"))
}

fn cancel_as(gw: &Gw, token: &str, task_id: &str) -> Result<pb::Task, tonic::Status> {
    let (token, task_id) = (token.to_string(), task_id.to_string());
    gw.call("CancelTask", |mut c| async move {
        c.cancel_task(bearer(pb::CancelTaskRequest { task_id }, &token))
            .await
    })
}

fn blacklist_as(gw: &Gw, token: Option<&str>, agent_id: &str) -> Result<pb::Agent, tonic::Status> {
    let (token, agent_id) = (token.map(str::to_string), agent_id.to_string());
    gw.call("BlacklistAgent", |mut c| async move {
        let req = pb::BlacklistAgentRequest { agent_id };
        match token {
            Some(t) => c.blacklist_agent(bearer(req, &t)).await,
            None => c.blacklist_agent(req).await,
        }
    })
}

#[test]
fn a_caller_without_a_credential_is_unauthenticated_and_plaintext_gets_nothing() {
    let t = Tls::start();
    let anon = t.anonymous();
    assert_status(
        list_agents(&anon, None),
        Code::Unauthenticated,
        &["requires a client certificate or a bearer token"],
    );
    assert_status(
        list_agents(&anon, Some("arpcp_0123")),
        Code::Unauthenticated,
        &["not valid", "revoked"],
    );
    // Health stays open, over TLS, for load balancers and probes.
    let health = anon.rt().block_on(async {
        let channel = fresh_channel(&t, Some(client_tls(&t.ca(), None)))
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
    });
    assert_eq!(
        health.unwrap().into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A plaintext gRPC client on the TLS port: no answer at all, and the gateway
    // logs who knocked and why it was turned away.
    let plain = anon.rt().block_on(async {
        let channel = fresh_channel(&t, None).await?;
        pb::gateway_client::GatewayClient::new(channel)
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(|e| e.to_string())
    });
    assert!(plain.is_err(), "a plaintext client was answered: {plain:?}");
    wait_for_log(
        &t.c.gateway,
        &[
            "refused a connection from 127.0.0.1:",
            "TLS handshake failed",
        ],
    );
}

#[test]
fn a_reader_certificate_lists_but_may_not_submit() {
    let t = Tls::start();
    let rita = t.as_cert("rita");
    assert_eq!(list_agents(&rita, None).unwrap().agents.len(), 1);
    let tasks = rita.call("ListTasks", |mut c| async move {
        c.list_tasks(pb::ListTasksRequest::default()).await
    });
    assert!(tasks.is_ok(), "{tasks:?}");
    assert_status(
        rita.submit(submit_req("add", json!([2, 3]))),
        Code::PermissionDenied,
        &["Submit", "role submitter", "reader \"rita\""],
    );
    // Nothing was stored for it.
    assert!(t.c.gw.list_all(pb::ListTasksRequest::default()).is_empty());
}

#[test]
fn submitters_cancel_only_their_own_tasks_and_only_operators_blacklist() {
    let t = Tls::start();
    let ci = t.token("ci", "submitter");
    let other = t.token("other", "submitter");
    let ops = t.token("ops", "operator");
    let anon = t.anonymous();

    let done = submit_as(&anon, &ci, submit_req("add", json!([2, 3]))).unwrap();
    let done = t.c.gw.wait_final(&done.task_id, WAIT);
    assert_task_status(&done, pb::TaskStatus::Done);
    assert_eq!(result_of(&done), Some(json!(5)));
    assert_eq!(done.owner, "token:ci");

    let long = submit_as(&anon, &ci, submit_req("sleep", json!([30]))).unwrap();
    assert_status(
        cancel_as(&anon, &other, &long.task_id),
        Code::PermissionDenied,
        &["token:ci", "role operator", "submitter \"other\" (token)"],
    );
    assert!(!is_final(t.c.gw.task(&long.task_id).status));
    let cancelled = cancel_as(&anon, &ci, &long.task_id).unwrap();
    assert_task_status(&cancelled, pb::TaskStatus::Cancelled);

    // A submitter certificate owns its tasks as cert:NAME, and an operator cancels
    // anyone's.
    let sam = t.as_cert("sam");
    let sams = sam.submit_ok("sleep", json!([30]));
    assert_eq!(t.c.gw.task(&sams).owner, "cert:sam");
    assert_task_status(&t.c.gw.cancel(&sams).unwrap(), pb::TaskStatus::Cancelled);

    let agent_id = t.c.id(0).to_string();
    assert_status(
        blacklist_as(&anon, Some(&ci), &agent_id),
        Code::PermissionDenied,
        &["BlacklistAgent", "role operator", "submitter \"ci\""],
    );
    assert_status(
        blacklist_as(&sam, None, &agent_id),
        Code::PermissionDenied,
        &["BlacklistAgent", "role operator", "submitter \"sam\""],
    );
    assert!(!t.c.gw.agents()[0].blacklisted);
    assert!(
        blacklist_as(&anon, Some(&ops), &agent_id)
            .unwrap()
            .blacklisted
    );
    assert!(!t.c.gw.unblacklist(&agent_id).unwrap().blacklisted);
}

#[test]
fn a_token_works_once_created_and_is_refused_once_revoked_without_a_restart() {
    let t = Tls::start();
    let anon = t.anonymous();
    // Created while the gateway runs.
    let token = t.token("ci", "reader");
    wait_until(WAIT, "the new token to be accepted", || {
        list_agents(&anon, Some(&token)).is_ok()
    });
    let listed = arpcp_ok(
        t.dir.path(),
        &["token", "list", "--json", "--data-dir", &t.data_dir()],
    );
    assert!(listed.contains("\"name\":\"ci\"") && listed.contains("\"role\":\"reader\""));
    assert!(!listed.contains(&token), "token list shows the token");
    let pid = t.c.gateway.pid();

    // The CLI's JSON of a task says who submitted it, as gRPC does.
    let submitter = t.token("ci-submit", "submitter");
    let (url, ca) = (
        t.c.gateway.grpcs_url(),
        t.ca().to_string_lossy().into_owned(),
    );
    let args = [
        "--gateway",
        &url,
        "--ca",
        &ca,
        "--token",
        &submitter,
        "--json",
        "submit",
        "add",
        "1",
        "2",
        "--wait",
    ];
    let out = wait_for(WAIT, "the submitter's token to be accepted", || {
        let (status, out, _) = common::run_to_exit(t.dir.path(), &args, WAIT);
        status.success().then_some(out)
    });
    let shown: serde_json::Value = serde_json::from_str(out.trim()).expect("the task as JSON");
    assert_eq!(shown["owner"], "token:ci-submit", "{out}");

    arpcp_ok(
        t.dir.path(),
        &["token", "revoke", "ci", "--data-dir", &t.data_dir()],
    );
    wait_until(WAIT, "the revoked token to be refused", || {
        list_agents(&anon, Some(&token)).is_err_and(|s| s.code() == Code::Unauthenticated)
    });
    assert_status(
        list_agents(&anon, Some(&token)),
        Code::Unauthenticated,
        &["revoked"],
    );
    assert_eq!(t.c.gateway.pid(), pid, "the gateway was restarted");
}

#[test]
fn a_revoked_client_certificate_is_refused_on_its_open_connection_and_in_new_handshakes() {
    let t = Tls::start();
    let rita = t.as_cert("rita");
    assert_eq!(list_agents(&rita, None).unwrap().agents.len(), 1);
    let pki = t.pki.to_str().unwrap();
    arpcp_ok(t.dir.path(), &["ca", "revoke", "rita", "--dir", pki]);
    // The connection opened before the revocation stays up, but its calls are refused
    // once the gateway has seen the new list (it looks at most once a second).
    let refused = wait_for(
        WAIT,
        "rita's open connection is refused",
        || match list_agents(&rita, None) {
            Err(e) if e.code() == Code::Unauthenticated => Some(e),
            _ => None,
        },
    );
    for needle in ["\"rita\"", "no longer valid", "revoked"] {
        assert!(refused.message().contains(needle), "{needle}: {refused:?}");
    }
    // A new connection with the certificate fails its handshake.
    let again = t.c.gw.rt().block_on(async {
        let (cert, key) = (t.pki.join("rita.pem"), t.pki.join("rita-key.pem"));
        let tls = client_tls(&t.ca(), Some((&cert, &key)));
        let channel = fresh_channel(&t, Some(tls)).await?;
        pb::gateway_client::GatewayClient::new(channel)
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(|e| e.to_string())
    });
    assert!(
        again.is_err(),
        "a revoked certificate was served: {again:?}"
    );
    wait_for_log(
        &t.c.gateway,
        &["gRPC TLS handshake failed", "certificate revoked"],
    );
    // Other certificates are still served.
    assert_eq!(
        list_agents(&t.as_cert("sam"), None).unwrap().agents.len(),
        1
    );
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_in_the_handshake() {
    let t = Tls::start();
    let fake = tempdir();
    let fake_pki = fake.path().join("pki");
    let p = fake_pki.to_str().unwrap();
    arpcp_ok(fake.path(), &["ca", "init", "--dir", p]);
    arpcp_ok(
        fake.path(),
        &[
            "ca", "issue", "client", "olga", "--role", "operator", "--dir", p,
        ],
    );
    // It trusts the cluster's CA (ca.pem is no secret) and names an operator.
    let tls: ClientTlsConfig = client_tls(
        &t.ca(),
        Some((&fake_pki.join("olga.pem"), &fake_pki.join("olga-key.pem"))),
    );
    let got = t.c.gw.rt().block_on(async {
        let channel = fresh_channel(&t, Some(tls)).await?;
        pb::gateway_client::GatewayClient::new(channel)
            .blacklist_agent(pb::BlacklistAgentRequest {
                agent_id: t.c.id(0).to_string(),
            })
            .await
            .map_err(|e| e.to_string())
    });
    assert!(got.is_err(), "a foreign certificate was served: {got:?}");
    wait_for_log(
        &t.c.gateway,
        &[
            "refused a connection from 127.0.0.1:",
            "gRPC TLS handshake failed: invalid peer certificate",
        ],
    );
    assert!(!t.c.gw.agents()[0].blacklisted);
}

#[test]
fn the_cli_submits_with_a_token_and_with_a_certificate_and_says_what_is_missing() {
    let t = Tls::start();
    let d = t.dir.path();
    let addr = t.c.gateway.addr("grpc");
    let ca = t.ca();
    let ca = ca.to_str().unwrap();
    let token = t.token("ci", "submitter");
    let submit = ["submit", "add", "2", "3", "--wait", "--gateway", &addr];

    let with_token = [&submit[..], &["--ca", ca, "--token", &token]].concat();
    assert_eq!(arpcp_ok(d, &with_token).trim(), "5");
    let sam = t.pki.join("sam.pem");
    let with_cert = [&submit[..], &["--ca", ca, "--cert", sam.to_str().unwrap()]].concat();
    assert_eq!(arpcp_ok(d, &with_cert).trim(), "5");

    // Neither: the gateway says what it wants, the CLI how to give it.
    let bare = [&submit[..], &["--ca", ca]].concat();
    let (status, _, err) = run_to_exit(d, &bare, WAIT);
    assert!(!status.success());
    for needle in ["Unauthenticated", "--token", "--cert"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // A reader's certificate: the role it lacks.
    let rita = t.pki.join("rita.pem");
    let as_reader = [&submit[..], &["--ca", ca, "--cert", rita.to_str().unwrap()]].concat();
    let (status, _, err) = run_to_exit(d, &as_reader, WAIT);
    assert!(!status.success());
    for needle in ["PermissionDenied", "role submitter", "rita"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Another CA's ca.pem: the gateway's certificate is not trusted.
    let other = tempdir();
    let other_pki = other.path().join("pki");
    arpcp_ok(
        other.path(),
        &["ca", "init", "--dir", other_pki.to_str().unwrap()],
    );
    let other_ca = other_pki.join("ca.pem");
    let wrong_ca = [
        &submit[..],
        &["--ca", other_ca.to_str().unwrap(), "--token", &token],
    ]
    .concat();
    let (status, _, err) = run_to_exit(d, &wrong_ca, WAIT);
    assert!(!status.success());
    assert!(err.contains("not signed by the CA given in --ca"), "{err}");
    // A plain-text CLI is told the gateway may want TLS.
    let (status, _, err) = run_to_exit(d, &submit, WAIT);
    assert!(!status.success());
    assert!(err.contains("pass --ca FILE"), "{err}");
    // A token is never sent in plain text.
    let plain_token = [&submit[..], &["--token", &token]].concat();
    let (status, _, err) = run_to_exit(d, &plain_token, WAIT);
    assert!(!status.success());
    assert!(err.contains("--token (or ARPCP_TOKEN) needs --ca"), "{err}");
}

/// The grpcurl binary, or `None` when the test should be skipped (as in
/// `tests/gateway_grpcurl.rs`: env `GRPCURL`, required under CI).
fn grpcurl() -> Option<PathBuf> {
    match std::env::var_os("GRPCURL").filter(|v| !v.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("CI").is_some() => {
            panic!("GRPCURL is not set: under CI the grpcurl tests must run (use scripts/test.sh)")
        }
        None => {
            println!("skipped: set GRPCURL (scripts/test.sh does)");
            None
        }
    }
}

#[test]
fn grpcurl_lists_agents_with_a_certificate_and_with_a_token() {
    let Some(grpcurl) = grpcurl() else { return };
    let t = Tls::start();
    let addr = t.c.gateway.addr("grpc");
    let ca = t.ca();
    let run = |auth: &[&str]| {
        let out = Command::new(&grpcurl)
            .args(["-max-time", "20", "-cacert", ca.to_str().unwrap()])
            .args(auth)
            .args([addr.as_str(), "arpcp.v1.Gateway/ListAgents"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (cert, key) = (t.pki.join("rita.pem"), t.pki.join("rita-key.pem"));
    let (ok, out, err) = run(&[
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "grpcurl with a certificate: {out}\n{err}");
    assert!(out.contains(t.c.id(0)), "{out}");

    let token = t.token("ci", "reader");
    let header = format!("authorization: Bearer {token}");
    let (ok, out, err) = run(&["-H", &header]);
    assert!(ok, "grpcurl with a token: {out}\n{err}");
    assert!(out.contains(t.c.id(0)), "{out}");

    let (ok, _, err) = run(&[]);
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");
}

/// Silent connections to the gRPC port, held open, in a fault test.
const SILENT_PEERS: usize = 8;

#[test]
fn peers_that_never_finish_their_handshake_do_not_hold_up_other_callers() {
    let t = Tls::start();
    let addr = t.c.gateway.addr("grpc");
    let silent: Vec<std::net::TcpStream> = (0..SILENT_PEERS)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // A new client handshakes and is served while all of them hang; a listener that
    // handshook one connection at a time would wait out each one's timeout first.
    let rita = t.as_cert("rita");
    assert_eq!(list_agents(&rita, None).unwrap().agents.len(), 1);
    let timed_out = || {
        t.c.gateway
            .stderr()
            .lines()
            .filter(|l| l.contains("gRPC TLS handshake not finished within"))
            .count()
    };
    assert!(
        timed_out() < SILENT_PEERS,
        "the client was served only after the silent connections timed out"
    );
    // And each silent one is dropped at the handshake timeout, with a log line.
    wait_until(
        arpcp::arpcp::tls::HANDSHAKE_TIMEOUT + WAIT,
        "the silent connections to be refused",
        || timed_out() >= SILENT_PEERS,
    );
    drop(silent);
}

/// A name issued again after its files were removed: `ca revoke NAME` shuts out the
/// certificates handed out under it before too (it revoked only the one in
/// NAME.pem, and the old operator certificate kept working).
#[test]
fn revoking_a_name_issued_again_revokes_its_earlier_certificates() {
    let t = Tls::start();
    let pki = t.pki.to_str().unwrap();
    let issue = |role: &str| {
        arpcp_ok(
            t.dir.path(),
            &[
                "ca", "issue", "client", "quinn", "--role", role, "--dir", pki,
            ],
        )
    };
    issue("operator");
    // The operator's pair, handed out; then the name is issued again as a reader.
    let old = t.dir.path().join("handed-out");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["quinn.pem", "quinn-key.pem"] {
        std::fs::rename(t.pki.join(f), old.join(f)).unwrap();
    }
    issue("reader");
    let (cert, key) = (old.join("quinn.pem"), old.join("quinn-key.pem"));
    let handed_out = Gw::connect_tls(
        &t.c.gateway.grpcs_url(),
        client_tls(&t.ca(), Some((&cert, &key))),
    );
    assert_eq!(list_agents(&handed_out, None).unwrap().agents.len(), 1);

    let out = arpcp_ok(t.dir.path(), &["ca", "revoke", "quinn", "--dir", pki]);
    assert!(out.contains("revoked quinn"), "{out}");
    wait_for(
        WAIT,
        "the earlier certificate refused",
        || match list_agents(&handed_out, None) {
            Err(e) if e.code() == Code::Unauthenticated => Some(e),
            _ => None,
        },
    );
    wait_for(WAIT, "the current certificate refused", || {
        list_agents(&t.as_cert("quinn"), None).err()
    });
    // The CLI says its certificate was refused (it said "transport error" and to
    // pass --ca, which it had).
    let url = t.c.gateway.grpcs_url();
    let ca = t.ca().to_string_lossy().into_owned();
    let cert = cert.to_string_lossy().into_owned();
    let args = ["--gateway", &url, "--ca", &ca, "--cert", &cert, "agents"];
    let (status, _, err) = common::run_to_exit(t.dir.path(), &args, WAIT);
    assert!(!status.success());
    assert!(err.contains("refuses the certificate of --cert"), "{err}");
    assert!(!err.contains("pass --ca"), "{err}");
}
