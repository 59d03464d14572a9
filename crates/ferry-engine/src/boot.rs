//! Boot verification (ADR 0076): a restore point's disk is exported over NBD with a
//! copy-on-write overlay (the repository never changes), booted in `qemu-system-x86_64` under
//! TCG, and watched: the serial console is matched against a heartbeat regex, a screenshot is
//! taken over QMP (`screendump`, PNG), and qemu and the export are always stopped.

use crate::error::{EngineError, Result};
use crate::export;
use ferry_repo::Repository;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Default heartbeat: a login prompt on the serial console (getty, a cloud image, busybox).
pub const DEFAULT_HEARTBEAT: &str = "login:";

/// How to boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// Give up (verdict `failed`) when no heartbeat appeared after this long.
    pub timeout: Duration,
    /// Regular expression matched against the serial console.
    pub heartbeat: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The emulator (`qemu-system-x86_64` on `PATH` by default).
    pub qemu: PathBuf,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            heartbeat: DEFAULT_HEARTBEAT.into(),
            memory_mib: 512,
            qemu: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

/// What a boot showed.
#[derive(Clone, Debug)]
pub struct BootOutcome {
    /// The heartbeat appeared.
    pub ok: bool,
    /// Seconds from power-on to the heartbeat.
    pub seconds_to_heartbeat: Option<f64>,
    /// Seconds the whole verification took.
    pub seconds: f64,
    /// What matched, or why it failed.
    pub reason: String,
    /// The last 4 KiB of the serial console.
    pub console_tail: String,
    /// The screenshot (PNG), if qemu could take one.
    pub screenshot: Option<Vec<u8>>,
    /// `qemu-system-x86_64 7.2.22 (TCG)`.
    pub emulator: String,
}

/// QMP messages (sans-I/O): one JSON object per line.
pub mod qmp {
    /// One message from qemu.
    #[derive(Debug, PartialEq)]
    pub enum Message {
        /// The greeting sent on connect.
        Greeting,
        /// A command's successful result.
        Return(serde_json::Value),
        /// A command's failure: `class` and `desc`.
        Error(String, String),
        /// An asynchronous event (name).
        Event(String),
    }

    /// Parses one line; `Err` names what is wrong.
    pub fn parse(line: &[u8]) -> Result<Message, String> {
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
        let o = v.as_object().ok_or("not a JSON object")?;
        if o.contains_key("QMP") {
            return Ok(Message::Greeting);
        }
        if let Some(r) = o.get("return") {
            return Ok(Message::Return(r.clone()));
        }
        if let Some(e) = o.get("error") {
            let s = |k: &str| e.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
            return Ok(Message::Error(s("class"), s("desc")));
        }
        if let Some(ev) = o.get("event").and_then(|e| e.as_str()) {
            return Ok(Message::Event(ev.to_string()));
        }
        Err("neither greeting, return, error nor event".into())
    }

    /// A command line to send.
    pub fn command(name: &str, arguments: Option<serde_json::Value>) -> Vec<u8> {
        let mut v = serde_json::json!({ "execute": name });
        if let Some(a) = arguments {
            v["arguments"] = a;
        }
        let mut out = serde_json::to_vec(&v).expect("JSON");
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path, deadline: Instant) -> std::io::Result<Self> {
        let stream = loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut q = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        match q.read().await? {
            qmp::Message::Greeting => {}
            other => {
                return Err(std::io::Error::other(format!(
                    "QMP greeting expected, got {other:?}"
                )));
            }
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read(&mut self) -> std::io::Result<qmp::Message> {
        let mut line = Vec::new();
        let n = self.reader.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "qemu closed the QMP socket",
            ));
        }
        qmp::parse(&line).map_err(std::io::Error::other)
    }

    /// Runs a command; events in between are skipped.
    async fn execute(
        &mut self,
        name: &str,
        args: Option<serde_json::Value>,
    ) -> std::io::Result<serde_json::Value> {
        self.writer.write_all(&qmp::command(name, args)).await?;
        loop {
            match self.read().await? {
                qmp::Message::Return(v) => return Ok(v),
                qmp::Message::Error(class, desc) => {
                    return Err(std::io::Error::other(format!(
                        "QMP {name}: {class}: {desc}"
                    )));
                }
                qmp::Message::Event(_) | qmp::Message::Greeting => {}
            }
        }
    }
}

