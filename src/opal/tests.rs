//! Unit tests of the Opal format library: the seed's whole example session, errors
//! with their positions and paths, limits, random input, and print → parse.

use proptest::prelude::*;
use serde_json::{json, Map, Value as Json};

use super::*;

/// Every message of the seed's example session, as the spec lays it out (§3).
const SEED_SESSION: &[&str] = &[
    "// server asks for information about the task\n{ request = info }",
    "// the task answers
{ answer = ok
  meta = { detailed = true }
  main = { size = int default 100   x = float default 20.0   y = float default 0.0
           time = period default 00:00 to 24:00 comment twenty-four hours }
  algo = { genetic = { method = string choice [std, last] default std
                       poplulation = int default 1000 }
           bellman = { xpart = float partition 0 to 100 by 1
                       ypart = float partition 0 to 50 by 0.5 } } }",
    "// server asks to calculate with these parameters
{ request = calculate
  main = { size = 100 x = 20.0 y = 5.0 time = 00:00 to 48:00 }
  algo = { genetic = { method = last population = 1200 } } }",
    "{ answer = ok status = inprogress }",
    "{ request = status }",
    "// half done
{ answer = ok status = inprogress percent = 0.50 comment = 10 минут, полет нормальный }",
    "{ request = status }",
    "// done: the result table
{ answer = ok status = ready
  header = { time = datetime x = float y = float u = float comment management }
  table = { 00:00 20.0 5.0 0.0
            01:00 18.0 6.0 1.0
            02:00 16.0 7.0 2.0
            //...
          } }",
];

fn scalar(s: &str) -> Value {
    Value::Scalar(s.to_string())
}

