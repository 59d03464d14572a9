//! The XenAPI simulator. Start it with [`XenSim::start`]; it serves HTTPS (self-signed
//! certificate) on the given address and NBD (TLS) on a second port, and stores VDIs under
//! `dir/<sr-uuid>/`. The side door (`XenSim` methods other than `start`/`url`) lets tests
//! act as the guest or the administrator and inject faults.
//!
//! Fidelity notes: `int` fields travel as strings over XML-RPC and as numbers over JSON-RPC;
//! `task.result` is an XML-RPC `<value>` document; `VDI.list_changed_blocks` answers a base64
//! bitmap, one bit per 64 KiB, most significant bit first; `VDI.get_nbd_info` is empty unless a
//! network has purpose `nbd` or `insecure_nbd`; the NBD port is not 10809 but a free port
//! (several simulators run at once in tests).

mod api;
mod http;
mod nbd;
mod nbdsr;
mod replica;
mod seed;
mod sidedoor;
pub mod storage;
pub mod value;

pub use api::{Failure, NULL};
pub use value::Value;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the simulator could not start or a side-door call failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Binding or file I/O failed.
    #[error("XenAPI simulator: {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A XenAPI call failed.
    #[error("XenAPI simulator: {call} failed: {}", failure.0.join(" "))]
    Api {
        /// The call.
        call: String,
        /// The XenAPI error.
        failure: Failure,
    },
    /// Anything else.
    #[error("XenAPI simulator: {0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
    let what = what.into();
    move |source| SimError::Io { what, source }
}

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct XenSimConfig {
    /// Where VDIs are stored (created if missing).
    pub dir: PathBuf,
    /// HTTPS listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Login user.
    pub username: String,
    /// Login password.
    pub password: String,
    /// Seed an inventory of VMs with data (see [`seed`](XenSim#seeded-inventory)).
    pub seed: bool,
    /// Size of each seeded disk in MiB.
    pub disk_mib: u64,
    /// Small VMs seeded beside the two (`vm-01` …, one disk each), for tests of many VMs.
    pub extra_vms: u32,
}

impl XenSimConfig {
    /// Defaults: localhost on a free port, `root`/`xensim`, seeded, 32 MiB disks.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            username: "root".into(),
            password: "xensim".into(),
            seed: true,
            disk_mib: 32,
            extra_vms: 0,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) state: tokio::sync::Mutex<api::State>,
}

/// A running XenAPI simulator; stops when dropped.
///
/// # Seeded inventory
/// Pool `ferry-sim-pool` with host `sim-host-1`; SRs `Local storage` (kind `ext`, VDIs as
/// `<uuid>.vhd`) and `Shared LVM storage` (kind `lvm`, VDIs as `VHD-<uuid>`); network
/// `Pool-wide network associated with eth0` with purpose `nbd`; the control domain; a running
/// proxy VM `ferry-proxy` (hot-add target); and running VMs `debian-web` (2 vCPUs, 2 GiB,
/// disks on both SRs) and `win-db` (4 vCPUs, 4 GiB, both disks on LVM), each with two disks
/// of boot sectors, log text, binary data and holes, and one VIF.
pub struct XenSim {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    url: String,
    fingerprint: String,
    cert_pem: String,
    http_connections: Arc<std::sync::atomic::AtomicU64>,
    username: String,
    password: String,
    dir: PathBuf,
    /// SR uuid → the directory holding its VDIs (what a proxy's `san-paths` would name).
    san_paths: std::collections::BTreeMap<String, PathBuf>,
}

