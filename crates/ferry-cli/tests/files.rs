//! File-level restore (`ferry files ls|get`) and swap/pagefile exclusion end to end through the
//! binary, on a GPT and an MBR disk built with Debian tools (mke2fs -d, mkntfs + ntfscp, mkswap,
//! sfdisk; tests/fs/make-disks.sh): files listed and fetched byte for byte, clear errors on bad
//! input, and backups that store less without swap yet restore valid file systems.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PASSWORD: &str = "test password";
const MIB: u64 = 1 << 20;

fn ferry(args: &[&str]) -> Output {
    let env = [("FERRY_PASSWORD".to_string(), PASSWORD.to_string())];
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env)
}

fn ferry_ok(args: &[&str]) -> Output {
    let out = ferry(args);
    assert!(
        out.status.success(),
        "ferry {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs ferry expecting failure; returns stderr, checked for `want` and for no panic.
fn ferry_err(args: &[&str], want: &str) -> String {
    let out = ferry(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ferry {args:?} should fail");
    assert!(!err.contains("panicked"), "ferry {args:?} panicked:\n{err}");
    assert!(
        err.contains(want),
        "ferry {args:?}: stderr lacks `{want}`:\n{err}"
    );
    err
}

fn init_repo(location: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open_with(location, true, &[]).unwrap();
        let opts = InitOptions {
            chunk_size: 1 << 20,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(PASSWORD)), opts)
            .await
            .unwrap();
    });
}

/// Builds the disks; fails loudly when a Debian tool is missing.
fn make_disks(dir: &Path) -> PathBuf {
    for t in ["mke2fs", "mkntfs", "ntfscp", "mkswap", "sfdisk"] {
        if !["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .any(|d| Path::new(d).join(t).exists())
        {
            ferry_testkit::tool(t);
        }
    }
    let out = dir.join("disks");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fs/make-disks.sh");
    ferry_testkit::run_ok(Command::new("bash").arg(script).arg(&out));
    out
}

fn layout(disks: &Path, name: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(disks.join("layout")).unwrap();
    let l = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap();
    let f: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[1])
}

fn backup_json(repo: &str, vm: &str, disks: &[String], extra: &[&str]) -> Value {
    let mut args = vec!["backup", "--repo", repo, "--vm", vm, "--json"];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    args.extend_from_slice(extra);
    serde_json::from_str(&stdout(&ferry_ok(&args))).unwrap()
}

fn get_bytes(repo: &str, snap: &str, disk: &str, part: Option<&str>, path: &str) -> Vec<u8> {
    let mut args = vec![
        "files", "get", "--repo", repo, snap, "--disk", disk, path, "--out", "-",
    ];
    if let Some(p) = part {
        args.extend(["--partition", p]);
    }
    ferry_ok(&args).stdout
}

/// Disk, partition, and (path in the file system, original under src/) pairs.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

