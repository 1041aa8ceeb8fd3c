//! Procedures that run configured programs (`[[procedure]]` in `--config`):
//! arguments go to argv and never through a shell, the result is stdout, failures
//! and time-outs are execution errors, and a bad configuration stops the agent.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_response, call, live_processes_in_group, process_alive, req, run_to_exit,
    wait_for_pid_file, wait_until, Daemon, FakeController, WAIT,
};
use serde_json::json;
use tempfile::TempDir;

const CONFIG: &str = r#"
[[procedure]]
name = "print"
command = ["printf", "%s"]

[[procedure]]
name = "print_lines"
command = ["printf", "%s\n"]

[[procedure]]
name = "join"
command = ["printf", "<%s>"]

[[procedure]]
name = "fail"
command = ["sh", "-c", "echo 'half done'; echo \"bad input: $0\" >&2; exit 3"]

[[procedure]]
name = "slow"
command = ["sh", "-c", "echo $$ > \"$0\"; sleep 30"]
timeout_secs = 0.5
"#;

fn agent() -> Daemon {
    let dir = common::tempdir();
    write(&dir, "agent.toml", CONFIG);
    Daemon::agent_in(dir, &["--config", "{dir}/agent.toml"])
}

fn write(dir: &Arc<TempDir>, name: &str, text: &str) {
    std::fs::write(dir.path().join(name), text).expect("write a file");
}

fn result(addr: &str, procedure: &str, args: serde_json::Value) -> serde_json::Value {
    let r = call(addr, &req::task(procedure, args));
    assert_response(&r, 100, &[]);
    r["data"]["result"].clone()
}

/// The result is stdout with one trailing newline removed; every argument is one
/// argv entry, numbers and booleans as their text.
#[test]
fn result_is_stdout_and_arguments_are_argv_entries() {
    let agent = agent();
    let a = agent.arpcp();
    assert_eq!(result(&a, "print", json!(["hello world"])), "hello world");
    assert_eq!(result(&a, "print_lines", json!(["one"])), "one");
    assert_eq!(result(&a, "print_lines", json!(["a", "b"])), "a\nb");
    assert_eq!(result(&a, "print_lines", json!(["x\n"])), "x\n");
    assert_eq!(
        result(&a, "join", json!(["a b", 7, 2.5, true, ""])),
        "<a b><7><2.5><true><>"
    );
    assert_eq!(result(&a, "print", json!([])), "");

    let r = call(&a, &req::task("print", json!({"text": "x"})));
    assert_response(&r, 204, &["\"print\"", "positional"]);
    let r = call(&a, &req::task("print", json!([["nested"]])));
    assert_response(&r, 204, &["\"print\"", "argument 1"]);
    let r = call(&a, &req::atask("print", json!(["nul\u{0}byte"])));
    assert_response(&r, 204, &["argument 1", "NUL"]);
}

/// Shell syntax in an argument is a literal string, never run.
#[test]
fn arguments_never_reach_a_shell() {
    let agent = agent();
    let a = agent.arpcp();
    let marker = agent.dir().join(format!("injected-{}", std::process::id()));
    let m = marker.to_str().expect("UTF-8 path");
    for attack in [
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("; touch {m}"),
        format!("x && touch {m}"),
        format!("| touch {m}"),
        format!("'\"; touch {m}; echo \""),
    ] {
        assert_eq!(result(&a, "print", json!([attack])), attack.as_str());
    }
    // The same through ATASK.
    let attack = format!("$(touch {m})");
    let r = call(
        &a,
        &req::atask_with("inject", "print", json!([attack]), None),
    );
    assert_response(&r, 100, &[]);
    wait_until(WAIT, "the task to end", || {
        call(&a, &req::get("inject"))["data"]["atask_status"] == "done"
    });
    assert_eq!(
        call(&a, &req::get("inject"))["data"]["result"],
        attack.as_str()
    );
    assert!(!marker.exists(), "an argument was run by a shell");
}

