//! `ferry instant-recover start|status|finish|cancel` (ADRs 0100–0101): run a VM straight from
//! a restore point while it is restored.
//!
//! `start` exports every disk of the restore point as a writable NBD export (copy-on-write
//! overlay: the repository never changes), has the hypervisor source create a VM on those
//! exports and boot it, and restores the disks into new disks on the source's real storage in
//! the background. The `start` process *is* the session: it serves the exports and a control
//! socket (`<run dir>/<session>.sock`) until `finish` or `cancel` — or SIGTERM/Ctrl-C, which
//! cancels. `finish` waits for the restore, stops the VM, copies what the guest wrote, checks
//! the restored disks byte for byte against what the guest saw, switches the VM onto them
//! and starts it again; `cancel` removes the VM and the restored disks.

use crate::cmd::backup::{EXIT_CANCELLED, cancel_on_signal};
use crate::cmd::repo::RepoArgs;
use crate::cmd::restore::{disks_of, resolve_snapshot};
use crate::cmd::source::SourceArgs;
use anyhow::{Context, bail};
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::{CountingSource, InstantPlan, InstantVm, ReadCounters};
use ferry_hv::{RestoreDisk, RestorePlan};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// `ferry instant-recover …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run a VM from a restore point on a hypervisor source while it is restored there; runs
    /// until `finish` or `cancel` (SIGTERM or Ctrl-C cancels).
    Start(StartArgs),
    /// Show sessions, or one session: the restore's progress and what the guest wrote.
    Status(CtlArgs),
    /// Wait for the restore, move the guest's writes over, verify, switch the VM onto the
    /// restored disks and end the session.
    Finish(CtlArgs),
    /// Remove the VM and the restored disks and end the session.
    Cancel(CtlArgs),
}

/// Arguments of `ferry instant-recover start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore point: an id (or a unique prefix of one), `latest`, or `VM@latest`.
    pub snapshot: String,
    /// The hypervisor source (a `[sources.NAME]` table of ferry.toml) to run the VM on.
    #[arg(long)]
    pub to_source: String,
    /// Configuration file (default: $FERRY_CONFIG, ./ferry.toml, /etc/ferry/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of the VM (default: "<VM> (instant recovery)"); it also names the session.
    #[arg(long)]
    pub name: Option<String>,
    /// Storage the disks are restored to (Xen: an SR's uuid or name; default: the pool's
    /// default SR).
    #[arg(long)]
    pub sr: Option<String>,
    /// Where the NBD exports listen (HOST:PORT; port 0 picks a free one).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub listen: String,
    /// The host name or address the hypervisor reaches this proxy at (default: the listen
    /// address; required when listening on every address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Guest memory in MiB (default: the backed-up VM's; 1024 for a restore point of bare
    /// disks).
    #[arg(long)]
    pub memory: Option<u64>,
}

