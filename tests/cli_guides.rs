//! The command line as a new user meets it: output into a pipe that closes early,
//! `arpcp up` stopping with a task running, negative numbers, flags before the
//! subcommand, `--wait` with `--timeout` and Ctrl-C, errors that say what to do,
//! shell completions, human durations and the gateway's configuration file.

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use arpcp::pb;
use common::gateway::{assert_task_status, gateway_args, submit_req, Cluster, Gw};
use common::{run_to_exit, tempdir, wait_for, wait_until, Daemon, ARPCP, STARTUP_TIMEOUT, WAIT};
use serde_json::{json, Value};

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `arpcp ARGS` in `dir` with stdout and stderr going to files there.
fn spawn_cli(dir: &Path, args: &[&str], name: &str) -> Child {
    let file = |suffix: &str| {
        Stdio::from(
            std::fs::File::create(dir.join(format!("{name}.{suffix}"))).expect("create a file"),
        )
    };
    Command::new(ARPCP)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(file("out"))
        .stderr(file("err"))
        .env("NO_COLOR", "1")
        .spawn()
        .expect("start the arpcp binary")
}

fn read(dir: &Path, file: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.join(file)).unwrap_or_default()).into_owned()
}

/// Waits for a child this test started, killing it (by its pid) at the deadline.
fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("query the child's status") {
            return s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("arpcp still ran after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `arpcp ARGS` with its stdout a pipe whose reading end is closed before the
/// command prints anything (`arpcp tasks | head -0`); returns its status and stderr.
fn run_with_stdout_closed(dir: &Path, args: &[&str]) -> (ExitStatus, String) {
    let err = dir.join("closed.err");
    let mut child = Command::new(ARPCP)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(&err).expect("create stderr file"),
        ))
        .spawn()
        .expect("start the arpcp binary");
    drop(child.stdout.take());
    let status = wait_child(&mut child, CLI_TIMEOUT);
    (status, read(dir, "closed.err"))
}

fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {pid}");
}

/// The task id a `--wait` printed on stderr.
fn id_in(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == '`')
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_string)
}

fn cli_ok(dir: &Path, args: &[&str]) -> String {
    let (status, out, err) = run_to_exit(dir, args, CLI_TIMEOUT);
    assert!(
        status.success(),
        "arpcp {args:?} failed ({status}): {out}\n{err}"
    );
    out
}

/// Every printing command, `--wait` included, ends quietly when its reader went
/// away, with its own exit status (0, or 1 for a task that failed), never a panic.
#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let dir = tempdir();
    let url = c.gateway.grpc_url();
    c.gw.submit_ok("add", json!([1, 2]));
    for (args, code) in [
        (vec!["tasks", "--gateway", &url], 0),
        (vec!["tasks", "--json", "--gateway", &url], 0),
        (vec!["agents", "--gateway", &url], 0),
        (vec!["procedures", "--gateway", &url], 0),
        (
            vec!["submit", "add", "1", "2", "--wait", "--gateway", &url],
            0,
        ),
        (
            vec!["submit", "div", "1", "0", "--wait", "--gateway", &url],
            1,
        ),
        (vec!["submit", "add", "1", "2", "--gateway", &url], 0),
        (vec!["completions", "bash"], 0),
    ] {
        let (status, err) = run_with_stdout_closed(dir.path(), &args);
        assert!(!err.contains("panicked"), "arpcp {args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "arpcp {args:?}: {err}");
        assert_eq!(
            status.code(),
            Some(code),
            "arpcp {args:?} ended with {status}: {err}"
        );
    }
}

/// `arpcp up` stopped while a task runs: the agent stops first, its grace period
/// lets the task finish and the gateway, still up, records the result.
#[test]
fn up_stops_its_agent_first_so_running_tasks_are_delivered() {
    let mut up = Daemon::spawn(&[
        "up",
        "--grpc",
        "127.0.0.1:0",
        "--arpcp",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/up-data",
        "--no-demo",
    ]);
    let gw = Gw::connect_url(&up.grpc_url());
    let id = wait_for(STARTUP_TIMEOUT, "the local agent to take a task", || {
        gw.submit(submit_req("sleep", json!([2])))
            .ok()
            .map(|r| r.task_id)
    });
    gw.wait_status(&id, pb::TaskStatus::Running, WAIT);
    drop(gw);
    let t0 = Instant::now();
    up.sigterm();
    let status = up.wait_exit(Duration::from_secs(40)).expect("up stops");
    // A figure for the record, not a check.
    eprintln!("up stopped {:?} after SIGTERM", t0.elapsed());
    assert!(status.success(), "{status}\n{}", up.stderr());

    // What the store kept: a gateway alone on the same data.
    let gateway = Daemon::spawn_in(
        up.shared_dir(),
        &[
            "gateway",
            "--grpc",
            "127.0.0.1:0",
            "--arpcp",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/up-data/gateway",
        ],
    );
    let t = Gw::connect(&gateway).task(&id);
    assert_task_status(&t, pb::TaskStatus::Done);
}

