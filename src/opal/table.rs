//! What a model's answers to `calculate` and `status` say: in progress (how far, in
//! its words), ready with a result table, or failed. A ready answer's `header` types
//! the columns (`x = float comment metres`) and every cell of `table` is checked
//! against its column, so clients get numbers as numbers.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use thiserror::Error;

use super::message::{Section, Value};
use super::types::{self, quote, ParamType};
use super::MAX_TABLE_COLUMNS;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub ty: ParamType,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub columns: Vec<Column>,
    /// One JSON value per column, typed as the column says.
    pub rows: Vec<Vec<Json>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TableError {
    #[error("the ready answer has no `{0}`; it must carry `header = {{ column = type … }}` and `table = {{ rows }}`")]
    Missing(&'static str),
    #[error("`{key}`: expected {expected}, found {found}")]
    Shape {
        key: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("header.{column}: {message}")]
    Header { column: String, message: String },
    #[error("header: at most {MAX_TABLE_COLUMNS} columns (MAX_TABLE_COLUMNS), found {0}")]
    TooManyColumns(usize),
    #[error("table row {row}: expected {expected} cells (one per header column), found {found}")]
    Width {
        row: usize,
        expected: usize,
        found: usize,
    },
    #[error("table row {row}, column {column} ({ty}): {message}")]
    Cell {
        row: usize,
        column: String,
        ty: ParamType,
        message: String,
    },
}

/// The typed table of a ready answer: its `header` and `table`. Rows are numbered
/// from 1 in errors.
pub fn table_from_answer(answer: &Section) -> Result<Table, TableError> {
    let header = match answer.get("header") {
        None => return Err(TableError::Missing("header")),
        Some(Value::Section(s)) => s,
        Some(other) => {
            return Err(TableError::Shape {
                key: "header",
                expected: "a section `{ column = type … }`",
                found: other.kind(),
            })
        }
    };
    let body = match answer.get("table") {
        None => return Err(TableError::Missing("table")),
        Some(Value::Table(t)) => t,
        Some(other) => {
            return Err(TableError::Shape {
                key: "table",
                expected: "rows of cells `{ … }`",
                found: other.kind(),
            })
        }
    };
    if header.len() > MAX_TABLE_COLUMNS {
        return Err(TableError::TooManyColumns(header.len()));
    }
    let columns = header
        .pairs
        .iter()
        .map(|(name, v)| column(name, v))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::with_capacity(body.len());
    for (i, cells) in body.iter().enumerate() {
        if cells.len() != columns.len() {
            return Err(TableError::Width {
                row: i + 1,
                expected: columns.len(),
                found: cells.len(),
            });
        }
        let row = cells
            .iter()
            .zip(&columns)
            .map(|(cell, col)| {
                types::cell_from_text(col.ty, cell).map_err(|message| TableError::Cell {
                    row: i + 1,
                    column: col.name.clone(),
                    ty: col.ty,
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(row);
    }
    Ok(Table { columns, rows })
}

fn column(name: &str, v: &Value) -> Result<Column, TableError> {
    let err = |message: String| TableError::Header {
        column: name.to_string(),
        message,
    };
    let Value::Scalar(text) = v else {
        return Err(err(format!(
            "expected `type [comment text]`, found {}",
            v.kind()
        )));
    };
    let text = text.trim();
    let (ty_name, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let ty = ParamType::from_name(ty_name).ok_or_else(|| {
        err(format!(
            "expected a type (int, float, string, bool, period or datetime), found {}",
            quote(ty_name)
        ))
    })?;
    let rest = rest.trim();
    let comment = if rest.is_empty() {
        None
    } else {
        let (word, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if word != "comment" {
            return Err(err(format!(
                "expected `comment text` after the type, found {}",
                quote(word)
            )));
        }
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    };
    Ok(Column {
        name: name.to_string(),
        ty,
        comment,
    })
}

impl Table {
    /// Rows as objects keyed by column name.
    pub fn to_dicts(&self) -> Vec<serde_json::Map<String, Json>> {
        self.rows
            .iter()
            .map(|row| {
                self.columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| (c.name.clone(), v.clone()))
                    .collect()
            })
            .collect()
    }
}

/// What an answer to `calculate` or `status` says.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `status = inprogress`. `percent` is the fraction done, 0.0 to 1.0 (the seed
    /// writes `percent = 0.50` for half done; a number above 1, up to 100, is read
    /// as a percentage).
    InProgress {
        percent: Option<f64>,
        comment: Option<String>,
    },
    /// `status = ready` with its table.
    Ready(Table),
    /// `answer = error` or `status = failed`: the model's own words.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerError {
    #[error("`{key}`: expected {expected}, found {found}")]
    Field {
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{0}")]
    Table(#[from] TableError),
}

fn field(key: &'static str, expected: &'static str, found: Option<&Value>) -> AnswerError {
    AnswerError::Field {
        key,
        expected,
        found: match found {
            None => "nothing (the key is missing)".to_string(),
            Some(Value::Scalar(s)) => quote(s),
            Some(other) => other.kind().to_string(),
        },
    }
}

/// Reads an answer to `calculate` or `status`.
pub fn answer_of(msg: &Section) -> Result<Answer, AnswerError> {
    let comment = msg.get_scalar("comment").map(str::to_string);
    match msg.get_scalar("answer") {
        Some("ok") => {}
        Some("error") => {
            return Ok(Answer::Error(comment.unwrap_or_else(|| {
                "the model answered error without a comment".into()
            })))
        }
        _ => return Err(field("answer", "`ok` or `error`", msg.get("answer"))),
    }
    match msg.get_scalar("status") {
        Some("inprogress") => {
            let percent = match msg.get("percent") {
                None => None,
                Some(Value::Scalar(s)) => Some(fraction(s).ok_or_else(|| {
                    field(
                        "percent",
                        "a fraction from 0 to 1 (0.50 is half done) or a percentage up to 100",
                        msg.get("percent"),
                    )
                })?),
                Some(other) => {
                    return Err(field(
                        "percent",
                        "a fraction from 0 to 1 (0.50 is half done) or a percentage up to 100",
                        Some(other),
                    ))
                }
            };
            Ok(Answer::InProgress { percent, comment })
        }
        Some("ready") => Ok(Answer::Ready(table_from_answer(msg)?)),
        Some("failed") => Ok(Answer::Error(comment.unwrap_or_else(|| {
            "the model reported status failed without a comment".into()
        }))),
        _ => Err(field(
            "status",
            "`inprogress`, `ready` or `failed`",
            msg.get("status"),
        )),
    }
}

fn fraction(text: &str) -> Option<f64> {
    let v: f64 = text.trim().trim_end_matches('%').trim_end().parse().ok()?;
    match v {
        v if (0.0..=1.0).contains(&v) && !text.contains('%') => Some(v),
        v if (0.0..=100.0).contains(&v) => Some(v / 100.0),
        _ => None,
    }
}
