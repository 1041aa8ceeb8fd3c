//! Running `ip` (iproute2) with a bound on its time, for the network namespaces of
//! `netns.rs` (used by `tests/gateway_netns.rs` and, included by path, by the
//! many-agents bench).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound of one `ip` command.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip ARGS`, bounded by `IP_TIMEOUT`; its stdout, or what went wrong.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let shown = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    let deadline = Instant::now() + IP_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{shown}` still ran after {IP_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("`{shown}`: {e}")),
        }
    };
    // The output is a few lines, well within the pipes' buffers.
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if status.success() {
        Ok(out)
    } else {
        Err(format!("`{shown}` failed ({status}): {}", err.trim()))
    }
}
