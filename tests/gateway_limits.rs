//! Size and depth limits of values, seen from a client: arguments that could never
//! reach an agent are refused at Submit and nothing is stored; results over the
//! limit end the task as failed, naming the limit; and every answer of the gateway
//! (ListTasks pages, GetResult, WatchTask, Submit) is read by a default gRPC client
//! (4 MiB), also for tasks stored over the limits by an older version.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use arpcp::limits::{CLIENT_MESSAGE_LIMIT, MAX_ARGS_BYTES, MAX_DEPTH, MAX_RESULT_BYTES};
use arpcp::pb;
use common::gateway::{agent_with_config, assert_status, jv, pstruct, submit_req, Cluster, Gw};
use common::{rss_kib, run_to_exit, Daemon, WAIT};
use prost::Message as _;
use serde_json::{json, Value};
use tonic::Code;

/// Bound of the tasks these tests run (echo of large values, short programs).
const TASK_WAIT: Duration = Duration::from_secs(60);

/// Echo rounds of a gateway whose agent moves megabytes: an echo that waits
/// behind them longer than its timeout (the interval, at least 200 ms) makes the
/// agent suspect, and Submit then finds no agent.
const LARGE_VALUES_ECHO_MS: &str = "1000";

fn cluster(agent: Daemon) -> Cluster {
    Cluster::start(vec![agent], &["--echo-interval-ms", LARGE_VALUES_ECHO_MS])
}

fn nested(levels: usize) -> Value {
    (0..levels).fold(json!(1), |v, _| json!([v]))
}

/// Submit, keeping only the id of an accepted task (a failure message showing
/// megabytes of arguments helps nobody).
fn submitted(gw: &Gw, req: pb::SubmitRequest) -> Result<String, tonic::Status> {
    gw.submit(req).map(|r| r.task_id)
}

/// Submits `echo(args…)`, panicking with the error only.
fn echo(gw: &Gw, args: Value) -> String {
    submitted(gw, submit_req("echo", args)).unwrap_or_else(|e| panic!("Submit echo: {e:?}"))
}

/// Asserts a task's status, showing its error but not its (large) values.
fn expect_status(t: &pb::Task, want: pb::TaskStatus) {
    let error: String = t.error.chars().take(500).collect();
    assert_eq!(
        pb::TaskStatus::try_from(t.status).ok(),
        Some(want),
        "task {} ({}): error {error:?}",
        t.task_id,
        t.procedure
    );
}

/// Asserts a refusal (see `assert_status`) and shows its message.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, want: Code, needles: &[&str]) {
    if let Err(e) = &r {
        println!("{:?}: {}", e.code(), e.message());
    }
    assert_status(r, want, needles);
}

fn every_task(gw: &Gw) -> Vec<pb::Task> {
    gw.list_all(pb::ListTasksRequest::default())
}

/// The ids of a listing, asserting none is listed twice.
fn ids_once(tasks: &[pb::Task]) -> HashSet<String> {
    let mut seen = HashSet::new();
    for t in tasks {
        assert!(seen.insert(t.task_id.clone()), "{} listed twice", t.task_id);
    }
    seen
}

