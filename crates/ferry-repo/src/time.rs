//! Wall-clock helpers (UTC, RFC 3339 with second precision).

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// Now, as RFC 3339.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Now, in seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    Utc::now().timestamp()
}

/// Seconds since the epoch as RFC 3339 (`?` if out of range).
pub fn unix_to_rfc3339(secs: i64) -> String {
    Utc.timestamp_opt(secs, 0)
        .single()
        .map(|t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "?".into())
}
