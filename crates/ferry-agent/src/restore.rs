//! Restore exports (ADR 0169): the appliance writes a restored VM's disks through the agent,
//! so a whole-VM restore to Hyper-V needs no share mounted on the appliance.
//!
//! Requests are NBD export names asked for at `NBD_OPT_GO`, over the same mutually pinned TLS
//! as the read exports; a refusal is the option's error reply with a message, success an
//! export. Every name starts with [`PREFIX`] (host paths, the read exports' names, never do):
//!
//! * `mkdir:<folder>` — a NEW folder (missing parents too) under a restore root, marked with
//!   [`MARKER`] as a restore's; an existing folder is refused ("already exists").
//! * `create:vhdx:<size>:<path>` — a writable export staging a NEW disk in a marked folder:
//!   writes land in an unlinked temporary file on that volume (a killed agent or a cut
//!   connection leaves nothing). Every connection of a multi-connection client asks the same
//!   name and shares the staged bytes.
//! * `commit:<path>` — once no connection writes any more, the staged disk is written as a
//!   dynamic VHDX by `ferry-image` (a hidden temporary name renamed into place: complete or
//!   absent); the answer is a read-only export of the new file, whose size the client checks.
//! * `update:vhdx:<path>` — a writable export of an EXISTING `.vhdx` / `.avhdx` in a marked
//!   folder (a replica standby's current disk, ADR 0176): it reads as the file's disk (its chain
//!   resolved under the roots) and stages writes like `create`; `commit:<path>` then writes the
//!   whole VHDX blocks the writes touched into the file in place (`ferry_image::VhdxUpdater`:
//!   data, fsync, BAT entry, fsync). Nothing changes in the file before the commit.
//! * `delete:<folder>` — removes a marked folder: the files restores created in it (listed in
//!   the marker) and the `.avhdx` checkpoint children Hyper-V made over them
//!   ([`crate::restore_children`]), then empty subfolders and the folder. Anything else stays.
//!
//! A staged disk nobody commits is dropped once no connection has used it for 15 minutes
//! (checked every minute and at each request).

use crate::export::RootedResolver;
use crate::paths::{PathPolicy, PathRefused};
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use ferry_image::{FileSource, ImageWriter, OutputFormat};
use ferry_nbd::{CowOverlay, ExportProvider, ExportRefused, NbdExport};
use std::collections::HashMap;
use std::ffi::OsString;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What every restore request's export name starts with.
pub const PREFIX: &str = "ferry-restore:1:";
/// The file that marks a folder as made by a restore, listing the disks created in it.
pub const MARKER: &str = "ferry-restore.json";
/// Largest disk a restore creates (VHDX's limit).
pub const MAX_SIZE: u64 = 64 << 40;
/// How long a staged disk without connections is kept for its commit.
const IDLE: Duration = Duration::from_secs(15 * 60);
/// How long a commit waits for the writing connections to close.
const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// Bytes copied per step when a staged disk becomes a VHDX.
const PIECE: usize = 1 << 20;

/// One restore request, as carried in an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreRequest {
    /// Make a new folder under a restore root.
    Mkdir {
        /// Host path of the folder.
        folder: String,
    },
    /// Stage a new VHDX of `size` bytes at `path`.
    Create {
        /// Virtual size: a non-zero multiple of 512 up to [`MAX_SIZE`].
        size: u64,
        /// Host path of the file, in a folder `Mkdir` made.
        path: String,
    },
    /// Write the staged disk at `path` as a VHDX.
    Commit {
        /// Host path of the file.
        path: String,
    },
    /// Stage writes into the existing VHDX at `path`, applied in place by `Commit`.
    Update {
        /// Host path of the file, in a folder `Mkdir` made.
        path: String,
    },
    /// Remove a folder `Mkdir` made, with what restores created in it.
    Delete {
        /// Host path of the folder.
        folder: String,
    },
}

impl RestoreRequest {
    /// The request in export name `name`; `None` when the name is not a restore request.
    pub fn parse(name: &str) -> Option<Result<Self, String>> {
        name.strip_prefix(PREFIX).map(Self::parse_rest)
    }

