//! Writers: each output passes `qemu-img check` (where qemu has a checker for the format),
//! `qemu-img compare` says it equals the source, and our own reader reads it back. Also the
//! differencing fixtures qemu-img cannot make: VHD and VHDX children over a qemu-made parent.

mod common;

use common::*;
use ferry_core::BlockSource;
use ferry_core::block::read_all;
use ferry_image::{FileSource, Format, ImageWriter, OutputFormat, WriterOptions, open_image};
use std::path::Path;
use std::process::Command;

/// Feeds `src` to a writer the way the restore engine will: allocated extents in ascending
/// order, in pieces of odd sizes.
async fn feed(src: &dyn BlockSource, w: &mut ImageWriter, piece: usize) {
    let map = src.allocated(0..src.size()).await.expect("allocated");
    let mut buf = vec![0u8; piece];
    for e in map.iter() {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(piece as u64) as usize;
            src.read_at(pos, &mut buf[..n]).await.expect("read source");
            w.write(pos, &buf[..n]).expect("write");
            pos += n as u64;
        }
    }
}

fn qemu_check(fmt: &str, path: &Path) {
    if matches!(fmt, "vhdx" | "vmdk") {
        ferry_testkit::qemu_img(&["check", "-f", fmt, s(path)]);
    }
}

fn qemu_compare(raw: &Path, fmt: &str, path: &Path) {
    let out = Command::new(ferry_testkit::tool("qemu-img"))
        .args(["compare", "-f", "raw", "-F", fmt, s(raw), s(path)])
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare {} vs {} ({fmt}): {}{}",
        raw.display(),
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn round_trip(
    format: OutputFormat,
    qemu_fmt: &str,
    ext: &str,
    size: u64,
    opts: WriterOptions,
    expect: (Format, &str),
) {
    let (_d, dir) = scratch();
    let raw = dir.join("src.raw");
    ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", s(&raw), &size.to_string()]);
    write_pattern(&raw, "raw", size, size % 97);
    let src = FileSource::open(&raw).unwrap();
    let out = dir.join(format!("out.{ext}"));
    let mut w = ImageWriter::create_with(&out, format, size, &opts).unwrap();
    assert!(
        !out.exists(),
        "the final name must not exist before finish()"
    );
    feed(&src, &mut w, 3 * 65536 + 512).await;
    w.finish().unwrap();
    qemu_check(qemu_fmt, &out);
    qemu_compare(&raw, qemu_fmt, &out);
    let img = open_image(&out).await.unwrap();
    assert_eq!((img.info.format, img.info.subformat.as_str()), expect);
    assert_eq!(
        read_all(img.source.as_ref()).await.unwrap(),
        std::fs::read(&raw).unwrap()
    );
    // Zero blocks are not stored: the pattern touches a small part of the disk.
    let file_len = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap()) * 512;
    let alloc = img.source.allocated(0..size).await.unwrap().total_len();
    if format != OutputFormat::VhdFixed && format != OutputFormat::Raw {
        assert!(alloc < size, "{ext}: everything allocated");
        assert!(
            file_len < size + (8 << 20),
            "{ext}: file uses {file_len} bytes for {size}"
        );
    }
}

