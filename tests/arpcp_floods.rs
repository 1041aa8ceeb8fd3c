//! Floods against the ARPCP servers of real daemons: many idle connections from one
//! host, and many connections each holding an unfinished line. Either must degrade
//! only the flooder: the controller still reaches its agents, agents still reach the
//! controller, and a daemon's memory stays within its stated budget.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use arpcp::arpcp::{MAX_BUFFERED_INPUT, MAX_CONNECTIONS_PER_PEER};
use arpcp::pb;
use common::gateway::{assert_task_status, describe, result_of, Cluster, Gw};
use common::{
    assert_response, code, peak_rss_kib, req, rss_kib, wait_for, wait_until, Conn, Daemon, WAIT,
};
use serde_json::json;

/// Connections a flooder opens: more than an agent serves at once (`MAX_CONNECTIONS`).
const FLOOD_CONNECTIONS: usize = 1100;
/// Longest the flooder may take to open its connections.
const FLOOD_TIME: Duration = Duration::from_secs(60);
/// A task that runs across the gateway's restart.
const LONG_TASK_SECS: u64 = 8;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Idle connections opened from `from` (an address of this host) to `to`.
struct Flood {
    conns: Vec<TcpStream>,
    /// Connections the kernel did not even complete (backlog full).
    failed: usize,
}

impl Flood {
    fn open(from: &str, to: &str, n: usize) -> Flood {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let src: SocketAddr = format!("{from}:0").parse().expect("a source address");
        let dst: SocketAddr = to.parse().expect("a destination address");
        let deadline = tokio::time::Instant::now() + FLOOD_TIME;
        let mut flood = Flood {
            conns: Vec::with_capacity(n),
            failed: 0,
        };
        rt.block_on(async {
            for _ in 0..n {
                let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
                socket
                    .bind(src)
                    .unwrap_or_else(|e| panic!("bind a socket to {src}: {e}"));
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let step = left.min(Duration::from_secs(2));
                match tokio::time::timeout(step, socket.connect(dst)).await {
                    Ok(Ok(s)) => {
                        let s = s.into_std().expect("a std socket");
                        flood.conns.push(s);
                    }
                    _ => flood.failed += 1,
                }
            }
        });
        flood
    }

    /// Connections the server has closed (end of stream or reset), checked without waiting.
    fn closed(&self) -> usize {
        self.conns
            .iter()
            .filter(|s| {
                let mut s = *s;
                let _ = s.set_nonblocking(true);
                let mut byte = [0u8; 1];
                match s.read(&mut byte) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
                }
            })
            .count()
    }
}

/// A flooder on `from` holds more connections to an agent than it serves; then the
/// gateway restarts (same data, same ports). The restarted gateway must still see the
/// agent alive, follow its running task to its end, and place new tasks on it, and
/// the connections the agent closed to make room must be the flooder's.
fn flood_agent_then_restart_gateway(from: &str) {
    let mut c = Cluster::start(vec![Daemon::agent(&["--capacity", "2"])], &[]);
    let long = c.gw.submit_ok("sleep", json!([LONG_TASK_SECS]));
    c.gw.wait_status(&long, pb::TaskStatus::Running, WAIT);

    let flood = Flood::open(from, &c.agents[0].arpcp(), FLOOD_CONNECTIONS);
    eprintln!(
        "flood from {from}: {} connections open, {} not completed, {} closed by the agent",
        flood.conns.len(),
        flood.failed,
        flood.closed()
    );

    c.gateway.kill9();
    c.gateway.restart_on_same_ports();
    c.gw = Gw::connect(&c.gateway);

    c.gw.wait_agent_state(c.id(0), pb::AgentState::Alive, WAIT);
    let t = c.gw.task(&long);
    assert!(
        t.status == pb::TaskStatus::Running as i32,
        "the task running across the restart: {}",
        describe(&t)
    );

    let add = c.gw.submit_ok("add", json!([2, 3]));
    let t = c.gw.wait_final(&add, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(5)), "{}", describe(&t));

    let t =
        c.gw.wait_final(&long, Duration::from_secs(LONG_TASK_SECS) + WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(c.gw.agent(c.id(0)).state, pb::AgentState::Alive as i32);

    // Everything above the flooder's share was closed by the agent, and the share it
    // keeps is at most its per-peer limit.
    let must_close = flood.conns.len().saturating_sub(MAX_CONNECTIONS_PER_PEER);
    wait_until(
        WAIT,
        &format!("the agent to close {must_close} of the flooder's connections"),
        || flood.closed() >= must_close,
    );
    let log = c.agents[0].stderr();
    let peer = format!("peer={from}");
    assert!(
        log.lines()
            .any(|l| l.contains("closed an idle connection to make room") && l.contains(&peer)),
        "the agent's log should say it closed idle connections of {from}"
    );
}

