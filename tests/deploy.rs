//! The files of `deploy/` against the real binary: the systemd units pass
//! `systemd-analyze verify` and keep their hardening, the daemons their `ExecStart`
//! lines start (and the compose file's commands) form a cluster over mutual TLS, and
//! the Docker image builds where a Docker daemon runs. A tool that is not installed
//! (systemd-analyze, docker) makes its test print `SKIPPED: …` and pass.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use arpcp::pb;
use common::gateway::*;
use common::*;
use serde_json::json;

/// The repository: `deploy/` and `examples/` are read from here.
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Bound of one `systemd-analyze` or `docker info` run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of `docker build`: a release build from nothing, on a small machine.
const DOCKER_BUILD_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Bound of a `docker run` of the built image.
const DOCKER_RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The highest exposure `systemd-analyze security` may rate a unit, in tenths: 2.0,
/// well inside its "OK" band, so dropping a hardening option fails the test.
const MAX_EXPOSURE_TENTHS: &str = "20";
/// Bound of a task run in these tests (an Opal model takes about 1.5 s).
const TASK_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Running tools

/// Runs `program args` in `dir` to its end, within `timeout` (else it is killed and
/// the test fails). `None` when the program is not installed.
fn run_tool(
    program: &str,
    args: &[&str],
    dir: &Path,
    timeout: Duration,
) -> Option<(ExitStatus, String, String)> {
    run_tool_env(program, args, dir, timeout, &[])
}

/// `run_tool` with `env` added to the environment.
fn run_tool_env(
    program: &str,
    args: &[&str],
    dir: &Path,
    timeout: Duration,
    env: &[(&str, &str)],
) -> Option<(ExitStatus, String, String)> {
    // Files rather than pipes: a chatty `docker build` can never block on a full pipe.
    let out_path = dir.join(format!("{}.stdout", program.replace('/', "_")));
    let err_path = dir.join(format!("{}.stderr", program.replace('/', "_")));
    let spawned = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create a stdout file"))
        .stderr(File::create(&err_path).expect("create a stderr file"))
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("query the child's status") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} {args:?} still ran after {timeout:?}\n--- stderr ---\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into();
    Some((status, read(&out_path), read(&err_path)))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn python_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------
// systemd units

/// The binary the units start; a test points it at the binary under test.
const UNIT_BINARY: &str = "/usr/local/bin/arpcp";
/// Where the units find the cluster's certificates.
const UNIT_TLS_DIR: &str = "/etc/arpcp/tls";

struct Unit {
    name: &'static str,
    text: String,
}

impl Unit {
    fn load(name: &'static str) -> Unit {
        let path = Path::new(REPO).join("deploy/systemd").join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Unit { name, text }
    }

