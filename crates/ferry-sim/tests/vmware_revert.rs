//! Snapshots of `ferry sim vmware` keep their own disk content: pyvmomi's RevertToSnapshot_Task
//! brings back exactly what each disk held when that snapshot was taken (not the last snapshot's),
//! CBT reports the blocks a revert changed, a CloneVM_Task from a snapshot has that snapshot's disks,
//! and RemoveSnapshot_Task deletes the snapshot's copy.

use ferry_sim::vmware::{BLOCK, VmwareSim, VmwareSimConfig};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

struct Script {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Script {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        if l.is_empty() {
            let o = self.child.stderr.take().map(|mut e| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                s
            });
            panic!("pyvmomi script ended: {}", o.unwrap_or_default());
        }
        l.trim().to_string()
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_restores_each_snapshots_own_content_and_remove_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = VmwareSimConfig::new(dir.path());
    cfg.vcsim = ferry_testkit::tool("vcsim");
    cfg.disk_mib = 8;
    let sim = VmwareSim::start(cfg).await.unwrap();
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let hostport = sim
        .url()
        .trim_start_matches("https://")
        .trim_end_matches("/sdk")
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vmware_revert.py");
    let mut child = Command::new(&python)
        .args([script, host, port, sim.username(), sim.password()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut s = Script {
        stdin: child.stdin.take().unwrap(),
        out: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    let ready = s.line();
    let parts: Vec<&str> = ready
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("{ready}"))
        .split(' ')
        .collect();
    let vm = parts[0].to_string();
    let keys: Vec<i64> = parts[1..].iter().map(|k| k.parse().unwrap()).collect();
    assert_eq!(keys.len(), 2);
    let snap_dir = dir.path().join("snapshots");
    write_both(&sim, &vm, &keys, 3, b"first").await;
    let s1 = s.ask("SNAP one");
    let at1 = read_all(&sim, &vm, &keys).await;
    write_both(&sim, &vm, &keys, 5, b"second").await;
    let s2 = s.ask("SNAP two");
    let at2 = read_all(&sim, &vm, &keys).await;
    let cid2 = s.ask(&format!("CID {s2} {}", keys[0]));
    assert_ne!(at1, at2);
    write_both(&sim, &vm, &keys, 9, b"third, never snapshotted").await;
    assert_eq!(std::fs::read_dir(&snap_dir).unwrap().count(), 2);

    // Back to the older snapshot: its own content, not the newer one's frozen file.
    assert_eq!(s.ask(&format!("REVERT {s1}")), "OK");
    assert_eq!(
        read_all(&sim, &vm, &keys).await,
        at1,
        "disks after reverting to {s1}"
    );
    // What the revert changed is changed for CBT: blocks 5 and 9 differ from snapshot two.
    let s3 = s.ask("SNAP three");
    let changed: Vec<(u64, u64)> =
        serde_json::from_str(&s.ask(&format!("CHANGED {s3} {} {cid2}", keys[0]))).unwrap();
    for b in [5, 9] {
        assert!(
            changed
                .iter()
                .any(|(a, l)| *a <= b * BLOCK && b * BLOCK < a + l),
            "block {b} not among {changed:?}"
        );
    }
    assert!(
        !changed
            .iter()
            .any(|(a, l)| *a <= 3 * BLOCK && 3 * BLOCK < a + l),
        "block 3 did not change since two: {changed:?}"
    );

    // And forward again to the newer one.
    assert_eq!(s.ask(&format!("REVERT {s2}")), "OK");
    assert_eq!(
        read_all(&sim, &vm, &keys).await,
        at2,
        "disks after reverting to {s2}"
    );

    // Removing a snapshot deletes its copy; the others still revert.
    assert_eq!(s.ask(&format!("REMOVE {s3}")), "OK");
    assert!(!snap_dir.join(&s3).exists());
    assert_eq!(s.ask(&format!("REVERT {s1}")), "OK");
    assert_eq!(read_all(&sim, &vm, &keys).await, at1);
    for snap in [&s2, &s1] {
        assert_eq!(s.ask(&format!("REMOVE {snap}")), "OK");
    }
    assert_eq!(sim.snapshot_count().await, 0);
    assert_eq!(std::fs::read_dir(&snap_dir).unwrap().count(), 0);

    drop(s.stdin);
    let st = s.child.wait().unwrap();
    assert!(st.success(), "pyvmomi script: {st}");
}

async fn read_all(sim: &VmwareSim, vm: &str, keys: &[i64]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for k in keys {
        v.push(sim.read_disk(vm, *k).await.unwrap());
    }
    v
}

async fn write_both(sim: &VmwareSim, vm: &str, keys: &[i64], block: u64, what: &[u8]) {
    for k in keys {
        sim.guest_write(vm, *k, block * BLOCK + 7, what)
            .await
            .unwrap();
    }
}
