//! The client commands against a real gateway and two agents (what a user types
//! and reads), and `arpcp up`, which starts a gateway with a local agent and shows
//! a demo result.

mod common;

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use arpcp::pb;
use common::gateway::{assert_task_status, Cluster};
use common::{run_to_exit, tempdir, wait_for, Daemon, WAIT};
use serde_json::{json, Value};

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

struct Cli<'a> {
    dir: &'a Path,
    url: String,
}

impl Cli<'_> {
    /// Runs `arpcp ARGS --gateway URL`; returns (status, stdout, stderr).
    fn run(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--gateway", &self.url]);
        run_to_exit(self.dir, &all, CLI_TIMEOUT)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (status, out, err) = self.run(args);
        assert!(
            status.success(),
            "arpcp {args:?} failed ({status}): {out}\n{err}"
        );
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("arpcp {args:?} printed no JSON ({e}): {out:?}"))
    }
}

#[test]
fn client_commands() {
    let c = Cluster::start(vec![Daemon::agent(&[]), Daemon::agent(&[])], &[]);
    let dir = tempdir();
    let cli = Cli {
        dir: dir.path(),
        url: c.gateway.grpc_url(),
    };

    // submit --wait prints the result.
    assert_eq!(cli.ok(&["submit", "add", "2", "3", "--wait"]).trim(), "5");
    assert_eq!(cli.ok(&["submit", "mul", "6", "7", "--sync"]).trim(), "42");
    assert_eq!(
        cli.ok(&["submit", "echo", "--kw", "x=[1,2]", "--kw", "y=hi", "--wait"])
            .trim(),
        r#"{"x":[1,2],"y":"hi"}"#
    );
    // The gateway may be given without a scheme.
    let bare = c.gateway.addr("grpc");
    let (status, out, err) = run_to_exit(
        dir.path(),
        &["submit", "sub", "10", "4", "--wait", "--gateway", &bare],
        CLI_TIMEOUT,
    );
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(out.trim(), "6");

    // submit without --wait prints the id; result shows the task.
    let id = cli.ok(&["submit", "add", "40", "2"]).trim().to_string();
    assert!(!id.is_empty() && !id.contains(' '), "{id:?}");
    assert_task_status(&c.gw.wait_final(&id, WAIT), pb::TaskStatus::Done);
    let r = cli.json(&["result", &id, "--json"]);
    assert_eq!(r["task_id"], id.as_str());
    assert_eq!(r["status"], "done");
    assert_eq!(r["result"], 42);
    assert_eq!(r["procedure"], "add");
    assert_eq!(r["args"], json!([40, 2]));
    assert!(c.ids.iter().any(|a| r["agent_id"] == a.as_str()), "{r}");
    assert_eq!(cli.ok(&["result", &id]).trim(), "42");
    let sid = cli.json(&["submit", "add", "1", "1", "--json"])["task_id"]
        .as_str()
        .expect("submit --json prints the task id")
        .to_string();
    assert_eq!(cli.json(&["result", &sid, "--wait", "--json"])["result"], 2);

    // A failed task: the exit status says so and the error is shown.
    let (status, out, _) = cli.run(&["submit", "div", "1", "0", "--wait"]);
    assert!(!status.success());
    assert!(out.contains("failed") && out.contains("zero"), "{out}");

    // tasks --json: every task, newest first.
    let t = cli.json(&["tasks", "--json"]);
    let tasks = t["tasks"].as_array().expect("a tasks array");
    assert!(tasks.len() >= 7, "{t}");
    assert!(tasks.iter().any(|x| x["task_id"] == id.as_str()));
    assert_eq!(tasks[0]["procedure"], "div");
    let done = cli.json(&["tasks", "--json", "--status", "done", "--procedure", "add"]);
    let done = done["tasks"].as_array().unwrap();
    assert!(
        done.iter()
            .all(|x| x["status"] == "done" && x["procedure"] == "add"),
        "{done:?}"
    );
    assert_eq!(done.len(), 3);
    let page = cli.json(&["tasks", "--json", "--limit", "2"]);
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    let token = page["next_page_token"].as_str().unwrap().to_string();
    assert!(!token.is_empty());
    let next = cli.json(&["tasks", "--json", "--limit", "2", "--page-token", &token]);
    assert_ne!(next["tasks"][0]["task_id"], page["tasks"][0]["task_id"]);
    let table = cli.ok(&["tasks"]);
    assert!(table.starts_with("TASK"), "{table}");
    assert!(table.contains(&id), "{table}");

    // agents: both, alive.
    let table = cli.ok(&["agents"]);
    for (i, a) in c.ids.iter().enumerate() {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{a} ")))
            .unwrap_or_else(|| panic!("{a} in {table}"));
        assert!(line.contains("alive"), "{line}");
        assert!(line.contains(&c.agents[i].arpcp()), "{line}");
    }
    let agents = cli.json(&["agents", "--json"]);
    assert_eq!(agents["agents"].as_array().unwrap().len(), 2, "{agents}");

    // procedures: the built-ins on both agents.
    let procs = cli.json(&["procedures", "--json"]);
    let add = procs["procedures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "add")
        .unwrap_or_else(|| panic!("add in {procs}"));
    assert_eq!(add["agent_ids"].as_array().unwrap().len(), 2, "{procs}");
    assert!(cli.ok(&["procedures"]).contains("sleep"));

    // blacklist add / remove.
    let a = c.id(0);
    assert!(cli
        .ok(&["blacklist", "add", a])
        .contains(&format!("agent {a} is blacklisted")));
    assert!(c.gw.agent(a).blacklisted);
    assert!(cli
        .ok(&["blacklist", "remove", a])
        .contains("not blacklisted"));
    assert!(!c.gw.agent(a).blacklisted);

    // watch and cancel.
    let w = cli.ok(&["submit", "sleep", "0.5"]).trim().to_string();
    let out = cli.ok(&["watch", &w, "--json"]);
    let last: Value = serde_json::from_str(out.lines().last().expect("watch prints")).unwrap();
    assert_eq!(last["status"], "done", "{out}");
    let long = cli.ok(&["submit", "sleep", "30"]).trim().to_string();
    c.gw.wait_status(&long, pb::TaskStatus::Running, WAIT);
    assert!(cli.ok(&["cancel", &long]).contains("cancelled"));
    assert_task_status(&c.gw.task(&long), pb::TaskStatus::Cancelled);

    // Errors reach the user with a non-zero exit status.
    let (status, _, err) = cli.run(&["submit", "no_such_proc"]);
    assert!(!status.success());
    assert!(
        err.contains("no_such_proc") && err.contains("NotFound"),
        "{err}"
    );
    let (status, _, err) = cli.run(&["result", "0190aaaa-0000-7000-8000-000000000000"]);
    assert!(!status.success());
    assert!(err.contains("NotFound"), "{err}");
    let (status, _, err) = run_to_exit(
        dir.path(),
        &[
            "agents",
            "--gateway",
            &format!("http://{}", common::reserve_port()),
        ],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    assert!(err.contains("cannot reach the gateway"), "{err}");
}

/// `arpcp up` prints its addresses, then the demo task's result.
#[test]
fn up_starts_a_working_cluster_and_shows_a_result() {
    let up = Daemon::spawn(&[
        "up",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/up-data",
    ]);
    let ready = up.ready();
    assert_eq!(ready["role"], "up", "{ready}");
    for key in ["grpc", "arpcp", "agent"] {
        let addr = up.addr(key);
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "{ready}"
        );
    }
    let line = wait_for(Duration::from_secs(20), "the demo result on stdout", || {
        up.stdout_lines()
            .into_iter()
            .find(|l| l.contains("add(2, 3) = 5"))
    });
    assert!(line.contains(&up.addr("grpc")), "{line}");
    // The commands it suggests reach this gateway, on its port.
    let tried = wait_for(Duration::from_secs(20), "the suggested commands", || {
        up.stdout_lines()
            .into_iter()
            .find(|l| l.starts_with("try:"))
    });
    assert!(
        tried.contains(&format!(
            "arpcp --gateway http://{} submit",
            up.addr("grpc")
        )),
        "{tried}"
    );

    // The cluster it started takes more tasks.
    let dir = tempdir();
    let (status, out, err) = run_to_exit(
        dir.path(),
        &[
            "submit",
            "mul",
            "3",
            "5",
            "--wait",
            "--gateway",
            &up.grpc_url(),
        ],
        CLI_TIMEOUT,
    );
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(out.trim(), "15");
}