impl Drop for XenSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn dispatch(
    shared: &Arc<Shared>,
    method: &str,
    params: Vec<Value>,
) -> Result<Value, Failure> {
    let Some(inner) = method.strip_prefix("Async.") else {
        return shared.state.lock().await.call(method, params).await;
    };
    let inner = inner.to_string();
    let mut st = shared.state.lock().await;
    let sref = params
        .first()
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !st.session_valid(&sref) {
        return Err(Failure::new("SESSION_INVALID", &[&sref]));
    }
    let task = st.new_task(&sref, method);
    let delay = st.faults.task_delay;
    drop(st);
    let sh = shared.clone();
    let t = task.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut st = sh.state.lock().await;
        if st.fstr("task", &t, "status").ok().as_deref() != Some("pending") {
            return; // cancelled or destroyed
        }
        let r = st.call(&inner, params).await;
        st.finish_task(&t, r);
    });
    Ok(Value::s(task))
}

/// The VDI of an `/export_raw_vdi` or `/import_raw_vdi` query; only `format=raw` is served.
fn raw_vdi_of_query(st: &api::State, q: &HashMap<String, String>) -> Result<String, Failure> {
    if let Some(f) = q.get("format").filter(|f| *f != "raw") {
        return Err(Failure::new("FORMAT_NOT_SUPPORTED", &[f.as_str()]));
    }
    vdi_of_query(st, q)
}

fn vdi_of_query(st: &api::State, q: &HashMap<String, String>) -> Result<String, Failure> {
    let sref = q.get("session_id").cloned().unwrap_or_default();
    if !st.session_valid(&sref) {
        return Err(Failure::new("SESSION_INVALID", &[&sref]));
    }
    let v = q.get("vdi").cloned().unwrap_or_default();
    if st.obj("VDI", &v).is_ok() {
        return Ok(v);
    }
    st.by_uuid("VDI", &v)
}

pub(crate) async fn export_vdi(
    shared: &Arc<Shared>,
    q: &HashMap<String, String>,
) -> Result<Arc<dyn ferry_core::BlockSource>, Failure> {
    let st = shared.state.lock().await;
    let vdi = raw_vdi_of_query(&st, q)?;
    let d = st
        .disks
        .get(&vdi)
        .cloned()
        .ok_or_else(|| Failure::new("VDI_MISSING", &["", &vdi]))?;
    let file = d
        .file
        .ok_or_else(|| Failure::new("VDI_MISSING", &["", &vdi]))?;
    drop(st);
    storage::open(&file, d.live)
        .await
        .map_err(|m| Failure::new("SR_BACKEND_FAILURE", &["", "", &m]))
}

pub(crate) async fn import_target(
    shared: &Arc<Shared>,
    q: &HashMap<String, String>,
    len: u64,
) -> Result<(String, u64), Failure> {
    let st = shared.state.lock().await;
    let vhd = q.get("format").is_some_and(|f| f == "vhd");
    let vdi = if vhd {
        vdi_of_query(&st, q)?
    } else {
        raw_vdi_of_query(&st, q)?
    };
    let d = st
        .disks
        .get(&vdi)
        .ok_or_else(|| Failure::new("VDI_MISSING", &["", &vdi]))?;
    if !d.live {
        return Err(Failure::new("VDI_READ_ONLY", &[&vdi]));
    }
    // A VHD carries metadata besides data; its virtual size is checked once it is here.
    if !vhd && len > d.size {
        return Err(Failure::new("VDI_TOO_SMALL", &[&vdi, &len.to_string()]));
    }
    let size = d.size;
    Ok((vdi, size))
}

/// Applies an uploaded VHD (`import_raw_vdi?format=vhd`) to a live VDI as xapi's vhd-tool
/// does: only the blocks the VHD allocates are written, the rest of the VDI is untouched.
pub(crate) async fn apply_vhd(shared: &Arc<Shared>, vdi: &str, vhd: &Path) -> Result<(), Failure> {
    let bad = |m: String| Failure::new("VDI_IO_ERROR", &[&format!("VHD import: {m}")]);
    let img = ferry_image::open_image(vhd)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let src = img.source;
    let size = shared
        .state
        .lock()
        .await
        .disks
        .get(vdi)
        .map(|d| d.size)
        .unwrap_or(0);
    if src.size() > size {
        return Err(Failure::new(
            "VDI_TOO_SMALL",
            &[vdi, &src.size().to_string()],
        ));
    }
    let alloc = src
        .allocated(0..src.size())
        .await
        .map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    for e in alloc.iter() {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(buf.len() as u64) as usize;
            src.read_at(pos, &mut buf[..n])
                .await
                .map_err(|e| bad(e.to_string()))?;
            shared.state.lock().await.write_vdi(vdi, pos, &buf[..n])?;
            pos += n as u64;
        }
    }
    Ok(())
}

