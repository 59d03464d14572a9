//! The sources configuration: `ferry.toml`, found by `--config`, then `FERRY_CONFIG`, then
//! `./ferry.toml`, then `/etc/ferry/ferry.toml`. One `[sources.NAME]` table per hypervisor
//! source; unknown keys inside a source are refused (a typo must not silently disable TLS
//! pinning). Other top-level tables belong to other parts of Ferry and are kept untouched.
//!
//! ```toml
//! [sources.lab-xen]
//! kind = "xen"
//! url = "https://127.0.0.1:8443"
//! username = "root"
//! password-file = "/etc/ferry/lab-xen.password"
//! tls-fingerprint = "sha256:AB:CD:…"          # or tls-ca-file = "ca.pem"; tls-insecure = true in a lab
//! # proxy = "http://proxy:3128"               # default: HTTPS_PROXY etc.; "none" ignores them
//! transports = ["san", "hotadd", "network"]   # order of preference
//! proxy-vm = "ferry-proxy"                     # hot-add target (name or uuid)
//! concurrency = 4
//! hotadd-device-dir = "/dev"
//! state-dir = "/var/lib/ferry"
//! [sources.lab-xen.san-paths]                  # SR uuid → where the proxy sees it
//! "0f6c…" = "/run/sr-mount/0f6c…"
//! ```

use crate::TransportMode;
use ferry_core::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A configuration error; names the file and the source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No configuration file was found.
    #[error("no configuration file: pass --config, set FERRY_CONFIG, or create ./ferry.toml")]
    NotFound,
    /// The source is not configured.
    #[error("config {path}: no source `{name}` (configured: {known})")]
    NoSource {
        /// The file.
        path: PathBuf,
        /// Asked for.
        name: String,
        /// What exists.
        known: String,
    },
    /// A source's settings are unusable.
    #[error("source `{source_name}`: {message}")]
    Source {
        /// The source.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// The password file cannot be read.
    #[error("source `{source_name}`: cannot read password file {path}: {cause}")]
    Password {
        /// The source.
        source_name: String,
        /// The password file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
}

/// Which hypervisor a source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Citrix Hypervisor / XCP-ng.
    Xen,
    /// VMware vSphere.
    Vmware,
    /// Hyper-V.
    Hyperv,
}

fn default_transports() -> Vec<TransportMode> {
    TransportMode::ALL.to_vec()
}
fn default_concurrency() -> usize {
    4
}
fn default_device_dir() -> PathBuf {
    PathBuf::from("/dev")
}

