//! `google.protobuf.Value` ⇄ JSON, the one mapping used by the gateway and the
//! command-line client. Integral numbers up to 2^53 (exact in a double) come back
//! as JSON integers, so add(1, 2) is 3, not 3.0.

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

/// The largest integer that crosses the API exactly: a `google.protobuf.Value`
/// number is a double, exact up to 2^53 − 1; past it, an integer may arrive as
/// another. Clients refuse to send one, and an Opal table does not hold one.
pub const MAX_EXACT_INT: i64 = (1 << 53) - 1;

/// The first integer in `v` that a double would not carry exactly, if any.
pub fn inexact_int(v: &Value) -> Option<&serde_json::Number> {
    match v {
        Value::Number(n) => {
            let big = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i.unsigned_abs() > MAX_EXACT_INT as u64,
                (None, Some(u)) => u > MAX_EXACT_INT as u64,
                (None, None) => false,
            };
            big.then_some(n)
        }
        Value::Array(a) => a.iter().find_map(inexact_int),
        Value::Object(m) => m.values().find_map(inexact_int),
        _ => None,
    }
}

pub fn from_json(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(from_json).collect(),
        }),
        Value::Object(m) => Kind::StructValue(struct_from_json(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn struct_from_json(m: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), from_json(v))).collect(),
    }
}

/// JSON of a protobuf Value; a number that is not finite (JSON has none) is null.
pub fn to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        // 2^53 itself is exact in a double too.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= (MAX_EXACT_INT + 1) as f64 => {
            Value::Number(Number::from(*n as i64))
        }
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), to_json(v)))
        .collect()
}

/// The path (`args[1].x`) of the first number in `v` that is not finite.
pub fn first_non_finite(v: &prost_types::Value, path: &str) -> Option<(String, f64)> {
    match &v.kind {
        Some(Kind::NumberValue(n)) if !n.is_finite() => Some((path.to_string(), *n)),
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .enumerate()
            .find_map(|(i, x)| first_non_finite(x, &format!("{path}[{i}]"))),
        Some(Kind::StructValue(s)) => s
            .fields
            .iter()
            .find_map(|(k, x)| first_non_finite(x, &format!("{path}.{k}"))),
        _ => None,
    }
}