/// Tasks with ~800 KB arguments (and as large results) are listed in pages a
/// default client reads; every task is found exactly once, and a page stops short
/// of its page size when it is full in bytes, still giving a page token.
#[test]
fn pages_of_large_tasks_fit_a_default_client() {
    let c = cluster(Daemon::agent(&[]));
    let big = "v".repeat(800_000);
    let mut submitted = HashSet::new();
    for i in 0..8 {
        submitted.insert(echo(&c.gw, json!([big, i])));
    }
    for i in 0..12 {
        submitted.insert(echo(&c.gw, json!([i])));
    }
    for id in &submitted {
        expect_status(&c.gw.wait_final(id, TASK_WAIT), pb::TaskStatus::Done);
    }

    // The gateway's memory across listings of up to 1000 tasks at once (a client
    // that reads any size, so the old behaviour shows too).
    let pid = c.gateway.pid();
    let before = rss_kib(pid);
    let mut client = c.gw.client().max_decoding_message_size(usize::MAX);
    let mut sizes = Vec::new();
    for _ in 0..4 {
        let req = pb::ListTasksRequest {
            page_size: 1000,
            ..Default::default()
        };
        let page =
            c.gw.rt()
                .block_on(client.list_tasks(req))
                .expect("ListTasks")
                .into_inner();
        sizes.push(page.encoded_len());
    }
    println!(
        "gateway RSS: {before} KiB before 4 ListTasks of page_size 1000 ({sizes:?} bytes), {} KiB after",
        rss_kib(pid)
    );
    assert!(
        sizes.iter().all(|&s| s <= CLIENT_MESSAGE_LIMIT),
        "{sizes:?}"
    );

    // The harness's client keeps tonic's default decoding limit.
    let mut req = pb::ListTasksRequest {
        page_size: 100,
        ..Default::default()
    };
    let mut listed = Vec::new();
    let mut short_pages = 0;
    for _ in 0..100 {
        let page = c
            .gw
            .list(req.clone())
            .unwrap_or_else(|e| panic!("ListTasks page {} of the listing: {e:?}", listed.len()));
        let bytes = page.encoded_len();
        println!(
            "page: {} tasks, {bytes} bytes, more: {}",
            page.tasks.len(),
            !page.next_page_token.is_empty()
        );
        assert!(bytes <= CLIENT_MESSAGE_LIMIT, "a page of {bytes} bytes");
        assert!(!page.tasks.is_empty(), "an empty page with a token");
        if !page.next_page_token.is_empty() && page.tasks.len() < 100 {
            short_pages += 1;
        }
        listed.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    let found = ids_once(&listed);
    assert_eq!(found, submitted, "every task, exactly once");
    assert!(short_pages > 0, "pages full in bytes end before page_size");
    for t in listed.iter().filter(|t| t.args.len() == 2) {
        assert_eq!(
            jv(&t.args[0]),
            json!(big),
            "large arguments are shown whole"
        );
        assert_eq!(
            t.result.as_ref().map(jv),
            Some(json!([big, jv(&t.args[1])]))
        );
    }
}

/// Arguments over the size or depth limit, nesting beyond what protobuf decodes,
/// and strings that are not UTF-8 are INVALID_ARGUMENT naming the field and the
/// limit, and nothing is stored; arguments at the limit run.
#[test]
fn submit_refuses_arguments_that_could_never_run() {
    let c = cluster(Daemon::agent(&[]));
    let gw = &c.gw;
    let first = echo(gw, json!([1]));

    let huge = "h".repeat(3_900_000);
    refused(
        submitted(gw, submit_req("echo", json!([huge]))),
        Code::InvalidArgument,
        &[
            "args",
            "3900004 bytes as JSON",
            &format!("limit of {MAX_ARGS_BYTES} bytes"),
        ],
    );
    let keys: serde_json::Map<String, Value> = (0..100_000)
        .map(|i| (format!("k{i:06}"), json!(i)))
        .collect();
    refused(
        submitted(
            gw,
            pb::SubmitRequest {
                procedure: "echo".into(),
                kwargs: Some(pstruct(&keys)),
                ..Default::default()
            },
        ),
        Code::InvalidArgument,
        &["kwargs", &format!("limit of {MAX_ARGS_BYTES} bytes")],
    );
    // Line ends take 2 bytes each as JSON (`\n`), 1 as protobuf.
    let lines = "\n".repeat(MAX_ARGS_BYTES / 2);
    refused(
        submitted(gw, submit_req("echo", json!([lines]))),
        Code::InvalidArgument,
        &[
            "args",
            &format!("the argument list is {} bytes as JSON", MAX_ARGS_BYTES + 4),
        ],
    );
    let one_more = "o".repeat(MAX_ARGS_BYTES - 7);
    refused(
        submitted(gw, submit_req("echo", json!([one_more]))),
        Code::InvalidArgument,
        &[
            "args",
            &format!(
                "the argument list is {} bytes as protobuf",
                MAX_ARGS_BYTES + 1
            ),
        ],
    );
    // An argument nested 33 deep makes the list 34 levels deep.
    refused(
        submitted(gw, submit_req("echo", json!([1, nested(33)]))),
        Code::InvalidArgument,
        &[
            "args",
            "args[1]",
            "34 levels",
            &format!("limit of {MAX_DEPTH} levels"),
        ],
    );
    // 60 levels are more than protobuf decodes (its limit is 100 messages).
    refused(
        submitted(gw, submit_req("echo", json!([nested(60)]))),
        Code::InvalidArgument,
        &["recursion limit", &format!("at most {MAX_DEPTH} levels")],
    );
    refused(
        raw_submit(gw, raw_request(b"ec\xffho", None)).map(|r| r.task_id),
        Code::InvalidArgument,
        &["SubmitRequest.procedure", "UTF-8"],
    );
    refused(
        raw_submit(gw, raw_request(b"echo", Some(b"x\xc3("))).map(|r| r.task_id),
        Code::InvalidArgument,
        &["Value.kind", "UTF-8"],
    );

    // At the limit: the longest single string argument the list holds in both
    // encodings runs, and comes back whole.
    let most = "m".repeat(MAX_ARGS_BYTES - 8);
    let id = echo(gw, json!([most]));
    let t = gw.wait_final(&id, TASK_WAIT);
    expect_status(&t, pb::TaskStatus::Done);
    assert_eq!(t.result.as_ref().map(jv), Some(json!([most])));
    let deepest = echo(gw, json!([nested(MAX_DEPTH - 1)]));
    expect_status(&gw.wait_final(&deepest, TASK_WAIT), pb::TaskStatus::Done);

    let ids = ids_once(&every_task(gw));
    assert_eq!(
        ids,
        HashSet::from([first, id, deepest]),
        "refused calls store nothing"
    );

    // The command-line client shows the refusal.
    let deep_arg = nested(40).to_string();
    let (status, out, err) = run_to_exit(
        c.gateway.dir(),
        &["submit", "--gateway", gw.url(), "echo", &deep_arg],
        WAIT,
    );
    assert!(!status.success(), "stdout {out:?} stderr {err:?}");
    assert!(
        err.contains("InvalidArgument") && err.contains("41 levels"),
        "stderr: {err}"
    );
}

/// `SubmitRequest` with bytes where protobuf wants UTF-8 strings (the generated
/// types refuse to hold such a request).
#[derive(Clone, PartialEq, prost::Message)]
struct RawSubmit {
    #[prost(bytes = "vec", tag = "1")]
    procedure: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    args: Vec<RawValue>,
}

/// `google.protobuf.Value` holding `string_value` as bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawValue {
    #[prost(bytes = "vec", tag = "3")]
    string_value: Vec<u8>,
}

