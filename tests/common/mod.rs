//! Test harness shared by the integration tests: runs the real `arpcp` binary in a
//! temporary directory, talks raw ARPCP to it, and plays a fake controller that
//! records the SIGNALs agents send.
//!
//! Nothing here sleeps to synchronise: waiting is polling a condition against a
//! deadline, and every loop is bounded in time.
//!
//! Daemons log at `info,arpcp=debug` to a file in their directory; set
//! `ARPCP_TEST_LOG` to another filter to change that.

#![allow(dead_code)]

pub mod gateway;
pub mod ip;
pub mod netns;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

/// How long a daemon may take to print its ready line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound of one network exchange.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound for conditions that should come true quickly.
pub const WAIT: Duration = Duration::from_secs(10);
/// Lines of a daemon's stdout kept after its ready line.
pub const MAX_KEPT_STDOUT_LINES: usize = 10_000;

// ---------------------------------------------------------------------------
// Waiting

/// Polls `f` until it returns `Some`, at most `timeout`; panics naming `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Polls `cond` until it is true, at most `timeout`; panics naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// A fresh temporary directory, shareable between the processes of one test.
pub fn tempdir() -> Arc<TempDir> {
    Arc::new(
        tempfile::Builder::new()
            .prefix("arpcp-test-")
            .tempdir()
            .expect("create a temporary directory"),
    )
}

/// A temporary directory holding `agent.toml` with `toml` in it: start the agent
/// with `--config {dir}/agent.toml`.
pub fn dir_with_agent_config(toml: &str) -> Arc<TempDir> {
    let dir = tempdir();
    std::fs::write(dir.path().join("agent.toml"), toml).expect("write the configuration");
    dir
}

/// The procedures every agent offers.
pub const BUILTINS: [&str; 9] = [
    "add",
    "sub",
    "mul",
    "div",
    "echo",
    "sleep",
    "time",
    "memory_usage",
    "running_processes",
];

// ---------------------------------------------------------------------------
// Daemons

/// A running `arpcp` process. Each runs in a temporary directory (shared by the
/// processes a test restarts on the same data), its stderr goes to a file there,
/// and it is killed when dropped. If the test panics, its stderr is printed.
pub struct Daemon {
    dir: Arc<TempDir>,
    /// The program run: the `arpcp` binary, or a launcher that execs it.
    program: String,
    args: Vec<String>,
    child: Option<Child>,
    ready: Value,
    /// stderr files of every process started by this handle, oldest first.
    logs: Vec<PathBuf>,
    exit: Option<ExitStatus>,
    /// Lines the current process printed on stdout after its ready line.
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_to: StderrTo,
    /// The reading end of the current process's stderr, with `StderrTo::Pipe`.
    stderr_pipe: Option<ChildStderr>,
}

/// Where a daemon's stderr goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StderrTo {
    /// A file in the daemon's directory: `Daemon::stderr`, and printed if the test fails.
    File,
    /// A pipe nobody reads, held until `Daemon::close_stderr`: a test closes it to
    /// make every later write to stderr fail (EPIPE), as with `arpcp up 2>&1 | tee
    /// log` after `tee` was stopped. Until then the daemon blocks once it has
    /// logged a pipe's worth, so close it soon after the start.
    Pipe,
}

/// A process that exited before printing its ready line (see
/// `Daemon::run_until_ready_or_exit`).
#[derive(Debug)]
pub struct Refused {
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// The arguments of `Daemon::agent`: an agent on a free loopback port, its data in
/// `{dir}/agent-data`, then `extra`.
pub fn agent_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/agent-data",
    ];
    args.extend_from_slice(extra);
    args
}

/// Replaces `{dir}` in an argument with the test's directory.
fn expand(args: &[&str], dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy();
    args.iter().map(|a| a.replace("{dir}", &d)).collect()
}

fn log_path(dir: &Path) -> PathBuf {
    (0..10_000)
        .map(|i| dir.join(format!("daemon-{i}.stderr.log")))
        .find(|p| !p.exists())
        .expect("a free log file name")
}

/// The `arpcp` binary under test.
pub const ARPCP: &str = env!("CARGO_BIN_EXE_arpcp");

fn command(program: &str, args: &[String], stderr: Stdio) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .env("NO_COLOR", "1")
        .env(
            "RUST_LOG",
            std::env::var("ARPCP_TEST_LOG").unwrap_or_else(|_| "info,arpcp=debug".into()),
        );
    cmd
}

