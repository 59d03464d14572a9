//! [`VmwareDriver`]: the [`HypervisorDriver`] for vSphere (vCenter or ESXi), VADP-style.
//!
//! Backup: leftover Ferry snapshots removed, CBT switched on if off, a quiesced snapshot without
//! memory named `ferry-…`, the snapshot's disks read through the first transport that works
//! (`san`: the VMDK chain off the datastore; `network`: nbdkit's vddk plugin over NBD), changes
//! from QueryChangedDiskAreas since the previous restore point's changeId, and the snapshot
//! removed whatever happens.

use crate::client::VimClient;
use crate::error::{FaultKind, VimError};
use crate::model::{VM_PATHS, Vm, VmDisk, split_datastore_path};
use crate::xml::MoRef;
use async_trait::async_trait;
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::journal::Journal;
use ferry_hv::{
    BackupDisk, BackupOptions, BackupSession, ChangeToken, ChangeTokens, Changed, CleanupReport,
    ConsistencyLevel, CountingSource, DiskSummary, HvError, HypervisorDriver, HypervisorKind,
    NativeConfig, Outcome, PowerState, RestorePlan, RestoredVm, SourceConfig, TransportMode,
    VmConfig, VmSummary,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Names of the snapshots Ferry takes start with this; leftovers are found by it.
pub const SNAPSHOT_PREFIX: &str = "ferry-backup-";
/// Objects per PropertyCollector page.
pub const PAGE: u32 = 500;

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) cfg: SourceConfig,
    pub(crate) client: VimClient,
    pub(crate) journal: Journal,
}

/// The vSphere driver for one configured source.
#[derive(Clone)]
pub struct VmwareDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmwareDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmwareDriver")
            .field("source", &self.inner.name)
            .finish()
    }
}

impl VmwareDriver {
    /// Logs in to source `name`.
    pub async fn connect(name: &str, cfg: &SourceConfig) -> Result<Self, HvError> {
        let http = cfg.http_options(name)?;
        let password = cfg.password(name)?;
        let client = VimClient::connect(&cfg.url, &http, &cfg.username, &password).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.into(),
                cfg: cfg.clone(),
                client,
                journal: Journal::new(&cfg.state_dir(), name),
            }),
        })
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// The vim25 client.
    pub fn client(&self) -> &VimClient {
        &self.inner.client
    }

    /// Logs out.
    pub async fn close(&self) {
        self.inner.client.logout().await;
    }
}

impl Inner {
    pub(crate) fn vm_err(&self, vm: &str, m: impl Into<String>) -> HvError {
        HvError::Vm {
            source_name: self.name.clone(),
            vm: vm.into(),
            message: m.into(),
        }
    }

    pub(crate) fn journal(&self, add: bool, kind: &str, id: &str) {
        self.journal.note(&self.name, add, kind, id);
    }

    pub(crate) async fn vms(&self) -> Result<Vec<Vm>, HvError> {
        let mut kinds = vec![("VirtualMachine", VM_PATHS)];
        kinds.extend_from_slice(crate::cluster::PATHS);
        let objs = self.client.retrieve_kinds(&kinds, PAGE).await?;
        let clusters = crate::cluster::of_hosts(&objs);
        let nets: BTreeMap<String, String> = self
            .client
            .retrieve_all("Network", &["name"], PAGE)
            .await?
            .iter()
            .filter_map(|o| Some((o.obj.as_ref()?.value.clone(), o.text("name")?.to_string())))
            .collect();
        Ok(objs
            .iter()
            .filter(|o| o.obj.as_ref().is_some_and(|m| m.kind == "VirtualMachine"))
            .filter_map(Vm::from_object)
            .filter(|v| !v.template)
            .map(|mut v| {
                v.resolve_networks(&nets);
                v.cluster = v
                    .host
                    .as_ref()
                    .and_then(|h| clusters.get(&h.value))
                    .cloned();
                v
            })
            .collect())
    }

