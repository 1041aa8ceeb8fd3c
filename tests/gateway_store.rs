//! The gateway's task store as users meet it: a store written by an earlier
//! release (format 1, JSON records) opens with this binary, every task listed and
//! fetched as before, filters working on it, migrated once; a migration killed
//! with -9 goes on at the next start with nothing lost or doubled; ListTasks
//! filters (status, procedure, agent), also across pages, and a task that
//! changes status moving between them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arpcp::arpcp::{Args, Progress};
use arpcp::gateway::model::{TaskRecord, TaskStatus};
use arpcp::pb;
use common::gateway::{result_of, submit_req, Cluster, Gw};
use common::{tempdir, wait_for, wait_until, Daemon, WAIT};
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long a start with a big store to migrate may take (a debug build).
const MIGRATION_WAIT: Duration = Duration::from_secs(180);

fn store_path(dir: &Path) -> std::path::PathBuf {
    dir.join("gateway-data").join("gateway.sled")
}

/// A task as the previous release kept it, finished (or not) with a history.
fn old_task(n: u64, status: TaskStatus, procedure: &str, agent: Option<&str>) -> TaskRecord {
    // Ids made as the gateway makes them (UUIDv7), in creation order.
    let id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000u128 + u128::from(n))
        .to_string();
    // Recent (an hour ago, a millisecond apart), so that retention keeps them.
    let created = arpcp::gateway::model::now_ms() - 3_600_000 + n;
    let mut t = TaskRecord::new(
        id,
        procedure.into(),
        Args::Positional(vec![json!(n), json!(1)]),
        None,
    );
    t.created_ms = created;
    t.updated_ms = created;
    t.history[0].at_ms = created;
    if status == TaskStatus::Queued {
        return t;
    }
    t.agent_id = agent.map(str::to_string);
    t.attempt = 1;
    t.set_status(TaskStatus::Dispatched, None, created + 5);
    t.started_ms = Some(created + 6);
    t.set_status(TaskStatus::Running, None, created + 6);
    match status {
        TaskStatus::Done => t.result = Some(json!(n + 1)),
        TaskStatus::Failed => {
            t.error = Some(format!("failure {n}"));
            t.error_code = Some(400);
        }
        _ => t.error = Some(format!("ended {n}")),
    }
    t.set_status(status, Some(format!("reason {n}")), created + 9);
    t
}

/// Writes records as the previous release did: JSON under the id as text in the
/// `tasks` tree of the gateway's sled store.
fn write_format_1(dir: &Path, tasks: &[TaskRecord], raw: &[(&str, Value)]) {
    let db = sled::open(store_path(dir)).expect("open the store with sled");
    let tree = db.open_tree("tasks").expect("the tasks tree");
    for chunk in tasks.chunks(10_000) {
        let mut batch = sled::Batch::default();
        for t in chunk {
            batch.insert(t.task_id.as_bytes(), serde_json::to_vec(t).unwrap());
        }
        tree.apply_batch(batch).expect("write format-1 records");
    }
    for (id, v) in raw {
        tree.insert(id.as_bytes(), serde_json::to_vec(v).unwrap())
            .unwrap();
    }
    db.flush().expect("flush");
}

/// Entries of the format-1 tree and of the format-2 records, read with sled.
fn tree_sizes(dir: &Path) -> (usize, usize) {
    let db = sled::open(store_path(dir)).expect("open the store with sled");
    let legacy = db.open_tree("tasks").unwrap().len();
    let records = db.open_tree("task_records").unwrap().len();
    (legacy, records)
}

fn list_req(status: Option<pb::TaskStatus>, procedure: &str, agent: &str) -> pb::ListTasksRequest {
    pb::ListTasksRequest {
        status: status.map_or(0, |s| s as i32),
        procedure: procedure.into(),
        agent_id: agent.into(),
        page_size: 7,
        ..Default::default()
    }
}

fn ids(tasks: &[pb::Task]) -> Vec<String> {
    tasks.iter().map(|t| t.task_id.clone()).collect()
}

/// The API's status of a stored one, by name (`client_error` is
/// `TASK_STATUS_CLIENT_ERROR`).
fn pb_status(s: TaskStatus) -> pb::TaskStatus {
    let name = format!("TASK_STATUS_{}", s.as_str().to_uppercase());
    pb::TaskStatus::from_str_name(&name).unwrap_or_else(|| panic!("no API status {name}"))
}

