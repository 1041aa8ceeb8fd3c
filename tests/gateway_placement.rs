//! Placement among many equally loaded agents: quick tasks submitted one after
//! another find every agent idle, and must still go round all of them rather
//! than all to the agent with the lowest id.

mod common;

use std::collections::BTreeMap;

use common::gateway::{Cluster, Gw};
use common::{Daemon, WAIT};
use serde_json::json;

/// Real agents, each its own process.
const AGENTS: usize = 6;
/// Tasks per agent if placement goes round evenly.
const ROUNDS: usize = 4;

#[test]
fn tasks_one_after_another_go_round_all_idle_agents() {
    let agents: Vec<Daemon> = (0..AGENTS)
        .map(|_| Daemon::agent(&["--capacity", "2"]))
        .collect();
    let cluster = Cluster::start(agents, &[]);
    let gw: &Gw = &cluster.gw;
    let mut ran: BTreeMap<String, usize> = cluster.ids.iter().map(|id| (id.clone(), 0)).collect();
    for i in 0..AGENTS * ROUNDS {
        // Each waits for its result before the next is submitted: every agent is
        // idle at each placement.
        let id = gw.submit_ok("add", json!([i, 1]));
        let t = gw.wait_final(&id, WAIT);
        assert_eq!(
            common::gateway::result_of(&t),
            Some(json!(i + 1)),
            "{}",
            common::gateway::describe(&t)
        );
        *ran.entry(t.agent_id.clone()).or_default() += 1;
    }
    eprintln!("tasks per agent: {ran:?}");
    assert!(
        ran.values().all(|&n| n == ROUNDS),
        "{} tasks one after another on {AGENTS} idle agents should give each {ROUNDS}: {ran:?}",
        AGENTS * ROUNDS
    );
}