    /// Every value of `key=` in the unit, in order.
    fn values(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}=");
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().to_string())
            .collect()
    }

    /// The one value of `key=`; fails the test if there is none or several.
    fn value(&self, key: &str) -> String {
        let v = self.values(key);
        assert_eq!(
            v.len(),
            1,
            "{}: expected one {key}=, found {v:?}",
            self.name
        );
        v[0].clone()
    }

    /// `TimeoutStopSec=` as a duration (the units write it as `Ns`).
    fn timeout_stop(&self) -> Duration {
        let v = self.value("TimeoutStopSec");
        let secs = v
            .strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}: TimeoutStopSec={v} is not N s", self.name));
        Duration::from_secs(secs)
    }

    /// The `ExecStart=` argv as systemd would run it on a host whose state directory
    /// root (`%S`) is `state_root`, named `host` (`%H`), with `site` the variables of
    /// the `EnvironmentFile=` (which override `Environment=`). `${NAME}` is replaced
    /// inside a word; a word `$NAME` becomes the value's words, none when unset.
    fn exec_start(&self, state_root: &Path, host: &str, site: &[(&str, &str)]) -> Vec<String> {
        let specifiers = |s: &str| -> String {
            let mut out = String::new();
            let mut chars = s.chars();
            while let Some(c) = chars.next() {
                if c != '%' {
                    out.push(c);
                    continue;
                }
                match chars.next() {
                    Some('S') => out.push_str(path_str(state_root)),
                    Some('H') => out.push_str(host),
                    Some('%') => out.push('%'),
                    other => panic!("{}: specifier %{other:?} is not handled here", self.name),
                }
            }
            out
        };
        let mut env: HashMap<String, String> = HashMap::new();
        for e in self.values("Environment") {
            let (k, v) = e
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: Environment={e} is not NAME=VALUE", self.name));
            env.insert(k.to_string(), specifiers(v));
        }
        for (k, v) in site {
            env.insert(k.to_string(), v.to_string());
        }
        let line = self.value("ExecStart");
        // Quoting and escapes would need systemd's full word splitting; the units use none.
        assert!(
            !line.contains(['"', '\'', '\\']),
            "{}: ExecStart uses quotes or escapes this test does not parse: {line}",
            self.name
        );
        let mut argv = Vec::new();
        for word in specifiers(&line).split_whitespace() {
            if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
                if let Some(v) = env.get(name) {
                    argv.extend(v.split_whitespace().map(String::from));
                }
                continue;
            }
            let mut w = word.to_string();
            while let Some(start) = w.find("${") {
                let end = w[start..]
                    .find('}')
                    .unwrap_or_else(|| panic!("{}: unclosed ${{ in {word}", self.name));
                let name = w[start + 2..start + end].to_string();
                let value = env.get(&name).cloned().unwrap_or_default();
                w.replace_range(start..start + end + 1, &value);
            }
            argv.push(w);
        }
        argv
    }
}

/// Replaces the value of `flag` (`--flag VALUE` or `--flag=VALUE`) in `argv`;
/// returns the old value. Fails the test if the flag is absent.
fn set_flag(argv: &mut [String], flag: &str, value: &str) -> String {
    let with_eq = format!("{flag}=");
    for i in 0..argv.len() {
        if argv[i] == flag && i + 1 < argv.len() {
            return std::mem::replace(&mut argv[i + 1], value.to_string());
        }
        if let Some(old) = argv[i].strip_prefix(&with_eq).map(String::from) {
            argv[i] = format!("{flag}={value}");
            return old;
        }
    }
    panic!("{flag} not found in {argv:?}");
}

fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let with_eq = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&with_eq).map(String::from)
        }
    })
}

/// A copy of `unit` in `dir` whose `ExecStart` binary is the one under test (verify
/// refuses a unit whose binary does not exist), plus `extra` lines at its end.
fn unit_copy(dir: &Path, unit: &Unit, extra: &str) -> PathBuf {
    let path = dir.join(unit.name);
    let text = unit.text.replace(UNIT_BINARY, ARPCP) + extra;
    std::fs::write(&path, text).expect("write the unit copy");
    path
}

