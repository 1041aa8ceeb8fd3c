//! Secure unless told otherwise: the real `arpcp agent`, `gateway` and `up` refuse
//! to listen beyond loopback without `--tls-dir`, say how to go on in one line,
//! start with `--insecure` (logging what is exposed, at every start) and still talk
//! plain ARPCP 1.0 then, and start on loopback with neither.

mod common;

use std::path::Path;

use arpcp::pb;
use common::gateway::*;
use common::*;
use serde_json::json;

/// Starts `arpcp ARGS` in a new directory, expecting it to refuse: its stderr.
fn refused(args: &[&str]) -> String {
    match Daemon::run_until_ready_or_exit(tempdir(), args) {
        Ok(d) => panic!("arpcp {args:?} started: {}\n{}", d.ready(), d.stderr()),
        Err(r) => {
            assert!(!r.status.success(), "{args:?} exited {}", r.status);
            r.stderr
        }
    }
}

/// The refusal is one line naming the flag, the address and both ways out.
fn assert_refusal(stderr: &str, flag: &str, ip: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    let line = lines[0];
    for needle in [
        "error: refusing to listen on ",
        ip,
        &format!("({flag}"),
        "without TLS",
        "--tls-dir DIR",
        "--insecure",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
}

fn insecure_warnings(d: &Daemon) -> Vec<String> {
    d.stderr()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("--insecure"))
        .map(str::to_string)
        .collect()
}

/// `127.0.0.1:PORT` of a daemon's listener that is bound to all addresses.
fn via_loopback(d: &Daemon, key: &str) -> String {
    format!("127.0.0.1:{}", d.port(key))
}

#[test]
fn a_daemon_on_a_non_loopback_address_without_tls_refuses_to_start() {
    let err = refused(&[
        "agent",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        "{dir}/agent-data",
    ]);
    assert_refusal(&err, "--listen", "0.0.0.0:");
    assert!(err.contains("run this agent's procedures"), "{err}");

    // The address may come from the configuration file: the refusal says so.
    let dir = tempdir();
    std::fs::write(dir.path().join("agent.toml"), "listen = \"0.0.0.0:0\"\n").unwrap();
    let err = match Daemon::run_until_ready_or_exit(
        dir.clone(),
        &[
            "agent",
            "--data-dir",
            "{dir}/d",
            "--config",
            "{dir}/agent.toml",
        ],
    ) {
        Ok(d) => panic!("started: {}", d.ready()),
        Err(r) => r.stderr,
    };
    assert_refusal(&err, "listen in ", "0.0.0.0:");
    assert!(err.contains("agent.toml"), "{err}");

    // Each of the gateway's listeners, and `::` as well as `0.0.0.0`.
    let err = refused(&[
        "gateway",
        "--grpc",
        "0.0.0.0:0",
        "--arpcp",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/g",
    ]);
    assert_refusal(&err, "--grpc", "0.0.0.0:");
    assert!(err.contains("submit"), "{err}");
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let err = refused(&[
            "gateway",
            "--grpc",
            "127.0.0.1:0",
            "--arpcp",
            "[::]:0",
            "--data-dir",
            "{dir}/g",
        ]);
        assert_refusal(&err, "--arpcp", "[::]:");
    }
    let err = refused(&[
        "up",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--agent-listen",
        "0.0.0.0:0",
        "--data-dir",
        "{dir}/u",
        "--no-demo",
    ]);
    assert_refusal(&err, "--agent-listen", "0.0.0.0:");

    // Nothing was made: the refusal comes before the store.
    assert!(!dir.path().join("d").exists(), "the agent made its store");

    // --insecure and --tls-dir contradict each other.
    let (status, _out, err) = run_to_exit(
        dir.path(),
        &[
            "agent",
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--tls-dir",
            "{dir}",
        ],
        WAIT,
    );
    assert!(!status.success());
    assert!(err.contains("'--insecure' cannot be used with"), "{err}");
}

#[test]
fn insecure_daemons_start_warn_and_speak_plain_arpcp() {
    let mut agent = Daemon::spawn(&[
        "agent",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        "{dir}/agent-data",
        "--insecure",
    ]);
    let warnings = insecure_warnings(&agent);
    assert_eq!(warnings.len(), 1, "{}", agent.stderr());
    for needle in ["0.0.0.0:", "--listen", "plaintext, unauthenticated"] {
        assert!(warnings[0].contains(needle), "{needle:?}: {}", warnings[0]);
    }
    // Plain ARPCP 1.0 from any peer, as the prototype spoke it.
    let agent_addr = via_loopback(&agent, "arpcp");
    assert_response(&call(&agent_addr, &req::id()), 100, &[]);

    let gateway = Daemon::spawn(&[
        "gateway",
        "--grpc",
        "0.0.0.0:0",
        "--arpcp",
        "0.0.0.0:0",
        "--data-dir",
        "{dir}/gateway-data",
        "--echo-interval-ms",
        ECHO_MS,
        "--agent",
        &agent_addr,
        "--insecure",
    ]);
    let warnings = insecure_warnings(&gateway);
    assert_eq!(warnings.len(), 2, "{}", gateway.stderr());
    assert!(
        warnings.iter().any(|w| w.contains("(--grpc)")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("(--arpcp)")),
        "{warnings:?}"
    );
    let gw = Gw::connect_url(&format!("http://{}", via_loopback(&gateway, "grpc")));
    gw.wait_alive(1, WAIT);
    let t = gw.submit_ok("add", json!([2, 3]));
    let t = gw.wait_final(&t, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(5)));

    // Every start says it again (the warning comes before the ready line).
    agent.kill9();
    agent.restart_on_same_ports();
    assert_eq!(insecure_warnings(&agent).len(), 1, "{}", agent.stderr());
}

#[test]
fn loopback_needs_neither_and_tls_needs_no_insecure() {
    let agent = Daemon::agent(&[]);
    assert_response(&call(&agent.arpcp(), &req::id()), 100, &[]);
    let c = Cluster::start(vec![agent], &[]);
    assert!(insecure_warnings(&c.agents[0]).is_empty());
    assert!(insecure_warnings(&c.gateway).is_empty());

    // With certificates, any address is fine and nothing is logged about it.
    let dir = tempdir();
    let d = dir.path();
    let pki = d.join("pki");
    let pki = pki.to_str().unwrap();
    for args in [
        &["ca", "init", "--dir", pki][..],
        &["ca", "issue", "agent", "host-1", "--dir", pki],
    ] {
        let (status, out, err) = run_to_exit(Path::new(d), args, WAIT);
        assert!(status.success(), "{args:?}: {out}{err}");
    }
    let tls_agent = Daemon::spawn(&[
        "agent",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        "{dir}/agent-data",
        "--tls-dir",
        pki,
        "--tls-name",
        "host-1",
    ]);
    assert!(tls_agent.ready()["arpcp"]
        .as_str()
        .is_some_and(|a| a.starts_with("0.0.0.0:")));
    assert!(insecure_warnings(&tls_agent).is_empty());
}
