//! Cluster membership across real hosts: three agents, each in its own network
//! namespace with its own IP and MAC behind a bridge, found by the gateway's scan of
//! the bridge's range. One host's link goes down (suspect, then gone, its running
//! task interrupted, new work placed elsewhere) and comes back (alive again, same id).
//!
//! The same three hosts with mutual TLS: certificates made with the real `arpcp ca`
//! commands, each host holding only `ca.pem` and its own pair, a task done on each;
//! an impostor on a fourth host, with a CA of its own making, is never listed.
//!
//! Needs root and iproute2. When the namespaces cannot be made, the test prints
//! `SKIPPED: network namespaces unavailable: <reason>` on stderr and returns; with
//! `CI` set and root, that fails the test instead, unless the kernel forbids
//! namespaces.
//!
//! Traffic goes only to addresses of the namespaces made here: the bridge has no
//! uplink, and until teardown an `unreachable` route covers the test's /24, so no
//! packet for that range takes the default route even when the bridge is gone.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use arpcp::pb::gateway_client::GatewayClient;
use arpcp::pb::{self, AgentState, TaskStatus};
use common::netns::{Host, Net, SetupError};
use common::{arpcp_ok, call, code, req, tempdir, wait_for, wait_until, Daemon, ARPCP, WAIT};

/// The agents' port, the one the gateway scans.
const AGENT_PORT: u16 = 7018;
/// Namespaced hosts, one agent each.
const HOSTS: usize = 3;
/// Bound of one gRPC call.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The test network

/// Where host `h`'s agent listens.
fn agent_addr(h: &Host) -> String {
    format!("{}:{AGENT_PORT}", h.ip)
}

/// The test's network: `hosts` namespaces behind a bridge in `10.213.N.0/24`;
/// `tag` is one character distinct for each test (several test processes, and
/// the tests of one, may run at once).
fn test_net(tag: char, hosts: usize) -> Result<Net, SetupError> {
    Net::setup(&format!("arpcp{}{tag}", std::process::id()), 213, hosts)
}

/// Visible even when the test harness captures output.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A TCP connection to `addr` opens within `timeout` (retried until then).
fn reachable(addr: &str, timeout: Duration) -> Result<(), String> {
    let sock: SocketAddr = addr.parse().expect("a socket address");
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&sock, left.max(Duration::from_millis(10))) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "no TCP connection to {addr} within {timeout:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------
// gRPC

/// A blocking gRPC client of the gateway.
struct Gateway {
    rt: tokio::runtime::Runtime,
    client: GatewayClient<tonic::transport::Channel>,
}

impl Gateway {
    fn connect(addr: &str) -> Gateway {
        Gateway::connect_with(addr, None)
    }

    /// Over TLS with `tls` when given (a gateway started with `--tls-dir`).
    fn connect_with(addr: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Gateway {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
            .expect("a gRPC address");
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).expect("a TLS configuration");
        }
        let client = rt
            .block_on(async {
                tokio::time::timeout(RPC_TIMEOUT, async {
                    endpoint.connect().await.map(GatewayClient::new)
                })
                .await
            })
            .unwrap_or_else(|_| panic!("no gRPC connection to {addr} within {RPC_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("gRPC connection to {addr}: {e}"));
        Gateway { rt, client }
    }

    fn run<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        self.rt
            .block_on(async { tokio::time::timeout(RPC_TIMEOUT, f).await })
            .unwrap_or_else(|_| panic!("{what}: no answer within {RPC_TIMEOUT:?}"))
            .unwrap_or_else(|s| panic!("{what}: {s}"))
            .into_inner()
    }

    fn agents(&self) -> Vec<pb::Agent> {
        let mut c = self.client.clone();
        self.run("ListAgents", c.list_agents(pb::ListAgentsRequest {}))
            .agents
    }

