//! The in-place VHDX updater (ADR 0174): random whole-block writes into dynamic and differencing
//! disks against a raw model, byte for byte; dynamic results pass `qemu-img check` and
//! `qemu-img compare`; differencing children made by `create_vhdx_child` read through to their
//! parent with Ferry's reader and, flattened by it, compare equal in qemu-img.

mod common;

use common::*;
use ferry_core::block::read_all;
use ferry_image::{
    ImageWriter, OutputFormat, VhdxBlockState, VhdxUpdater, WriterOptions, create_vhdx_child,
    fuzzing, open_image,
};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// A dynamic VHDX of `size` bytes with 1 MiB blocks holding `model`'s non-zero blocks.
fn make_dynamic(path: &Path, model: &[u8]) {
    let mut w = ImageWriter::create_with(
        path,
        OutputFormat::Vhdx,
        model.len() as u64,
        &WriterOptions {
            block_size: Some(MIB),
            parent: None,
        },
    )
    .expect("create");
    w.write(0, model).expect("write");
    w.finish().expect("finish");
}

fn block_bytes(seed: u8, len: usize) -> Vec<u8> {
    if seed == 0 {
        return vec![0; len];
    }
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect()
}

/// Applies `writes` (block, seed) to the file and to the model.
fn apply(path: &Path, model: &mut [u8], writes: &[(u64, u8)]) -> u64 {
    let mut u = VhdxUpdater::open(path).expect("open for update");
    let bs = u.block_size();
    let mut sent = 0;
    for (block, seed) in writes {
        let block = block % u.blocks();
        let len = u.block_len(block) as usize;
        let data = block_bytes(*seed, len);
        sent += u.write_block(block, &data).expect("write block");
        let at = (block * bs) as usize;
        model[at..at + len].copy_from_slice(&data);
    }
    u.finish().expect("finish");
    sent
}

async fn flat(path: &Path) -> Vec<u8> {
    let img = open_image(path).await.expect("reopen");
    read_all(img.source.as_ref()).await.expect("read")
}

fn raw_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write raw");
    p
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

#[test]
fn dynamic_updates_pass_qemu_check_and_compare() {
    let (_d, dir) = scratch();
    let size = 5 * MIB + 512 * 3; // a short last block
    let mut model = vec![0u8; size as usize];
    model[..4096].fill(9);
    model[(2 * MIB) as usize..(2 * MIB) as usize + 100].fill(3);
    let p = dir.join("disk.vhdx");
    make_dynamic(&p, &model);
    let writes = [(1, 5), (2, 0), (5, 7), (0, 11), (4, 0)];
    let sent = apply(&p, &mut model, &writes);
    // Blocks 1, 0 and the short block 5 carry data; block 2 (stored) is zeroed in place; block
    // 4 (absent) zero costs nothing.
    assert_eq!(sent, 3 * MIB + 1536);
    ferry_testkit::qemu_img(&["check", "-f", "vhdx", s(&p)]);
    let raw = raw_file(&dir, "model.raw", &model);
    ferry_testkit::qemu_img_compare(&raw, "raw", &p, "vhdx");
    assert_eq!(rt().block_on(flat(&p)), model);
    let u = VhdxUpdater::open(&p).expect("open");
    assert_eq!(u.state(4).expect("state"), VhdxBlockState::Absent);
    assert_eq!(u.state(2).expect("state"), VhdxBlockState::Present);
}

#[test]
fn differencing_child_reads_parent_until_written_and_zero_blocks_hide_it() {
    let (_d, dir) = scratch();
    let size = 4 * MIB;
    let mut model: Vec<u8> = (0..size as usize).map(|i| (i % 251) as u8 + 1).collect();
    let base = dir.join("base.vhdx");
    make_dynamic(&base, &model);
    let child = dir.join("base_1.avhdx");
    create_vhdx_child(&child, &base, None).expect("child");
    let parent_before = std::fs::read(&base).expect("read parent");
    assert_eq!(
        rt().block_on(flat(&child)),
        model,
        "an empty child reads its parent"
    );
    let sent = apply(&child, &mut model, &[(1, 4), (3, 0)]);
    assert_eq!(sent, MIB, "the zero block is a BAT state, no payload");
    assert_eq!(
        std::fs::read(&base).expect("read parent"),
        parent_before,
        "the parent is never written"
    );
    assert_eq!(rt().block_on(flat(&child)), model);
    let u = VhdxUpdater::open(&child).expect("open");
    assert!(u.is_differencing());
    assert_eq!(u.state(3).expect("state"), VhdxBlockState::Zero);
    assert_eq!(u.state(0).expect("state"), VhdxBlockState::Absent);
    drop(u);
    // A grandchild still finds its parent by DataWriteGuid after the child was updated.
    let grand = dir.join("base_2.avhdx");
    create_vhdx_child(&grand, &child, Some(2 * MIB)).expect("grandchild");
    apply(&grand, &mut model, &[(0, 9)]);
    let flat_grand = rt().block_on(flat(&grand));
    assert_eq!(flat_grand, model);
    let raw = raw_file(&dir, "flat.raw", &flat_grand);
    let expect = raw_file(&dir, "model.raw", &model);
    ferry_testkit::qemu_img_compare(&expect, "raw", &raw, "raw");
}