/// One `[sources.NAME]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SourceConfig {
    /// The hypervisor kind.
    pub kind: SourceKind,
    /// Management endpoint, e.g. `https://xen-pool-master`.
    pub url: String,
    /// Login user.
    pub username: String,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The password inline (discouraged; prefer `password-file`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// SHA-256 fingerprint of the endpoint's certificate, `sha256:AB:CD:…`.
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
    /// Trust certificates issued by the CAs in this PEM file (names are checked).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Accept any certificate (labs only; logged as a warning at every connection).
    #[serde(default)]
    pub tls_insecure: bool,
    /// HTTP proxy for the control plane: `http://[user:password@]host:port`, or `none` to
    /// ignore `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` of the environment (used when unset).
    #[serde(default)]
    pub proxy: Option<ProxyUrl>,
    /// Hosts reached without the proxy (`NO_PROXY` syntax), on top of `NO_PROXY`.
    #[serde(default)]
    pub no_proxy: Vec<String>,
    /// Transports in order of preference; modes not listed are never used.
    #[serde(default = "default_transports")]
    pub transports: Vec<TransportMode>,
    /// The proxy VM disks are hot-added to (name or id).
    #[serde(default)]
    pub proxy_vm: Option<String>,
    /// Disks read at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Where the proxy sees shared storage: storage id (SR uuid, datastore) → local path.
    #[serde(default)]
    pub san_paths: BTreeMap<String, PathBuf>,
    /// Hyper-V off-host: host path prefix of an NTFS volume (`C:\ClusterStorage\Volume1`) → the
    /// device of its snapshot LUN on the proxy; the `san` transport then reads the VHDX files
    /// through NTFS without mounting (ADR 0126).
    #[serde(default)]
    pub san_luns: BTreeMap<String, PathBuf>,
    /// Hyper-V failover cluster: node name → its WinRM endpoint, for nodes whose names do not
    /// resolve from the appliance or that have their own certificate (ADR 0153). Nodes not
    /// listed are reached at `url` with the node's name as host.
    #[serde(default)]
    pub nodes: BTreeMap<String, ClusterNode>,
    /// Where hot-added disks appear (`/dev`).
    #[serde(default = "default_device_dir")]
    pub hotadd_device_dir: PathBuf,
    /// Where the driver keeps its crash journal.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// vSphere: quiesce the guest (VMware Tools / VSS) when snapshotting; default true.
    #[serde(default)]
    pub quiesce: Option<bool>,
    /// vSphere: directory of VMware's VDDK (`libvixDiskLib.so`) for nbdkit's vddk plugin, which
    /// the `network` transport (NBD/NBDSSL) needs.
    #[serde(default)]
    pub vddk_libdir: Option<PathBuf>,
    /// vSphere: SHA-1 thumbprint of the server certificate for VDDK (`XX:XX:…`, 20 bytes).
    #[serde(default)]
    pub vddk_thumbprint: Option<String>,
    /// vSphere labs and tests only: `file` makes the `network` transport start nbdkit's file
    /// plugin on the snapshot's flat extent (found through `san-paths`) where it would start
    /// the vddk plugin; warned at every use.
    #[serde(default)]
    pub nbdkit_stand_in: Option<String>,
    /// Read swap partitions, swap files and NTFS paging files as zeros at backup (ADR 0071);
    /// `false` stores them like any data (as `ferry backup --no-exclude-swap`).
    #[serde(default = "default_exclude_swap")]
    pub exclude_swap: bool,
    /// Hyper-V: how WinRM logs in — `ntlm` (default; messages sealed over HTTP 5985),
    /// `basic` (labs) or `kerberos` (tickets from the realm's KDC; sealed over HTTP too).
    #[serde(default)]
    pub auth: Option<WinrmAuth>,
    /// Hyper-V: the NTLM domain, when `username` does not carry one (`DOMAIN\user`).
    #[serde(default)]
    pub domain: Option<String>,
    /// Hyper-V Kerberos: the realm, when `username` carries none (`user@REALM`); else `domain`.
    #[serde(default)]
    pub realm: Option<String>,
    /// Hyper-V Kerberos: the KDC (`host[:port]`, `tcp://…`, `udp://…`); else the realm's entry
    /// in `KRB5_CONFIG` (`/etc/krb5.conf`), then DNS SRV records.
    #[serde(default)]
    pub kdc: Option<String>,
    /// Hyper-V Kerberos: a keytab with the user's key, used instead of the password.
    #[serde(default)]
    pub keytab: Option<PathBuf>,
    /// Hyper-V: the host agent of the `network` transport (`[sources.NAME.agent]`).
    #[serde(default)]
    pub agent: Option<crate::agent::AgentSettings>,
    /// Hyper-V: the host folder whole-VM restores write to (a folder per VM, its VHDX files
    /// inside), e.g. `C:\ClusterStorage\Volume1\Restores`; an absolute host path under a
    /// `san-paths` prefix, through which the proxy writes. Default: the folder that held the
    /// backed-up VM's own folder.
    #[serde(default)]
    pub restore_dir: Option<String>,
    /// Hyper-V over HTTPS: bind NTLM logins to the TLS channel (RFC 5929
    /// `tls-server-end-point`), as a host with Extended Protection (`CbtHardeningLevel =
    /// Strict`) requires (ADR 0172). Default true.
    #[serde(default)]
    pub channel_binding: Option<bool>,
}

/// One `[sources.NAME.nodes]` entry: `HV01 = "https://hv01.lab:5986/wsman"` or
/// `HV01 = { url = "https://10.0.0.11:5986/wsman", tls-fingerprint = "sha256:…" }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ClusterNode {
    /// The node's WinRM endpoint; TLS trust as the source's.
    Url(String),
    /// The endpoint and the pin of the node's own certificate.
    Endpoint {
        /// The node's WinRM endpoint.
        url: String,
        /// SHA-256 fingerprint of the node's certificate (else the source's trust).
        #[serde(rename = "tls-fingerprint", default)]
        tls_fingerprint: Option<String>,
    },
}