fn raw_request(procedure: &[u8], arg: Option<&[u8]>) -> RawSubmit {
    RawSubmit {
        procedure: procedure.to_vec(),
        args: arg
            .map(|a| RawValue {
                string_value: a.to_vec(),
            })
            .into_iter()
            .collect(),
    }
}

fn raw_submit(gw: &Gw, req: RawSubmit) -> Result<pb::SubmitResponse, tonic::Status> {
    let url = gw.url().to_string();
    gw.rt().block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .expect("a gRPC URL")
            .connect()
            .await
            .expect("connect to the gateway");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("a ready channel");
        let codec = tonic_prost::ProstCodec::<RawSubmit, pb::SubmitResponse>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/arpcp.v1.Gateway/Submit");
        tokio::time::timeout(WAIT, grpc.unary(tonic::Request::new(req), path, codec))
            .await
            .expect("Submit answered in time")
            .map(tonic::Response::into_inner)
    })
}

const BIG_OUTPUT: usize = 3_000_000;
const HUGE_OUTPUT: usize = 4_000_000;

/// A program's output over `MAX_RESULT_BYTES` ends the task FAILED with code 400
/// naming the size and the limit, for asynchronous and synchronous calls alike;
/// listings and GetResult keep working.
#[test]
fn results_over_the_limit_fail_naming_it() {
    let config = format!(
        r#"
[[procedure]]
name = "big"
command = ["sh", "-c", "head -c {BIG_OUTPUT} /dev/zero | tr '\\0' a"]

[[procedure]]
name = "huge"
command = ["sh", "-c", "head -c {HUGE_OUTPUT} /dev/zero | tr '\\0' b"]
"#
    );
    let c = cluster(agent_with_config(&config, &[]));
    let gw = &c.gw;

    let id = gw.submit_ok("big", json!([]));
    let t = gw.wait_final(&id, TASK_WAIT);
    expect_status(&t, pb::TaskStatus::Failed);
    assert_eq!(t.error_code, 400);
    for needle in [
        format!("{} bytes as JSON", BIG_OUTPUT + 2),
        format!("limit of {MAX_RESULT_BYTES} bytes"),
    ] {
        assert!(t.error.contains(&needle), "{needle:?} in {:?}", t.error);
    }

    let r = gw
        .call_within(TASK_WAIT, "Submit", |mut cl| async move {
            cl.submit(pb::SubmitRequest {
                procedure: "huge".into(),
                sync: true,
                ..Default::default()
            })
            .await
        })
        .expect("a synchronous Submit of a program with a huge output");
    let sync = r.task.expect("the finished task");
    expect_status(&sync, pb::TaskStatus::Failed);
    assert_eq!(sync.error_code, 400);
    assert!(
        sync.error
            .contains(&format!("{} bytes as JSON", HUGE_OUTPUT + 2)),
        "{:?}",
        sync.error
    );

    let listed = ids_once(&every_task(gw));
    assert_eq!(listed, HashSet::from([id.clone(), r.task_id.clone()]));
    expect_status(&gw.task(&id), pb::TaskStatus::Failed);
    expect_status(&gw.task(&r.task_id), pb::TaskStatus::Failed);
}

