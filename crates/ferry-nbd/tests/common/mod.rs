//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::process::Command;

/// `(offset, length, type)` rows, adjacent rows of one type merged.
pub type MapRows = Vec<(u64, u64, u32)>;

/// Merges adjacent rows with the same type.
pub fn merge(rows: impl IntoIterator<Item = (u64, u64, u32)>) -> MapRows {
    let mut out: MapRows = Vec::new();
    for (o, l, t) in rows {
        match out.last_mut() {
            Some((lo, ll, lt)) if *lt == t && *lo + *ll == o => *ll += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

/// What `nbdinfo --map[=CONTEXT] URI` reports.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> MapRows {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = ferry_testkit::run_ok(
        Command::new(ferry_testkit::tool("nbdinfo"))
            .arg(flag)
            .arg(uri),
    );
    merge(out.lines().filter(|l| !l.trim().is_empty()).map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().expect("offset"),
            f[1].parse().expect("length"),
            f[2].parse().expect("type"),
        )
    }))
}

/// Our block status in the same shape.
pub fn rows(status: Vec<(std::ops::Range<u64>, u32)>) -> MapRows {
    merge(
        status
            .into_iter()
            .map(|(r, f)| (r.start, r.end - r.start, f)),
    )
}

/// Deterministic non-trivial bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}