fn obj(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn seed_schema() -> Schema {
    schema_from_info(SEED_SESSION[1]).unwrap()
}

#[test]
fn the_seed_session_parses_message_by_message() {
    let msgs: Vec<Section> = SEED_SESSION.iter().map(|m| parse(m).unwrap()).collect();
    assert_eq!(msgs[0], Section::new().with("request", scalar("info")));

    let main = msgs[1].get_section("main").unwrap();
    assert_eq!(main.keys().collect::<Vec<_>>(), ["size", "x", "y", "time"]);
    assert_eq!(main.get_scalar("size"), Some("int default 100"));
    assert_eq!(
        main.get_scalar("time"),
        Some("period default 00:00 to 24:00 comment twenty-four hours")
    );
    let genetic = msgs[1]
        .get_section("algo")
        .and_then(|a| a.get_section("genetic"))
        .unwrap();
    assert_eq!(
        genetic.get_scalar("method"),
        Some("string choice [std, last] default std")
    );

    let calc = msgs[2].get_section("main").unwrap();
    assert_eq!(calc.get_scalar("time"), Some("00:00 to 48:00"));
    assert_eq!(calc.get_scalar("y"), Some("5.0"));

    assert_eq!(msgs[5].get_scalar("percent"), Some("0.50"));
    assert_eq!(
        msgs[5].get_scalar("comment"),
        Some("10 минут, полет нормальный")
    );
    assert_eq!(
        msgs[7].get_table("table").unwrap(),
        [
            ["00:00", "20.0", "5.0", "0.0"],
            ["01:00", "18.0", "6.0", "1.0"],
            ["02:00", "16.0", "7.0", "2.0"]
        ]
    );
}

#[test]
fn the_seed_session_splits_from_one_stream() {
    let stream = SEED_SESSION.join("\n");
    let mut rest = stream.as_str();
    let mut n = 0;
    while let Some((used, msg)) = split_message(rest).unwrap() {
        assert_eq!(msg, parse(SEED_SESSION[n]).unwrap());
        rest = &rest[used..];
        n += 1;
    }
    assert_eq!(n, SEED_SESSION.len());
    assert!(rest.trim().is_empty());
}

#[test]
fn split_message_waits_for_the_end_and_refuses_what_is_not_a_message() {
    let full = SEED_SESSION[7];
    for cut in (0..full.len()).filter(|&i| full.is_char_boundary(i)) {
        assert_eq!(split_message(&full[..cut]).unwrap(), None, "cut at {cut}");
    }
    let (used, _) = split_message(&format!("{full}\n{{ request"))
        .unwrap()
        .unwrap();
    assert_eq!(used, full.len());

    let err = split_message("Traceback (most recent call last):\n").unwrap_err();
    assert_eq!((err.line, err.column), (1, 1));
    assert_eq!(err.expected, "`{` opening a message");
    assert_eq!(err.found, "`T`");

    let deep = "{ a = ".to_string() + &"{ b = ".repeat(MAX_DEPTH);
    let err = split_message(&deep).unwrap_err();
    assert!(err.expected.contains("MAX_DEPTH"), "{err}");
}

#[test]
fn split_message_refuses_a_message_over_the_size_limit_without_waiting_for_more() {
    let big = format!("{{ comment = {}", "x".repeat(MAX_MESSAGE_BYTES));
    let err = split_message(&big).unwrap_err();
    assert!(err.expected.contains("MAX_MESSAGE_BYTES"), "{err}");
    let err = parse(&format!("{big} }}")).unwrap_err();
    assert!(err.expected.contains("MAX_MESSAGE_BYTES"), "{err}");
}

#[test]
fn schema_of_the_seed_info_answer() {
    let s = seed_schema();
    assert_eq!(
        s.meta.as_ref().unwrap().get_scalar("detailed"),
        Some("true")
    );
    let names: Vec<_> = s.main.iter().map(|p| (p.name.as_str(), p.ty)).collect();
    assert_eq!(
        names,
        [
            ("size", ParamType::Int),
            ("x", ParamType::Float),
            ("y", ParamType::Float),
            ("time", ParamType::Period)
        ]
    );
    assert_eq!(s.main[0].default, Some(json!(100)));
    assert_eq!(s.main[1].default, Some(json!(20.0)));
    assert_eq!(s.main[3].default, Some(json!("00:00 to 24:00")));
    assert_eq!(s.main[3].comment.as_deref(), Some("twenty-four hours"));
    let genetic = s.algorithm("genetic").unwrap();
    assert_eq!(genetic.params[0].choices, [json!("std"), json!("last")]);
    assert_eq!(genetic.params[0].default, Some(json!("std")));
    assert_eq!(genetic.params[1].name, "poplulation");
    let bellman = s.algorithm("bellman").unwrap();
    assert_eq!(
        bellman.params[1].partition,
        Some(Partition {
            from: 0.0,
            to: 50.0,
            step: 0.5
        })
    );
    assert_eq!(bellman.params[1].default, None);
}

#[test]
fn the_bare_info_form_gives_the_same_schema() {
    let bare = "// trajectory model
main = {
  size = int default 100
  x = float default 20.0
  y = float default 0.0
  time = period default 00:00 to 24:00 comment twenty-four hours
}
meta = { detailed = true }
algo = {
  genetic = {
    method = string choice [std, last] default std
    poplulation = int default 1000
  }
  bellman = {
    xpart = float partition 0 to 100 by 1
    ypart = float partition 0 to 50 by 0.5
  }
}
";
    let a = schema_from_info(bare).unwrap();
    let b = seed_schema();
    assert_eq!(a.main, b.main);
    assert_eq!(a.algorithms, b.algorithms);
    // The order of sections is not the schema: the digest is of the content.
    assert_eq!(a.digest(), b.digest());
}

#[test]
fn schema_errors_name_the_parameter_and_what_was_expected() {
    let cases = [
        ("main = { n = integer }", "main.n: expected a type (int, float, string, bool, period or datetime), found `integer`"),
        ("main = { n = int default ten }", "main.n: default: expected an integer, found \"ten\""),
        ("main = { n = int choice [1, 2] default 3 }", "main.n: default: expected one of 1, 2, found 3"),
        ("main = { n = float partition 0 to 10 by 2 default 3 }", "main.n: default: expected a point of the grid from 0 by 2, found 3 (nearest: 2 or 4)"),
        // Neighbours as written, not as binary rounding makes them (0.30000000000000004).
        ("main = { g = float partition 0 to 1 by 0.1 default 0.25 }", "main.g: default: expected a point of the grid from 0 by 0.1, found 0.25 (nearest: 0.2 or 0.3)"),
        ("main = { n = float partition 0 to 10 by 0 }", "main.n: partition: expected a step above 0, found 0"),
        ("main = { n = string partition 0 to 10 by 1 }", "main.n: a partition needs an int or float parameter, not string"),
        ("main = { n = int default 1 default 2 }", "main.n: `default` given twice"),
        ("main = { n = int sometimes }", "main.n: expected a clause (choice, default, partition or comment), found `sometimes`"),
        ("main = { t = period default 10:00 to 09:00 }", "main.t: default: expected a period `HH:MM to HH:MM` (hours may pass 24), found \"10:00 to 09:00\": it ends before it starts"),
        ("algo = { a = { n = int } }", "main: missing; the --info output must describe the model's parameters in `main = { … }`"),
        ("main = { } extra = { }", "extra: unknown section; expected main, algo, meta, answer or comment"),
        ("main = { n = { int } }", "the --info output does not parse: line 1, column 20: expected `=` after the key `int`, found `}`"),
    ];
    for (info, want) in cases {
        assert_eq!(
            schema_from_info(info).unwrap_err().to_string(),
            want,
            "{info}"
        );
    }
    let err = schema_from_info("{ answer = error comment = licence expired }").unwrap_err();
    assert_eq!(err, SchemaError::ModelError("licence expired".into()));
}

#[test]
fn the_seed_calculate_request_is_caught_on_population() {
    let s = seed_schema();
    let args = obj(json!({
        "main": {"size": 100, "x": 20.0, "y": 5.0, "time": "00:00 to 48:00"},
        "algo": {"genetic": {"method": "last", "population": 1200}}
    }));
    let err = s.validate(&args).unwrap_err();
    assert_eq!(
        err.to_string(),
        "algo.genetic.population: unknown parameter; did you mean \"poplulation\"? known: method, poplulation"
    );
}

#[test]
fn validation_fills_defaults_and_normalises_numbers() {
    let s = seed_schema();
    let args = obj(json!({"main": {"x": 20, "size": 7.0}, "algo": {"genetic": {}}}));
    let v = s.validate(&args).unwrap();
    assert_eq!(
        Json::Object(v.clone()),
        json!({
            "main": {"size": 7, "x": 20.0, "y": 0.0, "time": "00:00 to 24:00"},
            "algo": {"genetic": {"method": "std", "poplulation": 1000}}
        })
    );
    let req = s.calculate_request(&v);
    let text = print(&req);
    let back = parse(&text).unwrap();
    assert_eq!(back, req);
    assert_eq!(back.get_scalar("request"), Some("calculate"));
    let main = back.get_section("main").unwrap();
    assert_eq!(main.get_scalar("x"), Some("20.0"));
    assert_eq!(main.get_scalar("time"), Some("00:00 to 24:00"));
    let genetic = back
        .get_section("algo")
        .and_then(|a| a.get_section("genetic"))
        .unwrap();
    assert_eq!(genetic.get_scalar("poplulation"), Some("1000"));
}

#[test]
fn every_validation_error_has_its_path() {
    let s = seed_schema();
    let cases: Vec<(Json, &str)> = vec![
        (json!({"main": {"size": "20"}, "algo": {"genetic": {}}}),
         "main.size: expected an integer, found the string \"20\""),
        (json!({"main": {"size": 2.5}, "algo": {"genetic": {}}}),
         "main.size: expected an integer, found 2.5"),
        (json!({"main": {"size": 9_007_199_254_740_992.0_f64}, "algo": {"genetic": {}}}),
         "main.size: expected an integer within ±9007199254740991 (2^53 − 1: numbers travel as doubles, and past it one may have arrived as another), found 9007199254740992.0"),
        (json!({"main": {"time": "9 to 5"}, "algo": {"genetic": {}}}),
         "main.time: expected a period `HH:MM to HH:MM` (hours may pass 24), found \"9 to 5\": `9` is not HH:MM"),
        (json!({"algo": {"genetic": {"method": "best"}}}),
         "algo.genetic.method: expected one of std, last, found the string \"best\""),
        (json!({"algo": {"bellman": {"xpart": 101, "ypart": 0.25}}}),
         "algo.bellman.xpart: expected a value from 0 to 100, found 101; algo.bellman.ypart: expected a point of the grid from 0 by 0.5, found 0.25 (nearest: 0 or 0.5)"),
        (json!({"algo": {"bellman": {"xpart": 3}}}),
         "algo.bellman.ypart: missing; the model gives no default, so a value is required (a number)"),
        (json!({"main": {}}),
         "algo: expected exactly one algorithm, found none; known: genetic, bellman"),
        (json!({"algo": {"genetic": {}, "bellman": {"xpart": 1, "ypart": 1}}}),
         "algo: expected exactly one algorithm, found 2 (genetic, bellman)"),
        (json!({"algo": {"genetik": {}}}),
         "algo.genetik: unknown algorithm; did you mean \"genetic\"? known: genetic, bellman"),
        (json!({"mian": {}, "algo": {"genetic": {}}}),
         "mian: unknown section; did you mean \"main\"? known: main, algo"),
        (json!({"main": [1, 2], "algo": {"genetic": {}}}),
         "main: expected an object of parameters, found a list"),
        (json!({"main": {"zzz": 1}, "algo": {"genetic": {}}}),
         "main.zzz: unknown parameter; known: size, x, y, time"),
    ];
    for (args, want) in cases {
        let err = s.validate(&obj(args.clone())).unwrap_err();
        assert_eq!(err.to_string(), want, "{args}");
    }
    // A grid point written with binary rounding is on the grid.
    let fine = schema_from_info("main = { r = float partition 0 to 1 by 0.1 }").unwrap();
    for r in [0.3, 0.1 + 0.2, 0.7000000000000001, 1.0] {
        assert!(
            fine.validate(&obj(json!({"main": {"r": r}}))).is_ok(),
            "{r}"
        );
    }
    assert!(fine.validate(&obj(json!({"main": {"r": 0.35}}))).is_err());
}

#[test]
fn validation_errors_are_capped() {
    let s = seed_schema();
    let mut main = Map::new();
    for i in 0..1000 {
        main.insert(format!("p{i}"), json!(i));
    }
    let args = obj(json!({"main": main, "algo": {"genetic": {}}}));
    let err = s.validate(&args).unwrap_err();
    assert_eq!(err.0.len(), MAX_VALIDATION_ERRORS + 1);
    assert_eq!(
        err.0.last().unwrap().message,
        format!(
            "{} more errors not listed (at most {MAX_VALIDATION_ERRORS} are)",
            1000 - MAX_VALIDATION_ERRORS
        )
    );
}

#[test]
fn unknown_algorithms_are_capped_too_and_long_names_get_no_hint() {
    let s = seed_schema();
    let mut algo = Map::new();
    for i in 0..1000 {
        algo.insert(format!("{}{i}", "g".repeat(200)), json!({}));
    }
    let err = s.validate(&obj(json!({"algo": algo}))).unwrap_err();
    assert_eq!(err.0.len(), MAX_VALIDATION_ERRORS + 1);
    assert!(err.0[0]
        .message
        .ends_with("unknown algorithm; known: genetic, bellman"));
    let long = format!("poplulation{}", "x".repeat(schema::MAX_SUGGEST_CHARS));
    let err = s
        .validate(&obj(json!({"algo": {"genetic": {long.clone(): 1}}})))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("algo.genetic.{long}: unknown parameter; known: method, poplulation")
    );
}

