//! File systems inside a partition: detection by signature, then listing and reading files
//! through maintained crates (`ext4-view` for ext2/3/4, `ntfs` for NTFS).

use crate::error::{FsError, Result};
use crate::reader::Slice;
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};
use serde::Serialize;
use std::io::Write;
use std::ops::Range;
use std::sync::Mutex;

/// A file system this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsKind {
    /// ext2, ext3 or ext4.
    Ext4,
    /// NTFS.
    Ntfs,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ext4 => "ext4",
            Self::Ntfs => "ntfs",
        })
    }
}

/// What a directory entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Device, FIFO, socket.
    Other,
}

impl EntryKind {
    /// One-letter tag for listings.
    pub fn tag(self) -> char {
        match self {
            Self::File => '-',
            Self::Dir => 'd',
            Self::Symlink => 'l',
            Self::Other => '?',
        }
    }
}

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Name (not the path).
    pub name: String,
    /// Type.
    pub kind: EntryKind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Last modification, Unix seconds.
    pub mtime: Option<i64>,
}

/// Which file system `vol` holds, by signature; `None` when none this crate reads.
pub fn detect(vol: &Slice) -> Result<Option<FsKind>> {
    if vol.len() < 2048 {
        return Ok(None);
    }
    let mut b = vec![0u8; 2048];
    vol.read_exact_at(0, &mut b)?;
    if &b[3..11] == b"NTFS    " {
        return Ok(Some(FsKind::Ntfs));
    }
    if b[1024 + 56] == 0x53 && b[1024 + 57] == 0xEF {
        return Ok(Some(FsKind::Ext4));
    }
    Ok(None)
}

/// Names a signature that was found but is not readable, for "unknown file system" errors.
pub fn describe_unknown(vol: &Slice) -> String {
    let mut b = vec![0u8; 4096.min(vol.len() as usize)];
    if vol.read_exact_at(0, &mut b).is_err() {
        return "unreadable".into();
    }
    if b.len() >= 4096 && &b[4086..4096] == b"SWAPSPACE2" {
        return "Linux swap".into();
    }
    if b.len() >= 90 && (&b[82..87] == b"FAT32" || &b[54..59] == b"FAT16" || &b[54..59] == b"FAT12")
    {
        return "FAT (not supported)".into();
    }
    if b.len() >= 11 && &b[3..11] == b"EXFAT   " {
        return "exFAT (not supported)".into();
    }
    if b.len() >= 0x48 && &b[0x40..0x48] == b"_BHRfS_M" {
        return "Btrfs (not supported)".into();
    }
    if b.len() >= 4 && &b[..4] == b"XFSB" {
        return "XFS (not supported)".into();
    }
    if b.iter().all(|&x| x == 0) {
        return "no file system (all zeros)".into();
    }
    "no known file-system signature".into()
}

enum Inner {
    Ext4(ext4_view::Ext4),
    Ntfs { ntfs: Box<Ntfs>, io: Mutex<Slice> },
}

/// An opened file system.
pub struct Volume {
    kind: FsKind,
    label: String,
    slice: Slice,
    inner: Inner,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({} on {})", self.kind, self.label)
    }
}

fn ext4_err(what: &str, e: ext4_view::Ext4Error) -> FsError {
    use ext4_view::Ext4Error as E;
    match e {
        E::NotFound => FsError::NotFound(format!("{what}: no such file or directory")),
        E::NotADirectory => FsError::NotFound(format!("{what}: a component is not a directory")),
        E::IsADirectory => FsError::Usage(format!("{what} is a directory")),
        E::IsASpecialFile => FsError::Usage(format!("{what} is a device, FIFO or socket")),
        E::Encrypted => FsError::Unsupported {
            what: what.into(),
            message: "is encrypted".into(),
        },
        E::Incompatible(i) => FsError::Unsupported {
            what: what.into(),
            message: format!("incompatible ext4 features: {i}"),
        },
        E::Corrupt(c) => FsError::corrupt(what, format!("corrupt ext4 structure: {c}")),
        other => FsError::corrupt(what, other.to_string()),
    }
}

fn ntfs_err(what: &str, e: ntfs::NtfsError) -> FsError {
    FsError::corrupt(what, format!("NTFS: {e}"))
}

