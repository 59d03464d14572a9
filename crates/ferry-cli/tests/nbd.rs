//! `ferry nbd info|list|map` against qemu-nbd: JSON and text output, block status equal to
//! `nbdinfo --map`, and a clear error for a missing export.

use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &[])
}

#[test]
fn info_list_and_map_an_export() {
    let dir = ferry_testkit::scratch_dir();
    let img = dir.path().join("t.qcow2");
    let img = img.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "qcow2", img, "16M"]);
    ferry_testkit::qemu_img(&["bitmap", "--add", img, "b0"]);
    ferry_testkit::qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 7 1M 64k",
        "-c",
        "write 9M 128k",
        img,
    ]);
    let nbd = ferry_testkit::QemuNbd::new(img)
        .format("qcow2")
        .read_only(true)
        .export_name("disk0")
        .bitmap("b0")
        .start();
    let uri = nbd.uri();

    let out = ferry(&["nbd", "info", "--json", &uri]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["size"], 16 << 20);
    assert_eq!(info["read_only"], true);
    assert_eq!(info["negotiated_with"], "NBD_OPT_GO");

    let out = ferry(&["nbd", "list", &uri]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "disk0");

    for context in ["base:allocation", "qemu:dirty-bitmap:b0"] {
        let out = ferry(&["nbd", "map", "--json", "--context", context, &uri]);
        assert!(out.status.success());
        let ours: Vec<(u64, u64, u64)> =
            serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["offset"].as_u64().unwrap(),
                        e["length"].as_u64().unwrap(),
                        e["flags"].as_u64().unwrap(),
                    )
                })
                .collect();
        let theirs = ferry_testkit::run_ok(
            Command::new(ferry_testkit::tool("nbdinfo"))
                .arg(format!("--map={context}"))
                .arg(&uri),
        );
        let mut want: Vec<(u64, u64, u64)> = Vec::new();
        for l in theirs.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(3)
                .map(|x| x.parse().unwrap())
                .collect();
            match want.last_mut() {
                Some(last) if last.2 == f[2] && last.0 + last.1 == f[0] => last.1 += f[1],
                _ => want.push((f[0], f[1], f[2])),
            }
        }
        assert_eq!(ours, want, "{context}");
    }

    let missing = uri.replace("/disk0?", "/nope?");
    let out = ferry(&["nbd", "info", &missing]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("export `nope`") && err.contains("NBD_REP_ERR_UNKNOWN"),
        "{err}"
    );
}
