//! The agent's wire behaviour through a raw TCP client: every status code of the
//! protocol (§5) with a description that names what was wrong, framing (one-shot
//! and long connections, pipelining, `\n` / `\r\n`, a last line without
//! terminator), and robustness against over-long lines, garbage and floods.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::{assert_response, call, code, req, Conn, Daemon, IO_TIMEOUT};
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

fn agent_with_failing_command() -> Daemon {
    let dir = common::dir_with_agent_config(
        r#"
[[procedure]]
name = "fail"
command = ["sh", "-c", "echo 'cannot open input.csv' >&2; exit 3"]
"#,
    );
    Daemon::agent_in(dir, &["--config", "{dir}/agent.toml"])
}

/// One response per status code of the protocol, each description naming the
/// header, argument or value at fault.
///
/// 300 (internal error) is not triggered here: the agent answers it only when its
/// own store fails or it holds 100 000 unfinished tasks, neither of which a test
/// can cause honestly from outside. Its mapping is covered by the unit tests of
/// `src/arpcp/error.rs`.
#[test]
fn every_status_code_with_a_precise_description() {
    let agent = agent_with_failing_command();
    let mut c = Conn::connect(&agent.arpcp());

    // 100
    let r = c.request(&req::id());
    assert_response(&r, 100, &[]);
    assert!(r["code"].is_u64(), "code is sent as a JSON integer: {r}");

    // 200: not JSON, not an object, bad header types and values.
    let mut bad = |line: &[u8], needles: &[&str]| {
        let mut l = line.to_vec();
        l.push(b'\n');
        c.send_raw(&l);
        let r = c.recv();
        assert_response(&r, 200, needles);
    };
    bad(b"this is not json", &["not valid JSON"]);
    bad(b"{\"method\": \"ID\", ", &["not valid JSON"]);
    bad(b"[1, 2, 3]", &["JSON object", "an array"]);
    bad(b"\"ID\"", &["JSON object", "a string"]);
    bad(b"\xff\xfe{}", &["UTF-8"]);
    bad(
        br#"{"method":"GET","version":"1.0","atask_id":7}"#,
        &["`atask_id`", "a number"],
    );
    bad(
        br#"{"method":"ATASK","version":"1.0","remote_procedure":"add","remote_procedure_args":"2 3"}"#,
        &["`remote_procedure_args`", "an array"],
    );
    bad(
        br#"{"method":"ATASK","version":"1.0","remote_procedure":["add"],"remote_procedure_args":[]}"#,
        &["`remote_procedure`"],
    );
    bad(
        br#"{"method":"ATASK","version":"1.0","remote_procedure":"add","remote_procedure_args":[1,2],"reply_to":"nowhere"}"#,
        &["`reply_to`", "host:port"],
    );
    bad(
        br#"{"method":"SIGNAL","version":"1.0","atask_id":"t","atask_status":"finished"}"#,
        &["`atask_status`", "\"finished\""],
    );
    bad(
        br#"{"method":"TASK","version":"1.0","remote_procedure":"add","remote_procedure_args":[1,2],"timeout_ms":-5}"#,
        &["`timeout_ms`"],
    );

    // 201
    let r = c.request(&json!({"method": "FETCH", "version": "1.0"}));
    assert_response(&r, 201, &["\"FETCH\""]);

    // 202: method, version, and a method's own header.
    let r = c.request(&json!({"version": "1.0"}));
    assert_response(&r, 202, &["`method`"]);
    let r = c.request(&json!({"method": "ID"}));
    assert_response(&r, 202, &["`version`"]);
    let r = c.request(&json!({"method": "GET", "version": "1.0"}));
    assert_response(&r, 202, &["`atask_id`", "GET"]);
    let r = c.request(&json!({"method": "ATASK", "version": "1.0", "remote_procedure": "add"}));
    assert_response(&r, 202, &["`remote_procedure_args`", "ATASK"]);
    let r = c.request(&json!({"method": "SIGNAL", "version": "1.0", "atask_id": "t"}));
    assert_response(&r, 202, &["`atask_status`", "SIGNAL"]);

    // 203
    let r = c.request(&req::atask("no_such_procedure", json!([])));
    assert_response(&r, 203, &["\"no_such_procedure\""]);
    let r = c.request(&req::task("no_such_procedure", json!([])));
    assert_response(&r, 203, &["\"no_such_procedure\""]);

    // 204: wrong count and wrong type, for both ATASK (checked before answering)
    // and TASK.
    let r = c.request(&req::atask("add", json!([1])));
    assert_response(&r, 204, &["\"add\"", "takes 2 argument(s), got 1"]);
    let r = c.request(&req::task("add", json!([1, "2"])));
    assert_response(&r, 204, &["\"add\"", "argument 2", "number", "\"2\""]);
    let r = c.request(&req::task("add", json!({"a": 1, "b": 2})));
    assert_response(&r, 204, &["\"add\"", "named"]);

    // 205: unknown ids, and an id reused for another call.
    let r = c.request(&req::get("never-seen"));
    assert_response(&r, 205, &["\"never-seen\""]);
    let r = c.request(&req::signal("never-seen", "terminate"));
    assert_response(&r, 205, &["\"never-seen\""]);
    let r = c.request(&req::atask_with("reused", "add", json!([1, 2]), None));
    assert_response(&r, 100, &[]);
    let r = c.request(&req::atask_with("reused", "add", json!([1, 3]), None));
    assert_response(&r, 205, &["\"reused\"", "already used"]);

    // 206
    let r = c.request(&json!({"method": "ID", "version": "2.0"}));
    assert_response(&r, 206, &["\"2.0\"", "1.0"]);

    // 400: a failing built-in and a failing configured program.
    let r = c.request(&req::task("div", json!([1, 0])));
    assert_response(&r, 400, &["division by zero"]);
    let r = c.request(&req::task("fail", json!([])));
    assert_response(&r, 400, &["cannot open input.csv", "exit status 3"]);

    // The connection survived all of it.
    assert_response(&c.request(&req::id()), 100, &[]);

    // 200 for an over-long line closes the connection.
    let mut long = Conn::connect(&agent.arpcp());
    let _ = long.try_send_raw(&vec![b'x'; MIB + 16]);
    assert_response(&long.recv(), 200, &["longer than the limit"]);
    long.expect_closed(IO_TIMEOUT);
}

