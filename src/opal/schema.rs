//! A model's parameter schema: read from its `--info` output, checked against every
//! call before anything runs, and turned into the `calculate` request.
//!
//! A parameter is `name = type [choice [a, b]] [default v] [partition a to b by s]
//! [comment text]`. Clauses come in any order, each once; `comment` takes the rest of
//! the line, and a default runs up to the next clause word (so a period default,
//! `default 00:00 to 24:00`, needs no quotes).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use thiserror::Error;

use super::message::{self, ParseError, Section, Value};
use super::types::{self, describe_json, quote, ParamType};
use super::{MAX_ALGORITHMS, MAX_KNOWN_LISTED, MAX_PARAMS, MAX_VALIDATION_ERRORS};

/// A numeric range swept with a step: `partition 0 to 100 by 1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    pub from: f64,
    pub to: f64,
    pub step: f64,
}

/// Relative tolerance for "on the step grid": `0.3` is on the grid of `0 by 0.1`
/// although `0.3 / 0.1` is 2.9999999999999996 in binary floating point.
pub const GRID_TOLERANCE: f64 = 1e-9;

impl Partition {
    /// Why `v` is not a point of the partition, if it is not.
    pub fn check(&self, v: f64) -> Result<(), String> {
        let slack = self.step * GRID_TOLERANCE;
        if v < self.from - slack || v > self.to + slack {
            return Err(format!(
                "expected a value from {} to {}, found {v}",
                self.from, self.to
            ));
        }
        let k = (v - self.from) / self.step;
        if (k - k.round()).abs() > GRID_TOLERANCE * k.abs().max(1.0) {
            let below = self.from + k.floor() * self.step;
            return Err(format!(
                "expected a point of the grid from {} by {}, found {v} (nearest: {} or {})",
                self.from,
                self.step,
                grid_point(below),
                grid_point(below + self.step)
            ));
        }
        Ok(())
    }
}

