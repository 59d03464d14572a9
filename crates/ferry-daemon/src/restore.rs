//! Restores through the API: a restore point's disk to a file on the appliance, the whole VM
//! onto a hypervisor source (through the [`Backend`](crate::Backend), the code path of
//! `ferry restore --to-source`), or a disk served over NBD until the session is cancelled.
//! Each runs as a session (kind `restore`) with a log, progress and a cancel, like a job's run.
//! Everything that can be checked is checked before the session starts, so a bad request is a
//! 4xx naming the field, never a failed session.

use crate::App;
use crate::jobs::{LiveSession, SessionView, Status, VmLive, VmView, new_id, now};
use crate::problem::{ApiResult, Problem};
use axum::http::StatusCode;
use ferry_engine::{EngineError, Progress, RestoreOptions, RestoreTo};
use ferry_repo::{Manifest, Repository};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What to restore.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestoreKind {
    /// One disk to a new file on the appliance.
    Disk,
    /// The whole VM onto a source.
    Vm,
    /// One disk served over NBD until the session is cancelled.
    Export,
}

/// `POST /api/restores`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Repository name.
    pub repository: String,
    /// Restore point id.
    pub restore_point: String,
    /// What to do.
    pub kind: RestoreKind,
    /// Disk (kinds `disk` and `export`; may be left out when the point has one disk).
    #[serde(default)]
    pub disk: Option<String>,
    /// New file (kind `disk`): absolute, must not exist.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// File format (kind `disk`): raw (default), vhd, vhd-fixed, vhdx, vmdk, vmdk-stream.
    #[serde(default)]
    pub format: Option<String>,
    /// Source to create the VM on (kind `vm`).
    #[serde(default)]
    pub source: Option<String>,
    /// Name of the new VM (kind `vm`).
    #[serde(default)]
    pub name: Option<String>,
    /// Start the new VM (kind `vm`).
    #[serde(default)]
    pub power_on: Option<bool>,
    /// `HOST:PORT` to serve on (kind `export`, default `127.0.0.1:0`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Accept writes into a temporary overlay (kind `export`).
    #[serde(default)]
    pub writable: Option<bool>,
}

enum Target {
    File {
        disk: String,
        path: PathBuf,
        format: ferry_engine::restore::OutputFormat,
    },
    Vm {
        source: String,
        cfg: Box<ferry_hv::SourceConfig>,
        name: String,
        power_on: bool,
    },
    Export {
        disk: String,
        listener: ferry_engine::export::Listener,
        writable: bool,
    },
}

/// A restore point as the API shows it.
pub fn restore_point_json(repository: &str, m: &Manifest) -> Value {
    json!({
        "id": m.id,
        "repository": repository,
        "time": m.time,
        "started": m.started,
        "finished": m.finished,
        "vm_id": m.meta.vm.id,
        "vm_name": m.meta.vm.name,
        "source": m.meta.source,
        "transport": m.meta.transport,
        "consistency": m.meta.consistency,
        "disks": m.disks.iter().map(|d| json!({"name": d.name, "size": d.size})).collect::<Vec<_>>(),
    })
}

fn gateway(what: String) -> Problem {
    Problem::new(StatusCode::BAD_GATEWAY, what)
}

/// Opens configured repository `name`.
pub async fn open_named(app: &App, name: &str) -> ApiResult<Repository> {
    let doc = app.store.load()?;
    let cfg = doc
        .repositories
        .get(name)
        .ok_or_else(|| Problem::not_found(format!("repository `{name}`")))?;
    crate::jobs::open_repository(cfg)
        .await
        .map_err(|e| gateway(format!("repository `{name}`: {e}")))
}

/// Restore points of `vm` (id or name) in every configured repository, newest first.
pub async fn vm_restore_points(app: &App, vm: &str) -> ApiResult<Vec<Value>> {
    let doc = app.store.load()?;
    let mut all: Vec<(i64, String, Value)> = Vec::new();
    for name in doc.repositories.keys() {
        let repo = open_named(app, name).await?;
        let ms = repo
            .snapshots()
            .await
            .map_err(|e| gateway(format!("repository `{name}`: {e}")))?;
        for m in ms
            .iter()
            .filter(|m| m.meta.vm.id == vm || m.meta.vm.name == vm)
        {
            all.push((m.time, m.id.clone(), restore_point_json(name, m)));
        }
    }
    all.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    Ok(all.into_iter().map(|(_, _, v)| v).collect())
}

