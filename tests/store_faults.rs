//! Faults around the daemons' stores and their stopping, each reproduced with the
//! real binary: a stderr pipe whose reader went away (the daemons still stop on
//! SIGTERM, and a second SIGTERM stops them at once), a full disk under the gateway
//! and under an agent (refused with the reason, healthy again once space is freed,
//! nothing stored lost), and a damaged gateway store (refused at start with a clear
//! message unless `--accept-damaged-store`; a `kill -9` is no damage).
//!
//! The disk-full tests mount a small tmpfs and need root; without it they print
//! `SKIPPED: …` and pass (under `CI=true` as root a failing mount fails the test).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arpcp::pb;
use common::gateway::{assert_task_status, describe, gateway_args, result_of, submit_req, Gw};
use common::{agent_args, code, req, tempdir, wait_for, wait_until, Daemon, Refused, WAIT};
use serde_json::{json, Value};
use tonic::Code;

/// How long a daemon may take to stop after SIGTERM when nothing holds it up.
const STOP_BOUND: Duration = Duration::from_secs(15);
/// How long a second SIGTERM may take to end a daemon that waits for a grace period
/// of `LONG_GRACE_SECS`.
const SECOND_SIGNAL_BOUND: Duration = Duration::from_secs(5);
const LONG_GRACE_SECS: &str = "120";
/// Size of the tmpfs the disk-full tests fill.
const TMPFS_SIZE: &str = "8m";
/// Bound of the writes that fill a disk and of the Submits that meet the full disk.
const MAX_FILL_CHUNKS: usize = 4096;
const MAX_SUBMITS_TO_FILL: usize = 400;
/// Tasks the damaged-store test stores before damaging it.
const DAMAGE_TASKS: usize = 300;
/// Bound of a task's way to its end after a restart or a full disk (it may wait for
/// the reconciliation of quiet tasks, 10 s).
const SETTLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Daemons whose stderr reader went away

/// An `arpcp` process whose stderr is a pipe the test closed after the ready line,
/// as with `arpcp up 2>&1 | tee log` after `tee` was stopped.
fn orphaned(args: &[&str]) -> Daemon {
    let mut d = Daemon::spawn_with_stderr_pipe(args);
    // The reading end goes away: from now on every write to stderr fails (EPIPE).
    d.close_stderr();
    d
}

/// Agent and gateway both stop on SIGTERM, with exit status 0, though every line
/// they log on the way fails to be written.
#[test]
fn sigterm_stops_daemons_whose_stderr_reader_is_gone() {
    let mut agent = orphaned(&agent_args(&[]));
    let agent_addr = agent.arpcp();
    let mut gateway = orphaned(&gateway_args(&["--agent", &agent_addr]));
    // The gateway works (and logs) with its stderr gone.
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);
    let id = gw.submit_ok("add", json!([2, 3]));
    assert_eq!(result_of(&gw.wait_final(&id, WAIT)), Some(json!(5)));

    for (name, d) in [("gateway", &mut gateway), ("agent", &mut agent)] {
        d.sigterm();
        let status = d
            .wait_exit(STOP_BOUND)
            .unwrap_or_else(|| panic!("the {name} still ran {STOP_BOUND:?} after SIGTERM"));
        assert!(status.success(), "the {name} exited with {status}");
    }
}

/// An agent waiting out a long grace period for a running task stops at once on a
/// second SIGTERM, with status 143 (128 + SIGTERM) and no panic.
#[test]
fn second_sigterm_ends_the_grace_period_at_once() {
    let mut agent = orphaned(&agent_args(&["--grace-secs", LONG_GRACE_SECS]));
    let addr = agent.arpcp();
    let r = common::call(&addr, &req::atask("sleep", json!([600])));
    assert_eq!(code(&r), 100, "{r}");
    let atask_id = r["data"]["atask_id"]
        .as_str()
        .expect("atask_id")
        .to_string();
    wait_until(WAIT, "the sleep task to run", || {
        common::call(&addr, &req::get(&atask_id))["data"]["running"] == json!(true)
    });
    // Once the shutdown has begun, new tasks are refused (the agent still serves
    // ARPCP through its grace period, so that its results can be collected). The
    // probe's id is fixed: accepted again before the shutdown, it is one cheap task.
    agent.sigterm();
    wait_until(WAIT, "the agent to refuse new tasks", || {
        let r = common::call(&addr, &req::atask_with("probe", "add", json!([1, 2]), None));
        code(&r) != 100 && r.to_string().contains("shutting down")
    });
    assert!(
        agent.wait_exit(Duration::ZERO).is_none(),
        "the agent should wait for its running task"
    );

    agent.sigterm();
    let status = agent.wait_exit(SECOND_SIGNAL_BOUND).unwrap_or_else(|| {
        panic!("the agent still ran {SECOND_SIGNAL_BOUND:?} after a second SIGTERM")
    });
    assert_eq!(status.code(), Some(143), "exit status {status}");
}

