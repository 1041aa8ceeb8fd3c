//! The example Opal models in `examples/opal/`, run as real processes and read with
//! the `arpcp::opal` library: the `--info` output becomes the expected schema, and a
//! scripted conversation (calculate, status polls) ends in a typed table or in the
//! model's own error. Every wait has a deadline; each test kills the model it started.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use arpcp::opal::{self, Answer, ParamType, Schema, Section};
use serde_json::{json, Map, Value as Json};

/// How long a model may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the trajectory model may take to finish at its defaults (~1.5 s expected).
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks of a model's stdout waiting to be read.
const STDOUT_CHUNKS: usize = 64;

fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/opal")
        .join(name)
}

fn info(name: &str) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new("python3")
        .arg(model(name))
        .arg("--info")
        .output()
        .expect("python3 runs (the example models need it)");
    assert!(
        status.success(),
        "{name} --info: {status}; {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).expect("--info output is UTF-8")
}

fn args(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        _ => panic!("arguments are an object"),
    }
}

/// A running model: requests go to its stdin, answers come off its stdout one
/// message at a time.
struct Model {
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: Receiver<Vec<u8>>,
    buf: String,
    closed: bool,
}

impl Model {
    fn start(name: &str) -> Model {
        let mut child = Command::new("python3")
            .arg(model(name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, chunks) = sync_channel(STDOUT_CHUNKS);
        std::thread::spawn(move || {
            let mut chunk = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                if tx.send(chunk[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Model {
            child,
            stdin,
            chunks,
            buf: String::new(),
            closed: false,
        }
    }

    fn send(&mut self, msg: &Section) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{}", opal::print(msg)).expect("the model reads its stdin");
        stdin.flush().expect("flush");
    }

    fn request(&mut self, what: &str) {
        self.send(&Section::new().with("request", opal::Value::Scalar(what.into())));
    }

    /// The next message, `None` if stdout ends first or nothing comes within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<Section> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((used, msg)) = opal::split_message(&self.buf).expect("answers parse") {
                self.buf.drain(..used);
                return Some(msg);
            }
            if self.closed {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(bytes) => self
                    .buf
                    .push_str(std::str::from_utf8(&bytes).expect("UTF-8 chunk")),
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
                Err(RecvTimeoutError::Timeout) => return None,
            }
        }
    }

    fn answer(&mut self) -> Answer {
        let msg = self.next(ANSWER_TIMEOUT).expect("an answer in time");
        opal::answer_of(&msg).expect("a well-formed answer")
    }

    /// Polls `status` until the model is done; returns the fractions seen on the way.
    fn poll_until_done(&mut self) -> (Vec<f64>, Answer) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no result within {RUN_TIMEOUT:?}"
            );
            self.request("status");
            match self.answer() {
                Answer::InProgress { percent, comment } => {
                    if let Some(p) = percent {
                        assert!((0.0..=1.0).contains(&p), "{p}");
                        assert!(comment.is_some(), "progress comes with a comment");
                        seen.push(p);
                    }
                    // Polling paced like the agent's poll interval, not to wait for a state.
                    std::thread::sleep(Duration::from_millis(50));
                }
                done => return (seen, done),
            }
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn trajectory_schema() -> Schema {
    opal::schema_from_info(&info("trajectory.py")).expect("trajectory --info parses")
}

#[test]
fn trajectory_info_is_the_seed_schema() {
    let s = trajectory_schema();
    let main: Vec<_> = s.main.iter().map(|p| (p.name.as_str(), p.ty)).collect();
    assert_eq!(
        main,
        [
            ("size", ParamType::Int),
            ("x", ParamType::Float),
            ("y", ParamType::Float),
            ("time", ParamType::Period)
        ]
    );
    assert_eq!(s.main[0].default, Some(json!(100)));
    assert_eq!(s.main[3].default, Some(json!("00:00 to 24:00")));
    assert_eq!(s.main[3].comment.as_deref(), Some("twenty-four hours"));
    let genetic = s.algorithm("genetic").expect("genetic");
    assert_eq!(genetic.params[0].choices, [json!("std"), json!("last")]);
    assert_eq!(genetic.params[1].name, "poplulation");
    let bellman = s.algorithm("bellman").expect("bellman");
    let ypart = bellman.params[1].partition.expect("ypart partition");
    assert_eq!((ypart.from, ypart.to, ypart.step), (0.0, 50.0, 0.5));
    assert!(bellman.params.iter().all(|p| p.default.is_some()));
    // The seed's own mismatch is caught against the real model's schema.
    let err = s
        .validate(&args(json!({"algo": {"genetic": {"population": 1200}}})))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "algo.genetic.population: unknown parameter; did you mean \"poplulation\"? known: method, poplulation"
    );
}

