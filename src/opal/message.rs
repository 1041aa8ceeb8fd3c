//! Opal messages as text: the parser, the printer and the splitter that finds one
//! message at a time in a growing buffer. Grammar (`docs/opal.md` has the long form):
//!
//! ```text
//! message := '{' pair* '}'
//! pair    := key '=' value            key: letters, digits, '_' or '-'
//! value   := '{' pair* '}'            a section
//!          | '{' row* '}'             under the key `table` only: rows of cells
//!          | '[' item (',' item)* ']' a list
//!          | scalar                   the words up to the end of the line, a `}`,
//!                                     a `//` comment or the next `key =`
//! ```
//!
//! A scalar being "the rest of the line" is what lets `comment = 10 минут, полет
//! нормальный` and `time = 00:00 to 48:00` be single values without quotes; stopping
//! it at the next `key =` is what lets the seed write several pairs on one line. A
//! backslash takes the next character literally (`\n`, `\t`, `\r` are the control
//! characters), which is how the printer writes any text so that it parses back.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    MAX_DEPTH, MAX_KEY_BYTES, MAX_LIST_ITEMS, MAX_MESSAGE_BYTES, MAX_PAIRS, MAX_TABLE_CELLS,
    MAX_TABLE_ROWS,
};

/// One value of a pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    Scalar(String),
    List(Vec<String>),
    Section(Section),
    /// The body of `table = { … }`: rows of whitespace-separated cells.
    Table(Vec<Vec<String>>),
}

/// A message or a nested section: its pairs in the order they were written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub pairs: Vec<(String, Value)>,
}

impl Section {
    pub fn new() -> Section {
        Section::default()
    }

    /// Appends a pair (builder style).
    pub fn with(mut self, key: impl Into<String>, value: Value) -> Section {
        self.pairs.push((key.into(), value));
        self
    }

    pub fn push(&mut self, key: impl Into<String>, value: Value) {
        self.pairs.push((key.into(), value));
    }

    /// The first value under `key` (a parsed message has no duplicates).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_scalar(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Scalar(s)) => Some(s),
            _ => None,
        }
    }

    pub fn get_section(&self, key: &str) -> Option<&Section> {
        match self.get(key) {
            Some(Value::Section(s)) => Some(s),
            _ => None,
        }
    }

    pub fn get_list(&self, key: &str) -> Option<&[String]> {
        match self.get(key) {
            Some(Value::List(l)) => Some(l),
            _ => None,
        }
    }

    pub fn get_table(&self, key: &str) -> Option<&[Vec<String>]> {
        match self.get(key) {
            Some(Value::Table(t)) => Some(t),
            _ => None,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|(k, _)| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl Value {
    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Scalar(_) => "a scalar",
            Value::List(_) => "a list",
            Value::Section(_) => "a section",
            Value::Table(_) => "a table",
        }
    }
}

/// Where the text stopped making sense and what would have.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}, column {column}: expected {expected}, found {found}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

impl ParseError {
    fn at(src: &str, pos: usize, expected: impl Into<String>, found: impl Into<String>) -> Self {
        let pos = floor_char_boundary(src, pos.min(src.len()));
        let before = &src[..pos];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = src[line_start..pos].chars().count() + 1;
        ParseError {
            line,
            column,
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// True when the text ended before the message did: more input may complete it.
    pub fn is_end_of_input(&self) -> bool {
        self.found == END_OF_INPUT
    }
}

const END_OF_INPUT: &str = "end of input";

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Parses exactly one message (`{ … }`), with only whitespace and comments around it.
pub fn parse(text: &str) -> Result<Section, ParseError> {
    check_size(text)?;
    let mut p = Parser::new(text);
    p.skip_space(true);
    p.expect_byte(b'{', "`{` opening a message")?;
    p.depth = 1;
    let section = p.section_body(false)?;
    p.skip_space(true);
    if p.pos < text.len() {
        return Err(p.error("the end of the input after the message's closing `}`"));
    }
    Ok(section)
}

/// Parses pairs without the outer braces: the bare form of a model's `--info` output
/// (`main = { … }` and `algo = { … }` at the top level).
pub fn parse_bare(text: &str) -> Result<Section, ParseError> {
    check_size(text)?;
    let mut p = Parser::new(text);
    p.section_body(true)
}

fn check_size(text: &str) -> Result<(), ParseError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ParseError {
            line: 1,
            column: 1,
            expected: format!("a message of at most {MAX_MESSAGE_BYTES} bytes (MAX_MESSAGE_BYTES)"),
            found: format!("{} bytes", text.len()),
        });
    }
    Ok(())
}

