//! Human-friendly sizes and durations on the command line (`64M`, `1G`,
//! `500ms`, `5s`, `2m`).

/// Parses a size: a number of bytes with an optional binary suffix
/// `K`, `M`, `G`, `T` (also `KiB`, `MiB`, ...; case-insensitive).
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let (n, suffix) = number_and_unit(text, "a size (examples: 4096, 64M, 1G)")?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => return Err(format!("unknown size suffix `{other}` (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Parses a duration in milliseconds: a number with an optional unit
/// `ms`, `s` (the default), `m`.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(text, "a duration (examples: 500ms, 5s, 2m)")?;
    let factor = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        other => return Err(format!("unknown duration unit `{other}` (use ms, s or m)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Splits `12M` into 12 and `M`; `what` names the expected form in the error.
fn number_and_unit<'a>(text: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n = digits
        .parse()
        .map_err(|_| format!("`{text}` is not {what}"))?;
    Ok((n, unit.trim()))
}

/// Renders a byte count for people: `512 B`, `1.5 KiB`, `499.9 MiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_size_bytes("4096"), Ok(4096));
        assert_eq!(parse_size_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_size_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("2k"), Ok(2048));
        assert!(parse_size_bytes("12X").is_err());
        assert!(parse_size_bytes("M").is_err());
        assert!(parse_size_bytes("99999999999T").is_err());
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("5"), Ok(5000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert!(parse_duration_ms("5h").is_err());
        assert!(parse_duration_ms("").is_err());
    }
}
