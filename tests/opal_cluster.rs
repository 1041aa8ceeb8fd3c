//! Opal models through the real agent and gateway: an agent declaring the example
//! models of `examples/opal/` (and one whose `--info` is broken), described, called
//! with validated parameters, watched while they report progress, and read back as
//! typed tables; failing, crashing and cancelled models.

mod common;

use std::time::Duration;

use arpcp::pb;
use common::gateway::{agent_with_config, assert_status, describe, pstruct, Cluster};
use common::{call, code, req, wait_until, FakeController, WAIT};
use serde_json::{json, Value};
use tonic::Code;

/// How long a model run may take in these tests (the trajectory takes ~1.5 s).
const RUN: Duration = Duration::from_secs(30);

fn model(name: &str) -> String {
    format!("{}/examples/opal/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// An agent configuration declaring the example models, polled every 100 ms.
fn models_config() -> String {
    let mut toml = String::new();
    for (name, file) in [
        ("trajectory", "trajectory.py"),
        ("failing", "error_model.py"),
        ("crashing", "crash_model.py"),
        ("hanging", "hang_model.py"),
    ] {
        toml += &format!(
            "[[procedure]]\nname = \"{name}\"\nkind = \"opal\"\ncommand = [\"python3\", \"{}\"]\npoll_ms = 100\n\n",
            model(file)
        );
    }
    // A model whose --info fails: logged and not offered, the agent starts anyway.
    toml += "[[procedure]]\nname = \"broken\"\nkind = \"opal\"\ncommand = [\"sh\", \"-c\", \"echo no schema here >&2; exit 3\"]\n";
    toml
}

fn python_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn submit_named(procedure: &str, kwargs: Value) -> pb::SubmitRequest {
    let Value::Object(m) = kwargs else {
        panic!("named arguments must be an object")
    };
    pb::SubmitRequest {
        procedure: procedure.into(),
        kwargs: Some(pstruct(&m)),
        ..Default::default()
    }
}

fn cluster() -> Cluster {
    Cluster::start(
        vec![agent_with_config(&models_config(), &["--capacity", "4"])],
        &["--echo-interval-ms", "200"],
    )
}

/// The cluster describes the model, refuses a call that does not fit its schema
/// (the seed's own `population` typo), runs one with its defaults, shows progress
/// while it runs and returns its table typed.
#[test]
fn a_model_is_described_validated_run_and_read_as_a_table() {
    if !python_available() {
        println!("SKIPPED: python3 is not installed");
        return;
    }
    let c = cluster();
    let gw = &c.gw;
    // The catalog reaches the gateway with the next echoes.
    let schema = common::wait_for(WAIT, "the model's schema", || {
        let r = gw.call("DescribeProcedure", |mut cl| async move {
            cl.describe_procedure(pb::DescribeProcedureRequest {
                procedure: "trajectory".into(),
            })
            .await
        });
        r.ok().filter(|s| s.kind == pb::ProcedureKind::Opal as i32)
    });
    let main: Vec<(&str, &str)> = schema
        .main
        .iter()
        .map(|p| (p.name.as_str(), p.r#type.as_str()))
        .collect();
    assert_eq!(
        main,
        [
            ("size", "int"),
            ("x", "float"),
            ("y", "float"),
            ("time", "period")
        ]
    );
    let algos: Vec<&str> = schema.algorithms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(algos, ["genetic", "bellman"]);
    let genetic = &schema.algorithms[0];
    let method = &genetic.parameters[0];
    assert_eq!(method.choices.len(), 2);
    assert!(!method.required);
    let xpart = &schema.algorithms[1].parameters[0];
    let part = xpart.partition.as_ref().expect("xpart has a partition");
    assert_eq!((part.from, part.to, part.step), (0.0, 100.0, 1.0));
    assert_eq!(schema.agent_ids, [c.id(0)]);

    // Kinds are listed; the broken model is not offered.
    let procs = gw.procedures();
    let kind_of = |n: &str| procs.iter().find(|p| p.name == n).map(|p| p.kind);
    assert_eq!(kind_of("trajectory"), Some(pb::ProcedureKind::Opal as i32));
    assert_eq!(kind_of("add"), Some(pb::ProcedureKind::Builtin as i32));
    assert_eq!(kind_of("broken"), None, "{procs:?}");
    let add = gw
        .call("DescribeProcedure", |mut cl| async move {
            cl.describe_procedure(pb::DescribeProcedureRequest {
                procedure: "add".into(),
            })
            .await
        })
        .expect("add is described");
    assert_eq!(add.kind, pb::ProcedureKind::Builtin as i32);

    // The seed's calculate request, typo and all, is refused with the path.
    let typo = json!({
        "main": {"size": 100, "x": 20.0, "y": 5.0, "time": "00:00 to 48:00"},
        "algo": {"genetic": {"method": "last", "population": 1200}},
    });
    let before = gw.list_all(pb::ListTasksRequest::default()).len();
    let r = gw.submit(submit_named("trajectory", typo));
    assert_status(
        r,
        Code::InvalidArgument,
        &["algo.genetic.population: unknown parameter", "poplulation"],
    );
    for (kwargs, needle) in [
        (
            json!({"main": {"size": "many"}, "algo": {"genetic": {}}}),
            "main.size",
        ),
        (
            json!({"algo": {"genetic": {"method": "best"}}}),
            "algo.genetic.method",
        ),
        (
            json!({"algo": {"bellman": {"xpart": 0.5}}}),
            "algo.bellman.xpart",
        ),
        (json!({"algo": {}}), "algo"),
        (json!({"algo": {"genetic": {}, "bellman": {}}}), "algo"),
    ] {
        let r = gw.submit(submit_named("trajectory", kwargs.clone()));
        assert_status(r, Code::InvalidArgument, &[needle]);
    }
    assert_eq!(
        gw.list_all(pb::ListTasksRequest::default()).len(),
        before,
        "nothing stored for a refused call"
    );

    // Defaults filled in; progress seen; a typed table at the end.
    let id = gw
        .submit(submit_named("trajectory", json!({"algo": {"genetic": {}}})))
        .expect("a valid call")
        .task_id;
    let updates = gw.watch(&id, RUN).expect("watch the run");
    assert!(
        updates.iter().any(|t| t
            .progress
            .as_ref()
            .is_some_and(|p| p.fraction > 0.0 && p.fraction < 1.0)),
        "an intermediate progress: {:?}",
        updates
            .iter()
            .map(|t| t.progress.clone())
            .collect::<Vec<_>>()
    );
    let t = gw.wait_final(&id, RUN);
    assert_eq!(t.status, pb::TaskStatus::Done as i32, "{}", describe(&t));
    let kwargs = t.kwargs.as_ref().expect("stored named arguments");
    assert!(
        kwargs.fields.contains_key("main"),
        "defaults filled in: {kwargs:?}"
    );
    let table = t.table.as_ref().expect("the result table");
    assert!(t.result.is_none(), "the table is the result");
    let cols: Vec<(&str, &str)> = table
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.r#type.as_str()))
        .collect();
    assert_eq!(
        cols,
        [
            ("time", "datetime"),
            ("x", "float"),
            ("y", "float"),
            ("u", "float")
        ]
    );
    assert_eq!(table.rows.len(), 101, "size 100: 101 rows");
    let first = &table.rows[0].cells;
    assert_eq!(common::gateway::jv(&first[0]), json!("00:00"));
    assert!(matches!(
        first[1].kind,
        Some(prost_types::value::Kind::NumberValue(_))
    ));
}

/// A model that answers an error, one that crashes and one that hangs: the first
/// two fail with the model's own words; cancelling the third kills its process.
#[test]
fn failing_crashing_and_cancelled_models() {
    if !python_available() {
        println!("SKIPPED: python3 is not installed");
        return;
    }
    let c = cluster();
    let gw = &c.gw;
    wait_until(WAIT, "the models' catalog", || {
        gw.procedures()
            .iter()
            .any(|p| p.name == "hanging" && p.kind == pb::ProcedureKind::Opal as i32)
    });
    let run = |procedure: &str| {
        gw.submit(submit_named(procedure, json!({})))
            .unwrap_or_else(|e| panic!("Submit {procedure}: {e:?}"))
            .task_id
    };
    let failing = run("failing");
    let crashing = run("crashing");
    let t = gw.wait_final(&failing, RUN);
    assert_eq!(t.status, pb::TaskStatus::Failed as i32, "{}", describe(&t));
    assert_eq!(t.error_code, 400);
    let t2 = gw.wait_final(&crashing, RUN);
    assert_eq!(
        t2.status,
        pb::TaskStatus::Failed as i32,
        "{}",
        describe(&t2)
    );
    assert!(
        t2.error.contains("stderr"),
        "the crash's stderr: {}",
        t2.error
    );
    println!("failing: {}\ncrashing: {}", t.error, t2.error);

    let hanging = run("hanging");
    gw.wait_status(&hanging, pb::TaskStatus::Running, WAIT);
    let mark = format!("ARPCP_ATASK_ID={hanging}.1");
    let pid = common::wait_for(WAIT, "the model's process", || {
        common::processes_with_env(&mark).into_iter().next()
    });
    gw.cancel(&hanging).expect("cancel");
    wait_until(WAIT, "the model's process to be killed", || {
        !common::process_alive(pid)
    });
}

/// Through raw ARPCP, as any controller would: named arguments validated before
/// 100 (204 with the path), progress in `accepted` SIGNALs, the table in GET.
#[test]
fn an_agent_runs_a_model_over_raw_arpcp() {
    if !python_available() {
        println!("SKIPPED: python3 is not installed");
        return;
    }
    let controller = FakeController::start();
    let agent = agent_with_config(&models_config(), &[]);
    let a = agent.arpcp();
    let r = call(
        &a,
        &req::atask_with(
            "m-bad",
            "trajectory",
            json!({"algo": {"genetic": {"population": 5}}}),
            Some(controller.addr()),
        ),
    );
    assert_eq!(code(&r), 204, "{r}");
    assert!(r["description"]
        .as_str()
        .is_some_and(|d| d.contains("algo.genetic.population")));
    let r = call(
        &a,
        &req::atask_with(
            "m-pos",
            "trajectory",
            json!([1, 2]),
            Some(controller.addr()),
        ),
    );
    assert_eq!(code(&r), 204, "{r}");

    let r = call(
        &a,
        &req::atask_with(
            "m-1",
            "trajectory",
            json!({"main": {"size": 30}, "algo": {"bellman": {"xpart": 10, "ypart": 5}}}),
            Some(controller.addr()),
        ),
    );
    assert_eq!(code(&r), 100, "{r}");
    controller.wait_signal("m-1", "done", RUN);
    let progress: Vec<f64> = controller
        .signals("m-1")
        .iter()
        .filter_map(|s| s["progress"]["percent"].as_f64())
        .collect();
    assert!(
        progress.iter().any(|p| *p > 0.0 && *p < 1.0),
        "intermediate progress: {progress:?}"
    );
    let got = call(&a, &req::get("m-1"));
    assert_eq!(code(&got), 100, "{got}");
    let result = &got["data"]["result"];
    assert_eq!(result["columns"][0]["name"], "time");
    assert_eq!(result["rows"].as_array().map(Vec::len), Some(31));
}

/// A model whose schema changed while its agent was away: calls are checked against
/// the schema the agents that can take them describe, not a gone agent's (every call
/// that fit the described schema was refused, and one without parameters got the old
/// default filled in).
#[test]
fn a_model_changed_while_its_agent_was_away_is_checked_against_the_new_schema() {
    if !python_available() {
        println!("SKIPPED: python3 is not installed");
        return;
    }
    // The same model under two schemas: `--info` says which, a run is `instant.py`.
    let declared = |info: &str| {
        let script = format!(
            "case \"$0\" in --info|-i) echo '{info}';; *) exec python3 {};; esac",
            model("instant.py")
        );
        format!(
            "[[procedure]]\nname = \"changing\"\nkind = \"opal\"\ncommand = [\"sh\", \"-c\", {}]\npoll_ms = 100\n",
            Value::String(script)
        )
    };
    let before = declared("main = { x = int default 1 }");
    let after = declared("main = { x = string choice [a, b] default a }");
    // Three agents knew the old schema (which catalog a lookup met first was a
    // matter of hash order).
    let mut c = Cluster::start(
        (0..3).map(|_| agent_with_config(&before, &[])).collect(),
        &["--echo-interval-ms", "100", "--max-misses", "1"],
    );
    let gw = &c.gw;
    wait_until(WAIT, "the model's catalog", || {
        gw.procedures().iter().any(|p| {
            p.name == "changing"
                && p.kind == pb::ProcedureKind::Opal as i32
                && p.agent_ids.len() == 3
        })
    });
    for i in 0..3 {
        c.agents[i].kill9();
    }
    for i in 0..3 {
        gw.wait_agent_state(c.id(i), pb::AgentState::Gone, WAIT);
    }

    // The model comes back changed, on another agent that announces itself.
    let controller = c.gateway.addr("arpcp");
    let _changed = agent_with_config(&after, &["--controller", &controller]);
    wait_until(WAIT, "the changed model described", || {
        gw.call("DescribeProcedure", |mut cl| async move {
            cl.describe_procedure(pb::DescribeProcedureRequest {
                procedure: "changing".into(),
            })
            .await
        })
        .is_ok_and(|s| s.main.first().is_some_and(|p| p.r#type == "string"))
    });
    for kwargs in [json!({"main": {"x": "b"}}), json!({})] {
        let id = gw
            .submit(submit_named("changing", kwargs.clone()))
            .unwrap_or_else(|e| panic!("Submit {kwargs}: {e:?}"))
            .task_id;
        let t = gw.wait_final(&id, RUN);
        assert_eq!(
            t.status,
            pb::TaskStatus::Done as i32,
            "{kwargs}: {}",
            describe(&t)
        );
    }
}

/// A model written as a shell script: `describe` answers `--info`, `run` runs it;
/// `extra` adds TOML lines to its declaration.
fn sh_model(name: &str, describe: &str, run: &str, extra: &str) -> String {
    let script = format!("case \"$0\" in --info|-i) {describe};; *) {run};; esac");
    format!(
        "[[procedure]]\nname = \"{name}\"\nkind = \"opal\"\ncommand = [\"sh\", \"-c\", {}]\n{extra}\n",
        Value::String(script)
    )
}

/// Starts an agent declaring `toml` and a gateway, waits for `model` to be offered,
/// runs it with its defaults and returns the ended task.
fn run_once(toml: &str, model: &str) -> pb::Task {
    let c = Cluster::start(
        vec![agent_with_config(toml, &[])],
        &["--echo-interval-ms", "200"],
    );
    let gw = &c.gw;
    wait_until(WAIT, "the model's catalog", || {
        gw.procedures()
            .iter()
            .any(|p| p.name == model && p.kind == pb::ProcedureKind::Opal as i32)
    });
    let id = gw
        .submit(submit_named(model, json!({})))
        .unwrap_or_else(|e| panic!("Submit {model}: {e:?}"))
        .task_id;
    gw.wait_final(&id, RUN)
}

/// `--info` of a model with one parameter.
const ONE_INT: &str = "echo 'main = { n = int default 1 }'";

/// A model's `int` is 64 bits, but a client receives numbers as doubles: a table
/// cell past 2^53 − 1 fails the task naming the cell, rather than reaching the
/// client as another number.
#[test]
fn an_int_cell_a_client_cannot_receive_exactly_fails_the_task() {
    // One row a line.
    let answer = "'{ answer = ok status = ready header = { i = int } table = {' \
                  '9007199254740991' '9007199254740993 } }'";
    let run = format!("head -c 1 >/dev/null; printf '%s\\n' {answer}");
    let t = run_once(&sh_model("big", ONE_INT, &run, "poll_ms = 100"), "big");
    assert_eq!(t.status, pb::TaskStatus::Failed as i32, "{}", describe(&t));
    assert!(
        t.error
            .contains("row 2, column i (int): 9007199254740993 is beyond"),
        "{}",
        t.error
    );
}

/// A model past its `timeout_secs` fails with its name and the end of its stderr,
/// as a crash does (it said only "timed out after 1s").
#[test]
fn a_timed_out_model_fails_with_its_last_words() {
    let run = "echo 'stuck at iteration 5, waiting for a lock' >&2; sleep 60";
    let t = run_once(
        &sh_model("stuck", ONE_INT, run, "timeout_secs = 1"),
        "stuck",
    );
    assert_eq!(t.status, pb::TaskStatus::Failed as i32, "{}", describe(&t));
    for words in ["\"stuck\"", "timed out after 1s", "stuck at iteration 5"] {
        assert!(t.error.contains(words), "{words} in {}", t.error);
    }
}

/// A model that exits cleanly without answering is said to have ended (the
/// message was only "cannot write to the model: Broken pipe").
#[test]
fn a_model_that_exits_without_answering_is_said_to_have_ended() {
    let t = run_once(&sh_model("quits", ONE_INT, "exit 0", ""), "quits");
    assert_eq!(t.status, pb::TaskStatus::Failed as i32, "{}", describe(&t));
    assert!(
        t.error.contains("ended, exit status: 0, without answering"),
        "{}",
        t.error
    );
}

/// Models slow to describe themselves are asked at once, not one after another:
/// four whose `--info` takes 3 s each delayed the agent's start by 12 s.
#[test]
fn slow_models_are_described_side_by_side_at_start() {
    let toml: String = (1..=4)
        .map(|i| {
            sh_model(
                &format!("slow{i}"),
                &format!("sleep 3; {ONE_INT}"),
                "exit 1",
                "",
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let agent = agent_with_config(&toml, &[]);
    let took = started.elapsed();
    // One after another is 12 s at least; side by side about 3 s. The bound between
    // leaves room for a loaded machine.
    assert!(
        took < Duration::from_secs(9),
        "the agent took {took:?} to start"
    );
    let c = Cluster::start(vec![agent], &["--echo-interval-ms", "200"]);
    wait_until(WAIT, "the four models offered", || {
        c.gw.procedures()
            .iter()
            .filter(|p| p.name.starts_with("slow") && p.kind == pb::ProcedureKind::Opal as i32)
            .count()
            == 4
    });
}

/// A table within the Opal limits can still be over a task's result limit (2 MiB
/// as JSON): the failure names the model (it named neither model nor table).
#[test]
fn a_table_over_the_result_limit_names_the_model() {
    // 5,000 rows of a 500-character cell: 2.5 MB, under the 4 MiB of a message.
    let cell = "x".repeat(500);
    let run = format!(
        "head -c 1 >/dev/null; echo '{{ answer = ok status = ready header = {{ s = string }} table = {{'; \
         i=0; while [ $i -lt 5000 ]; do echo {cell}; i=$((i+1)); done; echo '}} }}'"
    );
    let t = run_once(&sh_model("wide", ONE_INT, &run, ""), "wide");
    assert_eq!(t.status, pb::TaskStatus::Failed as i32, "{}", describe(&t));
    for words in [
        "Opal model \"wide\"",
        "too big for a task's result",
        "over the limit",
    ] {
        assert!(t.error.contains(words), "{words} in {}", t.error);
    }
}