#[test]
fn a_model_without_algorithms_takes_no_algo() {
    let s = schema_from_info("main = { when = datetime default 2024-02-29T12:00:00Z }").unwrap();
    let v = s.validate(&Map::new()).unwrap();
    assert_eq!(v["main"], json!({"when": "2024-02-29T12:00:00Z"}));
    let err = s.validate(&obj(json!({"algo": {"fast": {}}}))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "algo.fast: unknown algorithm; the model declares none"
    );
    let err = s
        .validate(&obj(json!({"main": {"when": "2023-02-29"}})))
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("main.when: expected a datetime"),
        "{err}"
    );
    assert!(parse(&print(&s.calculate_request(&v)))
        .unwrap()
        .get("algo")
        .is_none());
}

#[test]
fn the_seed_ready_answer_is_a_typed_table() {
    let msg = parse(SEED_SESSION[7]).unwrap();
    let Answer::Ready(t) = answer_of(&msg).unwrap() else {
        panic!("not ready")
    };
    assert_eq!(t.columns.len(), 4);
    assert_eq!(t.columns[0].ty, ParamType::Datetime);
    assert_eq!(t.columns[3].comment.as_deref(), Some("management"));
    assert_eq!(
        t.rows[1],
        [json!("01:00"), json!(18.0), json!(6.0), json!(1.0)]
    );
    assert_eq!(t.to_dicts()[2]["u"], json!(2.0));

    let progress = answer_of(&parse(SEED_SESSION[5]).unwrap()).unwrap();
    assert_eq!(
        progress,
        Answer::InProgress {
            percent: Some(0.5),
            comment: Some("10 минут, полет нормальный".into())
        }
    );
    assert_eq!(
        answer_of(&parse(SEED_SESSION[3]).unwrap()).unwrap(),
        Answer::InProgress {
            percent: None,
            comment: None
        }
    );
}