impl XenSim {
    /// Starts the simulator.
    pub async fn start(cfg: XenSimConfig) -> Result<Self, SimError> {
        std::fs::create_dir_all(&cfg.dir).map_err(io(format!("create {}", cfg.dir.display())))?;
        let cert = ferry_tls::SelfSigned::generate(&["localhost", "127.0.0.1"])
            .map_err(|e| SimError::Other(e.to_string()))?;
        let (cert_pem, fingerprint) = (cert.cert_pem.clone(), cert.fingerprint());
        let tls = cert
            .server_config()
            .map_err(|e| SimError::Other(e.to_string()))?;

        let http = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(io(format!("bind {}", cfg.listen)))?;
        let addr = http.local_addr().map_err(io("local address"))?;
        let nbd_l = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
            .await
            .map_err(io("bind NBD port"))?;
        let nbd_port = nbd_l.local_addr().map_err(io("local address"))?.port();

        let mut st = api::State::new(cfg.dir.clone(), cfg.username.clone(), cfg.password.clone());
        st.nbd_host = addr.ip().to_string();
        st.nbd_port = nbd_port;
        st.cert_pem = cert_pem.clone();
        seed::base(&mut st).map_err(|f| SimError::Api {
            call: "seed".into(),
            failure: f,
        })?;
        if cfg.seed {
            seed::vms(&mut st, cfg.disk_mib << 20, cfg.extra_vms).map_err(|f| SimError::Api {
                call: "seed".into(),
                failure: f,
            })?;
        }
        let san_paths = st
            .all_of("SR")
            .iter()
            .filter_map(|r| st.fstr("SR", r, "uuid").ok())
            .map(|u| (u.clone(), cfg.dir.join(u)))
            .collect();
        let shared = Arc::new(Shared {
            state: tokio::sync::Mutex::new(st),
        });
        let shutdown = CancellationToken::new();

        // No grace period: a stopped simulator must look like a host that died.
        let server = ferry_http::Server::new(http)
            .tls(tls.clone())
            .grace(Duration::ZERO);
        let http_connections = server.connections();
        tokio::spawn(server.run(http::router(shared.clone()), shutdown.clone()));
        tokio::spawn(nbd::serve(shared.clone(), nbd_l, tls, shutdown.clone()));
        tracing::info!(%addr, nbd_port, "XenAPI simulator listening");
        Ok(Self {
            shared,
            shutdown,
            url: format!("https://{addr}"),
            fingerprint,
            cert_pem,
            http_connections,
            username: cfg.username,
            password: cfg.password,
            dir: cfg.dir,
            san_paths,
        })
    }

