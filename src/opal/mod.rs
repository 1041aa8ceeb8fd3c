//! Opal: how a computational model (a program in any language) describes its typed
//! parameters, reports progress and returns a result table. This module is the format
//! only — pure functions over strings and values, no I/O; running a model and talking
//! to it over stdin/stdout is the agent's part. `docs/opal.md` documents the format.
//!
//! * [`message`]: the text of messages. [`parse`] one `{ … }` message, [`print`] it back
//!   (print → parse gives the same message), [`split_message`] takes one message at a
//!   time off a buffer that grows as a model writes.
//! * [`schema`]: [`schema_from_info`] reads a model's `--info` output (bare parameter
//!   lines grouped in `main = { … }` / `algo = { … }`, or a whole `{ answer = ok … }`
//!   message) into a [`Schema`]; [`Schema::validate`] checks a call's named arguments
//!   (`{"main": {...}, "algo": {"genetic": {...}}}`), naming the path of each error and
//!   filling in defaults; [`Schema::calculate_request`] makes the `calculate` message.
//! * [`table`]: [`answer_of`] reads a `calculate`/`status` answer into an [`Answer`]
//!   (in progress, ready with its typed [`Table`], or an error in the model's words).
//!
//! Values as JSON: `int` → integer, `float` → number, `bool` → `true`/`false`;
//! `string`, `period` (`HH:MM to HH:MM`) and `datetime` → strings, checked.
//!
//! Every input is bounded by the constants below; a message over a limit is an error
//! naming the limit, found before anything over it is stored.

pub mod message;
pub mod schema;
pub mod table;
pub mod types;

#[cfg(test)]
mod tests;

pub use message::{parse, parse_bare, print, split_message, ParseError, Section, Value};
pub use schema::{
    schema_from_info, Algorithm, Param, Partition, Schema, SchemaError, ValidationError,
    ValidationErrors,
};
pub use table::{answer_of, table_from_answer, Answer, AnswerError, Column, Table, TableError};
pub use types::ParamType;

/// One message (and the whole `--info` output), in bytes. A model's answer is read
/// up to this and no further; it is also the largest gRPC message a default client
/// reads, which a table shown to clients must fit anyway.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Braces open at once, the message's own counted. The seed nests 3 deep
/// (`{ algo = { genetic = { … } } }`); the parser recurses once a level.
pub const MAX_DEPTH: usize = 16;
/// Pairs in one message, all sections together.
pub const MAX_PAIRS: usize = 16 * 1024;
/// Items in one message's lists, all lists together.
pub const MAX_LIST_ITEMS: usize = 16 * 1024;
/// Bytes of one key (a parameter, section or column name).
pub const MAX_KEY_BYTES: usize = 256;
/// Rows of one table.
pub const MAX_TABLE_ROWS: usize = 100_000;
/// Cells of one table. Each becomes a JSON value of about 50 bytes in memory, so a
/// table stays within tens of megabytes however small its cells are written.
pub const MAX_TABLE_CELLS: usize = 500_000;
/// Columns of a table's header.
pub const MAX_TABLE_COLUMNS: usize = 1024;
/// Parameters of a schema, `main` and every algorithm together.
pub const MAX_PARAMS: usize = 1024;
/// Algorithms under `algo`.
pub const MAX_ALGORITHMS: usize = 256;
/// Validation errors listed for one call; more are counted, not listed.
pub const MAX_VALIDATION_ERRORS: usize = 32;
/// Known names listed in an "unknown parameter" error; more are counted.
pub const MAX_KNOWN_LISTED: usize = 32;