/// Headers the seed itself writes differently, and extra fields, are accepted.
#[test]
fn lenient_where_the_protocol_says_so() {
    let agent = Daemon::agent(&[]);
    let a = agent.arpcp();
    assert_response(
        &call(&a, &json!({"method": "id", "version": "1.0"})),
        100,
        &[],
    );
    assert_response(
        &call(
            &a,
            &json!({"method": "Task", "version": "ARPCP/1.0",
                          "remote_procedure": "add", "remote_procedure_args": [2, 3]}),
        ),
        100,
        &[],
    );
    let r = call(
        &a,
        &json!({"method": "TASK", "version": "1.0", "remote_procedure": "mul",
                "remote_procedure_args": [4, 5], "some_future_field": {"x": [1]}}),
    );
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"]["result"], 20);
}

/// The prototype's style: one request per connection, then close.
#[test]
fn one_shot_connections() {
    let agent = Daemon::agent(&[]);
    for i in 0..20 {
        let r = call(&agent.arpcp(), &req::task("add", json!([i, 1])));
        assert_response(&r, 100, &[]);
        assert_eq!(r["data"]["result"], i + 1);
    }
}

/// Many requests, one after another, on one connection.
#[test]
fn many_requests_on_one_connection() {
    let agent = Daemon::agent(&[]);
    let mut c = Conn::connect(&agent.arpcp());
    for i in 0..50 {
        let r = c.request(&req::task("sub", json!([i, 1])));
        assert_eq!(code(&r), 100, "{r}");
        assert_eq!(r["data"]["result"], i - 1);
    }
    assert_eq!(code(&c.request(&req::id())), 100);
}