fn stderr_file(path: &Path) -> Stdio {
    Stdio::from(File::create(path).expect("create the daemon's stderr file"))
}

impl Daemon {
    /// Starts `arpcp ARGS` in a new temporary directory; `{dir}` in an argument
    /// stands for that directory.
    pub fn spawn(args: &[&str]) -> Daemon {
        Daemon::spawn_in(tempdir(), args)
    }

    /// Starts `arpcp ARGS` in `dir` (which may hold data of an earlier process).
    pub fn spawn_in(dir: Arc<TempDir>, args: &[&str]) -> Daemon {
        Daemon::spawn_cmd_in(dir, ARPCP, args)
    }

    /// Starts `PROGRAM ARGS` in a new temporary directory, for a launcher that
    /// execs `arpcp` in the same process (say `ip netns exec NS <ARPCP> agent ...`):
    /// the ready line is read and the process killed like `arpcp`'s own.
    pub fn spawn_cmd(program: &str, args: &[&str]) -> Daemon {
        Daemon::spawn_cmd_in(tempdir(), program, args)
    }

    fn spawn_cmd_in(dir: Arc<TempDir>, program: &str, args: &[&str]) -> Daemon {
        let mut d = Daemon::unstarted(dir, program, args, StderrTo::File);
        d.start();
        d
    }

    /// Starts `arpcp ARGS` in a new temporary directory with its stderr a pipe
    /// (`StderrTo::Pipe`): call `close_stderr` once the test wants it gone.
    pub fn spawn_with_stderr_pipe(args: &[&str]) -> Daemon {
        let mut d = Daemon::unstarted(tempdir(), ARPCP, args, StderrTo::Pipe);
        d.start();
        d
    }

    /// Starts `arpcp ARGS` in `dir` for a process that may refuse to start: the
    /// running daemon once it printed its ready line, or its exit status and stderr
    /// if it exited before. Fails the test if it does neither within
    /// `STARTUP_TIMEOUT` (+ `WAIT` to exit once it closed its stdout).
    pub fn run_until_ready_or_exit(dir: Arc<TempDir>, args: &[&str]) -> Result<Daemon, Refused> {
        let mut d = Daemon::unstarted(dir, ARPCP, args, StderrTo::File);
        match d.start_or_exit() {
            Ok(()) => Ok(d),
            Err(status) => Err(Refused {
                status,
                stderr: d.stderr(),
            }),
        }
    }

    fn unstarted(dir: Arc<TempDir>, program: &str, args: &[&str], stderr_to: StderrTo) -> Daemon {
        let args = expand(args, dir.path());
        Daemon {
            dir,
            program: program.to_string(),
            args,
            child: None,
            ready: Value::Null,
            logs: Vec::new(),
            exit: None,
            stdout: Arc::default(),
            stderr_to,
            stderr_pipe: None,
        }
    }

    /// An agent on a free loopback port, its data in `{dir}/agent-data`.
    pub fn agent(extra: &[&str]) -> Daemon {
        Daemon::agent_in(tempdir(), extra)
    }

    /// An agent in `dir` (say, one holding a configuration file the test wrote).
    pub fn agent_in(dir: Arc<TempDir>, extra: &[&str]) -> Daemon {
        Daemon::spawn_in(dir, &agent_args(extra))
    }

    fn start(&mut self) {
        if let Err(status) = self.start_or_exit() {
            self.fail_start(&format!("it exited with {status} before its ready line"));
        }
    }