/// The last `max` bytes of the console, printable.
fn tail(console: &[u8], max: usize) -> String {
    let start = console.len().saturating_sub(max);
    String::from_utf8_lossy(&console[start..])
        .chars()
        .filter(|c| *c == '\n' || *c == '\t' || !c.is_control())
        .collect()
}

async fn emulator_version(qemu: &Path) -> Result<String> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            EngineError::Usage(format!(
                "cannot run {}: {e} (install qemu-system-x86)",
                qemu.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("qemu").trim();
    let version = first
        .strip_prefix("QEMU emulator version ")
        .map(|v| v.split_whitespace().next().unwrap_or(v))
        .unwrap_or(first);
    let name = qemu
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "qemu".into());
    Ok(format!("{name} {version} (TCG)"))
}

/// Boots `disk` of restore point `snapshot` and waits for the heartbeat. Errors are setup
/// failures (no qemu, bad regex, unknown disk); a guest that does not boot is an `Ok` outcome
/// with `ok == false`. qemu and the export are stopped on every path.
pub async fn verify_boot(
    repo: &Repository,
    snapshot: &str,
    disk: &str,
    opts: &BootOptions,
) -> Result<BootOutcome> {
    let heartbeat = regex::Regex::new(&opts.heartbeat)
        .map_err(|e| EngineError::Usage(format!("--heartbeat `{}`: {e}", opts.heartbeat)))?;
    let emulator = emulator_version(&opts.qemu).await?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-boot-")
        .tempdir()
        .map_err(|e| EngineError::Usage(format!("cannot create a scratch directory: {e}")))?;
    let nbd_sock = dir.path().join("nbd.sock");
    let listener = export::bind(&format!("unix:{}", nbd_sock.display())).await?;
    let uri = listener.uri(disk);
    // Opening the disk first turns an unknown disk into an error before qemu starts.
    repo.open_disk(snapshot, disk)
        .await
        .map_err(|e| EngineError::repo(disk, e))?;
    let stop = CancellationToken::new();
    let server = {
        let (repo, snapshot, disk, stop) = (
            repo.clone(),
            snapshot.to_string(),
            disk.to_string(),
            stop.clone(),
        );
        tokio::spawn(
            async move { export::serve(&repo, &snapshot, &disk, true, listener, stop).await },
        )
    };
    let started = Instant::now();
    let res = run_qemu(dir.path(), &uri, &heartbeat, opts, started).await;
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the NBD export ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the NBD export task failed"),
        Err(_) => tracing::warn!("the NBD export did not stop within 10 s"),
        Ok(Ok(Ok(()))) => {}
    }
    let mut outcome = res?;
    outcome.emulator = emulator;
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

