//! Restore exports of `ferry-agent` (ADR 0169) against real peers: libnbd's nbdcopy writes a
//! disk into a `create` export over mutual TLS (four connections, one staged disk), the commit
//! makes it a VHDX that `qemu-img info`/`compare` accept; our own client does the same; every
//! refusal (outside the restore roots, `..`, an existing file or folder, a folder no restore
//! made) is clear and creates nothing; a cut connection or a SIGKILLed agent leaves no file,
//! and `delete` removes only what restores made.

use ferry_agent::restore::{MARKER, RestoreRequest};
use ferry_agent::restore_client::RestoreClient;
use ferry_testkit::{PeerProcess, TlsFiles, qemu_img, qemu_img_compare, run_ok, tool};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 32 << 20;

/// A running agent whose restore root is `<root>/restores` (host path `C:\VMs\restores`).
struct Agent {
    process: PeerProcess,
    port: u16,
    fingerprint: String,
    tls: TlsFiles,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(dir: tempfile::TempDir, tls: TlsFiles) -> Agent {
    let root = dir.path().join("vms");
    std::fs::create_dir_all(root.join("restores")).unwrap();
    std::fs::create_dir_all(root.join("other")).unwrap();
    let pin = ferry_tls::certificate_fingerprint(
        &std::fs::read_to_string(tls.dir().join("client-cert.pem")).unwrap(),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-agent"));
    cmd.args(["--listen", "127.0.0.1:0", "--root"])
        .arg(&root)
        .arg("--restore-root")
        .arg(root.join("restores"))
        .arg("--map")
        .arg(format!("C:\\VMs={}", root.display()))
        .arg("--cert")
        .arg(tls.dir().join("server-cert.pem"))
        .arg("--key")
        .arg(tls.dir().join("server-key.pem"))
        .args(["--client-pin", &pin]);
    let log = dir.path().join(format!("agent-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut process = PeerProcess::spawn("ferry-agent", cmd, &log);
    process.wait_until("announcing itself", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"fingerprint\""))
    });
    let text = process.log();
    let v: serde_json::Value =
        serde_json::from_str(text.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let port = v["listen"].as_str().unwrap().rsplit_once(':').unwrap().1;
    Agent {
        port: port.parse().unwrap(),
        fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
        process,
        tls,
        root,
        _dir: dir,
    }
}

impl Agent {
    fn client(&self) -> RestoreClient {
        let read = |n: &str| std::fs::read_to_string(self.tls.dir().join(n)).unwrap();
        RestoreClient::new(
            format!("127.0.0.1:{}", self.port),
            self.fingerprint.clone(),
            ferry_tls::ClientIdentity {
                cert_pem: read("client-cert.pem"),
                key_pem: read("client-key.pem"),
            },
        )
    }

    /// The libnbd URI of export `name`, with the client certificate and the CA.
    fn uri(&self, name: &str) -> String {
        let enc: String = name
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(
            "nbds://127.0.0.1:{}/{enc}?tls-certificates={}",
            self.port,
            self.tls.dir().display()
        )
    }

    fn local(&self, rest: &str) -> PathBuf {
        self.root.join("restores").join(rest)
    }
}

/// A raw disk with three written ranges, and its bytes.
fn raw_disk(path: &Path) -> Vec<u8> {
    let mut data = vec![0u8; SIZE as usize];
    for (off, len, byte) in [
        (0usize, 4096usize, 0xEBu8),
        (3 << 20, 2 << 20, 0x5A),
        ((SIZE - (64 << 10)) as usize, 64 << 10, 0x11),
    ] {
        data[off..off + len].fill(byte);
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_the_client_write_restore_exports_that_become_vhdx_files() {
    let agent = start(ferry_testkit::scratch_dir(), TlsFiles::generate());
    let c = agent.client();
    let scratch = ferry_testkit::scratch_dir();
    let raw = scratch.path().join("disk.raw");
    raw_disk(&raw);

    c.mkdir("C:\\VMs\\restores\\vm1").await.unwrap();
    assert_eq!(files(&agent.local("vm1")), [MARKER]);
    // nbdcopy (several connections, one staged disk) into a create export, then the commit.
    let path = "C:\\VMs\\restores\\vm1\\disk0.vhdx";
    let name = RestoreRequest::Create {
        size: SIZE,
        path: path.into(),
    }
    .export_name();
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg("--connections=4")
            .arg(&raw)
            .arg(agent.uri(&name)),
    );
    assert!(
        !agent.local("vm1/disk0.vhdx").exists(),
        "no file before the commit"
    );
    c.commit(path, SIZE).await.unwrap();
    let file = agent.local("vm1/disk0.vhdx");
    let info = qemu_img(&["info", "--output=json", file.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "vhdx", "{info}");
    assert_eq!(info["virtual-size"], SIZE, "{info}");
    qemu_img_compare(&file, "vhdx", &raw, "raw");

    // Our own client: the same bytes from a file source.
    let src = ferry_image::FileSource::open(&raw).unwrap();
    let sent = c
        .write_vhdx("C:\\VMs\\restores\\vm1\\disk1.vhdx", &src)
        .await
        .unwrap();
    assert!(((2 << 20) + 4096..8 << 20).contains(&sent), "{sent}");
    qemu_img_compare(&agent.local("vm1/disk1.vhdx"), "vhdx", &raw, "raw");

    // Refusals: each says why and leaves nothing new.
    let before = files(&agent.local("vm1"));
    for (folder_or_file, why) in [
        (
            "C:\\VMs\\other\\x.vhdx",
            "outside the agent's restore roots",
        ),
        (
            "C:\\VMs\\restores\\vm1\\..\\..\\other\\x.vhdx",
            "not a plain absolute path",
        ),
        ("D:\\x\\x.vhdx", "outside the agent's roots"),
        ("C:\\VMs\\restores\\vm1\\disk0.vhdx", "already exists"),
        ("C:\\VMs\\restores\\vm1\\notes.txt", "ending in .vhdx"),
        ("C:\\VMs\\restores\\nofolder\\x.vhdx", "does not exist"),
    ] {
        let e = c
            .write_vhdx(folder_or_file, &src)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{folder_or_file}: {e}");
        assert!(e.contains("refused `create"), "{e}");
    }
    assert_eq!(files(&agent.local("vm1")), before);
    assert!(files(&agent.root.join("other")).is_empty());
    let e = c.mkdir("C:\\VMs\\restores\\vm1").await.unwrap_err();
    assert!(e.already_exists(), "{e}");
    let e = c
        .mkdir("C:\\VMs\\other\\new")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the agent's restore roots"), "{e}");
    assert!(!agent.root.join("other/new").exists());
    let e = c
        .commit("C:\\VMs\\restores\\vm1\\disk9.vhdx", SIZE)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no disk is being written"), "{e}");
    // A folder no restore made is never deleted; a restore's goes with what it holds.
    std::fs::create_dir(agent.local("manual")).unwrap();
    std::fs::write(agent.local("manual/keep.vhdx"), b"x").unwrap();
    let e = c.delete("C:\\VMs\\restores\\manual").await.unwrap_err();
    assert!(e.to_string().contains("was not made by a restore"), "{e}");
    assert!(agent.local("manual/keep.vhdx").exists());
    let e = c.delete("C:\\VMs\\restores").await.unwrap_err();
    assert!(e.to_string().contains("not made by a restore"), "{e}");
    c.delete("C:\\VMs\\restores\\vm1").await.unwrap();
    assert!(!agent.local("vm1").exists());
    // Gone already: success (a cleanup that runs twice).
    c.delete("C:\\VMs\\restores\\vm1").await.unwrap();
    // A wrong pin: a TLS error, nothing made.
    let wrong = RestoreClient::new(
        format!("127.0.0.1:{}", agent.port),
        format!("sha256:{}", "AB".repeat(32)),
        ferry_tls::ClientIdentity {
            cert_pem: std::fs::read_to_string(agent.tls.dir().join("client-cert.pem")).unwrap(),
            key_pem: std::fs::read_to_string(agent.tls.dir().join("client-key.pem")).unwrap(),
        },
    );
    let e = wrong.mkdir("C:\\VMs\\restores\\vm2").await.unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(!agent.local("vm2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_or_a_killed_agent_leaves_no_file() {
    let dir = ferry_testkit::scratch_dir();
    let tls = TlsFiles::generate();
    let keep = tempfile::Builder::new().tempdir_in(dir.path()).unwrap();
    let agent = start(dir, tls);
    let c = agent.client();
    c.mkdir("C:\\VMs\\restores\\vm").await.unwrap();
    let path = "C:\\VMs\\restores\\vm\\d.vhdx";
    // A writer that goes away without the commit: no file, and a new writer starts over.
    let cfg = ferry_agent::client::config(
        &format!("127.0.0.1:{}", agent.port),
        &agent.fingerprint,
        &agent_identity(&agent),
        &RestoreRequest::Create {
            size: SIZE,
            path: path.into(),
        }
        .export_name(),
    )
    .unwrap();
    let nbd = ferry_nbd::NbdClient::connect(cfg.clone()).await.unwrap();
    nbd.write(1 << 20, &vec![0x77; 1 << 20]).await.unwrap();
    drop(nbd);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(files(&agent.local("vm")), [MARKER]);
    let zeros = ferry_core::MemSource::new("z", vec![0u8; SIZE as usize], 65536);
    c.write_vhdx(path, &zeros).await.unwrap();
    let out = agent.local("vm/d.vhdx");
    let empty = keep.path().join("empty.raw");
    std::fs::File::create(&empty)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    qemu_img_compare(&out, "vhdx", &empty, "raw");

    // SIGKILL while a disk is written: the staged bytes vanish with the agent.
    let nbd = ferry_nbd::NbdClient::connect(
        ferry_agent::client::config(
            &format!("127.0.0.1:{}", agent.port),
            &agent.fingerprint,
            &agent_identity(&agent),
            &RestoreRequest::Create {
                size: SIZE,
                path: "C:\\VMs\\restores\\vm\\e.vhdx".into(),
            }
            .export_name(),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    nbd.write(0, &vec![0x42; 4 << 20]).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.process.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(nbd.write(8 << 20, &vec![0x42; 1 << 20]).await.is_err());
    assert_eq!(files(&agent.local("vm")), ["d.vhdx", MARKER]);
    assert!(
        std::fs::read_to_string(agent.local(&format!("vm/{MARKER}")))
            .unwrap()
            .contains("e.vhdx"),
        "the marker lists what a restore started"
    );
    // Restarted: the delete removes the folder of the killed restore.
    let Agent {
        process, tls, _dir, ..
    } = agent;
    drop(process);
    let again = start(_dir, tls);
    again
        .client()
        .delete("C:\\VMs\\restores\\vm")
        .await
        .unwrap();
    assert!(!again.local("vm").exists());
}

fn agent_identity(a: &Agent) -> ferry_tls::ClientIdentity {
    let read = |n: &str| std::fs::read_to_string(a.tls.dir().join(n)).unwrap();
    ferry_tls::ClientIdentity {
        cert_pem: read("client-cert.pem"),
        key_pem: read("client-key.pem"),
    }
}

#[test]
fn restore_requests_are_a_parser_that_never_panics() {
    // The seed of the fuzz target: odd names parse to an error or a request that round-trips.
    for name in [
        "ferry-restore:1:",
        "ferry-restore:1::",
        "ferry-restore:1:create:vhdx::",
        "ferry-restore:1:create:vhdx:512:",
        "ferry-restore:1:create:vhdx:512:C:\\a:b",
        "ferry-restore:1:delete:\u{0}",
        "ferry-restore:1:mkdir:C:\\\u{e9}t\u{e9}",
    ] {
        if let Some(Ok(r)) = RestoreRequest::parse(name) {
            assert_eq!(r.export_name(), name);
        }
    }
}

/// `update:vhdx` (ADR 0176): writes into an existing VHDX are staged and the commit writes the
/// touched VHDX blocks in place (`qemu-img check` and `compare` against the expected raw); a
/// missing file, one outside the restore roots or not a VHDX is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_exports_write_whole_blocks_into_an_existing_vhdx_at_commit() {
    let agent = start(ferry_testkit::scratch_dir(), TlsFiles::generate());
    let c = agent.client();
    let scratch = ferry_testkit::scratch_dir();
    let raw = scratch.path().join("disk.raw");
    let mut want = raw_disk(&raw);
    c.mkdir("C:\\VMs\\restores\\vm3").await.unwrap();
    let src = ferry_image::open_image(&raw).await.unwrap().source;
    let path = "C:\\VMs\\restores\\vm3\\disk0.vhdx";
    c.write_vhdx(path, src.as_ref()).await.unwrap();
    let file = agent.local("vm3/disk0.vhdx");
    // New content for two ranges; only they are sent.
    for (off, len, byte) in [(5usize << 20, 8192usize, 0x77u8), (0, 512, 0)] {
        want[off..off + len].fill(byte);
    }
    std::fs::write(&raw, &want).unwrap();
    let src = ferry_image::open_image(&raw).await.unwrap().source;
    let mut ext = ferry_core::ExtentMap::new();
    ext.insert((5 << 20)..(5 << 20) + 8192);
    ext.insert(0..512);
    let before = std::fs::read(&file).unwrap();
    let sent = c.update_vhdx(path, src.as_ref(), &ext).await.unwrap();
    assert_eq!(sent, 8192, "the zeroed piece is sent as WRITE_ZEROES");
    assert_ne!(std::fs::read(&file).unwrap(), before);
    qemu_img(&["check", "-f", "vhdx", file.to_str().unwrap()]);
    qemu_img_compare(&raw, "raw", &file, "vhdx");
    for (p, why) in [
        (
            "C:\\VMs\\restores\\vm3\\none.vhdx",
            "an update writes into an existing disk",
        ),
        (
            "C:\\VMs\\other\\x.vhdx",
            "outside the agent's restore roots",
        ),
        ("C:\\VMs\\restores\\vm3\\notes.txt", "ending in .vhdx"),
    ] {
        let e = c
            .update_vhdx(p, src.as_ref(), &ext)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{p}: {e}");
    }
    c.delete("C:\\VMs\\restores\\vm3").await.unwrap();
    assert!(!agent.local("vm3").exists());
}