/// A grid point as a person would write it: the binary rounding of `from + k·step`
/// (0.30000000000000004) cut to 12 significant digits.
fn grid_point(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(11 - x.abs().log10().floor() as i32);
    let rounded = (x * scale).round() / scale;
    if rounded.is_finite() {
        rounded
    } else {
        x
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub ty: ParamType,
    /// Typed like `default`; empty when any value of the type goes.
    pub choices: Vec<Json>,
    /// None: the caller must give a value.
    pub default: Option<Json>,
    pub partition: Option<Partition>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Algorithm {
    pub name: String,
    pub params: Vec<Param>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    pub main: Vec<Param>,
    /// When not empty, a call chooses exactly one of them.
    pub algorithms: Vec<Algorithm>,
    pub meta: Option<Section>,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum SchemaError {
    #[error("the --info output does not parse: {0}")]
    Parse(#[from] ParseError),
    #[error("the model answered `answer = error` to info: {0}")]
    ModelError(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// One thing wrong with a call, at the path of the field (`algo.genetic.population`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a call (at most `MAX_VALIDATION_ERRORS` listed, then a count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads a model's `--info` output, in either form: bare pairs (`main = { … }`
/// `algo = { … }` at the top level) or one whole `{ answer = ok … }` message.
pub fn schema_from_info(output: &str) -> Result<Schema, SchemaError> {
    let first = output
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("//"));
    let section = if first.is_some_and(|l| l.starts_with('{')) {
        message::parse(output)?
    } else {
        message::parse_bare(output)?
    };
    schema_from_section(&section)
}

/// A schema from the pairs of an info answer (the message form, parsed).
pub fn schema_from_section(section: &Section) -> Result<Schema, SchemaError> {
    let mut main = None;
    let mut algorithms = Vec::new();
    let mut meta = None;
    let mut count = 0usize;
    if let Some(answer) = section.get("answer") {
        match answer {
            Value::Scalar(a) if a == "ok" => {}
            Value::Scalar(a) if a == "error" => {
                let comment = section
                    .get_scalar("comment")
                    .unwrap_or("(no comment given)");
                return Err(SchemaError::ModelError(comment.to_string()));
            }
            other => {
                return Err(invalid(
                    "answer",
                    format!("expected `ok` or `error`, found {}", show_value(other)),
                ))
            }
        }
    }
    for (key, value) in &section.pairs {
        match key.as_str() {
            "answer" | "comment" => {}
            "meta" => match value {
                Value::Section(s) => meta = Some(s.clone()),
                other => {
                    return Err(invalid(
                        "meta",
                        format!("expected a section, found {}", other.kind()),
                    ))
                }
            },
            "main" => {
                let s = section_of("main", value)?;
                main = Some(params_of("main", s, &mut count)?);
            }
            "algo" => {
                let s = section_of("algo", value)?;
                if s.len() > MAX_ALGORITHMS {
                    return Err(invalid(
                        "algo",
                        format!(
                            "at most {MAX_ALGORITHMS} algorithms (MAX_ALGORITHMS), found {}",
                            s.len()
                        ),
                    ));
                }
                for (name, body) in &s.pairs {
                    let path = format!("algo.{name}");
                    let body = section_of(&path, body)?;
                    algorithms.push(Algorithm {
                        name: name.clone(),
                        params: params_of(&path, body, &mut count)?,
                    });
                }
            }
            other => {
                return Err(invalid(
                    other,
                    "unknown section; expected main, algo, meta, answer or comment",
                ))
            }
        }
    }
    let main = main.ok_or_else(|| {
        invalid(
            "main",
            "missing; the --info output must describe the model's parameters in `main = { … }`",
        )
    })?;
    Ok(Schema {
        main,
        algorithms,
        meta,
    })
}

fn section_of<'a>(path: &str, value: &'a Value) -> Result<&'a Section, SchemaError> {
    match value {
        Value::Section(s) => Ok(s),
        other => Err(invalid(
            path,
            format!("expected a section `{{ … }}`, found {}", other.kind()),
        )),
    }
}

fn show_value(v: &Value) -> String {
    match v {
        Value::Scalar(s) => quote(s),
        other => other.kind().to_string(),
    }
}

fn params_of(path: &str, section: &Section, count: &mut usize) -> Result<Vec<Param>, SchemaError> {
    let mut params = Vec::with_capacity(section.len());
    for (name, value) in &section.pairs {
        let path = format!("{path}.{name}");
        *count += 1;
        if *count > MAX_PARAMS {
            return Err(invalid(
                path,
                format!("at most {MAX_PARAMS} parameters in a schema (MAX_PARAMS)"),
            ));
        }
        let Value::Scalar(text) = value else {
            return Err(invalid(
                path,
                format!(
                    "expected `type [choice [..]] [default v] [partition a to b by s] [comment text]`, found {}",
                    value.kind()
                ),
            ));
        };
        params.push(param_from_text(&path, name, text)?);
    }
    Ok(params)
}

const CLAUSES: [&str; 4] = ["choice", "default", "partition", "comment"];

/// Words of `text` with their byte ranges, so a clause's value keeps its own spacing.
fn words(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

/// Reads one parameter description: `int default 100`, `string choice [std, last]
/// default std`, `float partition 0 to 100 by 1`, `period default … comment …`.
pub fn param_from_text(path: &str, name: &str, text: &str) -> Result<Param, SchemaError> {
    let ws = words(text);
    let word = |i: usize| -> &str { ws.get(i).map_or("", |&(s, e)| &text[s..e]) };
    let ty_name = word(0);
    let ty = ParamType::from_name(ty_name).ok_or_else(|| {
        invalid(
            path,
            format!(
                "expected a type (int, float, string, bool, period or datetime), found {}",
                if ty_name.is_empty() {
                    "nothing".to_string()
                } else {
                    format!("`{ty_name}`")
                }
            ),
        )
    })?;
    let mut param = Param {
        name: name.to_string(),
        ty,
        choices: Vec::new(),
        default: None,
        partition: None,
        comment: None,
    };
    let mut seen = [false; 4];
    let mut i = 1;
    while i < ws.len() {
        let clause = word(i);
        let Some(c) = CLAUSES.iter().position(|&k| k == clause) else {
            return Err(invalid(
                path,
                format!(
                    "expected a clause (choice, default, partition or comment), found `{clause}`"
                ),
            ));
        };
        if std::mem::replace(&mut seen[c], true) {
            return Err(invalid(path, format!("`{clause}` given twice")));
        }
        let after = ws[i].1;
        match clause {
            "comment" => {
                let rest = text[after..].trim();
                param.comment = (!rest.is_empty()).then(|| rest.to_string());
                break;
            }
            "choice" => {
                let rest = &text[after..];
                let open = rest.len() - rest.trim_start().len();
                if !rest[open..].starts_with('[') {
                    return Err(invalid(path, "expected `[` after choice"));
                }
                let Some(close) = rest.find(']') else {
                    return Err(invalid(path, "expected `]` closing the choice list"));
                };
                let inner = rest[open + 1..close].trim();
                if inner.is_empty() {
                    return Err(invalid(path, "expected at least one choice in `[ … ]`"));
                }
                for (n, item) in inner.split(',').enumerate() {
                    let v = types::value_from_text(ty, item)
                        .map_err(|e| invalid(path, format!("choice {}: {e}", n + 1)))?;
                    param.choices.push(v);
                }
                let end = after + close + 1;
                i = ws.iter().position(|&(s, _)| s >= end).unwrap_or(ws.len());
                continue;
            }
            "default" => {
                let last = (i + 1..ws.len())
                    .take_while(|&j| !CLAUSES.contains(&word(j)))
                    .last()
                    .ok_or_else(|| invalid(path, "expected a value after default"))?;
                let v = types::value_from_text(ty, &text[ws[i + 1].0..ws[last].1])
                    .map_err(|e| invalid(path, format!("default: {e}")))?;
                param.default = Some(v);
                i = last + 1;
                continue;
            }
            _ => {
                // partition a to b by s
                if !ty.is_numeric() {
                    return Err(invalid(
                        path,
                        format!("a partition needs an int or float parameter, not {ty}"),
                    ));
                }
                let shape = "expected `partition FROM to TO by STEP`";
                if word(i + 2) != "to" || word(i + 4) != "by" {
                    return Err(invalid(path, shape));
                }
                let num = |j: usize| -> Result<f64, SchemaError> {
                    word(j)
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .ok_or_else(|| {
                            invalid(path, format!("{shape}: `{}` is not a number", word(j)))
                        })
                };
                let p = Partition {
                    from: num(i + 1)?,
                    to: num(i + 3)?,
                    step: num(i + 5)?,
                };
                if p.step <= 0.0 {
                    return Err(invalid(
                        path,
                        format!("partition: expected a step above 0, found {}", p.step),
                    ));
                }
                if p.to < p.from {
                    return Err(invalid(
                        path,
                        format!(
                            "partition: it ends ({}) before it starts ({})",
                            p.to, p.from
                        ),
                    ));
                }
                param.partition = Some(p);
                i += 6;
                continue;
            }
        }
    }
    if let Some(d) = &param.default {
        check_value(&param, d).map_err(|e| invalid(path, format!("default: {e}")))?;
    }
    Ok(param)
}

/// A typed value against a parameter's choices and partition.
fn check_value(param: &Param, v: &Json) -> Result<(), String> {
    if !param.choices.is_empty() && !param.choices.iter().any(|c| same(c, v)) {
        let listed: Vec<String> = param.choices.iter().map(types::value_to_text).collect();
        return Err(format!(
            "expected one of {}, found {}",
            listed.join(", "),
            describe_json(v)
        ));
    }
    if let (Some(p), Some(f)) = (&param.partition, v.as_f64()) {
        p.check(f)?;
    }
    Ok(())
}

fn same(a: &Json, b: &Json) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= GRID_TOLERANCE * x.abs().max(1.0),
        _ => a == b,
    }
}

/// Edit distance (insertions, deletions, substitutions and swaps of neighbours, as
/// typing slips are), on characters.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for (i, cell) in d.iter_mut().step_by(w).enumerate() {
        *cell = i;
    }
    for (j, cell) in d.iter_mut().take(w).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j - 1] + cost)
                .min(d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// Names longer than this (in characters) get no near-miss hint: the edit distance
/// costs the product of the lengths, once per known name, for each listed error.
pub const MAX_SUGGEST_CHARS: usize = 32;

/// "unknown parameter; did you mean "poplulation"? known: method, poplulation".
fn unknown(what: &str, name: &str, known: &[&str]) -> String {
    let mut msg = format!("unknown {what}");
    let len = name.chars().count();
    let near = (len <= MAX_SUGGEST_CHARS)
        .then(|| {
            known
                .iter()
                .filter_map(|k| {
                    let klen = k.chars().count();
                    let limit = 1.max(klen / 3);
                    // Lengths further apart than the limit cannot be within it.
                    (klen.abs_diff(len) <= limit && klen <= MAX_SUGGEST_CHARS)
                        .then(|| (distance(name, k), *k))
                        .filter(|&(d, _)| d <= limit)
                })
                .min_by_key(|&(d, _)| d)
        })
        .flatten();
    match near {
        Some((_, k)) => msg.push_str(&format!("; did you mean {k:?}?")),
        None => msg.push(';'),
    }
    if known.is_empty() {
        msg.push_str(" the model declares none");
    } else {
        let shown: Vec<&str> = known.iter().take(MAX_KNOWN_LISTED).copied().collect();
        msg.push_str(&format!(" known: {}", shown.join(", ")));
        if known.len() > MAX_KNOWN_LISTED {
            msg.push_str(&format!(" and {} more", known.len() - MAX_KNOWN_LISTED));
        }
    }
    msg
}

/// Collects errors up to the cap, then only counts them.
struct Errors {
    list: Vec<ValidationError>,
    more: usize,
}

impl Errors {
    fn full(&self) -> bool {
        self.list.len() >= MAX_VALIDATION_ERRORS
    }

    /// Like `push`, with a message worth making only when it will be listed.
    fn push_with(&mut self, path: impl FnOnce() -> String, message: impl FnOnce() -> String) {
        if self.full() {
            self.more += 1;
        } else {
            self.push(path(), message());
        }
    }

    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        if self.full() {
            self.more += 1;
        } else {
            self.list.push(ValidationError {
                path: path.into(),
                message: message.into(),
            });
        }
    }
}