async fn run_qemu(
    dir: &Path,
    uri: &str,
    heartbeat: &regex::Regex,
    opts: &BootOptions,
    started: Instant,
) -> Result<BootOutcome> {
    let console = dir.join("console.log");
    let qmp_sock = dir.join("qmp.sock");
    let log = std::fs::File::create(dir.join("qemu.log"))
        .map_err(|e| EngineError::Usage(format!("cannot create the qemu log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| EngineError::Usage(format!("cannot create the qemu log: {e}")))?;
    let guest = ferry_core::qemu::QemuGuest {
        qemu: opts.qemu.clone(),
        memory_mib: opts.memory_mib,
        drive: uri.to_string(),
        console: console.clone(),
        qmp: qmp_sock.clone(),
    };
    let mut cmd = tokio::process::Command::from(guest.command());
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(true);
    tracing::info!(%uri, "booting in qemu (TCG)");
    let mut child = cmd
        .spawn()
        .map_err(|e| EngineError::Usage(format!("cannot start {}: {e}", opts.qemu.display())))?;
    let res = watch(
        dir, &mut child, &console, &qmp_sock, heartbeat, opts, started,
    )
    .await;
    // Always: ask nicely, then make sure.
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.start_kill();
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(Ok(status)) => tracing::debug!(%status, "qemu stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "waiting for qemu failed"),
        Err(_) => tracing::warn!("qemu did not stop within 10 s of SIGKILL"),
    }
    res
}

async fn watch(
    dir: &Path,
    child: &mut tokio::process::Child,
    console: &Path,
    qmp_sock: &Path,
    heartbeat: &regex::Regex,
    opts: &BootOptions,
    started: Instant,
) -> Result<BootOutcome> {
    let mut q = match Qmp::connect(qmp_sock, started + Duration::from_secs(20)).await {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::warn!(error = %e, "no QMP connection: no screenshot");
            None
        }
    };
    let deadline = started + opts.timeout;
    let mut outcome = BootOutcome {
        ok: false,
        seconds_to_heartbeat: None,
        seconds: 0.0,
        reason: String::new(),
        console_tail: String::new(),
        screenshot: None,
        emulator: String::new(),
    };
    let mut text = Vec::new();
    loop {
        text = std::fs::read(console).unwrap_or(text);
        let lossy = String::from_utf8_lossy(&text);
        if let Some(m) = heartbeat.find(&lossy) {
            outcome.ok = true;
            outcome.seconds_to_heartbeat = Some(started.elapsed().as_secs_f64());
            outcome.reason = format!("heartbeat `{}` seen on the serial console", m.as_str());
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read(dir.join("qemu.log")).unwrap_or_default();
            outcome.reason = format!(
                "qemu exited ({status}) before the heartbeat: {}",
                tail(&log, 500).trim()
            );
            q = None;
            break;
        }
        if Instant::now() >= deadline {
            outcome.reason = format!(
                "no heartbeat matching `{}` on the serial console within {} s",
                heartbeat.as_str(),
                opts.timeout.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(q) = q.as_mut() {
        let png = dir.join("screen.png");
        let args = serde_json::json!({ "filename": png.display().to_string(), "format": "png" });
        match tokio::time::timeout(Duration::from_secs(20), q.execute("screendump", Some(args)))
            .await
        {
            Ok(Ok(_)) => match std::fs::read(&png) {
                Ok(b) if b.starts_with(b"\x89PNG\r\n\x1a\n") => outcome.screenshot = Some(b),
                Ok(_) => tracing::warn!("qemu's screendump is not a PNG"),
                Err(e) => tracing::warn!(error = %e, "cannot read qemu's screendump"),
            },
            Ok(Err(e)) => tracing::warn!(error = %e, "screendump failed"),
            Err(_) => tracing::warn!("screendump timed out"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), q.execute("quit", None)).await;
    }
    let text = std::fs::read(console).unwrap_or(text);
    outcome.console_tail = tail(&text, 4096);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::qmp::*;

    #[test]
    fn qmp_messages() {
        assert_eq!(
            parse(br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": []}}"#),
            Ok(Message::Greeting)
        );
        assert_eq!(
            parse(b"{\"return\": {}}\r\n"),
            Ok(Message::Return(serde_json::json!({})))
        );
        assert_eq!(
            parse(br#"{"error": {"class": "GenericError", "desc": "no"}}"#),
            Ok(Message::Error("GenericError".into(), "no".into()))
        );
        assert_eq!(
            parse(br#"{"timestamp": {"seconds": 1}, "event": "STOP"}"#),
            Ok(Message::Event("STOP".into()))
        );
        assert!(parse(b"[1]").is_err());
        assert!(parse(b"{\"x\":1}").is_err());
        assert!(parse(b"\xff").is_err());
        assert_eq!(command("quit", None), b"{\"execute\":\"quit\"}\r\n");
    }

    #[test]
    fn tail_keeps_the_end_and_drops_control_characters() {
        assert_eq!(super::tail(b"abc\x1b[0mdef\n", 100), "abc[0mdef\n");
        assert_eq!(super::tail(b"0123456789", 3), "789");
    }
}