// ---------------------------------------------------------------------------
// A full disk

/// A tmpfs mounted on a directory; unmounted when dropped (declare it before the
/// daemons using it, so they are killed first).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `TMPFS_SIZE` on `dir`, or says why not (`None`: skip).
    fn mount(dir: &Path) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs {
                dir: dir.to_path_buf(),
            }),
            other => {
                let why = format!("mount -t tmpfs failed: {other:?}");
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{why}");
                }
                println!("SKIPPED: {why}");
                None
            }
        }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0x55u8; 64 * 1024];
        for _ in 0..MAX_FILL_CHUNKS {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                return path;
            }
        }
        panic!("{} did not fill up", self.dir.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn health(url: &str, rt: &tokio::runtime::Runtime) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let url = url.to_string();
    rt.block_on(async {
        tokio::time::timeout(WAIT, async {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .expect("a URL")
                .connect()
                .await
                .expect("connect for a health check");
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("Health/Check")
                .into_inner()
                .status
        })
        .await
        .expect("Health/Check within the bound")
    })
}

/// A payload that fills a disk quickly.
fn bulky(tag: &str) -> String {
    format!("{tag}-{}", "x".repeat(16 * 1024))
}

/// The gateway's disk fills up: Submit is refused as UNAVAILABLE naming the reason,
/// health says NOT_SERVING; once space is freed the gateway serves again by itself
/// and every task it accepted is there and ends DONE with its result.
#[test]
fn gateway_disk_full_then_freed() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempdir();
    let Some(disk) = Tmpfs::mount(&dir.path().join("gateway-data")) else {
        return;
    };
    let agent = Daemon::agent(&[]);
    let gateway = Daemon::gateway_in(dir.clone(), &["--agent", &agent.arpcp()]);
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);
    let url = gateway.grpc_url();

    let mut accepted: Vec<(String, Value)> = Vec::new();
    for i in 0..10 {
        let arg = json!(format!("before-{i}"));
        accepted.push((gw.submit_ok("echo", json!([arg.clone()])), arg));
    }
    for (id, _) in &accepted {
        gw.wait_final(id, WAIT);
    }
    assert_eq!(health(&url, gw.rt()), ServingStatus::Serving as i32);

    let filler = disk.fill();
    let mut refusal = None;
    for i in 0..MAX_SUBMITS_TO_FILL {
        let arg = json!(bulky(&format!("full-{i}")));
        match gw.submit(submit_req("echo", json!([arg.clone()]))) {
            Ok(r) => accepted.push((r.task_id, arg)),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("a Submit refused once the disk is full");
    assert!(
        matches!(refusal.code(), Code::Unavailable | Code::ResourceExhausted),
        "Submit on a full disk: {refusal:?}"
    );
    for needle in ["cannot write", "No space left on device"] {
        assert!(
            refusal.message().contains(needle),
            "the refusal should name {needle:?}: {refusal:?}"
        );
    }
    assert_eq!(
        health(&url, gw.rt()),
        ServingStatus::NotServing as i32,
        "health while the store cannot write"
    );
    let again = gw.submit(submit_req("echo", json!(["still full"])));
    assert!(
        matches!(&again, Err(e) if e.code() == Code::Unavailable || e.code() == Code::ResourceExhausted),
        "Submit while the disk is still full: {again:?}"
    );

    std::fs::remove_file(&filler).expect("free the disk");
    wait_until(WAIT, "health SERVING again after space was freed", || {
        health(&url, gw.rt()) == ServingStatus::Serving as i32
    });
    let after = wait_for(WAIT, "a Submit accepted after space was freed", || {
        gw.submit(submit_req("echo", json!(["after"]))).ok()
    });
    let t = gw.wait_final(&after.task_id, WAIT);
    assert_task_status(&t, pb::TaskStatus::Done);
    assert_eq!(result_of(&t), Some(json!(["after"])));

    for (id, arg) in &accepted {
        let t = gw.wait_final(id, SETTLE);
        assert_task_status(&t, pb::TaskStatus::Done);
        assert_eq!(result_of(&t), Some(json!([arg])), "{}", describe(&t));
    }
    let listed = gw.list_all(pb::ListTasksRequest::default());
    assert!(listed.len() > accepted.len(), "{} listed", listed.len());
    drop(gw);
    drop(gateway);
    drop(disk);
}

/// The agent's disk fills up: ATASK is answered 300 naming the reason; once space
/// is freed it accepts tasks again, and the results it stored before are there.
#[test]
fn agent_disk_full_then_freed() {
    let dir = tempdir();
    let Some(disk) = Tmpfs::mount(&dir.path().join("agent-data")) else {
        return;
    };
    let agent = Daemon::agent_in(dir.clone(), &[]);
    let addr = agent.arpcp();
    let mut stored = Vec::new();
    for i in 0..10 {
        let r = common::call(&addr, &req::atask("echo", json!([format!("before-{i}")])));
        assert_eq!(code(&r), 100, "{r}");
        stored.push((r["data"]["atask_id"].as_str().expect("id").to_string(), i));
    }
    // Their results are on disk before it fills: an ending still being written when
    // the disk fills waits for space like any other write, up to a retry pause later.
    for (id, i) in &stored {
        wait_until(WAIT, "the tasks before the full disk to be done", || {
            common::call(&addr, &req::get(id))["data"]["result"] == json!([format!("before-{i}")])
        });
    }
    let filler = disk.fill();
    let mut refusal = None;
    for i in 0..MAX_SUBMITS_TO_FILL {
        let r = common::call(&addr, &req::atask("echo", json!([bulky(&i.to_string())])));
        if code(&r) != 100 {
            refusal = Some(r);
            break;
        }
    }
    let refusal = refusal.expect("an ATASK refused once the disk is full");
    common::assert_response(&refusal, 300, &["cannot write", "No space left on device"]);

    std::fs::remove_file(&filler).expect("free the disk");
    let r = wait_for(WAIT, "an ATASK accepted after space was freed", || {
        let r = common::call(&addr, &req::atask("echo", json!(["after"])));
        (code(&r) == 100).then_some(r)
    });
    let after = r["data"]["atask_id"].as_str().expect("id").to_string();
    wait_until(WAIT, "the task after the full disk to be done", || {
        common::call(&addr, &req::get(&after))["data"]["result"] == json!(["after"])
    });
    for (id, i) in &stored {
        let r = common::call(&addr, &req::get(id));
        assert_eq!(
            r["data"]["result"],
            json!([format!("before-{i}")]),
            "stored task {id}: {r}"
        );
    }
    drop(agent);
    drop(disk);
}

// ---------------------------------------------------------------------------
// A damaged store

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a copy's directory");
    for e in std::fs::read_dir(from).expect("read a directory") {
        let e = e.expect("a directory entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("a file type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy a file");
        }
    }
}