/// Finds the first complete message at the start of `buf` (after whitespace and
/// comments): `Ok(Some((bytes consumed, message)))`, or `Ok(None)` while it is
/// incomplete. A message still incomplete after `MAX_MESSAGE_BYTES`, nested deeper
/// than `MAX_DEPTH`, or anything but `{` where a message should start is an error at
/// once, so a reader never buffers more than the limit.
///
/// Each call scans `buf` from its start (it keeps no state); a reader that appends
/// large chunks keeps the rescanning small.
pub fn split_message(buf: &str) -> Result<Option<(usize, Section)>, ParseError> {
    let bytes = buf.as_bytes();
    let limit = bytes.len().min(MAX_MESSAGE_BYTES);
    let mut i = 0;
    let mut depth = 0usize;
    while i < limit {
        let b = bytes[i];
        if depth == 0 {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => i += 1,
                b'/' if comment_at(bytes, i) => i = line_end(bytes, i),
                // The first half of a `//` that has not arrived whole yet.
                b'/' if i + 1 == bytes.len() => return Ok(None),
                b'{' => {
                    depth = 1;
                    i += 1;
                }
                _ => {
                    return Err(ParseError::at(
                        buf,
                        i,
                        "`{` opening a message",
                        describe_at(buf, i),
                    ))
                }
            }
            continue;
        }
        match b {
            b'\\' => i += 2,
            b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ParseError::at(
                        buf,
                        i,
                        format!("at most {MAX_DEPTH} nested braces (MAX_DEPTH)"),
                        format!("brace number {depth}"),
                    ));
                }
                i += 1;
            }
            b'}' => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return parse(&buf[..i]).map(|s| Some((i, s)));
                }
            }
            b'/' if comment_at(bytes, i) => i = line_end(bytes, i),
            _ => i += 1,
        }
    }
    if bytes.len() >= MAX_MESSAGE_BYTES {
        return Err(ParseError::at(
            buf,
            limit,
            format!("a complete message within {MAX_MESSAGE_BYTES} bytes (MAX_MESSAGE_BYTES)"),
            "more bytes without its closing `}`",
        ));
    }
    Ok(None)
}

/// `//` starts a comment at the start of a word: after whitespace or punctuation
/// that is not escaped, so `http://host` in a comment stays text.
fn comment_at(bytes: &[u8], i: usize) -> bool {
    if bytes.get(i) != Some(&b'/') || bytes.get(i + 1) != Some(&b'/') {
        return false;
    }
    if i == 0 {
        return true;
    }
    let prev = bytes[i - 1];
    if !matches!(
        prev,
        b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'}' | b'[' | b']' | b',' | b'='
    ) {
        return false;
    }
    // An odd run of backslashes before `prev` escapes it into text.
    let slashes = bytes[..i - 1]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    slashes % 2 == 0
}

fn line_end(bytes: &[u8], i: usize) -> usize {
    bytes[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |n| i + n)
}

fn describe_at(src: &str, pos: usize) -> String {
    match src.get(pos..).and_then(|s| s.chars().next()) {
        None => END_OF_INPUT.to_string(),
        Some('\n') => "the end of the line".to_string(),
        Some(c) if c.is_control() => format!("the control character U+{:04X}", c as u32),
        Some(c) => format!("`{c}`"),
    }
}

fn is_key_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

fn is_hspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
    pairs: usize,
    items: usize,
    rows: usize,
    cells: usize,
}

