//! The appliance's fast structural tests (the boot itself is the long `tests/appliance-boot.sh`):
//! `ferry image convert` (reproducible with `--uuid` + `SOURCE_DATE_EPOCH`, fresh without,
//! nothing left on failure), the packaging stage of `images/build.sh` on a small disk (every
//! format accepted by qemu-img, the OVA's shape and manifest, byte-identical twice), the OVF
//! checker refusing broken descriptors, and the hardening of `ferry.service`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EPOCH: &str = "1700000000";
const UUID: &str = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ferry(args: &[&str], env: &[(&str, &str)]) -> Output {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env)
}

fn sha256(p: &Path) -> String {
    let out = ferry_testkit::run_ok(Command::new("sha256sum").arg(p));
    out.split_whitespace().next().unwrap().to_string()
}

/// A small sparse raw disk with data at a few places (a GPT from sfdisk, noise, a tail block).
fn small_disk(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(24 << 20).unwrap();
    f.write_all_at(&ferry_testkit::noise(3 << 20, 7), 1 << 20)
        .unwrap();
    f.write_all_at(&ferry_testkit::noise(4096, 8), (24 << 20) - (1 << 20))
        .unwrap();
    drop(f);
    let mut sfdisk = Command::new(ferry_testkit::tool("sfdisk"));
    sfdisk
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&p);
    let mut child = sfdisk
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk (tests/peers/install.sh)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nlabel-id: 0F3A0E61-2B7C-4D2E-9E1B-3C5D7F9A1B2C\nstart=2048, size=8192, type=U\n")
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    p
}

#[test]
fn convert_is_reproducible_with_uuid_and_fresh_without() {
    let dir = ferry_testkit::scratch_dir();
    let raw = small_disk(dir.path());
    let r = raw.to_str().unwrap();
    for (fmt, qfmt) in [("vhdx", "vhdx"), ("vhd", "vpc"), ("vmdk-stream", "vmdk")] {
        // Same file name in three directories: a VMDK's descriptor names its own file.
        let [a, b, c] = ["a", "b", "c"].map(|d| {
            let sub = dir.path().join(d);
            std::fs::create_dir_all(&sub).unwrap();
            sub.join(format!("disk.{fmt}"))
        });
        let fixed = [("SOURCE_DATE_EPOCH", EPOCH)];
        for out in [&a, &b] {
            let o = ferry(
                &[
                    "image",
                    "convert",
                    r,
                    out.to_str().unwrap(),
                    "--format",
                    fmt,
                    "--uuid",
                    UUID,
                    "--json",
                ],
                &fixed,
            );
            assert!(o.status.success());
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["virtual_size"], 24u64 << 20);
            assert_eq!(v["data_bytes"].as_u64().unwrap() % 4096, 0);
            ferry_testkit::qemu_img_compare(&raw, "raw", out, qfmt);
            if qfmt != "vpc" {
                ferry_testkit::qemu_img(&["check", "-q", "-f", qfmt, out.to_str().unwrap()]);
            }
        }
        assert_eq!(sha256(&a), sha256(&b), "{fmt}: same inputs, same bytes");
        // Without --uuid the identity is fresh (VMDK's CID, VHD/VHDX ids).
        let o = ferry(
            &["image", "convert", r, c.to_str().unwrap(), "--format", fmt],
            &[],
        );
        assert!(o.status.success());
        assert_ne!(
            sha256(&a),
            sha256(&c),
            "{fmt}: a fresh conversion has its own identity"
        );
        ferry_testkit::qemu_img_compare(&raw, "raw", &c, qfmt);
    }
}

