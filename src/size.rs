//! Byte sizes on the command line and in configuration files: `64MiB`, `512 KiB`,
//! `1GB`, or a plain number of bytes. One parser for the flags and both daemons'
//! files, so they read alike.

/// A size from a flag's or a key's text, within `min..=max`; the error says what form
/// is expected, or which limit was passed.
pub fn parse(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let bytes = parse_size::parse_size(text.trim()).map_err(|_| {
        format!("{text:?} is not a size: expected e.g. 64MiB, 512KiB, 1GiB, or a number of bytes")
    })?;
    if bytes < min {
        return Err(format!("{text:?} is below the minimum of {}", show(min)));
    }
    if bytes > max {
        return Err(format!("{text:?} is above the limit of {}", show(max)));
    }
    Ok(bytes)
}

/// A size as people write it: whole MiB or KiB when it is one, else bytes.
pub fn show(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    match bytes {
        b if b >= GIB && b % GIB == 0 => format!("{}GiB", b / GIB),
        b if b >= MIB && b % MIB == 0 => format!("{}MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{}KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

/// A TOML key holding a size: `"64MiB"` or a number of bytes, checked as [`parse`] does.
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
    min: u64,
    max: u64,
) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    let text = match <Raw as serde::Deserialize>::deserialize(d)? {
        Raw::Bytes(b) => b.to_string(),
        Raw::Text(t) => t,
    };
    parse(&text, min, max)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_limits() {
        let any = |t| parse(t, 0, u64::MAX);
        assert_eq!(any("64MiB"), Ok(64 << 20));
        assert_eq!(any("512 KiB"), Ok(512 << 10));
        assert_eq!(any("1GB"), Ok(1_000_000_000));
        assert_eq!(any("4096"), Ok(4096));
        assert!(any("lots").unwrap_err().contains("e.g. 64MiB"));
        assert!(parse("1KiB", 1 << 20, u64::MAX)
            .unwrap_err()
            .contains("minimum of 1MiB"));
        assert!(parse("2GiB", 0, 1 << 30)
            .unwrap_err()
            .contains("limit of 1GiB"));
        assert_eq!(show(3 << 20), "3MiB");
        assert_eq!(show(1000), "1000 bytes");
    }
}