#[test]
fn table_and_answer_errors_name_row_and_column() {
    let head = "{ answer = ok status = ready header = { t = datetime x = float } table = {";
    let cases = [
        (format!("{head}\n 00:00 1.0\n 01:00 abc\n}} }}"),
         "table row 2, column x (float): expected a number, found \"abc\""),
        (format!("{head}\n 00:00 1.0 7\n}} }}"),
         "table row 1: expected 2 cells (one per header column), found 3"),
        (format!("{head}\n 25:61 1.0\n}} }}"),
         "table row 1, column t (datetime): expected a datetime (`YYYY-MM-DD`, `HH:MM[:SS]` or `YYYY-MM-DDTHH:MM[:SS]`), found \"25:61\""),
        ("{ answer = ok status = ready header = { x = double } table = { } }".to_string(),
         "header.x: expected a type (int, float, string, bool, period or datetime), found \"double\""),
        ("{ answer = ok status = ready header = { x = float } }".to_string(),
         "the ready answer has no `table`; it must carry `header = { column = type … }` and `table = { rows }`"),
        ("{ answer = ok status = finished }".to_string(),
         "`status`: expected `inprogress`, `ready` or `failed`, found \"finished\""),
        ("{ answer = ok status = inprogress percent = lots }".to_string(),
         "`percent`: expected a fraction from 0 to 1 (0.50 is half done) or a percentage up to 100, found \"lots\""),
        ("{ status = ready }".to_string(),
         "`answer`: expected `ok` or `error`, found nothing (the key is missing)"),
    ];
    for (text, want) in cases {
        let err = answer_of(&parse(&text).unwrap()).unwrap_err();
        assert_eq!(err.to_string(), want, "{text}");
    }
    assert_eq!(
        answer_of(&parse("{ answer = error comment = division by zero }").unwrap()).unwrap(),
        Answer::Error("division by zero".into())
    );
    assert_eq!(
        answer_of(&parse("{ answer = ok status = inprogress percent = 40 }").unwrap()).unwrap(),
        Answer::InProgress {
            percent: Some(0.4),
            comment: None
        }
    );
}