#[test]
fn a_child_of_a_missing_or_bad_parent_is_refused_and_leaves_nothing() {
    let (_d, dir) = scratch();
    let bad = raw_file(&dir, "bad.vhdx", &[1u8; 4096]);
    let child = dir.join("c.avhdx");
    let err = create_vhdx_child(&child, &bad, None).expect_err("bad parent");
    assert!(err.to_string().contains("vhdxfile"), "{err}");
    assert!(create_vhdx_child(&child, &dir.join("missing.vhdx"), None).is_err());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let err = VhdxUpdater::open(&bad).expect_err("not a VHDX");
    assert!(err.to_string().contains("vhdxfile"), "{err}");
}

#[test]
fn a_dirty_log_is_refused() {
    let (_d, dir) = scratch();
    let p = dir.join("d.vhdx");
    make_dynamic(&p, &vec![1u8; MIB as usize]);
    // Set a log GUID in both headers (with valid checksums): a file Hyper-V did not close.
    let mut f = std::fs::read(&p).expect("read");
    for off in [64 * 1024usize, 128 * 1024] {
        f[off + 48] = 1;
        f[off + 4..off + 8].fill(0);
        let crc = crc32c(&f[off..off + 4096]);
        f[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&p, &f).expect("write");
    let err = VhdxUpdater::open(&p).expect_err("dirty log");
    assert!(err.to_string().contains("log"), "{err}");
}

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random whole-block writes (some zero, some repeated) in two rounds, the second into a
    /// differencing child: the flattened disk equals the raw model byte for byte.
    #[test]
    fn random_block_writes_match_a_raw_model(
        blocks in 1u64..7,
        tail in 0u64..4,
        first in proptest::collection::vec((0u64..8, 0u8..4), 0..10),
        second in proptest::collection::vec((0u64..8, 0u8..4), 0..10),
    ) {
        let (_d, dir) = scratch();
        let size = blocks * MIB + tail * 512;
        let mut model = vec![0u8; size as usize];
        let p = dir.join("d.vhdx");
        make_dynamic(&p, &model);
        apply(&p, &mut model, &first);
        prop_assert_eq!(rt().block_on(flat(&p)), model.clone());
        let child = dir.join("d_1.avhdx");
        create_vhdx_child(&child, &p, Some(2 * MIB)).expect("child");
        apply(&child, &mut model, &second);
        prop_assert_eq!(rt().block_on(flat(&child)), model);
    }

    /// The updater's parser on mutated VHDX files: errors, never panics.
    #[test]
    fn mutated_headers_never_panic(flips in proptest::collection::vec((0usize..(4 << 20), any::<u8>()), 1..16)) {
        let (_d, dir) = scratch();
        let p = dir.join("m.vhdx");
        make_dynamic(&p, &vec![5u8; 2 * MIB as usize]);
        let mut data = std::fs::read(&p).expect("read");
        for (at, v) in flips {
            // Most flips land in the first 4 MiB: headers, regions, metadata, BAT.
            let at = at % data.len();
            data[at] ^= v | 1;
        }
        let _ = fuzzing::load_vhdx_for_update(&data);
    }
}

/// A checkpoint deleted the way Hyper-V does it: the middle file of base ← a ← b (a with 2 MiB
/// blocks over 1 MiB ones) is merged into base, b re-pointed at base; b reads the same,
/// qemu-img checks base.
#[test]
fn merging_a_child_into_its_parent_and_repointing_the_grandchild_keeps_the_content() {
    let (_d, dir) = scratch();
    let size = 4 * MIB;
    let mut model: Vec<u8> = vec![3u8; size as usize];
    let base = dir.join("base.vhdx");
    make_dynamic(&base, &model);
    let a = dir.join("base_a.avhdx");
    create_vhdx_child(&a, &base, Some(2 * MIB)).expect("a");
    apply(&a, &mut model, &[(1, 5), (2, 0)]);
    let at_a = model.clone();
    let b = dir.join("base_b.avhdx");
    create_vhdx_child(&b, &a, None).expect("b");
    apply(&b, &mut model, &[(1, 7), (3, 9)]);
    let sent = rt()
        .block_on(ferry_image::merge_vhdx_child(&a, &base))
        .expect("merge");
    // a's 2 MiB blocks cover all four 1 MiB blocks of the base: 2 MiB of data, 2 MiB of
    // zeros written in place (the base stores those blocks).
    assert_eq!(sent, 4 * MIB);
    assert_eq!(rt().block_on(flat(&base)), at_a, "base now holds a's point");
    // b still names a: re-point it, then a can go.
    ferry_image::set_vhdx_parent(&b, &base).expect("repoint");
    std::fs::remove_file(&a).expect("rm a");
    assert_eq!(rt().block_on(flat(&b)), model);
    ferry_testkit::qemu_img(&["check", "-f", "vhdx", s(&base)]);
    let raw = raw_file(&dir, "at_a.raw", &at_a);
    ferry_testkit::qemu_img_compare(&raw, "raw", &base, "vhdx");
    // A dynamic disk has no parent to change.
    assert!(ferry_image::set_vhdx_parent(&base, &b).is_err());
}