// ---------------------------------------------------------------------------
// An agent that sends results over the limit anyway

/// What the fake agent answers for each procedure it offers.
fn fake_results() -> BTreeMap<&'static str, Value> {
    BTreeMap::from([("deep", nested(49)), ("big", json!("q".repeat(3_000_000)))])
}

fn write_line(s: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).expect("JSON");
    line.extend_from_slice(b"\r\n");
    s.write_all(&line)
}

/// Serves one connection of the gateway as an ARPCP agent that does not check
/// its results: ID, ATASK (then SIGNAL done to `reply_to`), GET, TASK, SIGNAL.
fn fake_agent_connection(
    s: TcpStream,
    port: u16,
    tasks: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut out = s.try_clone().expect("clone the socket");
    let results = fake_results();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let req: Value = serde_json::from_str(&line).expect("a JSON request");
        let method = req["method"].as_str().unwrap_or_default().to_uppercase();
        let answer = match method.as_str() {
            "ID" => json!({"code": 100, "description": "OK", "data": {
                "mac": "02:00:00:00:00:99", "ip": "127.0.0.1", "hostname": "fake",
                "port": port, "version": "1.0", "procedures": ["deep", "big"],
                "capacity": 4, "running": 0}}),
            "ATASK" => {
                let id = req["atask_id"].as_str().expect("atask_id").to_string();
                let proc = req["remote_procedure"]
                    .as_str()
                    .expect("procedure")
                    .to_string();
                tasks.lock().unwrap().insert(id.clone(), proc);
                let reply_to = req["reply_to"].as_str().expect("reply_to").to_string();
                let signal = json!({"method": "SIGNAL", "version": "1.0",
                    "atask_id": id, "atask_status": "done"});
                std::thread::spawn(move || {
                    common::call(&reply_to, &signal);
                });
                json!({"code": 100, "description": "OK", "data": {"atask_id": id}})
            }
            "GET" => {
                let id = req["atask_id"].as_str().expect("atask_id").to_string();
                let proc = tasks
                    .lock()
                    .unwrap()
                    .get(&id)
                    .cloned()
                    .expect("a known task");
                json!({"code": 100, "description": "OK", "data": {
                    "atask_id": id, "atask_status": "done", "running": false,
                    "result": results[proc.as_str()]}})
            }
            "TASK" => {
                let proc = req["remote_procedure"].as_str().expect("procedure");
                json!({"code": 100, "description": "OK", "data": {"result": results[proc]}})
            }
            _ => json!({"code": 100, "description": "OK"}),
        };
        if write_line(&mut out, &answer).is_err() {
            return;
        }
    }
}