#[test]
fn files_are_listed_and_fetched_from_ext4_and_ntfs_on_gpt_and_mbr() {
    let dir = ferry_testkit::scratch_dir();
    let disks = make_disks(dir.path());
    let src = disks.join("src");
    let repo_dir = dir.path().join("repo");
    let repo = repo_dir.to_str().unwrap();
    init_repo(repo);
    let report = backup_json(
        repo,
        "fs",
        &[
            format!("gpt=raw:{}", disks.join("gpt.img").display()),
            format!("mbr=raw:{}", disks.join("mbr.img").display()),
        ],
        &[],
    );
    let snap = report["snapshot"].as_str().unwrap().to_string();

    // Partition listings.
    let text = stdout(&ferry_ok(&[
        "files", "ls", "--repo", repo, &snap, "--disk", "gpt",
    ]));
    assert!(text.contains("GPT partition table"), "{text}");
    for want in [
        "Linux filesystem",
        "ext4",
        "Linux swap",
        "Microsoft basic data",
        "ntfs",
    ] {
        assert!(text.contains(want), "`{want}` missing:\n{text}");
    }
    let j: Value = serde_json::from_str(&stdout(&ferry_ok(&[
        "files", "ls", "--repo", repo, &snap, "--disk", "mbr", "--json",
    ])))
    .unwrap();
    assert_eq!(j["scheme"], "mbr");
    let parts = j["partitions"].as_array().unwrap();
    let nums: Vec<u64> = parts
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(nums, [1, 2, 5], "{j}");
    assert_eq!(parts[0]["fs"], "ntfs");
    assert_eq!(parts[2]["fs"], "ext4");
    assert_eq!(parts[2]["start"], layout(&disks, "mbr-ext4").0);

    // Directory listings: the default volume is the first readable one (ext4 on the GPT disk).
    let root = stdout(&ferry_ok(&[
        "files", "ls", "--repo", repo, &snap, "--disk", "gpt", "/",
    ]));
    for want in ["big.bin", "sub/", "swapfile", "hello.txt", "etc/"] {
        assert!(root.contains(want), "`{want}` missing:\n{root}");
    }
    let ntfs_root: Value = serde_json::from_str(&stdout(&ferry_ok(&[
        "files",
        "ls",
        "--repo",
        repo,
        &snap,
        "--disk",
        "gpt",
        "--partition",
        "3",
        "--json",
        "/",
    ])))
    .unwrap();
    let big = ntfs_root
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "big.bin")
        .unwrap_or_else(|| panic!("no big.bin in {ntfs_root}"));
    assert_eq!(big["size"], 5 * MIB);
    assert_eq!(big["type"], "file");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mtime = big["mtime_unix"].as_i64().unwrap();
    assert!(
        (now - 3600..=now + 60).contains(&mtime),
        "mtime {mtime}, now {now}"
    );
    assert!(
        !ntfs_root
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "$MFT"),
        "metadata files are hidden: {ntfs_root}"
    );

    // Every file, from every file system, byte for byte.
    let cases: &[Case] = &[
        (
            "gpt",
            "1",
            &[
                ("/big.bin", "big.bin"),
                ("/hello.txt", "hello.txt"),
                ("/sub/deeper/nested.bin", "sub/deeper/nested.bin"),
                ("/sparse.bin", "sparse.bin"),
                ("/empty", "empty"),
            ],
        ),
        (
            "gpt",
            "3",
            &[
                ("/big.bin", "big.bin"),
                ("/HELLO.TXT", "hello.txt"),
                ("/$Extend/nested.bin", "sub/deeper/nested.bin"),
                ("/sparse.bin", "sparse.bin"),
                ("/empty", "empty"),
            ],
        ),
        (
            "mbr",
            "1",
            &[("/big.bin", "big.bin"), ("/sparse.bin", "sparse.bin")],
        ),
        (
            "mbr",
            "5",
            &[("/big.bin", "big.bin"), ("/sub/note.txt", "sub/note.txt")],
        ),
    ];
    for (disk, part, files) in cases {
        for (path, orig) in *files {
            let got = get_bytes(repo, &snap, disk, Some(*part), path);
            let want = std::fs::read(src.join(orig)).unwrap();
            assert!(
                got == want,
                "{disk} partition {part} {path}: {} bytes, want {}",
                got.len(),
                want.len()
            );
        }
    }

    // A file to a named output, a directory recursively.
    let out = dir.path().join("big-copy");
    ferry_ok(&[
        "files",
        "get",
        "--repo",
        repo,
        &snap,
        "--disk",
        "mbr",
        "--partition",
        "5",
        "/big.bin",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(src.join("big.bin")).unwrap());
    let tree = dir.path().join("tree");
    ferry_ok(&[
        "files",
        "get",
        "--repo",
        repo,
        &snap,
        "--disk",
        "gpt",
        "/sub",
        "--out",
        tree.to_str().unwrap(),
    ]);
    for f in ["note.txt", "deeper/nested.bin"] {
        assert!(
            std::fs::read(tree.join(f)).unwrap() == std::fs::read(src.join("sub").join(f)).unwrap(),
            "{f}"
        );
    }
    ferry_err(
        &[
            "files",
            "get",
            "--repo",
            repo,
            &snap,
            "--disk",
            "gpt",
            "/sub",
            "--out",
            tree.to_str().unwrap(),
        ],
        "exists already",
    );

    // Clear errors, never a panic.
    ferry_err(
        &[
            "files", "ls", "--repo", repo, &snap, "--disk", "gpt", "/nope",
        ],
        "no such file",
    );
    ferry_err(
        &[
            "files",
            "get",
            "--repo",
            repo,
            &snap,
            "--disk",
            "gpt",
            "--partition",
            "3",
            "/nope.txt",
            "--out",
            "-",
        ],
        "no such file",
    );
    ferry_err(
        &[
            "files",
            "ls",
            "--repo",
            repo,
            &snap,
            "--disk",
            "gpt",
            "--partition",
            "2",
            "/",
        ],
        "unknown file system: Linux swap",
    );
    ferry_err(
        &[
            "files",
            "ls",
            "--repo",
            repo,
            &snap,
            "--disk",
            "gpt",
            "--partition",
            "9",
            "/",
        ],
        "no partition 9",
    );
    ferry_err(
        &[
            "files", "get", "--repo", repo, &snap, "--disk", "gpt", "/sub", "--out", "-",
        ],
        "is a directory",
    );
    ferry_err(&["files", "ls", "--repo", repo, &snap, "/"], "pass --disk");

    // A GPT header whose CRC does not match: named, not guessed at.
    let bad = dir.path().join("bad.img");
    let mut img = std::fs::read(disks.join("gpt.img")).unwrap();
    img[512 + 40] ^= 0xFF;
    std::fs::write(&bad, &img).unwrap();
    let r = backup_json(repo, "bad", &[format!("raw:{}", bad.display())], &[]);
    let bad_snap = r["snapshot"].as_str().unwrap();
    ferry_err(&["files", "ls", "--repo", repo, bad_snap], "CRC32");
    // A disk with no file system.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, ferry_testkit::noise(4 << 20, 7)).unwrap();
    let r = backup_json(repo, "junk", &[format!("raw:{}", junk.display())], &[]);
    ferry_err(
        &[
            "files",
            "ls",
            "--repo",
            repo,
            r["snapshot"].as_str().unwrap(),
            "/",
        ],
        "no ext4 or NTFS file system",
    );
}

