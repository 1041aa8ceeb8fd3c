//! The procedures every agent offers: arithmetic (for tests and demos), `echo`,
//! `sleep` (which reports progress), and a few facts about the host.

use std::time::Duration;

use serde_json::{json, Number, Value};

use super::{describe, ProgressSink, RunError};
use crate::arpcp::{Args, Progress};

/// Longest `sleep` accepted: a week.
const MAX_SLEEP_SECS: f64 = 7.0 * 24.0 * 3600.0;
/// `sleep` reports progress this many times over its run.
const SLEEP_PROGRESS_STEPS: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Add,
    Sub,
    Mul,
    Div,
    Echo,
    Sleep,
    Time,
    MemoryUsage,
    RunningProcesses,
}

impl Builtin {
    pub const ALL: [Builtin; 9] = [
        Builtin::Add,
        Builtin::Sub,
        Builtin::Mul,
        Builtin::Div,
        Builtin::Echo,
        Builtin::Sleep,
        Builtin::Time,
        Builtin::MemoryUsage,
        Builtin::RunningProcesses,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Builtin::Add => "add",
            Builtin::Sub => "sub",
            Builtin::Mul => "mul",
            Builtin::Div => "div",
            Builtin::Echo => "echo",
            Builtin::Sleep => "sleep",
            Builtin::Time => "time",
            Builtin::MemoryUsage => "memory_usage",
            Builtin::RunningProcesses => "running_processes",
        }
    }

    pub fn validate(self, args: &Args) -> Result<(), String> {
        match self {
            Builtin::Add | Builtin::Sub | Builtin::Mul | Builtin::Div => {
                two_numbers(args).map(|_| ())
            }
            Builtin::Echo => Ok(()),
            Builtin::Sleep => seconds(args).map(|_| ()),
            Builtin::Time | Builtin::MemoryUsage | Builtin::RunningProcesses => {
                positional(args, 0).map(|_| ())
            }
        }
    }

    pub async fn run(self, args: &Args, progress: ProgressSink) -> Result<Value, RunError> {
        let bad = RunError::BadArguments;
        match self {
            Builtin::Add | Builtin::Sub | Builtin::Mul | Builtin::Div => {
                let (a, b) = two_numbers(args).map_err(bad)?;
                arithmetic(self, a, b)
            }
            Builtin::Echo => Ok(args.to_value()),
            Builtin::Sleep => {
                let secs = seconds(args).map_err(bad)?;
                let step = Duration::from_secs_f64(secs / f64::from(SLEEP_PROGRESS_STEPS));
                for i in 1..=SLEEP_PROGRESS_STEPS {
                    tokio::time::sleep(step).await;
                    if i < SLEEP_PROGRESS_STEPS {
                        progress(Progress {
                            percent: f64::from(i) / f64::from(SLEEP_PROGRESS_STEPS),
                            comment: format!(
                                "slept {:.1} of {secs} s",
                                step.as_secs_f64() * f64::from(i)
                            ),
                        });
                    }
                }
                Ok(Value::Null)
            }
            Builtin::Time => {
                let now = std::time::SystemTime::now();
                let unix = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default();
                Ok(json!({"utc": humantime::format_rfc3339_millis(now).to_string(), "unix": unix}))
            }
            Builtin::MemoryUsage => {
                let mut sys = sysinfo::System::new();
                sys.refresh_memory();
                Ok(json!({
                    "total_bytes": sys.total_memory(),
                    "used_bytes": sys.used_memory(),
                    "available_bytes": sys.available_memory(),
                }))
            }
            Builtin::RunningProcesses => {
                let mut sys = sysinfo::System::new();
                sys.refresh_processes(sysinfo::ProcessesToUpdate::All, true);
                Ok(json!(sys.processes().len()))
            }
        }
    }
}

fn positional(args: &Args, want: usize) -> Result<&[Value], String> {
    let Args::Positional(v) = args else {
        return Err(format!(
            "takes {want} positional argument(s), got named arguments"
        ));
    };
    if v.len() != want {
        return Err(format!("takes {want} argument(s), got {}", v.len()));
    }
    Ok(v)
}

