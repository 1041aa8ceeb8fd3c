//! The gateway through grpcurl, as an operator would use it: reflection, health,
//! and the JSON forms of Submit, GetResult, ListAgents and an error.
//!
//! grpcurl comes from env `GRPCURL` (scripts/test.sh sets it). Without it the tests
//! skip, except under CI (env `CI` set), where they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{wait_for, Daemon, WAIT};
use serde_json::Value;

/// Longest a single grpcurl call may take.
const GRPCURL_MAX_SECS: &str = "20";

/// The grpcurl binary, or `None` when the test should be skipped.
fn grpcurl() -> Option<PathBuf> {
    match std::env::var_os("GRPCURL").filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "GRPCURL={} is not a file (scripts/test.sh sets it to the venv's grpcurl)",
                path.display()
            );
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("GRPCURL is not set: under CI the grpcurl tests must run (use scripts/test.sh)")
        }
        None => {
            println!("skipped: set GRPCURL (scripts/test.sh does)");
            None
        }
    }
}

/// A gateway, and optionally one agent announcing itself to it.
struct Cluster {
    grpc: String,
    _agent: Option<Daemon>,
    _gateway: Daemon,
}

impl Cluster {
    fn start(with_agent: bool) -> Cluster {
        let gateway = Daemon::gateway(&[]);
        let agent = with_agent.then(|| {
            // The agent offers the example Opal model too.
            let model = format!("{}/examples/opal/trajectory.py", env!("CARGO_MANIFEST_DIR"));
            let config = format!(
                "[[procedure]]\nname = \"trajectory\"\nkind = \"opal\"\ncommand = [\"python3\", \"{model}\"]\npoll_ms = 100\n"
            );
            common::gateway::agent_with_config(&config, &["--controller", &gateway.addr("arpcp")])
        });
        Cluster {
            grpc: gateway.addr("grpc"),
            _agent: agent,
            _gateway: gateway,
        }
    }
}

/// Runs grpcurl with `-plaintext` against `addr`; `data` is the request's JSON.
fn run(grpcurl: &Path, addr: &str, data: Option<&str>, rest: &[&str]) -> Output {
    let mut cmd = Command::new(grpcurl);
    cmd.args(["-plaintext", "-max-time", GRPCURL_MAX_SECS]);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    cmd.arg(addr).args(rest);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", grpcurl.display()))
}