/// Results over the limits that an agent sends anyway (an older or a foreign
/// agent) are stored as a failure naming the limit, not as a result no client
/// could read.
#[test]
fn results_an_agent_sends_over_the_limit_are_failures() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let tasks = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let tasks = tasks.clone();
            std::thread::spawn(move || fake_agent_connection(s, addr.port(), tasks));
        }
    });
    let gateway = Daemon::gateway(&[
        "--agent",
        &addr.to_string(),
        "--echo-interval-ms",
        LARGE_VALUES_ECHO_MS,
    ]);
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);

    let deep = gw.submit_ok("deep", json!([]));
    let big = gw.submit_ok("big", json!([]));
    for (id, needle) in [
        (
            &deep,
            format!("nested 49 levels deep, over the limit of {MAX_DEPTH} levels"),
        ),
        (
            &big,
            format!("3000002 bytes as JSON, over the limit of {MAX_RESULT_BYTES} bytes"),
        ),
    ] {
        let t = gw.wait_final(id, TASK_WAIT);
        expect_status(&t, pb::TaskStatus::Failed);
        assert_eq!(t.error_code, 400);
        assert!(t.error.contains(&needle), "{needle:?} in {:?}", t.error);
    }
    let sync = gw
        .submit(pb::SubmitRequest {
            procedure: "deep".into(),
            sync: true,
            ..Default::default()
        })
        .expect("a synchronous Submit")
        .task
        .expect("the finished task");
    expect_status(&sync, pb::TaskStatus::Failed);
    assert!(sync.error.contains("49 levels"), "{:?}", sync.error);
    assert_eq!(ids_once(&every_task(&gw)).len(), 3);
}

// ---------------------------------------------------------------------------
// Tasks stored over the limits by an older version

