//! Opening what a backup reads: a local file or block device (raw, VHD, VHDX or VMDK, detected
//! by content; `raw:PATH`, `vhd:PATH`, … or [`SourceOptions::format`] force a format) or an NBD
//! export (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`), and the
//! changed extents of a qemu dirty bitmap.

use crate::error::{EngineError, Result};
use ferry_core::{BlockSource, ExtentMap};
use ferry_image::{Format, OpenOptions};
use ferry_nbd::{NbdClient, NbdConfig};
use std::sync::Arc;

/// How to reach a source.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// CA certificate(s) (PEM) trusted for `nbds://` sources.
    pub tls_ca_pem: Option<String>,
    /// SHA-256 fingerprint of the `nbds://` server certificate (instead of a CA).
    pub tls_fingerprint: Option<String>,
    /// Dirty bitmap whose `qemu:dirty-bitmap:NAME` context is selected (NBD sources only).
    pub bitmap: Option<String>,
    /// Format of file sources without a `FORMAT:` prefix; `None` detects it by content
    /// (refusing files named like an image that hold none).
    pub format: Option<Format>,
}

/// Splits a `FORMAT:PATH` location (`raw:`, `vhd:`, `vhdx:`, `vmdk:`) into the forced format
/// and the path; other locations come back unchanged.
pub fn split_format(location: &str) -> (Option<Format>, &str) {
    if let Some((prefix, path)) = location.split_once(':') {
        let format = match prefix {
            "raw" => Some(Format::Raw),
            "vhd" => Some(Format::Vhd),
            "vhdx" => Some(Format::Vhdx),
            "vmdk" => Some(Format::Vmdk),
            _ => None,
        };
        if format.is_some() && !path.is_empty() {
            return (format, path);
        }
    }
    (None, location)
}

/// An opened source.
#[derive(Debug, Clone)]
pub struct OpenedSource {
    /// The virtual disk.
    pub source: Arc<dyn BlockSource>,
    /// What it is: `raw`, `vhd`, `vhdx`, `vmdk` or `nbd`.
    pub kind: String,
    /// The NBD client, for NBD sources.
    pub nbd: Option<Arc<NbdClient>>,
}

/// True when `location` is an NBD URI rather than a path.
pub fn is_nbd_uri(location: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| location.starts_with(p))
}

/// Builds the NBD client configuration for `uri` with the TLS settings and bitmap of `opts`.
pub fn nbd_config(uri: &str, opts: &SourceOptions) -> Result<NbdConfig> {
    let nbd_err = |what: String| {
        move |source| EngineError::Nbd {
            what,
            source: Box::new(source),
        }
    };
    let mut cfg = NbdConfig::from_uri(uri).map_err(nbd_err(format!("NBD URI {}", redact(uri))))?;
    if let Some(fp) = &opts.tls_fingerprint {
        cfg = cfg
            .with_tls_fingerprint(fp)
            .map_err(nbd_err(format!("NBD source {}", cfg_label(uri))))?;
    } else if let Some(ca) = &opts.tls_ca_pem {
        if cfg.tls_required {
            cfg = cfg.with_tls_ca_pem(ca.clone());
        }
    }
    if cfg.tls_required && cfg.tls.is_none() {
        return Err(EngineError::Usage(format!(
            "{}: a TLS source needs --tls-ca FILE or --tls-fingerprint SHA256",
            cfg.uri_redacted()
        )));
    }
    if let Some(b) = &opts.bitmap {
        cfg = cfg.with_meta_context(ferry_nbd::dirty_bitmap_context(b));
    }
    Ok(cfg)
}

fn redact(uri: &str) -> String {
    NbdConfig::from_uri(uri).map_or_else(|_| "(unparsable)".into(), |c| c.uri_redacted())
}

fn cfg_label(uri: &str) -> String {
    redact(uri)
}

/// Opens `location` for reading.
pub async fn open(location: &str, opts: &SourceOptions) -> Result<OpenedSource> {
    if is_nbd_uri(location) {
        let cfg = nbd_config(location, opts)?;
        let label = cfg.uri_redacted();
        let client = NbdClient::connect(cfg)
            .await
            .map_err(|source| EngineError::Nbd {
                what: format!("cannot open NBD source {label}"),
                source: Box::new(source),
            })?;
        let client = Arc::new(client);
        return Ok(OpenedSource {
            source: client.clone(),
            kind: "nbd".into(),
            nbd: Some(client),
        });
    }
    if opts.bitmap.is_some() {
        return Err(EngineError::Usage(format!(
            "{location}: --bitmap needs an NBD source (qemu:dirty-bitmap:NAME)"
        )));
    }
    let (prefixed, path) = split_format(location);
    let img_opts = OpenOptions {
        format: prefixed.or(opts.format),
        direct_io: true,
    };
    let img = ferry_image::open_image_with(path, &img_opts)
        .await
        .map_err(|source| EngineError::Image {
            // Every image error starts with the file it is about.
            what: "cannot open source".into(),
            source: Box::new(source),
        })?;
    Ok(OpenedSource {
        source: img.source,
        kind: img.info.format.to_string(),
        nbd: None,
    })
}

/// Extents that dirty bitmap `bitmap` marks as changed, over the whole export.
pub async fn changed_extents(src: &OpenedSource, bitmap: &str) -> Result<ExtentMap> {
    let Some(nbd) = &src.nbd else {
        return Err(EngineError::Usage(format!(
            "{}: --bitmap needs an NBD source",
            src.source.name()
        )));
    };
    nbd.changed_extents(bitmap, 0..nbd.size())
        .await
        .map_err(|source| EngineError::Nbd {
            what: format!("reading dirty bitmap `{bitmap}` of {}", nbd.uri_redacted()),
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_prefixes() {
        assert_eq!(
            split_format("raw:/d/junk.vhdx"),
            (Some(Format::Raw), "/d/junk.vhdx")
        );
        assert_eq!(split_format("vmdk:a.img"), (Some(Format::Vmdk), "a.img"));
        assert_eq!(split_format("/d/a:b.raw"), (None, "/d/a:b.raw"));
        assert_eq!(split_format("raw:"), (None, "raw:"));
        assert_eq!(
            split_format("nbd://host/export"),
            (None, "nbd://host/export")
        );
    }
}