const SIZE: u64 = (13 << 20) + 7 * 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw() {
    round_trip(
        OutputFormat::Raw,
        "raw",
        "img",
        SIZE,
        WriterOptions::default(),
        (Format::Raw, "raw"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_fixed() {
    round_trip(
        OutputFormat::VhdFixed,
        "vpc",
        "vhd",
        SIZE,
        WriterOptions::default(),
        (Format::Vhd, "fixed"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_dynamic() {
    round_trip(
        OutputFormat::VhdDynamic,
        "vpc",
        "vhd",
        SIZE,
        WriterOptions::default(),
        (Format::Vhd, "dynamic"),
    )
    .await;
    let small = WriterOptions {
        block_size: Some(64 * 1024),
        parent: None,
    };
    round_trip(
        OutputFormat::VhdDynamic,
        "vpc",
        "vhd",
        4 << 20,
        small,
        (Format::Vhd, "dynamic"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_dynamic() {
    round_trip(
        OutputFormat::Vhdx,
        "vhdx",
        "vhdx",
        SIZE,
        WriterOptions::default(),
        (Format::Vhdx, "dynamic"),
    )
    .await;
    let small = WriterOptions {
        block_size: Some(1 << 20),
        parent: None,
    };
    round_trip(
        OutputFormat::Vhdx,
        "vhdx",
        "vhdx",
        SIZE,
        small,
        (Format::Vhdx, "dynamic"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_sparse() {
    round_trip(
        OutputFormat::VmdkSparse,
        "vmdk",
        "vmdk",
        SIZE,
        WriterOptions::default(),
        (Format::Vmdk, "monolithicSparse"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_stream() {
    round_trip(
        OutputFormat::VmdkStream,
        "vmdk",
        "vmdk",
        SIZE,
        WriterOptions::default(),
        (Format::Vmdk, "streamOptimized"),
    )
    .await;
}

#[test]
fn abandoned_writer_leaves_nothing() {
    let (_d, dir) = scratch();
    let out = dir.join("x.vhdx");
    let mut w = ImageWriter::create(&out, OutputFormat::Vhdx, 8 << 20).unwrap();
    w.write(0, &[1u8; 4096]).unwrap();
    let err = w.write(0, &[1u8; 512]).unwrap_err().to_string();
    assert!(err.contains("backwards"), "{err}");
    let err = w.write(8 << 20, &[1u8; 512]).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
    drop(w);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "temporary file left behind"
    );
    let err = ImageWriter::create(&out, OutputFormat::VhdDynamic, 1000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of 512"), "{err}");
}

/// A differencing child written by us over a parent made by qemu reads as the parent with
/// the child's writes laid over it.
async fn chain(parent_fmt: &str, ext: &str, format: OutputFormat, block: Option<u64>) {
    let (_d, dir) = scratch();
    let size: u64 = 24 << 20;
    let base = dir.join(format!("base.{ext}"));
    let opts = if parent_fmt == "vhdx" {
        "block_size=1M"
    } else {
        "subformat=dynamic,force_size=on"
    };
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        parent_fmt,
        "-o",
        opts,
        s(&base),
        &size.to_string(),
    ]);
    write_pattern(&base, parent_fmt, size, 7);
    let mut expect = qemu_raw(&base, parent_fmt, &dir);
    assert_eq!(expect.len() as u64, size);
    let child = dir.join(format!("child.{ext}"));
    let wopts = WriterOptions {
        block_size: block,
        parent: Some(base.clone()),
    };
    let mut w = ImageWriter::create_with(&child, format, size, &wopts).unwrap();
    // Partial blocks (sector runs), a zero run hiding parent data, a whole block.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, vec![0u8; 4096]),
        (512 * 9, vec![0xC1; 512 * 3]),
        ((1 << 20) - 1024, vec![0xC2; 2048]),
        (3 << 20, vec![0xC3; 1 << 20]),
        ((6 << 20) + 512 * 77, vec![0xC4; 512]),
        (size - 1024, vec![0xC5; 1024]),
    ];
    for (off, data) in &writes {
        w.write(*off, data).unwrap();
        expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    w.finish().unwrap();
    let img = open_image(&child).await.unwrap();
    assert_eq!(img.info.subformat, "differencing");
    assert_eq!(img.info.chain().len(), 2);
    let got = read_all(img.source.as_ref()).await.unwrap();
    assert!(
        got == expect,
        "{ext} chain differs at {:?}",
        got.iter().zip(&expect).position(|(a, b)| a != b)
    );
    assert_eq!(
        read_strided(img.source.as_ref(), 3 * 512 + 65536).await,
        expect
    );
    assert_covers(&img.source.allocated(0..size).await.unwrap(), &expect, ext);
    // A grandchild over our own child.
    let grand = dir.join(format!("grand.{ext}"));
    let gopts = WriterOptions {
        block_size: block,
        parent: Some(child.clone()),
    };
    let mut w = ImageWriter::create_with(&grand, format, size, &gopts).unwrap();
    w.write(512 * 10, &[0xD1; 512]).unwrap();
    expect[512 * 10..512 * 11].fill(0xD1);
    w.finish().unwrap();
    let img = open_image(&grand).await.unwrap();
    assert_eq!(img.info.chain().len(), 3);
    assert!(
        read_all(img.source.as_ref()).await.unwrap() == expect,
        "{ext} grandchild differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_differencing_chain() {
    chain("vpc", "vhd", OutputFormat::VhdDynamic, None).await;
    chain("vpc", "vhd", OutputFormat::VhdDynamic, Some(64 * 1024)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_differencing_chain() {
    chain("vhdx", "avhdx", OutputFormat::Vhdx, Some(1 << 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_delta_written_by_us_reads_in_qemu() {
    let (_d, dir) = scratch();
    let size: u64 = 8 << 20;
    let base = dir.join("base.vmdk");
    ferry_testkit::qemu_img(&["create", "-q", "-f", "vmdk", s(&base), &size.to_string()]);
    write_pattern(&base, "vmdk", size, 11);
    let child = dir.join("base-000001.vmdk");
    let mut w = ImageWriter::create_with(
        &child,
        OutputFormat::VmdkSparse,
        size,
        &WriterOptions {
            block_size: None,
            parent: Some(base.clone()),
        },
    )
    .unwrap();
    let mut expect = qemu_raw(&base, "vmdk", &dir);
    w.write(65536 * 3, &[0xAB; 65536]).unwrap();
    w.write(65536 * 7, &[0u8; 65536]).unwrap();
    w.finish().unwrap();
    expect[65536 * 3..65536 * 4].fill(0xAB);
    expect[65536 * 7..65536 * 8].fill(0);
    ferry_testkit::qemu_img(&["check", "-f", "vmdk", s(&child)]);
    let want = qemu_raw(&child, "vmdk", &dir);
    let img = open_image(&child).await.unwrap();
    assert_eq!(img.info.chain().len(), 2);
    assert!(
        read_all(img.source.as_ref()).await.unwrap() == want,
        "vmdk delta differs from qemu's view"
    );
    assert!(
        want == expect,
        "qemu's view of our delta is not the expected composite"
    );
    // A partly written grain would hide parent data: refused.
    let bad = dir.join("bad-000001.vmdk");
    let mut w = ImageWriter::create_with(
        &bad,
        OutputFormat::VmdkSparse,
        size,
        &WriterOptions {
            block_size: None,
            parent: Some(base.clone()),
        },
    )
    .unwrap();
    w.write(512, &[1; 512]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("whole grains"), "{err}");
    assert!(!bad.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("ferry-part"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