/// Ids of `tasks` matching, newest first (as a listing gives them).
fn newest_first(tasks: &[TaskRecord], keep: impl Fn(&TaskRecord) -> bool) -> Vec<String> {
    let mut v: Vec<String> = tasks
        .iter()
        .filter(|t| keep(t))
        .map(|t| t.task_id.clone())
        .collect();
    v.sort();
    v.reverse();
    v
}

/// A store of the previous release, with tasks of every final status, a queued
/// one, two procedures, two agents, histories, Opal and owner fields: listed and
/// fetched as they were, filters work, and a second start does not migrate again.
#[test]
fn a_store_of_the_previous_format_opens_and_reads_as_before() {
    let dir = tempdir();
    let statuses = [
        TaskStatus::Done,
        TaskStatus::Failed,
        TaskStatus::ClientError,
        TaskStatus::Interrupted,
        TaskStatus::Cancelled,
    ];
    let mut tasks: Vec<TaskRecord> = (0..40u64)
        .map(|n| {
            let procedure = if n % 3 == 0 { "mul" } else { "add" };
            let agent = if n % 2 == 0 { "agent-1" } else { "agent-2" };
            let mut t = old_task(n, statuses[n as usize % 5], procedure, Some(agent));
            if n % 4 == 0 {
                t.owner = format!("token:user{n}");
            }
            if n % 5 == 1 {
                t.progress = Some(Progress {
                    percent: 0.25,
                    comment: "a quarter".into(),
                });
            }
            t
        })
        .collect();
    tasks.push(old_task(40, TaskStatus::Queued, "add", None));
    // One record exactly as the previous release wrote it, field by field: an
    // Opal model's task, finished, with an owner.
    let opal_id = "01900000-0000-7000-8000-0000000000ff";
    let now = arpcp::gateway::model::now_ms() - 60_000;
    let opal = json!({
        "task_id": opal_id, "procedure": "forecast", "args": {"horizon": 3},
        "status": "done", "result": {"columns": [], "rows": []}, "error": null,
        "error_code": null, "agent_id": "agent-2", "requested_agent_id": "agent-2",
        "progress": {"percent": 1.0, "comment": "done"}, "attempt": 1,
        "created_ms": now, "started_ms": now + 10,
        "finished_ms": now + 20, "updated_ms": now + 20,
        "history": [
            {"status": "queued", "at_ms": now},
            {"status": "dispatched", "at_ms": now + 5, "agent_id": "agent-2"},
            {"status": "done", "at_ms": now + 20, "reason": "ok", "agent_id": "agent-2"}
        ],
        "sync": false, "opal": true, "owner": "cert:analyst"
    });
    let opal_rec: TaskRecord = serde_json::from_value(opal.clone()).unwrap();
    write_format_1(dir.path(), &tasks, &[(opal_id, opal)]);
    tasks.push(opal_rec);

    let mut gateway = Daemon::gateway_in(dir.clone(), &[]);
    let gw = Gw::connect(&gateway);
    common::wait_for_log(
        &gateway,
        &["migrated the task store to format 2", "moved=42"],
    );

    // Every task, newest first, as it was.
    let listed = gw.list_all(list_req(None, "", ""));
    assert_eq!(ids(&listed), newest_first(&tasks, |_| true));
    let by_id: BTreeMap<&str, &TaskRecord> =
        tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
    for t in &listed {
        let want = by_id[t.task_id.as_str()];
        let got = gw.task(&t.task_id);
        assert_eq!(&got, t, "GetResult and ListTasks agree on {}", t.task_id);
        assert_eq!(
            got.status,
            pb_status(want.status) as i32,
            "{}",
            want.task_id
        );
        assert_eq!(got.procedure, want.procedure);
        assert_eq!(got.agent_id, want.agent_id.clone().unwrap_or_default());
        assert_eq!(got.owner, want.owner);
        assert_eq!(got.history.len(), want.history.len(), "{}", want.task_id);
        assert_eq!(got.error, want.error.clone().unwrap_or_default());
        if !want.opal {
            assert_eq!(result_of(&got), want.result, "{}", want.task_id);
        }
        assert_eq!(
            got.progress.as_ref().map(|p| p.comment.clone()),
            want.progress.as_ref().map(|p| p.comment.clone()),
        );
        assert_eq!(
            got.finished_at
                .map(|f| f.seconds as u64 * 1000 + f.nanos as u64 / 1_000_000),
            want.finished_ms,
        );
    }
    let opal_got = gw.task(opal_id);
    assert_eq!(opal_got.requested_agent_id, "agent-2");
    assert_eq!(opal_got.owner, "cert:analyst");

    // Filters on the migrated tasks, across pages of 7.
    let check = |gw: &Gw| {
        for s in statuses.into_iter().chain([TaskStatus::Queued]) {
            assert_eq!(
                ids(&gw.list_all(list_req(Some(pb_status(s)), "", ""))),
                newest_first(&tasks, |t| t.status == s),
                "status {s:?}"
            );
        }
        assert_eq!(
            ids(&gw.list_all(list_req(None, "mul", ""))),
            newest_first(&tasks, |t| t.procedure == "mul")
        );
        assert_eq!(
            ids(&gw.list_all(list_req(None, "", "agent-2"))),
            newest_first(&tasks, |t| t.agent_id.as_deref() == Some("agent-2"))
        );
        assert_eq!(
            ids(&gw.list_all(list_req(Some(pb::TaskStatus::Done), "add", "agent-1"))),
            newest_first(&tasks, |t| t.status == TaskStatus::Done
                && t.procedure == "add"
                && t.agent_id.as_deref() == Some("agent-1"))
        );
        assert!(gw.list_all(list_req(None, "nothing", "")).is_empty());
    };
    check(&gw);

    // A second start finds nothing to migrate and the same tasks.
    gateway.sigterm();
    assert!(gateway.wait_exit(WAIT).is_some(), "stops on SIGTERM");
    gateway.restart();
    let gw = Gw::connect(&gateway);
    assert_eq!(ids(&gw.list_all(list_req(None, "", ""))), ids(&listed));
    check(&gw);
    assert!(
        !gateway.stderr().contains("migrat"),
        "a second start migrates nothing: {}",
        gateway.stderr()
    );
}

