//! A crash journal: before a driver creates a temporary object on the hypervisor (snapshot,
//! attachment, task) it records it here, and removes the record once the object is gone. A
//! process killed in between leaves the record, and the next run's `recover` deletes the
//! object. One small JSON file per source, replaced atomically (write + rename).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Format version of the journal file.
pub const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    entries: BTreeSet<Entry>,
}

/// One temporary object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    /// Object class, e.g. `snapshot`, `vbd`, `task`.
    pub kind: String,
    /// Its id on the hypervisor.
    pub id: String,
}

/// The journal of one source.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Journal {
    /// The journal at `dir/<source>.journal.json` (the directory is created on first write).
    pub fn new(dir: &Path, source: &str) -> Self {
        Self {
            path: dir.join(format!("{source}.journal.json")),
            lock: Mutex::new(()),
        }
    }

    fn load(&self) -> std::io::Result<File> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice::<File>(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("journal {}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File {
                version: VERSION,
                entries: BTreeSet::new(),
            }),
            Err(e) => Err(e),
        }
    }

    fn store(&self, f: &File) -> std::io::Result<()> {
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(f).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Records `kind`/`id` as created.
    pub fn add(&self, kind: &str, id: &str) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = self.load()?;
        f.entries.insert(Entry {
            kind: kind.into(),
            id: id.into(),
        });
        self.store(&f)
    }

    /// Forgets `kind`/`id` (it is gone).
    pub fn remove(&self, kind: &str, id: &str) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = self.load()?;
        f.entries.remove(&Entry {
            kind: kind.into(),
            id: id.into(),
        });
        self.store(&f)
    }

    /// Records (`add`) or forgets `kind`/`id`, best effort: a journal that cannot be written is
    /// logged and the work goes on (a journal is a help for the clean-up, not a condition of it).
    pub fn note(&self, source: &str, add: bool, kind: &str, id: &str) {
        let r = if add {
            self.add(kind, id)
        } else {
            self.remove(kind, id)
        };
        if let Err(e) = r {
            tracing::warn!(%source, error = %e, "crash journal not updated");
        }
    }

    /// Everything recorded.
    pub fn entries(&self) -> std::io::Result<Vec<Entry>> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self.load()?.entries.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path(), "lab");
        j.add("snapshot", "OpaqueRef:1").unwrap();
        j.add("vbd", "OpaqueRef:2").unwrap();
        j.remove("vbd", "OpaqueRef:2").unwrap();
        let j2 = Journal::new(d.path(), "lab");
        assert_eq!(
            j2.entries().unwrap(),
            vec![Entry {
                kind: "snapshot".into(),
                id: "OpaqueRef:1".into()
            }]
        );
        std::fs::write(d.path().join("lab.journal.json"), b"{not json").unwrap();
        let e = j2.entries().unwrap_err();
        assert!(e.to_string().contains("lab.journal.json"), "{e}");
    }
}