    /// Starts the process and reads its ready line; `Err` with its exit status if
    /// it ended before printing one. Any other failure fails the test.
    fn start_or_exit(&mut self) -> Result<(), ExitStatus> {
        let stderr = match self.stderr_to {
            StderrTo::File => {
                let log = log_path(self.dir.path());
                let file = stderr_file(&log);
                self.logs.push(log);
                file
            }
            StderrTo::Pipe => Stdio::piped(),
        };
        let mut child = command(&self.program, &self.args, stderr)
            .current_dir(self.dir.path())
            .spawn()
            .expect("start the arpcp binary");
        self.stderr_pipe = child.stderr.take();
        let stdout = child.stdout.take().expect("the child's stdout");
        let (tx, rx) = mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        self.stdout = lines.clone();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut first = String::new();
            let r = std::io::BufRead::read_line(&mut reader, &mut first);
            let _ = tx.send(r.map(|_| first));
            // Keep draining so the daemon never blocks on a full pipe; keep the
            // first lines for `stdout_lines`.
            for line in std::io::BufRead::lines(reader) {
                let Ok(line) = line else { break };
                let mut kept = lock(&lines);
                if kept.len() < MAX_KEPT_STDOUT_LINES {
                    kept.push(line);
                }
            }
        });
        self.child = Some(child);
        self.exit = None;
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            // Its stdout closed without a ready line: it is on its way out.
            Ok(Ok(_)) => match self.wait_exit(WAIT) {
                Some(status) => return Err(status),
                None => self.fail_start(&format!(
                    "it closed stdout without printing its ready line and still ran {WAIT:?} later"
                )),
            },
            Ok(Err(e)) => self.fail_start(&format!("reading its stdout failed: {e}")),
            Err(_) => self.fail_start(&format!(
                "no ready line on stdout within {STARTUP_TIMEOUT:?}"
            )),
        };
        self.ready = match serde_json::from_str(line.trim()) {
            Ok(v @ Value::Object(_)) => v,
            _ => self.fail_start(&format!("its ready line is not a JSON object: {line:?}")),
        };
        Ok(())
    }

    /// Closes the reading end of a `StderrTo::Pipe` stderr: from now on every write
    /// the process makes to stderr fails (EPIPE).
    pub fn close_stderr(&mut self) {
        assert_eq!(
            self.stderr_to,
            StderrTo::Pipe,
            "close_stderr() needs a daemon started with its stderr a pipe"
        );
        drop(self.stderr_pipe.take());
    }

    /// Kills the process and fails the test; `Drop` prints the process's stderr.
    fn fail_start(&mut self, why: &str) -> ! {
        let _ = self.kill9();
        panic!("arpcp {:?} did not start: {why}", self.args);
    }

    /// What the current process printed on stdout after its ready line so far
    /// (the first `MAX_KEPT_STDOUT_LINES` lines).
    pub fn stdout_lines(&self) -> Vec<String> {
        lock(&self.stdout).clone()
    }

    /// The JSON line the process printed once it listened.
    pub fn ready(&self) -> &Value {
        &self.ready
    }

    /// An address from the ready line, e.g. `addr("arpcp")`.
    pub fn addr(&self, key: &str) -> String {
        match self.ready.get(key).and_then(Value::as_str) {
            Some(a) => a.to_string(),
            None => panic!("ready line {} has no address {key:?}", self.ready),
        }
    }

    /// The port of an address from the ready line.
    pub fn port(&self, key: &str) -> u16 {
        let addr = self.addr(key);
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("{addr:?} has no port"))
    }

    /// The ARPCP address of an agent.
    pub fn arpcp(&self) -> String {
        self.addr("arpcp")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory, to start another process on the same data.
    pub fn shared_dir(&self) -> Arc<TempDir> {
        self.dir.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a started process").id()
    }

    /// Everything the current process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.logs
            .last()
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned())
            .unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = child.try_wait().expect("query the child's status");
            }
        }
        self.exit
    }

    /// SIGKILL, then reaps the process (so its files and locks are released).
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit_status() {
            return status;
        }
        let child = self.child.as_mut().expect("a started process");
        let _ = child.kill();
        let status = child.wait().expect("reap the killed process");
        self.exit = Some(status);
        status
    }

    /// Sends SIGTERM (the graceful stop); see `wait_exit`.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `sig` to the process (say SIGSTOP to freeze it, SIGCONT to thaw it).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "signal {sig} to {pid}");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(s) = self.try_exit_status() {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// Like `restart`, but listens where the previous process did: port-0
    /// addresses of `--listen`, `--arpcp` and `--grpc` become the ports it got.
    pub fn restart_on_same_ports(&mut self) {
        for i in 1..self.args.len() {
            let key = match self.args[i - 1].as_str() {
                "--listen" | "--arpcp" => "arpcp",
                "--grpc" => "grpc",
                _ => continue,
            };
            if self.args[i].ends_with(":0") {
                self.args[i] = self.addr(key);
            }
        }
        self.restart();
    }

    /// Starts the same command again on the same directory. The previous process
    /// must have exited (use `kill9` or `sigterm` + `wait_exit` first).
    pub fn restart(&mut self) {
        assert!(
            self.try_exit_status().is_some(),
            "restart() needs the previous process to have exited"
        );
        self.start();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.kill9();
        }
        if std::thread::panicking() {
            for log in &self.logs {
                let text =
                    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
                let tail = tail_chars(&text, 16 * 1024);
                eprintln!(
                    "--- stderr of arpcp {:?} ({}) ---\n{tail}",
                    self.args,
                    log.display()
                );
            }
        }
    }
}