fn pick_disk(m: &Manifest, disk: Option<&str>) -> ApiResult<String> {
    let names = || {
        m.disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (disk, m.disks.as_slice()) {
        (Some(d), disks) if disks.iter().any(|x| x.name == d) => Ok(d.to_string()),
        (Some(d), _) => Err(Problem::invalid(
            "disk",
            format!(
                "restore point {} has no disk `{d}` (disks: {})",
                m.id,
                names()
            ),
        )),
        (None, [one]) => Ok(one.name.clone()),
        (None, _) => Err(Problem::invalid(
            "disk",
            format!(
                "restore point {} has {} disks ({}): name one in `disk`",
                m.id,
                m.disks.len(),
                names()
            ),
        )),
    }
}

/// Refuses the fields that do not belong to `kind`, so a mistyped request is not silently
/// half-applied.
fn only(r: &RestoreRequest, kind: &str, allowed: &[&str]) -> ApiResult<()> {
    let given = [
        ("disk", r.disk.is_some()),
        ("path", r.path.is_some()),
        ("format", r.format.is_some()),
        ("source", r.source.is_some()),
        ("name", r.name.is_some()),
        ("power_on", r.power_on.is_some()),
        ("listen", r.listen.is_some()),
        ("writable", r.writable.is_some()),
    ];
    for (f, set) in given {
        if set && !allowed.contains(&f) {
            return Err(Problem::invalid(
                f,
                format!("`{f}` does not apply to a restore of kind `{kind}`"),
            ));
        }
    }
    Ok(())
}

async fn target(app: &App, r: &RestoreRequest, m: &Manifest) -> ApiResult<Target> {
    match r.kind {
        RestoreKind::Disk => {
            only(r, "disk", &["disk", "path", "format"])?;
            let disk = pick_disk(m, r.disk.as_deref())?;
            let path = r
                .path
                .clone()
                .ok_or_else(|| Problem::invalid("path", "give `path`: the new file to write"))?;
            if !path.is_absolute() {
                return Err(Problem::invalid(
                    "path",
                    format!("`{}` is not an absolute path", path.display()),
                ));
            }
            if path.symlink_metadata().is_ok() {
                return Err(Problem::invalid(
                    "path",
                    format!(
                        "{} exists: a restore writes a new file only, choose another path",
                        path.display()
                    ),
                ));
            }
            match path.parent() {
                Some(d) if d.is_dir() => {}
                _ => {
                    return Err(Problem::invalid(
                        "path",
                        format!("the directory of {} does not exist", path.display()),
                    ));
                }
            }
            let format = r
                .format
                .as_deref()
                .unwrap_or("raw")
                .parse()
                .map_err(|e: String| Problem::invalid("format", e))?;
            Ok(Target::File { disk, path, format })
        }
        RestoreKind::Vm => {
            only(r, "vm", &["source", "name", "power_on"])?;
            let source = r.source.clone().ok_or_else(|| {
                Problem::invalid("source", "give `source`: the source to create the VM on")
            })?;
            let doc = app.store.load()?;
            let cfg = doc.ferry.sources.get(&source).cloned().ok_or_else(|| {
                Problem::invalid("source", format!("no source `{source}` is configured"))
            })?;
            if m.meta.config.cpus == 0 || m.meta.config.memory == 0 {
                return Err(Problem::invalid(
                    "kind",
                    format!(
                        "restore point {} holds no VM configuration (it was backed up from disks): restore its disks instead",
                        m.id
                    ),
                ));
            }
            let name = match &r.name {
                Some(n) if n.trim().is_empty() || n.len() > 200 => {
                    return Err(Problem::invalid(
                        "name",
                        "the new VM's name must have 1 to 200 characters",
                    ));
                }
                Some(n) => n.clone(),
                None => format!("{} (restore point {})", m.meta.vm.name, m.id),
            };
            Ok(Target::Vm {
                source,
                cfg: Box::new(cfg),
                name,
                power_on: r.power_on.unwrap_or(false),
            })
        }
        RestoreKind::Export => {
            only(r, "export", &["disk", "listen", "writable"])?;
            let disk = pick_disk(m, r.disk.as_deref())?;
            let listen = r.listen.as_deref().unwrap_or("127.0.0.1:0");
            if listen.starts_with("unix:") {
                return Err(Problem::invalid(
                    "listen",
                    "give HOST:PORT (the appliance serves exports over TCP)",
                ));
            }
            let listener = ferry_engine::export::bind(listen)
                .await
                .map_err(|e| Problem::invalid("listen", e.to_string()))?;
            Ok(Target::Export {
                disk,
                listener,
                writable: r.writable.unwrap_or(false),
            })
        }
    }
}

impl App {
    /// Checks `r` and starts its restore session; returns the session id.
    pub async fn start_restore(self: &Arc<Self>, r: RestoreRequest, by: &str) -> ApiResult<String> {
        if self.stopping.is_cancelled() {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the appliance is shutting down",
            ));
        }
        let doc = self.store.load()?;
        if !doc.repositories.contains_key(&r.repository) {
            return Err(Problem::invalid(
                "repository",
                format!("no repository `{}` is configured", r.repository),
            ));
        }
        let repo = open_named(self, &r.repository).await?;
        let ids = repo
            .snapshot_ids()
            .await
            .map_err(|e| gateway(format!("repository `{}`: {e}", r.repository)))?;
        if !ids.contains(&r.restore_point) {
            return Err(Problem::not_found(format!(
                "restore point `{}` in repository `{}`",
                r.restore_point, r.repository
            )));
        }
        let m = repo
            .load_manifest(&r.restore_point)
            .await
            .map_err(|e| gateway(format!("repository `{}`: {e}", r.repository)))?;
        let t = target(self, &r, &m).await?;
        let mut info = json!({
            "kind": match r.kind { RestoreKind::Disk => "disk", RestoreKind::Vm => "vm", RestoreKind::Export => "export" },
            "repository": r.repository,
            "restore_point": m.id,
        });
        let total = match &t {
            Target::File { disk, path, .. } => {
                info["disk"] = json!(disk);
                info["path"] = json!(path);
                info["format"] = json!(r.format.as_deref().unwrap_or("raw"));
                disk_size(&m, disk)
            }
            Target::Vm {
                source,
                name,
                power_on,
                ..
            } => {
                info["source"] = json!(source);
                info["name"] = json!(name);
                info["power_on"] = json!(power_on);
                info["new_vm"] = Value::Null;
                m.disks.iter().map(|d| d.size).sum()
            }
            Target::Export {
                disk,
                listener,
                writable,
            } => {
                info["disk"] = json!(disk);
                info["writable"] = json!(writable);
                info["nbd_uri"] = json!(listener.uri(disk));
                disk_size(&m, disk)
            }
        };
        let id = new_id();
        let mut vms = BTreeMap::new();
        vms.insert(
            m.meta.vm.id.clone(),
            VmLive {
                view: VmView {
                    attempts: 1,
                    total,
                    restore_point: Some(m.id.clone()),
                    ..VmView::queued(&m.meta.vm.id, &m.meta.vm.name)
                },
                progress: None,
            },
        );
        let s = Arc::new(LiveSession {
            id: id.clone(),
            cancel: self.stopping_jobs.child_token(),
            state: Mutex::new((
                SessionView {
                    id: id.clone(),
                    job: String::new(),
                    trigger: "manual".into(),
                    status: Status::Running,
                    started: now(),
                    ended: None,
                    started_by: by.into(),
                    vms: Vec::new(),
                    pruned: 0,
                    error: None,
                    kind: "restore",
                    restore: Some(info),
                },
                vms,
            )),
            seq: AtomicU64::new(0),
        });
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), s.clone());
        self.persist(&s);
        let app = self.clone();
        let by = by.to_string();
        self.tracker.spawn(async move {
            app.log(
                &s,
                "info",
                None,
                format!(
                    "restore of {} (restore point {}) started by {by}",
                    m.meta.vm.name, m.id
                ),
            );
            let vm_id = m.meta.vm.id.clone();
            s.vm(&vm_id, |l| l.view.status = Status::Running);
            let r = app.run_restore(&s, &repo, &m, t).await;
            let cancelled = s.cancel.is_cancelled();
            let status = match &r {
                Ok(()) => Status::Success,
                Err(_) if cancelled => Status::Cancelled,
                Err(_) => Status::Failed,
            };
            s.update(|v, vms| {
                v.ended = Some(now());
                v.status = status;
                if let Err(e) = &r {
                    v.error = Some(e.clone());
                }
                for l in vms.values_mut() {
                    if let Some((p, _)) = l.progress.take() {
                        let snap = p.snapshot();
                        l.view.done = snap.done;
                        l.view.read = snap.read;
                        l.view.written = snap.written;
                    }
                    l.view.status = status;
                    l.view.error = r.as_ref().err().cloned();
                    l.view.current_disk.clear();
                }
            });
            app.log(
                &s,
                if status == Status::Success {
                    "info"
                } else {
                    "warn"
                },
                None,
                format!("session ended: {}", status.as_str()),
            );
            app.persist(&s);
        });
        Ok(id)
    }

    async fn run_restore(
        self: &Arc<Self>,
        s: &Arc<LiveSession>,
        repo: &Repository,
        m: &Manifest,
        t: Target,
    ) -> Result<(), String> {
        let vm_id = m.meta.vm.id.clone();
        match t {
            Target::File { disk, path, format } => {
                let progress = Arc::new(Progress::new());
                s.vm(&vm_id, |l| {
                    l.progress = Some((progress.clone(), tokio::time::Instant::now()))
                });
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!("writing disk {disk} to {}", path.display()),
                );
                let opts = RestoreOptions {
                    cancel: s.cancel.clone(),
                    progress,
                    ..Default::default()
                };
                let rep = ferry_engine::restore_disk(
                    repo,
                    m,
                    &disk,
                    RestoreTo::File {
                        path: path.clone(),
                        format,
                    },
                    &opts,
                )
                .await
                .map_err(|e| match e {
                    EngineError::Cancelled => "cancelled: the partial file was removed".into(),
                    e => format!("disk {disk} to {}: {e}", path.display()),
                })?;
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!(
                        "disk {} restored to {}: {} in {:.1}s",
                        rep.disk,
                        rep.target,
                        ferry_core::size::human_bytes(rep.size),
                        rep.seconds
                    ),
                );
                Ok(())
            }
            Target::Vm {
                source,
                cfg,
                name,
                power_on,
            } => {
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!("connecting to source `{source}`"),
                );
                let driver = tokio::select! {
                    _ = s.cancel.cancelled() => return Err("cancelled".into()),
                    d = self.backend.connect(&source, &cfg) => d.map_err(|e| {
                        format!("cannot connect to source `{source}`: {e}")
                    })?,
                };
                let read = Arc::new(AtomicU64::new(0));
                // The driver reports no progress of its own: the bytes it has read from the
                // repository are the progress.
                let ticker = {
                    let (s, read, vm_id) = (s.clone(), read.clone(), vm_id.clone());
                    tokio::spawn(async move {
                        let t0 = tokio::time::Instant::now();
                        loop {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let done = read.load(Ordering::Relaxed);
                            let secs = t0.elapsed().as_secs_f64();
                            s.vm(&vm_id, |l| {
                                l.view.done = done.min(l.view.total);
                                l.view.read = done;
                                if secs > 0.0 {
                                    l.view.rate = (done as f64 / secs) as u64;
                                    l.view.eta_seconds = (l.view.rate > 0).then(|| {
                                        l.view.total.saturating_sub(done) / l.view.rate.max(1)
                                    });
                                }
                            });
                        }
                    })
                };
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!("creating VM `{name}` on source `{source}`"),
                );
                let r = self
                    .backend
                    .restore_vm(
                        driver.as_ref(),
                        repo,
                        m,
                        crate::VmRestore {
                            name: name.clone(),
                            power_on,
                            cancel: s.cancel.clone(),
                            read: read.clone(),
                        },
                    )
                    .await;
                ticker.abort();
                let vm = r.map_err(|e| e.0)?;
                let done = read.load(Ordering::Relaxed);
                s.update(|v, vms| {
                    if let Some(info) = v.restore.as_mut() {
                        info["new_vm"] = json!(vm);
                    }
                    if let Some(l) = vms.get_mut(&vm_id) {
                        l.view.done = l.view.total;
                        l.view.read = done;
                        l.view.eta_seconds = Some(0);
                    }
                });
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!(
                        "VM `{}` ({}) created on source `{source}` via {}{}",
                        vm.name,
                        vm.id,
                        vm.transport,
                        if power_on { ", powered on" } else { "" }
                    ),
                );
                Ok(())
            }
            Target::Export {
                disk,
                listener,
                writable,
            } => {
                let uri = listener.uri(&disk);
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!(
                        "serving disk {disk} at {uri} ({}); cancel the session to stop",
                        if writable {
                            "writable overlay"
                        } else {
                            "read-only"
                        }
                    ),
                );
                // Stops on a cancel and at the appliance's shutdown (an export never ends
                // by itself, so it must not hold the shutdown for the jobs' grace period).
                let stop = CancellationToken::new();
                let watch = {
                    let (stop, cancel, stopping) =
                        (stop.clone(), s.cancel.clone(), self.stopping.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = stopping.cancelled() => {}
                        }
                        stop.cancel();
                    })
                };
                let r =
                    ferry_engine::export::serve(repo, &m.id, &disk, writable, listener, stop).await;
                watch.abort();
                r.map_err(|e| format!("export of disk {disk}: {e}"))?;
                self.log(
                    s,
                    "info",
                    Some(&m.meta.vm.name),
                    format!("export {uri} stopped"),
                );
                // A stopped export is its normal end, not a cancelled restore.
                Ok(())
            }
        }
    }
}

fn disk_size(m: &Manifest, disk: &str) -> u64 {
    m.disks
        .iter()
        .find(|d| d.name == disk)
        .map(|d| d.size)
        .unwrap_or(0)
}
