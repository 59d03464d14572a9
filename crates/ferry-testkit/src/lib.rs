//! Real peers for Ferry's tests, started on demand and torn down on `Drop`.
//!
//! Every guard starts its peer on a private Unix socket or a free loopback port, waits until it
//! answers, exposes what a client needs (URI, endpoint, credentials), prints the peer's log when
//! the test panics, and kills the peer's whole process group when dropped.
//!
//! A peer that is not installed fails the test with a message naming `tests/peers/install.sh`;
//! nothing is ever skipped.
//!
//! ```no_run
//! let img = ferry_testkit::scratch_dir();
//! let path = img.path().join("d.qcow2");
//! ferry_testkit::qemu_img(&["create", "-f", "qcow2", path.to_str().unwrap(), "16M"]);
//! let nbd = ferry_testkit::QemuNbd::new(&path).format("qcow2").read_only(true).start();
//! println!("serving at {}", nbd.uri());
//! ```

mod azurite;
mod krb;
mod moto;
mod nbd;
mod process;
mod proxy;
mod tls;
mod vcsim;

pub use azurite::Azurite;
pub use krb::MitKdc;
pub use moto::Moto;
pub use nbd::{NbdPeer, Nbdkit, QemuNbd};
pub use process::{Killed, PeerProcess};
pub use proxy::ConnectProxy;
pub use tls::TlsFiles;
pub use vcsim::Vcsim;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `tests/peers/install.sh` put the venv and node peers: `$FERRY_PEERS_DIR` or `<repo>/.peers`.
pub fn peers_dir() -> PathBuf {
    std::env::var_os("FERRY_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.peers"))
}

/// The path of a peer program: the project's venv and node peers first, then `PATH`.
///
/// # Panics
/// When the program is not installed, with a message naming the installer.
pub fn tool(name: &str) -> PathBuf {
    let peers = peers_dir();
    let local = [
        peers.join("venv/bin").join(name),
        peers.join("node/node_modules/.bin").join(name),
        peers.join("bin").join(name),
    ];
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    local
        .into_iter()
        .chain(on_path)
        .find(|p| is_executable(p))
        .unwrap_or_else(|| panic!("peer `{name}` not found: run tests/peers/install.sh"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs a command to completion and returns its stdout.
///
/// # Panics
/// When it cannot start or exits non-zero, showing the command line, stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (run tests/peers/install.sh?)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "{shown} failed with {}\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// Runs `qemu-img ARGS`, returning stdout (panics with its output on failure).
pub fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new(tool("qemu-img")).args(args))
}

/// Panics unless `qemu-img compare` finds the two images' guest-visible contents identical
/// (formats named as qemu-img names them: `raw`, `vpc`, `vhdx`, `vmdk`, `qcow2`).
pub fn qemu_img_compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let (a, b) = (a.to_string_lossy(), b.to_string_lossy());
    qemu_img(&["compare", "-q", "-f", a_fmt, "-F", b_fmt, &a, &b]);
}

/// Runs `qemu-io ARGS`, returning stdout (panics with its output on failure).
///
/// qemu-io reports some failures on stdout with exit status 0, so output mentioning `failed` or
/// `error` also panics.
pub fn qemu_io(args: &[&str]) -> String {
    let out = run_ok(Command::new(tool("qemu-io")).args(args));
    let lower = out.to_ascii_lowercase();
    if lower.contains("failed") || lower.contains("error") {
        panic!("qemu-io {args:?} reported an error:\n{out}");
    }
    out
}

/// Makes a dynamic VHDX of `size` bytes at `path` with qemu-img (1 MiB blocks), applies the
/// qemu-io `writes` (`write -P 0xab 1M 3M`) and returns its content as qemu-img reads it.
pub fn qemu_vhdx(path: &Path, size: u64, writes: &[&str]) -> Vec<u8> {
    let p = path.to_string_lossy();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        &p,
        &size.to_string(),
    ]);
    for w in writes {
        qemu_io(&["-f", "vhdx", "-c", w, &p]);
    }
    let raw = path.with_extension("qemu.raw");
    qemu_img(&[
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        &p,
        &raw.to_string_lossy(),
    ]);
    let bytes = std::fs::read(&raw).expect("read qemu-img's raw conversion");
    let _ = std::fs::remove_file(&raw);
    bytes
}

/// A fresh temporary directory, removed on drop.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("create a temporary directory")
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// Runs `program` (a test's `env!("CARGO_BIN_EXE_…")`) with `args` and the extra variables `env`,
/// and prints the command line, stdout and stderr for the test's log. The test process's
/// `RUST_LOG` and `FERRY_PASSWORD` are not passed on: log volume and secrets are the test's
/// explicit choice.
pub fn run_logged(program: &str, args: &[&str], env: &[(String, String)]) -> std::process::Output {
    let mut cmd = Command::new(program);
    cmd.env_remove("RUST_LOG").env_remove("FERRY_PASSWORD");
    run_logged_with(cmd, args, env)
}

/// [`run_logged`] in an environment holding nothing but `env` and a `PATH`: for tests of what a
/// command does when nothing (no credentials, no `HOME` settings) is configured.
pub fn run_logged_env_clear(
    program: &str,
    args: &[&str],
    env: &[(String, String)],
) -> std::process::Output {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    run_logged_with(cmd, args, env)
}

fn run_logged_with(
    mut cmd: Command,
    args: &[&str],
    env: &[(String, String)],
) -> std::process::Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let name = Path::new(&program)
        .file_name()
        .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned());
    eprintln!(
        "$ {name} {}\n--- {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `len` deterministic pseudo-random bytes (xorshift from `seed`): incompressible, every chunk
/// distinct, no image signature anywhere.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
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

/// The small BIOS-bootable Linux disk the boot-verification and instant-recovery tests boot,
/// built by `script` (crates/ferry-cli/tests/make_boot_disk.sh) from the Debian kernel that
/// tests/peers/install.sh extracted, and cached under `$FERRY_PEERS_DIR/boot` by the script's
/// hash (an edited recipe rebuilds). With `writer`, the guest also loads its IDE driver and
/// writes `ferry-guest-write N` into sector 1024 of its disk once a second.
pub fn boot_disk(script: &Path, writer: bool) -> PathBuf {
    let dir = peers_dir().join("boot");
    let vmlinuz = dir.join("vmlinuz");
    let modules = dir.join("modules");
    for need in [&vmlinuz, &modules.join("order")] {
        assert!(
            need.exists(),
            "{} missing: run tests/peers/install.sh (it extracts the Debian kernel and its disk modules)",
            need.display()
        );
    }
    let recipe = std::fs::read(script).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let tag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        recipe.hash(&mut h);
        writer.hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let disk = dir.join(format!("ferry-boot-test-{tag}.raw"));
    // Tests of one binary run in threads of one process: build once.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !disk.exists() {
        let tmp = dir.join(format!("ferry-boot-test-{tag}.{}.tmp", std::process::id()));
        let mut cmd = Command::new("bash");
        cmd.arg(script).arg(&vmlinuz).arg(&tmp);
        if writer {
            cmd.arg(&modules);
        }
        run_ok(&mut cmd);
        std::fs::rename(&tmp, &disk).unwrap();
    }
    disk
}