#[test]
fn connection_flood_from_another_host_leaves_the_controller_its_agent() {
    flood_agent_then_restart_gateway("127.0.0.2");
}

#[test]
fn connection_flood_from_the_controllers_own_host_closes_the_flooders_idle_connections() {
    flood_agent_then_restart_gateway("127.0.0.1");
}

/// A flooder holds more connections to the gateway's ARPCP listener than it serves;
/// an agent that starts afterwards must still announce itself, and its SIGNALs
/// (a task's `done`) must still reach the gateway.
#[test]
fn connection_flood_on_the_gateway_listener_leaves_agents_their_way_in() {
    let gateway = Daemon::gateway(&[]);
    let gw = Gw::connect(&gateway);
    let flood = Flood::open("127.0.0.2", &gateway.addr("arpcp"), FLOOD_CONNECTIONS);
    eprintln!(
        "flood: {} connections open, {} not completed, {} closed by the gateway",
        flood.conns.len(),
        flood.failed,
        flood.closed()
    );

    let controller = gateway.addr("arpcp");
    let _agent = Daemon::agent(&["--controller", &controller]);
    gw.wait_alive(1, WAIT);
    let t = gw.submit_ok("add", json!([20, 22]));
    let t = gw.wait_final(&t, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(42)), "{}", describe(&t));

    let must_close = flood.conns.len().saturating_sub(MAX_CONNECTIONS_PER_PEER);
    wait_until(
        WAIT,
        &format!("the gateway to close {must_close} of the flooder's connections"),
        || flood.closed() >= must_close,
    );
}

/// Connections each sending a 900 KiB line (under `MAX_LINE_LEN`) without its end.
const PARTIAL_CONNECTIONS: usize = 200;
const PARTIAL_LINE: usize = 900 * 1024;
/// What a daemon may hold beyond its size before the flood and the budget, once the
/// partial lines are in: read buffers below the charged size, runtime bookkeeping.
const HELD_MARGIN: u64 = 32 * MIB;
/// The same at the peak, while buffers grow and refused ones are being freed
/// (the allocator hands freed memory back to the OS with a delay).
const PEAK_MARGIN: u64 = 128 * MIB;
/// What a daemon may keep above its size before the flood once the connections closed.
const KEPT_AFTER: u64 = 32 * MIB;

/// Waits for the resident memory of `pid` to come under `bound` bytes (memory
/// handed back shows with a delay); returns it. `what` names the bound in a failure.
fn rss_settled_under(pid: u32, bound: u64, what: &str) -> u64 {
    wait_for(WAIT, what, || {
        let now = rss_kib(pid) * KIB;
        (now <= bound).then_some(now)
    })
}

