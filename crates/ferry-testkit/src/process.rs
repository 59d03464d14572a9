//! A child process owned by a test: its own process group, output in a log file, killed and
//! reaped on drop, log shown when the test panics.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a peer may take to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running peer process.
#[derive(Debug)]
pub struct PeerProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl PeerProcess {
    /// Starts `cmd` in a new process group with stdout and stderr appended to `log`.
    ///
    /// # Panics
    /// When the program cannot be started.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let out = File::create(log).expect("create peer log");
        let err = out.try_clone().expect("clone peer log handle");
        let shown = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name} ({shown}): {e}; run tests/peers/install.sh")
            });
        std::fs::write(log.with_extension("cmd"), &shown).ok();
        Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    /// The peer's process id (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peer's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The peer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` until it returns true.
    ///
    /// # Panics
    /// When the peer exits first or does not become ready within [`START_TIMEOUT`], showing its log.
    pub fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before {what}\n--- {} log\n{}",
                    self.name,
                    self.name,
                    self.log()
                );
            }
            if start.elapsed() > START_TIMEOUT {
                panic!(
                    "{} did not become ready ({what}) within {START_TIMEOUT:?}\n--- {} log\n{}",
                    self.name,
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the peer has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "--- {} (pid {}) log, last {} lines of {}:",
                self.name,
                self.child.id(),
                tail.len(),
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let pgid = Pid::from_raw(self.child.id() as i32);
        // Ask nicely, then insist: peers like qemu-nbd flush and remove their sockets on SIGTERM.
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        // Reap stragglers of the group too (a peer that forked helpers).
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

/// True once something accepts TCP connections on `127.0.0.1:port`.
pub fn tcp_ready(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// True once something accepts connections on the Unix socket `path`.
pub fn unix_ready(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Sends one HTTP request with an empty body to `127.0.0.1:port` (no proxy) and returns the
/// status code; `None` when nothing answers. Runs its own runtime on a thread of its own, so
/// it can be called from sync and async tests alike.
pub fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).ok()?;
    let url = format!("http://127.0.0.1:{port}{path}");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let client = reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(10))
                .build()
                .ok()?;
            let r = client.request(method, url).send().await.ok()?;
            Some(r.status().as_u16())
        })
    })
    .join()
    .ok()?
}

/// A child the test started itself with piped stdio (a `ferry` simulator or service whose first
/// line it reads): killed and reaped on drop, so a failing test leaves no process behind.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Killed {
    /// Starts `cmd` with stdout piped and parses the JSON line it prints first (what
    /// `ferry sim xen|vmware` print: URL, login, pin); panics with the line if it is not JSON.
    pub fn spawn_json_line(cmd: &mut std::process::Command) -> (Self, serde_json::Value) {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let guard = Killed(child);
        let info = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{cmd:?} printed {line:?}, not JSON: {e}"));
        (guard, info)
    }
}