/// Where a run of text (a scalar, a list item, a cell) stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TextKind {
    Scalar,
    Item,
    Cell,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser {
            src,
            bytes: src.as_bytes(),
            pos: 0,
            depth: 0,
            pairs: 0,
            items: 0,
            rows: 0,
            cells: 0,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn error(&self, expected: impl Into<String>) -> ParseError {
        ParseError::at(
            self.src,
            self.pos,
            expected,
            describe_at(self.src, self.pos),
        )
    }

    fn limit_error(&self, what: &str, limit: usize, name: &str) -> ParseError {
        ParseError::at(
            self.src,
            self.pos,
            format!("at most {limit} {what} in a message ({name})"),
            format!("one more {}", what.trim_end_matches('s')),
        )
    }

    /// Skips spaces, tabs, comments and (if `newlines`) line ends.
    fn skip_space(&mut self, newlines: bool) {
        while let Some(b) = self.peek() {
            if is_hspace(b) || (newlines && b == b'\n') {
                self.pos += 1;
            } else if b == b'/' && comment_at(self.bytes, self.pos) {
                self.pos = line_end(self.bytes, self.pos);
            } else {
                break;
            }
        }
    }

    fn expect_byte(&mut self, b: u8, expected: &str) -> Result<(), ParseError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        if self.depth >= MAX_DEPTH {
            return Err(ParseError::at(
                self.src,
                self.pos,
                format!("at most {MAX_DEPTH} nested braces (MAX_DEPTH)"),
                format!("brace number {}", self.depth + 1),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    /// Pairs up to the closing `}` (consumed), or up to the end of input if `bare`.
    fn section_body(&mut self, bare: bool) -> Result<Section, ParseError> {
        let mut section = Section::new();
        let mut seen: HashSet<&'a str> = HashSet::new();
        loop {
            self.skip_space(true);
            match self.peek() {
                None if bare => return Ok(section),
                None => return Err(self.error("a key or `}` closing the section")),
                Some(b'}') if !bare => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(section);
                }
                _ => {}
            }
            let key_start = self.pos;
            let key = self.key();
            if key.is_empty() {
                let expected = if bare {
                    "a key (letters, digits, `_` or `-`)"
                } else {
                    "a key (letters, digits, `_` or `-`) or `}` closing the section"
                };
                return Err(self.error(expected));
            }
            if key.len() > MAX_KEY_BYTES {
                return Err(ParseError::at(
                    self.src,
                    key_start,
                    format!("a key of at most {MAX_KEY_BYTES} bytes (MAX_KEY_BYTES)"),
                    format!("a key of {} bytes", key.len()),
                ));
            }
            self.skip_space(false);
            self.expect_byte(b'=', &format!("`=` after the key `{key}`"))?;
            if !seen.insert(key) {
                return Err(ParseError::at(
                    self.src,
                    key_start,
                    "each key once in a section",
                    format!("`{key}` a second time"),
                ));
            }
            self.pairs += 1;
            if self.pairs > MAX_PAIRS {
                return Err(self.limit_error("pairs", MAX_PAIRS, "MAX_PAIRS"));
            }
            self.skip_space(false);
            let value = self.value(key)?;
            section.pairs.push((key.to_string(), value));
        }
    }

    fn key(&mut self) -> &'a str {
        let start = self.pos;
        let len: usize = self.src[start..]
            .chars()
            .take_while(|&c| is_key_char(c))
            .map(char::len_utf8)
            .sum();
        self.pos += len;
        &self.src[start..start + len]
    }

    /// True if a `key =` starts here: where a scalar ends and the next pair begins.
    fn key_ahead(&self) -> bool {
        let rest = &self.src[self.pos..];
        let len: usize = rest
            .chars()
            .take_while(|&c| is_key_char(c))
            .map(char::len_utf8)
            .sum();
        len > 0
            && rest[len..]
                .bytes()
                .find(|&b| !matches!(b, b' ' | b'\t'))
                .is_some_and(|b| b == b'=')
    }

    fn value(&mut self, key: &str) -> Result<Value, ParseError> {
        match self.peek() {
            Some(b'{') => {
                self.enter()?;
                self.pos += 1;
                if key == "table" {
                    self.table_body().map(Value::Table)
                } else {
                    self.section_body(false).map(Value::Section)
                }
            }
            Some(b'[') => {
                self.pos += 1;
                self.list().map(Value::List)
            }
            _ => self.text(TextKind::Scalar).map(Value::Scalar),
        }
    }

    fn list(&mut self) -> Result<Vec<String>, ParseError> {
        let mut items = Vec::new();
        self.skip_space(true);
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            self.items += 1;
            if self.items > MAX_LIST_ITEMS {
                return Err(self.limit_error("list items", MAX_LIST_ITEMS, "MAX_LIST_ITEMS"));
            }
            items.push(self.text(TextKind::Item)?);
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_space(true);
                    // A trailing comma ends the list: `[a,]` is `[a]`, `[,]` is one empty item.
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        return Ok(items);
                    }
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(items);
                }
                _ => return Err(self.error("`,` or `]` closing the list")),
            }
        }
    }

    fn table_body(&mut self) -> Result<Vec<Vec<String>>, ParseError> {
        let mut rows = Vec::new();
        let mut row: Vec<String> = Vec::new();
        loop {
            self.skip_space(false);
            match self.peek() {
                None => return Err(self.error("a cell, a line end or `}` closing the table")),
                Some(b'\n') | Some(b'}') => {
                    if !row.is_empty() {
                        self.rows += 1;
                        if self.rows > MAX_TABLE_ROWS {
                            return Err(self.limit_error(
                                "table rows",
                                MAX_TABLE_ROWS,
                                "MAX_TABLE_ROWS",
                            ));
                        }
                        rows.push(std::mem::take(&mut row));
                    }
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        self.depth -= 1;
                        return Ok(rows);
                    }
                    self.pos += 1;
                }
                Some(_) => {
                    self.cells += 1;
                    if self.cells > MAX_TABLE_CELLS {
                        return Err(self.limit_error(
                            "table cells",
                            MAX_TABLE_CELLS,
                            "MAX_TABLE_CELLS",
                        ));
                    }
                    row.push(self.text(TextKind::Cell)?);
                }
            }
        }
    }

    /// A run of text. Leading spaces were skipped by the caller; trailing ones are not
    /// part of it (an escaped space is).
    fn text(&mut self, kind: TextKind) -> Result<String, ParseError> {
        let start = self.pos;
        let mut end = self.pos;
        let mut at_word_start = true;
        while let Some(b) = self.peek() {
            match b {
                b'\n' if kind != TextKind::Item => break,
                b' ' | b'\t' | b'\r' | b'\n' => {
                    if kind == TextKind::Cell {
                        break;
                    }
                    self.pos += 1;
                    at_word_start = true;
                    continue;
                }
                b'}' if kind != TextKind::Item => break,
                b'}' | b'{' => {
                    return Err(self.error(match kind {
                        TextKind::Item => {
                            "a list item, `,` or `]` (write `\\{` or `\\}` for a brace)"
                        }
                        _ => "text or the end of the value (write `\\{` for a brace)",
                    }))
                }
                b',' | b']' if kind == TextKind::Item => break,
                b'/' if comment_at(self.bytes, self.pos) => {
                    if kind == TextKind::Item {
                        self.pos = line_end(self.bytes, self.pos);
                        continue;
                    }
                    break;
                }
                _ => {}
            }
            if at_word_start && kind == TextKind::Scalar && self.key_ahead() {
                break;
            }
            at_word_start = false;
            if b == b'\\' {
                self.pos += 1;
                match self.src[self.pos..].chars().next() {
                    Some(c) => self.pos += c.len_utf8(),
                    None => return Err(self.error("a character after `\\`")),
                }
            } else {
                self.pos += 1;
            }
            end = self.pos;
        }
        Ok(unescape(&self.src[start..end]))
    }
}

