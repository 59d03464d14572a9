//! The vSphere simulator: an HTTPS front (hyper through axum, ADR 0059) that passes vim25 on
//! to govmomi's vcsim, run as a child process on a private loopback port, and fills in what vcsim
//! lacks (ADR 0081):
//!
//! - disk contents: each `VirtualDisk` of each VM is a sparse raw file under `<dir>/live/`;
//!   guest writes (side door) stamp its 64 KiB blocks with a global generation;
//! - snapshots: after vcsim's CreateSnapshot_Task, every disk of the VM is frozen into the
//!   datastore directory `<dir>/datastores/<ds>/` as a VMDK descriptor (the backing's file name)
//!   and its `-flat.vmdk` extent, as on VMFS; the proxy reads them in direct (SAN) mode;
//! - changed block tracking: `changeId`s in disk backings (added to property collector answers),
//!   advanced at every snapshot; QueryChangedDiskAreas answered from the stamps, paged by
//!   `startOffset` in windows of `cbt_page` bytes; `*` answers the allocated blocks;
//! - faults: the next calls of a method fail with a given vim25 fault (a SOAP fault, also for
//!   `*_Task` methods), and CBT can be reset (old changeIds then fail with `FileFault`);
//! - clones: `CloneVM_Task` gets disk contents (the snapshot's when it names one) and leaves
//!   its source's disks alone (clone.rs).
//!
//! The side door is a set of vim25-shaped methods that real vCenter does not have
//! (`FerrySimGuestWrite`, `FerrySimResetCbt`, `FerrySimFailNext`, `FerrySimSnapshotCount`),
//! callable on any session.

mod clone;
mod soap;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// CBT granularity of the simulator.
pub const BLOCK: u64 = 64 << 10;

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum VmwareSimError {
    /// vcsim could not be started or answered nonsense.
    #[error("vSphere simulator: vcsim: {0}")]
    Vcsim(String),
    /// File or socket I/O.
    #[error("vSphere simulator: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("vSphere simulator: {0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmwareSimError {
    let what = what.into();
    move |source| VmwareSimError::Io { what, source }
}

/// Settings.
#[derive(Debug, Clone)]
pub struct VmwareSimConfig {
    /// Where disks and datastores live.
    pub dir: PathBuf,
    /// HTTPS listen address.
    pub listen: SocketAddr,
    /// The vcsim program.
    pub vcsim: PathBuf,
    /// VMs per resource pool (vcsim's `-vm`).
    pub vms: u32,
    /// Size of the second disk added to the first VM, MiB.
    pub disk_mib: u64,
    /// Window of one QueryChangedDiskAreas answer, bytes.
    pub cbt_page: u64,
}

impl VmwareSimConfig {
    /// Defaults: loopback on a free port, vcsim from `$FERRY_PEERS_DIR/bin` or `PATH`, 2 VMs per
    /// pool, a 16 MiB second disk, 4 MiB CBT windows.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            vcsim: find_vcsim(),
            vms: 2,
            disk_mib: 16,
            cbt_page: 4 << 20,
        }
    }
}

/// `$FERRY_VCSIM`, `$FERRY_PEERS_DIR/bin/vcsim`, else `vcsim` on `PATH`.
pub fn find_vcsim() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_VCSIM") {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("FERRY_PEERS_DIR") {
        let p = PathBuf::from(d).join("bin/vcsim");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("vcsim")
}

#[derive(Debug, Clone)]
struct Disk {
    capacity: u64,
    live: PathBuf,
    /// Datastore path of the backing, `[ds] dir/file.vmdk`.
    file: String,
    stamps: Vec<u64>,
    epoch: u64,
    /// Created through the API (CreateVM_Task): its live file is the datastore's flat extent,
    /// written by nbdkit rather than the side door, so CBT learns of that data at the next
    /// snapshot (non-zero blocks never stamped).
    external: bool,
}

#[derive(Debug, Clone)]
struct SnapDisk {
    stamps: Vec<u64>,
    generation: u64,
    epoch: u64,
    change_id: String,
    /// The disk's content when the snapshot was taken (a sparse raw copy under
    /// `<dir>/snapshots/<snapshot>/`), written back by RevertToSnapshot_Task.
    content: PathBuf,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    /// (vm, device key) → disk.
    disks: BTreeMap<(String, i64), Disk>,
    /// VMs with CBT on.
    cbt: std::collections::BTreeSet<String>,
    /// snapshot → (vm, device key → frozen disk).
    snaps: BTreeMap<String, (String, BTreeMap<i64, SnapDisk>)>,
    /// method → faults to answer next.
    fail_next: BTreeMap<String, Vec<String>>,
    /// method → connection drops to inject next: `request` (before vcsim sees the call) or
    /// `response` (after vcsim ran it, the answer lost).
    drop_next: BTreeMap<String, Vec<String>>,
    /// Hot-added disks: (VM, backing file) → the device file under `hotadd_device_dir`.
    attachments: BTreeMap<(String, String), PathBuf>,
    qcda_calls: u64,
}

fn change_id(epoch: u64, vm: &str, key: i64, generation: u64) -> String {
    format!("52 {epoch:08x} {vm}-{key}/{generation}")
}

/// (epoch, generation) of a change id this simulator made.
fn parse_change_id(c: &str) -> Option<(u64, u64)> {
    let (head, generation) = c.rsplit_once('/')?;
    let epoch = head.split(' ').nth(1)?;
    Some((
        u64::from_str_radix(epoch, 16).ok()?,
        generation.parse().ok()?,
    ))
}

struct Shared {
    state: tokio::sync::Mutex<State>,
    vcsim_url: String,
    http: ferry_http::HttpClient,
    ds_dirs: BTreeMap<String, PathBuf>,
    /// VM moref → name.
    vm_names: BTreeMap<String, String>,
    /// Where hot-added disks appear as files (`<dir>/dev`).
    device_dir: PathBuf,
    /// Per-snapshot disk contents (`<dir>/snapshots/<snapshot>/<device key>.raw`).
    snap_dir: PathBuf,
    cbt_page: u64,
}

/// A running simulator (front + vcsim child); stops both when dropped.
pub struct VmwareSim {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    child: Child,
    url: String,
    fingerprint: String,
    dir: PathBuf,
}

