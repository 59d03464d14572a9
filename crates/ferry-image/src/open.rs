//! Format detection, chain resolution and the `open_*` entry points.

use crate::error::ImageError;
use crate::file::FileSource;
use crate::layout::{MappedImage, Mapper};
use crate::{Format, ImageInfo};
use async_trait::async_trait;
use ferry_core::BlockSource;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest chain we follow; deeper chains are almost certainly loops through differently
/// spelled paths.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// What identifies an image to its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Identity {
    None,
    VhdUniqueId([u8; 16]),
    VhdxDataWrite(crate::bytes::Guid),
    VmdkCid(u32),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("no identity"),
            Self::VhdUniqueId(id) => {
                f.write_str("VHD unique id ")?;
                id.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Self::VhdxDataWrite(g) => write!(f, "VHDX data write GUID {g}"),
            Self::VmdkCid(cid) => write!(f, "VMDK CID {cid:08x}"),
        }
    }
}

/// Where a differencing image says its parent is, and who the parent must be.
#[derive(Debug, Clone)]
pub(crate) struct ParentRef {
    pub candidates: Vec<String>,
    pub expect: Identity,
}

/// One opened image file (or descriptor with its extents), before its parent is attached.
pub(crate) struct Level {
    pub format: Format,
    pub subformat: String,
    pub size: u64,
    pub block_size: u64,
    pub mapper: Box<dyn Mapper>,
    pub files: Vec<Arc<dyn BlockSource>>,
    pub parent: Option<ParentRef>,
    pub identity: Identity,
}

/// Opens the files an image refers to: VMDK extents and parents of differencing images.
#[async_trait]
pub trait Resolver: Send + Sync {
    /// Opens `name` as written inside the image `from` (a relative or absolute path, possibly
    /// in Windows syntax).
    async fn open(&self, from: &str, name: &str) -> Result<Arc<dyn BlockSource>, ImageError>;
}

/// Resolves names against the directory of the referring file: first the name as a relative
/// path (Windows separators accepted), then its last component, then (for absolute names) the
/// path itself.
#[derive(Debug, Clone, Default)]
pub struct DirResolver;

impl DirResolver {
    fn candidates(from: &str, name: &str) -> Vec<PathBuf> {
        let dir = Path::new(from)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let unix = name.replace('\\', "/");
        let windows_abs = unix.as_bytes().get(1) == Some(&b':') || unix.starts_with("//");
        let mut out = Vec::new();
        if !windows_abs && !unix.starts_with('/') {
            out.push(dir.join(unix.trim_start_matches("./")));
        }
        if let Some(base) = unix
            .rsplit('/')
            .next()
            .filter(|b| !b.is_empty() && *b != ".." && *b != ".")
        {
            out.push(dir.join(base));
        }
        if unix.starts_with('/') {
            out.push(PathBuf::from(&unix));
        }
        out.dedup();
        out
    }
}

#[async_trait]
impl Resolver for DirResolver {
    async fn open(&self, from: &str, name: &str) -> Result<Arc<dyn BlockSource>, ImageError> {
        let tried = Self::candidates(from, name);
        for p in &tried {
            if p.exists() {
                let p = p
                    .canonicalize()
                    .map_err(|e| ImageError::io(p.display(), "resolve path", e))?;
                return Ok(Arc::new(FileSource::open(p)?));
            }
        }
        let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        Err(ImageError::Chain {
            file: from.to_string(),
            message: format!("`{name}` not found (tried {})", list.join(", ")),
        })
    }
}

/// Refuses every reference: for images held in memory (fuzzing, tests) that must be
/// self-contained.
#[derive(Debug, Clone, Default)]
pub struct NoFiles;

#[async_trait]
impl Resolver for NoFiles {
    async fn open(&self, from: &str, name: &str) -> Result<Arc<dyn BlockSource>, ImageError> {
        Err(ImageError::Chain {
            file: from.to_string(),
            message: format!("`{name}` cannot be opened: this image must be self-contained"),
        })
    }
}