/// `systemd-analyze verify` finds nothing to say about either unit, and rates
/// each one's exposure at most `MAX_EXPOSURE_TENTHS`. verify exits 0 on unknown
/// keys and bad values alike, printing a line for each, so any output fails; a
/// copy with a misspelled key shows that such a line would be seen.
#[test]
fn the_systemd_units_verify_and_stay_hardened() {
    let dir = tempdir();
    let d = dir.path();
    for name in ["arpcp-gateway.service", "arpcp-agent.service"] {
        let unit = Unit::load(name);
        let path = unit_copy(d, &unit, "");
        let Some((status, out, err)) = run_tool(
            "systemd-analyze",
            &["verify", path_str(&path)],
            d,
            TOOL_TIMEOUT,
        ) else {
            println!("SKIPPED: systemd-analyze is not installed");
            return;
        };
        assert!(
            status.success() && err.trim().is_empty() && out.trim().is_empty(),
            "systemd-analyze verify {name}: {status}\n{out}{err}"
        );

        let broken_dir = d.join("broken");
        std::fs::create_dir_all(&broken_dir).unwrap();
        let broken = unit_copy(&broken_dir, &unit, "LockPersonalty=yes\n");
        let (_, out, err) = run_tool(
            "systemd-analyze",
            &["verify", path_str(&broken)],
            d,
            TOOL_TIMEOUT,
        )
        .expect("systemd-analyze ran a moment ago");
        assert!(
            format!("{out}{err}").contains("LockPersonalty"),
            "a misspelled key went unreported, so this check sees nothing: {out}{err}"
        );

        let threshold = format!("--threshold={MAX_EXPOSURE_TENTHS}");
        let (status, out, err) = run_tool(
            "systemd-analyze",
            &["security", "--offline=yes", &threshold, path_str(&path)],
            d,
            TOOL_TIMEOUT,
        )
        .expect("systemd-analyze ran a moment ago");
        if err.contains("--offline") || err.contains("--threshold") {
            println!("SKIPPED: this systemd-analyze cannot rate a unit file offline: {err}");
            continue;
        }
        let overall = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {name}:\n{out}{err}"));
        println!("{overall}");
        assert!(
            status.success(),
            "{name} is rated above {MAX_EXPOSURE_TENTHS} tenths: {overall}\n{out}"
        );
    }
}

/// The `ExecStart` lines are what the binary accepts and make a working cluster:
/// both daemons start from them (with the data directory under a temporary state
/// root, the certificates from `arpcp ca` in a temporary TLS directory and loopback
/// ports), the agent joins the gateway over mutual TLS, a task runs, and on SIGTERM
/// the agent gives a running task its grace period and exits within the unit's
/// `TimeoutStopSec`.
#[test]
fn the_units_exec_start_lines_run_a_tls_cluster() {
    let dir = tempdir();
    let d = dir.path();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read the host name")
        .trim()
        .to_string();
    // As deploy/README.md says: a CA, the gateway, this host's agent (the agent's
    // --tls-name defaults to the host name), and an operator's client certificate.
    let pki = d.join("tls");
    let pki_s = path_str(&pki);
    arpcp_ok(d, &["ca", "init", "--dir", pki_s]);
    arpcp_ok(
        d,
        &[
            "ca",
            "issue",
            "gateway",
            "--san",
            "127.0.0.1",
            "--dir",
            pki_s,
        ],
    );
    arpcp_ok(d, &["ca", "issue", "agent", &host, "--dir", pki_s]);
    arpcp_ok(
        d,
        &[
            "ca", "issue", "client", "ops", "--role", "operator", "--dir", pki_s,
        ],
    );
    let state = d.join("state");
    let gw_arpcp = reserve_port();

    let gw_unit = Unit::load("arpcp-gateway.service");
    let mut argv = gw_unit.exec_start(&state, &host, &[("ARPCP_ADVERTISE", &gw_arpcp)]);
    assert_eq!(argv[..2], [UNIT_BINARY, "gateway"]);
    assert_eq!(
        flag_value(&argv, "--data-dir").map(PathBuf::from),
        Some(state.join(gw_unit.value("StateDirectory"))),
        "the gateway's store must be its StateDirectory="
    );
    assert_eq!(set_flag(&mut argv, "--tls-dir", pki_s), UNIT_TLS_DIR);
    set_flag(&mut argv, "--grpc", "127.0.0.1:0");
    set_flag(&mut argv, "--arpcp", &gw_arpcp);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let gateway = Daemon::spawn_in(dir.clone(), &args);

    let agent_unit = Unit::load("arpcp-agent.service");
    let opts = format!("--controller {gw_arpcp}");
    let mut argv = agent_unit.exec_start(&state, &host, &[("ARPCP_AGENT_OPTS", &opts)]);
    assert_eq!(argv[..2], [UNIT_BINARY, "agent"]);
    assert_eq!(
        flag_value(&argv, "--data-dir").map(PathBuf::from),
        Some(state.join(agent_unit.value("StateDirectory"))),
        "the agent's store must be its StateDirectory="
    );
    assert_eq!(set_flag(&mut argv, "--tls-dir", pki_s), UNIT_TLS_DIR);
    set_flag(&mut argv, "--listen", "127.0.0.1:0");
    let grace: u64 = flag_value(&argv, "--grace-secs")
        .and_then(|g| g.parse().ok())
        .expect("the agent unit sets --grace-secs");
    let stop_timeout = agent_unit.timeout_stop();
    assert!(
        Duration::from_secs(grace) < stop_timeout,
        "TimeoutStopSec ({stop_timeout:?}) must exceed the agent's grace period ({grace} s)"
    );
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let mut agent = Daemon::spawn_in(dir.clone(), &args);

    let tls = client_tls(
        &pki.join("ca.pem"),
        Some((&pki.join("ops.pem"), &pki.join("ops-key.pem"))),
    );
    let gw = Gw::connect_tls(&gateway.grpcs_url(), tls);
    // The agent announces itself to its --controller: no --agent flag is needed.
    gw.wait_alive(1, WAIT);
    let t = gw.wait_final(&gw.submit_ok("add", json!([2, 3])), TASK_TIMEOUT);
    assert_eq!(result_of(&t), Some(json!(5)), "{}", describe(&t));

    let id = gw.submit_ok("sleep", json!([600]));
    gw.wait_status(&id, pb::TaskStatus::Running, WAIT);
    agent.sigterm();
    let status = agent.wait_exit(stop_timeout).unwrap_or_else(|| {
        panic!("the agent still ran {stop_timeout:?} after SIGTERM: systemd would SIGKILL it")
    });
    assert!(status.success(), "the agent stopped with {status}");
}