/// Runs grpcurl and returns its stdout, failing the test when grpcurl fails.
fn ok(grpcurl: &Path, addr: &str, data: Option<&str>, rest: &[&str]) -> String {
    let out = run(grpcurl, addr, data, rest);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {rest:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a method with a JSON request and parses grpcurl's JSON answer.
fn call(grpcurl: &Path, addr: &str, method: &str, data: &str) -> Value {
    let out = ok(grpcurl, addr, Some(data), &[method]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method} answered non-JSON ({e}): {out}"))
}

#[test]
fn reflection_lists_and_describes_the_services_and_health_is_serving() {
    let Some(grpcurl) = grpcurl() else { return };
    let c = Cluster::start(false);

    let list = ok(&grpcurl, &c.grpc, None, &["list"]);
    let services: Vec<&str> = list.lines().map(str::trim).collect();
    assert!(services.contains(&"arpcp.v1.Gateway"), "{list}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{list}");

    let described = ok(&grpcurl, &c.grpc, None, &["describe", "arpcp.v1.Gateway"]);
    assert!(
        described.contains("arpcp.v1.Gateway is a service"),
        "{described}"
    );
    for rpc in [
        "Submit",
        "GetResult",
        "WatchTask",
        "ListAgents",
        "BlacklistAgent",
    ] {
        assert!(
            described.contains(&format!("rpc {rpc} (")),
            "{rpc} missing:\n{described}"
        );
    }

    let health = call(&grpcurl, &c.grpc, "grpc.health.v1.Health/Check", "{}");
    assert_eq!(health["status"], "SERVING", "{health}");
    let health = call(
        &grpcurl,
        &c.grpc,
        "grpc.health.v1.Health/Check",
        r#"{"service":"arpcp.v1.Gateway"}"#,
    );
    assert_eq!(health["status"], "SERVING", "{health}");
}

#[test]
fn submit_get_result_and_list_agents_in_json() {
    let Some(grpcurl) = grpcurl() else { return };
    let c = Cluster::start(true);

    let agent = wait_for(WAIT, "the agent to be alive", || {
        let agents = call(&grpcurl, &c.grpc, "arpcp.v1.Gateway/ListAgents", "{}");
        agents["agents"]
            .as_array()?
            .iter()
            .find(|a| a["state"] == "AGENT_STATE_ALIVE")
            .cloned()
    });
    let mac = agent["mac"].as_str().unwrap_or_default();
    assert_eq!(mac.len(), 17, "MAC as aa:bb:cc:dd:ee:ff: {agent}");
    assert_eq!(mac.matches(':').count(), 5, "{agent}");
    let ip = agent["ip"].as_str().unwrap_or_default();
    assert!(ip.parse::<std::net::IpAddr>().is_ok(), "ip: {agent}");
    assert!(agent["port"].as_u64().is_some_and(|p| p > 0), "{agent}");
    let agent_id = agent["agentId"].as_str().expect("agentId").to_string();

    let submitted = call(
        &grpcurl,
        &c.grpc,
        "arpcp.v1.Gateway/Submit",
        r#"{"procedure":"add","args":[2,3]}"#,
    );
    let task_id = submitted["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no taskId: {submitted}"))
        .to_string();

    let task = call(
        &grpcurl,
        &c.grpc,
        "arpcp.v1.Gateway/GetResult",
        &serde_json::json!({"taskId": task_id, "wait": "10s"}).to_string(),
    );
    assert_eq!(task["status"], "TASK_STATUS_DONE", "{task}");
    assert_eq!(task["result"], 5, "{task}");
    assert_eq!(task["taskId"], task_id.as_str(), "{task}");
    assert_eq!(task["agentId"], agent_id.as_str(), "{task}");
}

#[test]
fn a_bad_call_is_invalid_argument() {
    let Some(grpcurl) = grpcurl() else { return };
    let c = Cluster::start(false);

    let out = run(
        &grpcurl,
        &c.grpc,
        Some(r#"{"procedure":""}"#),
        &["arpcp.v1.Gateway/Submit"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an empty procedure was accepted");
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(stderr.contains("procedure"), "{stderr}");
}

/// The example Opal model as an operator reaches it with grpcurl: described,
/// refused with the path of a wrong parameter, run, its table read back as JSON.
#[test]
fn an_opal_model_in_json() {
    let Some(grpcurl) = grpcurl() else { return };
    let c = Cluster::start(true);
    let schema = wait_for(WAIT, "the model's schema", || {
        let out = run(
            &grpcurl,
            &c.grpc,
            Some(r#"{"procedure":"trajectory"}"#),
            &["arpcp.v1.Gateway/DescribeProcedure"],
        );
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["kind"] == "PROCEDURE_KIND_OPAL").then_some(v)
    });
    assert_eq!(schema["main"][0]["name"], "size", "{schema}");
    assert_eq!(schema["main"][0]["type"], "int", "{schema}");
    assert_eq!(schema["algorithms"][1]["name"], "bellman", "{schema}");

    let out = run(
        &grpcurl,
        &c.grpc,
        Some(r#"{"procedure":"trajectory","kwargs":{"algo":{"genetic":{"population":5}}}}"#),
        &["arpcp.v1.Gateway/Submit"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong parameter was accepted");
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(stderr.contains("algo.genetic.population"), "{stderr}");

    let submitted = call(
        &grpcurl,
        &c.grpc,
        "arpcp.v1.Gateway/Submit",
        r#"{"procedure":"trajectory","kwargs":{"main":{"size":20},"algo":{"genetic":{"method":"last"}}}}"#,
    );
    let task_id = submitted["taskId"].as_str().expect("taskId").to_string();
    let task = wait_for(WAIT, "the model's table", || {
        let t = call(
            &grpcurl,
            &c.grpc,
            "arpcp.v1.Gateway/GetResult",
            &serde_json::json!({"taskId": task_id, "wait": "5s"}).to_string(),
        );
        (t["status"] == "TASK_STATUS_DONE").then_some(t)
    });
    let table = &task["table"];
    assert_eq!(table["columns"][0]["name"], "time", "{task}");
    assert_eq!(table["columns"][1]["type"], "float", "{task}");
    assert_eq!(table["rows"].as_array().map(Vec::len), Some(21), "{task}");
    assert_eq!(table["rows"][0]["cells"][0], "00:00", "{task}");
}