fn tail_chars(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs `arpcp ARGS` in `dir` as an operator would (`ca`, `token`, …) and returns
/// its stdout, failing the test if it does not succeed.
pub fn arpcp_ok(dir: &Path, args: &[&str]) -> String {
    let (status, out, err) = run_to_exit(dir, args, WAIT);
    assert!(status.success(), "arpcp {args:?} failed: {out}\n{err}");
    out
}

/// Waits until a daemon's log has a line with every one of `needles`.
pub fn wait_for_log(d: &Daemon, needles: &[&str]) {
    wait_until(WAIT, &format!("a log line with {needles:?}"), || {
        d.stderr()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    });
}

/// Runs `arpcp ARGS` in `dir` to its end (bounded by `timeout`, after which it is
/// killed and the test fails); returns its exit status, stdout and stderr.
pub fn run_to_exit(dir: &Path, args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let args = expand(args, dir);
    let log = log_path(dir);
    let mut child = command(ARPCP, &args, stderr_file(&log))
        .current_dir(dir)
        .spawn()
        .expect("start the arpcp binary");
    let mut stdout = child.stdout.take().expect("the child's stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("query the child's status") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "arpcp {args:?} still ran after {timeout:?}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = reader.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    (status, out, err)
}

// ---------------------------------------------------------------------------
// Processes (Linux /proc)

/// The state letter of a process (`R`, `S`, `Z`, ...), or `None` if it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    proc_stat(pid).map(|(state, _)| state)
}

/// (state, process group) from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// True if the process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn live_processes_in_group(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| matches!(proc_stat(pid), Some((s, g)) if g == pgid && s != 'Z' && s != 'X'))
        .collect()
}

/// Live processes whose environment holds `var` (`KEY=VALUE`), e.g. the programs an
/// agent started for one task (`ARPCP_ATASK_ID=<id>`).
pub fn processes_with_env(var: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == var.as_bytes()))
                && process_alive(pid)
        })
        .collect()
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// Peak resident memory of a process in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Waits for a file to hold a PID written by a test program (`echo $$ > file`).
pub fn wait_for_pid_file(path: &Path, timeout: Duration) -> u32 {
    wait_for(timeout, &format!("a PID in {}", path.display()), || {
        let text = std::fs::read_to_string(path).ok()?;
        text.strip_suffix('\n')?.trim().parse().ok()
    })
}

// ---------------------------------------------------------------------------
// Raw ARPCP client

/// A raw ARPCP connection: writes lines (or any bytes), reads response lines.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    addr: String,
}

impl Conn {
    pub fn connect(addr: &str) -> Conn {
        let sock = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("resolve {addr:?}"));
        let stream = TcpStream::connect_timeout(&sock, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        Conn {
            stream,
            buf: Vec::new(),
            addr: addr.to_string(),
        }
    }