/// Arguments after `image convert`, extra environment, and what the error must say.
type RefusedCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn convert_refuses_bad_input_and_leaves_nothing() {
    let dir = ferry_testkit::scratch_dir();
    let raw = small_disk(dir.path());
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let out = dir.path().join("out.vhdx");
    let (r, o) = (raw.to_str().unwrap(), out.to_str().unwrap());
    let missing = dir.path().join("missing.raw");
    let cases: [RefusedCase; 5] = [
        (
            &[r, o, "--format", "vhdx", "--uuid", "nope"],
            &[],
            "`nope` is not a UUID",
        ),
        (
            &[r, o, "--format", "qcow9"],
            &[],
            "unknown output format `qcow9`",
        ),
        (
            &[r, o, "--format", "vhdx"],
            &[("SOURCE_DATE_EPOCH", "yesterday")],
            "SOURCE_DATE_EPOCH",
        ),
        (
            &[missing.to_str().unwrap(), o, "--format", "vhdx"],
            &[],
            "missing.raw",
        ),
        // A VHD holds whole sectors only: refused before anything is written.
        (
            &[odd.to_str().unwrap(), o, "--format", "vhd"],
            &[],
            "multiple of 512",
        ),
    ];
    for (args, env, expect) in cases {
        let mut all = vec!["image", "convert"];
        all.extend_from_slice(args);
        let out = ferry(&all, env);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(left.is_empty(), "nothing half-written: {left:?}");
}

fn package(raw: &Path, out: &Path) -> Output {
    let o = Command::new(repo_root().join("images/build.sh"))
        .arg("--package")
        .arg(raw)
        .arg("--out")
        .arg(out)
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .expect("run images/build.sh");
    eprintln!(
        "$ images/build.sh --package\n--- {}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn check_ovf(ovf: &Path, disks: &[&Path]) -> Output {
    let mut cmd = Command::new(ferry_testkit::tool("python3"));
    cmd.arg(repo_root().join("images/check-ovf.py")).arg(ovf);
    for d in disks {
        cmd.arg(d);
    }
    cmd.output().expect("run python3")
}

#[test]
fn packaging_gives_checked_reproducible_images_and_a_valid_ova() {
    let dir = ferry_testkit::scratch_dir();
    let raw = small_disk(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let o = package(&raw, out);
        assert!(o.status.success(), "images/build.sh --package failed");
    }
    let sums_a = std::fs::read_to_string(a.join("SHA256SUMS")).unwrap();
    let sums_b = std::fs::read_to_string(b.join("SHA256SUMS")).unwrap();
    assert_eq!(sums_a, sums_b, "two packagings of the same disk differ");
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("ferry-appliance-{version}");
    for ext in ["qcow2", "ova", "vhdx", "vhd"] {
        assert!(sums_a.contains(&format!("{name}.{ext}")), "{sums_a}");
    }
    // Every disk, independently: qemu-img reads the same bytes as the raw disk.
    for (f, q) in [("qcow2", "qcow2"), ("vhdx", "vhdx"), ("vhd", "vpc")] {
        let p = a.join(format!("{name}.{f}"));
        let info =
            ferry_testkit::qemu_img(&["info", "--output=json", "-f", q, p.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], 24u64 << 20, "{f}");
        ferry_testkit::qemu_img_compare(&raw, "raw", &p, q);
    }

    // The OVA: ustar, descriptor first, then manifest, then the disk; the manifest's hashes hold.
    let ova = a.join(format!("{name}.ova"));
    let listing = ferry_testkit::run_ok(Command::new("tar").arg("-tvf").arg(&ova));
    let names: Vec<&str> = listing
        .lines()
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            format!("{name}.ovf"),
            format!("{name}.mf"),
            format!("{name}-disk1.vmdk")
        ]
    );
    assert!(
        listing.lines().all(|l| l.starts_with("-rw-r--r-- 0/0")),
        "{listing}"
    );
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    ferry_testkit::run_ok(Command::new("tar").arg("-xf").arg(&ova).arg("-C").arg(&x));
    let ovf = x.join(format!("{name}.ovf"));
    let vmdk = x.join(format!("{name}-disk1.vmdk"));
    let mf = std::fs::read_to_string(x.join(format!("{name}.mf"))).unwrap();
    for f in [&ovf, &vmdk] {
        let line = format!(
            "SHA256({})= {}",
            f.file_name().unwrap().to_string_lossy(),
            sha256(f)
        );
        assert!(mf.contains(&line), "manifest lacks {line}:\n{mf}");
    }
    let o = check_ovf(&ovf, &[&vmdk]);
    assert!(
        o.status.success(),
        "check-ovf: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ferry_testkit::qemu_img(&["check", "-q", "-f", "vmdk", vmdk.to_str().unwrap()]);
    ferry_testkit::qemu_img_compare(&raw, "raw", &vmdk, "vmdk");
    let text = std::fs::read_to_string(&ovf).unwrap();
    assert!(text.contains(&format!("ovf:capacity=\"{}\"", 24u64 << 20)));
    assert!(text.contains(&format!(
        "ovf:size=\"{}\"",
        std::fs::metadata(&vmdk).unwrap().len()
    )));

    // The checker can fail: broken descriptors are refused, naming the problem.
    let broken = |from: &str, to: &str, expect: &str| {
        assert!(text.contains(from), "test setup: `{from}` not in the OVF");
        let p = dir.path().join("broken.ovf");
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
        let o = check_ovf(&p, &[&vmdk]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a broken OVF ({expect}) passed");
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    };
    broken(
        "ovf:fileRef=\"file1\"",
        "ovf:fileRef=\"file9\"",
        "names no References/File",
    );
    broken(
        "ovf:/disk/vmdisk1",
        "ovf:/disk/vmdisk2",
        "names no DiskSection disk",
    );
    broken(
        "#streamOptimized",
        "#monolithicSparse",
        "ovf:format must be",
    );
    broken(
        "<rasd:Connection>VM Network</rasd:Connection>",
        "<rasd:Connection>Other</rasd:Connection>",
        "names no NetworkSection network",
    );
    broken(
        "<rasd:ElementName>Hard Disk 1</rasd:ElementName>",
        "<rasd:Zzz>1</rasd:Zzz><rasd:ElementName>Hard Disk 1</rasd:ElementName>",
        "ResourceAllocationSettingData}Zzz': This element is not expected",
    );
    broken(
        "<rasd:InstanceID>4</rasd:InstanceID>",
        "<rasd:InstanceID>4</rasd:InstanceID><rasd:AddressOnParent>1</rasd:AddressOnParent>",
        "}AddressOnParent': This element is not expected",
    );
    broken(
        "<Info>Virtual disk information</Info>",
        "",
        "Expected is ( {http://schemas.dmtf.org/ovf/envelope/1}Info )",
    );
    // Attribute types are the schema's too (ovf:required is a boolean).
    broken(
        "ovf:required=\"false\" vmw:key=\"firmware\"",
        "ovf:required=\"maybe\" vmw:key=\"firmware\"",
        "schema: ",
    );
    broken(
        &format!("ovf:size=\"{}\"", std::fs::metadata(&vmdk).unwrap().len()),
        "ovf:size=\"1\"",
        "has",
    );
}

/// `KEY=VALUE` lines of a unit file (all of them, in order).
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

#[test]
fn service_unit_keeps_its_hardening() {
    let root = repo_root();
    let path = root.join("appliance/systemd/ferry.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let e = unit_entries(&text);
    let get = |k: &str| -> Vec<&str> {
        e.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (k, v) in [
        ("User", "ferry"),
        ("Group", "ferry"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("DevicePolicy", "closed"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("StateDirectory", "ferry"),
    ] {
        assert_eq!(get(k), [v], "{k} in {}", path.display());
    }
    assert_ne!(get("PrivateDevices"), ["yes"], "hot-add needs the disks");
    let devices = get("DeviceAllow");
    for need in [
        "block-sd rw",
        "block-virtblk rw",
        "block-xvd rw",
        "block-device-mapper rw",
    ] {
        assert!(devices.contains(&need), "DeviceAllow={need} missing");
    }
    // No character devices beyond the harmless pseudo-devices, no raw access to everything.
    for d in &devices {
        assert!(
            d.starts_with("block-")
                || d.starts_with("/dev/null")
                || d.starts_with("/dev/zero")
                || d.starts_with("/dev/urandom")
                || d.starts_with("/dev/random"),
            "unexpected DeviceAllow={d}"
        );
    }
    assert_eq!(get("ReadWritePaths"), ["/srv/ferry"]);
    // systemd's own assessment: the exposure stays low (0 = locked down, 10 = none).
    let o = Command::new(ferry_testkit::tool("systemd-analyze"))
        .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "systemd-analyze security: {report}");
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for ferry.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    assert!(level <= 2.5, "exposure {level} > 2.5:\n{report}");

    // The firewall lets in exactly the console/API port and SSH.
    let nft = std::fs::read_to_string(root.join("appliance/nftables/nftables.conf")).unwrap();
    let ports: Vec<&str> = nft
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tcp dport "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ports, ["443", "22"]);
    assert!(nft.contains("type filter hook input priority filter; policy drop;"));
    // Every shell script of the appliance parses.
    for s in [
        "appliance/firstboot/ferry-firstboot",
        "appliance/systemd/ferry-serve",
        "appliance/ferry-upgrade",
        "appliance/boot/zz-ferry-esp",
    ] {
        ferry_testkit::run_ok(Command::new("sh").arg("-n").arg(root.join(s)));
    }
}
