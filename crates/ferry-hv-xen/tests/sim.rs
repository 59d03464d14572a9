//! The Xen driver against the XenAPI simulator: full and incremental backups in each transport
//! mode checked against `qemu-img` reading the simulator's VHDs, leftovers after success,
//! failure and a simulated crash, CBT reset, missing NBD network, and whole-VM restore.

use ferry_core::block::read_all;
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::{
    BackupOptions, ChangeTokens, Changed, FerryConfig, HvError, HypervisorDriver, Outcome,
    RestoreDisk, RestorePlan, SourceConfig, TransportMode,
};
use ferry_hv_xen::XenDriver;
use ferry_sim::xen::{Value, XenSim, XenSimConfig};
use std::path::Path;
use std::sync::Arc;

struct Lab {
    sim: XenSim,
    _dir: tempfile::TempDir,
    state: tempfile::TempDir,
}

async fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenSimConfig::new(dir.path().join("sim"));
    cfg.disk_mib = 8;
    Lab {
        sim: XenSim::start(cfg).await.unwrap(),
        _dir: dir,
        state: tempfile::tempdir().unwrap(),
    }
}

impl Lab {
    async fn source(&self, transports: &[&str]) -> SourceConfig {
        let pw = self.state.path().join("pw");
        std::fs::write(&pw, format!("{}\n", self.sim.password())).unwrap();
        let mut san = String::new();
        for sr in self.sim.all("SR").await.unwrap() {
            let uuid = self.sim.field("SR", &sr, "uuid").await.unwrap();
            san.push_str(&format!(
                "\"{uuid}\" = \"{}\"\n",
                self.sim.dir().join(&uuid).display()
            ));
        }
        let t: Vec<String> = transports.iter().map(|t| format!("\"{t}\"")).collect();
        let text = format!(
            "[sources.lab]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"root\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\ntransports = [{}]\nproxy-vm = \"ferry-proxy\"\nhotadd-device-dir = \"{}\"\nstate-dir = \"{}\"\n[sources.lab.san-paths]\n{san}",
            self.sim.url(),
            pw.display(),
            self.sim.tls_fingerprint(),
            t.join(", "),
            self.sim.dir().join("dev").display(),
            self.state.path().display()
        );
        FerryConfig::parse(&text, Path::new("test.toml"))
            .unwrap()
            .source("lab")
            .unwrap()
            .clone()
    }

    async fn driver(&self, transports: &[&str]) -> XenDriver {
        XenDriver::connect("lab", &self.source(transports).await)
            .await
            .unwrap()
    }

    /// Asserts nothing but CBT anchors is left: no snapshot VM, no VBD on the proxy, no task.
    async fn assert_clean(&self, vm_name: &str, anchors: usize) {
        let s = &self.sim;
        let vm = s.vm(vm_name).await.unwrap();
        let snaps = s
            .call(
                "VM.get_snapshots",
                vec![Value::s(s.login().await.unwrap()), Value::s(&vm)],
            )
            .await
            .unwrap();
        assert_eq!(snaps, Value::Array(vec![]), "snapshot VMs left");
        let proxy = s.vm("ferry-proxy").await.unwrap();
        let sess = s.login().await.unwrap();
        let vbds = s
            .call("VM.get_VBDs", vec![Value::s(&sess), Value::s(&proxy)])
            .await
            .unwrap();
        assert_eq!(vbds, Value::Array(vec![]), "VBDs left on the proxy");
        let tasks = s.call("task.get_all", vec![Value::s(&sess)]).await.unwrap();
        assert_eq!(tasks, Value::Array(vec![]), "tasks left");
        let mut cbt = 0;
        let mut snaps = 0;
        for vdi in s.all("VDI").await.unwrap() {
            if s.field("VDI", &vdi, "type").await.unwrap() == "cbt_metadata" {
                cbt += 1;
                assert!(
                    s.vdi_file(&vdi).await.unwrap().is_none(),
                    "anchor {vdi} still holds data"
                );
            } else if s
                .call(
                    "VDI.get_is_a_snapshot",
                    vec![Value::s(&sess), Value::s(&vdi)],
                )
                .await
                .unwrap()
                == Value::Bool(true)
            {
                snaps += 1;
            }
        }
        assert_eq!(
            (cbt, snaps),
            (anchors, 0),
            "CBT anchors / snapshot VDIs with data"
        );
        let dev = s.dir().join("dev");
        if dev.exists() {
            assert_eq!(
                std::fs::read_dir(&dev).unwrap().count(),
                0,
                "hot-add devices left"
            );
        }
        s.call("session.logout", vec![Value::s(&sess)])
            .await
            .unwrap();
    }