/// Detects the format of `src` from its content (never its name).
pub async fn detect(src: &dyn BlockSource) -> Result<Format, ImageError> {
    let len = src.size();
    let mut head = vec![0u8; len.min(1024) as usize];
    src.read_at(0, &mut head).await?;
    if head.starts_with(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if head.starts_with(b"conectix") {
        return Ok(Format::Vhd);
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"COWD") {
        return Ok(Format::Vmdk);
    }
    if len <= 1 << 20 && crate::vmdk::looks_like_descriptor(&head) {
        return Ok(Format::Vmdk);
    }
    if len >= 512 {
        let mut tail = [0u8; 8];
        src.read_at(len - 512, &mut tail).await?;
        if &tail == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

async fn open_level(
    src: Arc<dyn BlockSource>,
    resolver: &dyn Resolver,
    force: Option<Format>,
) -> Result<Level, ImageError> {
    let format = match force {
        Some(f) => f,
        None => detect(src.as_ref()).await?,
    };
    match format {
        Format::Vhd => crate::vhd::open(src).await,
        Format::Vhdx => crate::vhdx::open(src).await,
        Format::Vmdk => crate::vmdk::open(src, resolver).await,
        Format::Raw => Ok(Level {
            format: Format::Raw,
            subformat: "raw".into(),
            size: src.size(),
            block_size: 0,
            mapper: Box::new(RawMapper),
            files: vec![src],
            parent: None,
            identity: Identity::None,
        }),
    }
}

#[derive(Debug)]
struct RawMapper;

#[async_trait]
impl Mapper for RawMapper {
    async fn map(
        &self,
        _: &[Arc<dyn BlockSource>],
        offset: u64,
        max: u64,
    ) -> Result<(crate::layout::Piece, u64), ferry_core::BlockError> {
        Ok((crate::layout::Piece::Data { file: 0, offset }, max))
    }
}

/// An opened image: the virtual disk and what it is made of.
#[derive(Debug, Clone)]
pub struct OpenedImage {
    /// The virtual disk (with its parents composed in).
    pub source: Arc<dyn BlockSource>,
    /// Format, size and chain.
    pub info: ImageInfo,
}

/// Opens the image held by `src`, detecting its format, opening extents and parents through
/// `resolver`, refusing loops and parents whose identity does not match.
pub async fn open_source(
    src: Arc<dyn BlockSource>,
    resolver: &dyn Resolver,
) -> Result<OpenedImage, ImageError> {
    open_source_as(src, resolver, None).await
}

/// [`open_source`] with the top image's format forced (parents are still detected).
pub(crate) async fn open_source_as(
    src: Arc<dyn BlockSource>,
    resolver: &dyn Resolver,
    force: Option<Format>,
) -> Result<OpenedImage, ImageError> {
    let mut force = force;
    let mut levels: Vec<(Level, String)> = Vec::new();
    let mut seen = HashSet::new();
    let mut current = src;
    loop {
        let name = current.name();
        seen.insert(name.clone());
        let level = open_level(current, resolver, force.take()).await?;
        let Some(parent) = level.parent.clone() else {
            levels.push((level, name));
            break;
        };
        if levels.len() + 1 >= MAX_CHAIN_DEPTH {
            return Err(ImageError::Chain {
                file: name,
                message: format!("chain is deeper than {MAX_CHAIN_DEPTH} images"),
            });
        }
        let mut opened = None;
        let mut errors = Vec::new();
        for cand in &parent.candidates {
            match resolver.open(&name, cand).await {
                Ok(p) => {
                    opened = Some(p);
                    break;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some(p) = opened else {
            let why = if parent.candidates.is_empty() {
                "the image names no parent".to_string()
            } else {
                errors.join("; ")
            };
            return Err(ImageError::Chain {
                file: name,
                message: format!("parent not found: {why}"),
            });
        };
        if seen.contains(&p.name()) {
            return Err(ImageError::Chain {
                file: name,
                message: format!("loop: parent `{}` is already in the chain", p.name()),
            });
        }
        levels.push((level, name));
        current = p;
    }
    // Check identities top-down, then assemble bottom-up.
    for pair in levels.windows(2) {
        let (child, parent) = (&pair[0], &pair[1]);
        let expect = child.0.parent.as_ref().map_or(Identity::None, |p| p.expect);
        if expect != Identity::None
            && parent.0.identity != Identity::None
            && expect != parent.0.identity
        {
            return Err(ImageError::Chain {
                file: child.1.clone(),
                message: format!(
                    "parent `{}` is not the image this one was made from (expected {expect}, found {})",
                    parent.1, parent.0.identity
                ),
            });
        }
        if child.0.format != parent.0.format
            && !(child.0.format == Format::Vmdk && parent.0.format == Format::Raw)
        {
            tracing::debug!(child = %child.1, parent = %parent.1, "parent has a different format");
        }
    }
    let mut below: Option<OpenedImage> = None;
    while let Some((level, name)) = levels.pop() {
        let files: Vec<String> = level.files.iter().map(|f| f.name()).collect();
        let info = ImageInfo {
            file: name.clone(),
            format: level.format,
            subformat: level.subformat.clone(),
            virtual_size: level.size,
            block_size: level.block_size,
            files,
            parent: below.as_ref().map(|b| Box::new(b.info.clone())),
        };
        let source: Arc<dyn BlockSource> = if level.format == Format::Raw && below.is_none() {
            level.files[0].clone()
        } else {
            Arc::new(MappedImage {
                name,
                size: level.size,
                mapper: level.mapper,
                files: level.files,
                parent: below.map(|b| b.source),
                preferred: level.block_size,
            })
        };
        below = Some(OpenedImage { source, info });
    }
    below.ok_or_else(|| ImageError::unsupported("", "empty chain"))
}

/// How to open an image file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Read the top image as this format instead of detecting it (parents are still
    /// detected). `Some(Format::Raw)` reads any file as plain bytes, whatever its name.
    pub format: Option<Format>,
    /// Read the file's aligned data with `O_DIRECT` ([`FileSource::with_direct_io`]): for a
    /// backup, which reads a disk once.
    pub direct_io: bool,
}

/// Opens the image file at `path` (any supported format, detected by content), resolving
/// extents and parents relative to the directory of the file that names them. A file whose
/// name says it is an image (see [`format_named_by`]) but whose content has no signature of
/// any format is refused ([`ImageError::NotTheNamedFormat`]) rather than read as raw.
pub async fn open_image(path: impl AsRef<Path>) -> Result<OpenedImage, ImageError> {
    open_image_with(path, &OpenOptions::default()).await
}

/// Like [`open_image`], reading the file's aligned data with `O_DIRECT`.
pub async fn open_image_direct(path: impl AsRef<Path>) -> Result<OpenedImage, ImageError> {
    let opts = OpenOptions {
        direct_io: true,
        ..OpenOptions::default()
    };
    open_image_with(path, &opts).await
}

/// [`open_image`] with options: a forced format, direct I/O.
pub async fn open_image_with(
    path: impl AsRef<Path>,
    opts: &OpenOptions,
) -> Result<OpenedImage, ImageError> {
    let path = path.as_ref();
    let canonical = path
        .canonicalize()
        .map_err(|e| ImageError::io(path.display(), "open", e))?;
    let mut file = FileSource::open(&canonical)?;
    if opts.direct_io {
        file = file.with_direct_io();
    }
    let file: Arc<dyn BlockSource> = Arc::new(file);
    let mut force = opts.format;
    if force.is_none() {
        let detected = detect(file.as_ref()).await?;
        if let (Format::Raw, Some(named)) = (detected, format_named_by(path)) {
            return Err(not_the_named_format(file.as_ref(), named).await?);
        }
        force = Some(detected);
    }
    open_source_as(file, &DirResolver, force).await
}

/// The image format a file's name claims: `.vhd`/`.avhd` VHD, `.vhdx`/`.avhdx` VHDX,
/// `.vmdk` VMDK (case-insensitive). `None` for other names and for VMware's flat extents
/// (`NAME-flat.vmdk`, `NAME-f001.vmdk`), which are raw bytes by design.
pub fn format_named_by(path: &Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, ext) = name.rsplit_once('.')?;
    match ext {
        "vhd" | "avhd" => Some(Format::Vhd),
        "vhdx" | "avhdx" => Some(Format::Vhdx),
        "vmdk" => {
            let flat_split = stem
                .rsplit_once("-f")
                .is_some_and(|(_, n)| n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()));
            (!stem.ends_with("-flat") && !flat_split).then_some(Format::Vmdk)
        }
        _ => None,
    }
}

/// The refusal of a file named like a `named` image without its signature: what signature
/// was looked for and what the file holds instead.
async fn not_the_named_format(
    src: &dyn BlockSource,
    named: Format,
) -> Result<ImageError, ImageError> {
    let len = src.size();
    let mut head = vec![0u8; len.min(8) as usize];
    src.read_at(0, &mut head).await?;
    let show = |bytes: &[u8], at: u64| {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("`{}` at offset {at}", hex.join(" "))
    };
    let signature = match named {
        Format::Vhd => "the `conectix` footer in the last 512 bytes or its copy at offset 0",
        Format::Vhdx => "`vhdxfile` at offset 0",
        _ => "`KDMV` at offset 0 (sparse) or a `# Disk DescriptorFile` text descriptor",
    };
    let found = if len == 0 {
        "an empty file".to_string()
    } else if named == Format::Vhd && len >= 512 {
        let mut tail = [0u8; 8];
        src.read_at(len - 512, &mut tail).await?;
        format!(
            "{} and {} in a file of {len} bytes",
            show(&head, 0),
            show(&tail, len - 512)
        )
    } else {
        format!("{} in a file of {len} bytes", show(&head, 0))
    };
    Ok(ImageError::NotTheNamedFormat {
        file: src.name(),
        named,
        signature: signature.to_string(),
        found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_claim_a_format() {
        let named = |n: &str| format_named_by(Path::new(n));
        assert_eq!(named("/d/WEB01.VHDX"), Some(Format::Vhdx));
        assert_eq!(named("snap.avhdx"), Some(Format::Vhdx));
        assert_eq!(named("old.avhd"), Some(Format::Vhd));
        assert_eq!(named("a.vhd"), Some(Format::Vhd));
        assert_eq!(named("web.vmdk"), Some(Format::Vmdk));
        assert_eq!(named("web-s001.vmdk"), Some(Format::Vmdk));
        // VMware's flat extents are raw bytes by design.
        assert_eq!(named("web-flat.vmdk"), None);
        assert_eq!(named("web-f001.vmdk"), None);
        assert_eq!(named("disk.img"), None);
        assert_eq!(named("vhdx"), None);
    }

    #[test]
    fn resolver_candidates() {
        let c = DirResolver::candidates("/d/child.vhd", "..\\base.vhd");
        assert_eq!(
            c,
            vec![
                PathBuf::from("/d/../base.vhd"),
                PathBuf::from("/d/base.vhd")
            ]
        );
        let c = DirResolver::candidates("/d/child.vhdx", "C:\\VMs\\base.vhdx");
        assert_eq!(c, vec![PathBuf::from("/d/base.vhdx")]);
        let c = DirResolver::candidates("/d/c.vmdk", "/vmfs/volumes/ds/b.vmdk");
        assert_eq!(
            c,
            vec![
                PathBuf::from("/d/b.vmdk"),
                PathBuf::from("/vmfs/volumes/ds/b.vmdk")
            ]
        );
    }
}