/// Arguments of `status`, `finish` and `cancel`.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The session (the VM's name as `start` printed it); may be left out when only one runs.
    pub session: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ferry instant-recover`.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Start(a) => start(a).await,
        Command::Status(a) => control(a, "status").await,
        Command::Finish(a) => control(a, "finish").await,
        Command::Cancel(a) => control(a, "cancel").await,
    }
}

/// Where control sockets live: `$FERRY_RUN_DIR`, `$XDG_RUNTIME_DIR/ferry-instant`, or the
/// temporary directory's `ferry-instant`.
fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_RUN_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("ferry-instant"),
        None => std::env::temp_dir().join("ferry-instant"),
    }
}

/// A session name usable as a file name.
fn session_name(vm: &str) -> String {
    vm.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The running session's state, shared with the control socket.
struct Session {
    name: String,
    snapshot: String,
    vm: InstantVm,
    exports: Vec<String>,
    started: Instant,
    /// Per disk: bytes read by the restore so far, and the disk's size.
    restore: Vec<(Arc<ReadCounters>, u64)>,
    /// `running`, `restored`, `failed: …`.
    restore_state: Mutex<String>,
    /// How long the background restore took, once it is done.
    restore_seconds: Mutex<Option<f64>>,
    overlays: Vec<Arc<ferry_nbd::CowOverlay>>,
}

impl Session {
    fn status(&self, state: &str) -> Value {
        let read: u64 = self.restore.iter().map(|(c, _)| c.bytes()).sum();
        let size: u64 = self.restore.iter().map(|(_, s)| s).sum();
        let written: u64 = self.overlays.iter().map(|o| o.written().total_len()).sum();
        json!({
            "session": self.name,
            "state": state,
            "snapshot": self.snapshot,
            "vm": self.vm,
            "exports": self.exports,
            "restore": {
                "state": *self.restore_state.lock().expect("state lock"),
                "read_bytes": read,
                "size": size,
                "seconds": *self.restore_seconds.lock().expect("state lock"),
            },
            "guest_written_bytes": written,
            "seconds": self.started.elapsed().as_secs_f64(),
        })
    }
}

async fn start(a: StartArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let repo = a.repo.open().await?;
    let manifest = resolve_snapshot(&repo, &a.snapshot).await?;
    let driver = SourceArgs {
        source: a.to_source.clone(),
        config: a.config.clone(),
    }
    .connect()
    .await?;
    if driver.instant().is_none() {
        bail!(
            "source `{}` ({:?}) does not support instant recovery yet",
            a.to_source,
            driver.kind()
        );
    }
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("{} (instant recovery)", manifest.meta.vm.name));
    let session = session_name(&name);
    let dir = run_dir();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let sock = dir.join(format!("{session}.sock"));
    if tokio::net::UnixStream::connect(&sock).await.is_ok() {
        bail!("an instant recovery named `{session}` is already running: pass --name");
    }
    let _ = std::fs::remove_file(&sock);
    let control = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;

    // The VM's configuration; a restore point of bare disks gets one vCPU.
    let mut config = manifest.meta.config.clone();
    config.cpus = config.cpus.max(1);
    if let Some(m) = a.memory {
        config.memory = m << 20;
    } else if config.memory == 0 {
        config.memory = 1 << 30;
    }
    if config.disks.is_empty() {
        config.disks = disks_of(&manifest);
    }
    let listener = ferry_engine::export::bind(&a.listen).await?;
    let ferry_engine::export::Listener::Tcp(tcp) = &listener else {
        bail!("--listen takes HOST:PORT: the hypervisor connects over TCP");
    };
    let addr = tcp.local_addr()?;
    let host = match &a.advertise {
        Some(h) => h.clone(),
        None if addr.ip().is_unspecified() => bail!(
            "--listen {} listens on every address: pass --advertise HOST, the address the hypervisor reaches this proxy at",
            a.listen
        ),
        None if addr.is_ipv6() => format!("[{}]", addr.ip()),
        None => addr.ip().to_string(),
    };
    let mut exports = Vec::new();
    let mut overlays = Vec::new();
    let mut uris = Vec::new();
    let mut disks = Vec::new();
    for d in &config.disks {
        if !manifest.disks.iter().any(|x| x.name == d.name) {
            bail!(
                "restore point {} describes disk `{}` but holds no data for it",
                manifest.id,
                d.name
            );
        }
        let e = ferry_engine::export::writable_export(&repo, &manifest.id, &d.name).await?;
        overlays.push(
            e.overlay()
                .cloned()
                .context("a writable export has an overlay")?,
        );
        exports.push(e);
        uris.push(format!("nbd://{host}:{}/{}", addr.port(), d.name));
        disks.push(RestoreDisk {
            name: d.name.clone(),
            source: repo
                .open_disk(&manifest.id, &d.name)
                .await
                .with_context(|| format!("cannot open disk `{}`", d.name))?,
        });
    }
    let stop_nbd = CancellationToken::new();
    let nbd = tokio::spawn(ferry_engine::export::serve_exports(
        exports,
        listener,
        stop_nbd.clone(),
    ));
    let plan = InstantPlan {
        vm: RestorePlan {
            name: name.clone(),
            config,
            native: manifest
                .meta
                .native_config
                .clone()
                .filter(|_| manifest.meta.hypervisor == driver.kind()),
            disks,
            power_on: true,
        },
        exports: uris.clone(),
        storage: a.sr.clone(),
    };
    let ir = driver.instant().context("instant recovery")?;
    let vm = match ir.instant_start(&plan).await {
        Ok(vm) => vm,
        Err(e) => {
            stop_nbd.cancel();
            let _ = std::fs::remove_file(&sock);
            return Err(e).with_context(|| {
                format!(
                    "cannot start VM `{}` of restore point {} on source `{}`",
                    manifest.meta.vm.name, manifest.id, a.to_source
                )
            });
        }
    };
    let running_after = t0.elapsed().as_secs_f64();
    let sources: Vec<CountingSource> = plan
        .vm
        .disks
        .iter()
        .map(|d| CountingSource::new(d.source.clone()))
        .collect();
    let session_state = Arc::new(Session {
        name: session.clone(),
        snapshot: manifest.id.clone(),
        vm: vm.clone(),
        exports: uris.clone(),
        started: t0,
        restore: sources
            .iter()
            .zip(&plan.vm.disks)
            .map(|(s, d)| (s.counters(), d.source.size()))
            .collect(),
        restore_state: Mutex::new("running".into()),
        restore_seconds: Mutex::new(None),
        overlays,
    });
    println!(
        "{}",
        json!({
            "session": session,
            "control": sock,
            "snapshot": manifest.id,
            "vm": vm,
            "exports": uris,
            "seconds_to_running": running_after,
        })
    );
    let _ = std::io::stdout().flush();
    if !crate::logging::quiet() {
        eprintln!(
            "VM `{}` ({}) runs from restore point {} on source `{}` after {running_after:.1} s; restoring its disks in the background. `ferry instant-recover finish {session}` switches it to the restored disks, `cancel` removes it.",
            vm.name, vm.id, manifest.id, a.to_source
        );
    }

    // The background restore: disk after disk, from the restore point (not the overlay: the
    // guest's writes follow at finish).
    let restore = {
        let (driver, vm, st) = (driver.clone(), vm.clone(), session_state.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            for (i, src) in sources.iter().enumerate() {
                let ir = driver.instant().expect("checked above");
                if let Err(e) = ir.instant_restore_disk(&vm, i, src).await {
                    let msg = format!("failed: {e:#}");
                    tracing::error!(error = %e, "the background restore failed; the VM keeps running from the backup");
                    *st.restore_state.lock().expect("state lock") = msg.clone();
                    return Err(msg);
                }
            }
            tracing::info!(
                seconds = t.elapsed().as_secs_f64(),
                "background restore complete"
            );
            *st.restore_seconds.lock().expect("state lock") = Some(t.elapsed().as_secs_f64());
            *st.restore_state.lock().expect("state lock") = "restored".into();
            Ok(())
        })
    };

    let signal = CancellationToken::new();
    cancel_on_signal(signal.clone());
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(String, tokio::sync::oneshot::Sender<Value>)>(4);
    let accept = tokio::spawn(serve_control(control, tx));
    let mut restore = Some(restore);
    let code = loop {
        let (op, reply) = tokio::select! {
            _ = signal.cancelled() => ("cancel".to_string(), None),
            r = rx.recv() => match r {
                Some((op, reply)) => (op, Some(reply)),
                None => ("cancel".to_string(), None),
            },
        };
        let answer = |v: Value| {
            if let Some(r) = reply {
                let _ = r.send(v);
            }
        };
        match op.as_str() {
            "status" => answer(session_state.status("running")),
            "cancel" => {
                if let Some(h) = restore.take() {
                    h.abort();
                    let _ = h.await;
                }
                let r = ir.instant_cancel(&vm).await;
                match r {
                    Ok(()) => {
                        answer(json!({"ok": true, "state": "cancelled", "vm": vm}));
                        break if signal.is_cancelled() {
                            ExitCode::from(EXIT_CANCELLED)
                        } else {
                            ExitCode::SUCCESS
                        };
                    }
                    Err(e) => {
                        let msg = format!("cancel failed: {e}");
                        tracing::error!("{msg}");
                        answer(json!({"ok": false, "error": msg}));
                        if signal.is_cancelled() {
                            break ExitCode::FAILURE;
                        }
                    }
                }
            }
            "finish" => {
                let done = match restore.take() {
                    Some(h) => match h.await {
                        Ok(r) => r,
                        Err(e) => Err(format!("the restore task failed: {e}")),
                    },
                    None => {
                        let s = session_state
                            .restore_state
                            .lock()
                            .expect("state lock")
                            .clone();
                        if s == "restored" { Ok(()) } else { Err(s) }
                    }
                };
                if let Err(e) = done {
                    answer(
                        json!({"ok": false, "error": format!("cannot finish: the restore {e}; the VM still runs from the backup (cancel removes it)")}),
                    );
                    continue;
                }
                let changed: Vec<(Arc<dyn BlockSource>, ExtentMap)> = session_state
                    .overlays
                    .iter()
                    .map(|o| (o.clone() as Arc<dyn BlockSource>, o.written()))
                    .collect();
                let written: u64 = changed.iter().map(|(_, w)| w.total_len()).sum();
                match ir.instant_finish(&vm, &changed).await {
                    Ok(()) => {
                        answer(json!({"ok": true, "state": "finished", "vm": vm,
                            "guest_written_bytes": written,
                            "seconds": t0.elapsed().as_secs_f64()}));
                        break ExitCode::SUCCESS;
                    }
                    Err(e) => answer(json!({"ok": false, "error": format!("finish failed: {e}")})),
                }
            }
            other => answer(json!({"ok": false, "error": format!("unknown request `{other}`")})),
        }
    };
    accept.abort();
    let _ = std::fs::remove_file(&sock);
    stop_nbd.cancel();
    match tokio::time::timeout(std::time::Duration::from_secs(10), nbd).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the NBD exports ended with an error"),
        Err(_) => tracing::warn!("the NBD exports did not stop within 10 s"),
        _ => {}
    }
    Ok(code)
}

/// Accepts control connections: one JSON request line, one JSON answer line.
async fn serve_control(
    l: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::Sender<(String, tokio::sync::oneshot::Sender<Value>)>,
) {
    while let Ok((s, _)) = l.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let op = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v.get("op").and_then(Value::as_str).map(String::from))
                .unwrap_or_default();
            let (rtx, rrx) = tokio::sync::oneshot::channel();
            if tx.send((op, rtx)).await.is_err() {
                return;
            }
            if let Ok(v) = rrx.await {
                let _ = w.write_all(format!("{v}\n").as_bytes()).await;
            }
        });
    }
}

/// The control sockets of running sessions.
fn sessions(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".sock"))
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn ask(sock: &Path, op: &str) -> anyhow::Result<Value> {
    let s = tokio::net::UnixStream::connect(sock)
        .await
        .with_context(|| format!("no session answers at {}", sock.display()))?;
    let (r, mut w) = s.into_split();
    w.write_all(format!("{}\n", json!({ "op": op })).as_bytes())
        .await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    if line.is_empty() {
        bail!("the session ended without answering");
    }
    Ok(serde_json::from_str(&line)?)
}

async fn control(a: CtlArgs, op: &str) -> anyhow::Result<ExitCode> {
    let dir = run_dir();
    let all = sessions(&dir);
    let name = match (&a.session, all.as_slice()) {
        (Some(s), _) => session_name(s),
        (None, [one]) => one.clone(),
        (None, []) => {
            if op == "status" {
                if a.json {
                    println!("[]");
                } else {
                    eprintln!("no instant recovery is running");
                }
                return Ok(ExitCode::SUCCESS);
            }
            bail!("no instant recovery is running");
        }
        (None, many) => {
            if op == "status" {
                let mut out = Vec::new();
                for s in many {
                    out.push(ask(&dir.join(format!("{s}.sock")), "status").await?);
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(ExitCode::SUCCESS);
            }
            bail!(
                "{} sessions run ({}): name one",
                many.len(),
                many.join(", ")
            );
        }
    };
    let v = ask(&dir.join(format!("{name}.sock")), op).await?;
    if v.get("ok") == Some(&Value::Bool(false)) {
        bail!(
            "{}",
            v.get("error").and_then(Value::as_str).unwrap_or("failed")
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if op == "status" {
        let r = &v["restore"];
        println!(
            "{}: VM `{}` ({}) runs from restore point {}; restore {} ({} of {} read); guest wrote {}",
            name,
            v["vm"]["name"].as_str().unwrap_or(""),
            v["vm"]["id"].as_str().unwrap_or(""),
            v["snapshot"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            ferry_core::size::human_bytes(r["read_bytes"].as_u64().unwrap_or(0)),
            ferry_core::size::human_bytes(r["size"].as_u64().unwrap_or(0)),
            ferry_core::size::human_bytes(v["guest_written_bytes"].as_u64().unwrap_or(0)),
        );
    } else {
        println!("{name}: {}", v["state"].as_str().unwrap_or("done"));
    }
    Ok(ExitCode::SUCCESS)
}