/// Negative numbers are arguments, and the common flags go before or after the
/// subcommand.
#[test]
fn negative_numbers_and_flags_anywhere() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let dir = tempdir();
    let url = c.gateway.grpc_url();
    let out = cli_ok(
        dir.path(),
        &["submit", "sub", "5", "-3", "--wait", "--gateway", &url],
    );
    assert_eq!(out.trim(), "8");
    let out = cli_ok(
        dir.path(),
        &["submit", "add", "-1.5", "-2", "--wait", "--gateway", &url],
    );
    assert_eq!(out.trim(), "-3.5");

    let out = cli_ok(
        dir.path(),
        &[
            "--gateway",
            &url,
            "--json",
            "submit",
            "mul",
            "6",
            "-7",
            "--wait",
        ],
    );
    let t: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(t["result"], -42, "{t}");
    let out = cli_ok(dir.path(), &["--json", "--gateway", &url, "tasks"]);
    let t: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert!(t["tasks"].as_array().is_some_and(|a| a.len() == 3), "{t}");
    let out = cli_ok(dir.path(), &["agents", "--json", "--gateway", &url]);
    assert!(out.contains(c.id(0)), "{out}");
}

/// `--wait` names the task on stderr first, gives up after `--timeout` saying how
/// to follow the task, and on Ctrl-C says the same; the task goes on both times.
#[test]
fn wait_names_the_task_times_out_and_survives_ctrl_c() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let dir = tempdir();
    let url = c.gateway.grpc_url();

    let (status, out, err) = run_to_exit(
        dir.path(),
        &["submit", "add", "2", "3", "--wait", "--gateway", &url],
        CLI_TIMEOUT,
    );
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(out.trim(), "5");
    let id = id_in(&err).unwrap_or_else(|| panic!("a task id on stderr: {err:?}"));
    assert_task_status(&c.gw.task(&id), pb::TaskStatus::Done);
    // Not a terminal: no progress bar drawn into the file.
    assert!(!err.contains('\r') && !err.contains('%'), "{err:?}");

    let (status, out, err) = run_to_exit(
        dir.path(),
        &[
            "submit",
            "sleep",
            "30",
            "--wait",
            "--timeout",
            "1s",
            "--gateway",
            &url,
        ],
        CLI_TIMEOUT,
    );
    assert!(!status.success(), "{out}\n{err}");
    assert!(out.is_empty(), "{out}");
    let id = id_in(&err).unwrap_or_else(|| panic!("a task id on stderr: {err:?}"));
    assert!(
        err.contains(&format!("arpcp watch {id}")) && err.contains("goes on"),
        "{err}"
    );
    assert!(!is_final(&c.gw.task(&id)), "the task still runs");
    c.gw.cancel(&id).expect("cancel the task");

    // Ctrl-C while waiting.
    let mut child = spawn_cli(
        dir.path(),
        &["submit", "sleep", "30", "--wait", "--gateway", &url],
        "ctrlc",
    );
    let id = wait_for(WAIT, "the task id on stderr", || {
        id_in(&read(dir.path(), "ctrlc.err"))
    });
    c.gw.wait_status(&id, pb::TaskStatus::Running, WAIT);
    send_signal(child.id(), libc::SIGINT);
    let status = wait_child(&mut child, WAIT);
    let err = read(dir.path(), "ctrlc.err");
    assert_eq!(status.code(), Some(130), "{status}: {err}");
    assert!(
        err.contains(&format!("arpcp watch {id}")) && err.contains("goes on"),
        "{err}"
    );
    assert_task_status(&c.gw.task(&id), pb::TaskStatus::Running);

    // `result --wait` stops waiting on Ctrl-C the same way.
    let mut child = spawn_cli(
        dir.path(),
        &["result", &id, "--wait", "--gateway", &url],
        "result",
    );
    // Its first line on stderr comes once it listens for Ctrl-C.
    wait_until(WAIT, "result --wait to say it waits", || {
        read(dir.path(), "result.err").contains("waiting for task")
    });
    send_signal(child.id(), libc::SIGINT);
    assert_eq!(wait_child(&mut child, WAIT).code(), Some(130));
    assert_task_status(&c.gw.task(&id), pb::TaskStatus::Running);
    c.gw.cancel(&id).expect("cancel the task");
}

