//! How large and how deep the values arpcp carries (a call's arguments, a result)
//! may be, and the one checker of those limits. The gateway refuses arguments over
//! them at `Submit`, agents fail a procedure whose result is over them, and the
//! gateway never shows a stored value over them: so every task fits one ARPCP line
//! on its way to an agent, and one gRPC message a default client can read.
//!
//! A value's size is measured in both encodings it travels in: as JSON (the ARPCP
//! line) and as `google.protobuf.Value` (the gRPC API), because either can be the
//! larger one (`[0,0,…]` is 2 bytes an element as JSON and 11 as protobuf).

use std::fmt;

use serde_json::Value;
use thiserror::Error;

use crate::arpcp::{Args, MAX_LINE_LEN};

/// Room left on an ATASK/TASK line for everything but the arguments: the method,
/// version, procedure name and ids are at most 256 bytes each (6 times that once
/// JSON-escaped), far below this.
pub const ARPCP_HEADER_ROOM: usize = 16 * 1024;
/// A call's arguments (the `args` list or the `kwargs` object) in either encoding:
/// what still fits an ARPCP line of `MAX_LINE_LEN` next to its headers.
pub const MAX_ARGS_BYTES: usize = MAX_LINE_LEN - ARPCP_HEADER_ROOM;
/// A procedure's result in either encoding. With the arguments, a task's gRPC
/// message stays under `CLIENT_MESSAGE_LIMIT`.
pub const MAX_RESULT_BYTES: usize = 2 * 1024 * 1024;
/// Arrays and objects nested in a value, the outermost counted (`[[1]]` is 2; the
/// argument list is the outermost level of the arguments). prost refuses to decode
/// messages nested 100 deep, and a protobuf Value takes 2 of them a level: 32 leaves
/// room for the messages around it.
pub const MAX_DEPTH: usize = 32;
/// The largest message a gRPC client reads unless told otherwise (grpc-go, grpcio,
/// tonic, grpcurl): every response of the gateway fits it.
pub const CLIENT_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

/// One of the two encodings a value travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Protobuf,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Json => "JSON",
            Encoding::Protobuf => "protobuf",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    #[error("{what} is {bytes} bytes as {encoding}, over the limit of {limit} bytes")]
    TooLarge {
        what: String,
        encoding: Encoding,
        bytes: usize,
        limit: usize,
    },
    #[error(
        "{what} is nested {depth} levels deep, over the limit of {limit} levels \
         (every array and object counts, the outermost too)"
    )]
    TooDeep {
        what: String,
        depth: usize,
        limit: usize,
    },
}

