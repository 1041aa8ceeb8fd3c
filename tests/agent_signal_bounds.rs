//! SIGNALs an agent sends go where each ATASK's `reply_to` says. Tasks whose
//! controller takes the SIGNAL's connection and never answers must not make the
//! agent hold a delivery, and a connection, per task: the deliveries under way are
//! bounded in total, and the final SIGNALs that wait for a place are still delivered
//! once the controllers answer.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use arpcp::agent::MAX_SIGNALS_IN_FLIGHT;
use common::{code, req, wait_until, Conn, Daemon, HoldingListeners, WAIT};
use serde_json::json;

/// Tasks, each with its own silent controller: more than the deliveries allowed.
const TASKS: usize = 3 * MAX_SIGNALS_IN_FLIGHT;
/// A delivery that ends (a report's one attempt timing out) gives its place to the
/// next, whose connection may open a moment before the listener sees the old one
/// close: connections counted at once may pass the bound by that many.
const HANDOVER_SLACK: usize = 8;

#[test]
fn signals_to_silent_controllers_are_bounded_and_still_delivered() {
    let agent = Daemon::agent(&["--capacity", "8"]);
    let controllers = HoldingListeners::start(TASKS);
    let addrs = controllers.addrs();

    // Quick tasks, pipelined on one connection.
    let mut conn = Conn::connect(&agent.arpcp());
    for (i, to) in addrs.iter().enumerate() {
        conn.send(&req::atask_with(
            &format!("t{i}.1"),
            "add",
            json!([i, 1]),
            Some(to),
        ));
    }
    for _ in &addrs {
        let r = conn.recv();
        assert_eq!(code(&r), 100, "ATASK refused: {r}");
    }
    // Every task has ended on the agent.
    wait_until(
        Duration::from_secs(60),
        "every task to end on the agent",
        || {
            (0..TASKS).all(|i| {
                let r = conn.request(&req::get(&format!("t{i}.1")));
                r["data"]["atask_status"] == "done"
            })
        },
    );
    // The deliveries that got a place have reached their controllers.
    let reached = || controllers.per_port().len();
    wait_until(WAIT, "SIGNALs to reach the silent controllers", || {
        reached() >= MAX_SIGNALS_IN_FLIGHT.min(TASKS)
    });
    let peak = controllers.peak();
    eprintln!(
        "{TASKS} tasks with silent controllers: {} controllers reached, SIGNAL connections open at once: {peak}",
        reached()
    );
    assert!(
        peak <= MAX_SIGNALS_IN_FLIGHT + HANDOVER_SLACK,
        "{peak} SIGNAL connections open at once, over MAX_SIGNALS_IN_FLIGHT = {MAX_SIGNALS_IN_FLIGHT}"
    );

    // The controllers answer from now on: every task's final SIGNAL arrives, those
    // that waited for a place included.
    controllers.answer_with(json!({"code": 100, "description": "OK", "data": {}}));
    let done_for = || -> BTreeSet<String> {
        controllers
            .received()
            .into_iter()
            .filter(|(_, m)| m["method"] == "SIGNAL" && m["atask_status"] == "done")
            .filter_map(|(_, m)| m["atask_id"].as_str().map(str::to_string))
            .collect()
    };
    wait_until(
        Duration::from_secs(90),
        "a done SIGNAL of every task",
        || done_for().len() == TASKS,
    );
}
