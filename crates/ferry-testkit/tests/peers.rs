//! Each peer is started and used for real, and leaves nothing behind.

use ferry_testkit::{
    Azurite, Moto, Nbdkit, QemuNbd, TlsFiles, qemu_img, qemu_io, run_ok, scratch_dir, tool,
};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};
use std::process::Command;

/// True while any process of group `pgid` exists.
fn group_alive(pgid: u32) -> bool {
    // kill(-pgid, 0) probes the whole group without signalling it.
    kill(Pid::from_raw(-(pgid as i32)), None).is_ok()
}

fn nbdinfo(args: &[&str]) -> String {
    run_ok(Command::new(tool("nbdinfo")).args(args))
}

#[test]
fn qemu_nbd_write_is_read_back_by_nbdcopy() {
    let dir = scratch_dir();
    let img = dir.path().join("d.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_img(&["create", "-f", "qcow2", img_s, "8M"]);
    let nbd = QemuNbd::new(&img).format("qcow2").start();
    let uri = nbd.uri();
    assert!(uri.starts_with("nbd+unix:///disk0?socket="), "{uri}");

    // Write through the NBD server with one independent client ...
    qemu_io(&["-f", "raw", "-c", "write -P 0xa5 1048576 512", &uri]);
    // ... and read back with another.
    let out = dir.path().join("out.raw");
    run_ok(Command::new(tool("nbdcopy")).arg(&uri).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    assert!(bytes[1048576..1048576 + 512].iter().all(|b| *b == 0xa5));
    assert!(bytes[..1048576].iter().all(|b| *b == 0));
    assert_eq!(bytes.iter().filter(|b| **b != 0).count(), 512);

    let info = nbdinfo(&["--size", &uri]);
    assert_eq!(info.trim(), (8u64 << 20).to_string());
}

#[test]
fn qemu_nbd_read_only_refuses_writes() {
    let dir = scratch_dir();
    let img = dir.path().join("d.raw");
    qemu_img(&["create", "-f", "raw", img.to_str().unwrap(), "1M"]);
    let nbd = QemuNbd::new(&img).read_only(true).tcp(true).start();
    assert!(nbd.uri().starts_with("nbd://127.0.0.1:"), "{}", nbd.uri());
    let info = nbdinfo(&["--json", &nbd.uri()]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let out = Command::new(tool("qemu-io"))
        .args(["-f", "raw", "-c", "write 0 512", &nbd.uri()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "write to a read-only export: {text}"
    );
}

#[test]
fn dirty_bitmap_is_visible_through_qemu_nbd() {
    let dir = scratch_dir();
    let img = dir.path().join("d.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_img(&["create", "-f", "qcow2", img_s, "16M"]);
    qemu_img(&["bitmap", "--add", "--granularity", "64k", img_s, "b0"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 4M 128k",
        "-c",
        "write 10M 4k",
        img_s,
    ]);
    let nbd = QemuNbd::new(&img)
        .format("qcow2")
        .read_only(true)
        .bitmap("b0")
        .start();

    let contexts = nbdinfo(&["--list", "--content", &nbd.uri()]);
    assert!(contexts.contains("qemu:dirty-bitmap:b0"), "{contexts}");
    let map = nbdinfo(&["--map=qemu:dirty-bitmap:b0", &nbd.uri()]);
    let dirty: Vec<(u64, u64)> = map
        .lines()
        .filter(|l| l.contains("dirty") && !l.contains("clean"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect();
    // The 4 KiB write is rounded up to the bitmap's 64 KiB granularity.
    assert_eq!(
        dirty,
        vec![(4 << 20, 128 << 10), (10 << 20, 64 << 10)],
        "{map}"
    );
}

#[test]
fn qemu_nbd_with_tls_serves_only_tls_clients() {
    let tls = TlsFiles::generate();
    assert!(tls.fingerprint_sha256().starts_with("sha256:"));
    assert_eq!(tls.fingerprint_sha256().len(), "sha256:".len() + 32 * 3 - 1);
    let dir = scratch_dir();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let nbd = QemuNbd::new(&img)
        .read_only(true)
        .tls(&tls)
        .tcp(true)
        .start();
    let uri = nbd.uri();
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");

    let with_ca = format!("{uri}?tls-certificates={}", tls.dir().display());
    let out = dir.path().join("out.raw");
    run_ok(Command::new(tool("nbdcopy")).arg(&with_ca).arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), vec![0x5au8; 1 << 20]);

    // Plain NBD to a TLS-only server is refused.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let st = Command::new(tool("nbdinfo")).arg(&plain).output().unwrap();
    assert!(!st.status.success(), "plain client accepted by TLS server");
    // A client trusting another CA is refused too.
    let other = TlsFiles::generate();
    let wrong = format!("{uri}?tls-certificates={}", other.dir().display());
    let st = Command::new(tool("nbdinfo")).arg(&wrong).output().unwrap();
    assert!(!st.status.success(), "client with the wrong CA accepted");
}

#[test]
fn nbdkit_plugins_and_filters() {
    let kit = Nbdkit::new("pattern")
        .arg("size=1M")
        .read_only(true)
        .start();
    let dir = scratch_dir();
    let out = dir.path().join("p.raw");
    run_ok(Command::new(tool("nbdcopy")).arg(kit.uri()).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    // The pattern plugin stores each 8-byte offset big-endian at that offset.
    assert_eq!(&bytes[8..16], &8u64.to_be_bytes());
    assert_eq!(&bytes[4096..4104], &4096u64.to_be_bytes());

    let slow = Nbdkit::new("memory")
        .arg("size=1M")
        .filter("delay")
        .arg("rdelay=20ms")
        .tcp(true)
        .start();
    let t = std::time::Instant::now();
    run_ok(
        Command::new(tool("nbdcopy"))
            .args([
                "--no-extents",
                "--connections=1",
                "--requests=1",
                "--request-size=262144",
            ])
            .arg(slow.uri())
            .arg("null:"),
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(4 * 20),
        "delay filter not applied"
    );

    let faulty = Nbdkit::new("memory")
        .arg("size=1M")
        .filter("error")
        .arg("error-rate=100%")
        .arg("error-pread-rate=100%")
        .start();
    let st = Command::new(tool("nbdcopy"))
        .arg(faulty.uri())
        .arg("null:")
        .output()
        .unwrap();
    assert!(!st.status.success(), "error filter did not fail the read");
}

async fn put_get(store: &dyn ObjectStore) {
    let path = ObjPath::from("testkit/hello.bin");
    let body = bytes::Bytes::from_static(b"ferry says hello");
    store
        .put(&path, PutPayload::from(body.clone()))
        .await
        .unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, body);
    let missing = store.get(&ObjPath::from("testkit/absent")).await;
    assert!(
        matches!(missing, Err(object_store::Error::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn moto_round_trips_an_object_through_object_store() {
    let s3 = Moto::start();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_bucket_name(s3.bucket())
        .with_region(s3.region())
        .with_access_key_id(s3.access_key_id())
        .with_secret_access_key(s3.secret_access_key())
        .build()
        .unwrap();
    put_get(&store).await;
    assert_hello_via_env(&s3.url(), s3.env()).await;
}

#[tokio::test]
async fn azurite_round_trips_an_object_through_object_store() {
    let az = Azurite::start();
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(az.account())
        .with_access_key(az.access_key())
        .with_container_name(az.container())
        .with_endpoint(az.endpoint())
        .with_allow_http(true)
        .build()
        .unwrap();
    put_get(&store).await;
    assert_hello_via_env(&az.url(), az.env()).await;
}

/// Opens the store from its URL and the guard's `env()` alone, as Ferry's users configure it, and
/// reads back the object `put_get` wrote.
async fn assert_hello_via_env(url: &str, env: Vec<(String, String)>) {
    let url = url::Url::parse(url).unwrap();
    let opts = env.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v));
    let (store, _) = object_store::parse_url_opts(&url, opts).unwrap();
    let got = store
        .get(&ObjPath::from("testkit/hello.bin"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], b"ferry says hello");
}

/// MIT's own client gets a ticket from the throwaway realm: a TGT for a user, a service ticket
/// whose key is the one `add_service` wrote into the keytab (`kvno` checks it), and a wrong
/// password is refused.
#[test]
fn mit_kdc_issues_tickets_to_kinit() {
    let kdc = ferry_testkit::MitKdc::start();
    kdc.add_user("carol", "Carol-pw-1");
    let kt = kdc.add_service("HTTP/127.0.0.1");
    let dir = scratch_dir();
    let mut env = kdc.env();
    env.push((
        "KRB5CCNAME".into(),
        format!("FILE:{}", dir.path().join("cc").display()),
    ));
    let kinit = |pw: &str| {
        use std::io::Write;
        let mut c = std::process::Command::new("kinit")
            .arg("carol")
            .envs(env.iter().cloned())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kinit (krb5-user): run tests/peers/install.sh");
        writeln!(c.stdin.take().unwrap(), "{pw}").unwrap();
        c.wait().unwrap().success()
    };
    assert!(!kinit("wrong"));
    assert!(kinit("Carol-pw-1"));
    let out = run_ok(
        std::process::Command::new("kvno")
            .arg("HTTP/127.0.0.1")
            .envs(env.iter().cloned()),
    );
    assert!(out.contains("kvno = 2"), "{out}");
    let out = run_ok(std::process::Command::new("klist").args(["-k"]).arg(&kt));
    assert!(out.contains("2 HTTP/127.0.0.1@FERRY.TEST"), "{out}");
    assert!(
        kdc.log()
            .contains("carol@FERRY.TEST for HTTP/127.0.0.1@FERRY.TEST")
    );
}

#[test]
fn every_guard_leaves_no_process_behind() {
    let dir = scratch_dir();
    let img = dir.path().join("d.raw");
    qemu_img(&["create", "-f", "raw", img.to_str().unwrap(), "1M"]);
    let tls = TlsFiles::generate();
    let pids = vec![
        ("qemu-nbd", {
            let g = QemuNbd::new(&img).start();
            let p = g.pid();
            assert!(group_alive(p));
            p
        }),
        ("qemu-nbd tls tcp", {
            let g = QemuNbd::new(&img).tls(&tls).tcp(true).start();
            let p = g.pid();
            assert!(group_alive(p));
            p
        }),
        ("nbdkit", {
            let g = Nbdkit::new("memory").arg("size=1M").tcp(true).start();
            let p = g.pid();
            assert!(group_alive(p));
            p
        }),
        ("moto", {
            let g = Moto::start();
            let p = g.pid();
            assert!(group_alive(p));
            p
        }),
        ("azurite", {
            let g = Azurite::start();
            let p = g.pid();
            assert!(group_alive(p));
            p
        }),
        ("krb5kdc", {
            let g = ferry_testkit::MitKdc::start();
            let p = g.pid();
            assert!(group_alive(p));
            p
        }),
    ];
    for (name, pid) in pids {
        assert!(
            !group_alive(pid),
            "{name} (pgid {pid}) still running after drop"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name} pid {pid} not reaped"
        );
    }
}

#[test]
#[should_panic(expected = "run tests/peers/install.sh")]
fn a_missing_peer_fails_naming_the_installer() {
    tool("ferry-no-such-peer");
}