// ---------------------------------------------------------------------------
// compose.yaml

/// The `command:` list of each service of `deploy/compose.yaml`. A small reader
/// for the file's own layout (services at two spaces, `command:` at four, items
/// `- X` at six, a `- |` block at eight), not YAML at large: a layout it does not
/// know ends the test with a message rather than a wrong reading.
fn compose_commands(text: &str) -> HashMap<String, Vec<String>> {
    let mut commands: HashMap<String, Vec<String>> = HashMap::new();
    let mut in_services = false;
    let mut service: Option<String> = None;
    let mut items: Option<Vec<String>> = None;
    let mut block: Option<String> = None;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut finish =
        |service: &Option<String>, items: &mut Option<Vec<String>>, block: &mut Option<String>| {
            if let (Some(mut list), Some(s)) = (items.take(), service) {
                list.extend(block.take());
                commands.insert(s.clone(), list);
            }
        };
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            if let Some(b) = block.as_mut() {
                b.push('\n');
            }
            continue;
        }
        let n = indent(line);
        if let Some(b) = block.as_mut() {
            if n >= 8 {
                b.push_str(&line[8..]);
                b.push('\n');
                continue;
            }
            let done = block.take();
            items
                .as_mut()
                .expect("a block is inside a command")
                .extend(done);
        }
        if items.is_some() {
            if n == 6 {
                let item = line
                    .trim()
                    .strip_prefix("- ")
                    .unwrap_or_else(|| panic!("compose.yaml: a command item without '- ': {line}"));
                if item == "|" {
                    block = Some(String::new());
                } else {
                    items.as_mut().unwrap().push(item.to_string());
                }
                continue;
            }
            finish(&service, &mut items, &mut block);
        }
        if n == 0 {
            in_services = line.trim_end() == "services:";
            service = None;
        } else if in_services && n == 2 {
            let name = line.trim().split(':').next().unwrap_or_default();
            service = Some(name.to_string());
        } else if service.is_some() && n == 4 && line.trim() == "command:" {
            items = Some(Vec::new());
        } else if service.is_some() && n == 4 && line.trim().starts_with("command:") {
            panic!("compose.yaml: write commands as a list, one item a line: {line}");
        }
    }
    finish(&service, &mut items, &mut block);
    commands
}