#[test]
fn parse_errors_give_line_column_and_what_was_expected() {
    let cases = [
        ("{ a = 1\n  b 2 }", 2, 5, "`=` after the key `b`", "`2`"),
        (
            "{ a = 1\n  b = 2\n",
            3,
            1,
            "a key or `}` closing the section",
            "end of input",
        ),
        (
            "{ a = 1 a = 2 }",
            1,
            9,
            "each key once in a section",
            "`a` a second time",
        ),
        (
            "{ a = [x, y }",
            1,
            13,
            "a list item, `,` or `]` (write `\\{` or `\\}` for a brace)",
            "`}`",
        ),
        ("{ мир: 1 }", 1, 6, "`=` after the key `мир`", "`:`"),
        (
            "{ a = b { }",
            1,
            9,
            "text or the end of the value (write `\\{` for a brace)",
            "`{`",
        ),
        (
            "{ a = 1 } junk",
            1,
            11,
            "the end of the input after the message's closing `}`",
            "`j`",
        ),
        ("request = info", 1, 1, "`{` opening a message", "`r`"),
    ];
    for (text, line, column, expected, found) in cases {
        let err = parse(text).unwrap_err();
        assert_eq!(
            (
                err.line,
                err.column,
                err.expected.as_str(),
                err.found.as_str()
            ),
            (line, column, expected, found),
            "{text}"
        );
    }
    let err = parse("{ a = b }}").unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 1, column 10: expected the end of the input after the message's closing `}`, found `}`"
    );
}