/// `submit --wait` rides out a restart of the gateway: the task is durable, so it
/// asks again once the gateway is back and shows the result (it gave up at once,
/// with no word of the task going on).
#[test]
fn wait_rides_out_a_gateway_restart() {
    let mut c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let dir = tempdir();
    let url = c.gateway.grpc_url();
    let mut child = spawn_cli(
        dir.path(),
        &[
            "submit",
            "sleep",
            "2",
            "--wait",
            "--json",
            "--gateway",
            &url,
        ],
        "restart",
    );
    let id = wait_for(WAIT, "the task id on stderr", || {
        id_in(&read(dir.path(), "restart.err"))
    });
    c.gw.wait_status(&id, pb::TaskStatus::Running, WAIT);
    c.gateway.kill9();
    c.gateway.restart_on_same_ports();
    let status = wait_child(&mut child, CLI_TIMEOUT);
    let (out, err) = (
        read(dir.path(), "restart.out"),
        read(dir.path(), "restart.err"),
    );
    assert!(status.success(), "{status}: {out}\n{err}");
    assert!(err.contains("lost the gateway"), "{err}");
    let shown: Value = serde_json::from_str(out.trim()).expect("the task as JSON");
    assert_eq!(shown["task_id"], id.as_str(), "{out}");
    assert_eq!(shown["status"], "done", "{out}");
}

fn is_final(t: &pb::Task) -> bool {
    common::gateway::is_final(t.status)
}

