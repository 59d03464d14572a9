//! NBD servers: qemu-nbd (images, dirty bitmaps, TLS) and nbdkit (plugins and filters).

use crate::process::{PeerProcess, tcp_ready, unix_ready};
use crate::{TlsFiles, free_port, scratch_dir, tool};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a server listens.
#[derive(Debug)]
enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// Builds the URI a client uses for an export on `listen`.
fn nbd_uri(listen: &Listen, export: &str, tls: bool) -> String {
    let scheme = if tls { "nbds" } else { "nbd" };
    match listen {
        Listen::Unix(p) => format!("{scheme}+unix:///{export}?socket={}", p.display()),
        Listen::Tcp(port) => format!("{scheme}://127.0.0.1:{port}/{export}"),
    }
}

fn start_server(
    name: &str,
    dir: &tempfile::TempDir,
    tcp: bool,
    mut build: impl FnMut(&Listen) -> Command,
) -> (PeerProcess, Listen) {
    // A free port can be taken between probing and binding; try a few.
    let mut last_log = String::new();
    for _ in 0..5 {
        let listen = if tcp {
            Listen::Tcp(free_port())
        } else {
            Listen::Unix(dir.path().join(format!("{name}.sock")))
        };
        let mut p = PeerProcess::spawn(
            name,
            build(&listen),
            &dir.path().join(format!("{name}.log")),
        );
        let ready = |p: &mut PeerProcess| {
            let start = std::time::Instant::now();
            while start.elapsed() < crate::process::START_TIMEOUT {
                let up = match &listen {
                    Listen::Unix(s) => unix_ready(s),
                    Listen::Tcp(port) => tcp_ready(*port),
                };
                if up {
                    return true;
                }
                if !p.is_running() {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            false
        };
        if ready(&mut p) {
            return (p, listen);
        }
        last_log = p.log();
        let in_use = last_log.contains("in use");
        drop(p);
        if !in_use {
            break;
        }
    }
    panic!("{name} did not start\n--- {name} log\n{last_log}");
}

/// Builder and guard for `qemu-nbd` serving one image.
#[derive(Debug)]
pub struct QemuNbd {
    image: PathBuf,
    format: String,
    read_only: bool,
    export: String,
    bitmaps: Vec<String>,
    allocation_depth: bool,
    tls_dir: Option<PathBuf>,
    tcp: bool,
    dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Serves `image` (format `raw` unless told otherwise) as export `disk0`, read-write, on a Unix socket.
    pub fn new(image: impl AsRef<Path>) -> Self {
        Self {
            image: image.as_ref().to_path_buf(),
            format: "raw".into(),
            read_only: false,
            export: "disk0".into(),
            bitmaps: Vec::new(),
            allocation_depth: false,
            tls_dir: None,
            tcp: false,
            dir: scratch_dir(),
        }
    }

    /// Image format (`raw`, `qcow2`, `vpc`, `vhdx`, `vmdk`).
    pub fn format(mut self, f: &str) -> Self {
        self.format = f.into();
        self
    }

    /// Serve read-only (`-r`).
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Export name (`-x`).
    pub fn export_name(mut self, name: &str) -> Self {
        self.export = name.into();
        self
    }

    /// Expose a dirty bitmap as `qemu:dirty-bitmap:NAME` (`-B`). May be called more than once.
    pub fn bitmap(mut self, name: &str) -> Self {
        self.bitmaps.push(name.into());
        self
    }

    /// Expose `qemu:allocation-depth` (`-A`).
    pub fn allocation_depth(mut self, on: bool) -> Self {
        self.allocation_depth = on;
        self
    }

    /// Require TLS with these certificates (client certificates are not required).
    pub fn tls(mut self, tls: &TlsFiles) -> Self {
        self.tls_dir = Some(tls.dir().to_path_buf());
        self
    }

    /// Listen on a loopback TCP port instead of a Unix socket.
    pub fn tcp(mut self, on: bool) -> Self {
        self.tcp = on;
        self
    }

    /// Starts qemu-nbd and waits until it accepts connections.
    pub fn start(self) -> NbdPeer {
        let qemu_nbd = tool("qemu-nbd");
        let this = &self;
        let running = start_server("qemu-nbd", &self.dir, self.tcp, |listen| {
            let mut c = Command::new(&qemu_nbd);
            c.arg("--persistent")
                .arg("--shared=0")
                .arg("--cache=writeback")
                .args(["--format", &this.format])
                .args(["--export-name", &this.export]);
            if this.read_only {
                c.arg("--read-only");
            }
            if this.allocation_depth {
                c.arg("--allocation-depth");
            }
            for b in &this.bitmaps {
                c.args(["--bitmap", b]);
            }
            if let Some(dir) = &this.tls_dir {
                c.arg("--object").arg(format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
                    dir.display()
                ));
                c.arg("--tls-creds=tls0");
            }
            match listen {
                Listen::Unix(p) => {
                    c.arg("--socket").arg(p);
                }
                Listen::Tcp(port) => {
                    c.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
                }
            }
            c.arg(&this.image);
            c
        });
        NbdPeer {
            export: self.export.clone(),
            tls: self.tls_dir.is_some(),
            process: running.0,
            listen: running.1,
            _dir: self.dir,
        }
    }
}

/// Builder and guard for `nbdkit` with one plugin and any filters.
#[derive(Debug)]
pub struct Nbdkit {
    plugin: String,
    args: Vec<String>,
    filters: Vec<String>,
    read_only: bool,
    export: String,
    tls_dir: Option<PathBuf>,
    tcp: bool,
    dir: tempfile::TempDir,
}

impl Nbdkit {
    /// nbdkit with `plugin` (e.g. `memory`, `file`, `pattern`, `sparse-random`), on a Unix socket.
    pub fn new(plugin: &str) -> Self {
        Self {
            plugin: plugin.into(),
            args: Vec::new(),
            filters: Vec::new(),
            read_only: false,
            export: String::new(),
            tls_dir: None,
            tcp: false,
            dir: scratch_dir(),
        }
    }

    /// A `key=value` parameter for the plugin or a filter (nbdkit takes them all after the plugin).
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds `--filter=NAME` (applied in the order given, outermost first).
    pub fn filter(mut self, name: &str) -> Self {
        self.filters.push(name.into());
        self
    }

    /// Serve read-only (`-r`).
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// The export name clients should ask for (nbdkit serves any name; this only shapes `uri()`).
    pub fn export_name(mut self, name: &str) -> Self {
        self.export = name.into();
        self
    }

    /// Require TLS with these certificates.
    pub fn tls(mut self, tls: &TlsFiles) -> Self {
        self.tls_dir = Some(tls.dir().to_path_buf());
        self
    }

    /// Listen on a loopback TCP port instead of a Unix socket.
    pub fn tcp(mut self, on: bool) -> Self {
        self.tcp = on;
        self
    }

    /// Starts nbdkit and waits until it accepts connections.
    pub fn start(self) -> NbdPeer {
        let nbdkit = tool("nbdkit");
        let this = &self;
        let running = start_server("nbdkit", &self.dir, self.tcp, |listen| {
            let mut c = Command::new(&nbdkit);
            c.arg("--foreground");
            if this.read_only {
                c.arg("--readonly");
            }
            for f in &this.filters {
                c.arg(format!("--filter={f}"));
            }
            if let Some(dir) = &this.tls_dir {
                c.arg("--tls=require")
                    .arg(format!("--tls-certificates={}", dir.display()));
            }
            match listen {
                Listen::Unix(p) => {
                    c.arg("--unix").arg(p);
                }
                Listen::Tcp(port) => {
                    c.args(["--ipaddr", "127.0.0.1", "--port", &port.to_string()]);
                }
            }
            c.arg(&this.plugin).args(&this.args);
            c
        });
        NbdPeer {
            export: self.export.clone(),
            tls: self.tls_dir.is_some(),
            process: running.0,
            listen: running.1,
            _dir: self.dir,
        }
    }
}

/// A running NBD server (qemu-nbd or nbdkit), killed on drop.
#[derive(Debug)]
pub struct NbdPeer {
    process: PeerProcess,
    listen: Listen,
    export: String,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl NbdPeer {
    /// The URI of the export: `nbd+unix:///EXPORT?socket=…`, `nbd://127.0.0.1:PORT/EXPORT`, or `nbds…` with TLS.
    pub fn uri(&self) -> String {
        nbd_uri(&self.listen, &self.export, self.tls)
    }

    /// The Unix socket, when not listening on TCP.
    pub fn unix_socket(&self) -> Option<&Path> {
        match &self.listen {
            Listen::Unix(p) => Some(p),
            Listen::Tcp(_) => None,
        }
    }

    /// The TCP port, when listening on TCP.
    pub fn tcp_port(&self) -> Option<u16> {
        match &self.listen {
            Listen::Tcp(p) => Some(*p),
            Listen::Unix(_) => None,
        }
    }

    /// The export name clients ask for.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
