//! The gateway's answers to wrong calls: gRPC status codes used precisely, with
//! messages naming the field or the thing that was not found; calls that reach an
//! agent and fail there end as tasks with the agent's ARPCP error code.

mod common;

use std::time::Duration;

use arpcp::pb;
use common::gateway::{
    assert_status, assert_task_status, describe, dur, pstruct, pv, submit_req, Cluster, Gw,
};
use common::{Daemon, WAIT};
use serde_json::json;
use tonic::Code;

fn one_agent() -> Cluster {
    Cluster::start(vec![Daemon::agent(&["--capacity", "2"])], &[])
}

fn nan() -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
    }
}

/// Requests with a wrong field are INVALID_ARGUMENT naming the field, and store
/// nothing.
#[test]
fn invalid_submits_name_the_field() {
    let c = one_agent();
    let gw = &c.gw;

    for p in ["", "   "] {
        assert_status(
            gw.submit(submit_req(p, json!([]))),
            Code::InvalidArgument,
            &["procedure"],
        );
    }
    let long = "p".repeat(300);
    assert_status(
        gw.submit(submit_req(&long, json!([]))),
        Code::InvalidArgument,
        &["procedure", "256"],
    );

    let mut r = submit_req("add", json!([1, 2]));
    r.kwargs = Some(pstruct(json!({"a": 1}).as_object().unwrap()));
    assert_status(gw.submit(r), Code::InvalidArgument, &["kwargs", "args"]);

    let mut r = submit_req("add", json!([1]));
    r.args.push(nan());
    assert_status(gw.submit(r), Code::InvalidArgument, &["args[1]", "finite"]);
    let mut r = submit_req("echo", json!([[1, 2]]));
    r.args.push(pv(&json!({"deep": [0]})));
    if let Some(prost_types::value::Kind::StructValue(s)) = &mut r.args[1].kind {
        s.fields.insert(
            "x".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(f64::INFINITY)),
            },
        );
    }
    assert_status(
        gw.submit(r),
        Code::InvalidArgument,
        &["args[1].x", "finite"],
    );

    // A bad number among named arguments names `kwargs`.
    let mut fields = pstruct(json!({"a": 1}).as_object().unwrap());
    fields.fields.insert("b".into(), nan());
    let r = pb::SubmitRequest {
        procedure: "echo".into(),
        kwargs: Some(fields),
        ..Default::default()
    };
    let e = gw.submit(r).expect_err("NaN in kwargs");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("kwargs") && e.message().contains("kwargs.b"),
        "the message should name the field `kwargs`: {:?}",
        e.message()
    );

    let mut r = submit_req("sleep", json!([0.1]));
    r.timeout = Some(dur(Duration::from_secs(5)));
    assert_status(
        gw.submit(r.clone()),
        Code::InvalidArgument,
        &["timeout", "sync"],
    );
    r.sync = true;
    r.timeout = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    assert_status(gw.submit(r.clone()), Code::InvalidArgument, &["timeout"]);
    r.timeout = Some(dur(Duration::from_secs(24 * 3600)));
    assert_status(gw.submit(r), Code::InvalidArgument, &["timeout"]);

    let listed = gw.list(pb::ListTasksRequest::default()).unwrap();
    assert!(
        listed.tasks.is_empty(),
        "refused calls store nothing: {:?}",
        listed.tasks
    );
}

/// Reads with a wrong field are INVALID_ARGUMENT naming it; unknown ids NOT_FOUND.
#[test]
fn invalid_reads_name_the_field_and_unknown_ids_are_not_found() {
    let c = one_agent();
    let gw = &c.gw;
    let id = gw.submit_ok("add", json!([1, 2]));
    gw.wait_final(&id, WAIT);

    let list = |r: pb::ListTasksRequest| gw.list(r);
    assert_status(
        list(pb::ListTasksRequest {
            page_size: -1,
            ..Default::default()
        }),
        Code::InvalidArgument,
        &["page_size"],
    );
    for token in ["not-a-token", "123", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"] {
        assert_status(
            list(pb::ListTasksRequest {
                page_token: token.into(),
                ..Default::default()
            }),
            Code::InvalidArgument,
            &["page_token"],
        );
    }
    for status in [42, -1, 9] {
        assert_status(
            list(pb::ListTasksRequest {
                status,
                ..Default::default()
            }),
            Code::InvalidArgument,
            &["status", &status.to_string()],
        );
    }
    // A large page size is capped, not refused.
    assert_eq!(
        list(pb::ListTasksRequest {
            page_size: 1_000_000,
            ..Default::default()
        })
        .unwrap()
        .tasks
        .len(),
        1
    );

    let wait = |w: prost_types::Duration| {
        gw.call("GetResult", |mut cl| {
            let id = id.clone();
            async move {
                cl.get_result(pb::GetResultRequest {
                    task_id: id,
                    wait: Some(w),
                })
                .await
            }
        })
    };
    assert_status(
        wait(dur(Duration::from_secs(601))),
        Code::InvalidArgument,
        &["wait"],
    );
    assert_status(
        wait(prost_types::Duration {
            seconds: -5,
            nanos: 0,
        }),
        Code::InvalidArgument,
        &["wait"],
    );
    assert!(
        wait(dur(Duration::from_secs(600))).is_ok(),
        "10 min is allowed"
    );

    let unknown = "0190aaaa-0000-7000-8000-000000000000";
    assert_status(gw.get(unknown), Code::NotFound, &[unknown]);
    assert_status(
        gw.get_wait(unknown, Duration::from_secs(1)),
        Code::NotFound,
        &[unknown],
    );
    assert_status(gw.cancel(unknown), Code::NotFound, &[unknown]);
    assert_status(gw.watch(unknown, WAIT), Code::NotFound, &[unknown]);
    assert_status(gw.get(""), Code::InvalidArgument, &["task_id"]);
    assert_status(gw.cancel(""), Code::InvalidArgument, &["task_id"]);
    assert_status(gw.watch(" ", WAIT), Code::InvalidArgument, &["task_id"]);

    // Ids and names past 256 bytes are refused as such, not looked up and echoed
    // back in an error too long for HTTP/2 (it reached the CLI as an h2 protocol
    // error).
    let long = "z".repeat(20_000);
    let too_long = ["at most 256 bytes, got 20000"];
    assert_status(gw.get(&long), Code::InvalidArgument, &too_long);
    assert_status(gw.cancel(&long), Code::InvalidArgument, &too_long);
    assert_status(gw.watch(&long, WAIT), Code::InvalidArgument, &too_long);
    let mut r = submit_req("add", json!([1, 2]));
    r.agent_id = long.clone();
    assert_status(
        gw.submit(r),
        Code::InvalidArgument,
        &["agent_id", too_long[0]],
    );
    for r in [
        pb::ListTasksRequest {
            procedure: long.clone(),
            ..Default::default()
        },
        pb::ListTasksRequest {
            agent_id: long.clone(),
            ..Default::default()
        },
    ] {
        assert_status(list(r), Code::InvalidArgument, &too_long);
    }
    // Filters are trimmed as Submit trims what it stores.
    let found = list(pb::ListTasksRequest {
        procedure: " add ".into(),
        ..Default::default()
    })
    .unwrap()
    .tasks;
    assert_eq!(found.len(), 1, "{found:?}");
}