impl ClusterNode {
    /// The node's WinRM endpoint.
    pub fn url(&self) -> &str {
        match self {
            Self::Url(u) | Self::Endpoint { url: u, .. } => u,
        }
    }

    /// The pin of the node's certificate, when it has its own.
    pub fn tls_fingerprint(&self) -> Option<&str> {
        match self {
            Self::Url(_) => None,
            Self::Endpoint {
                tls_fingerprint, ..
            } => tls_fingerprint.as_deref(),
        }
    }
}

/// `auth` of a Hyper-V source (ADR 0112).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WinrmAuth {
    /// NTLM with WinRM message encryption.
    #[default]
    Ntlm,
    /// HTTP Basic.
    Basic,
    /// Kerberos with WinRM message encryption (ADR 0159).
    Kerberos,
}

fn default_exclude_swap() -> bool {
    true
}

impl SourceConfig {
    /// The password, from `password-file` or `password`.
    pub fn password(&self, name: &str) -> Result<Secret, ConfigError> {
        if let Some(p) = &self.password_file {
            let s = std::fs::read_to_string(p).map_err(|cause| ConfigError::Password {
                source_name: name.into(),
                path: p.clone(),
                cause,
            })?;
            return Ok(Secret::new(s.trim_end_matches(['\n', '\r'])));
        }
        Ok(self.password.clone().unwrap_or_default())
    }

