//! The command line against a gateway that never answers, and with flags that do
//! not fit. Every command ends within its bounds (a ping the gateway does not
//! answer, `--timeout` counted from the start, the Submit included), and a mistake
//! in the command line exits 2, as clap's own do, before anything is sent. `arpcp
//! token` on a directory that is not a gateway's says so.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{reserve_port, run_to_exit, tempdir};

/// Longer than any bound of the commands here (a ping's 5 s interval and 5 s
/// timeout, the timeouts given): a command still running then hangs.
const CLI_TIMEOUT: Duration = Duration::from_secs(40);
/// A task id no gateway has.
const SOME_ID: &str = "0195f3c2-7d1e-7aaa-8bbb-123456789abc";

/// A port that accepts connections and never says a word, as a stopped or hung
/// gateway, or another program on the port, looks to a client. Holds what it
/// accepted until dropped.
struct SilentPort {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentPort {
    fn open() -> SilentPort {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("its address").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SilentPort {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentPort {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs each command line at once (each in its own directory) and returns their
/// exit codes and stderr, in order.
fn run_all(commands: &[Vec<String>]) -> Vec<(Option<i32>, String)> {
    std::thread::scope(|s| {
        let runs: Vec<_> = commands
            .iter()
            .map(|args| {
                s.spawn(move || {
                    let dir = tempdir();
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let (status, _, err) = run_to_exit(dir.path(), &args, CLI_TIMEOUT);
                    (status.code(), err)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("a command's thread"))
            .collect()
    })
}

fn line(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

#[test]
fn a_gateway_that_never_answers_ends_every_command() {
    let port = SilentPort::open();
    let gw = port.addr.as_str();
    let commands = [
        line(&["--gateway", gw, "agents"]),
        line(&[
            "--gateway",
            gw,
            "submit",
            "add",
            "1",
            "2",
            "--wait",
            "--timeout",
            "2s",
        ]),
        line(&[
            "--gateway",
            gw,
            "submit",
            "add",
            "1",
            "2",
            "--sync",
            "--timeout",
            "1s",
        ]),
        line(&["--gateway", gw, "result", SOME_ID, "--wait"]),
        line(&["--gateway", gw, "watch", SOME_ID]),
    ];
    let outcomes = run_all(&commands);
    for (args, (code, err)) in commands.iter().zip(&outcomes) {
        let timed = args.iter().any(|a| a == "--timeout");
        if timed {
            // --timeout bounds the whole command: the Submit got no answer.
            assert_eq!(*code, Some(124), "{args:?}: {err}");
            assert!(
                err.contains("did not answer the Submit within --timeout"),
                "{args:?}: {err}"
            );
        } else {
            // No --timeout: the unanswered ping ends it.
            assert_eq!(*code, Some(1), "{args:?}: {err}");
            assert!(
                err.contains("the gateway stopped answering"),
                "{args:?}: {err}"
            );
        }
    }
}

#[test]
fn command_line_mistakes_exit_2_before_anything_is_sent() {
    let dir = tempdir();
    // Nobody listens there: a command that connected first would say so (exit 1).
    let nobody = reserve_port();
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "root:x:0:0:root:/root:/bin/bash\n").expect("write a file");
    let not_pem = not_pem.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 7] = [
        (
            &["submit", "add", "1", "2", "--timeout", "5s"],
            "--timeout needs --wait",
        ),
        (
            &["submit", "echo", "--kw", "noequals"],
            "expected NAME=VALUE",
        ),
        (
            &["submit", "echo", "--kw", "=5"],
            "the name before '=' is empty",
        ),
        (
            &["submit", "add", "1", "2", "--wait", "--timeout", "0s"],
            "more than 0",
        ),
        (&["--ca", &not_pem, "agents"], "holds no PEM certificate"),
        (
            &["--token", "t", "agents"],
            "--token (or ARPCP_TOKEN) needs --ca",
        ),
        // Numbers travel as doubles: this one would arrive as 9007199254740992.
        (
            &["submit", "add", "9007199254740993", "1"],
            "argument 1: 9007199254740993 cannot be sent exactly",
        ),
    ];
    for (args, says) in cases {
        let mut all = vec!["--gateway", nobody.as_str()];
        all.extend_from_slice(args);
        let (status, _, err) = run_to_exit(dir.path(), &all, CLI_TIMEOUT);
        assert_eq!(status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(says), "{all:?}: {says:?} in {err}");
        assert!(
            !err.contains("cannot reach"),
            "{all:?} connected first: {err}"
        );
    }

    // Caught by the argument parser itself, with the same status.
    for limit in ["0", "-1", "1001"] {
        let args = ["--gateway", nobody.as_str(), "tasks", "--limit", limit];
        let (status, _, err) = run_to_exit(dir.path(), &args, CLI_TIMEOUT);
        assert_eq!(status.code(), Some(2), "--limit {limit}: {err}");
        assert!(err.contains("--limit") && err.contains("1..=1000"), "{err}");
    }

    // --gateway: only http:// and https://, and the default port when none is named.
    let ftp = format!("ftp://{nobody}");
    let (status, _, err) = run_to_exit(dir.path(), &["--gateway", &ftp, "agents"], CLI_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("ftp:// is not one of http:// and https://"),
        "{err}"
    );
    let (status, _, err) = run_to_exit(
        dir.path(),
        &["--gateway", "127.0.0.1", "--json", "agents"],
        CLI_TIMEOUT,
    );
    if !status.success() {
        assert!(err.contains("127.0.0.1:50051"), "the default port: {err}");
    }
}

/// `arpcp token` on a wrong `--data-dir`: listing or revoking in a directory that
/// does not exist is refused (it read as "no tokens"), and a token made where no
/// gateway store is says which gateway would accept it.
#[test]
fn tokens_on_a_directory_that_is_not_a_gateways() {
    let dir = tempdir();
    for args in [
        &["token", "list", "--data-dir", "{dir}/typo"][..],
        &["token", "revoke", "ci", "--data-dir", "{dir}/typo"][..],
    ] {
        let (status, out, err) = run_to_exit(dir.path(), args, CLI_TIMEOUT);
        assert_eq!(status.code(), Some(2), "{args:?}: {out}{err}");
        assert!(err.contains("typo: no such directory"), "{args:?}: {err}");
    }
    let (status, out, err) = run_to_exit(
        dir.path(),
        &[
            "token",
            "create",
            "ci",
            "--role",
            "reader",
            "--data-dir",
            "{dir}/fresh",
        ],
        CLI_TIMEOUT,
    );
    assert!(status.success(), "{err}");
    assert!(out.trim().starts_with("arpcp_"), "{out}");
    assert!(
        err.contains("holds no gateway store") && err.contains("fresh"),
        "{err}"
    );
}

/// A daemon's new data directory is its owner's only: the stores hold every task's
/// arguments and results (it was 0755 under umask 022, like the store's files).
#[test]
fn data_directories_are_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let c = common::gateway::Cluster::start(vec![common::Daemon::agent(&[])], &[]);
    for (daemon, dir) in [(&c.gateway, "gateway-data"), (&c.agents[0], "agent-data")] {
        let path = daemon.dir().join(dir);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{}: {mode:o}", path.display());
    }
}