    /// Writes `msg` as one line ending in `\r\n`.
    pub fn send(&mut self, msg: &Value) {
        let mut line = msg.to_string().into_bytes();
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line);
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes)
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.addr));
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.set_write_timeout(Some(IO_TIMEOUT))?;
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Closes our sending side (the peer reads end of stream).
    pub fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("shut down the writing side");
    }

    /// The next response line as JSON; panics on timeout, end of stream or non-JSON.
    pub fn recv(&mut self) -> Value {
        match self.try_recv_line(IO_TIMEOUT) {
            Ok(Some(line)) => serde_json::from_slice(&line).unwrap_or_else(|e| {
                panic!(
                    "response from {} is not JSON ({e}): {:?}",
                    self.addr,
                    String::from_utf8_lossy(&line)
                )
            }),
            Ok(None) => panic!("{} closed the connection instead of answering", self.addr),
            Err(e) => panic!("no response from {}: {e}", self.addr),
        }
    }

    /// The next non-empty line (terminator removed), `None` at end of stream.
    pub fn try_recv_line(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no complete line within {timeout:?}"),
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => {
                    // A last line without terminator.
                    let line = std::mem::take(&mut self.buf);
                    return Ok(Some(line));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one request and reads its response.
    pub fn request(&mut self, msg: &Value) -> Value {
        self.send(msg);
        self.recv()
    }

    /// Asserts the peer closes the connection (end of stream or reset) within
    /// `timeout` without sending anything more.
    pub fn expect_closed(&mut self, timeout: Duration) {
        match self.try_recv_line(timeout) {
            Ok(None) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
            Ok(Some(line)) => panic!(
                "expected {} to close the connection, got {:?}",
                self.addr,
                String::from_utf8_lossy(&line)
            ),
            Err(e) => panic!("expected {} to close the connection: {e}", self.addr),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// One request on a fresh connection that is closed after the response.
pub fn call(addr: &str, msg: &Value) -> Value {
    let mut c = Conn::connect(addr);
    let r = c.request(msg);
    let _ = c.stream.shutdown(Shutdown::Both);
    r
}

/// The `code` of a response, which must be a JSON integer.
pub fn code(resp: &Value) -> u64 {
    resp.get("code")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("response has no integer code: {resp}"))
}

/// Asserts a response's code and that its description names every `needle`.
pub fn assert_response(resp: &Value, want: u64, needles: &[&str]) {
    assert_eq!(code(resp), want, "unexpected code in {resp}");
    let desc = resp
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("response has no description: {resp}"));
    for n in needles {
        assert!(desc.contains(n), "description should mention {n:?}: {resp}");
    }
    assert!(resp.get("data").is_some(), "response has no data: {resp}");
}

/// Request builders (the wire form senders write).
pub mod req {
    use serde_json::{json, Value};

    pub fn id() -> Value {
        json!({"method": "ID", "version": "1.0"})
    }

    pub fn task(procedure: &str, args: Value) -> Value {
        json!({"method": "TASK", "version": "1.0",
               "remote_procedure": procedure, "remote_procedure_args": args})
    }

    /// ATASK without an id (the agent makes one) and without reply_to.
    pub fn atask(procedure: &str, args: Value) -> Value {
        json!({"method": "ATASK", "version": "1.0",
               "remote_procedure": procedure, "remote_procedure_args": args})
    }

    /// ATASK with a controller-chosen id and, optionally, where SIGNALs go.
    pub fn atask_with(id: &str, procedure: &str, args: Value, reply_to: Option<&str>) -> Value {
        let mut m = atask(procedure, args);
        m["atask_id"] = id.into();
        if let Some(r) = reply_to {
            m["reply_to"] = r.into();
        }
        m
    }

    pub fn get(id: &str) -> Value {
        json!({"method": "GET", "version": "1.0", "atask_id": id})
    }

    pub fn signal(id: &str, status: &str) -> Value {
        json!({"method": "SIGNAL", "version": "1.0", "atask_id": id, "atask_status": status})
    }
}

// ---------------------------------------------------------------------------
// Fake controller

struct Shared {
    received: Mutex<Vec<Value>>,
    arrived: Condvar,
    answer: Mutex<Value>,
    stop: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

/// A controller stand-in: records every request it receives (SIGNALs, and the ID an
/// agent announces itself with) in arrival order and answers each with a fixed
/// response (`100 OK` unless changed with `set_answer`).
pub struct FakeController {
    addr: String,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeController {
    /// Listens on a free loopback port.
    pub fn start() -> FakeController {
        FakeController::start_on("127.0.0.1:0")
    }

    /// Listens on `addr` (e.g. a port reserved earlier).
    pub fn start_on(addr: &str) -> FakeController {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("fake controller bind {addr}: {e}"));
        let addr = listener
            .local_addr()
            .expect("fake controller address")
            .to_string();
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            answer: Mutex::new(json!({"code": 100, "description": "OK", "data": null})),
            stop: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(clone) = stream.try_clone() {
                    lock(&s.streams).push(clone);
                }
                let s = s.clone();
                std::thread::spawn(move || serve_fake(stream, &s));
            }
        });
        FakeController {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// "127.0.0.1:PORT", for `reply_to` and `--controller`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Changes the response to later requests.
    pub fn set_answer(&self, answer: Value) {
        *lock(&self.shared.answer) = answer;
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<Value> {
        lock(&self.shared.received).clone()
    }

    /// The SIGNALs received for one task, in arrival order.
    pub fn signals(&self, atask_id: &str) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|m| is_signal(m) && m["atask_id"] == atask_id)
            .collect()
    }

    /// Waits up to `timeout` for a request matching `pred`; panics naming `what`.
    pub fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut got = lock(&self.shared.received);
        loop {
            if let Some(m) = got.iter().find(|m| pred(m)) {
                return m.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "fake controller: no {what} within {timeout:?}; received: {}",
                    Value::Array(got.clone())
                );
            }
            got = self
                .shared
                .arrived
                .wait_timeout(got, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for a SIGNAL with this task id and status.
    pub fn wait_signal(&self, atask_id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_for(timeout, &format!("SIGNAL {status} for {atask_id}"), |m| {
            is_signal(m) && m["atask_id"] == atask_id && m["atask_status"] == status
        })
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept, then end the connections.
        let _ = TcpStream::connect_timeout(
            &self.addr.parse().expect("fake controller address"),
            Duration::from_secs(1),
        );
        for s in lock(&self.shared.streams).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

pub fn is_signal(m: &Value) -> bool {
    m["method"]
        .as_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("SIGNAL"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve_fake(stream: TcpStream, s: &Shared) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        addr: "agent".into(),
    };
    // Bounded: the agent closes its connections or the controller's Drop ends them.
    while !s.stop.load(Ordering::SeqCst) {
        let line = match conn.try_recv_line(Duration::from_secs(3600)) {
            Ok(Some(line)) => line,
            _ => return,
        };
        let msg = serde_json::from_slice(&line)
            .unwrap_or_else(|_| json!({"unparsed": String::from_utf8_lossy(&line)}));
        lock(&s.received).push(msg);
        s.arrived.notify_all();
        let mut answer = lock(&s.answer).to_string().into_bytes();
        answer.extend_from_slice(b"\r\n");
        if writer.write_all(&answer).is_err() {
            return;
        }
    }
}

/// A loopback address nobody listens on right now (bound, then released).
pub fn reserve_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").to_string()
}

// ---------------------------------------------------------------------------
// Listeners that hold what they get

#[derive(Default)]
struct HeldState {
    open: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    per_port: Mutex<std::collections::BTreeMap<u16, usize>>,
    received: Mutex<Vec<(u16, Value)>>,
    answer: Mutex<Option<Value>>,
}

/// Loopback listeners standing for peers that take a connection and do not answer
/// (until `answer_with`): each connection stays open until the daemon closes it, so
/// the connections a daemon holds at once can be counted (`peak`).
pub struct HoldingListeners {
    pub ports: Vec<u16>,
    state: Arc<HeldState>,
    rt: tokio::runtime::Runtime,
}

impl HoldingListeners {
    pub fn start(n: usize) -> HoldingListeners {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the listeners");
        let state = Arc::new(HeldState::default());
        let ports = (0..n)
            .map(|_| {
                let l = rt
                    .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                    .expect("bind a loopback listener");
                let port = l.local_addr().expect("its address").port();
                let state = state.clone();
                rt.spawn(async move {
                    while let Ok((s, _)) = l.accept().await {
                        *state.per_port.lock().unwrap().entry(port).or_default() += 1;
                        let now = state.open.fetch_add(1, Ordering::SeqCst) + 1;
                        state.peak.fetch_max(now, Ordering::SeqCst);
                        let state = state.clone();
                        tokio::spawn(async move {
                            let (r, mut w) = s.into_split();
                            let mut lines = tokio::io::BufReader::new(r).lines();
                            while let Ok(Some(line)) = lines.next_line().await {
                                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                                    state.received.lock().unwrap().push((port, v));
                                }
                                let answer = state.answer.lock().unwrap().clone();
                                if let Some(a) = answer {
                                    let mut out = a.to_string().into_bytes();
                                    out.extend_from_slice(b"\r\n");
                                    if w.write_all(&out).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            state.open.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                });
                port
            })
            .collect();
        HoldingListeners { ports, state, rt }
    }

    /// `127.0.0.1:PORT` of each listener.
    pub fn addrs(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The most connections open at once so far, over all the listeners.
    pub fn peak(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }

    /// Connections received, per port.
    pub fn per_port(&self) -> std::collections::BTreeMap<u16, usize> {
        self.state.per_port.lock().unwrap().clone()
    }

    /// Every request line received that was JSON, with the port it came to.
    pub fn received(&self) -> Vec<(u16, Value)> {
        self.state.received.lock().unwrap().clone()
    }

    /// From now on, answers every request line with `answer`.
    pub fn answer_with(&self, answer: Value) {
        *self.state.answer.lock().unwrap() = Some(answer);
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}
