//! `ferry nbd …`: inspect NBD exports with Ferry's own client.
//!
//! `ferry nbd info URI` prints what negotiation established (size, flags, block sizes, TLS,
//! meta contexts); `ferry nbd list URI` lists the server's exports; `ferry nbd map URI
//! [--context NAME]` prints block status like `nbdinfo --map`. Every command takes `--json`.
//! Export names are printed with their query (`?session_id=…`) redacted.

use anyhow::Context;
use ferry_nbd::{NbdClient, NbdConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

/// `ferry nbd` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show an export's size, flags, block sizes, TLS state and metadata contexts.
    Info(ExportArgs),
    /// List the exports a server offers.
    List(ExportArgs),
    /// Print block status (allocation or a dirty bitmap) like `nbdinfo --map`.
    Map(MapArgs),
}

/// How to reach an export.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// `nbd://host[:port]/export`, `nbds://…`, `nbd+unix:///export?socket=PATH` or `nbds+unix://…`.
    uri: String,
    /// Trust TLS servers signed by the CA certificate(s) in this PEM file.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Trust exactly the TLS server certificate with this SHA-256 fingerprint (`sha256:AB:CD:…`).
    #[arg(long, value_name = "FINGERPRINT")]
    tls_fingerprint: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `ferry nbd map`.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    #[command(flatten)]
    export: ExportArgs,
    /// Metadata context, e.g. `base:allocation` or `qemu:dirty-bitmap:NAME`.
    #[arg(long, default_value = ferry_nbd::BASE_ALLOCATION)]
    context: String,
}

impl ExportArgs {
    fn config(&self) -> anyhow::Result<NbdConfig> {
        let mut cfg = NbdConfig::from_uri(&self.uri)?;
        if let Some(p) = &self.tls_ca {
            let pem = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the CA certificate {}", p.display()))?;
            cfg = cfg.with_tls_ca_pem(pem);
        }
        if let Some(fp) = &self.tls_fingerprint {
            cfg = cfg.with_tls_fingerprint(fp)?;
        }
        cfg.connections = 1;
        Ok(cfg)
    }
}

#[derive(Debug, Serialize)]
struct Info {
    uri: String,
    size: u64,
    read_only: bool,
    multi_conn: bool,
    flush: bool,
    trim: bool,
    write_zeroes: bool,
    block_size_minimum: u32,
    block_size_preferred: u32,
    block_size_maximum: u32,
    structured_replies: bool,
    tls: bool,
    negotiated_with: &'static str,
    meta_contexts: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Export {
    name: String,
    description: String,
}

#[derive(Debug, Serialize)]
struct MapEntry {
    offset: u64,
    length: u64,
    flags: u32,
}

/// Runs a `ferry nbd` subcommand.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Info(a) => {
            let cfg = a.config()?;
            // Ask for every context an operator is likely to look for; servers select what exists.
            let cfg = cfg.with_meta_context("qemu:allocation-depth");
            let c = NbdClient::connect(cfg).await?;
            let i = c.info();
            let info = Info {
                uri: c.uri_redacted(),
                size: i.size,
                read_only: i.read_only(),
                multi_conn: i.can_multi_conn(),
                flush: i.can_flush(),
                trim: i.can_trim(),
                write_zeroes: i.can_write_zeroes(),
                block_size_minimum: i.block_min,
                block_size_preferred: i.block_preferred,
                block_size_maximum: i.block_max,
                structured_replies: i.structured_replies,
                tls: i.tls,
                negotiated_with: if i.used_go {
                    "NBD_OPT_GO"
                } else {
                    "NBD_OPT_EXPORT_NAME"
                },
                meta_contexts: i.meta_contexts.clone(),
            };
            c.close().await;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("uri:                {}", info.uri);
                println!("size:               {}", info.size);
                println!(
                    "flags:              read-only={} multi-conn={} flush={} trim={} write-zeroes={}",
                    info.read_only, info.multi_conn, info.flush, info.trim, info.write_zeroes
                );
                println!(
                    "block sizes:        minimum {} preferred {} maximum {}",
                    info.block_size_minimum, info.block_size_preferred, info.block_size_maximum
                );
                println!("structured replies: {}", info.structured_replies);
                println!("tls:                {}", info.tls);
                println!("negotiated with:    {}", info.negotiated_with);
                println!("meta contexts:      {}", info.meta_contexts.join(", "));
            }
        }
        Command::List(a) => {
            let exports: Vec<Export> = ferry_nbd::list_exports(&a.config()?)
                .await?
                .into_iter()
                .map(|(name, description)| Export {
                    name: ferry_nbd::uri::redact_export(&name),
                    description,
                })
                .collect();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&exports)?);
            } else {
                for e in &exports {
                    if e.description.is_empty() {
                        println!("{}", e.name);
                    } else {
                        println!("{}\t{}", e.name, e.description);
                    }
                }
            }
        }
        Command::Map(m) => {
            let mut cfg = m.export.config()?;
            cfg.meta_contexts = vec![m.context.clone()];
            let c = NbdClient::connect(cfg).await?;
            let map: Vec<MapEntry> = c
                .block_status(&m.context, 0..c.size())
                .await?
                .into_iter()
                .map(|(r, flags)| MapEntry {
                    offset: r.start,
                    length: r.end - r.start,
                    flags,
                })
                .collect();
            c.close().await;
            if m.export.json {
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                for e in &map {
                    println!("{:>16} {:>16} {:>4}", e.offset, e.length, e.flags);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