/// Replaces, in every argument, each `from` by its `to` (longest first), and fails
/// the test if an address or path of the containers is left: every one must be
/// mapped to its loopback or temporary stand-in.
fn localise(argv: &[String], map: &[(&str, String)]) -> Vec<String> {
    let mut map: Vec<&(&str, String)> = map.iter().collect();
    map.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    argv.iter()
        .map(|a| {
            let mut a = a.clone();
            for (from, to) in &map {
                a = a.replace(from, to);
            }
            for left in [
                "0.0.0.0", "/etc/", "/var/", "/usr/", "gateway:", "agent-1:", "agent-2:",
            ] {
                assert!(
                    !a.contains(left),
                    "compose.yaml: {a} has {left} nobody mapped"
                );
            }
            a
        })
        .collect()
}

/// The compose file's commands, run as processes instead of containers: its `pki`
/// script makes the certificates (and a second run keeps them), the two agents and
/// the gateway start from their `command:` lists with the containers' names and
/// paths mapped to loopback ports and temporary directories, both agents join over
/// mutual TLS offering the image's Opal model, and tasks run on each. So the compose
/// file cannot drift from the CLI even where Docker is absent.
#[test]
fn the_compose_commands_run_a_tls_cluster() {
    let text = std::fs::read_to_string(Path::new(REPO).join("deploy/compose.yaml"))
        .expect("read deploy/compose.yaml");
    let commands = compose_commands(&text);
    let mut names: Vec<&String> = commands.keys().collect();
    names.sort();
    assert_eq!(names, ["agent-1", "agent-2", "gateway", "pki"]);

    let dir = tempdir();
    let d = dir.path();
    let pki = d.join("tls");
    std::fs::create_dir(&pki).unwrap();
    let pki_s = path_str(&pki).to_string();
    let bin_dir = Path::new(ARPCP).parent().expect("the binary's directory");
    let path = format!(
        "{}:{}",
        path_str(bin_dir),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = commands["pki"]
        .last()
        .expect("the pki service's script")
        .replace("/etc/arpcp/tls", &pki_s);
    let run_pki = || {
        let (status, out, err) = run_tool_env("sh", &["-ec", &script], d, WAIT, &[("PATH", &path)])
            .expect("sh is installed");
        assert!(status.success(), "the pki script failed: {out}\n{err}");
    };
    run_pki();
    let ca = std::fs::read(pki.join("ca.pem")).expect("the pki script wrote ca.pem");
    run_pki();
    assert_eq!(
        std::fs::read(pki.join("ca.pem")).unwrap(),
        ca,
        "a second `up` replaced the CA"
    );
    arpcp_ok(
        d,
        &[
            "ca", "issue", "client", "ops", "--role", "operator", "--dir", &pki_s,
        ],
    );

    // The image's agent.toml, pointing at the repository's copy of the model.
    let config = d.join("agent.toml");
    let baked = std::fs::read_to_string(Path::new(REPO).join("deploy/agent.toml")).unwrap();
    let opal = Path::new(REPO).join("examples/opal");
    std::fs::write(
        &config,
        baked.replace("/usr/share/arpcp/opal", path_str(&opal)),
    )
    .unwrap();

    let gw_arpcp = reserve_port();
    let base = |data: &str| -> Vec<(&str, String)> {
        let data_dir = d.join(data);
        vec![
            ("/etc/arpcp/tls", pki_s.clone()),
            ("/var/lib/arpcp", path_str(&data_dir).to_string()),
            ("/usr/share/arpcp/agent.toml", path_str(&config).to_string()),
            ("gateway:7019", gw_arpcp.clone()),
            ("0.0.0.0:7018", "127.0.0.1:0".to_string()),
        ]
    };
    let mut agents = Vec::new();
    for name in ["agent-1", "agent-2"] {
        let argv = localise(&commands[name], &base(name));
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        agents.push(Daemon::spawn_in(dir.clone(), &args));
    }
    let mut map = base("gateway");
    map.extend([
        ("0.0.0.0:50051", "127.0.0.1:0".to_string()),
        ("0.0.0.0:7019", gw_arpcp.clone()),
        ("agent-1:7018", agents[0].arpcp()),
        ("agent-2:7018", agents[1].arpcp()),
    ]);
    let argv = localise(&commands["gateway"], &map);
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let gateway = Daemon::spawn_in(dir.clone(), &args);

    let tls = client_tls(
        &pki.join("ca.pem"),
        Some((&pki.join("ops.pem"), &pki.join("ops-key.pem"))),
    );
    let gw = Gw::connect_tls(&gateway.grpcs_url(), tls);
    let listed = gw.wait_alive(2, WAIT);
    for a in &listed {
        let req = pb::SubmitRequest {
            agent_id: a.agent_id.clone(),
            ..submit_req("mul", json!([6, 7]))
        };
        let id = gw.submit(req).expect("Submit mul on one agent").task_id;
        let t = gw.wait_final(&id, TASK_TIMEOUT);
        assert_eq!(result_of(&t), Some(json!(42)), "{}", describe(&t));
    }
    if !python_available() {
        println!("SKIPPED (the Opal model part): python3 is not installed");
        return;
    }
    // Each agent's catalog reaches the gateway with the next echoes.
    wait_until(WAIT, "both agents offering trajectory", || {
        gw.procedures()
            .iter()
            .any(|p| p.name == "trajectory" && p.agent_ids.len() == 2)
    });
    let kwargs = json!({"main": {"size": 5}, "algo": {"genetic": {}}});
    let req = pb::SubmitRequest {
        kwargs: Some(pstruct(kwargs.as_object().unwrap())),
        ..submit_req("trajectory", json!([]))
    };
    let id = gw.submit(req).expect("Submit trajectory").task_id;
    let t = gw.wait_final(&id, TASK_TIMEOUT);
    assert_task_status(&t, pb::TaskStatus::Done);
}

// ---------------------------------------------------------------------------
// Docker

/// The image builds from `deploy/Dockerfile` and runs `arpcp` as a user other
/// than root, with python3 for Opal models. Skipped without a Docker daemon.
#[test]
fn the_docker_image_builds() {
    let dir = tempdir();
    let d = dir.path();
    match run_tool("docker", &["info"], d, TOOL_TIMEOUT) {
        Some((status, _, _)) if status.success() => {}
        _ => {
            println!("SKIPPED: docker daemon unavailable");
            return;
        }
    }
    let tag = format!("arpcp-deploy-test:{}", std::process::id());
    let (status, out, err) = run_tool(
        "docker",
        &["build", "-f", "deploy/Dockerfile", "-t", &tag, REPO],
        Path::new(REPO),
        DOCKER_BUILD_TIMEOUT,
    )
    .expect("docker ran a moment ago");
    assert!(status.success(), "docker build failed:\n{out}\n{err}");
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--rm"];
        all.extend_from_slice(args);
        let (status, out, err) =
            run_tool("docker", &all, d, DOCKER_RUN_TIMEOUT).expect("docker ran a moment ago");
        assert!(status.success(), "docker {all:?}: {status}\n{out}\n{err}");
        out
    };
    let help = run(&[&tag, "agent", "--help"]);
    assert!(
        help.contains("--tls-dir"),
        "arpcp agent --help in the image: {help}"
    );
    let uid = run(&["--entrypoint", "id", &tag, "-u"]);
    assert_ne!(uid.trim(), "0", "the image runs as root");
    run(&["--entrypoint", "python3", &tag, "--version"]);
    let _ = run_tool("docker", &["image", "rm", &tag], d, TOOL_TIMEOUT);
}