/// A non-zero exit is a 400 carrying stderr, for TASK and ATASK alike.
#[test]
fn failing_program_is_an_execution_error_with_its_stderr() {
    let controller = FakeController::start();
    let agent = agent();
    let a = agent.arpcp();
    let r = call(&a, &req::task("fail", json!(["row 7"])));
    assert_response(&r, 400, &["bad input: row 7", "exit status 3"]);

    let r = call(
        &a,
        &req::atask_with("fail-1", "fail", json!(["row 9"]), Some(controller.addr())),
    );
    assert_response(&r, 100, &[]);
    let done = controller.wait_signal("fail-1", "done", WAIT);
    assert_eq!(done["error"]["code"], 400, "{done}");
    let r = call(&a, &req::get("fail-1"));
    assert_response(&r, 400, &["bad input: row 9"]);
    assert_eq!(r["data"]["atask_status"], "done");
}

/// A program running past `timeout_secs` is killed with its children and the
/// call fails with 400 saying it timed out.
#[test]
fn program_past_its_timeout_is_killed() {
    let agent = agent();
    let a = agent.arpcp();
    let pid_file = agent.dir().join("slow.pid");
    let started = Instant::now();
    let r = call(
        &a,
        &req::task("slow", json!([pid_file.to_str().expect("UTF-8")])),
    );
    assert_response(&r, 400, &["timed out"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    let pid = wait_for_pid_file(&pid_file, WAIT);
    wait_until(WAIT, "the timed-out program to be killed", || {
        !process_alive(pid) && live_processes_in_group(pid).is_empty()
    });

    // The same as an ATASK: the task ends `done` with the time-out error.
    let pid_file = agent.dir().join("slow-2.pid");
    let r = call(
        &a,
        &req::atask_with(
            "slow-2",
            "slow",
            json!([pid_file.to_str().expect("UTF-8")]),
            None,
        ),
    );
    assert_response(&r, 100, &[]);
    let r = common::wait_for(WAIT, "the task to time out", || {
        let r = call(&a, &req::get("slow-2"));
        (r["data"]["atask_status"] != "accepted").then_some(r)
    });
    assert_response(&r, 400, &["timed out"]);
    let pid = wait_for_pid_file(&pid_file, WAIT);
    wait_until(WAIT, "the timed-out program to be killed", || {
        !process_alive(pid) && live_processes_in_group(pid).is_empty()
    });
}

/// A configured procedure may not take a built-in's name (or another's); the agent
/// refuses to run and says why.
#[test]
fn bad_procedure_configuration_stops_the_agent() {
    let cases = [
        (
            "[[procedure]]\nname = \"add\"\ncommand = [\"echo\"]\n",
            "\"add\"",
        ),
        (
            "[[procedure]]\nname = \"p\"\ncommand = [\"echo\"]\n\
             [[procedure]]\nname = \"p\"\ncommand = [\"true\"]\n",
            "\"p\"",
        ),
        (
            "[[procedure]]\nname = \"empty\"\ncommand = []\n",
            "`command`",
        ),
        (
            "[[procedure]]\nname = \"t\"\ncommand = [\"true\"]\ntimeout_secs = -1\n",
            "`timeout_secs`",
        ),
        (
            "[[procedure]]\nname = \"x\"\nprogram = [\"true\"]\n",
            "unknown field `program`",
        ),
    ];
    for (config, needle) in cases {
        let dir = common::tempdir();
        write(&dir, "agent.toml", config);
        let (status, _out, err) = run_to_exit(
            dir.path(),
            &[
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "{dir}/agent-data",
                "--config",
                "{dir}/agent.toml",
            ],
            Duration::from_secs(20),
        );
        assert!(!status.success(), "agent ran with {config:?}");
        assert_explained_once(&err, needle);
    }

    // A configuration file that cannot be read.
    let dir = common::tempdir();
    let (status, _out, err) = run_to_exit(
        dir.path(),
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/d",
            "--config",
            "{dir}/missing.toml",
        ],
        Duration::from_secs(20),
    );
    assert!(
        !status.success(),
        "agent ran without its configuration file"
    );
    assert_explained_once(&err, "missing.toml");
    assert_explained_once(&err, "No such file or directory");
}

/// The agent's last words name the problem, once.
fn assert_explained_once(stderr: &str, needle: &str) {
    let at = stderr
        .find("\nerror: ")
        .map(|i| i + 1)
        .or_else(|| stderr.starts_with("error: ").then_some(0))
        .unwrap_or_else(|| panic!("no `error: ` line in stderr:\n{stderr}"));
    let message = &stderr[at..];
    assert_eq!(
        message.matches(needle).count(),
        1,
        "the error should name {needle} exactly once:\n{message}"
    );
}