impl Schema {
    pub fn algorithm(&self, name: &str) -> Option<&Algorithm> {
        self.algorithms.iter().find(|a| a.name == name)
    }

    /// A call's named arguments (`{"main": {...}, "algo": {"genetic": {...}}}`)
    /// checked: every error names its path; defaults filled in. Returns the normalised
    /// arguments: `main` with every parameter, and `algo` with the one chosen algorithm
    /// and every parameter of it (empty when the model declares no algorithms).
    pub fn validate(
        &self,
        args: &Map<String, Json>,
    ) -> Result<Map<String, Json>, ValidationErrors> {
        let mut errs = Errors {
            list: Vec::new(),
            more: 0,
        };
        for key in args.keys() {
            if key != "main" && key != "algo" {
                errs.push_with(
                    || key.clone(),
                    || unknown("section", key, &["main", "algo"]),
                );
            }
        }
        let main = validate_params("main", &self.main, args.get("main"), &mut errs);
        let mut algo = Map::new();
        let names: Vec<&str> = self.algorithms.iter().map(|a| a.name.as_str()).collect();
        match args.get("algo") {
            None | Some(Json::Null) => {}
            Some(Json::Object(given)) => {
                for name in given.keys() {
                    if self.algorithm(name).is_none() {
                        errs.push_with(
                            || format!("algo.{name}"),
                            || unknown("algorithm", name, &names),
                        );
                    }
                }
                // In the schema's order, so the error reads as the model declares them.
                let chosen: Vec<_> = self
                    .algorithms
                    .iter()
                    .filter_map(|a| given.get(&a.name).map(|body| (a, body)))
                    .collect();
                if chosen.len() > 1 {
                    let list: Vec<&str> = chosen.iter().map(|(a, _)| a.name.as_str()).collect();
                    errs.push(
                        "algo",
                        format!(
                            "expected exactly one algorithm, found {} ({})",
                            chosen.len(),
                            list.join(", ")
                        ),
                    );
                } else if let Some((a, body)) = chosen.first() {
                    let path = format!("algo.{}", a.name);
                    let params = validate_params(&path, &a.params, Some(body), &mut errs);
                    algo.insert(a.name.clone(), Json::Object(params));
                }
            }
            Some(other) => errs.push(
                "algo",
                format!(
                    "expected an object naming one algorithm, found {}",
                    describe_json(other)
                ),
            ),
        }
        if !self.algorithms.is_empty()
            && algo.is_empty()
            && !errs.list.iter().any(|e| e.path.starts_with("algo"))
        {
            errs.push(
                "algo",
                format!(
                    "expected exactly one algorithm, found none; known: {}",
                    names.join(", ")
                ),
            );
        }
        if errs.list.is_empty() {
            let mut out = Map::new();
            out.insert("main".to_string(), Json::Object(main));
            out.insert("algo".to_string(), Json::Object(algo));
            return Ok(out);
        }
        let mut list = errs.list;
        if errs.more > 0 {
            list.push(ValidationError {
                path: "(more)".to_string(),
                message: format!(
                    "{} more errors not listed (at most {MAX_VALIDATION_ERRORS} are)",
                    errs.more
                ),
            });
        }
        Err(ValidationErrors(list))
    }