    /// Submits `procedure(args...)`, on `agent_id` if given; the task id.
    fn submit(&self, procedure: &str, args: &[f64], agent_id: Option<&str>) -> String {
        let mut c = self.client.clone();
        let args = args
            .iter()
            .map(|&n| prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n)),
            })
            .collect();
        let request = pb::SubmitRequest {
            procedure: procedure.into(),
            args,
            agent_id: agent_id.unwrap_or_default().into(),
            ..Default::default()
        };
        self.run(&format!("Submit {procedure}"), c.submit(request))
            .task_id
    }

    /// The task now.
    fn task(&self, task_id: &str) -> pb::Task {
        self.task_after(task_id, Duration::ZERO)
    }

    /// The task once it ended, or after `wait`.
    fn task_after(&self, task_id: &str, wait: Duration) -> pb::Task {
        let mut c = self.client.clone();
        let request = pb::GetResultRequest {
            task_id: task_id.into(),
            wait: (!wait.is_zero()).then(|| prost_types::Duration {
                seconds: i64::try_from(wait.as_secs()).expect("a short wait"),
                nanos: 0,
            }),
        };
        self.run("GetResult", c.get_result(request))
    }

    /// Waits for `add` to finish and checks its result and where it ran.
    fn expect_sum(&self, task_id: &str, sum: f64) -> pb::Task {
        let t = self.task_after(task_id, WAIT);
        assert_eq!(t.status(), TaskStatus::Done, "add task {t:?}");
        let result = t.result.as_ref().and_then(|v| v.kind.as_ref());
        assert_eq!(
            result,
            Some(&prost_types::value::Kind::NumberValue(sum)),
            "add task {t:?}"
        );
        t
    }
}

/// The agent registered with this IP.
fn at_ip<'a>(agents: &'a [pb::Agent], ip: &str) -> &'a pb::Agent {
    agents
        .iter()
        .find(|a| a.ip == ip)
        .unwrap_or_else(|| panic!("no agent with IP {ip} in {agents:#?}"))
}

// ---------------------------------------------------------------------------
// The tests

/// The network, or `None` (said on stderr) when namespaces are unavailable here
/// and the test is to be skipped; in CI as root that fails the test instead.
fn net_or_skip(tag: char, hosts: usize) -> Option<Net> {
    match test_net(tag, hosts) {
        Ok(net) => Some(net),
        Err(e) => {
            // SAFETY: geteuid(2) has no preconditions and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            if std::env::var_os("CI").is_some() && root && !e.kernel_forbids {
                panic!(
                    "network namespaces are expected to work in CI as root: {}",
                    e.reason
                );
            }
            say(&format!(
                "SKIPPED: network namespaces unavailable: {}",
                e.reason
            ));
            None
        }
    }
}

/// Whether a namespaced listener can be reached; if not, skips (or fails in CI).
fn reachable_or_skip(addr: &str) -> bool {
    match reachable(addr, WAIT) {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("the namespaced hosts are expected to be reachable in CI: {e}")
        }
        Err(e) => {
            say(&format!("SKIPPED: network namespaces unavailable: {e}"));
            false
        }
    }
}