    /// The state directory: `state-dir`, else `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(x).join("ferry");
        }
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/state/ferry"))
            .unwrap_or_else(|| PathBuf::from("/var/lib/ferry"))
    }

    /// The HTTP client settings of this source's control plane: its TLS trust (reading
    /// `tls-ca-file`), proxy and exclusions.
    pub fn http_options(&self, name: &str) -> Result<ferry_http::ClientOptions, ConfigError> {
        let invalid = |message: String| ConfigError::Source {
            source_name: name.into(),
            message,
        };
        let trust = match (&self.tls_fingerprint, &self.tls_ca_file, self.tls_insecure) {
            (Some(f), _, _) => {
                ferry_tls::Trust::Fingerprint(ferry_tls::parse_fingerprint(f).ok_or_else(|| {
                    invalid("tls-fingerprint must be sha256:XX:XX:… (32 bytes)".into())
                })?)
            }
            (None, Some(p), _) => {
                ferry_tls::Trust::CaPem(std::fs::read_to_string(p).map_err(|e| {
                    invalid(format!("cannot read tls-ca-file {}: {e}", p.display()))
                })?)
            }
            (None, None, true) => ferry_tls::Trust::Insecure,
            (None, None, false) => {
                return Err(invalid(
                    "set tls-fingerprint or tls-ca-file (or tls-insecure = true in a lab)".into(),
                ));
            }
        };
        let mut o = ferry_http::ClientOptions::new(name, trust);
        o.proxy = match &self.proxy {
            None => ferry_http::ProxySetting::FromEnv,
            Some(p) if p.0.eq_ignore_ascii_case("none") => ferry_http::ProxySetting::Off,
            Some(p) => ferry_http::ProxySetting::Url(p.0.clone()),
        };
        o.no_proxy = self.no_proxy.clone();
        Ok(o)
    }

    fn validate(&self, name: &str) -> Result<(), String> {
        // WinRM over HTTP 5985 is safe with NTLM: every message is sealed (ADR 0112).
        let sealed_http = self.kind == SourceKind::Hyperv
            && matches!(
                self.auth.unwrap_or_default(),
                WinrmAuth::Ntlm | WinrmAuth::Kerberos
            )
            && self.url.starts_with("http://");
        if !self.url.starts_with("https://") && !sealed_http {
            return Err(format!(
                "source `{name}`: url must be https://…, not `{}`",
                self.url
            ));
        }
        let trusts = [
            self.tls_fingerprint.is_some(),
            self.tls_ca_file.is_some(),
            self.tls_insecure,
        ];
        match trusts.iter().filter(|t| **t).count() {
            0 => {
                return Err(format!(
                    "source `{name}`: set tls-fingerprint or tls-ca-file (or tls-insecure = true in a lab)"
                ));
            }
            1 => {}
            _ => {
                return Err(format!(
                    "source `{name}`: tls-fingerprint, tls-ca-file and tls-insecure exclude each other"
                ));
            }
        }
        match &self.tls_fingerprint {
            Some(f) if ferry_tls::parse_fingerprint(f).is_none() => {
                return Err(format!(
                    "source `{name}`: tls-fingerprint must be sha256:XX:XX:… (32 bytes)"
                ));
            }
            _ => {}
        }
        if self.kind != SourceKind::Hyperv && (self.auth.is_some() || self.domain.is_some()) {
            return Err(format!(
                "source `{name}`: auth and domain are Hyper-V settings"
            ));
        }
        let kerberos_keys = self.realm.is_some() || self.kdc.is_some() || self.keytab.is_some();
        if kerberos_keys
            && (self.kind != SourceKind::Hyperv || self.auth != Some(WinrmAuth::Kerberos))
        {
            return Err(format!(
                "source `{name}`: realm, kdc and keytab go with auth = \"kerberos\""
            ));
        }
        if let Some(a) = &self.agent {
            if self.kind != SourceKind::Hyperv {
                return Err(format!(
                    "source `{name}`: agent is a Hyper-V setting (the host agent)"
                ));
            }
            a.validate(name)?;
        }
        if !self.nodes.is_empty() && self.kind != SourceKind::Hyperv {
            return Err(format!(
                "source `{name}`: nodes are the Hyper-V cluster's nodes; {:?} sources have none",
                self.kind
            ));
        }
        for (node, n) in &self.nodes {
            let u = n.url();
            if !(u.starts_with("https://") || sealed_http && u.starts_with("http://")) {
                return Err(format!(
                    "source `{name}`: node `{node}`: url must be https://…, not `{u}`"
                ));
            }
            if n.tls_fingerprint()
                .is_some_and(|f| ferry_tls::parse_fingerprint(f).is_none())
            {
                return Err(format!(
                    "source `{name}`: node `{node}`: tls-fingerprint must be sha256:XX:XX:… (32 bytes)"
                ));
            }
        }
        if let Some(d) = &self.restore_dir {
            check_restore_dir(self, d).map_err(|m| format!("source `{name}`: restore-dir {m}"))?;
        }
        if self.password_file.is_some() && self.password.is_some() {
            return Err(format!(
                "source `{name}`: password-file and password exclude each other"
            ));
        }
        if self.transports.is_empty() {
            return Err(format!(
                "source `{name}`: transports must list at least one mode"
            ));
        }
        let mut seen = self.transports.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.transports.len() {
            return Err(format!("source `{name}`: transports lists a mode twice"));
        }
        if let Some(p) = self.nbdkit_stand_in.as_deref().filter(|p| *p != "file") {
            return Err(format!(
                "source `{name}`: nbdkit-stand-in must be \"file\", not `{p}`"
            ));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err(format!("source `{name}`: concurrency must be 1..=64"));
        }
        Ok(())
    }
}

/// `restore-dir` is an absolute Windows path (`X:\…` or `\\server\share\…`) without `.`/`..`
/// components, under one of the source's `san-paths` prefixes (component-wise, any case) unless
/// the source writes restores through its host agent (`network` with an `agent` table).
fn check_restore_dir(src: &SourceConfig, d: &str) -> Result<(), String> {
    if src.kind != SourceKind::Hyperv {
        return Err("is a Hyper-V setting".into());
    }
    let p = d.replace('/', "\\");
    let b = p.as_bytes();
    let drive = b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'\\';
    let unc = p.starts_with("\\\\") && p[2..].split('\\').filter(|s| !s.is_empty()).count() >= 2;
    if !drive && !unc {
        return Err(format!(
            "`{d}` must be an absolute host path (C:\\… or \\\\server\\share\\…)"
        ));
    }
    if p.split('\\').any(|c| c == "." || c == "..") {
        return Err(format!("`{d}` must not contain `.` or `..`"));
    }
    let norm = |s: &str| s.replace('/', "\\").trim_end_matches('\\').to_lowercase();
    let covered = src.san_paths.keys().any(|k| {
        let (k, p) = (norm(k), norm(&p));
        p == k || (p.starts_with(&k) && p[k.len()..].starts_with('\\'))
    });
    // Through the host agent the restore needs no share (ADR 0170); the agent checks its
    // restore roots.
    let agent = src.agent.is_some() && src.transports.contains(&TransportMode::Network);
    if !covered && !agent {
        return Err(format!(
            "`{d}` is under no san-paths prefix: the proxy cannot write there"
        ));
    }
    Ok(())
}