#[test]
fn limits_are_errors_naming_the_limit() {
    let deep = format!(
        "{{ {} }}",
        "a = { ".repeat(MAX_DEPTH) + &"} ".repeat(MAX_DEPTH)
    );
    assert!(parse(&deep).unwrap_err().expected.contains("MAX_DEPTH"));
    let mut pairs = String::from("{");
    for i in 0..=MAX_PAIRS {
        pairs.push_str(&format!(" k{i} = 1"));
    }
    pairs.push('}');
    assert!(parse(&pairs).unwrap_err().expected.contains("MAX_PAIRS"));
    let items = format!("{{ l = [{}] }}", "x,".repeat(MAX_LIST_ITEMS + 1));
    assert!(parse(&items)
        .unwrap_err()
        .expected
        .contains("MAX_LIST_ITEMS"));
    let rows = format!("{{ table = {{{}}} }}", "1\n".repeat(MAX_TABLE_ROWS + 1));
    assert!(parse(&rows)
        .unwrap_err()
        .expected
        .contains("MAX_TABLE_ROWS"));
    let cells = format!("{{ table = {{ {} }} }}", "1 ".repeat(MAX_TABLE_CELLS + 1));
    assert!(parse(&cells)
        .unwrap_err()
        .expected
        .contains("MAX_TABLE_CELLS"));
    let key = format!("{{ {} = 1 }}", "k".repeat(MAX_KEY_BYTES + 1));
    assert!(parse(&key).unwrap_err().expected.contains("MAX_KEY_BYTES"));
    let mut info = String::from("main = {");
    for i in 0..=MAX_PARAMS {
        info.push_str(&format!("\n p{i} = int"));
    }
    info.push_str("\n}");
    assert!(schema_from_info(&info)
        .unwrap_err()
        .to_string()
        .contains("MAX_PARAMS"));
}

#[test]
fn text_that_needs_escapes_prints_and_parses_back() {
    let tricky = [
        "",
        " ",
        "a = b",
        "{x}",
        "[not a list",
        "50% // not a comment",
        "http://host/path",
        "line one\nline two",
        "tab\tinside",
        " padded ",
        "back\\slash",
        "10 минут, полет",
        "x=1",
        "//",
        "a\r",
        "ends with \\",
    ];
    let mut msg = Section::new();
    for (i, t) in tricky.iter().enumerate() {
        msg.push(format!("s{i}"), scalar(t));
    }
    let list: Vec<String> = tricky.iter().map(|s| s.to_string()).collect();
    msg.push("list", Value::List(list));
    msg.push("one_empty", Value::List(vec![String::new()]));
    msg.push("none", Value::List(vec![]));
    let cells: Vec<String> = tricky
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string())
        .collect();
    msg.push("table", Value::Table(vec![cells, vec!["x".into()]]));
    msg.push(
        "nested",
        Value::Section(Section::new().with("empty", Value::Section(Section::new()))),
    );
    let text = print(&msg);
    assert_eq!(parse(&text).unwrap(), msg, "{text}");
    assert_eq!(split_message(&text).unwrap().unwrap().1, msg);
}

#[test]
fn digest_is_stable_and_follows_the_content() {
    let s = seed_schema();
    assert_eq!(s.digest(), seed_schema().digest());
    assert_eq!(s.digest().len(), 16);
    let mut other = s.clone();
    other.main[0].default = Some(json!(101));
    assert_ne!(s.digest(), other.digest());
    // The info answer a schema prints reads back as the same schema.
    let again = schema_from_info(&print(&s.to_info())).unwrap();
    assert_eq!(again, s);
}

