//! ESX snapshot deltas (`vmfsSparse`, COWD extents) over a flat base, which qemu-img cannot
//! create: the fixture is assembled here byte by byte from the format's layout.

mod common;

use common::*;
use ferry_core::BlockSource;
use ferry_core::block::read_all;
use ferry_image::{Format, open_image};

const SECTORS: u64 = 4096; // 2 MiB
const GRAIN: u64 = 1; // ESX deltas use 512-byte grains

fn cowd(grains: &[(u64, u8)]) -> Vec<u8> {
    let gtes = 4096u64;
    let gd_entries = (SECTORS / GRAIN).div_ceil(gtes);
    let gd_sector = 4u64;
    let gt_sector = gd_sector + 1;
    let data_sector = gt_sector + gd_entries * (gtes * 4 / 512);
    let mut f = vec![0u8; (data_sector * 512) as usize];
    f[..4].copy_from_slice(b"COWD");
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    f[8..12].copy_from_slice(&3u32.to_le_bytes());
    f[12..16].copy_from_slice(&(SECTORS as u32).to_le_bytes());
    f[16..20].copy_from_slice(&(GRAIN as u32).to_le_bytes());
    f[20..24].copy_from_slice(&(gd_sector as u32).to_le_bytes());
    f[24..28].copy_from_slice(&(gd_entries as u32).to_le_bytes());
    for t in 0..gd_entries {
        let at = (gd_sector * 512 + t * 4) as usize;
        f[at..at + 4].copy_from_slice(&((gt_sector + t * 32) as u32).to_le_bytes());
    }
    for (i, (grain, fill)) in grains.iter().enumerate() {
        let sector = data_sector + i as u64;
        let at = (gt_sector * 512 + grain * 4) as usize;
        f[at..at + 4].copy_from_slice(&(sector as u32).to_le_bytes());
        f.extend(std::iter::repeat_n(*fill, 512));
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmfs_sparse_delta_over_flat_base() {
    let (_d, dir) = scratch();
    let base = dir.join("vm.vmdk");
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&base),
        &(SECTORS * 512).to_string(),
    ]);
    write_pattern(&base, "vmdk", SECTORS * 512, 3);
    let mut expect = qemu_raw(&base, "vmdk", &dir);
    let cid = std::fs::read_to_string(&base)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CID=").map(str::to_string))
        .expect("CID in base descriptor");
    let grains = [(0u64, 0xA1u8), (1, 0xA2), (700, 0xA3), (SECTORS - 1, 0xA4)];
    std::fs::write(dir.join("vm-000001-delta.vmdk"), cowd(&grains)).unwrap();
    std::fs::write(
        dir.join("vm-000001.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID={cid}\ncreateType=\"vmfsSparse\"\nparentFileNameHint=\"vm.vmdk\"\n# Extent description\nRW {SECTORS} VMFSSPARSE \"vm-000001-delta.vmdk\"\n"
        ),
    )
    .unwrap();
    for (g, fill) in grains {
        expect[(g * 512) as usize..(g * 512 + 512) as usize].fill(fill);
    }
    let img = open_image(dir.join("vm-000001.vmdk")).await.unwrap();
    assert_eq!(
        (img.info.format, img.info.subformat.as_str()),
        (Format::Vmdk, "vmfsSparse")
    );
    assert_eq!(img.info.chain().len(), 2);
    assert_eq!(read_all(img.source.as_ref()).await.unwrap(), expect);
    assert_eq!(read_strided(img.source.as_ref(), 1536 + 7).await, expect);
    assert_covers(
        &img.source.allocated(0..img.source.size()).await.unwrap(),
        &expect,
        "vmfsSparse chain",
    );

    // The delta's parentCID must match the base's CID.
    let text = std::fs::read_to_string(dir.join("vm-000001.vmdk"))
        .unwrap()
        .replace(&format!("parentCID={cid}"), "parentCID=0badcafe");
    std::fs::write(dir.join("vm-000001.vmdk"), text).unwrap();
    let err = open_image(dir.join("vm-000001.vmdk"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not the image this one was made from"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmfs_flat_descriptor() {
    let (_d, dir) = scratch();
    let base = dir.join("esx.vmdk");
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&base),
        "3M",
    ]);
    write_pattern(&base, "vmdk", 3 << 20, 4);
    let expect = qemu_raw(&base, "vmdk", &dir);
    // What ESXi writes for a thick disk: createType vmfs, extent type VMFS.
    let text = std::fs::read_to_string(&base).unwrap();
    assert!(text.contains(" FLAT "), "{text}");
    let text = text
        .replace(" FLAT ", " VMFS ")
        .replace("createType=\"monolithicFlat\"", "createType=\"vmfs\"");
    std::fs::write(&base, text).unwrap();
    let img = open_image(&base).await.unwrap();
    assert_eq!(img.info.subformat, "vmfs");
    assert_eq!(img.info.files.len(), 1);
    assert_eq!(read_all(img.source.as_ref()).await.unwrap(), expect);
}