/// Floods `addr` (served by `daemon`) with partial lines; `still_answers` checks on a
/// fresh connection that the daemon serves while they are held.
fn partial_line_flood(daemon: &Daemon, addr: &str, still_answers: impl Fn()) {
    let pid = daemon.pid();
    let before = rss_kib(pid) * KIB;
    let peak_before = peak_rss_kib(pid) * KIB;
    let chunk = vec![b'x'; PARTIAL_LINE];
    let mut conns = Vec::with_capacity(PARTIAL_CONNECTIONS);
    let mut cut_off = 0;
    for _ in 0..PARTIAL_CONNECTIONS {
        let mut c = Conn::connect(addr);
        if c.try_send_raw(&chunk).is_err() {
            cut_off += 1;
        }
        conns.push(c);
    }
    still_answers();
    let during = rss_kib(pid) * KIB;
    let peak = (peak_rss_kib(pid) * KIB).max(peak_before);
    let refused: Vec<String> = conns
        .iter_mut()
        .filter_map(|c| match c.try_recv_line(Duration::from_millis(50)) {
            Ok(Some(line)) => Some(String::from_utf8_lossy(&line).into_owned()),
            _ => None,
        })
        .collect();
    eprintln!(
        "{addr}: RSS before {} MiB, right after the flood {} MiB, peak {} MiB \
         (peak before the flood {} MiB); {} of {PARTIAL_CONNECTIONS} connections refused, \
         {cut_off} cut off while sending",
        before / MIB,
        during / MIB,
        peak / MIB,
        peak_before / MIB,
        refused.len(),
    );
    let budget = MAX_BUFFERED_INPUT as u64;
    let peak_bound = (before + budget + PEAK_MARGIN).max(peak_before);
    assert!(
        peak <= peak_bound,
        "peak RSS while {PARTIAL_CONNECTIONS} partial lines of {PARTIAL_LINE} bytes came in: \
         {} MiB; bound {} MiB (before {} MiB + budget {} MiB + margin {} MiB)",
        peak / MIB,
        peak_bound / MIB,
        before / MIB,
        budget / MIB,
        PEAK_MARGIN / MIB
    );
    // Once the burst is over (freed buffers handed back), what stays is what the
    // open connections hold: within the budget.
    let held_bound = before + budget + HELD_MARGIN;
    let held = rss_settled_under(
        pid,
        held_bound,
        &format!(
            "RSS with {PARTIAL_CONNECTIONS} partial lines of {PARTIAL_LINE} bytes held to settle \
             under {} MiB (before {} MiB + budget {} MiB + margin {} MiB)",
            held_bound / MIB,
            before / MIB,
            budget / MIB,
            HELD_MARGIN / MIB
        ),
    );
    eprintln!(
        "{addr}: RSS with the partial lines held, settled: {} MiB",
        held / MIB
    );
    // The connections over the budget were told so, naming the limit.
    let over_budget = PARTIAL_CONNECTIONS - (MAX_BUFFERED_INPUT / PARTIAL_LINE);
    assert!(
        refused.len() >= over_budget / 2,
        "{} of {PARTIAL_CONNECTIONS} connections refused, expected most of the {over_budget} \
         beyond the budget",
        refused.len()
    );
    for line in &refused {
        let resp: serde_json::Value = serde_json::from_str(line).expect("a JSON response");
        assert_response(
            &resp,
            200,
            &["MAX_BUFFERED_INPUT", &MAX_BUFFERED_INPUT.to_string()],
        );
    }
    drop(conns);
    still_answers();
    let after_bound = before + KEPT_AFTER;
    let after = rss_settled_under(
        pid,
        after_bound,
        &format!(
            "RSS to come back under {} MiB once the connections closed",
            after_bound / MIB
        ),
    );
    eprintln!(
        "{addr}: RSS after the connections closed {} MiB",
        after / MIB
    );
}

#[test]
fn partial_lines_held_by_many_connections_stay_within_the_agents_budget() {
    let agent = Daemon::agent(&[]);
    let addr = agent.arpcp();
    partial_line_flood(&agent, &addr, || {
        let r = common::call(&addr, &req::id());
        assert_eq!(code(&r), 100, "ID during the flood: {r}");
    });
}

#[test]
fn partial_lines_held_by_many_connections_stay_within_the_gateways_budget() {
    let gateway = Daemon::gateway(&[]);
    let addr = gateway.addr("arpcp");
    partial_line_flood(&gateway, &addr, || {
        let r = common::call(&addr, &req::signal("no-such-task.1", "done"));
        assert_eq!(code(&r), 205, "SIGNAL during the flood: {r}");
        let r = common::call(&addr, &req::id());
        assert_eq!(code(&r), 100, "ID during the flood: {r}");
    });
}

#[test]
fn flood_helpers_bind_to_other_loopback_addresses() {
    // The tests above count on 127.0.0.2 being another host's address on loopback.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let flood = Flood::open("127.0.0.2", &l.local_addr().unwrap().to_string(), 1);
    let (_s, peer) = l.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.2");
    assert_eq!(flood.conns.len(), 1);
}