/// Placement errors: an unknown procedure or agent is NOT_FOUND naming it; no
/// agent that could run it is UNAVAILABLE.
#[test]
fn placement_errors() {
    let c = one_agent();
    let gw = &c.gw;
    for sync in [false, true] {
        let mut r = submit_req("no_such_procedure", json!([]));
        r.sync = sync;
        assert_status(gw.submit(r), Code::NotFound, &["\"no_such_procedure\""]);

        let mut r = submit_req("add", json!([1, 2]));
        r.agent_id = "agent-77".into();
        r.sync = sync;
        assert_status(gw.submit(r), Code::NotFound, &["\"agent-77\""]);
    }

    // The only agent blacklisted: nobody can take the task.
    gw.blacklist(c.id(0)).unwrap();
    assert_status(
        gw.submit(submit_req("add", json!([1, 2]))),
        Code::Unavailable,
        &[],
    );
    gw.unblacklist(c.id(0)).unwrap();
    assert!(gw
        .list(pb::ListTasksRequest::default())
        .unwrap()
        .tasks
        .is_empty());
}

/// A gateway without agents refuses tasks with UNAVAILABLE.
#[test]
fn no_agents_is_unavailable() {
    let gateway = Daemon::gateway(&[]);
    let gw = Gw::connect(&gateway);
    assert!(gw.agents().is_empty());
    assert!(gw.procedures().is_empty());
    assert_status(
        gw.submit(submit_req("add", json!([1, 2]))),
        Code::Unavailable,
        &["agent"],
    );
    let mut r = submit_req("add", json!([1, 2]));
    r.sync = true;
    assert_status(gw.submit(r), Code::Unavailable, &["agent"]);

    // A gateway whose agents do not answer: the same.
    let silent = common::reserve_port();
    let gateway = Daemon::gateway(&["--agent", &silent]);
    let gw = Gw::connect(&gateway);
    assert_status(
        gw.submit(submit_req("add", json!([1, 2]))),
        Code::Unavailable,
        &[],
    );
}

/// Calls the agent refuses or fails end as tasks with the agent's code: wrong
/// arguments CLIENT_ERROR 204, an execution error FAILED 400.
#[test]
fn agent_errors_end_the_task_with_their_code() {
    let c = one_agent();
    let gw = &c.gw;
    for sync in [false, true] {
        for args in [json!([1]), json!([1, "x"]), json!([1, 2, 3])] {
            let mut r = submit_req("add", args.clone());
            r.sync = sync;
            let resp = gw.submit(r).expect("Submit is accepted; the agent refuses");
            let t = gw.wait_final(&resp.task_id, WAIT);
            assert_task_status(&t, pb::TaskStatus::ClientError);
            assert_eq!(t.error_code, 204, "add{args}: {}", describe(&t));
            assert!(t.error.contains("add"), "{}", describe(&t));
            assert!(t.result.is_none(), "{}", describe(&t));
        }
        let mut r = submit_req("div", json!([1, 0]));
        r.sync = sync;
        let id = gw.submit(r).unwrap().task_id;
        let t = gw.wait_final(&id, WAIT);
        assert_task_status(&t, pb::TaskStatus::Failed);
        assert_eq!(t.error_code, 400, "{}", describe(&t));
        assert!(t.error.to_lowercase().contains("zero"), "{}", describe(&t));
        assert!(t.result.is_none(), "{}", describe(&t));
    }

    // A sync call past its timeout ends promptly with the agent's error.
    let mut r = submit_req("sleep", json!([10]));
    r.sync = true;
    r.timeout = Some(dur(Duration::from_millis(300)));
    let began = std::time::Instant::now();
    let t = gw.submit(r).unwrap().task.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(
        t.status == pb::TaskStatus::Failed as i32 || t.status == pb::TaskStatus::Interrupted as i32,
        "{}",
        describe(&t)
    );
    assert!(t.error.contains("timed out"), "{}", describe(&t));
}
