//! The types of Opal parameters and table columns, and reading a value of a type from
//! text (a default, a choice, a table cell) or from JSON (a caller's argument). Every
//! refusal says what was expected and what was found, for the caller to put a path on.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value as Json};

/// A parameter's or a column's type, written in lower case in the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    Int,
    Float,
    String,
    Bool,
    /// `HH:MM to HH:MM`; hours may pass 24 (`00:00 to 48:00`).
    Period,
    /// `YYYY-MM-DD`, a time `HH:MM[:SS]` (hours may pass 24: the seed's tables count
    /// time from the start of a run), or both (`YYYY-MM-DDTHH:MM[:SS][Z|±HH:MM]`).
    Datetime,
}

impl ParamType {
    pub const ALL: [ParamType; 6] = [
        ParamType::Int,
        ParamType::Float,
        ParamType::String,
        ParamType::Bool,
        ParamType::Period,
        ParamType::Datetime,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ParamType::Int => "int",
            ParamType::Float => "float",
            ParamType::String => "string",
            ParamType::Bool => "bool",
            ParamType::Period => "period",
            ParamType::Datetime => "datetime",
        }
    }

    pub fn from_name(name: &str) -> Option<ParamType> {
        ParamType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// What a value of this type looks like, for "expected …" messages.
    pub fn expected(self) -> &'static str {
        match self {
            ParamType::Int => "an integer",
            ParamType::Float => "a number",
            ParamType::String => "a string",
            ParamType::Bool => "true or false",
            ParamType::Period => "a period `HH:MM to HH:MM`",
            ParamType::Datetime => {
                "a datetime (`YYYY-MM-DD`, `HH:MM[:SS]` or `YYYY-MM-DDTHH:MM[:SS]`)"
            }
        }
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, ParamType::Int | ParamType::Float)
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Text shown for a found value: short, and never a whole megabyte of it.
pub fn quote(text: &str) -> String {
    const SHOWN: usize = 40;
    if text.chars().count() <= SHOWN {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(SHOWN).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

/// A JSON value described for "found …".
pub fn describe_json(v: &Json) -> String {
    match v {
        Json::Null => "null".to_string(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => format!("the string {}", quote(s)),
        Json::Array(_) => "a list".to_string(),
        Json::Object(_) => "an object".to_string(),
    }
}

/// A model's `int` is 64 bits; what leaves or reaches it through the cluster stays
/// within what the API carries exactly.
pub use crate::pb::json::MAX_EXACT_INT;

fn mismatch(ty: ParamType, found: String) -> String {
    format!("expected {}, found {found}", ty.expected())
}

/// Reads text written in the format (a default, a choice, a cell) as a value of `ty`.
pub fn value_from_text(ty: ParamType, text: &str) -> Result<Json, String> {
    let text = text.trim();
    let bad = || mismatch(ty, quote(text));
    match ty {
        ParamType::Int => text.parse::<i64>().map(Json::from).map_err(|_| bad()),
        ParamType::Float => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Json::Number)
            .ok_or_else(bad),
        ParamType::Bool => match text {
            "true" => Ok(Json::Bool(true)),
            "false" => Ok(Json::Bool(false)),
            _ => Err(bad()),
        },
        ParamType::String => Ok(Json::String(text.to_string())),
        ParamType::Period => period(text).map(Json::String),
        ParamType::Datetime => datetime(text).map(|()| Json::String(text.to_string())),
    }
}

/// A table cell of type `ty`: as [`value_from_text`], and an `int` within
/// `MAX_EXACT_INT`, which a client can receive exactly.
pub fn cell_from_text(ty: ParamType, text: &str) -> Result<Json, String> {
    let v = value_from_text(ty, text)?;
    if let Some(i) = v
        .as_i64()
        .filter(|i| i.unsigned_abs() > MAX_EXACT_INT as u64)
    {
        return Err(format!(
            "{i} is beyond ±{MAX_EXACT_INT} (2^53 − 1), the integers a client receives exactly (numbers cross the API as doubles); declare the column float, or string to keep every digit"
        ));
    }
    Ok(v)
}

/// Checks a caller's JSON value against `ty` and returns it normalised (a float
/// parameter given `20` becomes `20.0`; an int given `20.0` becomes `20`).
pub fn value_from_json(ty: ParamType, v: &Json) -> Result<Json, String> {
    let bad = || mismatch(ty, describe_json(v));
    match (ty, v) {
        (ParamType::Int, Json::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Json::from(i));
            }
            // Protobuf carries every number as a double: 20.0 is how 20 arrives, and
            // past 2^53 − 1 a double may be another integer than the one sent.
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() <= MAX_EXACT_INT as f64 => {
                    Ok(Json::from(f as i64))
                }
                Some(f) if f.fract() == 0.0 => Err(format!(
                    "expected an integer within ±{MAX_EXACT_INT} (2^53 − 1: numbers travel as doubles, and past it one may have arrived as another), found {n}"
                )),
                _ => Err(bad()),
            }
        }
        (ParamType::Float, Json::Number(n)) => n
            .as_f64()
            .and_then(Number::from_f64)
            .map(Json::Number)
            .ok_or_else(bad),
        (ParamType::Bool, Json::Bool(b)) => Ok(Json::Bool(*b)),
        (ParamType::String, Json::String(s)) => Ok(Json::String(s.clone())),
        (ParamType::Period, Json::String(s)) => period(s).map(Json::String),
        (ParamType::Datetime, Json::String(s)) => {
            datetime(s.trim()).map(|()| Json::String(s.trim().to_string()))
        }
        _ => Err(bad()),
    }
}