    fn parse_rest(rest: &str) -> Result<Self, String> {
        let (verb, args) = rest
            .split_once(':')
            .ok_or_else(|| format!("a restore request is {PREFIX}VERB:ARGUMENTS"))?;
        let path = |p: &str| {
            if p.is_empty() || p.contains('\0') {
                Err(format!("{verb}: a host path is needed"))
            } else {
                Ok(p.to_string())
            }
        };
        match verb {
            "mkdir" => Ok(Self::Mkdir {
                folder: path(args)?,
            }),
            "commit" => Ok(Self::Commit { path: path(args)? }),
            "update" => {
                let p = args
                    .strip_prefix("vhdx:")
                    .ok_or("update: the form is update:vhdx:PATH")?;
                Ok(Self::Update { path: path(p)? })
            }
            "delete" => Ok(Self::Delete {
                folder: path(args)?,
            }),
            "create" => {
                let (format, rest) = args
                    .split_once(':')
                    .ok_or("create: the form is create:vhdx:SIZE:PATH")?;
                if format != "vhdx" {
                    return Err(format!(
                        "create: format `{format}` is not supported (only vhdx)"
                    ));
                }
                let (size, p) = rest
                    .split_once(':')
                    .ok_or("create: the form is create:vhdx:SIZE:PATH")?;
                let size = Some(size)
                    .filter(|s| {
                        // Canonical decimal: one spelling per size.
                        !s.is_empty()
                            && s.len() <= 20
                            && !(s.len() > 1 && s.starts_with('0'))
                            && s.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("create: size `{size}` is not a number of bytes"))?;
                if size == 0 || size % 512 != 0 || size > MAX_SIZE {
                    return Err(format!(
                        "create: a VHDX needs a size that is a non-zero multiple of 512 up to {MAX_SIZE}, not {size}"
                    ));
                }
                Ok(Self::Create {
                    size,
                    path: path(p)?,
                })
            }
            other => Err(format!(
                "unknown restore request `{other}` (mkdir, create, update, commit, delete)"
            )),
        }
    }

    /// The export name carrying this request.
    pub fn export_name(&self) -> String {
        match self {
            Self::Mkdir { folder } => format!("{PREFIX}mkdir:{folder}"),
            Self::Create { size, path } => format!("{PREFIX}create:vhdx:{size}:{path}"),
            Self::Commit { path } => format!("{PREFIX}commit:{path}"),
            Self::Update { path } => format!("{PREFIX}update:vhdx:{path}"),
            Self::Delete { folder } => format!("{PREFIX}delete:{folder}"),
        }
    }

    /// `mkdir C:\…`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Mkdir { folder } => format!("mkdir {folder}"),
            Self::Create { size, path } => format!("create {path} ({size} bytes)"),
            Self::Commit { path } => format!("commit {path}"),
            Self::Update { path } => format!("update {path}"),
            Self::Delete { folder } => format!("delete {folder}"),
        }
    }
}

/// The fuzz and proptest entry point: any bytes, as an export name, parse to nothing, an error
/// or a request whose export name is the input again.
pub fn fuzz_request(data: &[u8]) {
    let name = String::from_utf8_lossy(data);
    if let Some(Ok(r)) = RestoreRequest::parse(&name) {
        assert_eq!(r.export_name(), name, "a request round-trips");
    }
    if let Ok(r) = RestoreRequest::parse_rest(&name) {
        let again = r.export_name();
        assert_eq!(RestoreRequest::parse(&again), Some(Ok(r)));
    }
}

/// Zeros of a given size: what a new disk reads as before it is written.
#[derive(Debug)]
struct Zeros {
    size: u64,
}

#[async_trait]
impl BlockSource for Zeros {
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> String {
        "new disk".into()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&"new disk", offset, buf.len() as u64, self.size)?;
        buf.fill(0);
        Ok(())
    }
    async fn allocated(&self, _range: Range<u64>) -> Result<ExtentMap, BlockError> {
        Ok(ExtentMap::new())
    }
}

/// A disk being written: its staging overlay and where it goes.
struct Staged {
    overlay: Arc<CowOverlay>,
    size: u64,
    /// Writes into an existing file (`update`), not a new disk.
    update: bool,
    folder: PathBuf,
    /// Last time a connection was seen using it.
    seen: Instant,
}

/// The restore side of an agent: its restore roots and the disks being written.
pub struct RestoreExports {
    policy: Option<Arc<PathPolicy>>,
    staged: Mutex<HashMap<PathBuf, Staged>>,
}

