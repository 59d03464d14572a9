//! Human-readable byte counts and rates (binary units, as disk tools print them).

/// Formats `bytes` as e.g. `16.0 GiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Formats a rate, e.g. `812.3 MiB/s`; `-` when `seconds` is not positive.
pub fn human_rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 || !seconds.is_finite() {
        return "-".to_string();
    }
    format!("{}/s", human_bytes((bytes as f64 / seconds) as u64))
}

/// Parses sizes such as `4M`, `4MiB`, `1G`, `512`, `64k` (binary multiples).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(16 << 30), "16.0 GiB");
        assert_eq!(human_rate(1 << 20, 0.5), "2.0 MiB/s");
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999T"), None);
    }
}
