//! Announcements (ARPCP `ID` with a `port`) on the gateway's listener: each starts a
//! probe of the announced address, so a peer sending many of them must not make
//! the gateway open as many connections at once. The test plays the announced
//! "agents": listeners that take the probe's connection and never answer, so every
//! probe stays open until the gateway's probe timeout and can be counted.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use arpcp::gateway::MAX_ANNOUNCE_PROBES;
use common::gateway::Gw;
use common::{code, wait_for, wait_until, Conn, Daemon, HoldingListeners, WAIT};
use serde_json::{json, Value};

/// Addresses announced: several times what the gateway probes at once.
const ANNOUNCED: usize = 4 * MAX_ANNOUNCE_PROBES;

fn announce(port: u16) -> Value {
    json!({"method": "ID", "version": "1.0", "port": port})
}

#[test]
fn a_flood_of_announcements_probes_a_bounded_number_at_once() {
    // Echo rounds far apart: the probes seen are the announcements' own (the first
    // round runs at the start, before anything is announced).
    let gateway = Daemon::gateway(&["--echo-interval-ms", "60000"]);
    let seen = HoldingListeners::start(ANNOUNCED);
    let ports = seen.ports.clone();

    // Every address twice, pipelined on one connection.
    let mut conn = Conn::connect(&gateway.addr("arpcp"));
    for &p in ports.iter().chain(&ports) {
        conn.send(&announce(p));
    }
    let mut admitted = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for &p in ports.iter().chain(&ports) {
        let r = conn.recv();
        match code(&r) {
            100 => {
                admitted.insert(p);
            }
            300 => {
                let desc = r["description"].as_str().unwrap_or_default();
                assert!(
                    desc.contains("MAX_ANNOUNCE_PROBES") && desc.contains("announce again"),
                    "a refused announcement names the limit and what to do: {r}"
                );
                refused.insert(p);
            }
            _ => panic!("unexpected answer to an announcement: {r}"),
        }
    }

    // A real agent announcing now, while the probes are taken, is refused at first
    // and registered once it asks again.
    let agent = Daemon::agent(&["--controller", &gateway.addr("arpcp")]);

    // Every admitted announcement is probed.
    wait_until(WAIT, "a probe of every admitted announcement", || {
        admitted
            .iter()
            .all(|p| seen.per_port().get(p).copied().unwrap_or(0) >= 1)
    });
    let peak = seen.peak();
    let per_port = seen.per_port();
    let doubled = per_port.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{} addresses announced twice: {} admitted, {} refused; probes open at once: {peak}; \
         addresses probed twice: {doubled}",
        ports.len(),
        admitted.len(),
        refused.len()
    );
    assert!(
        peak <= MAX_ANNOUNCE_PROBES,
        "{peak} probes open at once, over MAX_ANNOUNCE_PROBES = {MAX_ANNOUNCE_PROBES}"
    );
    assert_eq!(
        doubled, 0,
        "an address already being probed was probed again"
    );
    assert!(!admitted.is_empty(), "no announcement was admitted at all");

    // Once the probes end (the listeners never answer, so at the probe timeout), a
    // refused address that announces again is probed: the limit is of probes in
    // flight, not a ban.
    let again = *refused
        .iter()
        .next()
        .expect("some announcements were refused");
    wait_for(
        Duration::from_secs(20),
        "a refused address to be admitted once the probes in flight end",
        || (code(&conn.request(&announce(again))) == 100).then_some(()),
    );
    wait_until(WAIT, "the re-announced address to be probed", || {
        seen.per_port().contains_key(&again)
    });
    let alive = Gw::connect(&gateway).wait_alive(1, Duration::from_secs(30));
    assert_eq!(alive[0].address, agent.arpcp(), "{alive:?}");
    eprintln!(
        "the agent announcing during the flood was refused {} times first",
        agent.stderr().matches("announcement refused").count()
    );
}