/// A gateway started outside the harness: the migration of a big store runs
/// before its ready line, for longer than the harness waits for one.
struct Started {
    child: Child,
    log: std::path::PathBuf,
}

impl Started {
    fn spawn(dir: &Path, name: &str) -> Started {
        let log = dir.join(name);
        let child = Command::new(common::ARPCP)
            .args(["gateway", "--grpc", "127.0.0.1:0", "--arpcp", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("gateway-data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the gateway");
        Started { child, log }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The gRPC URL from the ready line, within `timeout`.
    fn ready(&mut self, timeout: Duration) -> String {
        let stdout = self.child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("no ready line within {timeout:?}: {}", self.stderr()));
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line {line:?}: {e}; {}", self.stderr()));
        format!("http://{}", ready["grpc"].as_str().expect("a grpc address"))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A migration killed with -9 part-way: the store holds every task (some moved,
/// the rest not yet, at most one step's worth in both forms), and the next start
/// finishes the migration; every task is then listed once.
#[test]
fn a_migration_killed_part_way_goes_on_at_the_next_start() {
    const TASKS: u64 = 10_000;
    let dir: Arc<TempDir> = tempdir();
    let tasks: Vec<TaskRecord> = (0..TASKS)
        .map(|n| {
            let agent = if n % 2 == 0 { "agent-1" } else { "agent-2" };
            old_task(n, TaskStatus::Done, "add", Some(agent))
        })
        .collect();
    write_format_1(dir.path(), &tasks, &[]);

    let mut first = Started::spawn(dir.path(), "first.log");
    wait_until(MIGRATION_WAIT, "the migration under way", || {
        first.stderr().contains("migrating the task store moved=")
    });
    // SIGKILL, to our own child, by its pid.
    first.child.kill().expect("kill -9 the gateway");
    first.child.wait().expect("reap it");
    assert!(
        !first.stderr().contains("migrated the task store"),
        "killed before the migration ended: {}",
        first.stderr()
    );
    let (legacy, migrated) = tree_sizes(dir.path());
    assert!(
        legacy > 0 && migrated > 0,
        "part-way: {legacy} left, {migrated} moved"
    );
    // The gateway's `MIGRATION_CHUNK`: a step writes the new copies, then removes
    // the old ones.
    const STEP: usize = 1024;
    assert!(
        (TASKS as usize..=TASKS as usize + STEP).contains(&(legacy + migrated)),
        "every task, at most a step's worth twice: {legacy} left, {migrated} moved"
    );

    let mut second = Started::spawn(dir.path(), "second.log");
    let url = second.ready(MIGRATION_WAIT);
    let moved = format!("moved={legacy} ");
    assert!(
        second.stderr().contains("migrated the task store") && second.stderr().contains(&moved),
        "the rest ({legacy}) moved at the second start: {}",
        second.stderr()
    );
    let gw = Gw::connect_url(&url);
    let mut req = list_req(None, "", "");
    req.page_size = 1000;
    let listed = ids(&gw.list_all(req));
    assert_eq!(listed.len(), TASKS as usize);
    assert_eq!(listed.iter().collect::<BTreeSet<_>>().len(), listed.len());
    assert_eq!(listed, newest_first(&tasks, |_| true));
    let mut req = list_req(None, "", "agent-2");
    req.page_size = 1000;
    assert_eq!(gw.list_all(req).len(), TASKS as usize / 2);
    let oldest = &tasks[0];
    assert_eq!(result_of(&gw.task(&oldest.task_id)), oldest.result);
    drop(second);

    // And the store is in format 2 for good.
    let (legacy, migrated) = tree_sizes(dir.path());
    assert_eq!((legacy, migrated), (0, TASKS as usize));
}

/// ListTasks filters through gRPC on a live cluster: by status, procedure and
/// agent, across pages; a filter nothing matches; a task that changes status
/// leaves one status's listing for another's.
#[test]
fn list_tasks_filters_follow_tasks() {
    let c = Cluster::start(
        vec![
            Daemon::agent(&["--capacity", "4"]),
            Daemon::agent(&["--capacity", "4"]),
        ],
        &[],
    );
    let agents: Vec<String> = wait_for(WAIT, "two agents", || {
        let a = c.gw.agents();
        (a.len() == 2).then(|| a.into_iter().map(|a| a.agent_id).collect())
    });
    let mut on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut adds = Vec::new();
    for i in 0..10 {
        let agent = &agents[i % 2];
        let mut req = submit_req("add", json!([i, 1]));
        req.agent_id = agent.clone();
        let id = c.gw.submit(req).unwrap().task_id;
        c.gw.wait_final(&id, WAIT);
        on.entry(agent.clone()).or_default().push(id.clone());
        adds.push(id);
    }
    let mut req = submit_req("sleep", json!([60]));
    req.agent_id = agents[0].clone();
    let sleeper = c.gw.submit(req).unwrap().task_id;
    c.gw.wait_status(&sleeper, pb::TaskStatus::Running, WAIT);
    on.entry(agents[0].clone())
        .or_default()
        .push(sleeper.clone());

    let rev = |v: &[String]| v.iter().rev().cloned().collect::<Vec<_>>();
    // Pages of 3 across each filter: newest first, none twice, none missing.
    assert_eq!(ids(&c.gw.list_all(list_req(None, "add", ""))), rev(&adds));
    for pages in [1, 3] {
        let mut req = list_req(Some(pb::TaskStatus::Done), "", "");
        req.page_size = pages;
        assert_eq!(ids(&c.gw.list_all(req)), rev(&adds));
    }
    for a in &agents {
        let mut req = list_req(None, "", a);
        req.page_size = 3;
        assert_eq!(ids(&c.gw.list_all(req)), rev(&on[a]), "agent {a}");
    }
    let first_page = c.gw.list(list_req(None, "add", "")).unwrap();
    assert_eq!(first_page.tasks.len(), 7);
    assert_eq!(
        first_page.next_page_token, first_page.tasks[6].task_id,
        "the page token is the page's last task id"
    );
    let none =
        c.gw.list(list_req(Some(pb::TaskStatus::Failed), "", ""))
            .unwrap();
    assert!(none.tasks.is_empty() && none.next_page_token.is_empty());
    assert!(c
        .gw
        .list_all(list_req(None, "sleep", &agents[1]))
        .is_empty());

    // Running, then cancelled: it moves from one status's listing to the other's.
    let running = ids(&c
        .gw
        .list_all(list_req(Some(pb::TaskStatus::Running), "", "")));
    assert_eq!(running, vec![sleeper.clone()]);
    c.gw.cancel(&sleeper).unwrap();
    wait_until(WAIT, "the task listed as cancelled", || {
        ids(&c
            .gw
            .list_all(list_req(Some(pb::TaskStatus::Cancelled), "", "")))
            == [sleeper.clone()]
    });
    assert!(c
        .gw
        .list_all(list_req(Some(pb::TaskStatus::Running), "", ""))
        .is_empty());
    assert_eq!(
        ids(&c.gw.list_all(list_req(None, "sleep", &agents[0]))),
        vec![sleeper.clone()]
    );
}