/// NT time (100 ns since 1601) → Unix seconds.
fn nt_to_unix(t: u64) -> i64 {
    (t / 10_000_000) as i64 - 11_644_473_600
}

fn components(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

impl Volume {
    /// Opens the file system in `vol`.
    pub fn open(vol: Slice) -> Result<Self> {
        let label = vol.label().to_string();
        let kind = detect(&vol)?.ok_or_else(|| FsError::Unsupported {
            what: label.clone(),
            message: format!("unknown file system: {}", describe_unknown(&vol)),
        })?;
        let inner = match kind {
            FsKind::Ext4 => Inner::Ext4(
                ext4_view::Ext4::load(Box::new(vol.clone()))
                    .map_err(|e| ext4_err(&format!("ext4 on {label}"), e))?,
            ),
            FsKind::Ntfs => {
                let mut io = vol.clone();
                let mut ntfs =
                    Ntfs::new(&mut io).map_err(|e| ntfs_err(&format!("NTFS on {label}"), e))?;
                ntfs.read_upcase_table(&mut io)
                    .map_err(|e| ntfs_err(&format!("NTFS on {label}"), e))?;
                Inner::Ntfs {
                    ntfs: Box::new(ntfs),
                    io: Mutex::new(io),
                }
            }
        };
        Ok(Self {
            kind,
            label,
            slice: vol,
            inner,
        })
    }

    /// Which file system.
    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// The partition it lies in.
    pub fn slice(&self) -> &Slice {
        &self.slice
    }

    fn what(&self, path: &str) -> String {
        format!(
            "{} on {}: {}",
            self.kind,
            self.label,
            if path.is_empty() { "/" } else { path }
        )
    }

    /// Metadata of `path`.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let what = self.what(path);
        let name = components(path).last().map_or("/", |s| s).to_string();
        match &self.inner {
            Inner::Ext4(fs) => {
                let p = format!("/{}", components(path).join("/"));
                let m = fs
                    .symlink_metadata(p.as_str())
                    .map_err(|e| ext4_err(&what, e))?;
                Ok(ext4_entry(name, &m))
            }
            Inner::Ntfs { ntfs, io } => {
                let mut io = io.lock().expect("io lock");
                let f = ntfs_lookup(ntfs, &mut io, path, &what)?;
                ntfs_entry(name, &f, &mut io, &what)
            }
        }
    }

    /// The entries of directory `path` (or the one entry of file `path`), sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let what = self.what(path);
        let mut out = match &self.inner {
            Inner::Ext4(fs) => {
                let p = format!("/{}", components(path).join("/"));
                let m = fs
                    .symlink_metadata(p.as_str())
                    .map_err(|e| ext4_err(&what, e))?;
                if !m.is_dir() {
                    return Ok(vec![self.stat(path)?]);
                }
                let mut v = Vec::new();
                for e in fs.read_dir(p.as_str()).map_err(|e| ext4_err(&what, e))? {
                    let e = e.map_err(|e| ext4_err(&what, e))?;
                    let name = e.file_name().display().to_string();
                    if name == "." || name == ".." {
                        continue;
                    }
                    let m = e.metadata().map_err(|e| ext4_err(&what, e))?;
                    v.push(ext4_entry(name, &m));
                }
                v
            }
            Inner::Ntfs { ntfs, io } => {
                let mut io = io.lock().expect("io lock");
                let dir = ntfs_lookup(ntfs, &mut io, path, &what)?;
                if !dir.is_directory() {
                    drop(io);
                    return Ok(vec![self.stat(path)?]);
                }
                let index = dir
                    .directory_index(&mut *io)
                    .map_err(|e| ntfs_err(&what, e))?;
                let mut entries = index.entries();
                let mut v = Vec::new();
                while let Some(e) = entries.next(&mut *io) {
                    let e = e.map_err(|e| ntfs_err(&what, e))?;
                    let Some(key) = e.key() else { continue };
                    let key = key.map_err(|e| ntfs_err(&what, e))?;
                    if key.namespace() == NtfsFileNamespace::Dos {
                        continue;
                    }
                    let name = key.name().to_string_lossy();
                    // The volume root lists the metadata files ($MFT, …) and itself (`.`).
                    if path_is_root(path) && (name.starts_with('$') || name == ".") {
                        continue;
                    }
                    let f = e.to_file(ntfs, &mut *io).map_err(|e| ntfs_err(&what, e))?;
                    v.push(ntfs_entry(name, &f, &mut io, &what)?);
                }
                v
            }
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Writes the contents of regular file `path` to `out`; returns the bytes written.
    pub fn read_file(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        self.copy(path, out, u64::MAX)
    }

    /// The first `max` bytes (or fewer) of regular file `path`.
    pub fn read_head(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.copy(path, &mut v, max)?;
        Ok(v)
    }

    fn copy(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64> {
        let what = self.what(path);
        let werr = |source| FsError::Write {
            what: "the output".into(),
            source,
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        match &self.inner {
            Inner::Ext4(fs) => {
                let p = format!("/{}", components(path).join("/"));
                let m = fs
                    .symlink_metadata(p.as_str())
                    .map_err(|e| ext4_err(&what, e))?;
                if !m.file_type().is_regular_file() {
                    return Err(FsError::Usage(format!("{what} is not a regular file")));
                }
                let mut f = fs.open(p.as_str()).map_err(|e| ext4_err(&what, e))?;
                while total < limit {
                    // ext4-view returns at most one block per call: fill the buffer first.
                    let want = buf
                        .len()
                        .min((limit - total).try_into().unwrap_or(usize::MAX));
                    let mut n = 0;
                    while n < want {
                        let k = f
                            .read_bytes(&mut buf[n..want])
                            .map_err(|e| ext4_err(&what, e))?;
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n]).map_err(werr)?;
                    total += n as u64;
                }
                if total != m.len().min(limit) {
                    return Err(FsError::corrupt(
                        &what,
                        format!("read {total} bytes of {}", m.len()),
                    ));
                }
            }
            Inner::Ntfs { ntfs, io } => {
                let mut io = io.lock().expect("io lock");
                let f = ntfs_lookup(ntfs, &mut io, path, &what)?;
                if f.is_directory() {
                    return Err(FsError::Usage(format!("{what} is a directory")));
                }
                let Some(item) = f.data(&mut *io, "") else {
                    return Ok(0);
                };
                let item = item.map_err(|e| ntfs_err(&what, e))?;
                let attr = item.to_attribute().map_err(|e| ntfs_err(&what, e))?;
                let mut value = attr.value(&mut *io).map_err(|e| ntfs_err(&what, e))?;
                let len = value.len().min(limit);
                while total < len {
                    let want = buf
                        .len()
                        .min((len - total).try_into().unwrap_or(usize::MAX));
                    let n = value
                        .read(&mut *io, &mut buf[..want])
                        .map_err(|e| ntfs_err(&what, e))?;
                    if n == 0 {
                        return Err(FsError::corrupt(
                            &what,
                            format!("data ends after {total} of {len} bytes"),
                        ));
                    }
                    out.write_all(&buf[..n]).map_err(werr)?;
                    total += n as u64;
                }
            }
        }
        Ok(total)
    }

    /// The volume-relative byte ranges holding the unnamed data stream of NTFS file `path`
    /// (sparse runs left out), and its length; `None` when it does not exist or has no
    /// non-resident data.
    pub fn ntfs_data_runs(&self, path: &str) -> Result<Option<(Vec<Range<u64>>, u64)>> {
        let Inner::Ntfs { ntfs, io } = &self.inner else {
            return Ok(None);
        };
        let what = self.what(path);
        let mut io = io.lock().expect("io lock");
        let f = match ntfs_lookup(ntfs, &mut io, path, &what) {
            Ok(f) => f,
            Err(FsError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(item) = f.data(&mut *io, "") else {
            return Ok(None);
        };
        let item = item.map_err(|e| ntfs_err(&what, e))?;
        let attr = item.to_attribute().map_err(|e| ntfs_err(&what, e))?;
        let value = attr.value(&mut *io).map_err(|e| ntfs_err(&what, e))?;
        let ntfs::attribute_value::NtfsAttributeValue::NonResident(v) = value else {
            return Ok(None);
        };
        let mut runs = Vec::new();
        for r in v.data_runs() {
            let r = r.map_err(|e| ntfs_err(&what, e))?;
            if let Some(p) = r.data_position().value() {
                let start = p.get();
                let end = start.saturating_add(r.allocated_size());
                if end > self.slice.len() {
                    return Err(FsError::corrupt(
                        &what,
                        format!("data run {start}..{end} beyond the volume"),
                    ));
                }
                runs.push(start..end);
            }
        }
        Ok(Some((runs, v.len())))
    }
}

/// Where the unnamed data stream of an NTFS file lies on its volume (the off-host SAN path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtfsLayout {
    /// Length of the stream in bytes.
    pub len: u64,
    /// Runs in file order: volume-relative byte offset (`None`: sparse, reads as zeros) and
    /// length in bytes. Together they cover at least `len` bytes.
    pub runs: Vec<(Option<u64>, u64)>,
    /// The bytes of a resident stream (small files kept inside the MFT record); `runs` is empty.
    pub resident: Option<Vec<u8>>,
}

impl Volume {
    /// The layout of the unnamed data stream of NTFS file `path`, following an attribute list
    /// when the file is fragmented beyond one MFT record. Compressed and encrypted streams are
    /// refused: their clusters do not hold the file's bytes.
    pub fn ntfs_file_layout(&self, path: &str) -> Result<NtfsLayout> {
        use ntfs::attribute_value::NtfsAttributeValue as V;
        use ntfs::{NtfsAttributeFlags, NtfsAttributeType};
        let Inner::Ntfs { ntfs, io } = &self.inner else {
            return Err(FsError::Usage(format!("{} is not NTFS", self.label)));
        };
        let what = self.what(path);
        let e = |err| ntfs_err(&what, err);
        let mut io = io.lock().expect("io lock");
        let f = ntfs_lookup(ntfs, &mut io, path, &what)?;
        if f.is_directory() {
            return Err(FsError::Usage(format!("{what} is a directory")));
        }
        let vol_len = self.slice.len();
        let check_flags = |flags: NtfsAttributeFlags| {
            if flags.intersects(NtfsAttributeFlags::COMPRESSED | NtfsAttributeFlags::ENCRYPTED) {
                return Err(FsError::Unsupported {
                    what: what.clone(),
                    message: "is NTFS-compressed or encrypted; only plain (and sparse) files are read off-host".into(),
                });
            }
            Ok(())
        };
        let mut runs: Vec<(Option<u64>, u64)> = Vec::new();
        let push_runs = |v: &ntfs::attribute_value::NtfsNonResidentAttributeValue<'_, '_>,
                         runs: &mut Vec<(Option<u64>, u64)>|
         -> Result<()> {
            for r in v.data_runs() {
                let r = r.map_err(|x| ntfs_err(&what, x))?;
                let len = r.allocated_size();
                let pos = r.data_position().value().map(|p| p.get());
                if let Some(p) = pos {
                    if p.checked_add(len).is_none_or(|end| end > vol_len) {
                        return Err(FsError::corrupt(
                            &what,
                            format!("data run {p}+{len} lies beyond the volume ({vol_len} bytes)"),
                        ));
                    }
                }
                runs.push((pos, len));
            }
            Ok(())
        };
        // A fragmented file keeps its runs in several MFT records, listed in $ATTRIBUTE_LIST.
        let mut list_attr = None;
        for a in f.attributes_raw() {
            let a = a.map_err(e)?;
            if a.ty().ok() == Some(NtfsAttributeType::AttributeList) {
                list_attr = Some(a);
                break;
            }
        }
        let len;
        if let Some(list_attr) = list_attr {
            let list = list_attr
                .structured_value::<_, ntfs::structured_values::NtfsAttributeList>(&mut *io)
                .map_err(e)?;
            let mut entries = list.entries();
            let mut pieces = Vec::new();
            while let Some(entry) = entries.next(&mut *io) {
                let entry = entry.map_err(e)?;
                if entry.ty().ok() == Some(NtfsAttributeType::Data) && entry.name_length() == 0 {
                    pieces.push(entry);
                }
            }
            pieces.sort_by_key(|p| p.lowest_vcn().value());
            let Some(first) = pieces.first() else {
                return Err(FsError::NotFound(format!("{what} has no data stream")));
            };
            if first.lowest_vcn().value() != 0 {
                return Err(FsError::corrupt(
                    &what,
                    "the data stream does not start at cluster 0",
                ));
            }
            let cluster = u64::from(ntfs.cluster_size());
            let mut total_len = None;
            for p in &pieces {
                let have: u64 = runs.iter().map(|r| r.1).sum();
                let vcn = u64::try_from(p.lowest_vcn().value()).unwrap_or(u64::MAX);
                if vcn.checked_mul(cluster) != Some(have) {
                    return Err(FsError::corrupt(
                        &what,
                        format!(
                            "attribute list piece at cluster {vcn} does not follow the previous ones ({have} bytes)"
                        ),
                    ));
                }
                let rec = p.to_file(ntfs, &mut *io).map_err(e)?;
                if rec.file_record_number() != p.base_file_reference().file_record_number() {
                    return Err(FsError::corrupt(
                        &what,
                        "attribute list names the wrong record",
                    ));
                }
                let attr = p.to_attribute(&rec).map_err(e)?;
                check_flags(attr.flags())?;
                if total_len.is_none() {
                    total_len = Some(attr.value_length());
                }
                match attr.value(&mut *io).map_err(e)? {
                    V::NonResident(v) => push_runs(&v, &mut runs)?,
                    _ => {
                        return Err(FsError::corrupt(
                            &what,
                            "a listed data stream piece is not non-resident",
                        ));
                    }
                }
            }
            len = total_len.unwrap_or(0);
        } else {
            let item = f
                .data(&mut *io, "")
                .ok_or_else(|| FsError::NotFound(format!("{what} has no data stream")))?
                .map_err(e)?;
            let attr = item.to_attribute().map_err(e)?;
            check_flags(attr.flags())?;
            len = attr.value_length();
            match attr.value(&mut *io).map_err(e)? {
                V::Resident(v) => {
                    return Ok(NtfsLayout {
                        len: v.len(),
                        runs: Vec::new(),
                        resident: Some(v.data().to_vec()),
                    });
                }
                V::NonResident(v) => push_runs(&v, &mut runs)?,
                V::AttributeListNonResident(_) => {
                    return Err(FsError::corrupt(
                        &what,
                        "an attribute list without $ATTRIBUTE_LIST",
                    ));
                }
            }
        }
        let covered: u64 = runs.iter().map(|r| r.1).sum();
        if covered < len {
            return Err(FsError::corrupt(
                &what,
                format!("data runs cover {covered} bytes of a {len}-byte stream"),
            ));
        }
        Ok(NtfsLayout {
            len,
            runs,
            resident: None,
        })
    }
}

fn path_is_root(path: &str) -> bool {
    components(path).is_empty()
}

fn ext4_entry(name: String, m: &ext4_view::Metadata) -> Entry {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_regular_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    Entry {
        name,
        kind,
        size: if kind == EntryKind::Dir { 0 } else { m.len() },
        mtime: Some(m.modified().seconds()),
    }
}

fn ntfs_entry(name: String, f: &NtfsFile<'_>, io: &mut Slice, what: &str) -> Result<Entry> {
    let info = f.info().map_err(|e| ntfs_err(what, e))?;
    let mtime = Some(nt_to_unix(info.modification_time().nt_timestamp()));
    if f.is_directory() {
        return Ok(Entry {
            name,
            kind: EntryKind::Dir,
            size: 0,
            mtime,
        });
    }
    // The size is that of the unnamed data stream.
    let size = match f.data(io, "") {
        Some(Ok(item)) => item.to_attribute().map(|a| a.value_length()).unwrap_or(0),
        _ => 0,
    };
    Ok(Entry {
        name,
        kind: EntryKind::File,
        size,
        mtime,
    })
}

fn ntfs_lookup<'n>(ntfs: &'n Ntfs, io: &mut Slice, path: &str, what: &str) -> Result<NtfsFile<'n>> {
    let mut cur = ntfs.root_directory(io).map_err(|e| ntfs_err(what, e))?;
    for comp in components(path) {
        if !cur.is_directory() {
            return Err(FsError::NotFound(format!(
                "{what}: a component is not a directory"
            )));
        }
        let index = cur.directory_index(io).map_err(|e| ntfs_err(what, e))?;
        let mut finder = index.finder();
        let entry = NtfsFileNameIndex::find(&mut finder, ntfs, io, comp)
            .ok_or_else(|| FsError::NotFound(format!("{what}: no such file or directory")))?
            .map_err(|e| ntfs_err(what, e))?;
        let next = entry.to_file(ntfs, io).map_err(|e| ntfs_err(what, e))?;
        cur = next;
    }
    Ok(cur)
}