impl Drop for VmwareSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for VmwareSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmwareSim").field("url", &self.url).finish()
    }
}

/// The answer of one vcsim call: status, Set-Cookie, body.
struct Upstream {
    status: u16,
    cookie: Option<String>,
    body: Bytes,
}

impl Shared {
    async fn forward(
        &self,
        body: Vec<u8>,
        cookie: Option<&str>,
        soap_action: Option<&str>,
    ) -> Result<Upstream, String> {
        let mut req = self
            .http
            .inner()
            .post(&self.vcsim_url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(body);
        if let Some(c) = cookie {
            req = req.header("Cookie", c);
        }
        if let Some(a) = soap_action {
            req = req.header("SOAPAction", a);
        }
        let resp = self
            .http
            .send("vcsim", req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = self
            .http
            .body_limited("vcsim", resp, 512 << 20)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Upstream {
            status,
            cookie,
            body,
        })
    }

    /// One call to vcsim whose answer must not be a fault.
    async fn call(
        &self,
        cookie: Option<&str>,
        method: &str,
        inner: &str,
    ) -> Result<(soap::El, Option<String>), String> {
        let u = self
            .forward(soap::request(method, inner).into_bytes(), cookie, None)
            .await?;
        let env = soap::parse(&u.body)?;
        let first = env
            .child("Body")
            .and_then(|b| b.children.first())
            .cloned()
            .ok_or("no body")?;
        if first.name == "Fault" {
            return Err(format!(
                "{method}: {}",
                first.text_at("faultstring").unwrap_or("fault")
            ));
        }
        Ok((first, u.cookie))
    }

    /// Polls a vcsim task with the caller's session; the task's result element on success.
    async fn wait_task(
        &self,
        cookie: Option<&str>,
        task: &str,
    ) -> Result<Option<soap::El>, String> {
        for _ in 0..2000 {
            let info = self.property(cookie, "Task", task, "info").await?;
            match info.text_at("state") {
                Some("success") => return Ok(info.child("result").cloned()),
                Some("error") => return Err("task failed".into()),
                _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
        Err("task did not finish".into())
    }

    /// Device lists of every VM: (moref value, name, devices).
    async fn vm_devices(
        &self,
        cookie: Option<&str>,
    ) -> Result<Vec<(String, String, soap::El)>, String> {
        let (v, _) = self
            .call(
                cookie,
                "CreateContainerView",
                &format!(
                    "{}{}<type>VirtualMachine</type><recursive>true</recursive>",
                    soap::moref("_this", "ViewManager", "ViewManager"),
                    soap::moref("container", "Folder", "group-d1")
                ),
            )
            .await?;
        let view = v.text_at("returnval").unwrap_or("").to_string();
        let (r, _) = self
            .call(
                cookie,
                "RetrievePropertiesEx",
                &format!(
                    "{}<specSet><propSet><type>VirtualMachine</type><pathSet>config.hardware.device</pathSet><pathSet>name</pathSet></propSet><objectSet>{}<skip>true</skip><selectSet xsi:type=\"TraversalSpec\"><name>v</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet></objectSet></specSet><options/>",
                    soap::moref("_this", "PropertyCollector", "propertyCollector"),
                    soap::moref("obj", "ContainerView", &view)
                ),
            )
            .await?;
        let mut out = Vec::new();
        if let Some(rv) = r.child("returnval") {
            for o in rv.all("objects") {
                let vm = o.text_at("obj").unwrap_or("").to_string();
                let mut name = String::new();
                let mut devs = None;
                for p in o.all("propSet") {
                    match (p.text_at("name"), p.child("val")) {
                        (Some("name"), Some(v)) => name = v.text.trim().to_string(),
                        (Some(_), Some(v)) => devs = Some(v.clone()),
                        _ => {}
                    }
                }
                if let Some(d) = devs {
                    out.push((vm, name, d));
                }
            }
        }
        Ok(out)
    }
}

impl Shared {
    /// Disks of one VM: (key, capacity, datastore path).
    async fn disks_of_vm(
        &self,
        cookie: Option<&str>,
        vm: &str,
    ) -> Result<Vec<(i64, u64, String)>, String> {
        Ok(disks_of(&self.devices_of_vm(cookie, vm).await?))
    }

    /// The value of property `path` of object `kind:obj`, read from vcsim with the caller's session.
    async fn property(
        &self,
        cookie: Option<&str>,
        kind: &str,
        obj: &str,
        path: &str,
    ) -> Result<soap::El, String> {
        let (r, _) = self
            .call(
                cookie,
                "RetrievePropertiesEx",
                &format!(
                    "{}<specSet><propSet><type>{kind}</type><pathSet>{path}</pathSet></propSet><objectSet>{}</objectSet></specSet><options/>",
                    soap::moref("_this", "PropertyCollector", "propertyCollector"),
                    soap::moref("obj", kind, obj)
                ),
            )
            .await?;
        r.at("returnval/objects/propSet/val")
            .cloned()
            .ok_or_else(|| format!("{kind} {obj} has no {path}"))
    }

    /// `config.hardware.device` of one VM.
    async fn devices_of_vm(&self, cookie: Option<&str>, vm: &str) -> Result<soap::El, String> {
        self.property(cookie, "VirtualMachine", vm, "config.hardware.device")
            .await
    }

    /// After vcsim created a VM: give each of its disks a thin flat extent and a descriptor in
    /// the datastore directory (the live file, written through nbdkit by a restore).
    async fn created(&self, cookie: Option<&str>, body: &[u8]) -> Result<(), String> {
        let env = soap::parse(body)?;
        let task = env
            .at("Body/CreateVM_TaskResponse/returnval")
            .map(|t| t.text.trim().to_string())
            .ok_or("no task")?;
        let Some(vm) = self.wait_task(cookie, &task).await? else {
            return Err("the task returned no VM".into());
        };
        let vm = vm.text.trim().to_string();
        let disks = self.disks_of_vm(cookie, &vm).await?;
        let mut st = self.state.lock().await;
        for (key, cap, file) in disks {
            st.disks
                .insert((vm.clone(), key), self.api_disk(file, cap, None)?);
        }
        Ok(())
    }
}

impl Shared {
    /// A disk of a VM made through the API (`CreateVM_Task`, `CloneVM_Task`): a VMFS descriptor
    /// at its backing `file` and a thin `-flat.vmdk` — a copy of `content` when given — which is
    /// its live file (written through nbdkit).
    fn api_disk(&self, file: String, cap: u64, content: Option<&Path>) -> Result<Disk, String> {
        let (ds, rel) = split_ds(&file).ok_or_else(|| format!("bad backing {file}"))?;
        let dir = self
            .ds_dirs
            .get(ds)
            .ok_or_else(|| format!("unknown datastore {ds}"))?;
        let desc = dir.join(rel);
        let flat = flat_of(&desc);
        if let Some(d) = desc.parent() {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        match content {
            Some(c) => sparse_copy(c, &flat, cap).map_err(|e| e.to_string())?,
            None => std::fs::File::create(&flat)
                .and_then(|f| f.set_len(cap))
                .map_err(|e| e.to_string())?,
        }
        std::fs::write(&desc, descriptor(&flat, cap)).map_err(|e| e.to_string())?;
        Ok(Disk {
            capacity: cap,
            live: flat,
            file,
            stamps: vec![0; cap.div_ceil(BLOCK) as usize],
            epoch: 1,
            external: true,
        })
    }
}

/// Disks of a device list: (key, capacity, datastore path).
fn disks_of(devices: &soap::El) -> Vec<(i64, u64, String)> {
    devices
        .children
        .iter()
        .filter(|d| d.type_name() == "VirtualDisk")
        .filter_map(|d| {
            let key = d.text_at("key")?.parse().ok()?;
            let cap = d
                .text_at("capacityInBytes")
                .and_then(|b| b.parse::<u64>().ok())
                .filter(|b| *b > 0)
                .or_else(|| {
                    d.text_at("capacityInKB")?
                        .parse::<u64>()
                        .ok()
                        .map(|k| k * 1024)
                })?;
            let file = d.text_at("backing/fileName")?.to_string();
            Some((key, cap, file))
        })
        .collect()
}

fn split_ds(p: &str) -> Option<(&str, &str)> {
    let rest = p.strip_prefix('[')?;
    let (ds, path) = rest.split_once(']')?;
    Some((ds, path.trim_start()))
}

/// Deterministic noise.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl State {
    fn write(&mut self, vm: &str, key: i64, offset: u64, data: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let d = self
            .disks
            .get_mut(&(vm.to_string(), key))
            .ok_or_else(|| format!("no disk {key} on {vm}"))?;
        if offset + data.len() as u64 > d.capacity {
            return Err(format!(
                "write of {} bytes at {offset} beyond the disk's {} bytes",
                data.len(),
                d.capacity
            ));
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.live)
            .map_err(|e| e.to_string())?;
        f.write_all_at(data, offset).map_err(|e| e.to_string())?;
        self.generation += 1;
        if !data.is_empty() {
            let first = offset / BLOCK;
            let last = (offset + data.len() as u64 - 1) / BLOCK;
            for b in first..=last {
                d.stamps[b as usize] = self.generation;
            }
        }
        Ok(())
    }
}

impl VmwareSim {
    /// Starts vcsim and the front, seeds disk contents and adds a second disk to the first VM.
    pub async fn start(cfg: VmwareSimConfig) -> Result<Self, VmwareSimError> {
        std::fs::create_dir_all(cfg.dir.join("live")).map_err(io("create the live directory"))?;
        std::fs::create_dir_all(cfg.dir.join("dev")).map_err(io("create the device directory"))?;
        let vcsim_tmp = cfg.dir.join("vcsim");
        std::fs::create_dir_all(&vcsim_tmp).map_err(io("create the vcsim directory"))?;
        let mut child = Command::new(&cfg.vcsim)
            .args(["-l", "127.0.0.1:0", "-plain", "-vm", &cfg.vms.to_string()])
            .env("TMPDIR", &vcsim_tmp)
            .stdin(Stdio::piped()) // vcsim exits when this closes: it never outlives us
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                VmwareSimError::Vcsim(format!(
                    "cannot start {}: {e} (run tests/peers/install.sh, or set FERRY_VCSIM)",
                    cfg.vcsim.display()
                ))
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| VmwareSimError::Vcsim("no stdout".into()))?;
        let line = tokio::task::spawn_blocking(move || {
            let mut l = String::new();
            BufReader::new(stdout).read_line(&mut l).map(|_| l)
        })
        .await
        .map_err(|e| VmwareSimError::Other(e.to_string()))?
        .map_err(io("read vcsim's URL"))?;
        let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| {
            VmwareSimError::Vcsim(format!("unexpected first line `{}`: {e}", line.trim()))
        })?;
        let vcsim_url = v["url"].as_str().unwrap_or_default().to_string();
        let (user, pass) = (
            v["username"].as_str().unwrap_or("user").to_string(),
            v["password"].as_str().unwrap_or("pass").to_string(),
        );
        // Plain HTTP on loopback: the trust setting is never consulted.
        let mut o = ferry_http::ClientOptions::new("vcsim", ferry_tls::Trust::Fingerprint([0; 32]));
        o.proxy = ferry_http::ProxySetting::Off;
        let http =
            ferry_http::HttpClient::new(&o).map_err(|e| VmwareSimError::Other(e.to_string()))?;

        let mut shared = Shared {
            state: tokio::sync::Mutex::new(State::default()),
            vcsim_url,
            http,
            ds_dirs: BTreeMap::new(),
            vm_names: BTreeMap::new(),
            device_dir: cfg.dir.join("dev"),
            snap_dir: cfg.dir.join("snapshots"),
            cbt_page: cfg.cbt_page.max(BLOCK) / BLOCK * BLOCK,
        };
        Self::seed(&mut shared, &cfg, &user, &pass)
            .await
            .map_err(VmwareSimError::Vcsim)?;

        let cert = ferry_tls::SelfSigned::generate(&["localhost", "127.0.0.1"])
            .map_err(|e| VmwareSimError::Other(e.to_string()))?;
        let fingerprint = cert.fingerprint();
        let tls = cert
            .server_config()
            .map_err(|e| VmwareSimError::Other(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(io(format!("bind {}", cfg.listen)))?;
        let addr = listener.local_addr().map_err(io("local address"))?;
        let shared = Arc::new(shared);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let server = ferry_http::Server::new(listener)
            .tls(tls)
            .grace(std::time::Duration::ZERO);
        tokio::spawn(server.run(app, shutdown.clone()));
        Ok(Self {
            shared,
            shutdown,
            child,
            url: format!("https://{addr}/sdk"),
            fingerprint,
            dir: cfg.dir,
        })
    }

    async fn seed(
        sh: &mut Shared,
        cfg: &VmwareSimConfig,
        user: &str,
        pass: &str,
    ) -> Result<(), String> {
        let (_, cookie) = sh
            .call(
                None,
                "Login",
                &format!(
                    "{}<userName>{}</userName><password>{}</password>",
                    soap::moref("_this", "SessionManager", "SessionManager"),
                    soap::esc(user),
                    soap::esc(pass)
                ),
            )
            .await?;
        let cookie = cookie
            .and_then(|c| c.split(';').next().map(String::from))
            .ok_or("vcsim set no session cookie")?;
        let c = Some(cookie.as_str());
        let vms = sh.vm_devices(c).await?;
        // A second disk on the first VM (by name order), as an administrator would add it.
        if let Some((vm, _, devs)) = vms.iter().min_by_key(|(_, n, _)| n.clone()) {
            let ctl = devs
                .children
                .iter()
                .find(|d| d.type_name().contains("SCSIController"))
                .and_then(|d| d.text_at("key"))
                .unwrap_or("1000")
                .to_string();
            let spec = format!(
                "<spec><deviceChange><operation>add</operation><fileOperation>create</fileOperation>\
<device xsi:type=\"VirtualDisk\"><key>-1</key><backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\">\
<fileName></fileName><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing>\
<controllerKey>{ctl}</controllerKey><unitNumber>1</unitNumber><capacityInKB>{}</capacityInKB></device>\
</deviceChange></spec>",
                cfg.disk_mib * 1024
            );
            let (r, _) = sh
                .call(
                    c,
                    "ReconfigVM_Task",
                    &format!("{}{spec}", soap::moref("_this", "VirtualMachine", vm)),
                )
                .await?;
            let task = r.text_at("returnval").unwrap_or("").to_string();
            sh.wait_task(c, &task).await?;
        }
        let vms = sh.vm_devices(c).await?;
        let mut st = State::default();
        for (vm, name, devs) in &vms {
            sh.vm_names.insert(vm.clone(), name.clone());
            for (key, cap, file) in disks_of(devs) {
                let live = cfg.dir.join("live").join(format!("{vm}-{key}.raw"));
                let f = std::fs::File::create(&live).map_err(|e| e.to_string())?;
                f.set_len(cap).map_err(|e| e.to_string())?;
                if let Some((ds, _)) = split_ds(&file) {
                    let d = cfg.dir.join("datastores").join(ds);
                    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
                    sh.ds_dirs.insert(ds.to_string(), d);
                }
                st.disks.insert(
                    (vm.clone(), key),
                    Disk {
                        capacity: cap,
                        live,
                        file,
                        stamps: vec![0; cap.div_ceil(BLOCK) as usize],
                        epoch: 1,
                        external: false,
                    },
                );
                // A boot sector, some data early, a hole, data near the end.
                let mut boot = vec![0u8; 512];
                boot[510] = 0x55;
                boot[511] = 0xaa;
                st.write(vm, key, 0, &boot)?;
                st.write(vm, key, BLOCK, &noise(BLOCK as usize, key as u64))?;
                let tail = cap.saturating_sub(2 * BLOCK);
                if tail > 2 * BLOCK {
                    let text = format!("log of {vm} disk {key}\n").repeat(64);
                    st.write(vm, key, tail, text.as_bytes())?;
                }
            }
        }
        *sh.state.get_mut() = st;
        let _ = sh
            .call(
                c,
                "Logout",
                &soap::moref("_this", "SessionManager", "SessionManager"),
            )
            .await;
        Ok(())
    }

    /// `https://127.0.0.1:PORT/sdk`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `sha256:…` of the front's certificate.
    pub fn tls_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// vcsim's login user.
    pub fn username(&self) -> &str {
        "user"
    }

    /// vcsim's login password.
    pub fn password(&self) -> &str {
        "pass"
    }

    /// Datastore name → the directory holding its files (what a proxy's `san-paths` names).
    pub fn san_paths(&self) -> BTreeMap<String, PathBuf> {
        self.shared.ds_dirs.clone()
    }

    /// One JSON line for `ferry sim vmware`: login, pin, datastore directories and the VMs
    /// with their disks (moref, device key, capacity, backing file, the live raw file).
    pub fn info_json(&self) -> String {
        let st = self.shared.state.try_lock();
        let vms: Vec<serde_json::Value> = self
            .shared
            .vm_names
            .iter()
            .map(|(moref, name)| {
                let disks: Vec<serde_json::Value> = st
                    .as_ref()
                    .map(|st| {
                        st.disks
                            .iter()
                            .filter(|((v, _), _)| v == moref)
                            .map(|((_, k), d)| {
                                serde_json::json!({"key": k, "capacity": d.capacity, "file": d.file, "live": d.live})
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                serde_json::json!({"moref": moref, "name": name, "disks": disks})
            })
            .collect();
        serde_json::json!({
            "vms": vms,
            "url": self.url,
            "username": self.username(),
            "password": self.password(),
            "tls_fingerprint": self.fingerprint,
            "dir": self.dir,
            "san_paths": self.san_paths(),
            "hotadd_device_dir": self.hotadd_device_dir(),
        })
        .to_string()
    }

    /// Where disks hot-added to a VM appear as files, named by their position on it
    /// (`scsi0:3`): a proxy's `hotadd-device-dir`.
    pub fn hotadd_device_dir(&self) -> PathBuf {
        self.shared.device_dir.clone()
    }

    /// Disks hot-added through the front and still attached.
    pub async fn attachment_count(&self) -> usize {
        self.shared.state.lock().await.attachments.len()
    }

    /// Stops the front and vcsim.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The guest writes `data` at `offset` of disk `key` of `vm` (moref value).
    pub async fn guest_write(
        &self,
        vm: &str,
        key: i64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        self.shared.state.lock().await.write(vm, key, offset, data)
    }

    /// The live content of a disk.
    pub async fn read_disk(&self, vm: &str, key: i64) -> Result<Vec<u8>, String> {
        let st = self.shared.state.lock().await;
        let d = st
            .disks
            .get(&(vm.to_string(), key))
            .ok_or_else(|| format!("no disk {key} on {vm}"))?;
        std::fs::read(&d.live).map_err(|e| e.to_string())
    }

    /// Disks: (vm, key, capacity, datastore path).
    pub async fn disks(&self) -> Vec<(String, i64, u64, String)> {
        let st = self.shared.state.lock().await;
        st.disks
            .iter()
            .map(|((vm, k), d)| (vm.clone(), *k, d.capacity, d.file.clone()))
            .collect()
    }

    /// Resets CBT of a disk (as after a storage vMotion): older changeIds are refused.
    pub async fn reset_cbt(&self, vm: &str, key: i64) -> Result<(), String> {
        let mut st = self.shared.state.lock().await;
        let d = st
            .disks
            .get_mut(&(vm.to_string(), key))
            .ok_or_else(|| format!("no disk {key} on {vm}"))?;
        d.epoch += 1;
        Ok(())
    }

    /// The next `count` calls of `method` fail with the vim25 fault `fault`.
    pub async fn fail_next(&self, method: &str, fault: &str, count: usize) {
        let mut st = self.shared.state.lock().await;
        st.fail_next
            .entry(method.to_string())
            .or_default()
            .extend(std::iter::repeat_n(fault.to_string(), count));
    }

    /// Snapshots taken through the front and not removed.
    pub async fn snapshot_count(&self) -> usize {
        self.shared.state.lock().await.snaps.len()
    }

    /// QueryChangedDiskAreas calls answered so far.
    pub async fn qcda_calls(&self) -> u64 {
        self.shared.state.lock().await.qcda_calls
    }
}

fn xml_response(status: StatusCode, body: String, cookie: Option<String>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert("set-cookie", c);
    }
    r
}

fn fault(kind: &str, message: &str) -> Response {
    xml_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        soap::fault(kind, message, ""),
        None,
    )
}

/// Queues `count` (default 1) times `what` for the request's `method` (side-door faults).
fn queue(map: &mut BTreeMap<String, Vec<String>>, req: &soap::El, what: String) {
    let m = req.text_at("method").unwrap_or("").to_string();
    let n: usize = req
        .text_at("count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(1);
    map.entry(m)
        .or_default()
        .extend(std::iter::repeat_n(what, n));
}

/// A response whose body fails at once: hyper aborts the connection, the client sees it drop.
fn dropped_connection() -> Response {
    let body = axum::body::Body::from_stream(futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped (injected)"))
    }));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    r
}

async fn handle(
    AxState(sh): AxState<Arc<Shared>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let name = soap::request_method(&body)
        .map(|r| r.name)
        .unwrap_or_default();
    let dropped = {
        let mut st = sh.state.lock().await;
        st.drop_next
            .get_mut(&name)
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
    };
    if dropped.as_deref() == Some("request") {
        tracing::debug!(method = %name, "dropping the connection before the call (injected)");
        return dropped_connection();
    }
    let r = answer(sh, method, uri, headers, body).await;
    if dropped.is_some() {
        tracing::debug!(method = %name, "dropping the connection after the call (injected)");
        return dropped_connection();
    }
    r
}

async fn answer(
    sh: Arc<Shared>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cookie = headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let action = headers
        .get("soapaction")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    if method != axum::http::Method::POST {
        // vimServiceVersions.xml and friends: straight from vcsim.
        let url = format!(
            "{}{}",
            sh.vcsim_url.trim_end_matches("/sdk"),
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let req = sh.http.inner().get(url);
        return match sh.http.send("vcsim", req).await {
            Ok(r) => {
                let status =
                    StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let b = sh
                    .http
                    .body_limited("vcsim", r, 16 << 20)
                    .await
                    .unwrap_or_default();
                (status, b).into_response()
            }
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        };
    }
    let req = match soap::request_method(&body) {
        Ok(r) => r,
        Err(e) => {
            return xml_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                soap::fault("InvalidRequest", &format!("malformed request: {e}"), ""),
                None,
            );
        }
    };
    let name = req.name.clone();
    tracing::debug!(method = %name, "vim25 request");
    // Injected faults.
    let injected = {
        let mut st = sh.state.lock().await;
        st.fail_next
            .get_mut(&name)
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
    };
    if let Some(kind) = injected {
        return fault(&kind, &format!("{name} failed (injected by the simulator)"));
    }

    if cookie.is_none() && !matches!(name.as_str(), "RetrieveServiceContent" | "Login") {
        return fault("NotAuthenticated", "The session is not authenticated.");
    }
    match name.as_str() {
        "QueryChangedDiskAreas" => return qcda(&sh, &req).await,
        "FerrySimGuestWrite" => {
            let vm = req.text_at("vm").unwrap_or("").to_string();
            let key: i64 = req
                .text_at("deviceKey")
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let off: u64 = req
                .text_at("offset")
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let data = match base64::engine::general_purpose::STANDARD
                .decode(req.text_at("data").unwrap_or(""))
            {
                Ok(d) => d,
                Err(e) => return fault("InvalidArgument", &format!("data: {e}")),
            };
            return match sh.state.lock().await.write(&vm, key, off, &data) {
                Ok(()) => xml_response(StatusCode::OK, soap::response(&name, ""), None),
                Err(e) => fault("InvalidArgument", &e),
            };
        }
        "FerrySimResetCbt" => {
            let vm = req.text_at("vm").unwrap_or("").to_string();
            let key: i64 = req
                .text_at("deviceKey")
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let mut st = sh.state.lock().await;
            return match st.disks.get_mut(&(vm, key)) {
                Some(d) => {
                    d.epoch += 1;
                    xml_response(StatusCode::OK, soap::response(&name, ""), None)
                }
                None => fault("NotFound", "no such disk"),
            };
        }
        "FerrySimSnapshotCount" => {
            let n = sh.state.lock().await.snaps.len();
            return xml_response(
                StatusCode::OK,
                soap::response(&name, &format!("<returnval>{n}</returnval>")),
                None,
            );
        }
        "FerrySimDropNext" => {
            let phase = req.text_at("phase").unwrap_or("response").to_string();
            if phase != "request" && phase != "response" {
                return fault("InvalidArgument", "phase is `request` or `response`");
            }
            let mut st = sh.state.lock().await;
            queue(&mut st.drop_next, &req, phase);
            return xml_response(StatusCode::OK, soap::response(&name, ""), None);
        }
        "FerrySimFailNext" => {
            let f = req.text_at("fault").unwrap_or("SystemError").to_string();
            let mut st = sh.state.lock().await;
            queue(&mut st.fail_next, &req, f);
            return xml_response(StatusCode::OK, soap::response(&name, ""), None);
        }
        _ => {}
    }
    // A clone changes its source's disks in vcsim: what they were, to put back (clone.rs).
    let clone_source = match name.as_str() {
        "CloneVM_Task" => {
            let src = req.text_at("_this").unwrap_or("").to_string();
            sh.devices_of_vm(cookie.as_deref(), &src).await.ok()
        }
        _ => None,
    };
    let up = match sh
        .forward(body.to_vec(), cookie.as_deref(), action.as_deref())
        .await
    {
        Ok(u) => u,
        Err(e) => return fault("HostCommunication", &format!("vcsim: {e}")),
    };
    let status = StatusCode::from_u16(up.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let ok = status.is_success();
    match name.as_str() {
        "CreateSnapshot_Task" if ok => {
            let vm = req.text_at("_this").unwrap_or("").to_string();
            if let Err(e) = freeze(&sh, cookie.as_deref(), &vm, &up.body).await {
                return fault("SystemError", &format!("simulator: snapshot disks: {e}"));
            }
        }
        "ReconfigVM_Task" if ok => {
            let vm = req.text_at("_this").unwrap_or("").to_string();
            if let Err(e) = hotadd(&sh, cookie.as_deref(), &vm, &req, &up.body).await {
                return fault("SystemError", &format!("simulator: hot-add: {e}"));
            }
            if let Some(on) = req.text_at("spec/changeTrackingEnabled") {
                let vm = req.text_at("_this").unwrap_or("").to_string();
                let mut st = sh.state.lock().await;
                if on == "true" {
                    if st.cbt.insert(vm.clone()) {
                        // Tracking starts now: nothing older can be asked about.
                        for ((v, _), d) in st.disks.iter_mut() {
                            if *v == vm {
                                d.epoch += 1;
                            }
                        }
                    }
                } else {
                    st.cbt.remove(&vm);
                }
            }
        }
        "CreateVM_Task" if ok => {
            if let Err(e) = sh.created(cookie.as_deref(), &up.body).await {
                return fault(
                    "SystemError",
                    &format!("simulator: disks of the new VM: {e}"),
                );
            }
        }
        "CloneVM_Task" if ok => {
            if let Some(before) = &clone_source {
                if let Err(e) = clone::cloned(&sh, cookie.as_deref(), &req, &up.body, before).await
                {
                    return fault(
                        "SystemError",
                        &format!("simulator: disks of the clone: {e}"),
                    );
                }
            }
        }
        "Destroy_Task" if ok => {
            let vm = req.text_at("_this").unwrap_or("").to_string();
            let task = soap::parse(&up.body).ok().and_then(|env| {
                env.text_at("Body/Destroy_TaskResponse/returnval")
                    .map(|t| t.trim().to_string())
            });
            if let Some(task) = task {
                // The VM's disks go with it once vcsim is done.
                if sh.wait_task(cookie.as_deref(), &task).await.is_ok() {
                    let mut st = sh.state.lock().await;
                    let gone: Vec<(String, i64)> =
                        st.disks.keys().filter(|(v, _)| *v == vm).cloned().collect();
                    for k in gone {
                        if let Some(d) = st.disks.remove(&k).filter(|d| d.external) {
                            let _ = std::fs::remove_file(&d.live);
                            if let Some((ds, rel)) = split_ds(&d.file) {
                                if let Some(dir) = sh.ds_dirs.get(ds) {
                                    let _ = std::fs::remove_file(dir.join(rel));
                                }
                            }
                        }
                    }
                    st.cbt.remove(&vm);
                    // Its snapshots go too.
                    let snaps: Vec<String> = st
                        .snaps
                        .iter()
                        .filter(|(_, (v, _))| *v == vm)
                        .map(|(s, _)| s.clone())
                        .collect();
                    for s in snaps {
                        st.snaps.remove(&s);
                        let _ = std::fs::remove_dir_all(sh.snap_dir.join(&s));
                    }
                }
            }
        }
        "RemoveSnapshot_Task" if ok => {
            let snap = req.text_at("_this").unwrap_or("").to_string();
            sh.state.lock().await.snaps.remove(&snap);
            let _ = std::fs::remove_dir_all(sh.snap_dir.join(&snap));
        }
        "RevertToSnapshot_Task" if ok => {
            let snap = req.text_at("_this").unwrap_or("").to_string();
            if let Err(e) = revert(&sh, cookie.as_deref(), &snap, &up.body).await {
                return fault("SystemError", &format!("simulator: revert disks: {e}"));
            }
        }
        "RetrievePropertiesEx"
        | "ContinueRetrievePropertiesEx"
        | "RetrieveProperties"
        | "Fetch"
            if ok =>
        {
            let this = (name == "Fetch")
                .then(|| req.child("_this"))
                .flatten()
                .map(|t| {
                    (
                        t.type_attr.clone().unwrap_or_default(),
                        t.text.trim().to_string(),
                    )
                });
            let st = sh.state.lock().await;
            let rewritten = soap::add_change_ids(&up.body, this, |kind, obj, key| match kind {
                "VirtualMachine" => {
                    let d = st.disks.get(&(obj.to_string(), key))?;
                    st.cbt
                        .contains(obj)
                        .then(|| change_id(d.epoch, obj, key, st.generation))
                }
                "VirtualMachineSnapshot" => {
                    let (_, disks) = st.snaps.get(obj)?;
                    disks
                        .get(&key)
                        .filter(|d| !d.change_id.is_empty())
                        .map(|d| d.change_id.clone())
                }
                _ => None,
            });
            if let Ok(b) = rewritten {
                return xml_response(status, String::from_utf8_lossy(&b).into_owned(), up.cookie);
            }
        }
        _ => {}
    }
    xml_response(
        status,
        String::from_utf8_lossy(&up.body).into_owned(),
        up.cookie,
    )
}

/// After a ReconfigVM_Task: an existing disk file added to a VM (hot-add) appears as a device
/// file named by its position, a link to the frozen snapshot extent; a removed one disappears.
async fn hotadd(
    sh: &Shared,
    cookie: Option<&str>,
    vm: &str,
    req: &soap::El,
    body: &[u8],
) -> Result<(), String> {
    let Some(spec) = req.child("spec") else {
        return Ok(());
    };
    let changes: Vec<&soap::El> = spec
        .all("deviceChange")
        .filter(|c| {
            c.child("device")
                .is_some_and(|d| d.type_name() == "VirtualDisk")
        })
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    let env = soap::parse(body)?;
    let task = env
        .text_at("Body/ReconfigVM_TaskResponse/returnval")
        .map(|t| t.trim().to_string())
        .ok_or("no task")?;
    sh.wait_task(cookie, &task).await?;
    let now = sh.disks_of_vm(cookie, vm).await?;
    let devices = sh.devices_of_vm(cookie, vm).await?;
    let mut st = sh.state.lock().await;
    for c in changes {
        let add = c.text_at("operation") == Some("add") && c.text_at("fileOperation").is_none();
        let file = c
            .text_at("device/backing/fileName")
            .unwrap_or("")
            .to_string();
        if !add || file.is_empty() {
            continue;
        }
        let ctl = c.text_at("device/controllerKey").unwrap_or("");
        let bus = devices
            .children
            .iter()
            .find(|d| d.text_at("key") == Some(ctl))
            .and_then(|d| d.text_at("busNumber"))
            .unwrap_or("0");
        let unit = c.text_at("device/unitNumber").unwrap_or("0");
        let (ds, rel) = split_ds(&file).ok_or_else(|| format!("bad backing {file}"))?;
        let dir = sh
            .ds_dirs
            .get(ds)
            .ok_or_else(|| format!("unknown datastore {ds}"))?;
        let flat = flat_of(&dir.join(rel));
        let dev = sh.device_dir.join(format!("scsi{bus}:{unit}"));
        let _ = std::fs::remove_file(&dev);
        std::fs::hard_link(&flat, &dev)
            .or_else(|_| std::fs::copy(&flat, &dev).map(|_| ()))
            .map_err(|e| format!("{} → {}: {e}", flat.display(), dev.display()))?;
        st.attachments.insert((vm.to_string(), file), dev);
    }
    // Removed: whatever is attached to this VM and no longer among its disks.
    let gone: Vec<(String, String)> = st
        .attachments
        .keys()
        .filter(|(v, f)| v == vm && !now.iter().any(|(_, _, nf)| nf == f))
        .cloned()
        .collect();
    for k in gone {
        if let Some(dev) = st.attachments.remove(&k) {
            let _ = std::fs::remove_file(dev);
        }
    }
    Ok(())
}

/// After vcsim made the snapshot: freeze every disk of the VM into the datastore directory and
/// remember its stamps and changeId.
async fn freeze(sh: &Shared, cookie: Option<&str>, vm: &str, body: &[u8]) -> Result<(), String> {
    let env = soap::parse(body)?;
    let task = env
        .at("Body/CreateSnapshot_TaskResponse/returnval")
        .map(|t| t.text.trim().to_string())
        .ok_or("no task")?;
    let snap = sh
        .wait_task(cookie, &task)
        .await?
        .map(|r| r.text.trim().to_string())
        .ok_or("the task returned no snapshot")?;
    let mut st = sh.state.lock().await;
    let next = st.generation + 1;
    let mut stamped = false;
    for ((v, _), d) in st.disks.iter_mut() {
        if v == vm && d.external {
            stamped |= stamp_external(d, next).map_err(|e| e.to_string())?;
        }
    }
    if stamped {
        st.generation = next;
    }
    let generation = st.generation;
    let cbt = st.cbt.contains(vm);
    let mut frozen = BTreeMap::new();
    let disks: Vec<((String, i64), Disk)> = st
        .disks
        .iter()
        .filter(|((v, _), _)| v == vm)
        .map(|(k, d)| (k.clone(), d.clone()))
        .collect();
    for ((_, key), d) in disks {
        let (ds, rel) = split_ds(&d.file).ok_or_else(|| format!("bad backing {}", d.file))?;
        let dir = sh
            .ds_dirs
            .get(ds)
            .ok_or_else(|| format!("unknown datastore {ds}"))?;
        write_flat_vmdk(&dir.join(rel), &d.live, d.capacity).map_err(|e| e.to_string())?;
        // The frozen extent above is the backing's one file, overwritten by the next snapshot;
        // this copy is the snapshot's own, for a revert.
        let content = sh.snap_dir.join(&snap).join(format!("{key}.raw"));
        std::fs::create_dir_all(sh.snap_dir.join(&snap)).map_err(|e| e.to_string())?;
        sparse_copy(&d.live, &content, d.capacity).map_err(|e| e.to_string())?;
        frozen.insert(
            key,
            SnapDisk {
                stamps: d.stamps.clone(),
                generation,
                epoch: d.epoch,
                change_id: if cbt {
                    change_id(d.epoch, vm, key, generation)
                } else {
                    String::new()
                },
                content,
            },
        );
    }
    st.snaps.insert(snap, (vm.to_string(), frozen));
    Ok(())
}

/// After vcsim reverted the VM to a snapshot (its configuration): the disks get the snapshot's
/// content back before the client sees the task end.
async fn revert(sh: &Shared, cookie: Option<&str>, snap: &str, body: &[u8]) -> Result<(), String> {
    let env = soap::parse(body)?;
    let task = env
        .text_at("Body/RevertToSnapshot_TaskResponse/returnval")
        .map(|t| t.trim().to_string())
        .ok_or("no task")?;
    sh.wait_task(cookie, &task).await?;
    let mut st = sh.state.lock().await;
    let Some((vm, disks)) = st.snaps.get(snap).cloned() else {
        // Not taken through the front: only vcsim's side (the configuration) reverts.
        return Ok(());
    };
    let next = st.generation + 1;
    let mut changed = false;
    for (key, sd) in &disks {
        let Some(d) = st.disks.get_mut(&(vm.clone(), *key)) else {
            continue; // the disk was removed since
        };
        changed |= revert_disk(d, &sd.content, next).map_err(|e| format!("disk {key}: {e}"))?;
    }
    if changed {
        st.generation = next;
    }
    Ok(())
}

/// `<dir>/<stem>-flat.vmdk` of the descriptor `<dir>/<stem>.vmdk`.
fn flat_of(desc: &Path) -> PathBuf {
    let stem = desc
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    desc.with_file_name(format!("{stem}-flat.vmdk"))
}

/// A VMFS-style descriptor whose one extent is `flat`.
fn descriptor(flat: &Path, capacity: u64) -> String {
    let flat_name = flat
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sectors = capacity.div_ceil(512);
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
createType=\"vmfs\"\n\n# Extent description\nRW {sectors} VMFS \"{flat_name}\"\n\n# The Disk Data Base\n#DDB\n\n\
ddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"13\"\n"
    )
}

/// `path` becomes a VMDK descriptor naming `<stem>-flat.vmdk`, a sparse copy of `live`.
fn write_flat_vmdk(path: &Path, live: &Path, capacity: u64) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let flat = flat_of(path);
    sparse_copy(live, &flat, capacity)?;
    std::fs::write(path, descriptor(&flat, capacity))
}

/// `dst` becomes a sparse copy of the first `capacity` bytes of `src` (through a temporary
/// file renamed into place, so a reader never sees half of it).
fn sparse_copy(src: &Path, dst: &Path, capacity: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let tmp = dst.with_extension("tmp");
    let s = std::fs::File::open(src)?;
    let d = std::fs::File::create(&tmp)?;
    d.set_len(capacity)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut pos = 0;
    while pos < capacity {
        let n = (capacity - pos).min(BLOCK) as usize;
        s.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|b| *b != 0) {
            d.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    d.sync_all()?;
    std::fs::rename(&tmp, dst)
}

/// Writes a snapshot's content back into a live disk, in place (nbdkit may hold the file
/// open), block by block; the blocks that change are stamped with `generation` so CBT reports
/// them. True if any changed.
fn revert_disk(d: &mut Disk, content: &Path, generation: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let snap = std::fs::File::open(content)?;
    let live = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d.live)?;
    let mut want = vec![0u8; BLOCK as usize];
    let mut have = vec![0u8; BLOCK as usize];
    let mut any = false;
    for (b, stamp) in d.stamps.iter_mut().enumerate() {
        let pos = b as u64 * BLOCK;
        let n = (d.capacity - pos).min(BLOCK) as usize;
        snap.read_exact_at(&mut want[..n], pos)?;
        live.read_exact_at(&mut have[..n], pos)?;
        if want[..n] != have[..n] {
            live.write_all_at(&want[..n], pos)?;
            *stamp = generation;
            any = true;
        }
    }
    live.sync_all()?;
    Ok(any)
}

/// Stamps the non-zero, never stamped blocks of a disk written outside the side door; true if
/// any was.
fn stamp_external(d: &mut Disk, generation: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&d.live)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut any = false;
    for (b, stamp) in d.stamps.iter_mut().enumerate() {
        let pos = b as u64 * BLOCK;
        let n = (d.capacity - pos).min(BLOCK) as usize;
        if *stamp == 0 {
            f.read_exact_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|x| *x != 0) {
                *stamp = generation;
                any = true;
            }
        }
    }
    Ok(any)
}

async fn qcda(sh: &Shared, req: &soap::El) -> Response {
    let vm = req.text_at("_this").unwrap_or("").to_string();
    let snap = req.text_at("snapshot").unwrap_or("").to_string();
    let key: i64 = req
        .text_at("deviceKey")
        .and_then(|k| k.parse().ok())
        .unwrap_or(-1);
    let start: u64 = match req.text_at("startOffset").and_then(|k| k.parse().ok()) {
        Some(s) => s,
        None => return fault("InvalidArgument", "startOffset"),
    };
    let cid = req.text_at("changeId").unwrap_or("").to_string();
    let mut st = sh.state.lock().await;
    st.qcda_calls += 1;
    let Some((svm, disks)) = st.snaps.get(&snap) else {
        return fault(
            "ManagedObjectNotFound",
            &format!("snapshot {snap} not found"),
        );
    };
    if *svm != vm {
        return fault("InvalidArgument", "the snapshot belongs to another VM");
    }
    let Some(d) = disks.get(&key) else {
        return fault("InvalidArgument", &format!("no disk with deviceKey {key}"));
    };
    let Some(live) = st.disks.get(&(vm.clone(), key)) else {
        return fault("InvalidArgument", &format!("no disk with deviceKey {key}"));
    };
    let capacity = live.capacity;
    let ctk = format!(
        "/vmfs/volumes/{}-ctk.vmdk",
        live.file
            .trim_end_matches(".vmdk")
            .replace("] ", "/")
            .trim_start_matches('[')
    );
    if d.change_id.is_empty() {
        return xml_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault(
                "FileFault",
                &format!("Error caused by file {ctk}: change tracking is not enabled"),
                &format!("<file>{}</file>", soap::esc(&ctk)),
            ),
            None,
        );
    }
    if start >= capacity {
        return fault("InvalidArgument", "startOffset beyond the disk's capacity");
    }
    let since = if cid == "*" {
        Some(0)
    } else {
        match parse_change_id(&cid) {
            Some((epoch, generation))
                if epoch == d.epoch && epoch == live.epoch && generation <= d.generation =>
            {
                Some(generation)
            }
            _ => None,
        }
    };
    let Some(since) = since else {
        return xml_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault(
                "FileFault",
                &format!("Error caused by file {ctk}"),
                &format!("<file>{}</file>", soap::esc(&ctk)),
            ),
            None,
        );
    };
    let start = start / BLOCK * BLOCK;
    let len = (capacity - start).min(sh.cbt_page);
    let mut areas: Vec<(u64, u64)> = Vec::new();
    let mut b = start / BLOCK;
    while b * BLOCK < start + len {
        if d.stamps[b as usize] > since {
            let a = b * BLOCK;
            let l = BLOCK.min(capacity - a);
            match areas.last_mut() {
                Some((s, n)) if *s + *n == a => *n += l,
                _ => areas.push((a, l)),
            }
        }
        b += 1;
    }
    xml_response(
        StatusCode::OK,
        soap::response(
            "QueryChangedDiskAreas",
            &soap::disk_change_info(start, len, &areas),
        ),
        None,
    )
}