impl std::fmt::Debug for RestoreExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreExports")
            .field("roots", &self.policy.as_ref().map(|p| p.roots().to_vec()))
            .finish()
    }
}

fn policy(message: String) -> ExportRefused {
    ExportRefused {
        policy: true,
        message,
    }
}

fn unknown(message: String) -> ExportRefused {
    ExportRefused {
        policy: false,
        message,
    }
}

fn refused(e: PathRefused) -> ExportRefused {
    ExportRefused {
        policy: matches!(e, PathRefused::Policy(_)),
        message: e.to_string(),
    }
}

/// An answer of no size, for requests whose success is all there is to say.
fn done(name: &str) -> NbdExport {
    NbdExport::read_only(name, Arc::new(Zeros { size: 0 }))
}

/// The disk names a marker lists.
fn marker_files(folder: &Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(folder.join(MARKER))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(std::io::Error::other)?;
    Ok(v["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Rewrites the marker of `folder` with `files` (through a temporary name: never half a list).
fn write_marker(folder: &Path, files: &[String]) -> std::io::Result<()> {
    let text = serde_json::json!({"made_by": "ferry-agent (restore)", "files": files}).to_string();
    let tmp = folder.join(format!(".{MARKER}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, folder.join(MARKER))
}

/// A plain file name a restore may have made (no separators, not `.`/`..`, not hidden).
/// Adds `file` (host path `path`) to the marker of `folder`: `delete` removes what it lists.
fn list_in_marker(folder: &Path, file: &str, path: &str) -> Result<(), ExportRefused> {
    let mut files =
        marker_files(folder).map_err(|e| unknown(format!("{path}: the folder's {MARKER}: {e}")))?;
    if !files.iter().any(|f| f == file) {
        files.push(file.to_string());
        write_marker(folder, &files)
            .map_err(|e| unknown(format!("{path}: cannot update {MARKER}: {e}")))?;
    }
    Ok(())
}

fn plain_name(n: &str) -> bool {
    !n.is_empty() && !n.starts_with('.') && !n.contains(['/', '\\', '\0']) && n != MARKER
}

/// The hidden name `ferry-image`'s writer uses until it renames a file into place.
fn part_name(n: &str) -> String {
    format!(".{n}.ferry-part")
}

impl RestoreExports {
    /// Restore exports under `roots` (translated through `maps`); none when `roots` is empty.
    pub fn new(roots: &[PathBuf], maps: &[crate::PathMap]) -> Result<Self, crate::AgentError> {
        let policy = if roots.is_empty() {
            None
        } else {
            Some(Arc::new(PathPolicy::new(roots, maps)?))
        };
        Ok(Self {
            policy,
            staged: Mutex::new(HashMap::new()),
        })
    }

    fn policy(&self) -> Result<&Arc<PathPolicy>, ExportRefused> {
        self.policy.as_ref().ok_or_else(|| {
            policy(
                "this agent takes no restores: no restore root is configured (restore_roots, --restore-root)".into(),
            )
        })
    }

    fn under_root(&self, p: &Path) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|pol| pol.roots().iter().any(|r| p.starts_with(r)))
    }

    /// Host path `host` as a local, absolute path without `.`/`..`.
    fn local(&self, host: &str) -> Result<PathBuf, ExportRefused> {
        let p = self.policy()?.translate(host).map_err(refused)?;
        let plain = p.is_absolute()
            && p.file_name().is_some()
            && !p
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
        if !plain {
            return Err(policy(format!("{host} is not a plain absolute path")));
        }
        Ok(p)
    }

    fn outside(host: &str) -> ExportRefused {
        policy(format!("{host} is outside the agent's restore roots"))
    }

    /// Canonical folder `local` (host path `host`), a marked restore folder below a root.
    fn restore_folder(&self, host: &str, local: &Path) -> Result<PathBuf, ExportRefused> {
        let canon = match local.canonicalize() {
            Ok(c) if self.under_root(&c) => c,
            Ok(_) => return Err(Self::outside(host)),
            Err(_) if self.under_root(local) => {
                return Err(unknown(format!(
                    "{host} does not exist: a restore writes into a folder it made (mkdir)"
                )));
            }
            Err(_) => return Err(Self::outside(host)),
        };
        if !canon.join(MARKER).is_file() {
            return Err(policy(format!(
                "{host} was not made by a restore: the agent writes and deletes only in folders it made"
            )));
        }
        Ok(canon)
    }

    /// The staged disk's key for file `path`: its canonical folder and file name.
    fn file_key(&self, path: &str) -> Result<(PathBuf, String), ExportRefused> {
        let local = self.local(path)?;
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lower = name.to_ascii_lowercase();
        if !plain_name(&name) || !(lower.ends_with(".vhdx") || lower.ends_with(".avhdx")) {
            return Err(policy(format!(
                "{path}: a restored disk is a plain file name ending in .vhdx (or .avhdx)"
            )));
        }
        let parent = local.parent().unwrap_or(Path::new("/"));
        let folder_host = path
            .rsplit_once(['\\', '/'])
            .map_or(path, |(f, _)| f)
            .to_string();
        let folder = self.restore_folder(&folder_host, parent)?;
        Ok((folder, name))
    }

    /// Drops staged disks nobody has used for [`IDLE`] (the server calls it every minute).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut staged = self.staged.lock().expect("restore lock");
        staged.retain(|k, s| {
            // The table holds one reference; each open export two more.
            if Arc::strong_count(&s.overlay) > 1 {
                s.seen = now;
                return true;
            }
            let keep = now.duration_since(s.seen) < IDLE;
            if !keep {
                tracing::warn!(file = %k.display(), "dropped a restored disk nobody committed");
            }
            keep
        });
    }

    /// Serves restore request `req` (asked for as export `name`).
    pub async fn open(&self, name: &str, req: RestoreRequest) -> Result<NbdExport, ExportRefused> {
        self.sweep();
        let what = req.describe();
        let r = match req {
            RestoreRequest::Mkdir { folder } => self.mkdir(name, &folder),
            RestoreRequest::Create { size, path } => self.create(name, size, &path),
            RestoreRequest::Commit { path } => self.commit(name, &path).await,
            RestoreRequest::Update { path } => self.update(name, &path).await,
            RestoreRequest::Delete { folder } => self.delete(name, &folder),
        };
        match &r {
            Ok(_) => tracing::info!(request = %what, "restore request done"),
            Err(e) => {
                tracing::warn!(request = %what, error = %e.message, "restore request refused")
            }
        }
        r
    }

    fn mkdir(&self, name: &str, host: &str) -> Result<NbdExport, ExportRefused> {
        let local = self.local(host)?;
        // The deepest existing ancestor must be inside a root; what is missing below it is made
        // one plain component at a time.
        let mut anc = local.clone();
        let mut missing: Vec<OsString> = Vec::new();
        loop {
            match std::fs::symlink_metadata(&anc) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let Some(n) = anc.file_name() else {
                        return Err(Self::outside(host));
                    };
                    missing.push(n.to_os_string());
                    if !anc.pop() {
                        return Err(Self::outside(host));
                    }
                }
                Err(_) => return Err(Self::outside(host)),
            }
        }
        let mut at = match anc.canonicalize() {
            Ok(c) if self.under_root(&c) && c.is_dir() => c,
            _ => return Err(Self::outside(host)),
        };
        if missing.is_empty() {
            return Err(unknown(format!("{host} already exists")));
        }
        for c in missing.iter().rev() {
            at.push(c);
            match std::fs::create_dir(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(unknown(format!("{host} already exists")));
                }
                Err(e) => return Err(unknown(format!("{host}: cannot create it: {e}"))),
            }
        }
        if let Err(e) = write_marker(&at, &[]) {
            let _ = std::fs::remove_dir(&at);
            return Err(unknown(format!(
                "{host}: cannot mark it as a restore's: {e}"
            )));
        }
        Ok(done(name))
    }

    fn create(&self, name: &str, size: u64, path: &str) -> Result<NbdExport, ExportRefused> {
        let (folder, file) = self.file_key(path)?;
        if !file.to_ascii_lowercase().ends_with(".vhdx") {
            return Err(policy(format!("{path}: a new disk is a .vhdx file")));
        }
        let key = folder.join(&file);
        let mut staged = self.staged.lock().expect("restore lock");
        drop_abandoned(&mut staged, &key);
        if let Some(s) = staged.get_mut(&key) {
            // Another connection of the same writer.
            if s.size != size {
                return Err(policy(format!(
                    "{path} is being written with a size of {} bytes, not {size}",
                    s.size
                )));
            }
            s.seen = Instant::now();
            return Ok(NbdExport::writable(name, s.overlay.clone()));
        }
        if std::fs::symlink_metadata(&key).is_ok()
            || std::fs::symlink_metadata(folder.join(part_name(&file))).is_ok()
        {
            return Err(unknown(format!(
                "{path} already exists: a restore creates new files only"
            )));
        }
        list_in_marker(&folder, &file, path)?;
        let overlay = CowOverlay::new_in(Arc::new(Zeros { size }), &folder)
            .map_err(|e| unknown(format!("{path}: cannot stage the disk: {e}")))?;
        let overlay = Arc::new(overlay);
        staged.insert(
            key,
            Staged {
                overlay: overlay.clone(),
                size,
                update: false,
                folder,
                seen: Instant::now(),
            },
        );
        tracing::info!(file = %path, size, "staging a restored disk");
        Ok(NbdExport::writable(name, overlay))
    }

    async fn commit(&self, name: &str, path: &str) -> Result<NbdExport, ExportRefused> {
        let (folder, file) = self.file_key(path)?;
        let key = folder.join(&file);
        let (overlay, size, update) = {
            let staged = self.staged.lock().expect("restore lock");
            let s = staged.get(&key).ok_or_else(|| {
                unknown(format!(
                    "{path}: no disk is being written there (create it first; an unused one is dropped after {} minutes)",
                    IDLE.as_secs() / 60
                ))
            })?;
            (s.overlay.clone(), s.size, s.update)
        };
        // The writer's connections close after their last replies; the table and this hold
        // the only references once they have.
        let until = Instant::now() + COMMIT_WAIT;
        while Arc::strong_count(&overlay) > 2 {
            if Instant::now() > until {
                return Err(unknown(format!(
                    "{path}: a connection still writes the disk; close it before the commit"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        {
            let mut staged = self.staged.lock().expect("restore lock");
            match staged.get(&key) {
                Some(s) if Arc::ptr_eq(&s.overlay, &overlay) => {
                    staged.remove(&key);
                }
                _ => return Err(unknown(format!("{path}: the disk was dropped meanwhile"))),
            }
        }
        let dest = key.clone();
        let rt = tokio::runtime::Handle::current();
        let written = tokio::task::spawn_blocking(move || {
            if update {
                update_vhdx(&overlay, &dest, &rt)
            } else {
                to_vhdx(&overlay, size, &dest, &rt)
            }
        })
        .await
        .map_err(|e| unknown(format!("{path}: {e}")))?
        .map_err(|e| unknown(format!("{path}: cannot write the VHDX: {e}")))?;
        tracing::info!(file = %path, size, written, "restored disk written");
        let file = FileSource::open(&key).map_err(|e| unknown(format!("{path}: {e}")))?;
        let resolver = RootedResolver::new(self.policy()?.clone());
        let opened = ferry_image::open_source(Arc::new(file), &resolver)
            .await
            .map_err(|e| unknown(format!("{path}: the written VHDX does not open: {e}")))?;
        Ok(NbdExport::read_only(name, opened.source)
            .with_description(format!("{} {}", opened.info.format, opened.info.subformat)))
    }

    async fn update(&self, name: &str, path: &str) -> Result<NbdExport, ExportRefused> {
        let (folder, file) = self.file_key(path)?;
        let key = folder.join(&file);
        {
            let mut staged = self.staged.lock().expect("restore lock");
            drop_abandoned(&mut staged, &key);
            if let Some(s) = staged.get_mut(&key) {
                if !s.update {
                    return Err(policy(format!("{path} is being created, not updated")));
                }
                s.seen = Instant::now();
                return Ok(NbdExport::writable(name, s.overlay.clone()));
            }
        }
        let f = FileSource::open(&key).map_err(|e| {
            unknown(format!(
                "{path}: {e}: an update writes into an existing disk"
            ))
        })?;
        let resolver = RootedResolver::new(self.policy()?.clone());
        let opened = ferry_image::open_source(Arc::new(f), &resolver)
            .await
            .map_err(|e| unknown(format!("{path}: {e}")))?;
        if opened.info.format != ferry_image::Format::Vhdx {
            return Err(policy(format!("{path} is not a VHDX")));
        }
        let size = opened.source.size();
        // Listed in the marker: `delete` of the folder removes it too.
        list_in_marker(&folder, &file, path)?;
        let overlay = CowOverlay::new_in(opened.source, &folder)
            .map_err(|e| unknown(format!("{path}: cannot stage the writes: {e}")))?;
        let overlay = Arc::new(overlay);
        let mut staged = self.staged.lock().expect("restore lock");
        if let Some(s) = staged.get(&key) {
            // Another connection won the race: share its staging.
            return Ok(NbdExport::writable(name, s.overlay.clone()));
        }
        staged.insert(
            key,
            Staged {
                overlay: overlay.clone(),
                size,
                update: true,
                folder,
                seen: Instant::now(),
            },
        );
        tracing::info!(file = %path, size, "staging writes into a disk");
        Ok(NbdExport::writable(name, overlay))
    }

    fn delete(&self, name: &str, host: &str) -> Result<NbdExport, ExportRefused> {
        let local = self.local(host)?;
        if let Err(e) = std::fs::symlink_metadata(&local) {
            if e.kind() == std::io::ErrorKind::NotFound && self.under_root(&local) {
                return Ok(done(name));
            }
            return Err(Self::outside(host));
        }
        let folder = self.restore_folder(host, &local)?;
        if self.policy()?.roots().iter().any(|r| r.as_path() == folder) {
            return Err(policy(format!("{host} is a restore root")));
        }
        self.staged
            .lock()
            .expect("restore lock")
            .retain(|_, s| s.folder != folder);
        let mut files =
            marker_files(&folder).map_err(|e| unknown(format!("{host}: its {MARKER}: {e}")))?;
        // Hyper-V's checkpoint files over the listed disks go too (ADR 0187).
        files.extend(crate::restore_children::checkpoint_children(
            &folder, &files,
        ));
        for f in files.iter().filter(|f| plain_name(f)) {
            for n in [f.clone(), part_name(f)] {
                match std::fs::remove_file(folder.join(&n)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(unknown(format!("{host}\\{n}: cannot remove it: {e}"))),
                }
            }
        }
        let _ = std::fs::remove_file(folder.join(format!(".{MARKER}.tmp")));
        std::fs::remove_file(folder.join(MARKER))
            .map_err(|e| unknown(format!("{host}: cannot remove {MARKER}: {e}")))?;
        remove_empty_dirs(&folder);
        if folder.exists() {
            tracing::warn!(folder = %host, "kept a restore folder: it holds files no restore made");
        }
        Ok(done(name))
    }
}

/// Everything an agent serves: restore requests (by [`PREFIX`]) and read exports (host paths).
#[derive(Debug)]
pub struct AgentProvider {
    /// The read exports.
    pub read: crate::export::AgentExports,
    /// The restore side.
    pub restore: RestoreExports,
}

#[async_trait]
impl ExportProvider for AgentProvider {
    async fn open(&self, name: &str) -> Result<NbdExport, ExportRefused> {
        match RestoreRequest::parse(name) {
            Some(Ok(r)) => self.restore.open(name, r).await,
            Some(Err(m)) => Err(policy(m)),
            None => self.read.open_chain(name).await,
        }
    }
}

/// Removes the empty directories of the tree at `dir`, `dir` included; never a file.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Writes the staged bytes of `overlay` as a dynamic VHDX at `dest` (blocking; reads through
/// `rt`); the non-zero bytes. `ferry-image` writes under a hidden name and renames at the end.
/// Writes the whole VHDX blocks that the staged writes of `overlay` touch into the existing file
/// `dest`, in place (crash-ordered by `VhdxUpdater`); the payload bytes written.
fn update_vhdx(
    overlay: &CowOverlay,
    dest: &Path,
    rt: &tokio::runtime::Handle,
) -> Result<u64, ferry_image::ImageError> {
    let mut u = ferry_image::VhdxUpdater::open(dest)?;
    let bs = u.block_size();
    let mut blocks = std::collections::BTreeSet::new();
    for e in overlay.written().iter() {
        if e.length > 0 {
            blocks.extend(e.offset / bs..=(e.end() - 1) / bs);
        }
    }
    let mut written = 0;
    let count = u.blocks();
    for b in blocks.into_iter().filter(|b| *b < count) {
        let mut buf = vec![0u8; u.block_len(b) as usize];
        rt.block_on(overlay.read_at(b * bs, &mut buf))
            .map_err(|x| ferry_image::ImageError::Usage {
                file: dest.display().to_string(),
                message: format!("reading the staged writes at block {b}: {x}"),
            })?;
        written += u.write_block(b, &buf)?;
    }
    u.finish()?;
    Ok(written)
}

fn to_vhdx(
    overlay: &CowOverlay,
    size: u64,
    dest: &Path,
    rt: &tokio::runtime::Handle,
) -> Result<u64, ferry_image::ImageError> {
    let mut w = ImageWriter::create(dest, OutputFormat::Vhdx, size)?;
    let mut buf = vec![0u8; PIECE];
    let mut written = 0;
    for e in overlay.written().iter() {
        let mut at = e.offset;
        while at < e.end() {
            let n = ((e.end() - at) as usize).min(PIECE);
            rt.block_on(overlay.read_at(at, &mut buf[..n]))
                .map_err(|x| ferry_image::ImageError::Usage {
                    file: dest.display().to_string(),
                    message: format!("reading the staged disk at {at}: {x}"),
                })?;
            if buf[..n].iter().any(|b| *b != 0) {
                written += n as u64;
            }
            w.write(at, &buf[..n])?;
            at += n as u64;
        }
    }
    w.finish()?;
    Ok(written)
}

/// Forgets the staged disk at `key` when nobody writes it any more (a cut connection): the
/// next `create` or `update` of it starts over.
fn drop_abandoned(staged: &mut HashMap<PathBuf, Staged>, key: &Path) {
    if staged
        .get(key)
        .is_some_and(|s| Arc::strong_count(&s.overlay) == 1)
    {
        staged.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        for r in [
            RestoreRequest::Mkdir {
                folder: "C:\\R\\vm".into(),
            },
            RestoreRequest::Create {
                size: 8 << 20,
                path: "C:\\R\\vm\\disk:0.vhdx".into(),
            },
            RestoreRequest::Commit {
                path: "\\\\fs\\v\\d.vhdx".into(),
            },
            RestoreRequest::Delete {
                folder: "C:\\R\\vm".into(),
            },
            RestoreRequest::Update {
                path: "C:\\R\\vm\\d_1.avhdx".into(),
            },
        ] {
            assert_eq!(RestoreRequest::parse(&r.export_name()), Some(Ok(r)));
        }
        assert_eq!(RestoreRequest::parse("C:\\VMs\\d.vhdx"), None);
        for (bad, why) in [
            ("ferry-restore:1:mkdir", "VERB:ARGUMENTS"),
            ("ferry-restore:1:mkdir:", "host path"),
            ("ferry-restore:1:rmdir:C:\\x", "unknown restore request"),
            ("ferry-restore:1:create:vhd:512:C:\\x", "not supported"),
            ("ferry-restore:1:create:vhdx:+512:C:\\x", "not a number"),
            ("ferry-restore:1:create:vhdx:0512:C:\\x", "not a number"),
            ("ferry-restore:1:create:vhdx:513:C:\\x", "multiple of 512"),
            ("ferry-restore:1:create:vhdx:0:C:\\x", "multiple of 512"),
            (
                "ferry-restore:1:create:vhdx:99999999999999999999:C:\\x",
                "not a number",
            ),
            ("ferry-restore:1:create:vhdx:512", "create:vhdx:SIZE:PATH"),
            ("ferry-restore:1:update:vhd:C:\\x", "update:vhdx:PATH"),
            ("ferry-restore:1:update:vhdx:", "host path"),
        ] {
            let e = RestoreRequest::parse(bad).unwrap().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_name_parses_or_is_refused_never_panics(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            verb in "(mkdir|create|update|commit|delete|x)",
            tail in "[a-zA-Z0-9:\\\\.]{0,24}",
        ) {
            fuzz_request(&data);
            fuzz_request(format!("{PREFIX}{verb}:{tail}").as_bytes());
            fuzz_request(format!("{PREFIX}create:vhdx:{tail}").as_bytes());
        }
    }
}
