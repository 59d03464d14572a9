//! Which host paths the agent serves.
//!
//! A name is first translated (Windows paths through the configured maps), then checked
//! lexically (absolute, no `..`, under a root), then canonicalized (symlinks, junctions) and
//! checked again, so neither `..` nor a link can reach outside the roots. A path outside the
//! roots is refused before anything is opened, so the refusal does not reveal whether it exists.

use crate::AgentError;
use crate::config::PathMap;
use std::path::{Component, Path, PathBuf};

/// Why a name is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    /// Outside every root, or not a plain absolute path.
    #[error("{0}")]
    Policy(String),
    /// Inside the roots but missing or unreadable.
    #[error("{0}")]
    Missing(String),
}

/// The roots and maps of a running agent.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    roots: Vec<PathBuf>,
    maps: Vec<PathMap>,
}

/// `C:\…`, `C:/…` or a UNC `\\server\share\…` path.
pub fn is_windows_path(s: &str) -> bool {
    let b = s.as_bytes();
    (b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && (b[2] == b'\\' || b[2] == b'/'))
        || s.starts_with("\\\\")
}

/// Windows path components, lower-cased for comparison (NTFS names are case-insensitive).
fn windows_components(s: &str) -> Vec<String> {
    s.split(['\\', '/'])
        .filter(|c| !c.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl PathPolicy {
    /// Canonicalizes the roots; each must exist and be a directory.
    pub fn new(roots: &[PathBuf], maps: &[PathMap]) -> Result<Self, AgentError> {
        if roots.is_empty() {
            return Err(AgentError::Config(
                "no root is configured (--root): the agent would serve nothing".into(),
            ));
        }
        let mut canon = Vec::new();
        for r in roots {
            let c = r
                .canonicalize()
                .map_err(|e| AgentError::io(format!("root {}", r.display()), e))?;
            if !c.is_dir() {
                return Err(AgentError::Config(format!(
                    "root {} is not a directory",
                    r.display()
                )));
            }
            canon.push(c);
        }
        let mut maps = maps.to_vec();
        // Longest prefix first, so `C:\VMs\big` wins over `C:\VMs`.
        maps.sort_by_key(|m| std::cmp::Reverse(windows_components(&m.host).len()));
        Ok(Self { roots: canon, maps })
    }

    /// The roots, canonical.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The local path for host path `name` (no policy check yet).
    pub fn translate(&self, name: &str) -> Result<PathBuf, PathRefused> {
        if name.is_empty() || name.contains('\0') {
            return Err(PathRefused::Policy(
                "the export name must be a file path".into(),
            ));
        }
        if is_windows_path(name) {
            let comps = windows_components(name);
            let original: Vec<&str> = name.split(['\\', '/']).filter(|c| !c.is_empty()).collect();
            for m in &self.maps {
                let prefix = windows_components(&m.host);
                if comps.len() >= prefix.len() && comps[..prefix.len()] == prefix[..] {
                    let mut p = m.local.clone();
                    for c in &original[prefix.len()..] {
                        p.push(c);
                    }
                    return Ok(p);
                }
            }
            if cfg!(windows) {
                return Ok(PathBuf::from(name));
            }
            return Err(PathRefused::Policy(format!(
                "{name} is outside the agent's roots (no map covers it)"
            )));
        }
        Ok(PathBuf::from(name))
    }

    fn under_root(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| starts_with(p, r))
    }

    /// Checks a local path against the roots and returns it canonical.
    pub fn check_local(&self, shown: &str, p: &Path) -> Result<PathBuf, PathRefused> {
        let outside = || PathRefused::Policy(format!("{shown} is outside the agent's roots"));
        if !p.is_absolute()
            || p.components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(PathRefused::Policy(format!(
                "{shown} is not a plain absolute path"
            )));
        }
        // Lexical check first (roots are canonical; a non-canonical spelling of a path inside
        // them is caught by the second check).
        if !self.under_root(p) && !self.under_root(&lexical_parent_canon(p)) {
            return Err(outside());
        }
        let canon = p
            .canonicalize()
            .map_err(|e| PathRefused::Missing(format!("{shown}: {e}")))?;
        if !self.under_root(&canon) {
            return Err(outside());
        }
        if !canon.is_file() {
            return Err(PathRefused::Missing(format!(
                "{shown} is not a regular file"
            )));
        }
        Ok(canon)
    }

    /// Translates and checks host path `name`.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, PathRefused> {
        let local = self.translate(name)?;
        self.check_local(name, &local)
    }
}

/// `p` with its directory canonicalized when that exists (a root given through a symlink, such
/// as macOS's /tmp, still matches), else `p`.
fn lexical_parent_canon(p: &Path) -> PathBuf {
    match (
        p.parent().and_then(|d| d.canonicalize().ok()),
        p.file_name(),
    ) {
        (Some(d), Some(f)) => d.join(f),
        _ => p.to_path_buf(),
    }
}

#[cfg(not(windows))]
fn starts_with(p: &Path, root: &Path) -> bool {
    p.starts_with(root)
}

// Windows: drive letters and names compare case-insensitively.
#[cfg(windows)]
fn starts_with(p: &Path, root: &Path) -> bool {
    let lower = |x: &Path| PathBuf::from(x.to_string_lossy().to_lowercase());
    lower(p).starts_with(lower(root))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> PathPolicy {
        PathPolicy::new(
            &[dir.to_path_buf()],
            &["C:\\VMs=".to_string() + dir.to_str().unwrap()]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn maps_windows_paths_case_insensitively_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("vm")).unwrap();
        std::fs::write(d.path().join("vm/Disk.vhdx"), b"x").unwrap();
        std::fs::write(
            d.path().parent().unwrap().join("outside-ferry-agent-test"),
            b"x",
        )
        .ok();
        let p = policy(d.path());
        let canon = d.path().canonicalize().unwrap();
        assert_eq!(
            p.resolve("c:\\vms\\vm\\Disk.vhdx").unwrap(),
            canon.join("vm/Disk.vhdx")
        );
        assert!(matches!(
            p.resolve("C:\\VMs\\..\\outside-ferry-agent-test"),
            Err(PathRefused::Policy(_))
        ));
        assert!(matches!(
            p.resolve("D:\\other\\x.vhdx"),
            Err(PathRefused::Policy(_))
        ));
        assert!(matches!(
            p.resolve("/etc/passwd"),
            Err(PathRefused::Policy(_))
        ));
        assert!(matches!(
            p.resolve("relative.vhdx"),
            Err(PathRefused::Policy(_))
        ));
        assert!(matches!(
            p.resolve("C:\\VMs\\vm\\missing.vhdx"),
            Err(PathRefused::Missing(_))
        ));
        // A symlink inside the root that points outside is refused after canonicalization.
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("vm/link.vhdx")).unwrap();
        assert!(matches!(
            p.resolve("C:\\VMs\\vm\\link.vhdx"),
            Err(PathRefused::Policy(_))
        ));
        assert!(matches!(p.resolve(""), Err(PathRefused::Policy(_))));
    }
}
