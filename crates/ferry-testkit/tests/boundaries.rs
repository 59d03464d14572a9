//! Crate boundaries (docs/architecture.md): dependencies between Ferry's crates point inward, and
//! the repository, NBD and image crates never learn about each other or about hypervisors.

use std::collections::BTreeMap;
use std::path::Path;

/// Which Ferry crates each crate may depend on (normal dependencies). A crate missing from this
/// table fails the test, so every new crate states its place in the architecture.
const ALLOWED: &[(&str, &[&str])] = &[
    ("ferry-core", &[]),
    ("ferry-testkit", &[]),
    ("ferry-repo", &["ferry-core"]),
    ("ferry-nbd", &["ferry-core"]),
    ("ferry-image", &["ferry-core"]),
    (
        "ferry-engine",
        &["ferry-core", "ferry-repo", "ferry-nbd", "ferry-image"],
    ),
    ("ferry-hv", &["ferry-core"]),
    (
        "ferry-hv-xen",
        &["ferry-core", "ferry-hv", "ferry-nbd", "ferry-image"],
    ),
    (
        "ferry-hv-vmware",
        &["ferry-core", "ferry-hv", "ferry-nbd", "ferry-image"],
    ),
    (
        "ferry-hv-hyperv",
        &["ferry-core", "ferry-hv", "ferry-nbd", "ferry-image"],
    ),
    ("ferry-sim", &["ferry-core", "ferry-nbd", "ferry-image"]),
    ("ferry-cli", &["*"]),
];

fn ferry_deps(manifest: &toml::Table) -> Vec<String> {
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| {
            t.keys()
                .filter(|k| k.starts_with("ferry-"))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dependencies_point_inward() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut seen = 0;
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(&crates).unwrap() {
        let manifest_path = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest_path) else {
            continue;
        };
        let manifest: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", manifest_path.display()));
        let name = manifest["package"]["name"].as_str().unwrap().to_string();
        seen += 1;
        let Some(ok) = allowed.get(name.as_str()) else {
            problems.push(format!("{name}: not in the ALLOWED table of {}", file!()));
            continue;
        };
        for dep in ferry_deps(&manifest) {
            if !ok.contains(&"*") && !ok.contains(&dep.as_str()) {
                problems.push(format!("{name} must not depend on {dep}"));
            }
        }
    }
    assert!(
        seen >= 3,
        "found only {seen} crates under {}",
        crates.display()
    );
    assert!(
        problems.is_empty(),
        "crate boundaries broken:\n{}",
        problems.join("\n")
    );
}