    pub(crate) async fn find_vm(&self, want: &str) -> Result<Vm, HvError> {
        let vms = self.vms().await?;
        let hits: Vec<&Vm> = vms
            .iter()
            .filter(|v| v.name == want || v.uuid == want || v.moref.value == want)
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(self.vm_err(want, "no such VM")),
            _ => Err(self.vm_err(
                want,
                format!(
                    "{} VMs have this name; use the uuid or the moref",
                    hits.len()
                ),
            )),
        }
    }

    async fn remove_snapshot(&self, snap: &MoRef) -> Result<bool, VimError> {
        match self.client.remove_snapshot(snap).await {
            Ok(()) => Ok(true),
            Err(e) if e.fault() == Some(&FaultKind::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Detaches the hot-added `attached` files from `proxy`, then removes `snap` (vSphere cannot
    /// consolidate a snapshot whose disk another VM still holds). Every step is tried; the first
    /// error is returned.
    async fn release(
        &self,
        proxy: Option<&MoRef>,
        attached: &[String],
        snap: Option<&MoRef>,
    ) -> Result<(), HvError> {
        let mut first = None;
        if let Some(p) = proxy {
            for f in attached {
                match crate::hotadd::detach(self, p, f).await {
                    Ok(_) => self.journal(
                        false,
                        crate::hotadd::JOURNAL_KIND,
                        &crate::hotadd::journal_id(p, f),
                    ),
                    Err(e) => {
                        tracing::warn!(source = %self.name, file = %f, error = %e, "cannot detach a hot-added disk; the next run's sweep will");
                        first.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(snap) = snap {
            match self.remove_snapshot(snap).await {
                Ok(_) => self.journal(false, "snapshot", &snap.value),
                Err(e) => {
                    first.get_or_insert(e.into());
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes leftover snapshots: before a backup only those journaled by dead processes
    /// (other backups may be running); for `ferry cleanup` (`all`) every journaled one and
    /// every snapshot named by Ferry.
    async fn recover(&self, all: bool) -> Result<CleanupReport, HvError> {
        let mut report = CleanupReport::default();
        let entries = if all {
            self.journal.entries()
        } else {
            self.journal.orphans()
        };
        let entries = entries.map_err(|e| HvError::Disk {
            source_name: self.name.clone(),
            disk: "crash journal".into(),
            message: e.to_string(),
        })?;
        // Attachments first: a snapshot whose disk the proxy holds cannot be removed.
        let hotadds: Vec<String> = entries
            .iter()
            .filter(|e| e.kind == crate::hotadd::JOURNAL_KIND)
            .map(|e| e.id.clone())
            .collect();
        report.attachments += crate::hotadd::sweep(self, &hotadds, all).await?;
        for e in entries.iter().filter(|e| e.kind == "snapshot") {
            let snap = MoRef::new("VirtualMachineSnapshot", &e.id);
            if self.remove_snapshot(&snap).await? {
                tracing::warn!(source = %self.name, snapshot = %e.id, "removed a snapshot a killed backup left behind");
                report.snapshots += 1;
            }
            self.journal(false, "snapshot", &e.id);
        }
        // A restore killed before it finished left a VM that never got all its data.
        for e in entries.iter().filter(|e| e.kind == "restore-vm") {
            let vm = MoRef::new("VirtualMachine", &e.id);
            match crate::restore::destroy(self, &vm).await {
                Ok(()) => {
                    tracing::warn!(source = %self.name, vm = %e.id, "destroyed the partial VM of a killed restore");
                    report.partial_vms += 1;
                }
                Err(HvError::Api { ref message, .. })
                    if message.starts_with("ManagedObjectNotFound") => {}
                Err(err) => return Err(err),
            }
            self.journal(false, "restore-vm", &e.id);
        }
        if !all {
            return Ok(report);
        }
        // Also what no journal knows about (another proxy, a lost state directory): every
        // snapshot named by Ferry.
        for vm in self.vms().await? {
            for (snap, name) in vm
                .snapshots
                .iter()
                .filter(|(_, n)| n.starts_with(SNAPSHOT_PREFIX))
            {
                if self.remove_snapshot(snap).await? {
                    tracing::warn!(source = %self.name, vm = %vm.name, snapshot = %name, "removed a leftover Ferry snapshot");
                    report.snapshots += 1;
                }
            }
        }
        Ok(report)
    }
}

pub(crate) fn power(s: &str) -> PowerState {
    match s {
        "poweredOn" => PowerState::Running,
        "poweredOff" => PowerState::Off,
        "suspended" => PowerState::Suspended,
        _ => PowerState::Unknown,
    }
}

fn summary(vm: &Vm) -> VmSummary {
    VmSummary {
        id: if vm.uuid.is_empty() {
            vm.moref.value.clone()
        } else {
            vm.uuid.clone()
        },
        name: vm.name.clone(),
        power_state: power(&vm.power_state),
        host: vm.host.as_ref().map(|h| h.value.clone()),
        cluster: vm.cluster.clone(),
        disks: vm
            .disks
            .iter()
            .map(|d| DiskSummary {
                key: d.key(),
                name: d.position.clone(),
                size: d.capacity,
                position: Some(d.position.clone()),
            })
            .collect(),
        tags: Vec::new(),
    }
}

fn native(vm: &Vm) -> NativeConfig {
    let record = serde_json::json!({
        "moref": vm.moref.value,
        "name": vm.name,
        "uuid": vm.uuid,
        "guestId": vm.guest_id,
        "firmware": vm.firmware,
        "numCPU": vm.cpus,
        "memoryMB": vm.memory_mb,
        "disks": vm.disks.iter().map(|d| serde_json::json!({
            "key": d.device_key, "position": d.position, "label": d.label,
            "capacityInBytes": d.capacity, "fileName": d.file, "diskMode": d.mode,
        })).collect::<Vec<_>>(),
        "nics": vm.nics.iter().map(|n| serde_json::json!({
            "key": n.device_key, "model": n.model, "macAddress": n.mac, "network": n.network,
        })).collect::<Vec<_>>(),
    });
    NativeConfig {
        format: "vim25-vm-summary".into(),
        record: record.to_string(),
    }
}

/// A source whose allocation comes from QueryChangedDiskAreas(`*`) (nbdkit's vddk plugin has
/// no allocation information of its own).
#[derive(Debug)]
struct CbtAllocated {
    inner: Arc<dyn BlockSource>,
    map: ExtentMap,
}

#[async_trait]
impl BlockSource for CbtAllocated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ferry_core::BlockError> {
        self.inner.read_at(offset, buf).await
    }
    async fn read_shared(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<Option<bytes::Bytes>, ferry_core::BlockError> {
        self.inner.read_shared(offset, len).await
    }
    async fn allocated(
        &self,
        range: std::ops::Range<u64>,
    ) -> Result<ExtentMap, ferry_core::BlockError> {
        let own = self.inner.allocated(range.clone()).await?;
        Ok(own.intersection(&self.map.clip(range)))
    }
    fn preferred_read_size(&self) -> u64 {
        self.inner.preferred_read_size()
    }
}

/// An nbdkit child serving one disk on a Unix socket; killed on drop.
pub(crate) struct Nbdkit {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Nbdkit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nbdkit")
            .field("pid", &self.child.id())
            .finish()
    }
}

/// An open backup of one VM.
pub struct VmwareSession {
    inner: Arc<Inner>,
    vm: Vm,
    summary: VmSummary,
    snapshot: Option<MoRef>,
    config: VmConfig,
    native: NativeConfig,
    consistency: ConsistencyLevel,
    disks: Vec<BackupDisk>,
    nbdkits: Vec<Nbdkit>,
    /// The proxy VM, once hot-add was tried.
    proxy: Option<crate::hotadd::Proxy>,
    /// Files hot-added to the proxy, to detach before the snapshot goes.
    attached: Vec<String>,
}

impl std::fmt::Debug for VmwareSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmwareSession")
            .field("vm", &self.vm.name)
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

impl Drop for VmwareSession {
    fn drop(&mut self) {
        let snap = self.snapshot.take();
        let attached = std::mem::take(&mut self.attached);
        let proxy = self.proxy.as_ref().map(|p| p.vm.clone());
        if snap.is_none() && attached.is_empty() {
            return;
        }
        let i = self.inner.clone();
        self.disks.clear();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = i.release(proxy.as_ref(), &attached, snap.as_ref()).await;
            });
        }
    }
}

#[async_trait]
impl BackupSession for VmwareSession {
    fn vm(&self) -> &VmSummary {
        &self.summary
    }
    fn consistency(&self) -> ConsistencyLevel {
        self.consistency
    }
    fn config(&self) -> &VmConfig {
        &self.config
    }
    fn native(&self) -> &NativeConfig {
        &self.native
    }
    fn disks(&self) -> &[BackupDisk] {
        &self.disks
    }
    async fn finish(mut self: Box<Self>, outcome: Outcome) -> Result<ChangeTokens, HvError> {
        let tokens = ChangeTokens(
            self.disks
                .iter()
                .map(|d| (d.key.clone(), d.token.clone()))
                .collect(),
        );
        self.disks.clear();
        for mut n in self.nbdkits.drain(..) {
            let _ = n.child.kill().await;
        }
        let attached = std::mem::take(&mut self.attached);
        let proxy = self.proxy.as_ref().map(|p| p.vm.clone());
        let snap = self.snapshot.take();
        self.inner
            .release(proxy.as_ref(), &attached, snap.as_ref())
            .await?;
        tracing::debug!(vm = %self.vm.name, ?outcome, "backup session finished; snapshot removed");
        Ok(tokens)
    }
}

impl VmwareSession {
    /// Opens one disk of the snapshot through the configured transports, in order.
    async fn open_disk(
        &mut self,
        disk: &VmDisk,
    ) -> Result<(Arc<dyn BlockSource>, TransportMode, String), HvError> {
        let mut refused: Vec<String> = Vec::new();
        let cfg = self.inner.cfg.clone();
        for mode in &cfg.transports {
            let r = match mode {
                TransportMode::San => self
                    .open_san(disk)
                    .await
                    .map(|s| (s, "san (vmdk chain)".to_string())),
                TransportMode::Hotadd => self
                    .open_hotadd(disk)
                    .await
                    .map(|(s, p)| (s, format!("hotadd ({p})"))),
                TransportMode::Network => self.open_network(disk).await,
            };
            match r {
                Ok((src, how)) => {
                    if !refused.is_empty() {
                        tracing::warn!(
                            source = %self.inner.name, vm = %self.vm.name, disk = %disk.position,
                            transport = %mode, refused = %refused.join("; "),
                            "using a less preferred transport"
                        );
                    }
                    return Ok((src, *mode, how));
                }
                Err(why) => refused.push(format!("{mode}: {why}")),
            }
        }
        Err(HvError::NoTransport {
            source_name: self.inner.name.clone(),
            disk: disk.position.clone(),
            tried: refused.join("; "),
        })
    }

    async fn open_san(&mut self, disk: &VmDisk) -> Result<Arc<dyn BlockSource>, String> {
        let path = self.inner.san_file(&disk.file)?;
        let img = ferry_image::open_image(&path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if img.source.size() != disk.capacity {
            return Err(format!(
                "{} holds {} bytes, the disk has {}",
                path.display(),
                img.source.size(),
                disk.capacity
            ));
        }
        Ok(img.source)
    }

    async fn open_hotadd(
        &mut self,
        disk: &VmDisk,
    ) -> Result<(Arc<dyn BlockSource>, String), String> {
        if self.proxy.is_none() {
            self.proxy = Some(crate::hotadd::find_proxy(&self.inner).await?);
        }
        let Some(proxy) = self.proxy.as_mut() else {
            return Err("no proxy VM".into());
        };
        let path = crate::hotadd::attach(&self.inner, proxy, &disk.file, disk.capacity).await?;
        self.attached.push(disk.file.clone());
        let f =
            ferry_image::FileSource::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if f.size() != disk.capacity {
            return Err(format!(
                "{} holds {} bytes, the disk has {}",
                path.display(),
                f.size(),
                disk.capacity
            ));
        }
        Ok((Arc::new(f), path.display().to_string()))
    }

    async fn open_network(
        &mut self,
        disk: &VmDisk,
    ) -> Result<(Arc<dyn BlockSource>, String), String> {
        let target = NbdTarget {
            vm: &self.vm.moref,
            snapshot: self.snapshot.as_ref(),
            file: &disk.file,
            capacity: disk.capacity,
            writable: false,
        };
        let (client, nbdkit, how) = start_nbdkit(&self.inner, &target).await?;
        self.nbdkits.push(nbdkit);
        Ok((Arc::new(client), how))
    }
}

/// What an nbdkit child serves: one disk of a VM (of its snapshot when reading a backup).
pub(crate) struct NbdTarget<'a> {
    pub(crate) vm: &'a MoRef,
    pub(crate) snapshot: Option<&'a MoRef>,
    /// Datastore path of the disk, `[ds] dir/disk.vmdk`.
    pub(crate) file: &'a str,
    pub(crate) capacity: u64,
    /// Restores write; backups never do (`--readonly`).
    pub(crate) writable: bool,
}

impl Inner {
    /// The local path of a datastore file through `san-paths`.
    pub(crate) fn san_file(&self, file: &str) -> Result<PathBuf, String> {
        let (ds, rel) = split_datastore_path(file)
            .ok_or_else(|| format!("backing `{file}` is not a datastore path"))?;
        let dir = self.cfg.san_paths.get(ds).ok_or_else(|| {
            format!("no san-paths entry for datastore `{ds}` (where does this proxy see it?)")
        })?;
        Ok(dir.join(rel))
    }
}

/// Starts nbdkit on a private Unix socket for `t` — the vddk plugin when `vddk-libdir` is set,
/// the file plugin on the flat extent with `nbdkit-stand-in = "file"` — and connects to it.
/// Returns the client, the child (killed on drop) and how the disk travels.
pub(crate) async fn start_nbdkit(
    inner: &Inner,
    t: &NbdTarget<'_>,
) -> Result<(ferry_nbd::NbdClient, Nbdkit, String), String> {
    let cfg = &inner.cfg;
    let dir = tempfile::Builder::new()
        .prefix("ferry-nbdkit-")
        .tempdir()
        .map_err(|e| format!("cannot make a socket directory: {e}"))?;
    let sock = dir.path().join("nbd.sock");
    // nbdkit writes its pid file once it accepts connections (the socket file appears earlier).
    let ready = dir.path().join("nbdkit.pid");
    let mut cmd = tokio::process::Command::new("nbdkit");
    cmd.arg("--exit-with-parent")
        .arg("--foreground")
        .arg("--pidfile")
        .arg(&ready)
        .arg("--unix")
        .arg(&sock);
    if !t.writable {
        cmd.arg("--readonly");
    }
    let how;
    if let Some(libdir) = &cfg.vddk_libdir {
        let pw_file = dir.path().join("pw");
        let pw = cfg.password(&inner.name).map_err(|e| e.to_string())?;
        write_private(&pw_file, pw.expose()).map_err(|e| format!("password file: {e}"))?;
        let server = url::Url::parse(&cfg.url)
            .ok()
            .and_then(|u| u.host_str().map(String::from))
            .unwrap_or_default();
        cmd.arg("vddk")
            .arg(format!("libdir={}", libdir.display()))
            .arg(format!("server={server}"))
            .arg(format!("user={}", cfg.username))
            .arg(format!("password=+{}", pw_file.display()))
            .arg(format!("vm=moref={}", t.vm.value));
        if let Some(s) = t.snapshot {
            cmd.arg(format!("snapshot={}", s.value));
        }
        cmd.arg("transports=nbdssl:nbd")
            .arg(format!("file={}", t.file));
        if let Some(tp) = &cfg.vddk_thumbprint {
            cmd.arg(format!("thumbprint={tp}"));
        }
        how = "network (nbdkit vddk, nbdssl)".to_string();
    } else if cfg.nbdkit_stand_in.as_deref() == Some("file") {
        let desc = inner.san_file(t.file)?;
        let stem = desc
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let flat = desc.with_file_name(format!("{stem}-flat.vmdk"));
        if !flat.exists() {
            return Err(format!(
                "nbdkit-stand-in = \"file\": no flat extent {}",
                flat.display()
            ));
        }
        tracing::warn!(source = %inner.name, file = %t.file,
            "network transport: nbdkit's file plugin stands in for the vddk plugin (nbdkit-stand-in, labs and tests only)");
        cmd.arg("file").arg(format!("file={}", flat.display()));
        how = "network (nbdkit file stand-in)".to_string();
    } else {
        return Err(format!(
            "the network transport (NBD/NBDSSL) reads through nbdkit's vddk plugin, which needs VMware's VDDK: set vddk-libdir in source `{}` to the directory holding libvixDiskLib.so",
            inner.name
        ));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start nbdkit: {e} (install nbdkit)"))?;
    let started = std::time::Instant::now();
    while !ready.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Err(format!("nbdkit exited ({st}): {}", err.trim()));
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill().await;
            return Err("nbdkit was not ready within 30 s".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut ncfg = ferry_nbd::NbdConfig::new(ferry_nbd::Address::Unix(sock), "");
    ncfg.connections = cfg.concurrency.clamp(1, 4);
    let client = ferry_nbd::NbdClient::connect(ncfg)
        .await
        .map_err(|e| format!("NBD to nbdkit: {e}"))?;
    if client.size() != t.capacity {
        return Err(format!(
            "nbdkit serves {} bytes, the disk has {}",
            client.size(),
            t.capacity
        ));
    }
    Ok((client, Nbdkit { child, _dir: dir }, how))
}

fn write_private(p: &std::path::Path, s: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(s.as_bytes())
}

#[async_trait]
impl HypervisorDriver for VmwareDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Vmware
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>, HvError> {
        Ok(self.inner.vms().await?.iter().map(summary).collect())
    }

    async fn disk_stores(&self, vm: &VmSummary) -> Result<BTreeMap<String, String>, HvError> {
        let found = self.inner.find_vm(&vm.id).await?;
        // `[datastore1] vm/vm.vmdk` names the datastore; its MoRef when the path does not.
        Ok(found
            .disks
            .iter()
            .filter_map(|d| {
                let name = split_datastore_path(&d.file)
                    .map(|(ds, _)| ds.to_string())
                    .or_else(|| d.datastore.as_ref().map(|m| m.value.clone()))?;
                Some((d.key(), name))
            })
            .collect())
    }

    async fn begin_backup(
        &self,
        want: &str,
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<Box<dyn BackupSession>, HvError> {
        let i = self.inner.clone();
        let mut cleaned = i.recover(false).await?;
        let vm = i.find_vm(want).await?;
        // A Ferry snapshot still on this VM was left by a backup that died before journaling it
        // (a lost CreateSnapshot_Task answer): one VM is backed up by one backup at a time (work
        // leases, one job run per VM), so it is stale. Other VMs' snapshots may belong to running
        // backups and are left to the journal.
        for (snap, _) in vm
            .snapshots
            .iter()
            .filter(|(_, n)| n.starts_with(SNAPSHOT_PREFIX))
        {
            if i.remove_snapshot(snap).await? {
                cleaned.snapshots += 1;
            }
        }
        if cleaned.snapshots > 0 {
            tracing::warn!(source = %i.name, vm = %vm.name, removed = cleaned.snapshots, "leftover Ferry snapshots removed before the backup");
        }
        let c = &i.client;
        let mut cbt_reason = None;
        if !vm.cbt_enabled {
            c.set_change_tracking(&vm.moref, true).await?;
            cbt_reason =
                Some("changed block tracking was off on this VM; Ferry switched it on".to_string());
            tracing::info!(source = %i.name, vm = %vm.name, "changed block tracking enabled");
        }
        let quiesce = i.cfg.quiesce.unwrap_or(true) && vm.power_state == "poweredOn";
        let name = format!(
            "{SNAPSHOT_PREFIX}{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        let desc = "Taken by Ferry for a backup; removed when it ends. Safe to delete if no backup is running.";
        let (snap, quiesced) = match c.create_snapshot(&vm.moref, &name, desc, quiesce).await {
            Ok(s) => (s, quiesce),
            Err(e) if quiesce && e.fault() == Some(&FaultKind::ApplicationQuiesceFault) => {
                tracing::warn!(source = %i.name, vm = %vm.name, error = %e,
                    "quiescing the guest failed; taking a crash-consistent snapshot instead");
                (
                    c.create_snapshot(&vm.moref, &name, desc, false).await?,
                    false,
                )
            }
            Err(e) => return Err(e.into()),
        };
        i.journal(true, "snapshot", &snap.value);
        let consistency = if !quiesced {
            ConsistencyLevel::Crash
        } else if vm
            .guest_id
            .as_deref()
            .is_some_and(|g| g.to_ascii_lowercase().contains("windows"))
        {
            ConsistencyLevel::Application
        } else {
            ConsistencyLevel::FileSystem
        };
        let mut session = VmwareSession {
            inner: i.clone(),
            summary: summary(&vm),
            config: vm.config(),
            native: native(&vm),
            consistency,
            snapshot: Some(snap.clone()),
            disks: Vec::new(),
            nbdkits: Vec::new(),
            proxy: None,
            attached: Vec::new(),
            vm: vm.clone(),
        };
        // From here on, a failure removes the snapshot before it is returned.
        match fill(&mut session, &snap, opts, previous, cbt_reason).await {
            Ok(()) => Ok(Box::new(session)),
            Err(e) => {
                if let Err(e2) = Box::new(session).finish(Outcome::Aborted).await {
                    tracing::warn!(error = %e2, "cannot remove the snapshot of a failed backup");
                }
                Err(e)
            }
        }
    }

    async fn recover(&self) -> Result<CleanupReport, HvError> {
        self.inner.recover(true).await
    }

    async fn restore_vm(&self, plan: &RestorePlan) -> Result<RestoredVm, HvError> {
        crate::restore::restore(&self.inner, plan).await
    }

    fn replica(&self) -> Option<&dyn ferry_hv::ReplicaTarget> {
        Some(self)
    }
}

/// Opens the snapshot's disks into `session`: changes since the previous changeIds, transports.
async fn fill(
    session: &mut VmwareSession,
    snap: &MoRef,
    opts: &BackupOptions,
    previous: Option<&ChangeTokens>,
    cbt_reason: Option<String>,
) -> Result<(), HvError> {
    let i = session.inner.clone();
    let c = &i.client;
    let vm = session.vm.clone();
    let snap = snap.clone();
    {
        let s = c.retrieve_one(&snap, &["config.hardware.device"]).await?;
        let (snap_disks, _) = s
            .prop("config.hardware.device")
            .map(crate::model::parse_devices)
            .unwrap_or_default();
        for disk in &snap_disks {
            if let Some(why) = &disk.skip {
                tracing::warn!(source = %i.name, vm = %vm.name, disk = %disk.position, label = %disk.label,
                    "disk not backed up: {why}");
                continue;
            }
            let key = disk.key();
            if opts
                .exclude_disks
                .iter()
                .any(|x| *x == key || *x == disk.position || *x == disk.label)
            {
                continue;
            }
            let token = ChangeToken(disk.change_id.clone().unwrap_or_default());
            let prev = previous.and_then(|p| p.0.get(&key)).map(|t| t.0.clone());
            // "*" (every allocated area) bounds a full read; refused → the source's own map.
            let all = c
                .query_changed_disk_areas(&vm.moref, &snap, disk.device_key, disk.capacity, "*")
                .await;
            let changed = if opts.force_full {
                Changed::Full {
                    reason: "a full backup was asked for".into(),
                }
            } else if let Some(r) = &cbt_reason {
                Changed::Full { reason: r.clone() }
            } else if disk.change_id.is_none() {
                Changed::Full {
                    reason: "the snapshot's disk has no changeId (changed block tracking inactive)"
                        .into(),
                }
            } else {
                match prev.as_deref() {
                    None | Some("") => Changed::Full {
                        reason: "first backup of this disk (no previous changeId)".into(),
                    },
                    Some(p) => match c
                        .query_changed_disk_areas(
                            &vm.moref,
                            &snap,
                            disk.device_key,
                            disk.capacity,
                            p,
                        )
                        .await
                    {
                        Ok(areas) => Changed::Since(ExtentMap::from_extents(
                            areas
                                .iter()
                                .map(|a| ferry_core::Extent::new(a.start, a.length)),
                        )),
                        Err(e) => {
                            let reason = format!(
                                "vCenter refused the previous changeId ({e}); reading the whole disk and comparing by hash"
                            );
                            tracing::warn!(source = %i.name, vm = %vm.name, disk = %disk.position, "{reason}");
                            Changed::Full { reason }
                        }
                    },
                }
            };
            let (src, transport, how) = session.open_disk(disk).await?;
            let src: Arc<dyn BlockSource> = match all {
                Ok(areas) => Arc::new(CbtAllocated {
                    inner: src,
                    map: ExtentMap::from_extents(
                        areas
                            .iter()
                            .map(|a| ferry_core::Extent::new(a.start, a.length)),
                    ),
                }),
                Err(e) => {
                    tracing::debug!(disk = %disk.position, error = %e, "QueryChangedDiskAreas(*) refused; using the transport's allocation map");
                    src
                }
            };
            let counting = CountingSource::new(src);
            let counters = counting.counters();
            tracing::info!(source = %i.name, vm = %vm.name, disk = %disk.position, transport = %how, "disk opened");
            session.disks.push(BackupDisk {
                key,
                name: disk.position.clone(),
                source: Arc::new(counting),
                counters,
                changed,
                transport,
                token,
            });
        }
    }
    Ok(())
}
