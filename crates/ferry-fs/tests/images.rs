//! `ferry-fs` on disks built by Debian tools (tests/fs/make-disks.sh): partition tables, both file
//! systems and swap detection, straight from the image files (the CLI tests go through a
//! repository).

use ferry_fs::{Disk, ExclusionKind, MemDisk, ReadAt, Scheme};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn disks() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fs/make-disks.sh");
    let o = Command::new("bash").arg(script).arg(&out).output().unwrap();
    assert!(
        o.status.success(),
        "make-disks.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (dir, out)
}

fn open(path: &Path) -> Arc<dyn ReadAt> {
    Arc::new(MemDisk(std::fs::read(path).unwrap()))
}

#[test]
fn tables_files_and_swap_on_real_images() {
    let (_keep, d) = disks();
    let src = d.join("src");
    let gpt = Disk::open(open(&d.join("gpt.img"))).unwrap();
    assert_eq!(gpt.table().scheme, Scheme::Gpt);
    assert_eq!(gpt.table().partitions.len(), 3);
    assert!(gpt.table().partitions[1].is_swap_type());
    let ext4 = gpt.volume(None).unwrap();
    let names: Vec<String> = ext4
        .list("/")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"big.bin".to_string()), "{names:?}");
    let mut v = Vec::new();
    ext4.read_file("/sub/deeper/nested.bin", &mut v).unwrap();
    assert_eq!(v, std::fs::read(src.join("sub/deeper/nested.bin")).unwrap());
    let ntfs = gpt.volume(Some(3)).unwrap();
    let mut v = Vec::new();
    ntfs.read_file("/big.bin", &mut v).unwrap();
    assert!(v == std::fs::read(src.join("big.bin")).unwrap());

    let mbr = Disk::open(open(&d.join("mbr.img"))).unwrap();
    assert_eq!(mbr.table().scheme, Scheme::Mbr);
    let nums: Vec<u32> = mbr.table().partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, [1, 2, 5]);
    let mut v = Vec::new();
    mbr.volume(Some(5))
        .unwrap()
        .read_file("/sparse.bin", &mut v)
        .unwrap();
    assert!(v == std::fs::read(src.join("sparse.bin")).unwrap());

    let ex = ferry_fs::find_exclusions(open(&d.join("gpt.img"))).unwrap();
    let kinds: Vec<ExclusionKind> = ex.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            ExclusionKind::SwapFile,
            ExclusionKind::SwapPartition,
            ExclusionKind::Pagefile
        ],
        "{ex:?}"
    );
    // The swap file's extents hold exactly its data after the header page.
    let img = std::fs::read(d.join("gpt.img")).unwrap();
    let mut want = Vec::new();
    ext4.read_file("/swapfile", &mut want).unwrap();
    let got: Vec<u8> = ex[0]
        .ranges
        .iter()
        .flat_map(|r| img[r.start as usize..r.end as usize].iter().copied())
        .collect();
    assert_eq!(got.len(), want.len() - 4096);
    assert!(
        got == want[4096..],
        "swap file extents do not hold the swap file"
    );
    let ex = ferry_fs::find_exclusions(open(&d.join("mbr.img"))).unwrap();
    let whats: Vec<&str> = ex.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(
        whats,
        ["partition 1:pagefile.sys", "partition 5:/swapfile"],
        "{ex:?}"
    );
    assert_eq!(ex[0].bytes(), 16 << 20);
    assert_eq!(ex[1].bytes(), (8 << 20) - 4096);
}