/// A task over the limits in the store (as an older version could write it) is
/// listed and read with the value replaced by a short placeholder saying what was
/// omitted and why; the listing and the other tasks are unaffected.
#[test]
fn stored_values_over_the_limits_are_shown_as_placeholders() {
    let mut c = cluster(Daemon::agent(&[]));
    let normal = echo(&c.gw, json!([7]));
    expect_status(&c.gw.wait_final(&normal, TASK_WAIT), pb::TaskStatus::Done);

    c.gateway.sigterm();
    assert!(
        c.gateway.wait_exit(WAIT).is_some(),
        "the gateway stops on SIGTERM"
    );
    let now = arpcp::gateway::model::now_ms();
    let deep_id = uuid::Uuid::now_v7().to_string();
    let big_id = uuid::Uuid::now_v7().to_string();
    {
        let db = sled::Config::new()
            .path(
                c.gateway
                    .dir()
                    .join("gateway-data")
                    .join(arpcp::durable::GATEWAY_STORE),
            )
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .expect("open the gateway's store");
        let tasks = db.open_tree("tasks").expect("the tasks tree");
        let stored = [
            (&deep_id, json!([nested(48)]), nested(49)),
            (
                &big_id,
                json!(["b".repeat(5_000_000)]),
                json!("r".repeat(3_000_000)),
            ),
        ];
        for (id, args, result) in stored {
            let rec = json!({
                "task_id": id, "procedure": "echo", "args": args, "status": "done",
                "result": result, "created_ms": now, "finished_ms": now, "attempt": 1,
                "history": [{"status": "queued", "at_ms": now}, {"status": "done", "at_ms": now}],
            });
            tasks
                .insert(id.as_bytes(), serde_json::to_vec(&rec).unwrap())
                .unwrap();
        }
        db.flush().expect("flush");
    }
    c.restart_gateway();
    let gw = &c.gw;

    let listed = every_task(gw);
    assert_eq!(
        ids_once(&listed),
        HashSet::from([normal.clone(), deep_id.clone(), big_id.clone()])
    );
    let shown = |id: &str| {
        let t = gw.task(id);
        let args: Vec<Value> = t.args.iter().map(jv).collect();
        (t.clone(), args, t.result.as_ref().map(jv))
    };
    let (_, args, result) = shown(&deep_id);
    let placeholder = |v: &Value, needles: &[&str]| {
        let s = v
            .as_str()
            .unwrap_or_else(|| panic!("a placeholder string, got {v}"));
        assert!(s.len() < 400, "a short placeholder: {s}");
        for n in needles {
            assert!(s.contains(n), "{n:?} in {s:?}");
        }
    };
    placeholder(
        &args[0],
        &["omitted", "args[0]", "49 levels", "limit of 32"],
    );
    placeholder(
        &result.expect("a result"),
        &["omitted", "49 levels", "limit of 32"],
    );
    let (big, args, result) = shown(&big_id);
    assert!(big.encoded_len() <= CLIENT_MESSAGE_LIMIT);
    placeholder(&args[0], &["omitted", "5000004 bytes"]);
    placeholder(&result.expect("a result"), &["omitted", "3000002 bytes"]);
    let watched = gw.watch(&big_id, WAIT).expect("WatchTask");
    assert_eq!(watched.len(), 1);
    assert_eq!(shown(&normal).2, Some(json!([7])));
    let mine: Vec<_> = listed.iter().filter(|t| t.task_id == normal).collect();
    assert_eq!(mine[0].result.as_ref().map(jv), Some(json!([7])));
}

/// The open-files limit of a daemon's process, soft and hard (`/proc/PID/limits`).
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft").to_string();
    let hard = fields.next().expect("hard").to_string();
    (soft, hard)
}

/// A thousand agents need two thousand descriptors on the gateway: the daemons raise
/// their soft open-files limit to the hard one the administrator set, instead of
/// stopping at a low default.
#[test]
fn daemons_raise_their_open_files_limit_to_the_hard_one() {
    let hard = open_files_limit(std::process::id()).1;
    let hard: u64 = hard.parse().unwrap_or(4096).min(4096);
    let nofile = format!("--nofile=256:{hard}");
    let mut agent_args = vec![nofile.as_str(), common::ARPCP];
    agent_args.extend(common::agent_args(&[]));
    let agent = Daemon::spawn_cmd("prlimit", &agent_args);
    let mut gateway_args = vec![nofile.as_str(), common::ARPCP];
    let agent_addr = agent.arpcp();
    gateway_args.extend(common::gateway::gateway_args(&["--agent", &agent_addr]));
    let gateway = Daemon::spawn_cmd("prlimit", &gateway_args);
    for d in [&agent, &gateway] {
        assert_eq!(
            open_files_limit(d.pid()),
            (hard.to_string(), hard.to_string())
        );
    }
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);
}