/// Arrays and objects nested in `v`, the outermost counted (`1` is 0, `[[1]]` is 2).
/// Iterative, so no value is too deep to measure.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                deepest = deepest.max(d + 1);
                stack.extend(a.iter().map(|x| (x, d + 1)));
            }
            Value::Object(m) => {
                deepest = deepest.max(d + 1);
                stack.extend(m.values().map(|x| (x, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Counts what a writer is given, so measuring a value allocates nothing.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of `v` as compact JSON, as it goes on an ARPCP line. Recursive: call it on
/// values within `MAX_DEPTH` (as `check` does).
pub fn json_len(v: &Value) -> usize {
    serialized_len(v)
}

fn serialized_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    let mut c = Counter(0);
    // Writing to a counter cannot fail, and serde_json only fails on maps with
    // non-string keys, which a `Value` or `Args` cannot have.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

fn varint_len(n: usize) -> usize {
    let bits = usize::BITS - (n | 1).leading_zeros();
    (bits as usize).div_ceil(7)
}

/// A length-delimited field: tag, length, body (every field number here is < 16).
fn field_len(body: usize) -> usize {
    1 + varint_len(body) + body
}

/// Bytes of `v` as an encoded `google.protobuf.Value` message, as the gateway sends
/// it (`pb::json::from_json`). Recursive: call it on values within `MAX_DEPTH`.
pub fn protobuf_len(v: &Value) -> usize {
    match v {
        // null_value and bool_value: tag + one-byte varint; number_value: tag + 8.
        Value::Null | Value::Bool(_) => 2,
        Value::Number(_) => 9,
        Value::String(s) => field_len(s.len()),
        Value::Array(a) => field_len(list_content_len(a)),
        Value::Object(m) => field_len(struct_content_len(m)),
    }
}

/// A `ListValue`'s body (also what a repeated `Value` field takes in a message).
fn list_content_len(a: &[Value]) -> usize {
    a.iter().map(|x| field_len(protobuf_len(x))).sum()
}

/// A `Struct`'s body: one map entry (key field, value field) per member. prost
/// leaves out an empty key, as the default of its field.
fn struct_content_len(m: &serde_json::Map<String, Value>) -> usize {
    m.iter()
        .map(|(k, x)| {
            let key = if k.is_empty() { 0 } else { field_len(k.len()) };
            field_len(key + field_len(protobuf_len(x)))
        })
        .sum()
}

/// Checks `v`'s depth, then its size in both encodings against `max_bytes`;
/// `what` names it in the error ("the result").
pub fn check(what: &str, v: &Value, max_bytes: usize) -> Result<(), LimitError> {
    let d = depth(v);
    if d > MAX_DEPTH {
        return Err(LimitError::TooDeep {
            what: what.to_string(),
            depth: d,
            limit: MAX_DEPTH,
        });
    }
    check_size(what, json_len(v), protobuf_len(v), max_bytes)
}

fn check_size(what: &str, json: usize, protobuf: usize, limit: usize) -> Result<(), LimitError> {
    for (encoding, bytes) in [(Encoding::Json, json), (Encoding::Protobuf, protobuf)] {
        if bytes > limit {
            return Err(LimitError::TooLarge {
                what: what.to_string(),
                encoding,
                bytes,
                limit,
            });
        }
    }
    Ok(())
}

/// A procedure's result against `MAX_RESULT_BYTES` and `MAX_DEPTH`.
pub fn check_result(v: &Value) -> Result<(), LimitError> {
    check("the result", v, MAX_RESULT_BYTES)
}

/// A call's arguments against `MAX_ARGS_BYTES` and `MAX_DEPTH`. The list (or the
/// kwargs object) is one value, as on the ARPCP line; a depth error names the
/// deepest argument.
pub fn check_args(args: &Args) -> Result<(), LimitError> {
    let (what, deepest) = match args {
        Args::Positional(a) => (
            "the argument list",
            a.iter()
                .enumerate()
                .map(|(i, v)| (depth(v), i))
                .max()
                .map(|(d, i)| (d, format!("args[{i}]"))),
        ),
        Args::Named(m) => (
            "the kwargs object",
            m.iter()
                .map(|(k, v)| (depth(v), k))
                .max_by_key(|(d, _)| *d)
                .map(|(d, k)| (d, format!("kwargs.{k}"))),
        ),
    };
    // The list itself is the outermost level.
    if let Some((d, path)) = deepest.filter(|(d, _)| d + 1 > MAX_DEPTH) {
        return Err(LimitError::TooDeep {
            what: format!("{what} (deepest at {path})"),
            depth: d + 1,
            limit: MAX_DEPTH,
        });
    }
    let protobuf = match args {
        Args::Positional(a) => list_content_len(a),
        Args::Named(m) => struct_content_len(m),
    };
    check_size(what, serialized_len(args), protobuf, MAX_ARGS_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use serde_json::json;

    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |v, _| json!([v]))
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!([])), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": 2}]})), 3);
        assert_eq!(depth(&nested(33)), 33);
    }

    #[test]
    fn sizes_match_the_encoders() {
        let values = [
            json!(null),
            json!(true),
            json!(1.5),
            json!("é\"\n"),
            json!([0, 0, [], {}]),
            json!({"": 1, "k": [null, "x".repeat(300)], "deep": nested(5)}),
            json!("y".repeat(200_000)),
        ];
        for v in values {
            assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len(), "{v}");
            assert_eq!(
                protobuf_len(&v),
                crate::pb::json::from_json(&v).encoded_len(),
                "{v}"
            );
        }
    }

    #[test]
    fn args_are_measured_as_they_travel() {
        let a = Args::Positional(vec![json!(1), json!("x"), json!([0, 0])]);
        let pb: Vec<_> = [json!(1), json!("x"), json!([0, 0])]
            .iter()
            .map(crate::pb::json::from_json)
            .collect();
        let req = crate::pb::SubmitRequest {
            args: pb,
            ..Default::default()
        };
        let Args::Positional(list) = &a else {
            unreachable!()
        };
        assert_eq!(list_content_len(list), req.encoded_len());
        assert_eq!(serialized_len(&a), serde_json::to_vec(&a).unwrap().len());
        assert_eq!(check_args(&a), Ok(()));
        let named = json!({"x": [1, 2], "": "y"});
        let Value::Object(m) = &named else {
            unreachable!()
        };
        let req = crate::pb::SubmitRequest {
            kwargs: Some(crate::pb::json::struct_from_json(m)),
            ..Default::default()
        };
        // The kwargs field's own tag and length are not the object's.
        let body = struct_content_len(m);
        assert_eq!(field_len(body), req.encoded_len());
    }

    #[test]
    fn limits_name_what_and_how_much() {
        let e = check_args(&Args::Positional(vec![json!(1), nested(32)])).unwrap_err();
        assert_eq!(
            e,
            LimitError::TooDeep {
                what: "the argument list (deepest at args[1])".into(),
                depth: 33,
                limit: MAX_DEPTH
            }
        );
        assert_eq!(check_args(&Args::Positional(vec![nested(31)])), Ok(()));
        let big = json!("z".repeat(MAX_ARGS_BYTES));
        let e = check_args(&Args::Positional(vec![big])).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "the argument list is {} bytes as JSON, over the limit of {MAX_ARGS_BYTES}",
                MAX_ARGS_BYTES + 4
            )),
            "{e}"
        );
        let zeros = json!(vec![0; 200_000]);
        let e = check_result(&zeros).unwrap_err();
        assert!(
            matches!(e, LimitError::TooLarge { encoding: Encoding::Protobuf, bytes, .. } if bytes > MAX_RESULT_BYTES),
            "{e}"
        );
        let e = check_result(&nested(49)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the result is nested 49 levels deep"),
            "{e}"
        );
    }

    #[test]
    fn an_argument_list_at_the_limit_fits_an_arpcp_line() {
        // One string argument takes 4 bytes more as JSON (quotes, brackets), 8 as
        // protobuf (two tags, two 3-byte lengths).
        let s = "a".repeat(MAX_ARGS_BYTES - 8);
        let args = Args::Positional(vec![json!(s)]);
        assert_eq!(check_args(&args), Ok(()));
        let one_more = Args::Positional(vec![json!("a".repeat(MAX_ARGS_BYTES - 7))]);
        assert!(matches!(
            check_args(&one_more),
            Err(LimitError::TooLarge {
                encoding: Encoding::Protobuf,
                ..
            })
        ));
        let line = serde_json::to_vec(&json!({
            "method": "ATASK", "version": "1.0", "remote_procedure": "p".repeat(256),
            "remote_procedure_args": args, "atask_id": "x".repeat(256), "reply_to": "r".repeat(256),
        }))
        .unwrap();
        assert!(line.len() <= MAX_LINE_LEN, "{}", line.len());
    }
}