    /// The content of the snapshot VDI whose uuid is `token`, read by qemu-img off its VHD chain.
    async fn qemu_read(&self, token: &str) -> Vec<u8> {
        let sess = self.sim.login().await.unwrap();
        let r = self
            .sim
            .call("VDI.get_by_uuid", vec![Value::s(&sess), Value::s(token)])
            .await
            .unwrap();
        let file = self
            .sim
            .vdi_file(r.as_str().unwrap())
            .await
            .unwrap()
            .expect("snapshot holds data");
        let out = self.state.path().join(format!("{token}.raw"));
        ferry_testkit::qemu_img(&[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            file.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        std::fs::read(&out).unwrap()
    }
}

async fn read_extents(src: &dyn BlockSource, m: &ExtentMap) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for e in m.iter() {
        let mut b = vec![0u8; e.length as usize];
        src.read_at(e.offset, &mut b).await.unwrap();
        out.push((e.offset, b));
    }
    out
}

async fn full_then_incremental(mode: &str) {
    let lab = lab().await;
    let d = lab.driver(&[mode]).await;
    let vms = d.list_vms().await.unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["debian-web", "ferry-proxy", "win-db"]);
    let web = vms.iter().find(|v| v.name == "debian-web").unwrap();
    assert_eq!(web.disks.len(), 2);

    // Full.
    let s1 = d
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(s1.disks().len(), 2);
    assert_eq!(s1.config().cpus, 2);
    for disk in s1.disks() {
        assert!(
            matches!(disk.changed, Changed::Full { .. }),
            "{:?}",
            disk.changed
        );
        assert_eq!(disk.transport.to_string(), mode);
        let ours = read_all(disk.source.as_ref()).await.unwrap();
        assert!(ours.iter().any(|b| *b != 0));
        assert!(
            ours == lab.qemu_read(&disk.token.0).await,
            "disk {} differs from qemu-img",
            disk.name
        );
    }
    let tokens = s1.finish(Outcome::Committed).await.unwrap();
    assert_eq!(tokens.0.len(), 2);
    lab.assert_clean("debian-web", 2).await;