/// Each error says what to do about it.
#[test]
fn errors_say_what_to_do() {
    let c = Cluster::start(vec![Daemon::agent(&[])], &[]);
    let dir = tempdir();
    let url = c.gateway.grpc_url();

    // No gateway there.
    let nobody = format!("http://{}", common::reserve_port());
    let (status, _, err) = run_to_exit(dir.path(), &["agents", "--gateway", &nobody], CLI_TIMEOUT);
    assert!(!status.success());
    assert!(
        err.contains("is it running?") && err.contains("arpcp up") && err.contains("ARPCP_GATEWAY"),
        "{err}"
    );

    // A port in use names the flag to change.
    let held = c.gateway.addr("grpc");
    let (status, _, err) = run_to_exit(
        dir.path(),
        &[
            "gateway",
            "--grpc",
            &held,
            "--arpcp",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/g2",
        ],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    assert!(err.contains("--grpc") && err.contains("in use"), "{err}");
    let held = c.agents[0].arpcp();
    let (status, _, err) = run_to_exit(
        dir.path(),
        &[
            "up",
            "--grpc",
            "127.0.0.1:0",
            "--arpcp",
            "127.0.0.1:0",
            "--agent-listen",
            &held,
            "--data-dir",
            "{dir}/up",
        ],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    assert!(
        err.contains("--agent-listen") && err.contains("in use"),
        "{err}"
    );

    // A data directory another process holds.
    let refused = Daemon::run_until_ready_or_exit(c.gateway.shared_dir(), &gateway_args(&[]))
        .err()
        .expect("a second gateway on the same data directory refuses to start");
    assert!(
        refused.stderr.contains("another arpcp is using")
            && refused.stderr.contains("gateway-data")
            && !refused.stderr.contains("Os {"),
        "{}",
        refused.stderr
    );

    // An unknown procedure: the near names and where to see them all.
    for args in [
        vec!["submit", "ad", "1", "2", "--gateway", &url],
        vec!["describe", "slep", "--gateway", &url],
    ] {
        let (status, _, err) = run_to_exit(dir.path(), &args, CLI_TIMEOUT);
        assert!(!status.success());
        assert!(err.contains("arpcp procedures"), "{err}");
        let near = if args[0] == "submit" { "add" } else { "sleep" };
        assert!(err.contains(&format!("did you mean {near:?}")), "{err}");
    }

    // A bad --status lists the good ones.
    let (status, _, err) = run_to_exit(
        dir.path(),
        &["tasks", "--status", "finished", "--gateway", &url],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    for s in [
        "queued",
        "running",
        "done",
        "failed",
        "cancelled",
        "interrupted",
    ] {
        assert!(err.contains(s), "{s} in {err}");
    }
}

/// `arpcp completions SHELL` prints a script the shell accepts.
#[test]
fn completions_for_bash_zsh_fish() {
    let dir = tempdir();
    let bash = cli_ok(dir.path(), &["completions", "bash"]);
    assert!(
        bash.contains("submit") && bash.contains("--gateway"),
        "{bash}"
    );
    std::fs::write(dir.path().join("arpcp.bash"), &bash).expect("write");
    let out = Command::new("bash")
        .arg("-c")
        .arg("source ./arpcp.bash && complete -p arpcp")
        .current_dir(dir.path())
        .output()
        .expect("run bash");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("arpcp"),
        "{out:?}"
    );
    assert!(cli_ok(dir.path(), &["completions", "zsh"]).starts_with("#compdef arpcp"));
    assert!(cli_ok(dir.path(), &["completions", "fish"]).contains("complete -c arpcp"));
    let (status, _, err) = run_to_exit(dir.path(), &["completions", "tcsh"], CLI_TIMEOUT);
    assert!(!status.success() && err.contains("bash"), "{err}");
}

/// Durations in human form, the old flags still accepted, and the gateway's TOML
/// file under its flags.
#[test]
fn human_durations_and_the_gateway_config_file() {
    let agent = Daemon::agent(&["--grace", "2s", "--keep-finished", "1h"]);
    // The old spellings still work.
    let old = Daemon::agent(&["--grace-secs", "2", "--keep-finished-secs", "3600"]);
    // The agent's file takes them in human form too, and refuses both spellings at once.
    let from_file =
        common::gateway::agent_with_config("grace = \"2s\"\nkeep_finished = \"1d\"\n", &[]);
    assert!(from_file.ready()["arpcp"].is_string());
    let both = common::dir_with_agent_config("grace = \"2s\"\ngrace_secs = 2\n");
    let refused = Daemon::run_until_ready_or_exit(
        both,
        &common::agent_args(&["--config", "{dir}/agent.toml"]),
    )
    .err()
    .expect("an agent file with grace and grace_secs is refused");
    assert!(
        refused.stderr.contains("grace") && refused.stderr.contains("not both"),
        "{}",
        refused.stderr
    );
    let dir = tempdir();
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!(
            "grpc = \"127.0.0.1:0\"\narpcp = \"127.0.0.1:0\"\ndata_dir = \"{}/from-file\"\n\
             agents = [\"{}\"]\necho_interval = \"150ms\"\nretention = \"7d\"\nmax_misses = 2\n",
            dir.path().display(),
            agent.arpcp()
        ),
    )
    .expect("write the configuration");
    // The flag wins over the file.
    let gateway = Daemon::spawn_in(
        dir.clone(),
        &[
            "gateway",
            "--config",
            "{dir}/gateway.toml",
            "--data-dir",
            "{dir}/from-flag",
            "--agent",
            &old.arpcp(),
        ],
    );
    assert!(dir.path().join("from-flag").exists());
    assert!(!dir.path().join("from-file").exists());
    let gw = Gw::connect(&gateway);
    gw.wait_alive(2, STARTUP_TIMEOUT);
    let id = gw.submit_ok("add", json!([2, 2]));
    assert_task_status(&gw.wait_final(&id, WAIT), pb::TaskStatus::Done);

    // Unknown keys name the key and the file; bad durations name the flag.
    std::fs::write(dir.path().join("bad.toml"), "retention_days = 3\n").expect("write");
    let (status, _, err) = run_to_exit(
        dir.path(),
        &["gateway", "--config", "{dir}/bad.toml"],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    assert!(
        err.contains("retention_days") && err.contains("bad.toml"),
        "{err}"
    );
    let (status, _, err) = run_to_exit(
        dir.path(),
        &[
            "gateway",
            "--grpc",
            "127.0.0.1:0",
            "--arpcp",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/x",
            "--retention",
            "7 fortnights",
        ],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    assert!(err.contains("--retention"), "{err}");
    let (status, _, err) = run_to_exit(
        dir.path(),
        &[
            "gateway",
            "--grpc",
            "127.0.0.1:0",
            "--arpcp",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/x",
            "--echo-interval",
            "0s",
        ],
        CLI_TIMEOUT,
    );
    assert!(!status.success());
    assert!(err.contains("--echo-interval"), "{err}");

    // Addresses the gateway is to reach, and the misses, are checked at start: a
    // typo would otherwise show only as echoes failing at debug level, for ever.
    for (flag, value, says) in [
        ("--agent", "nohostport", "no port"),
        ("--agent", "127.0.0.1:99999", "from 1 to 65535"),
        ("--agent", "a b:7018", "a space"),
        ("--agent", "::1:7018", "in brackets"),
        ("--advertise", "bogus", "no port"),
        ("--max-misses", "0", "at least 1"),
    ] {
        let args = gateway_args(&[flag, value]);
        let (status, _, err) = run_to_exit(dir.path(), &args, CLI_TIMEOUT);
        assert!(!status.success(), "{flag} {value} was taken");
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
    // A gateway started on a file holding `text`: refused, its stderr.
    let refused_file = |text: &str| {
        std::fs::write(dir.path().join("refused.toml"), text).expect("write");
        let args = [
            "gateway",
            "--config",
            "{dir}/refused.toml",
            "--data-dir",
            "{dir}/y",
        ];
        let (status, _, err) = run_to_exit(dir.path(), &args, CLI_TIMEOUT);
        assert!(!status.success(), "{text} was taken");
        err
    };
    let err = refused_file("agents = [\"10.0.0.5\"]\n");
    assert!(
        err.contains("agents (in the --config file)") && err.contains("10.0.0.5"),
        "{err}"
    );
    // A listener's address from the file is named as the file's key (it said --grpc).
    let err = refused_file("grpc = \"nope\"\n");
    assert!(
        err.contains("grpc in ") && err.contains("refused.toml"),
        "{err}"
    );
    assert!(!err.contains("--grpc"), "{err}");
}

/// sled's page cache is the daemons' to size: `--store-cache` and `store_cache` in
/// either file, in human units, with the bounds named when passed.
#[test]
fn store_cache_sizes() {
    let agent = Daemon::agent(&["--store-cache", "4MiB"]);
    let from_file = common::gateway::agent_with_config("store_cache = \"16 MiB\"\n", &[]);
    let c = common::gateway::Cluster::start(vec![agent, from_file], &["--store-cache", "2MiB"]);
    let id = c.gw.submit_ok("add", json!([2, 2]));
    assert_task_status(&c.gw.wait_final(&id, WAIT), pb::TaskStatus::Done);

    let dir = tempdir();
    let gateway = |extra: &[&str]| {
        let mut args = vec![
            "gateway",
            "--grpc",
            "127.0.0.1:0",
            "--arpcp",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}/x",
        ];
        args.extend_from_slice(extra);
        let (status, _, err) = run_to_exit(dir.path(), &args, CLI_TIMEOUT);
        assert!(!status.success(), "{extra:?} is refused");
        err
    };
    let err = gateway(&["--store-cache", "10"]);
    assert!(
        err.contains("--store-cache") && err.contains("minimum of 1MiB"),
        "{err}"
    );
    let err = gateway(&["--store-cache", "lots"]);
    assert!(
        err.contains("--store-cache") && err.contains("e.g. 64MiB"),
        "{err}"
    );
    std::fs::write(dir.path().join("big.toml"), "store_cache = \"1PiB\"\n").expect("write");
    let err = gateway(&["--config", "{dir}/big.toml"]);
    assert!(
        err.contains("store_cache") && err.contains("big.toml") && err.contains("limit of 64GiB"),
        "{err}"
    );
    let refused = Daemon::run_until_ready_or_exit(
        common::dir_with_agent_config("store_cache = 12\n"),
        &common::agent_args(&["--config", "{dir}/agent.toml"]),
    )
    .err()
    .expect("an agent file with a 12-byte cache is refused");
    assert!(
        refused.stderr.contains("store_cache") && refused.stderr.contains("minimum of 1MiB"),
        "{}",
        refused.stderr
    );
}