/// Every task the gateway lists, with a check that the listing reads.
fn all_tasks(gw: &Gw) -> Vec<pb::Task> {
    gw.list_all(pb::ListTasksRequest::default())
}

/// A gateway holding 300 finished tasks, stopped with SIGTERM, its sled log
/// damaged in several ways: each start either refuses with one error line naming
/// the store, the damage and `--accept-damaged-store`, or has every task intact.
/// With the flag it starts and logs what was lost; the start after that is normal.
/// A `kill -9` is not damage: the gateway starts normally with every task.
#[test]
fn damaged_gateway_store_is_refused_unless_accepted() {
    let agent = Daemon::agent(&[]);
    let mut gateway = Daemon::gateway(&["--agent", &agent.arpcp()]);
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);
    let ids: Vec<String> = (0..DAMAGE_TASKS)
        .map(|i| gw.submit_ok("echo", json!([i])))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let t = gw.wait_final(id, WAIT);
        assert_eq!(result_of(&t), Some(json!([i])), "{}", describe(&t));
    }
    drop(gw);
    gateway.sigterm();
    assert!(
        gateway.wait_exit(STOP_BOUND).is_some_and(|s| s.success()),
        "the gateway stops cleanly on SIGTERM"
    );
    let data = gateway.dir().join("gateway-data");
    let log_len = std::fs::metadata(data.join("gateway.sled/db"))
        .expect("sled's log file")
        .len();

    type Damage = fn(&Path, u64);
    let damages: [(&str, Damage, bool); 3] = [
        (
            "log truncated to half",
            |db, len| {
                let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
                f.set_len(len / 2).unwrap();
            },
            true,
        ),
        (
            "log emptied",
            |db, _| {
                let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
                f.set_len(0).unwrap();
            },
            true,
        ),
        (
            "64 KiB overwritten in the middle of the log",
            |db, len| {
                use std::io::{Seek, SeekFrom};
                let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
                f.seek(SeekFrom::Start(len / 2)).unwrap();
                f.write_all(&vec![0x5Au8; 64 * 1024]).unwrap();
                f.sync_all().unwrap();
            },
            false,
        ),
    ];
    for (what, damage, must_refuse) in damages {
        let dir = tempdir();
        let copy = dir.path().join("gateway-data");
        copy_dir(&data, &copy);
        damage(&copy.join("gateway.sled/db"), log_len);

        let stderr = match Daemon::run_until_ready_or_exit(dir.clone(), &gateway_args(&[])) {
            Err(Refused { status, stderr }) => {
                assert!(!status.success(), "{what}: {status}\n{stderr}");
                stderr
            }
            Ok(started) => {
                assert!(!must_refuse, "{what}: the gateway started");
                println!("{what}: started with nothing lost");
                // Nothing lost, then: every task is there with its result.
                let gw = Gw::connect(&started);
                for (i, id) in ids.iter().enumerate() {
                    let t = gw.task(id);
                    assert_task_status(&t, pb::TaskStatus::Done);
                    assert_eq!(result_of(&t), Some(json!([i])), "{what}");
                }
                continue;
            }
        };
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(
            errors.len() == 1
                && errors[0].contains(&copy.join("gateway.sled").display().to_string())
                && errors[0].contains("damaged")
                && errors[0].contains("--accept-damaged-store"),
            "{what}: expected one error line naming the store, the damage and the flag:\n{stderr}"
        );

        println!("{what}: refused: {}", errors[0]);
        let mut accepted = Daemon::gateway_in(dir.clone(), &["--accept-damaged-store"]);
        let log = accepted.stderr();
        for line in log.lines().filter(|l| l.contains("damaged store")) {
            println!("{what}: accepted: {line}");
        }
        assert!(
            log.contains("damaged store") && log.contains("lost"),
            "{what}: the accepting start says what was lost:\n{log}"
        );
        let gw = Gw::connect(&accepted);
        let readable = all_tasks(&gw).len();
        let done = all_tasks(&gw)
            .iter()
            .filter(|t| t.status == pb::TaskStatus::Done as i32)
            .count();
        println!("{what}: {readable} of {DAMAGE_TASKS} tasks readable, {done} DONE");
        drop(gw);
        accepted.kill9();
        // Accepted once, the damage is not reported again.
        accepted.restart();
        assert!(
            !accepted.stderr().contains("damaged store"),
            "{what}: the start after accepting:\n{}",
            accepted.stderr()
        );
    }

    // kill -9 (no damage): starts normally, every task there and DONE.
    gateway.restart();
    let gw = Gw::connect(&gateway);
    gw.wait_alive(1, WAIT);
    let more: Vec<String> = (0..10).map(|i| gw.submit_ok("echo", json!([i]))).collect();
    for id in &more {
        gw.wait_final(id, WAIT);
    }
    drop(gw);
    gateway.kill9();
    gateway.restart();
    let gw = Gw::connect(&gateway);
    let listed = all_tasks(&gw);
    assert_eq!(listed.len(), DAMAGE_TASKS + more.len());
    for (i, id) in ids.iter().enumerate() {
        let t = gw.task(id);
        assert_task_status(&t, pb::TaskStatus::Done);
        assert_eq!(result_of(&t), Some(json!([i])));
    }
    drop(agent);
}
