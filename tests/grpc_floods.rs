//! A flood of connections to the gateway's gRPC port (plain, as on loopback): the
//! gateway holds at most `MAX_GRPC_CONNECTIONS` of them, as it does over TLS; the
//! rest wait in the kernel's backlog, and a client gets through once the flood lets
//! go of some.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use arpcp::gateway::grpc_tls::MAX_GRPC_CONNECTIONS;
use common::gateway::Gw;
use common::{wait_until, Daemon, IO_TIMEOUT, WAIT};

/// Connections the flood opens: more than the gateway holds, by less than the
/// listen backlog (128), so that every connect succeeds.
const FLOOD: usize = MAX_GRPC_CONNECTIONS + 100;
/// Descriptors the gateway may open besides connections while the test looks (its
/// store, a pooled ARPCP connection).
const OTHER_FDS: usize = 32;
/// What an HTTP/2 client sends first: the preface and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_flood_of_grpc_connections_is_held_to_the_limit() {
    let gateway = Daemon::gateway(&[]);
    let pid = gateway.pid();
    let addr: SocketAddr = gateway.addr("grpc").parse().unwrap();
    let gw = Gw::connect(&gateway);
    assert!(gw.agents().is_empty());
    // The client's connection is one of those the gateway holds.
    let base = open_fds(pid);

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {} of the flood: {e}", flood.len()));
        s.write_all(PREFACE).expect("send the HTTP/2 preface");
        flood.push(s);
    }
    let limit = base + MAX_GRPC_CONNECTIONS - 1;
    wait_until(
        WAIT,
        "the gateway to take connections up to its limit",
        || open_fds(pid) >= limit,
    );
    // What the gateway still accepts now is over the limit; give it a moment to.
    let end = Instant::now() + Duration::from_secs(2);
    let mut most = 0;
    while Instant::now() < end {
        most = most.max(open_fds(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{FLOOD} connections: the gateway's descriptors went from {base} to at most {most} \
         (limit {MAX_GRPC_CONNECTIONS} connections)"
    );
    assert!(
        most <= limit + OTHER_FDS,
        "the gateway holds {} connections of a flood of {FLOOD}, over MAX_GRPC_CONNECTIONS = {MAX_GRPC_CONNECTIONS}",
        most - base + 1
    );

    // The flood lets go of some: a new client is served.
    flood.truncate(FLOOD - 200);
    let again = Gw::connect(&gateway);
    assert!(again.agents().is_empty());
    drop(flood);
}
