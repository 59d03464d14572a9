//! Hostile and broken images: every failure is a clear error naming the file and the structure,
//! never a panic; plus the fuzz entry point run on mutated real images.

mod common;

use common::*;
use ferry_image::{Format, ImageWriter, OutputFormat, WriterOptions, fuzzing, open_image};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

async fn open_err(path: &Path) -> String {
    match open_image(path).await {
        Ok(img) => panic!("{} opened although broken: {:?}", path.display(), img.info),
        Err(e) => e.to_string(),
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn qemu_image(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ferry_testkit::qemu_img(&["create", "-q", "-f", fmt, "-o", opts, s(&p), size]);
    write_pattern(&p, fmt, parse_size(size), 5);
    p
}

fn parse_size(s: &str) -> u64 {
    s.trim_end_matches('M').parse::<u64>().unwrap() << 20
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_files() {
    let (_d, dir) = scratch();
    for (name, fmt, opts, want) in [
        (
            "t.vhd",
            "vpc",
            "subformat=dynamic,force_size=on",
            "VHD footer",
        ),
        ("t.vhdx", "vhdx", "block_size=1M", "VHDX BAT entry"),
        ("t.vmdk", "vmdk", "subformat=monolithicSparse", "VMDK"),
    ] {
        let p = qemu_image(&dir, name, fmt, opts, "8M");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 70_000)
            .unwrap();
        let err = match open_image(&p).await {
            Err(e) => e.to_string(),
            // A sparse VMDK's grain tables may all precede the cut: then the read must fail.
            Ok(img) => ferry_core::block::read_all(img.source.as_ref())
                .await
                .unwrap_err()
                .to_string(),
        };
        assert!(
            err.contains(&*p.display().to_string()),
            "{name}: error does not name the file: {err}"
        );
        assert!(
            err.contains(want) || err.contains("past the end"),
            "{name}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checksums() {
    let (_d, dir) = scratch();
    let vhd = qemu_image(&dir, "c.vhd", "vpc", "subformat=dynamic", "4M");
    let len = std::fs::metadata(&vhd).unwrap().len();
    patch(&vhd, len - 512 + 48, &[0x7f]); // current size, checksum now wrong
    let err = open_err(&vhd).await;
    assert!(
        err.contains("VHD footer") && err.contains("checksum"),
        "{err}"
    );

    let vhdx = qemu_image(&dir, "c.vhdx", "vhdx", "block_size=1M", "4M");
    // One bad header: the other one is used.
    patch(&vhdx, 64 * 1024 + 100, &[0xEE]);
    open_image(&vhdx).await.expect("one valid header suffices");
    patch(&vhdx, 128 * 1024 + 100, &[0xEE]);
    let err = open_err(&vhdx).await;
    assert!(
        err.contains("VHDX headers") && err.contains("CRC-32C"),
        "{err}"
    );

    let vhdx = qemu_image(&dir, "r.vhdx", "vhdx", "block_size=1M", "4M");
    patch(&vhdx, 192 * 1024 + 40, &[0xEE]);
    patch(&vhdx, 256 * 1024 + 40, &[0xEE]);
    let err = open_err(&vhdx).await;
    assert!(
        err.contains("region table") && err.contains("CRC-32C"),
        "{err}"
    );
}

fn vhdx_with_header_patch(dir: &Path, name: &str, f: impl Fn(&mut [u8])) -> PathBuf {
    // Rewrite both headers with `f` applied and a correct CRC, so only the semantic check fails.
    let p = qemu_image(dir, name, "vhdx", "block_size=1M", "4M");
    let mut data = std::fs::read(&p).unwrap();
    for off in [64 * 1024usize, 128 * 1024] {
        let h = &mut data[off..off + 4096];
        f(h);
        h[4..8].fill(0);
        let crc = crc32c(h);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&p, data).unwrap();
    p
}

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_log_is_refused_not_ignored() {
    let (_d, dir) = scratch();
    let p = vhdx_with_header_patch(&dir, "log.vhdx", |h| h[48..64].copy_from_slice(&[0x11; 16]));
    let err = open_err(&p).await;
    assert!(
        err.contains("log is not empty") && err.contains("log.vhdx"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bat_entries_past_the_end() {
    let (_d, dir) = scratch();
    // VHDX: find the first present BAT entry (state 6) and point it far away.
    let p = qemu_image(&dir, "b.vhdx", "vhdx", "block_size=1M", "8M");
    let data = std::fs::read(&p).unwrap();
    let rt = 192 * 1024;
    let bat_guid = [
        0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A,
        0x08,
    ];
    let entry = (0..4)
        .map(|i| rt + 16 + i * 32)
        .find(|e| data[*e..*e + 16] == bat_guid)
        .expect("BAT region entry");
    let bat_off = u64::from_le_bytes(data[entry + 16..entry + 24].try_into().unwrap()) as usize;
    let bat = (0..64)
        .map(|i| bat_off + i * 8)
        .find(|o| u64::from_le_bytes(data[*o..*o + 8].try_into().unwrap()) & 7 == 6)
        .expect("a present BAT entry");
    patch(&p, bat as u64, &((4000u64 << 20) | 6).to_le_bytes());
    let err = open_err(&p).await;
    assert!(
        err.contains("VHDX BAT entry") && err.contains("outside the file"),
        "{err}"
    );

    // VHD: BAT is at the offset the dynamic header names; point entry 0 past the end.
    let p = qemu_image(
        &dir,
        "b.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
        "8M",
    );
    let data = std::fs::read(&p).unwrap();
    let table = u64::from_be_bytes(data[512 + 16..512 + 24].try_into().unwrap());
    patch(&p, table, &0x00FF_0000u32.to_be_bytes());
    let err = open_err(&p).await;
    assert!(
        err.contains("VHD BAT entry 0") && err.contains("past the end"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_sizes() {
    let (_d, dir) = scratch();
    let p = qemu_image(&dir, "a.vmdk", "vmdk", "subformat=monolithicSparse", "4M");
    patch(&p, 12, &(u64::MAX / 4).to_le_bytes());
    let err = open_err(&p).await;
    assert!(
        err.contains("VMDK sparse header") && err.contains("absurd"),
        "{err}"
    );

    let p = dir.join("absurd.vmdk");
    std::fs::write(&p, "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 99999999999999999 FLAT \"x-flat.vmdk\" 0\n").unwrap();
    let err = open_err(&p).await;
    assert!(err.contains("absurd"), "{err}");

    let p = qemu_image(
        &dir,
        "a.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
        "4M",
    );
    // 2^60 bytes current size with a fixed-up checksum.
    let mut data = std::fs::read(&p).unwrap();
    let len = data.len();
    for base in [0, len - 512] {
        let f = &mut data[base..base + 512];
        f[48..56].copy_from_slice(&(1u64 << 60).to_be_bytes());
        f[64..68].fill(0);
        let sum = !f.iter().fold(0u32, |a, b| a.wrapping_add(*b as u32));
        f[64..68].copy_from_slice(&sum.to_be_bytes());
    }
    std::fs::write(&p, data).unwrap();
    let err = open_err(&p).await;
    assert!(
        err.contains("virtual size") && err.contains("2040 GiB"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_parent_loop_and_wrong_parent() {
    let (_d, dir) = scratch();
    let base = qemu_image(
        &dir,
        "base.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
        "4M",
    );
    let child = dir.join("child.vhd");
    let opts = WriterOptions {
        block_size: None,
        parent: Some(base.clone()),
    };
    let mut w = ImageWriter::create_with(&child, OutputFormat::VhdDynamic, 4 << 20, &opts).unwrap();
    w.write(0, &[1; 512]).unwrap();
    w.finish().unwrap();
    open_image(&child).await.expect("intact chain opens");

    // Wrong parent: another disk under the parent's name.
    std::fs::rename(&base, dir.join("saved.vhd")).unwrap();
    qemu_image(
        &dir,
        "base.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
        "4M",
    );
    let err = open_err(&child).await;
    assert!(
        err.contains("parent chain") && err.contains("not the image this one was made from"),
        "{err}"
    );

    // Missing parent.
    std::fs::remove_file(&base).unwrap();
    let err = open_err(&child).await;
    assert!(
        err.contains("child.vhd") && err.contains("parent not found") && err.contains("base.vhd"),
        "{err}"
    );

    // Loop: the parent's place is taken by a copy of the child, which names itself as parent.
    std::fs::copy(&child, &base).unwrap();
    let err = open_err(&child).await;
    assert!(err.contains("loop"), "{err}");

    // VMDK: a delta naming itself.
    let p = dir.join("self.vmdk");
    std::fs::write(
        &p,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=12345678\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"self.vmdk\"\nRW 8 FLAT \"self.vmdk\" 0\n",
    )
    .unwrap();
    let err = open_err(&p).await;
    assert!(err.contains("loop") || err.contains("shorter"), "{err}");
}

#[test]
fn fuzz_entry_point_on_garbage() {
    for len in [0usize, 1, 8, 511, 512, 513, 4096, 70_000] {
        let mut v = vec![0u8; len];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        for f in [
            None,
            Some(Format::Vhd),
            Some(Format::Vhdx),
            Some(Format::Vmdk),
            Some(Format::Raw),
        ] {
            let _ = fuzzing::open_and_read(f, &v);
        }
        if len >= 8 {
            v[..8].copy_from_slice(b"vhdxfile");
            let _ = fuzzing::open_and_read(None, &v);
            v[..8].copy_from_slice(b"conectix");
            let _ = fuzzing::open_and_read(None, &v);
            v[..4].copy_from_slice(b"KDMV");
            let _ = fuzzing::open_and_read(None, &v);
        }
    }
}

/// Small valid images of every kind, made once: qemu-img's and our writers' output.
fn seeds() -> &'static Vec<(String, Vec<u8>)> {
    static SEEDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let d = ferry_testkit::scratch_dir();
        let dir = d.path();
        let mut out = Vec::new();
        for (name, fmt, opts) in [
            ("q.vhd", "vpc", "subformat=dynamic"),
            ("q.vhdx", "vhdx", "block_size=1M"),
            ("q.vmdk", "vmdk", "subformat=monolithicSparse"),
        ] {
            let p = qemu_image(dir, name, fmt, opts, "3M");
            out.push((name.to_string(), std::fs::read(p).unwrap()));
        }
        let raw = dir.join("src.raw");
        ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", s(&raw), "3M"]);
        write_pattern(&raw, "raw", 3 << 20, 9);
        let data = std::fs::read(&raw).unwrap();
        for (name, f, block) in [
            ("w.vhd", OutputFormat::VhdDynamic, Some(64 * 1024)),
            ("w.vmdk", OutputFormat::VmdkStream, None),
            ("w.vhdx", OutputFormat::Vhdx, Some(1 << 20)),
        ] {
            let p = dir.join(name);
            let mut w = ImageWriter::create_with(
                &p,
                f,
                3 << 20,
                &WriterOptions {
                    block_size: block,
                    parent: None,
                },
            )
            .unwrap();
            w.write(0, &data).unwrap();
            w.finish().unwrap();
            out.push((name.to_string(), std::fs::read(p).unwrap()));
        }
        // A differencing VHD over the first seed: its parent is missing in memory, which must
        // be a clean error too.
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(
        which in 0usize..6,
        flips in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..3), 1..24),
        cut in proptest::option::of(any::<u32>()),
    ) {
        let (_, orig) = &seeds()[which];
        let mut data = orig.clone();
        let len = data.len();
        for (pos, val, region) in flips {
            // Aim at headers, at footers, or anywhere.
            let p = match region {
                0 => pos as usize % len.min(1 << 20),
                1 => len - 1 - pos as usize % len.min(4096),
                _ => pos as usize % len,
            };
            data[p] = val;
        }
        if let Some(c) = cut {
            data.truncate(c as usize % (len + 1));
        }
        let _ = fuzzing::open_and_read(None, &data);
    }
}