fn run_tool(cmd: &str, args: &[&str]) -> Output {
    let prog = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
        .unwrap_or_else(|| ferry_testkit::tool(cmd));
    Command::new(prog).args(args).output().unwrap()
}

fn extract(img: &[u8], (start, size): (u64, u64), to: &Path) -> PathBuf {
    std::fs::write(to, &img[start as usize..(start + size) as usize]).unwrap();
    to.to_path_buf()
}

#[test]
fn swap_and_pagefiles_are_read_as_zeros_and_restores_stay_valid() {
    let dir = ferry_testkit::scratch_dir();
    let disks = make_disks(dir.path());
    let img = disks.join("gpt.img");
    let on_dir = dir.path().join("repo-on");
    let off_dir = dir.path().join("repo-off");
    let (on, off) = (on_dir.to_str().unwrap(), off_dir.to_str().unwrap());
    init_repo(on);
    init_repo(off);
    let spec = [format!("gpt=raw:{}", img.display())];
    let r_on = backup_json(on, "vm", &spec, &[]);
    let r_off = backup_json(off, "vm", &spec, &["--no-exclude-swap"]);
    let d_on = &r_on["disks"][0];
    let d_off = &r_off["disks"][0];

    // What was excluded: the swap partition and swap file after their header pages, the
    // whole pagefile.
    let ex = d_on["excluded"].as_array().unwrap();
    let kinds: Vec<&str> = ex.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.len(), 3, "{ex:?}");
    for k in ["swap-partition", "swap-file", "pagefile"] {
        assert!(kinds.contains(&k), "{k} not excluded: {ex:?}");
    }
    let (swap_start, swap_size) = layout(&disks, "gpt-swap");
    let sp = ex.iter().find(|e| e["kind"] == "swap-partition").unwrap();
    assert_eq!(sp["what"], "partition 2");
    assert_eq!(sp["ranges"][0]["start"], swap_start + 4096);
    assert_eq!(sp["ranges"][0]["end"], swap_start + swap_size);
    let excluded = d_on["excluded_bytes"].as_u64().unwrap();
    let expected = (16 * MIB - 4096) + (8 * MIB - 4096) + 16 * MIB;
    assert!(
        (expected..expected + 64 * 1024).contains(&excluded),
        "excluded {excluded}, expected about {expected}"
    );
    assert_eq!(d_off["excluded_bytes"], 0);
    assert!(d_off["excluded"].as_array().unwrap().is_empty());
    let (up_on, up_off) = (
        d_on["uploaded_bytes"].as_u64().unwrap(),
        d_off["uploaded_bytes"].as_u64().unwrap(),
    );
    assert!(
        up_on + 38 * MIB < up_off,
        "with exclusion {up_on} bytes stored, without {up_off}"
    );
    // The restore point records it; the summary says it.
    let again = ferry_ok(&["backup", "--repo", on, "--vm", "vm", "--disk", &spec[0]]);
    let summary = String::from_utf8_lossy(&again.stderr);
    assert!(
        summary.contains("excluded partition 2 (swap partition)")
            && summary.contains("excluded partition 1:/swapfile (swap file)")
            && summary.contains("excluded partition 3:pagefile.sys (paging file)"),
        "{summary}"
    );

    // Restores: without exclusion byte-identical; with it identical outside the excluded
    // extents, zeros inside, swap header pages kept.
    let orig = std::fs::read(&img).unwrap();
    let snap_on = r_on["snapshot"].as_str().unwrap();
    let res_on = dir.path().join("on.img");
    let res_off = dir.path().join("off.img");
    ferry_ok(&[
        "restore",
        "--repo",
        on,
        snap_on,
        "--disk",
        "gpt",
        "--to",
        res_on.to_str().unwrap(),
    ]);
    ferry_ok(&[
        "restore",
        "--repo",
        off,
        r_off["snapshot"].as_str().unwrap(),
        "--disk",
        "gpt",
        "--to",
        res_off.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&res_off).unwrap() == orig,
        "--no-exclude-swap restore differs"
    );
    let got = std::fs::read(&res_on).unwrap();
    assert_eq!(got.len(), orig.len());
    let mut mask = vec![false; orig.len()];
    for e in ex {
        for r in e["ranges"].as_array().unwrap() {
            let (s, t) = (
                r["start"].as_u64().unwrap() as usize,
                r["end"].as_u64().unwrap() as usize,
            );
            assert!(
                got[s..t].iter().all(|&b| b == 0),
                "{} {s}..{t} not zero",
                e["what"]
            );
            mask[s..t].iter_mut().for_each(|m| *m = true);
        }
    }
    let diff = (0..orig.len()).find(|&i| !mask[i] && got[i] != orig[i]);
    assert_eq!(
        diff, None,
        "restored disk differs outside the excluded extents"
    );
    let s = swap_start as usize;
    assert_eq!(&got[s + 4086..s + 4096], b"SWAPSPACE2");
    assert!(
        orig[s + 8192..s + 16384].iter().any(|&b| b != 0),
        "the swap held data"
    );
    let swapfile = get_bytes(on, snap_on, "gpt", Some("1"), "/swapfile");
    assert_eq!(swapfile.len() as u64, 8 * MIB);
    assert_eq!(&swapfile[4086..4096], b"SWAPSPACE2");
    assert!(swapfile[4096..].iter().all(|&b| b == 0));
    let pagefile = get_bytes(on, snap_on, "gpt", Some("3"), "/pagefile.sys");
    assert_eq!(pagefile.len() as u64, 16 * MIB);
    assert!(pagefile.iter().all(|&b| b == 0));
    // Ordinary files are untouched.
    let big = get_bytes(on, snap_on, "gpt", Some("3"), "/big.bin");
    assert!(big == std::fs::read(disks.join("src/big.bin")).unwrap());

    // The file systems of the restored disk pass their checkers.
    let ext4 = extract(&got, layout(&disks, "gpt-ext4"), &dir.path().join("p1.img"));
    let o = run_tool("e2fsck", &["-fn", ext4.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "e2fsck -fn: {}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let ntfs = extract(&got, layout(&disks, "gpt-ntfs"), &dir.path().join("p3.img"));
    let o = run_tool("ntfsfix", &["-n", ntfs.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "ntfsfix -n: {}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let swap = extract(&got, (swap_start, swap_size), &dir.path().join("p2.img"));
    let o = run_tool("swaplabel", &[swap.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "swaplabel: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