/// Requests written in one go are answered in order.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let agent = Daemon::agent(&[]);
    let mut c = Conn::connect(&agent.arpcp());
    let reqs = [
        req::task("add", json!([1, 1])),
        req::get("pipelined-unknown"),
        req::task("sleep", json!([0.2])),
        req::id(),
        req::task("add", json!([2, 2])),
        json!({"method": "NOPE", "version": "1.0"}),
        req::task("echo", json!(["last"])),
    ];
    let mut bytes = Vec::new();
    for r in &reqs {
        bytes.extend_from_slice(r.to_string().as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    c.send_raw(&bytes);
    let got: Vec<Value> = (0..reqs.len()).map(|_| c.recv()).collect();
    let codes: Vec<u64> = got.iter().map(code).collect();
    assert_eq!(codes, [100, 205, 100, 100, 100, 201, 100], "{got:?}");
    assert_eq!(got[0]["data"]["result"], 2);
    assert_eq!(got[2]["data"]["result"], Value::Null);
    assert!(got[3]["data"]["procedures"].is_array(), "{}", got[3]);
    assert_eq!(got[4]["data"]["result"], 4);
    assert_eq!(got[6]["data"]["result"], json!(["last"]));
}

/// `\n` and `\r\n` both end a line, empty lines are skipped, and a last request
/// without terminator is answered once the client closes its sending side.
#[test]
fn line_endings_and_a_last_line_without_terminator() {
    let agent = Daemon::agent(&[]);
    let mut c = Conn::connect(&agent.arpcp());
    let a = req::task("add", json!([1, 2])).to_string();
    let b = req::task("add", json!([3, 4])).to_string();
    let d = req::task("add", json!([5, 6])).to_string();
    c.send_raw(format!("\r\n\n{a}\n\n{b}\r\n\r\n{d}").as_bytes());
    assert_eq!(c.recv()["data"]["result"], 3);
    assert_eq!(c.recv()["data"]["result"], 7);
    c.shutdown_write();
    let r = c.recv();
    assert_response(&r, 100, &[]);
    assert_eq!(r["data"]["result"], 11);
    c.expect_closed(IO_TIMEOUT);

    // The same with a single request and nothing else on the connection.
    let mut c = Conn::connect(&agent.arpcp());
    c.send_raw(req::id().to_string().as_bytes());
    c.shutdown_write();
    assert_response(&c.recv(), 100, &[]);
    c.expect_closed(IO_TIMEOUT);
}

/// A small deterministic generator, so a failure can be reproduced.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Garbage lines each get 200 and the connection stays usable; an over-long line
/// gets 200 and closes its connection; the agent keeps serving afterwards.
#[test]
fn garbage_and_over_long_lines() {
    let agent = Daemon::agent(&[]);
    let mut c = Conn::connect(&agent.arpcp());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut lines: Vec<Vec<u8>> = (0..200)
        .map(|_| {
            let len = 1 + (rng.next() % 300) as usize;
            let mut l: Vec<u8> = (0..len)
                .map(|_| rng.next() as u8)
                .filter(|&b| b != b'\n')
                .collect();
            // A line of only whitespace is skipped, not answered.
            l.push(b'#');
            l
        })
        .collect();
    lines.push(b"\0\0\0".to_vec());
    lines.push(b"{\"method\": \"ID\", \"version\": \"1.0\"".to_vec());
    lines.push(b"{\"method\": \"ID\", \"version\": \"1.0\"}}".to_vec());
    lines.push(b"null".to_vec());
    lines.push(b"123456789012345678901234567890".to_vec());
    lines.push("{\"method\": \"ID\", \"version\": \"1.0\", \"x\": \"\u{0}\"}".into());
    // Deep nesting must not overflow the agent's stack.
    lines.push([vec![b'['; 100_000], vec![b']'; 100_000]].concat());
    lines.push(
        [
            b"{\"method\":\"ID\",\"version\":\"1.0\",\"x\":".to_vec(),
            vec![b'{'; 50_000],
        ]
        .concat(),
    );
    for line in &lines {
        let mut l = line.clone();
        l.push(b'\n');
        c.send_raw(&l);
        let r = c.recv();
        assert_eq!(
            code(&r),
            200,
            "line {:?} got {r}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        );
    }
    assert_response(&c.request(&req::id()), 100, &[]);

    // Over-long, then more data: 200, and the connection closes.
    let mut long = Conn::connect(&agent.arpcp());
    let _ = long.try_send_raw(&vec![b'{'; 2 * MIB]);
    assert_response(&long.recv(), 200, &["longer than the limit"]);
    long.expect_closed(IO_TIMEOUT);

    // Exactly at the limit is still a line (and here, not JSON).
    let mut edge = Conn::connect(&agent.arpcp());
    let mut at_limit = vec![b'a'; MIB];
    at_limit.extend_from_slice(b"\r\n");
    edge.send_raw(&at_limit);
    assert_response(&edge.recv(), 200, &["not valid JSON"]);
    assert_response(&edge.request(&req::id()), 100, &[]);

    let mut agent = agent;
    assert!(agent.is_running(), "the agent died");
    assert_response(&call(&agent.arpcp(), &req::id()), 100, &[]);
}

/// Data without newlines, over many connections at once, does not make the agent
/// hold more than a bounded amount of memory (peak resident set, VmHWM).
#[test]
fn memory_stays_bounded_under_a_flood_without_newlines() {
    const FLOOD: usize = 16 * MIB;
    let agent = Daemon::agent(&[]);
    let addr = agent.arpcp();
    // Connections that stay just under the line limit: the agent must buffer them.
    let mut held: Vec<Conn> = (0..16)
        .map(|_| {
            let mut c = Conn::connect(&addr);
            c.send_raw(&vec![b'7'; MIB - 64]);
            c
        })
        .collect();
    // Connections that push far past it: the agent must cut them off.
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let chunk = vec![b'z'; 64 * 1024];
                let mut sent = 0;
                while sent < FLOOD {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                sent
            })
        })
        .collect();
    for f in floods {
        let sent = f.join().expect("flood thread");
        assert!(
            sent < FLOOD,
            "the agent kept reading a line far past its limit ({sent} bytes)"
        );
    }
    // Ending the held lines proves the agent buffered each of them whole.
    for c in &mut held {
        c.send_raw(b"\n");
        assert_response(&c.recv(), 200, &["not valid JSON"]);
        assert_response(&c.request(&req::id()), 100, &[]);
    }
    let peak_mib = common::peak_rss_kib(agent.pid()) / 1024;
    assert!(
        peak_mib < 200,
        "agent peaked at {peak_mib} MiB resident for about 20 MiB of unterminated input"
    );
    assert_response(&call(&addr, &req::id()), 100, &[]);
}