/// A small deterministic generator, so a failure can be replayed from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Feeds every entry point random and mutated text: none may panic, and each must
/// return within the bounds (the test's own time is the check on the latter).
#[test]
fn random_and_mutated_input_never_panics() {
    const ALPHABET: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "=",
        ",",
        "\\",
        "/",
        "//",
        " ",
        "\n",
        "\t",
        "\r",
        "a",
        "key",
        "1.5",
        "table",
        "header",
        "answer",
        "ok",
        "status",
        "ready",
        "é",
        "м",
        "\u{0}",
        "\u{2028}",
        "main",
        "algo",
        "int",
        "default",
        "choice",
        "partition",
        "to",
        "by",
        "comment",
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let seeds: Vec<String> = SEED_SESSION.iter().map(|s| s.to_string()).collect();
    for round in 0..20_000 {
        let text = if round % 2 == 0 {
            let n = rng.below(60);
            (0..n)
                .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                .collect::<String>()
        } else {
            let mut bytes = seeds[rng.below(seeds.len())].clone().into_bytes();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len() + 1);
                match rng.below(3) {
                    0 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, b"{}[]=,\\/ \nx\xd0\xbc"[rng.below(13)]),
                    _ if at < bytes.len() => bytes[at] = rng.next() as u8,
                    _ => {}
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let parsed = parse(&text);
        let _ = parse_bare(&text);
        let _ = split_message(&text);
        let _ = schema_from_info(&text);
        if let Ok(msg) = parsed {
            let _ = answer_of(&msg);
            // Whatever parses prints back to the same message.
            assert_eq!(parse(&print(&msg)).as_ref(), Ok(&msg), "{text:?}");
        }
        if let Ok(schema) = schema_from_info(&text) {
            let _ = schema.validate(&Map::new());
            let _ = schema.digest();
        }
    }
}

fn arb_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("{".to_string()),
            Just("}".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just("=".to_string()),
            Just(",".to_string()),
            Just("\\".to_string()),
            Just("/".to_string()),
            Just(" ".to_string()),
            Just("\n".to_string()),
            Just("\t".to_string()),
            Just("\r".to_string()),
            "[a-z0-9:.]{1,4}",
            "[а-я]{1,3}",
            any::<char>().prop_map(String::from),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

fn arb_key() -> impl Strategy<Value = String> {
    "[a-z_][a-z0-9_-]{0,6}".prop_filter("`table` holds tables only", |k| k != "table")
}

fn arb_section() -> impl Strategy<Value = Section> {
    let leaf = prop_oneof![
        arb_text().prop_map(Value::Scalar),
        prop::collection::vec(arb_text(), 0..4).prop_map(Value::List),
    ];
    let value = leaf.prop_recursive(4, 32, 4, |inner| {
        prop::collection::vec((arb_key(), inner), 0..4).prop_map(|pairs| {
            let mut s = Section::new();
            for (k, v) in pairs {
                if s.get(&k).is_none() {
                    s.push(k, v);
                }
            }
            Value::Section(s)
        })
    });
    let table = prop::collection::vec(
        prop::collection::vec(
            arb_text().prop_filter("cells are not empty", |c| !c.is_empty()),
            1..4,
        ),
        0..4,
    );
    (
        prop::collection::vec((arb_key(), value), 0..5),
        prop::option::of(table),
    )
        .prop_map(|(pairs, table)| {
            let mut s = Section::new();
            for (k, v) in pairs {
                if s.get(&k).is_none() {
                    s.push(k, v);
                }
            }
            if let Some(t) = table {
                s.push("table", Value::Table(t));
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn print_then_parse_gives_the_message_back(msg in arb_section()) {
        let text = print(&msg);
        prop_assert_eq!(parse(&text), Ok(msg.clone()), "printed:\n{}", text);
        let (used, split) = split_message(&text).unwrap().unwrap();
        prop_assert_eq!(used, text.len());
        prop_assert_eq!(split, msg);
    }
}
