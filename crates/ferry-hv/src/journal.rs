//! A crash journal: before a driver creates a temporary object on the hypervisor (snapshot,
//! attachment, task) it records it here, and removes the record once the object is gone. A
//! process killed in between leaves the record, and the next run's `recover` deletes the
//! object. One small JSON file per source, replaced atomically (write + rename).
//!
//! Each entry names the process that wrote it ([`process_owner`]: host, pid and the pid's start
//! time). The clean-up a backup runs before it starts takes only [`orphans`](Journal::orphans),
//! entries of processes that are gone: two backups of one appliance (or a CLI backup next to a
//! running appliance) share a journal, and one must not destroy the other's snapshot.

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
    /// The [`process_owner`] that created it (absent in journals of older versions: orphans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`), so
/// a recycled pid is not taken for the process that wrote an entry.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process as an owner of journal entries and hypervisor markers: `HOST pid PID start
/// TICKS`. The appliance writes the same text into its work leases, so whoever takes over a
/// dead appliance's VM can find the snapshots that appliance left.
pub fn process_owner() -> String {
    let pid = std::process::id();
    format!(
        "{} pid {pid} start {}",
        hostname(),
        start_ticks(pid).unwrap_or(0)
    )
}

/// Whether the process `owner` names still runs (on this host).
pub fn owner_alive(owner: &str) -> bool {
    let mut it = owner.split(' ');
    let (Some(host), Some("pid"), Some(pid), Some("start"), Some(start)) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    host == hostname() && start_ticks(pid) == Some(start)
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
            owner: Some(process_owner()),
        });
        self.store(&f)
    }

    /// Forgets `kind`/`id` (it is gone).
    pub fn remove(&self, kind: &str, id: &str) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = self.load()?;
        f.entries.retain(|e| e.kind != kind || e.id != id);
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

    /// The entries whose owner process is gone (killed runs): what a backup may clean up
    /// before it starts without touching a running backup's objects.
    pub fn orphans(&self) -> std::io::Result<Vec<Entry>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| !e.owner.as_deref().is_some_and(owner_alive))
            .collect())
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
                id: "OpaqueRef:1".into(),
                owner: Some(process_owner()),
            }]
        );
        // This process is alive: its entry is no orphan.
        assert!(j2.orphans().unwrap().is_empty());
        std::fs::write(d.path().join("lab.journal.json"), b"{not json").unwrap();
        let e = j2.entries().unwrap_err();
        assert!(e.to_string().contains("lab.journal.json"), "{e}");
    }

    #[test]
    fn entries_of_dead_or_unknown_processes_are_orphans() {
        let d = tempfile::tempdir().unwrap();
        let me = process_owner();
        assert!(owner_alive(&me), "{me}");
        // The same pid with another start time is a recycled pid, not us.
        let recycled = me.rsplit_once(' ').unwrap().0.to_string() + " 1";
        assert!(!owner_alive(&recycled));
        assert!(!owner_alive("garbage"));
        let other_host = format!("not-{me}");
        assert!(!owner_alive(&other_host));
        let file = serde_json::json!({"version": 1, "entries": [
            {"kind": "snapshot", "id": "a", "owner": me},
            {"kind": "snapshot", "id": "b", "owner": recycled},
            {"kind": "snapshot", "id": "c"},
        ]});
        std::fs::write(d.path().join("lab.journal.json"), file.to_string()).unwrap();
        let j = Journal::new(d.path(), "lab");
        let ids: Vec<String> = j.orphans().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["b", "c"]);
        j.remove("snapshot", "b").unwrap();
        assert_eq!(j.entries().unwrap().len(), 2);
    }
}