    // The guest writes; the incremental reads exactly those blocks.
    let vm = lab.sim.vm("debian-web").await.unwrap();
    let live = lab.sim.vm_disks(&vm).await.unwrap();
    lab.sim
        .guest_write(&live[0], 5 * 65536 + 7, b"changed after the full backup")
        .await
        .unwrap();
    lab.sim
        .guest_write(&live[1], 0, &[0xAB; 3 * 65536])
        .await
        .unwrap();
    let s2 = d
        .begin_backup("debian-web", &BackupOptions::default(), Some(&tokens))
        .await
        .unwrap();
    let want = [
        ExtentMap::from_range(5 * 65536..6 * 65536),
        ExtentMap::from_range(0..3 * 65536),
    ];
    for (disk, want) in s2.disks().iter().zip(&want) {
        let Changed::Since(ext) = &disk.changed else {
            panic!("{mode}: not incremental: {:?}", disk.changed)
        };
        assert_eq!(ext, want);
        let got = read_extents(disk.source.as_ref(), ext).await;
        assert_eq!(
            disk.counters.bytes(),
            ext.total_len(),
            "read only the changed blocks"
        );
        let oracle = lab.qemu_read(&disk.token.0).await;
        for (off, data) in got {
            assert!(
                data == oracle[off as usize..off as usize + data.len()],
                "changed data at {off} differs"
            );
        }
    }
    let t2 = s2.finish(Outcome::Committed).await.unwrap();
    assert_ne!(t2, tokens);
    lab.assert_clean("debian-web", 2).await;
    d.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_full_then_incremental() {
    full_then_incremental("network").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotadd_full_then_incremental() {
    full_then_incremental("hotadd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_full_then_incremental() {
    full_then_incremental("san").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_reset_means_a_logged_full_and_abort_leaves_nothing() {
    let lab = lab().await;
    let d = lab.driver(&["network"]).await;
    let s1 = d
        .begin_backup("win-db", &BackupOptions::default(), None)
        .await
        .unwrap();
    let tokens = s1.finish(Outcome::Committed).await.unwrap();
    let vm = lab.sim.vm("win-db").await.unwrap();
    let live = lab.sim.vm_disks(&vm).await.unwrap();
    lab.sim.break_cbt(&live[1]).await.unwrap();
    let s2 = d
        .begin_backup("win-db", &BackupOptions::default(), Some(&tokens))
        .await
        .unwrap();
    assert!(matches!(s2.disks()[0].changed, Changed::Since(_)));
    match &s2.disks()[1].changed {
        Changed::Full { reason } => assert!(reason.contains("CBT"), "{reason}"),
        c => panic!("expected full, got {c:?}"),
    }
    let all = read_all(s2.disks()[1].source.as_ref()).await.unwrap();
    assert!(all == lab.qemu_read(&s2.disks()[1].token.0).await);
    // A failed backup removes its snapshot and keeps the previous anchors.
    s2.finish(Outcome::Aborted).await.unwrap();
    lab.assert_clean("win-db", 2).await;
    // A committed one replaces every previous anchor, the one CBT could not use included.
    let s3 = d
        .begin_backup("win-db", &BackupOptions::default(), Some(&tokens))
        .await
        .unwrap();
    assert!(matches!(s3.disks()[1].changed, Changed::Full { .. }));
    let t3 = s3.finish(Outcome::Committed).await.unwrap();
    lab.assert_clean("win-db", 2).await;
    for old in tokens.0.values() {
        assert!(!t3.0.values().any(|t| t == old), "{old:?} still in use");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_nbd_network_is_a_clear_error_or_a_warned_fallback() {
    let lab = lab().await;
    lab.sim.set_nbd_network(false).await.unwrap();
    let d = lab.driver(&["network"]).await;
    let e = d
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, HvError::NoTransport { .. }), "{e}");
    assert!(e.to_string().contains("purpose `nbd`"), "{e}");
    lab.assert_clean("debian-web", 0).await;
    let d = lab.driver(&["network", "hotadd"]).await;
    let s = d
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap();
    assert!(
        s.disks()
            .iter()
            .all(|x| x.transport == TransportMode::Hotadd)
    );
    s.finish(Outcome::Aborted).await.unwrap();
    lab.assert_clean("debian-web", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_is_cleaned_up_by_the_next() {
    let lab = lab().await;
    let d = lab.driver(&["hotadd"]).await;
    let s = d
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap();
    // The process "dies": no finish, no drop.
    std::mem::forget(s);
    let vm = lab.sim.vm("debian-web").await.unwrap();
    let sess = lab.sim.login().await.unwrap();
    let snaps = lab
        .sim
        .call("VM.get_snapshots", vec![Value::s(&sess), Value::s(&vm)])
        .await
        .unwrap();
    assert!(matches!(snaps, Value::Array(ref a) if a.len() == 1));
    let d2 = lab.driver(&["hotadd"]).await;
    let report = d2.recover().await.unwrap();
    assert_eq!((report.snapshots, report.attachments), (1, 2));
    lab.sim
        .call("session.logout", vec![Value::s(&sess)])
        .await
        .unwrap();
    lab.assert_clean("debian-web", 0).await;
    // A slow snapshot task and an API failure on the way are cleaned up too.
    lab.sim
        .set_task_delay(std::time::Duration::from_millis(300))
        .await
        .unwrap();
    lab.sim
        .fail_next("VBD.plug", &["SR_BACKEND_FAILURE", "", "", "injected"], 1)
        .await
        .unwrap();
    let e = d2
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    lab.assert_clean("debian-web", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_vm_restore_matches_the_original() {
    let lab = lab().await;
    let d = lab.driver(&["network"]).await;
    let s = d
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap();
    let mut disks = Vec::new();
    let mut originals = Vec::new();
    for disk in s.disks() {
        let data = read_all(disk.source.as_ref()).await.unwrap();
        originals.push(data.clone());
        disks.push(RestoreDisk {
            name: disk.name.clone(),
            source: Arc::new(ferry_core::MemSource::new(disk.name.clone(), data, 65536)),
        });
    }
    let plan = RestorePlan {
        name: "debian-web-restored".into(),
        config: s.config().clone(),
        native: Some(s.native().clone()),
        disks,
        power_on: false,
    };
    s.finish(Outcome::Committed).await.unwrap();
    let restored = d.restore_vm(&plan).await.unwrap();
    let sess = lab.sim.login().await.unwrap();
    let call = |m: &'static str, r: String| {
        let sess = sess.clone();
        let sim = &lab.sim;
        async move {
            sim.call(m, vec![Value::s(sess), Value::s(r)])
                .await
                .unwrap()
        }
    };
    let new = call("VM.get_by_uuid", restored.id.clone())
        .await
        .as_str()
        .unwrap()
        .to_string();
    let old = lab.sim.vm("debian-web").await.unwrap();
    for f in ["VCPUs_max", "memory_static_max", "HVM_boot_policy"] {
        assert_eq!(
            lab.sim.field("VM", &new, f).await.unwrap(),
            lab.sim.field("VM", &old, f).await.unwrap(),
            "{f}"
        );
    }
    let rec = |v: Value, k: &str| match v {
        Value::Struct(m) => m.get(k).cloned().unwrap(),
        _ => panic!(),
    };
    let old_rec = call("VM.get_record", old.clone()).await;
    let new_rec = call("VM.get_record", new.clone()).await;
    assert_eq!(
        rec(new_rec.clone(), "VCPUs_max"),
        rec(old_rec.clone(), "VCPUs_max")
    );
    assert_eq!(
        rec(new_rec.clone(), "memory_static_max"),
        rec(old_rec, "memory_static_max")
    );
    let new_disks = lab.sim.vm_disks(&new).await.unwrap();
    assert_eq!(new_disks.len(), originals.len());
    for (vdi, want) in new_disks.iter().zip(&originals) {
        assert!(
            lab.sim.read_vdi(vdi).await.unwrap() == *want,
            "restored disk differs"
        );
    }
    let sim = &lab.sim;
    let vifs = |vm: String| async move {
        let lab_sim = sim;
        let sess = lab_sim.login().await.unwrap();
        let v = lab_sim
            .call("VM.get_VIFs", vec![Value::s(&sess), Value::s(vm)])
            .await
            .unwrap();
        let Value::Array(a) = v else { panic!() };
        let mut macs = Vec::new();
        for r in a {
            macs.push(
                lab_sim
                    .field("VIF", r.as_str().unwrap(), "MAC")
                    .await
                    .unwrap(),
            );
        }
        macs
    };
    assert_eq!(vifs(new).await, vifs(old).await);
    let _ = ChangeTokens::default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_drops_mid_transfer_are_survived_or_reported() {
    let lab = lab().await;
    let d = lab.driver(&["network"]).await;
    let s = d
        .begin_backup("debian-web", &BackupOptions::default(), None)
        .await
        .unwrap();
    // Every NBD connection now dies after 1 MiB (four connections cannot carry the 8 MiB disk): the client reconnects and retries reads.
    lab.sim.set_nbd_drop_after(Some(1 << 20)).await.unwrap();
    let disk = &s.disks()[0];
    let all = read_all(disk.source.as_ref()).await.unwrap();
    assert!(
        all == lab.qemu_read(&disk.token.0).await,
        "data read across reconnects differs"
    );
    // A connection that dies during the handshake every time is an error naming the disk.
    lab.sim.set_nbd_drop_after(Some(0)).await.unwrap();
    let e = d
        .begin_backup("win-db", &BackupOptions::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, HvError::NoTransport { .. }), "{e}");
    assert!(e.to_string().contains("win-db"), "{e}");
    lab.sim.set_nbd_drop_after(None).await.unwrap();
    s.finish(Outcome::Aborted).await.unwrap();
    lab.assert_clean("debian-web", 0).await;
    lab.assert_clean("win-db", 0).await;
}

/// An upload the pool refuses up front (read-only or unknown VDI) fails at once with the pool's
/// error; the client stops feeding the body instead of waiting on a connection that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_import_fails_promptly_with_the_pools_error() {
    let lab = lab().await;
    let d = lab.driver(&["network"]).await;
    // The seeded disks hold 8 MiB; a snapshot of one is read-only.
    let src = ferry_core::block::MemSource::new("disk", vec![0x5a; 8 << 20], 1 << 20);
    let big = ferry_core::block::MemSource::new("big", vec![0x5a; 64 << 20], 1 << 20);
    let s = lab.sim.login().await.unwrap();
    let vm = lab.sim.vm("debian-web").await.unwrap();
    let snap = lab
        .sim
        .call(
            "VM.snapshot",
            vec![Value::s(&s), Value::s(&vm), Value::s("ro")],
        )
        .await
        .unwrap();
    let snap_disk = lab.sim.vm_disks(snap.as_str().unwrap()).await.unwrap()[0].clone();
    let live_disk = lab.sim.vm_disks(&vm).await.unwrap()[0].clone();
    for (vdi, src, want) in [
        ("OpaqueRef:nope", &src, "HANDLE_INVALID"),
        (live_disk.as_str(), &big, "holds 8388608 bytes"),
        (snap_disk.as_str(), &src, "VDI_READ_ONLY"),
    ] {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            d.client().import_raw(vdi, src),
        )
        .await
        .expect("the refused upload returned within 30 s");
        let e = r.expect_err("a refused upload is an error").to_string();
        assert!(e.contains(want), "{e}");
        assert!(
            !e.contains("session_id"),
            "the session stays out of errors: {e}"
        );
    }
}