/// A number as i64 when it is an integer, f64 otherwise.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

fn two_numbers(args: &Args) -> Result<(Num, Num), String> {
    let v = positional(args, 2)?;
    let num = |i: usize| -> Result<Num, String> {
        match &v[i] {
            Value::Number(n) => Ok(n
                .as_i64()
                .map(Num::Int)
                .unwrap_or_else(|| Num::Float(n.as_f64().unwrap_or(f64::NAN)))),
            other => Err(format!(
                "argument {} must be a number, got {}",
                i + 1,
                describe(other)
            )),
        }
    };
    Ok((num(0)?, num(1)?))
}

fn seconds(args: &Args) -> Result<f64, String> {
    let v = positional(args, 1)?;
    match v[0].as_f64() {
        Some(s) if (0.0..=MAX_SLEEP_SECS).contains(&s) => Ok(s),
        _ => Err(format!(
            "argument 1 must be a number of seconds from 0 to {MAX_SLEEP_SECS}, got {}",
            describe(&v[0])
        )),
    }
}

fn arithmetic(op: Builtin, a: Num, b: Num) -> Result<Value, RunError> {
    if let (Num::Int(x), Num::Int(y)) = (a, b) {
        let exact = match op {
            Builtin::Add => x.checked_add(y),
            Builtin::Sub => x.checked_sub(y),
            Builtin::Mul => x.checked_mul(y),
            _ if y == 0 => return Err(RunError::Failed("division by zero".into())),
            _ => (x % y == 0).then(|| x / y),
        };
        if let Some(r) = exact {
            return Ok(json!(r));
        }
    }
    let (x, y) = (a.f(), b.f());
    let r = match op {
        Builtin::Add => x + y,
        Builtin::Sub => x - y,
        Builtin::Mul => x * y,
        _ if y == 0.0 => return Err(RunError::Failed("division by zero".into())),
        _ => x / y,
    };
    Number::from_f64(r)
        .map(Value::Number)
        .ok_or_else(|| RunError::Failed(format!("result is not a finite number ({r})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pos(v: Value) -> Args {
        Args::Positional(v.as_array().cloned().unwrap_or_default())
    }

    async fn run(b: Builtin, v: Value) -> Result<Value, RunError> {
        b.run(&pos(v), Arc::new(|_| {})).await
    }

    #[tokio::test]
    async fn arithmetic_keeps_integers_exact_and_divides() {
        assert_eq!(run(Builtin::Add, json!([2, 3])).await, Ok(json!(5)));
        assert_eq!(run(Builtin::Sub, json!([2, 3.5])).await, Ok(json!(-1.5)));
        assert_eq!(run(Builtin::Mul, json!([4, 5])).await, Ok(json!(20)));
        assert_eq!(run(Builtin::Div, json!([6, 3])).await, Ok(json!(2)));
        assert_eq!(run(Builtin::Div, json!([1, 4])).await, Ok(json!(0.25)));
        assert_eq!(
            run(Builtin::Div, json!([1, 0])).await,
            Err(RunError::Failed("division by zero".into()))
        );
        assert_eq!(
            run(Builtin::Add, json!([i64::MAX, 1])).await,
            Ok(json!(i64::MAX as f64 + 1.0))
        );
    }

    #[test]
    fn wrong_arguments_are_named() {
        let e = Builtin::Add.validate(&pos(json!([1]))).unwrap_err();
        assert_eq!(e, "takes 2 argument(s), got 1");
        let e = Builtin::Add.validate(&pos(json!([1, "2"]))).unwrap_err();
        assert_eq!(e, "argument 2 must be a number, got the string \"2\"");
        let e = Builtin::Sleep.validate(&pos(json!([-1]))).unwrap_err();
        assert!(e.contains("argument 1"), "{e}");
        let named = Args::Named(serde_json::Map::new());
        assert!(Builtin::Add.validate(&named).is_err());
        assert!(Builtin::Echo.validate(&named).is_ok());
    }
}
