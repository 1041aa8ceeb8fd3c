//! A daemon a bench runs: the `arpcp` binary in a temporary directory of its own,
//! its stderr in a file there, killed (by its pid) when dropped. Both benches
//! include this file by path.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The `arpcp` binary built with the bench, in the same profile; `BENCH_ARPCP`
/// names another build, so that two builds can be measured in alternation by the
/// same bench.
pub fn arpcp_bin() -> String {
    std::env::var("BENCH_ARPCP").unwrap_or_else(|_| env!("CARGO_BIN_EXE_arpcp").to_string())
}

pub struct Daemon {
    pub child: Child,
    pub addrs: serde_json::Value,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `program ARGS --data-dir DIR/data`, its stderr in `DIR/stderr`; returns once
    /// it printed where it listens.
    pub fn spawn(program: &str, args: &[&str]) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let stderr = std::fs::File::create(dir.path().join("stderr"))?;
        let mut child = Command::new(program)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addrs = serde_json::from_str(&line).map_err(|e| {
            let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
            anyhow::anyhow!("{program} {args:?} did not start ({e}): {err}")
        })?;
        Ok(Daemon { child, addrs, dir })
    }

    /// One of the addresses of its ready line (`grpc`, `arpcp`, `listen`).
    pub fn addr(&self, key: &str) -> String {
        self.addrs[key].as_str().unwrap_or_default().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its store.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Warning and error lines it logged.
    pub fn complaints(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("stderr"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }
}
