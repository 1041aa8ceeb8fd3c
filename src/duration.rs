//! Durations on the command line and in configuration files: human form (`200ms`,
//! `30s`, `5m`, `7d`), or a plain number of seconds as the older `*-secs` flags took.
//! One parser for the flags and both daemons' files, so they read alike.

use std::time::Duration;

/// The longest duration accepted anywhere: past it, adding it to "now" overflows
/// the clocks the daemons compute deadlines with.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A duration from a flag's or a key's text; the error says what form is expected.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let d = match t.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Duration::try_from_secs_f64(s).ok(),
        Ok(_) => None,
        Err(_) => humantime::parse_duration(t).ok(),
    };
    match d {
        Some(d) if d <= MAX_DURATION => Ok(d),
        Some(_) => Err(format!(
            "{text:?} is longer than the limit of {}",
            humantime::format_duration(MAX_DURATION)
        )),
        None => Err(format!(
            "{text:?} is not a duration: expected e.g. 200ms, 30s, 5m, 2h, 7d, or a number of seconds"
        )),
    }
}

/// A TOML key holding a duration: `"200ms"`, `"7d"`, or a number of seconds.
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    let text = match <Raw as serde::Deserialize>::deserialize(d)? {
        Raw::Secs(s) => s.to_string(),
        Raw::Text(t) => t,
    };
    parse(&text).map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_and_plain_forms() {
        assert_eq!(parse("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(parse("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse("-1").is_err());
        assert!(parse("7 fortnights").unwrap_err().contains("e.g. 200ms"));
        assert!(parse("1000000000d").unwrap_err().contains("limit"));
    }
}
