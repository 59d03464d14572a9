//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use ferry_core::{BlockSource, ExtentMap};
use std::path::{Path, PathBuf};

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes a content pattern with qemu-io: blocks of different bytes at aligned and unaligned
/// offsets (straddling 64 KiB grains and 1/2 MiB blocks), plus an explicit zero write.
pub fn write_pattern(path: &Path, fmt: &str, size: u64, seed: u64) {
    let mut cmds: Vec<String> = Vec::new();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..12u64 {
        let len = 512 * (1 + next() % 300);
        let off = (next() % (size / 512)) * 512;
        let len = len.min(size - off);
        cmds.push(format!(
            "write -P {} {off} {len}",
            1 + (i * 17 + seed) % 250
        ));
    }
    // Straddle block boundaries explicitly, and touch the very last sector.
    cmds.push(format!("write -P 0x5a {} 4096", (1 << 20) - 2048));
    cmds.push(format!("write -P 0x6b {} 512", size - 512));
    cmds.push("write -z 0 65536".to_string());
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(path));
    ferry_testkit::qemu_io(&args);
}

/// `qemu-img convert -O raw` of `path` into a sparse file; its path.
pub fn qemu_raw_file(path: &Path, fmt: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.qemu.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    ferry_testkit::qemu_img(&["convert", "-f", fmt, "-O", "raw", s(path), s(&out)]);
    out
}

/// `qemu-img convert -O raw` of `path`, read back.
pub fn qemu_raw(path: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.qemu.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    ferry_testkit::qemu_img(&["convert", "-f", fmt, "-O", "raw", s(path), s(&out)]);
    std::fs::read(out).expect("read converted raw")
}

/// Asserts every non-zero byte of `data` lies in `map`.
pub fn assert_covers(map: &ExtentMap, data: &[u8], what: &str) {
    for hole in map.complement(0..data.len() as u64).iter() {
        let bytes = &data[hole.offset as usize..hole.end() as usize];
        if let Some(i) = bytes.iter().position(|b| *b != 0) {
            panic!(
                "{what}: non-zero byte at {} lies outside the allocated extents {map:?}",
                hole.offset + i as u64
            );
        }
    }
}

/// Reads the whole source with an odd stride so reads straddle blocks and grains.
pub async fn read_strided(src: &dyn BlockSource, stride: usize) -> Vec<u8> {
    let size = src.size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = stride.min(size - pos);
        src.read_at(pos as u64, &mut out[pos..pos + n])
            .await
            .expect("strided read");
        pos += n;
    }
    out
}

pub fn scratch() -> (tempfile::TempDir, PathBuf) {
    let d = ferry_testkit::scratch_dir();
    let p = d.path().to_path_buf();
    (d, p)
}