#[test]
fn trajectory_answers_info_on_stdin_with_the_same_schema() {
    let mut m = Model::start("trajectory.py");
    m.request("info");
    let msg = m.next(ANSWER_TIMEOUT).expect("an info answer");
    let from_stdin = opal::schema::schema_from_section(&msg).expect("a schema");
    assert_eq!(from_stdin.digest(), trajectory_schema().digest());
}

#[test]
fn trajectory_runs_with_defaults_reports_progress_and_returns_a_typed_table() {
    let s = trajectory_schema();
    let validated = s
        .validate(&args(json!({"algo": {"genetic": {}}})))
        .expect("defaults are valid");
    let mut m = Model::start("trajectory.py");
    m.send(&s.calculate_request(&validated));
    assert_eq!(
        m.answer(),
        Answer::InProgress {
            percent: None,
            comment: None
        }
    );
    let (seen, done) = m.poll_until_done();
    assert!(
        seen.iter().any(|&p| p > 0.0 && p < 1.0),
        "an intermediate progress was seen: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let Answer::Ready(table) = done else {
        panic!("expected a table, got {done:?}")
    };
    let cols: Vec<_> = table
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.ty))
        .collect();
    assert_eq!(
        cols,
        [
            ("time", ParamType::Datetime),
            ("x", ParamType::Float),
            ("y", ParamType::Float),
            ("u", ParamType::Float)
        ]
    );
    assert_eq!(table.columns[3].comment.as_deref(), Some("management"));
    assert_eq!(
        table.rows.len(),
        101,
        "size + 1 rows at the default size 100"
    );
    assert_eq!(
        table.rows[0],
        [json!("00:00"), json!(20.0), json!(0.0), json!(0.0)]
    );
    let last = table.rows.last().expect("rows");
    assert_eq!(last[0], json!("24:00"));
    // genetic steers to the origin: the point ends nearer to it than it started.
    let (x, y) = (last[1].as_f64().unwrap(), last[2].as_f64().unwrap());
    assert!(x.hypot(y) < 20.0, "ended at ({x}, {y})");
}

#[test]
fn trajectory_runs_bellman_with_the_callers_parameters() {
    let s = trajectory_schema();
    let validated = s
        .validate(&args(json!({
            "main": {"size": 12, "x": 0, "y": 0, "time": "00:00 to 48:00"},
            "algo": {"bellman": {"xpart": 10, "ypart": 2.5}}
        })))
        .expect("valid");
    let mut m = Model::start("trajectory.py");
    m.send(&s.calculate_request(&validated));
    assert!(matches!(m.answer(), Answer::InProgress { .. }));
    let (_, done) = m.poll_until_done();
    let Answer::Ready(table) = done else {
        panic!("expected a table, got {done:?}")
    };
    assert_eq!(table.rows.len(), 13);
    assert_eq!(
        table.rows[12][0],
        json!("48:00"),
        "hours past 24 in a datetime column"
    );
    let (x, y) = (
        table.rows[12][1].as_f64().unwrap(),
        table.rows[12][2].as_f64().unwrap(),
    );
    assert!(
        (x - 10.0).abs() < 0.5 && (y - 2.5).abs() < 0.5,
        "ended at ({x}, {y})"
    );
}

#[test]
fn error_model_answers_error_in_its_own_words() {
    let s = opal::schema_from_info(&info("error_model.py")).expect("schema");
    let validated = s.validate(&Map::new()).expect("defaults");
    let mut m = Model::start("error_model.py");
    m.send(&s.calculate_request(&validated));
    assert_eq!(
        m.answer(),
        Answer::Error("cannot divide by 0: the divisor must not be 0".into())
    );
}

#[test]
fn crash_model_exits_non_zero_with_its_reason_on_stderr() {
    let s = opal::schema_from_info(&info("crash_model.py")).expect("schema");
    let validated = s.validate(&Map::new()).expect("defaults");
    let mut m = Model::start("crash_model.py");
    m.send(&s.calculate_request(&validated));
    assert!(matches!(m.answer(), Answer::InProgress { .. }));
    assert_eq!(
        m.next(ANSWER_TIMEOUT),
        None,
        "stdout ends without another answer"
    );
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let status = loop {
        if let Some(status) = m.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the crash model did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(3));
    let mut stderr = String::new();
    m.child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(stderr.contains("simulated failure"), "{stderr}");
}

#[test]
fn hang_model_never_answers_status() {
    let s = opal::schema_from_info(&info("hang_model.py")).expect("schema");
    let validated = s.validate(&Map::new()).expect("defaults");
    let mut m = Model::start("hang_model.py");
    m.send(&s.calculate_request(&validated));
    assert!(matches!(m.answer(), Answer::InProgress { .. }));
    m.request("status");
    // Bounded: a second is far longer than the other models take to answer status.
    assert_eq!(m.next(Duration::from_secs(1)), None);
    assert_eq!(m.child.try_wait().expect("try_wait"), None, "still running");
}
