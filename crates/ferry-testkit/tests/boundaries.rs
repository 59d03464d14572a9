//! Crate boundaries (docs/architecture.md): dependencies between Ferry's crates point inward, and
//! the repository, NBD and image crates never learn about each other or about hypervisors.

use std::collections::BTreeMap;
use std::path::Path;

/// What every hypervisor driver may use: the driver interface, the data paths, the HTTP stack.
const DRIVER: &[&str] = &[
    "ferry-core",
    "ferry-hv",
    "ferry-nbd",
    "ferry-image",
    "ferry-http",
    "ferry-tls",
];

/// Which Ferry crates each crate may depend on (normal dependencies). A crate missing from this
/// table fails the test, so every new crate states its place in the architecture.
const ALLOWED: &[(&str, &[&str])] = &[
    ("ferry-core", &[]),
    ("ferry-testkit", &[]),
    ("ferry-repo", &["ferry-core", "ferry-http", "ferry-tls"]),
    ("ferry-tls", &[]),
    ("ferry-http", &["ferry-tls"]),
    ("ferry-nbd", &["ferry-core", "ferry-tls"]),
    ("ferry-image", &["ferry-core"]),
    // The off-host SAN reader hands NTFS files to ferry-image and resolves their parents.
    ("ferry-fs", &["ferry-core", "ferry-image"]),
    // The Hyper-V host agent: a data-path crate (NBD server over image chains, and its client).
    (
        "ferry-agent",
        &["ferry-core", "ferry-nbd", "ferry-image", "ferry-tls"],
    ),
    (
        "ferry-engine",
        &[
            "ferry-core",
            "ferry-repo",
            "ferry-nbd",
            "ferry-image",
            "ferry-fs",
        ],
    ),
    ("ferry-hv", &["ferry-core", "ferry-http", "ferry-tls"]),
    ("ferry-hv-xen", DRIVER),
    ("ferry-hv-vmware", DRIVER),
    (
        "ferry-hv-hyperv",
        &[
            "ferry-agent",
            "ferry-fs",
            "ferry-core",
            "ferry-hv",
            "ferry-nbd",
            "ferry-image",
            "ferry-http",
            "ferry-tls",
            "ferry-wsman",
        ],
    ),
    ("ferry-wsman", &[]),
    // The simulated Hyper-V host runs the real host agent, as a host does (ADR 0151).
    (
        "ferry-sim",
        &[
            "ferry-agent",
            "ferry-core",
            "ferry-nbd",
            "ferry-wsman",
            "ferry-image",
            "ferry-http",
            "ferry-tls",
        ],
    ),
    // The appliance service knows the driver trait, the engine and the repository, never a
    // driver (the CLI hands it one through its `Backend`).
    (
        "ferry-daemon",
        &[
            "ferry-core",
            "ferry-tls",
            "ferry-http",
            "ferry-hv",
            "ferry-repo",
            "ferry-engine",
        ],
    ),
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

/// Every HTTP request and response is built by hyper or reqwest (ADR 0059): no product source
/// spells an HTTP/1.x status or request line by hand.
#[test]
fn no_hand_written_http_in_product_code() {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&crates).unwrap() {
        let src = entry.unwrap().path().join("src");
        if src.is_dir() {
            walk(&src, &mut files);
        }
    }
    assert!(files.len() > 50, "found only {} sources", files.len());
    let needle = ["HTTP/1.", ""].concat();
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().contains(&needle))
        .map(|f| f.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "hand-written HTTP in {offenders:?}");
}