    /// `https://HOST:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// Login user.
    pub fn username(&self) -> &str {
        &self.username
    }
    /// Login password.
    pub fn password(&self) -> &str {
        &self.password
    }
    /// SHA-256 fingerprint of the certificate (HTTPS and NBD), `sha256:AB:CD:…`.
    pub fn tls_fingerprint(&self) -> &str {
        &self.fingerprint
    }
    /// The certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// The storage directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// SR uuid → the directory holding its VDI files (a proxy's `san-paths`).
    pub fn san_paths(&self) -> &std::collections::BTreeMap<String, PathBuf> {
        &self.san_paths
    }
    /// Where hot-added disks appear as files (a proxy's `hotadd-device-dir`).
    pub fn hotadd_device_dir(&self) -> PathBuf {
        self.dir.join("dev")
    }
    /// The one JSON line `ferry sim xen` prints: how to log in, plus what a proxy on this
    /// machine needs for the SAN and hot-add transports.
    pub fn info_json(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.url,
            "username": self.username,
            "password": self.password,
            "tls_fingerprint": self.fingerprint,
            "dir": self.dir,
            "proxy_vm": "ferry-proxy",
            "hotadd_device_dir": self.hotadd_device_dir(),
            "san_paths": self.san_paths,
            "console_dir": self.dir.join("console"),
        })
    }
    /// TCP connections accepted on the HTTPS port so far (keep-alive: many calls, few
    /// connections).
    pub fn http_connections(&self) -> u64 {
        self.http_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Stops serving.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Runs a XenAPI call in-process, as an administrator would.
    pub async fn call(&self, method: &str, params: Vec<Value>) -> Result<Value, SimError> {
        dispatch(&self.shared, method, params)
            .await
            .map_err(|failure| SimError::Api {
                call: method.into(),
                failure,
            })
    }

    /// A session for in-process calls.
    pub async fn login(&self) -> Result<String, SimError> {
        let v = self
            .call(
                "session.login_with_password",
                vec![
                    Value::s(&self.username),
                    Value::s(&self.password),
                    Value::s("2.21"),
                    Value::s("side-door"),
                ],
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    async fn with<T>(
        &self,
        f: impl FnOnce(&mut api::State) -> Result<T, Failure>,
    ) -> Result<T, SimError> {
        let mut st = self.shared.state.lock().await;
        f(&mut st).map_err(|failure| SimError::Api {
            call: "side door".into(),
            failure,
        })
    }

    /// The ref of the VM named `name` (not a snapshot).
    pub async fn vm(&self, name: &str) -> Result<String, SimError> {
        self.with(|st| {
            st.all_of("VM")
                .into_iter()
                .find(|r| {
                    st.fstr("VM", r, "name_label").ok().as_deref() == Some(name)
                        && !st.fbool("VM", r, "is_a_snapshot").unwrap_or(true)
                })
                .ok_or_else(|| Failure::new("UUID_INVALID", &["VM", name]))
        })
        .await
    }

    /// The live VDI refs of a VM's disks, in `userdevice` order.
    pub async fn vm_disks(&self, vm: &str) -> Result<Vec<String>, SimError> {
        self.with(|st| {
            let mut v = Vec::new();
            for b in st.frefs("VM", vm, "VBDs")? {
                if st.fstr("VBD", &b, "type")? == "Disk" {
                    v.push((
                        st.fstr("VBD", &b, "userdevice")?,
                        st.fstr("VBD", &b, "VDI")?,
                    ));
                }
            }
            v.sort();
            Ok(v.into_iter().map(|(_, d)| d).collect())
        })
        .await
    }

    /// A field of an object as a string (refs, uuids, names).
    pub async fn field(&self, class: &str, r: &str, field: &str) -> Result<String, SimError> {
        self.with(|st| st.fstr(class, r, field)).await
    }

    /// A boolean field of an object.
    pub async fn flag(&self, class: &str, r: &str, field: &str) -> Result<bool, SimError> {
        self.with(|st| st.fbool(class, r, field)).await
    }

    /// All refs of a class.
    pub async fn all(&self, class: &str) -> Result<Vec<String>, SimError> {
        self.with(|st| Ok(st.all_of(class))).await
    }

    /// Writes into a VM's live disk, as its guest would (stamping CBT).
    pub async fn guest_write(&self, vdi: &str, offset: u64, data: &[u8]) -> Result<(), SimError> {
        self.with(|st| st.write_vdi(vdi, offset, data)).await
    }

    /// A VDI's virtual content as a block source.
    async fn vdi_source(&self, vdi: &str) -> Result<Arc<dyn ferry_core::BlockSource>, SimError> {
        let (file, live) = self
            .with(|st| {
                let d = st
                    .disks
                    .get(vdi)
                    .ok_or_else(|| Failure::new("HANDLE_INVALID", &["VDI", vdi]))?;
                Ok((
                    d.file
                        .clone()
                        .ok_or_else(|| Failure::new("VDI_MISSING", &["", vdi]))?,
                    d.live,
                ))
            })
            .await?;
        storage::open(&file, live).await.map_err(SimError::Other)
    }

    /// Reads a VDI's whole virtual content.
    pub async fn read_vdi(&self, vdi: &str) -> Result<Vec<u8>, SimError> {
        let src = self.vdi_source(vdi).await?;
        ferry_core::block::read_all(src.as_ref())
            .await
            .map_err(|e| SimError::Other(e.to_string()))
    }

    /// Writes a VDI's whole virtual content into a sparse raw file at `out`.
    pub async fn save_vdi(&self, vdi: &str, out: &Path) -> Result<(), SimError> {
        let src = self.vdi_source(vdi).await?;
        storage::materialize(src.as_ref(), out)
            .await
            .map_err(SimError::Other)
    }

    /// Where a VDI's data lives (raw for live VDIs, VHD for snapshots), if it still has data.
    pub async fn vdi_file(&self, vdi: &str) -> Result<Option<PathBuf>, SimError> {
        self.with(|st| Ok(st.disks.get(vdi).and_then(|d| d.file.clone())))
            .await
    }

    /// Powers a VM on or off.
    pub async fn set_power(&self, vm: &str, running: bool) -> Result<(), SimError> {
        let s = self.login().await?;
        let m = if running {
            "VM.start"
        } else {
            "VM.hard_shutdown"
        };
        let mut p = vec![Value::s(&s), Value::s(vm)];
        if running {
            p.extend([Value::Bool(false), Value::Bool(false)]);
        }
        let r = self.call(m, p).await.map(|_| ());
        let _ = self.call("session.logout", vec![Value::s(&s)]).await;
        r
    }

    /// Breaks CBT on a live VDI the way a storage migration does: the CBT log is reset, so
    /// no earlier snapshot can be compared with a later one.
    pub async fn break_cbt(&self, vdi: &str) -> Result<(), SimError> {
        self.with(|st| st.break_cbt(vdi)).await
    }

    /// Adds or removes purpose `nbd` on every network.
    pub async fn set_nbd_network(&self, enabled: bool) -> Result<(), SimError> {
        self.with(|st| st.set_nbd_network(enabled)).await
    }

    /// Makes the next `count` calls of `method` fail with `error` (`[code, params…]`).
    pub async fn fail_next(
        &self,
        method: &str,
        error: &[&str],
        count: usize,
    ) -> Result<(), SimError> {
        self.with(|st| {
            st.fail_next(method, error.iter().map(|s| s.to_string()).collect(), count);
            Ok(())
        })
        .await
    }

    /// Keeps every later `Async.*` task pending for `delay` before it runs.
    pub async fn set_task_delay(&self, delay: Duration) -> Result<(), SimError> {
        self.with(|st| {
            st.faults.task_delay = delay;
            Ok(())
        })
        .await
    }

    /// Drops every later NBD connection after `bytes` bytes sent (`None`: never).
    pub async fn set_nbd_drop_after(&self, bytes: Option<u64>) -> Result<(), SimError> {
        self.with(|st| {
            st.faults.nbd_drop_after = bytes;
            Ok(())
        })
        .await
    }

    /// Originators of the live sessions (one entry per session).
    pub async fn sessions(&self) -> Vec<String> {
        let st = self.shared.state.lock().await;
        st.sessions
            .keys()
            .filter_map(|s| st.originator(s))
            .collect()
    }
}