    /// The `{ request = calculate main = {...} algo = {...} }` message for arguments
    /// that `validate` returned, in the schema's order of parameters.
    pub fn calculate_request(&self, validated: &Map<String, Json>) -> Section {
        let section_of = |params: &[Param], given: Option<&Json>| {
            let mut s = Section::new();
            if let Some(Json::Object(given)) = given {
                for p in params {
                    if let Some(v) = given.get(&p.name) {
                        s.push(p.name.clone(), Value::Scalar(types::value_to_text(v)));
                    }
                }
            }
            s
        };
        let mut msg = Section::new()
            .with("request", Value::Scalar("calculate".to_string()))
            .with(
                "main",
                Value::Section(section_of(&self.main, validated.get("main"))),
            );
        let given_algo = validated.get("algo").and_then(Json::as_object);
        let mut algo = Section::new();
        for a in &self.algorithms {
            if let Some(body) = given_algo.and_then(|g| g.get(&a.name)) {
                algo.push(
                    a.name.clone(),
                    Value::Section(section_of(&a.params, Some(body))),
                );
            }
        }
        if !algo.is_empty() {
            msg.push("algo", Value::Section(algo));
        }
        msg
    }

    /// The schema as an info answer (`{ answer = ok meta = … main = … algo = … }`).
    pub fn to_info(&self) -> Section {
        let params = |ps: &[Param]| {
            let mut s = Section::new();
            for p in ps {
                s.push(p.name.clone(), Value::Scalar(param_text(p)));
            }
            s
        };
        let mut msg = Section::new().with("answer", Value::Scalar("ok".to_string()));
        if let Some(meta) = &self.meta {
            msg.push("meta", Value::Section(meta.clone()));
        }
        msg.push("main", Value::Section(params(&self.main)));
        if !self.algorithms.is_empty() {
            let mut algo = Section::new();
            for a in &self.algorithms {
                algo.push(a.name.clone(), Value::Section(params(&a.params)));
            }
            msg.push("algo", Value::Section(algo));
        }
        msg
    }