fn unescape(raw: &str) -> String {
    if !raw.contains('\\') {
        return raw.to_string();
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Prints a message so that `parse(&print(m)) == Ok(m)` for every message the format
/// can express: keys are non-empty runs of letters, digits, `_` and `-`, unique in
/// their section; the key `table` holds a table and nothing else does; table rows
/// have at least one cell and cells are not empty. Any text is escaped as needed.
pub fn print(msg: &Section) -> String {
    let mut out = String::new();
    out.push('{');
    print_body(msg, 1, &mut out);
    out.push('}');
    out
}

fn indent(level: usize, out: &mut String) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn print_body(section: &Section, level: usize, out: &mut String) {
    for (key, value) in &section.pairs {
        out.push('\n');
        indent(level, out);
        out.push_str(key);
        out.push_str(" = ");
        match value {
            Value::Scalar(s) => escape_into(s, TextKind::Scalar, out),
            Value::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    escape_into(item, TextKind::Item, out);
                }
                if items.last().is_some_and(|s| s.is_empty()) {
                    out.push(',');
                }
                out.push(']');
            }
            Value::Section(s) => {
                out.push('{');
                print_body(s, level + 1, out);
                out.push('}');
            }
            Value::Table(rows) => {
                out.push('{');
                for row in rows {
                    out.push('\n');
                    indent(level + 1, out);
                    for (i, cell) in row.iter().enumerate() {
                        if i > 0 {
                            out.push(' ');
                        }
                        escape_into(cell, TextKind::Cell, out);
                    }
                }
                out.push('\n');
                indent(level, out);
                out.push('}');
            }
        }
    }
    out.push('\n');
    indent(level - 1, out);
}

fn escape_into(text: &str, kind: TextKind, out: &mut String) {
    let count = text.chars().count();
    let mut chars = text.chars().enumerate().peekable();
    while let Some((i, c)) = chars.next() {
        let edge = i == 0 || i + 1 == count;
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' if edge || kind == TextKind::Cell => out.push_str("\\t"),
            ' ' if edge || kind == TextKind::Cell => out.push_str("\\ "),
            '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '=' if kind == TextKind::Scalar => out.push_str("\\="),
            '[' if i == 0 && kind == TextKind::Scalar => out.push_str("\\["),
            ',' | ']' if kind == TextKind::Item => {
                out.push('\\');
                out.push(c);
            }
            '/' if chars.peek().is_some_and(|&(_, n)| n == '/') => out.push_str("\\/"),
            _ => out.push(c),
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&print(self))
    }
}
