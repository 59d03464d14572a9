//! Client against qemu-nbd: image bytes, base:allocation, dirty bitmaps, TLS.

mod common;

use common::*;
use ferry_core::{BlockSource, block::read_all};
use ferry_nbd::{NbdClient, NbdConfig, NbdError};
use ferry_testkit::{QemuNbd, TlsFiles, qemu_img, qemu_io, scratch_dir};

fn make_image(dir: &std::path::Path) -> String {
    let img = dir.join("t.qcow2").display().to_string();
    qemu_img(&["create", "-f", "qcow2", &img, "16M"]);
    qemu_img(&["bitmap", "--add", "--granularity", "64k", &img, "b0"]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 4M 128k",
        "-c",
        "write -P 0x33 10M 4k",
        "-c",
        "write -P 0x44 15M 1M",
        "-c",
        "write -z 12M 64k",
        &img,
    ]);
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_qcow2_bytes_and_maps_like_nbdinfo() {
    let dir = scratch_dir();
    let img = make_image(dir.path());
    let raw = dir.path().join("t.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &img,
        raw.to_str().unwrap(),
    ]);
    let expect = std::fs::read(&raw).unwrap();

    let nbd = QemuNbd::new(&img)
        .format("qcow2")
        .read_only(true)
        .export_name("disk0")
        .bitmap("b0")
        .start();
    let cfg = NbdConfig::from_uri(&nbd.uri())
        .unwrap()
        .with_meta_context("qemu:dirty-bitmap:b0");
    let client = NbdClient::connect(cfg).await.unwrap();
    let info = client.info().clone();
    assert_eq!(info.size, 16 << 20);
    assert!(info.structured_replies && info.used_go && info.read_only());
    assert_eq!(
        client.connections(),
        4,
        "qemu-nbd advertises multi-conn for read-only exports"
    );

    // Every byte, in one call (pipelined over all connections).
    let mut got = vec![0xffu8; expect.len()];
    client.read(0, &mut got).await.unwrap();
    assert!(got == expect, "bytes differ from qemu-img convert");
    // Through the BlockSource trait, which skips unallocated ranges.
    assert!(read_all(&client).await.unwrap() == expect);
    let mut odd = vec![0u8; 12345];
    client.read(4 * 1024 * 1024 - 100, &mut odd).await.unwrap();
    assert_eq!(odd[..], expect[4 * 1024 * 1024 - 100..][..12345]);
    // Shared reads (one request each, the reply's own buffer or holes filled in), chunk by
    // chunk, unaligned, and the whole disk in one request.
    let mut ranges: Vec<(u64, usize)> = (0..16).map(|i| (i << 20, 1 << 20)).collect();
    ranges.extend([(4 * 1024 * 1024 - 100, 12345), (0, 16 << 20)]);
    for (o, len) in ranges {
        let b = client.read_shared(o, len).await.unwrap();
        assert!(
            b[..] == expect[o as usize..][..len],
            "shared read of {len} at {o}"
        );
    }

    let ours = rows(
        client
            .block_status("base:allocation", 0..info.size)
            .await
            .unwrap(),
    );
    assert_eq!(ours, nbdinfo_map(&nbd.uri(), None));
    let alloc = BlockSource::allocated(&client, 0..info.size).await.unwrap();
    let want: Vec<(u64, u64)> = ours
        .iter()
        .filter(|r| r.2 == 0)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(
        alloc
            .iter()
            .map(|e| (e.offset, e.length))
            .collect::<Vec<_>>(),
        want
    );

    let dirty = rows(
        client
            .block_status("qemu:dirty-bitmap:b0", 0..info.size)
            .await
            .unwrap(),
    );
    assert_eq!(dirty, nbdinfo_map(&nbd.uri(), Some("qemu:dirty-bitmap:b0")));
    let changed = client.changed_extents("b0", 0..info.size).await.unwrap();
    let want: Vec<(u64, u64)> = dirty
        .iter()
        .filter(|r| r.2 == 1)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(
        changed
            .iter()
            .map(|e| (e.offset, e.length))
            .collect::<Vec<_>>(),
        want
    );
    assert!(changed.contains(10 << 20) && changed.contains(15 << 20) && !changed.contains(0));

    // Not negotiated: a clear error, not a wrong answer.
    let err = client.changed_extents("nope", 0..4096).await.unwrap_err();
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"), "{err}");
    // Past the end.
    let err = client.read(info.size - 1, &mut [0u8; 2]).await.unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_is_named_in_the_error() {
    let dir = scratch_dir();
    let img = dir.path().join("e.raw");
    qemu_img(&["create", "-f", "raw", img.to_str().unwrap(), "1M"]);
    let nbd = QemuNbd::new(&img)
        .format("raw")
        .export_name("disk0")
        .start();
    let uri = nbd.uri().replace("/disk0?", "/nosuch?");
    let err = NbdClient::connect_uri(&uri).await.unwrap_err();
    let s = err.to_string();
    assert!(matches!(err, NbdError::Refused { .. }), "{s}");
    assert!(
        s.contains("nosuch") && s.contains("NBD_REP_ERR_UNKNOWN") && s.contains("unix:"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_ca_and_by_fingerprint() {
    let dir = scratch_dir();
    let img = dir.path().join("t.raw");
    let data = pattern(2 << 20, 9);
    std::fs::write(&img, &data).unwrap();
    let tls = TlsFiles::generate();
    let nbd = QemuNbd::new(&img)
        .format("raw")
        .read_only(true)
        .export_name("d")
        .tls(&tls)
        .tcp(true)
        .start();
    assert!(nbd.uri().starts_with("nbds://"));

    let cfg = NbdConfig::from_uri(&nbd.uri())
        .unwrap()
        .with_tls_ca_pem(tls.ca_cert_pem());
    let c = NbdClient::connect(cfg).await.unwrap();
    assert!(c.info().tls);
    let mut got = vec![0u8; data.len()];
    c.read(0, &mut got).await.unwrap();
    assert!(got == data);
    c.close().await;

    let cfg = NbdConfig::from_uri(&nbd.uri())
        .unwrap()
        .with_tls_fingerprint(&tls.fingerprint_sha256())
        .unwrap();
    let c = NbdClient::connect(cfg).await.unwrap();
    let mut got = vec![0u8; 4096];
    c.read(4096, &mut got).await.unwrap();
    assert_eq!(got[..], data[4096..8192]);
    c.close().await;

    // A different pin is refused, naming the server.
    let wrong = format!("sha256:{}", vec!["00"; 32].join(":"));
    let cfg = NbdConfig::from_uri(&nbd.uri())
        .unwrap()
        .with_tls_fingerprint(&wrong)
        .unwrap();
    let err = NbdClient::connect(cfg).await.unwrap_err();
    assert!(matches!(err, NbdError::Tls { .. }), "{err}");
    assert!(
        err.to_string().contains("does not match") && err.to_string().contains("127.0.0.1"),
        "{err}"
    );

    // A CA that did not sign the server is refused.
    let other = TlsFiles::generate();
    let cfg = NbdConfig::from_uri(&nbd.uri())
        .unwrap()
        .with_tls_ca_pem(other.ca_cert_pem());
    let err = NbdClient::connect(cfg).await.unwrap_err();
    assert!(matches!(err, NbdError::Tls { .. }), "{err}");

    // Plain NBD against a TLS-only server says TLS is needed.
    let plain = nbd.uri().replacen("nbds://", "nbd://", 1);
    let err = NbdClient::connect_uri(&plain).await.unwrap_err();
    assert!(err.to_string().contains("requires TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_a_qemu_nbd_target() {
    let dir = scratch_dir();
    let img = dir.path().join("w.qcow2");
    let img = img.to_str().unwrap();
    qemu_img(&["create", "-f", "qcow2", img, "8M"]);
    let nbd = QemuNbd::new(img).format("qcow2").export_name("w").start();
    let c = NbdClient::connect_uri(&nbd.uri()).await.unwrap();
    assert!(!c.info().read_only());
    let data = pattern(3 << 20, 1);
    ferry_core::BlockTarget::write_at(&c, 1 << 20, &data)
        .await
        .unwrap();
    ferry_core::BlockTarget::write_zeroes(&c, (1 << 20) + 4096, 8192)
        .await
        .unwrap();
    ferry_core::BlockTarget::flush(&c).await.unwrap();
    c.close().await;
    drop(nbd);
    let raw = dir.path().join("w.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img,
        raw.to_str().unwrap(),
    ]);
    let got = std::fs::read(&raw).unwrap();
    let mut expect = vec![0u8; 8 << 20];
    expect[1 << 20..(1 << 20) + data.len()].copy_from_slice(&data);
    expect[(1 << 20) + 4096..(1 << 20) + 4096 + 8192].fill(0);
    assert!(got == expect, "image content differs");
}
