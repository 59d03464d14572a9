//! Our readers against `qemu-img convert -O raw`, for every format and subformat qemu-img can
//! create, at several sizes, with content written by qemu-io.

mod common;

use common::*;
use ferry_core::BlockSource;
use ferry_core::block::read_all;
use ferry_image::{FileSource, Format, open_image};
use std::path::Path;

async fn check(path: &Path, qemu_fmt: &str, dir: &Path, expect_format: Format, expect_sub: &str) {
    let raw_path = qemu_raw_file(path, qemu_fmt, dir);
    let raw = FileSource::open(&raw_path).expect("open converted raw");
    let img = open_image(path)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    assert_eq!(img.info.format, expect_format, "{}", path.display());
    assert_eq!(img.info.subformat, expect_sub, "{}", path.display());
    let size = raw.size();
    assert_eq!(
        img.source.size(),
        size,
        "virtual size of {}",
        path.display()
    );
    let ours = img.source.allocated(0..size).await.expect("allocated");
    // qemu-img convert leaves zeros as holes, so the raw file's data map bounds the non-zero bytes.
    let theirs = raw.allocated(0..size).await.expect("raw allocated");
    let mut a = vec![0u8; 4 << 20];
    let mut b = vec![0u8; 4 << 20];
    for e in ours.union(&theirs).iter() {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(a.len() as u64) as usize;
            img.source
                .read_at(pos, &mut a[..n])
                .await
                .expect("read image");
            raw.read_at(pos, &mut b[..n]).await.expect("read raw");
            if a[..n] != b[..n] {
                let i = a[..n]
                    .iter()
                    .zip(&b[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                panic!(
                    "{}: byte {} differs from qemu-img convert",
                    path.display(),
                    pos + i as u64
                );
            }
            let hole = ours.complement(pos..pos + n as u64);
            for h in hole.iter() {
                let at = (h.offset - pos) as usize;
                assert!(
                    b[at..at + h.length as usize].iter().all(|x| *x == 0),
                    "{}: non-zero data at {} outside our allocation map",
                    path.display(),
                    h.offset
                );
            }
            pos += n as u64;
        }
    }
    // Sparse formats must not report everything: the pattern leaves most of the disk empty.
    if !matches!(
        expect_sub,
        "fixed" | "monolithicFlat" | "twoGbMaxExtentFlat"
    ) {
        assert!(
            ours.total_len() < size,
            "{}: allocation map covers the whole disk: {ours:?}",
            path.display()
        );
    }
    if size <= 64 << 20 {
        let want = std::fs::read(&raw_path).expect("read raw");
        let got = read_all(img.source.as_ref()).await.expect("read_all");
        assert!(
            got == want,
            "{}: bytes differ from qemu-img convert",
            path.display()
        );
        let strided = read_strided(img.source.as_ref(), 65536 + 4096 + 512 * 3).await;
        assert!(strided == want, "{}: strided reads differ", path.display());
        assert_covers(&ours, &want, &path.display().to_string());
    } else {
        // Spot-check that unallocated ranges really read as zeros.
        for e in ours.complement(0..size).iter().take(8) {
            let n = e.length.min(1 << 20) as usize;
            img.source
                .read_at(e.offset, &mut a[..n])
                .await
                .expect("read hole");
            assert!(
                a[..n].iter().all(|x| *x == 0),
                "{}: hole at {} reads non-zero",
                path.display(),
                e.offset
            );
        }
    }
}

async fn qemu_case(fmt: &str, opts: &str, size: u64, seed: u64, expect: Format, sub: &str) {
    let (_d, dir) = scratch();
    let ext = if fmt == "vpc" { "vhd" } else { fmt };
    let path = dir.join(format!("disk.{ext}"));
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size_s = size.to_string();
    args.extend([s(&path), size_s.as_str()]);
    ferry_testkit::qemu_img(&args);
    // qemu may round the size (VHD CHS geometry): write within what it made.
    let info = ferry_testkit::qemu_img(&["info", "--output=json", "-f", fmt, s(&path)]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    let vsize = info["virtual-size"]
        .as_u64()
        .expect("virtual-size in qemu-img info");
    write_pattern(&path, fmt, vsize, seed);
    check(&path, fmt, &dir, expect, sub).await;
}

const SIZES: [u64; 3] = [(5 << 20) + 3 * 512, 16 << 20, (37 << 20) + 64 * 1024];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_dynamic() {
    for (i, size) in SIZES.iter().enumerate() {
        qemu_case(
            "vpc",
            "subformat=dynamic",
            *size,
            i as u64,
            Format::Vhd,
            "dynamic",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_fixed() {
    for (i, size) in SIZES.iter().enumerate() {
        qemu_case(
            "vpc",
            "subformat=fixed",
            *size,
            10 + i as u64,
            Format::Vhd,
            "fixed",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_force_size() {
    qemu_case(
        "vpc",
        "subformat=dynamic,force_size=on",
        SIZES[0],
        3,
        Format::Vhd,
        "dynamic",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_dynamic() {
    for (i, size) in SIZES.iter().enumerate() {
        qemu_case(
            "vhdx",
            "block_size=1M",
            *size,
            20 + i as u64,
            Format::Vhdx,
            "dynamic",
        )
        .await;
    }
    qemu_case("vhdx", "", SIZES[2], 24, Format::Vhdx, "dynamic").await;
    qemu_case(
        "vhdx",
        "block_size=2M,log_size=1M",
        SIZES[1],
        25,
        Format::Vhdx,
        "dynamic",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_fixed() {
    qemu_case(
        "vhdx",
        "subformat=fixed,block_size=1M",
        SIZES[0],
        30,
        Format::Vhdx,
        "fixed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_monolithic_sparse() {
    for (i, size) in SIZES.iter().enumerate() {
        qemu_case(
            "vmdk",
            "subformat=monolithicSparse",
            *size,
            40 + i as u64,
            Format::Vmdk,
            "monolithicSparse",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_monolithic_flat() {
    for (i, size) in SIZES.iter().enumerate() {
        qemu_case(
            "vmdk",
            "subformat=monolithicFlat",
            *size,
            50 + i as u64,
            Format::Vmdk,
            "monolithicFlat",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_two_gb_sparse() {
    // Bigger than one 2 GiB extent, so the descriptor lists several; still tiny on disk.
    qemu_case(
        "vmdk",
        "subformat=twoGbMaxExtentSparse",
        (2 << 30) + (7 << 20),
        60,
        Format::Vmdk,
        "twoGbMaxExtentSparse",
    )
    .await;
    qemu_case(
        "vmdk",
        "subformat=twoGbMaxExtentSparse",
        SIZES[0],
        61,
        Format::Vmdk,
        "twoGbMaxExtentSparse",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_two_gb_flat() {
    qemu_case(
        "vmdk",
        "subformat=twoGbMaxExtentFlat",
        SIZES[1],
        70,
        Format::Vmdk,
        "twoGbMaxExtentFlat",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_stream_optimized() {
    for (i, size) in SIZES.iter().enumerate() {
        let (_d, dir) = scratch();
        let raw = dir.join("src.raw");
        ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", s(&raw), &size.to_string()]);
        write_pattern(&raw, "raw", *size, 80 + i as u64);
        let path = dir.join("disk.vmdk");
        ferry_testkit::qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&raw),
            s(&path),
        ]);
        check(&path, "vmdk", &dir, Format::Vmdk, "streamOptimized").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sparse_file() {
    let (_d, dir) = scratch();
    let path = dir.join("disk.img");
    ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", s(&path), "64M"]);
    write_pattern(&path, "raw", 64 << 20, 90);
    check(&path, "raw", &dir, Format::Raw, "raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_snapshot_chain() {
    let (_d, dir) = scratch();
    let base = dir.join("base.vmdk");
    let mid = dir.join("snap-000001.vmdk");
    let top = dir.join("snap-000002.vmdk");
    let size = 9 << 20;
    ferry_testkit::qemu_img(&["create", "-q", "-f", "vmdk", s(&base), &size.to_string()]);
    write_pattern(&base, "vmdk", size, 100);
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&mid),
    ]);
    write_pattern(&mid, "vmdk", size, 101);
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "snap-000001.vmdk",
        "-F",
        "vmdk",
        s(&top),
    ]);
    ferry_testkit::qemu_io(&[
        "-f",
        "vmdk",
        "-c",
        "write -P 0x77 1048576 70000",
        "-c",
        "write -z 3145728 65536",
        s(&top),
    ]);
    let img = open_image(&top).await.expect("open chain");
    assert_eq!(img.info.chain().len(), 3, "{:?}", img.info);
    check(&top, "vmdk", &dir, Format::Vmdk, "monolithicSparse").await;
}