#[test]
fn membership_follows_hosts_in_network_namespaces() {
    let started = Instant::now();
    // 1. The network. Declared first, so dropped last: every process in it is
    // killed before it goes.
    let Some(net) = net_or_skip('m', HOSTS) else {
        return;
    };

    // 2. One agent in each namespace, then the gateway in the root namespace,
    // scanning the bridge's range.
    let _agents: Vec<Daemon> = net
        .hosts
        .iter()
        .map(|h| {
            let listen = agent_addr(h);
            Daemon::spawn_cmd(
                "ip",
                &[
                    "netns",
                    "exec",
                    &h.ns,
                    ARPCP,
                    "agent",
                    "--listen",
                    &listen,
                    "--data-dir",
                    "{dir}/agent-data",
                    "--capacity",
                    "2",
                    // Plaintext ARPCP on the bridge, as the prototype's peers speak it.
                    "--insecure",
                ],
            )
        })
        .collect();
    for h in &net.hosts {
        if !reachable_or_skip(&agent_addr(h)) {
            return;
        }
        // Each agent reports the MAC of its own namespace's interface.
        let id = call(&agent_addr(h), &req::id());
        assert_eq!(code(&id), 100, "ID of {}: {id}", h.ns);
        assert_eq!(id["data"]["mac"], h.mac.as_str(), "ID of {}: {id}", h.ns);
        assert_eq!(id["data"]["ip"], h.ip.as_str(), "ID of {}: {id}", h.ns);
    }
    let scan = format!(
        "{}.0/24",
        net.bridge_ip.rsplit_once('.').expect("an IPv4").0
    );
    let arpcp_listen = format!("{}:0", net.bridge_ip);
    let gateway = Daemon::spawn(&[
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        &arpcp_listen,
        "--data-dir",
        "{dir}/gateway-data",
        "--scan",
        &scan,
        "--scan-port",
        &AGENT_PORT.to_string(),
        "--echo-interval-ms",
        "200",
        "--max-misses",
        "3",
        "--insecure",
    ]);
    let gw = Gateway::connect(&gateway.addr("grpc"));

    // 3. The scan finds exactly the three hosts, each with its own IP and MAC.
    let agents = wait_for(WAIT, "3 alive agents", || {
        let list = gw.agents();
        (list.len() == HOSTS && list.iter().all(|a| a.state() == AgentState::Alive)).then_some(list)
    });
    for h in &net.hosts {
        let a = at_ip(&agents, &h.ip);
        assert_eq!(a.mac, h.mac, "MAC of the agent in {}: {a:?}", h.ns);
        assert_eq!(a.port, u32::from(AGENT_PORT), "{a:?}");
        assert_eq!(a.address, agent_addr(h), "{a:?}");
        assert_eq!(a.misses, 0, "{a:?}");
    }
    let ids: Vec<String> = net
        .hosts
        .iter()
        .map(|h| at_ip(&agents, &h.ip).agent_id.clone())
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "agent ids must be distinct: {agents:#?}"
    );
    let (id1, id2, id3) = (&ids[0], &ids[1], &ids[2]);
    say(&format!(
        "netns: {} agents alive after {:?}: {ids:?}",
        HOSTS,
        started.elapsed()
    ));

    // 4. A long task on a2, a quick one on each agent.
    let sleeper = gw.submit("sleep", &[30.0], Some(id2));
    for id in &ids {
        let t = gw.submit("add", &[2.0, 3.0], Some(id));
        let t = gw.expect_sum(&t, 5.0);
        assert_eq!(&t.agent_id, id, "a task targeted at {id} ran on {t:?}");
    }
    wait_until(WAIT, "the sleep task to run on a2", || {
        gw.task(&sleeper).status() == TaskStatus::Running
    });
    assert_eq!(&gw.task(&sleeper).agent_id, id2);

    // 5. a2's link goes down: suspect, then gone; the others stay in.
    let down = Instant::now();
    net.set_link(1, false);
    let mut suspect: Option<pb::Agent> = None;
    let gone = wait_for(WAIT, "a2 to leave the cluster", || {
        let list = gw.agents();
        assert_eq!(list.len(), ids.len(), "{list:#?}");
        for id in [id1, id3] {
            let a = list.iter().find(|a| &a.agent_id == id).expect("listed");
            assert!(
                a.state() == AgentState::Alive && a.misses == 0,
                "{id} should stay alive while a2 is away: {a:?}"
            );
        }
        let a2 = list.iter().find(|a| &a.agent_id == id2).expect("a2 listed");
        match a2.state() {
            AgentState::Suspect => {
                suspect.get_or_insert_with(|| a2.clone());
                None
            }
            AgentState::Gone => Some(a2.clone()),
            _ => None,
        }
    });
    let suspect = suspect.expect("a2 is SUSPECT before it is GONE");
    assert!(suspect.misses >= 1, "{suspect:?}");
    assert!(gone.misses >= 3, "{gone:?}");
    say(&format!(
        "netns: a2 suspect, then gone {:?} after its link went down",
        down.elapsed()
    ));

    // Its running task is interrupted, as the failure policy says.
    let t = wait_for(WAIT, "the sleep task to be interrupted", || {
        let t = gw.task(&sleeper);
        (t.status() == TaskStatus::Interrupted).then_some(t)
    });
    assert!(
        t.error.contains(id2.as_str()) && t.error.contains("left the cluster"),
        "the interruption should name {id2} and say it left the cluster: {t:?}"
    );

    // New work goes to the hosts still in the cluster.
    let t = gw.submit("add", &[2.0, 3.0], None);
    let t = gw.expect_sum(&t, 5.0);
    assert!(
        &t.agent_id == id1 || &t.agent_id == id3,
        "an untargeted task ran on {} while a2 was gone",
        t.agent_id
    );

    // 6. The link comes back: a2 is alive again, with the same id.
    let up = Instant::now();
    net.set_link(1, true);
    wait_until(WAIT, "a2 alive again", || {
        let list = gw.agents();
        list.len() == ids.len()
            && list.iter().any(|a| {
                &a.agent_id == id2
                    && a.state() == AgentState::Alive
                    && a.ip == net.hosts[1].ip
                    && a.mac == net.hosts[1].mac
            })
    });
    assert!(gw
        .agents()
        .iter()
        .all(|a| a.state() == AgentState::Alive && ids.contains(&a.agent_id)));
    say(&format!(
        "netns: a2 alive again {:?} after its link came up; test took {:?}",
        up.elapsed(),
        started.elapsed()
    ));
}