/// A typed value written as the format's text (for a `calculate` request).
pub fn value_to_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            // `{:?}` keeps a float a float (`20.0`, not `20`) and stays short (`1e300`).
            (None, Some(f)) => format!("{f:?}"),
            _ => n.to_string(),
        },
        Json::Bool(b) => b.to_string(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

/// Checks `HH:MM to HH:MM` and returns it with single spaces.
pub fn period(text: &str) -> Result<String, String> {
    let expected = |why: &str| {
        format!(
            "expected a period `HH:MM to HH:MM` (hours may pass 24), found {}{why}",
            quote(text)
        )
    };
    let words: Vec<&str> = text.split_whitespace().take(4).collect();
    let [from, "to", to] = words.as_slice() else {
        return Err(expected(""));
    };
    let start = clock(from, 9999).ok_or_else(|| expected(&format!(": `{from}` is not HH:MM")))?;
    let end = clock(to, 9999).ok_or_else(|| expected(&format!(": `{to}` is not HH:MM")))?;
    if end < start {
        return Err(expected(": it ends before it starts"));
    }
    Ok(format!("{from} to {to}"))
}

/// `H:MM` or `HH:MM` (up to `max_hours`), optionally `:SS` and a fraction when
/// `seconds` allow; returns minutes past 00:00.
fn clock(text: &str, max_hours: u32) -> Option<u32> {
    clock_with_seconds(text, max_hours, false)
}

fn clock_with_seconds(text: &str, max_hours: u32, seconds: bool) -> Option<u32> {
    let mut parts = text.split(':');
    let h = parts.next()?;
    let m = parts.next()?;
    let s = parts.next();
    if parts.next().is_some() || (s.is_some() && !seconds) {
        return None;
    }
    let digits = |t: &str, min: usize, max: usize| {
        (min..=max).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1, 4) || !digits(m, 2, 2) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    if h > max_hours || m > 59 {
        return None;
    }
    if let Some(s) = s {
        let (whole, frac) = s.split_once('.').unwrap_or((s, "0"));
        if !digits(whole, 2, 2) || !digits(frac, 1, 9) || whole.parse::<u32>().ok()? > 60 {
            return None;
        }
    }
    Some(h * 60 + m)
}

/// Checks a datetime (see [`ParamType::Datetime`]).
pub fn datetime(text: &str) -> Result<(), String> {
    let bad = || mismatch(ParamType::Datetime, quote(text));
    if !text.contains('-') {
        return clock_with_seconds(text, 9999, true)
            .map(|_| ())
            .ok_or_else(bad);
    }
    let (date_part, time_part) = match text.find(['T', ' ']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    date(date_part).ok_or_else(bad)?;
    if let Some(t) = time_part {
        let t = t
            .strip_suffix('Z')
            .or_else(|| {
                let i = t.rfind(['+', '-'])?;
                let offset = &t[i + 1..];
                clock(offset, 23).map(|_| &t[..i])
            })
            .unwrap_or(t);
        clock_with_seconds(t, 23, true).ok_or_else(bad)?;
        if t.split(':').next().map(str::len) != Some(2) {
            return Err(bad());
        }
    }
    Ok(())
}

fn date(text: &str) -> Option<()> {
    let mut parts = text.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || y.len() != 4
        || m.len() != 2
        || d.len() != 2
        || ![y, m, d]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let (y, m, d): (u32, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    (1..=days).contains(&d).then_some(())
}