    /// A stable short hash of the schema (16 hex digits): equal schemas, equal digests,
    /// across runs and builds (FNV-1a over the printed info answer).
    pub fn digest(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in message::print(&self.to_info()).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// A parameter written back as its description line.
pub fn param_text(p: &Param) -> String {
    let mut s = p.ty.name().to_string();
    if !p.choices.is_empty() {
        let items: Vec<String> = p.choices.iter().map(types::value_to_text).collect();
        s.push_str(&format!(" choice [{}]", items.join(", ")));
    }
    if let Some(d) = &p.default {
        s.push_str(&format!(" default {}", types::value_to_text(d)));
    }
    if let Some(part) = &p.partition {
        s.push_str(&format!(
            " partition {} to {} by {}",
            part.from, part.to, part.step
        ));
    }
    if let Some(c) = &p.comment {
        s.push_str(&format!(" comment {c}"));
    }
    s
}

fn validate_params(
    path: &str,
    params: &[Param],
    given: Option<&Json>,
    errs: &mut Errors,
) -> Map<String, Json> {
    let mut out = Map::new();
    let empty = Map::new();
    let given = match given {
        None | Some(Json::Null) => &empty,
        Some(Json::Object(m)) => m,
        Some(other) => {
            errs.push(
                path,
                format!(
                    "expected an object of parameters, found {}",
                    describe_json(other)
                ),
            );
            &empty
        }
    };
    let known: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    for key in given.keys() {
        if !known.contains(&key.as_str()) {
            errs.push_with(
                || format!("{path}.{key}"),
                || unknown("parameter", key, &known),
            );
        }
    }
    for p in params {
        let at = || format!("{path}.{}", p.name);
        match given.get(&p.name) {
            Some(v) => match types::value_from_json(p.ty, v).and_then(|t| {
                check_value(p, &t)?;
                Ok(t)
            }) {
                Ok(t) => {
                    out.insert(p.name.clone(), t);
                }
                Err(e) => errs.push(at(), e),
            },
            None => match &p.default {
                Some(d) => {
                    out.insert(p.name.clone(), d.clone());
                }
                None => errs.push(
                    at(),
                    format!(
                        "missing; the model gives no default, so a value is required ({})",
                        p.ty.expected()
                    ),
                ),
            },
        }
    }
    out
}