/// A proxy URL from the config; its `Debug` hides the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ProxyUrl(pub String);

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `scheme://user:password@host` → `scheme://user:***@host`.
        let s = &self.0;
        let shown = match (s.find("://"), s.rfind('@')) {
            (Some(i), Some(at)) if at > i => match s[i + 3..at].split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &s[..i + 3], &s[at..]),
                None => s.clone(),
            },
            _ => s.clone(),
        };
        write!(f, "{shown:?}")
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FerryConfig {
    /// Hypervisor sources by name.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Tables owned by other parts of Ferry (repositories, schedules, …).
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
    /// Where it was loaded from.
    #[serde(skip)]
    pub path: PathBuf,
}

impl FerryConfig {
    /// Parses and validates `text` (from `path`, for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        let mut cfg: FerryConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (name, s) in &cfg.sources {
            s.validate(name).map_err(invalid)?;
        }
        cfg.path = path.into();
        Ok(cfg)
    }

    /// Loads `explicit`, else `$FERRY_CONFIG`, else `./ferry.toml`, else `/etc/ferry/ferry.toml`.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("FERRY_CONFIG") {
                Some(p) => PathBuf::from(p),
                None => ["ferry.toml", "/etc/ferry/ferry.toml"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.exists())
                    .ok_or(ConfigError::NotFound)?,
            },
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// The source called `name`.
    pub fn source(&self, name: &str) -> Result<&SourceConfig, ConfigError> {
        self.sources.get(name).ok_or_else(|| ConfigError::NoSource {
            path: self.path.clone(),
            name: name.into(),
            known: if self.sources.is_empty() {
                "none".into()
            } else {
                self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    fn parse(t: &str) -> Result<FerryConfig, ConfigError> {
        FerryConfig::parse(t, Path::new("/etc/ferry/ferry.toml"))
    }

    #[test]
    fn the_documented_shape_works() {
        let d = tempfile::tempdir().unwrap();
        let pw = d.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let t = format!(
            "[repository]\nurl = \"s3://b\"\n\n[sources.lab-xen]\nkind = \"xen\"\nurl = \"https://127.0.0.1:8443\"\nusername = \"root\"\npassword-file = \"{}\"\ntls-fingerprint = \"{FP}\"\ntransports = [\"san\", \"hotadd\", \"network\"]\n",
            pw.display()
        );
        let c = parse(&t).unwrap();
        let s = c.source("lab-xen").unwrap();
        assert_eq!(s.kind, SourceKind::Xen);
        assert_eq!(s.transports, TransportMode::ALL.to_vec());
        assert_eq!(s.password("lab-xen").unwrap().expose(), "hunter2");
        assert!(c.other.contains_key("repository"));
        assert!(!format!("{s:?}").contains("hunter2"));
        let e = c.source("nope").unwrap_err().to_string();
        assert!(e.contains("lab-xen") && e.contains("nope"), "{e}");
    }

    #[test]
    fn refuses_typos_and_unsafe_tls() {
        let base = "[sources.x]\nkind = \"xen\"\nurl = \"https://h\"\nusername = \"root\"\n";
        for (extra, want) in [
            (
                "tls-insecure = true\ntls-fingerprnt = \"x\"\n",
                "unknown field",
            ),
            ("", "tls-fingerprint"),
            ("tls-fingerprint = \"sha256:00\"\n", "32 bytes"),
            ("tls-insecure = true\ntransports = []\n", "at least one"),
            (
                "tls-insecure = true\ntransports = [\"network\", \"network\"]\n",
                "twice",
            ),
            (
                "tls-insecure = true\ntransports = [\"carrier-pigeon\"]\n",
                "unknown variant",
            ),
            ("tls-insecure = true\nconcurrency = 0\n", "concurrency"),
            (
                "tls-insecure = true\ntls-ca-file = \"/ca.pem\"\n",
                "exclude each other",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("/etc/ferry/ferry.toml"),
                "{extra}: {e}"
            );
        }
        let e = parse("[sources.x]\nkind = \"xen\"\nurl = \"http://h\"\nusername = \"r\"\ntls-insecure = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("https"), "{e}");
    }

    #[test]
    fn hyperv_auth_defaults_to_ntlm_and_belongs_to_hyperv() {
        let base = "[sources.h]\nkind = \"hyperv\"\nurl = \"http://h:5985/wsman\"\nusername = \"r\"\ntls-insecure = true\n";
        let c = parse(base).unwrap();
        let s = c.source("h").unwrap();
        assert_eq!(s.auth.unwrap_or_default(), WinrmAuth::Ntlm);
        let c = parse(&format!(
            "{}auth = \"basic\"\ndomain = \"LAB\"\n",
            base.replace("http:", "https:")
        ))
        .unwrap();
        let s = c.source("h").unwrap();
        assert_eq!(
            (s.auth, s.domain.as_deref()),
            (Some(WinrmAuth::Basic), Some("LAB"))
        );
        assert!(parse(&format!("{base}auth = \"digest\"\n")).is_err());
        // Basic in the clear over HTTP is not accepted.
        let e = parse(&format!("{base}auth = \"basic\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("https"), "{e}");
        let xen = base.replace("hyperv", "xen").replace("http:", "https:") + "auth = \"ntlm\"\n";
        let e = parse(&xen).unwrap_err().to_string();
        assert!(e.contains("Hyper-V settings"), "{e}");
    }

    #[test]
    fn kerberos_keys_go_with_auth_kerberos() {
        let base = "[sources.h]\nkind = \"hyperv\"\nurl = \"http://h:5985/wsman\"\nusername = \"alice@LAB.TEST\"\ntls-insecure = true\n";
        let c = parse(&format!(
            "{base}auth = \"kerberos\"\nrealm = \"LAB.TEST\"\nkdc = \"kdc.lab.test:88\"\nkeytab = \"/etc/ferry/alice.keytab\"\n"
        ))
        .unwrap();
        let s = c.source("h").unwrap();
        assert_eq!(s.auth, Some(WinrmAuth::Kerberos));
        assert_eq!(s.kdc.as_deref(), Some("kdc.lab.test:88"));
        let e = parse(&format!("{base}kdc = \"kdc:88\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth = \"kerberos\""), "{e}");
    }

    #[test]
    fn restore_dir_is_an_absolute_host_path_under_san_paths() {
        let base = "[sources.h]\nkind = \"hyperv\"\nurl = \"https://h:5986/wsman\"\nusername = \"r\"\ntls-insecure = true\n";
        let with = |d: &str, paths: &str| {
            format!("{base}restore-dir = '{d}'\n[sources.h.san-paths]\n{paths}")
        };
        let share = "'\\\\fs\\vms' = \"/mnt/vms\"\n'C:\\ClusterStorage\\Volume1' = \"/mnt/csv1\"\n";
        for ok in [
            "C:\\ClusterStorage\\Volume1\\Restores",
            "c:\\clusterstorage\\volume1",
            "\\\\fs\\vms\\r",
        ] {
            parse(&with(ok, share)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("Restores", "absolute host path"),
            ("C:\\ClusterStorage\\Volume1\\..\\x", "`..`"),
            ("C:\\ClusterStorage\\Volume10", "under no san-paths prefix"),
            ("D:\\r", "under no san-paths prefix"),
        ] {
            let e = parse(&with(bad, share)).unwrap_err().to_string();
            assert!(e.contains("restore-dir") && e.contains(why), "{bad}: {e}");
        }
        let xen = with("C:\\r", "'C:\\' = \"/x\"\n").replace("hyperv", "xen");
        assert!(
            parse(&xen)
                .unwrap_err()
                .to_string()
                .contains("Hyper-V setting")
        );
    }

    #[test]
    fn restore_dir_needs_no_san_paths_through_the_host_agent() {
        let t = |transports: &str| {
            format!(
                "[sources.h]\nkind = \"hyperv\"\nurl = \"https://h:5986/wsman\"\nusername = \"r\"\ntls-insecure = true\ntransports = {transports}\nrestore-dir = 'D:\\Restores'\n[sources.h.agent]\nfingerprint = \"sha256:{}\"\n",
                "AB".repeat(32)
            )
        };
        parse(&t("[\"network\"]")).unwrap();
        let e = parse(&t("[\"san\"]")).unwrap_err().to_string();
        assert!(e.contains("under no san-paths prefix"), "{e}");
    }

    #[test]
    fn password_file_errors_name_the_file_not_the_secret() {
        let c = parse("[sources.x]\nkind = \"xen\"\nurl = \"https://h\"\nusername = \"r\"\ntls-insecure = true\npassword-file = \"/nonexistent/pw\"\n").unwrap();
        let e = c
            .source("x")
            .unwrap()
            .password("x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/pw") && e.contains("`x`"), "{e}");
    }

    #[test]
    fn http_options_carry_trust_and_proxy_without_leaking_the_proxy_password() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca.pem");
        let cert = ferry_tls::SelfSigned::generate(&["localhost"]).unwrap();
        std::fs::write(&ca, &cert.cert_pem).unwrap();
        let base = "[sources.x]\nkind = \"xen\"\nurl = \"https://h\"\nusername = \"r\"\n";
        let c = parse(&format!(
            "{base}tls-ca-file = \"{}\"\nproxy = \"http://bob:hunter2@proxy:3128\"\nno-proxy = [\"h\"]\n",
            ca.display()
        ))
        .unwrap();
        let s = c.source("x").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
        let o = s.http_options("x").unwrap();
        assert_eq!(o.trust, ferry_tls::Trust::CaPem(cert.cert_pem.clone()));
        assert_eq!(
            o.proxy,
            ferry_http::ProxySetting::Url("http://bob:hunter2@proxy:3128".into())
        );
        assert_eq!(o.no_proxy, vec!["h".to_string()]);
        assert!(!format!("{o:?}").contains("hunter2"));

        let c = parse(&format!(
            "{base}tls-fingerprint = \"{FP}\"\nproxy = \"none\"\n"
        ))
        .unwrap();
        let o = c.source("x").unwrap().http_options("x").unwrap();
        assert!(matches!(o.trust, ferry_tls::Trust::Fingerprint(_)));
        assert_eq!(o.proxy, ferry_http::ProxySetting::Off);

        let c = parse(&format!("{base}tls-ca-file = \"/nonexistent/ca.pem\"\n")).unwrap();
        let e = c
            .source("x")
            .unwrap()
            .http_options("x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("`x`"),
            "{e}"
        );
    }

    #[test]
    fn hyperv_cluster_nodes_take_a_url_or_a_url_with_its_pin() {
        let base = "[sources.c]\nkind = \"hyperv\"\nurl = \"https://hvc:5986/wsman\"\nusername = \"u\"\ntls-insecure = true\n";
        let c = parse(&format!(
            "{base}[sources.c.nodes]\nHV01 = \"https://127.0.0.1:1/wsman\"\nHV02 = {{ url = \"https://127.0.0.1:2/wsman\", tls-fingerprint = \"{FP}\" }}\n"
        ))
        .unwrap();
        let n = &c.source("c").unwrap().nodes;
        assert_eq!(n["HV01"].url(), "https://127.0.0.1:1/wsman");
        assert_eq!(n["HV01"].tls_fingerprint(), None);
        assert_eq!(n["HV02"].tls_fingerprint(), Some(FP));
        for (bad, why) in [
            ("HV01 = \"ftp://x\"\n", "url must be https"),
            (
                "HV01 = { url = \"https://x\", tls-fingerprint = \"md5:1\" }\n",
                "tls-fingerprint must be",
            ),
        ] {
            let e = parse(&format!("{base}[sources.c.nodes]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains("HV01"), "{e}");
        }
        let xen = "[sources.x]\nkind = \"xen\"\nurl = \"https://h\"\nusername = \"u\"\ntls-insecure = true\n[sources.x.nodes]\nA = \"https://a\"\n";
        let e = parse(xen).unwrap_err().to_string();
        assert!(e.contains("nodes are the Hyper-V cluster"), "{e}");
    }
}
