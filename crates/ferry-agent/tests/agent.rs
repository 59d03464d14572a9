//! `ferry-agent` against real NBD peers (libnbd's nbdinfo/nbdcopy, qemu-img) and our own client:
//! a qemu-img VHDX and a ferry-image AVHDX child exported by host path over mutual TLS,
//! refusals, a file changing under an export, and an agent killed mid-read.

use ferry_image::{ImageWriter, OutputFormat, WriterOptions};
use ferry_testkit::{PeerProcess, TlsFiles, qemu_img, qemu_img_compare, qemu_io, run_ok, tool};
use ferry_tls::ClientIdentity;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 48 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vms/base.vhdx` (qemu-img, three written ranges), `vms/child.avhdx` (ferry-image, over the
/// base) and their expected raw contents.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base_raw: Vec<u8>,
    child_raw: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = ferry_testkit::scratch_dir();
    let root = dir.path().join("vms");
    std::fs::create_dir(&root).unwrap();
    let base = root.join("base.vhdx");
    let base_raw = ferry_testkit::qemu_vhdx(
        &base,
        SIZE,
        &[
            "write -P 0xab 1M 3M",
            "write -P 0x5c 20M 512K",
            "write -P 0x11 47M 64K",
        ],
    );
    let mut child_raw = base_raw.clone();
    let opts = WriterOptions {
        block_size: None,
        parent: Some(base.clone()),
    };
    let mut w = ImageWriter::create_with(root.join("child.avhdx"), OutputFormat::Vhdx, SIZE, &opts)
        .unwrap();
    for (off, len, byte) in [(2u64 << 20, 8192usize, 0xC1u8), (30 << 20, 1 << 20, 0xC2)] {
        let data = vec![byte; len];
        w.write(off, &data).unwrap();
        child_raw[off as usize..off as usize + len].copy_from_slice(&data);
    }
    w.finish().unwrap();
    Fixture {
        _dir: dir,
        root,
        base_raw,
        child_raw,
    }
}

/// A running `ferry-agent` with the TLS files of its peers.
struct Agent {
    process: PeerProcess,
    port: u16,
    fingerprint: String,
    tls: TlsFiles,
    _logs: tempfile::TempDir,
}

fn start_agent(root: &Path, tls: TlsFiles) -> Agent {
    let logs = ferry_testkit::scratch_dir();
    let client_pem = std::fs::read_to_string(tls.dir().join("client-cert.pem")).unwrap();
    let pin = ferry_tls::certificate_fingerprint(&client_pem).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-agent"));
    cmd.args(["--listen", "127.0.0.1:0", "--root", s(root)])
        .arg("--map")
        .arg(format!("C:\\VMs={}", root.display()))
        .arg("--cert")
        .arg(tls.dir().join("server-cert.pem"))
        .arg("--key")
        .arg(tls.dir().join("server-key.pem"))
        .args(["--client-pin", &pin]);
    let mut process = PeerProcess::spawn("ferry-agent", cmd, &logs.path().join("agent.log"));
    process.wait_until("announcing itself", || {
        std::fs::read_to_string(logs.path().join("agent.log"))
            .is_ok_and(|l| l.contains("\"fingerprint\""))
    });
    let log = process.log();
    let line = log.lines().find(|l| l.starts_with('{')).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let port = v["listen"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    Agent {
        process,
        port,
        fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
        tls,
        _logs: logs,
    }
}

impl Agent {
    fn identity(&self) -> ClientIdentity {
        let read = |n: &str| std::fs::read_to_string(self.tls.dir().join(n)).unwrap();
        ClientIdentity {
            cert_pem: read("client-cert.pem"),
            key_pem: read("client-key.pem"),
        }
    }

    /// Opens `path` as the appliance would, with the pinned identity.
    async fn open(
        &self,
        path: &str,
    ) -> Result<std::sync::Arc<dyn ferry_core::BlockSource>, ferry_agent::AgentError> {
        ferry_agent::client::open(&self.addr(), &self.fingerprint, &self.identity(), path).await
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The libnbd URI of host path `name`, with the client certificate and the CA.
    fn uri(&self, name: &str) -> String {
        let path = name.replace('\\', "%5C");
        format!(
            "nbds://127.0.0.1:{}/{path}?tls-certificates={}",
            self.port,
            self.tls.dir().display()
        )
    }
}

async fn read_all(src: &dyn ferry_core::BlockSource) -> Vec<u8> {
    let mut out = vec![0u8; src.size() as usize];
    for (i, chunk) in out.chunks_mut(4 << 20).enumerate() {
        src.read_at(i as u64 * (4 << 20), chunk).await.unwrap();
    }
    out
}

#[test]
fn libnbd_reads_vhdx_and_avhdx_exports_by_host_path() {
    let fx = fixture();
    let agent = start_agent(&fx.root, TlsFiles::generate());
    let out = ferry_testkit::scratch_dir();

    // nbdinfo --map: data where qemu-io wrote, holes elsewhere.
    let map = run_ok(
        Command::new(tool("nbdinfo"))
            .arg("--map")
            .arg(agent.uri("C:\\VMs\\base.vhdx")),
    );
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let data: u64 = rows.iter().filter(|r| r.2 == 0).map(|r| r.1).sum();
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), SIZE, "{map}");
    assert!(
        ((3 << 20) + (512 << 10) + (64 << 10)..=8 << 20).contains(&data),
        "{map}"
    );
    for (off, len) in [
        (1u64 << 20, 3u64 << 20),
        (20 << 20, 512 << 10),
        (47 << 20, 64 << 10),
    ] {
        assert!(
            rows.iter()
                .any(|r| r.2 == 0 && r.0 <= off && off + len <= r.0 + r.1),
            "written range {off}+{len} is not data in\n{map}"
        );
    }

    // nbdcopy of both exports; qemu-img compares with the VHDX itself and the expected child.
    for (name, expect) in [
        ("C:\\VMs\\base.vhdx", &fx.base_raw),
        ("c:\\vms\\child.avhdx", &fx.child_raw),
    ] {
        let copy = out.path().join("copy.raw");
        run_ok(
            Command::new(tool("nbdcopy"))
                .arg(agent.uri(name))
                .arg(&copy),
        );
        let expected = out.path().join("expected.raw");
        std::fs::write(&expected, expect).unwrap();
        qemu_img_compare(&copy, "raw", &expected, "raw");
        if name.ends_with(".vhdx") {
            qemu_img_compare(&copy, "raw", &fx.root.join("base.vhdx"), "vhdx");
        }
    }
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_reads_the_chain_and_skips_holes() {
    let fx = fixture();
    let agent = start_agent(&fx.root, TlsFiles::generate());
    let src = agent.open("C:\\VMs\\child.avhdx").await.unwrap();
    assert_eq!(src.size(), SIZE);
    assert!(
        read_all(src.as_ref()).await == fx.child_raw,
        "child differs"
    );
    let alloc = src.allocated(0..SIZE).await.unwrap();
    let allocated: u64 = alloc.iter().map(|e| e.length).sum();
    assert!(
        allocated > 0 && allocated < SIZE / 4,
        "allocated {allocated} of {SIZE}"
    );
    // Everything outside the map reads as zeros.
    let mut pos = 0;
    for e in alloc.iter() {
        assert!(
            fx.child_raw[pos as usize..e.offset as usize]
                .iter()
                .all(|&b| b == 0)
        );
        pos = e.end();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_nbd_errors() {
    let fx = fixture();
    std::fs::write(fx.root.join("vm.xml"), b"<config/>").unwrap();
    // A child whose parent is gone.
    let orphan_dir = fx.root.join("orphan");
    std::fs::create_dir(&orphan_dir).unwrap();
    let base2 = orphan_dir.join("gone.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&base2), "16M"]);
    let opts = WriterOptions {
        block_size: None,
        parent: Some(base2.clone()),
    };
    ImageWriter::create_with(
        orphan_dir.join("orphan.avhdx"),
        OutputFormat::Vhdx,
        16 << 20,
        &opts,
    )
    .unwrap()
    .finish()
    .unwrap();
    std::fs::remove_file(&base2).unwrap();

    let agent = start_agent(&fx.root, TlsFiles::generate());
    let err = |r: Result<_, ferry_agent::AgentError>| match r {
        Ok(_) => panic!("opened"),
        Err(e) => format!("{e:#}"),
    };
    for (path, expect) in [
        ("C:\\Other\\x.vhdx", "outside the agent's roots"),
        ("/etc/passwd", "outside the agent's roots"),
        ("C:\\VMs\\..\\..\\etc\\passwd", "not a plain absolute path"),
        ("C:\\VMs\\missing.vhdx", "No such file"),
        ("C:\\VMs\\vm.xml", "not a VHDX or VHD image"),
        ("C:\\VMs\\orphan\\orphan.avhdx", "parent"),
    ] {
        let e = err(agent.open(path).await);
        assert!(e.contains(expect), "{path}: {e}");
    }

    // A client certificate that is not pinned never gets to NBD.
    let stranger = ferry_tls::SelfSigned::generate(&["appliance"])
        .unwrap()
        .identity();
    let e = err(ferry_agent::client::open(
        &agent.addr(),
        &agent.fingerprint,
        &stranger,
        "C:\\VMs\\base.vhdx",
    )
    .await);
    assert!(
        e.contains("refused this appliance's client certificate"),
        "{e}"
    );
    // The wrong agent pin: the appliance refuses the agent.
    let other = ferry_tls::SelfSigned::generate(&["x"])
        .unwrap()
        .fingerprint();
    let e = err(ferry_agent::client::open(
        &agent.addr(),
        &other,
        &agent.identity(),
        "C:\\VMs\\base.vhdx",
    )
    .await);
    assert!(e.contains("does not match the pinned"), "{e}");
    // libnbd without a client certificate is refused too.
    let no_cert = ferry_testkit::scratch_dir();
    std::fs::copy(
        agent.tls.dir().join("ca-cert.pem"),
        no_cert.path().join("ca-cert.pem"),
    )
    .unwrap();
    let uri = format!(
        "nbds://127.0.0.1:{}/C:%5CVMs%5Cbase.vhdx?tls-certificates={}",
        agent.port,
        no_cert.path().display()
    );
    let o = Command::new(tool("nbdinfo")).arg(&uri).output().unwrap();
    assert!(
        !o.status.success(),
        "nbdinfo without a client certificate succeeded"
    );
    // The agent survived all of it.
    let src = agent.open("C:\\VMs\\base.vhdx").await.unwrap();
    assert!(read_all(src.as_ref()).await == fx.base_raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_under_an_open_export_fails_reads() {
    let fx = fixture();
    let agent = start_agent(&fx.root, TlsFiles::generate());
    let src = agent.open("C:\\VMs\\child.avhdx").await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    src.read_at(1 << 20, &mut buf).await.unwrap();
    // The parent is written to (what a merge of checkpoints would do).
    qemu_io(&[
        "-f",
        "vhdx",
        "-c",
        "write -P 0x77 1M 64K",
        s(&fx.root.join("base.vhdx")),
    ]);
    let e = src
        .read_at(1 << 20, &mut buf)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("changed while it was exported"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_gives_the_client_a_clear_error() {
    let fx = fixture();
    let agent = start_agent(&fx.root, TlsFiles::generate());
    let src = agent.open("C:\\VMs\\base.vhdx").await.unwrap();
    let reader = {
        let src = src.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                src.read_at(off, &mut buf).await?;
                off = (off + (1 << 20)) % SIZE;
            }
            #[allow(unreachable_code)]
            Ok::<(), ferry_core::BlockError>(())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.process.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the client noticed the dead agent within a minute")
        .unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("127.0.0.1"), "the error names the agent: {e}");
}

#[test]
fn the_agent_refuses_to_start_without_a_pin_or_root() {
    let dir = ferry_testkit::scratch_dir();
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["--listen", "127.0.0.1:0", "--root", s(dir.path())])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no client certificate is pinned"));
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["--listen", "127.0.0.1:0", "--client-pin"])
        .arg("sha256:".to_string() + &"AB:".repeat(31) + "AB")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no root is configured"));
}