/// What one host receives from the operator: `ca.pem` and its own pair, copied
/// from the issuing directory `pki` into `DIR/NAME/`.
fn host_dir(pki: &std::path::Path, dir: &std::path::Path, name: &str) -> String {
    let host = dir.join(name);
    std::fs::create_dir_all(&host).unwrap();
    for file in [
        "ca.pem".to_string(),
        format!("{name}.pem"),
        format!("{name}-key.pem"),
    ] {
        std::fs::copy(pki.join(&file), host.join(&file)).unwrap();
    }
    host.to_string_lossy().into_owned()
}

#[test]
fn three_hosts_with_mutual_tls_and_an_impostor_in_network_namespaces() {
    let started = Instant::now();
    // Three cluster hosts and the impostor's.
    let Some(net) = net_or_skip('t', HOSTS + 1) else {
        return;
    };
    let (hosts, impostor) = net.hosts.split_at(HOSTS);
    let impostor = &impostor[0];

    // The operator's CA, the gateway's certificate (named for the address agents
    // reach it at) and one per host.
    let ops = tempdir();
    let pki = ops.path().join("pki");
    let pki_s = pki.to_str().unwrap();
    arpcp_ok(ops.path(), &["ca", "init", "--dir", pki_s]);
    arpcp_ok(
        ops.path(),
        &[
            "ca",
            "issue",
            "gateway",
            "--san",
            &net.bridge_ip,
            "--san",
            "127.0.0.1",
            "--dir",
            pki_s,
        ],
    );
    arpcp_ok(
        ops.path(),
        &[
            "ca", "issue", "client", "ops", "--role", "operator", "--dir", pki_s,
        ],
    );
    let names: Vec<String> = (1..=HOSTS).map(|i| format!("host-{i}")).collect();
    for (name, h) in names.iter().zip(hosts) {
        arpcp_ok(
            ops.path(),
            &["ca", "issue", "agent", name, "--san", &h.ip, "--dir", pki_s],
        );
    }
    // The impostor makes its own CA and gives itself a cluster host's name; it
    // may trust the real CA (ca.pem is no secret).
    let fake = ops.path().join("fake");
    let fake_s = fake.to_str().unwrap();
    arpcp_ok(ops.path(), &["ca", "init", "--dir", fake_s]);
    arpcp_ok(
        ops.path(),
        &["ca", "issue", "agent", "host-1", "--dir", fake_s],
    );
    std::fs::copy(pki.join("ca.pem"), fake.join("ca.pem")).unwrap();

    // The gateway in the root namespace: ARPCP over TLS on the bridge, scanning
    // it; gRPC on loopback, TLS too (as every listener of a gateway with --tls-dir).
    let gateway_dir = host_dir(&pki, ops.path(), "gateway");
    let scan = format!(
        "{}.0/24",
        net.bridge_ip.rsplit_once('.').expect("an IPv4").0
    );
    let gateway = Daemon::spawn(&[
        "gateway",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        &format!("{}:0", net.bridge_ip),
        "--data-dir",
        "{dir}/gateway-data",
        "--scan",
        &scan,
        "--scan-port",
        &AGENT_PORT.to_string(),
        "--echo-interval-ms",
        "200",
        "--tls-dir",
        &gateway_dir,
    ]);
    let controller = gateway.addr("arpcp");
    let agent = |h: &Host, tls_dir: &str, name: &str| {
        Daemon::spawn_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &h.ns,
                ARPCP,
                "agent",
                "--listen",
                &agent_addr(h),
                "--data-dir",
                "{dir}/agent-data",
                "--capacity",
                "2",
                "--controller",
                &controller,
                "--tls-dir",
                tls_dir,
                "--tls-name",
                name,
            ],
        )
    };
    let _agents: Vec<Daemon> = names
        .iter()
        .zip(hosts)
        .map(|(name, h)| agent(h, &host_dir(&pki, ops.path(), name), name))
        .collect();
    let impostor_agent = agent(impostor, fake_s, "host-1");
    for h in &net.hosts {
        if !reachable_or_skip(&agent_addr(h)) {
            return;
        }
    }
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let gw = Gateway::connect_with(
        &gateway.addr("grpc"),
        Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
                .identity(tonic::transport::Identity::from_pem(
                    read("ops.pem"),
                    read("ops-key.pem"),
                )),
        ),
    );

    // The three hosts join, each with its own address.
    let agents = wait_for(WAIT, "3 alive agents", || {
        let list = gw.agents();
        (list.len() >= HOSTS && list.iter().all(|a| a.state() == AgentState::Alive)).then_some(list)
    });
    let ids: Vec<String> = hosts
        .iter()
        .map(|h| at_ip(&agents, &h.ip).agent_id.clone())
        .collect();
    say(&format!(
        "netns tls: {HOSTS} agents alive after {:?}: {ids:?}",
        started.elapsed()
    ));

    // A task on each runs to DONE there.
    for id in &ids {
        let t = gw.submit("add", &[2.0, 3.0], Some(id));
        let t = gw.expect_sum(&t, 5.0);
        assert_eq!(&t.agent_id, id, "a task targeted at {id} ran on {t:?}");
    }

    // The impostor tried both ways in — announcing itself to the gateway and being
    // dialled by the gateway's scan — and both handshakes failed.
    wait_until(
        WAIT,
        "the gateway to refuse the impostor's announcement",
        || {
            gateway.stderr().lines().any(|l| {
                l.contains(&format!("refused a connection from {}:", impostor.ip))
                    && l.contains("invalid peer certificate")
            })
        },
    );
    wait_until(WAIT, "the impostor to refuse the gateway's scan", || {
        impostor_agent
            .stderr()
            .lines()
            .any(|l| l.contains(&format!("refused a connection from {}:", net.bridge_ip)))
    });
    let list = gw.agents();
    assert_eq!(list.len(), HOSTS, "{list:#?}");
    assert!(
        list.iter().all(|a| a.ip != impostor.ip),
        "the impostor is listed: {list:#?}"
    );
    say(&format!(
        "netns tls: impostor refused; test took {:?}",
        started.elapsed()
    ));
}
