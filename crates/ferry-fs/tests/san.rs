//! Off-host SAN reads: VHDX files (qemu-img) and AVHDX children (ferry-image) copied onto NTFS
//! volumes made by ntfs-3g (`mkntfs`, `ntfscp`, `ntfsfallocate`), read through the volume
//! without mounting it, compared with `qemu-img compare` and with the files themselves.

use ferry_core::BlockSource;
use ferry_fs::{SanResolver, SanVolume};
use ferry_image::{FileSource, ImageWriter, OutputFormat, WriterOptions};
use ferry_testkit::{qemu_img_compare, run_ok, tool};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const SIZE: u64 = 24 << 20;
const HOST: &str = "C:\\ClusterStorage\\Volume1";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkntfs(img: &Path, size: u64) {
    std::fs::File::create(img).unwrap().set_len(size).unwrap();
    run_ok(Command::new(tool("mkntfs")).args(["-F", "-Q", "-q", s(img)]));
}

fn ntfscp(img: &Path, src: &Path, dst: &str) {
    run_ok(Command::new(tool("ntfscp")).args(["-q", "-f", s(img), s(src), dst]));
}

fn fallocate(img: &Path, file: &str, off: u64, len: u64) {
    run_ok(Command::new(tool("ntfsfallocate")).args([
        "-o",
        &off.to_string(),
        "-l",
        &len.to_string(),
        s(img),
        file,
    ]));
}

async fn read_all(src: &dyn BlockSource) -> Vec<u8> {
    let mut out = vec![0u8; src.size() as usize];
    // An odd stride, so reads straddle fragments.
    let stride = 3 * 65536 + 512;
    for (i, chunk) in out.chunks_mut(stride).enumerate() {
        src.read_at((i * stride) as u64, chunk).await.unwrap();
    }
    out
}

/// `base.vhdx` (qemu-img) and `child.avhdx` (ferry-image) in `dir`, with the child's expected
/// raw content.
fn images(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.vhdx");
    let mut expect = ferry_testkit::qemu_vhdx(
        &base,
        SIZE,
        &[
            "write -P 0xab 1M 3M",
            "write -P 0x5c 9M 512K",
            "write -P 0x11 23M 64K",
        ],
    );
    let opts = WriterOptions {
        block_size: None,
        parent: Some(base),
    };
    let mut w =
        ImageWriter::create_with(dir.join("child.avhdx"), OutputFormat::Vhdx, SIZE, &opts).unwrap();
    for (off, len, byte) in [(2u64 << 20, 8192usize, 0xC1u8), (12 << 20, 1 << 20, 0xC2)] {
        w.write(off, &vec![byte; len]).unwrap();
        expect[off as usize..off as usize + len].fill(byte);
    }
    w.finish().unwrap();
    expect
}

/// A volume holding `base.vhdx` fragmented (its clusters allocated interleaved with another
/// file's before the data is copied in) and `child.avhdx`.
fn volume(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("csv.img");
    mkntfs(&img, 96 << 20);
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    ntfscp(&img, &empty, "/base.vhdx");
    ntfscp(&img, &empty, "/pad");
    let base_len = std::fs::metadata(dir.join("base.vhdx")).unwrap().len();
    let piece = 1 << 20;
    for k in 0..base_len.div_ceil(piece) {
        fallocate(&img, "/base.vhdx", k * piece, piece);
        fallocate(&img, "/pad", k * 65536, 65536);
    }
    ntfscp(&img, &dir.join("base.vhdx"), "/base.vhdx");
    ntfscp(&img, &dir.join("child.avhdx"), "/child.avhdx");
    img
}

async fn open(img: &Path) -> Arc<SanVolume> {
    let dev: Arc<dyn BlockSource> = Arc::new(FileSource::open(img).unwrap());
    SanVolume::open(dev, None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_chain_read_off_host_matches_qemu_img_and_the_files() {
    let dir = ferry_testkit::scratch_dir();
    let expect_child = images(dir.path());
    let img = volume(dir.path());
    let vol = open(&img).await;

    // The files themselves, byte for byte, the fragmented one in several pieces.
    let base_file = vol.open_file("/BASE.VHDX").await.unwrap();
    assert!(
        base_file.fragments() >= 4,
        "{base_file:?} is not fragmented"
    );
    assert!(
        read_all(base_file.as_ref()).await == std::fs::read(dir.path().join("base.vhdx")).unwrap()
    );
    let child_file = vol.open_file("\\child.avhdx").await.unwrap();
    assert!(
        read_all(child_file.as_ref()).await
            == std::fs::read(dir.path().join("child.avhdx")).unwrap()
    );

    // The virtual disks through ferry-image, the child's parent found inside the volume.
    let resolver = SanResolver::new(vol.clone(), HOST);
    let base = ferry_image::open_source(base_file, &resolver)
        .await
        .unwrap();
    let out = dir.path().join("base-read.raw");
    std::fs::write(&out, read_all(base.source.as_ref()).await).unwrap();
    qemu_img_compare(&out, "raw", &dir.path().join("base.vhdx"), "vhdx");

    let child = ferry_image::open_source(child_file, &resolver)
        .await
        .unwrap();
    assert_eq!(child.info.chain().len(), 2);
    assert!(
        child.info.chain()[1].file.ends_with("/base.vhdx"),
        "{:?}",
        child.info
    );
    let out = dir.path().join("child-read.raw");
    std::fs::write(&out, read_all(child.source.as_ref()).await).unwrap();
    let expected = dir.path().join("child-expected.raw");
    std::fs::write(&expected, &expect_child).unwrap();
    qemu_img_compare(&out, "raw", &expected, "raw");

    // The same volume as the GPT partition of a LUN (how a CSV disk is laid out).
    let lun = dir.path().join("lun.img");
    let vol_len = std::fs::metadata(&img).unwrap().len();
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(vol_len + (2 << 20))
        .unwrap();
    let mut sfdisk = Command::new(tool("sfdisk"))
        .args(["-q", s(&lun)])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(
        sfdisk.stdin.take().unwrap(),
        "label: gpt\nstart=2048, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        vol_len / 512
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let bytes = std::fs::read(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&lun).unwrap(),
        &bytes,
        1 << 20,
    )
    .unwrap();
    let vol = open(&lun).await;
    assert!(vol.label().contains("partition 1"), "{}", vol.label());
    let child = vol.open_file("/child.avhdx").await.unwrap();
    let child = ferry_image::open_source(child, &SanResolver::new(vol.clone(), HOST))
        .await
        .unwrap();
    assert!(read_all(child.source.as_ref()).await == expect_child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_runs_read_as_zeros_outside_the_allocation_map() {
    let dir = ferry_testkit::scratch_dir();
    let img = dir.path().join("v.img");
    mkntfs(&img, 32 << 20);
    std::fs::write(dir.path().join("e"), b"").unwrap();
    ntfscp(&img, &dir.path().join("e"), "/sparse.vhdx");
    fallocate(&img, "/sparse.vhdx", 4 << 20, 1 << 20);
    let vol = open(&img).await;
    let f = vol.open_file("/sparse.vhdx").await.unwrap();
    assert_eq!(f.size(), 5 << 20);
    let map: Vec<_> = f
        .allocated(0..f.size())
        .await
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(map, vec![(4 << 20, 1 << 20)]);
    let cat = Command::new(tool("ntfscat"))
        .arg(&img)
        .arg("/sparse.vhdx")
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert!(read_all(f.as_ref()).await == cat.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volumes_give_clear_errors() {
    let dir = ferry_testkit::scratch_dir();
    let _ = images(dir.path());
    // No file system at all.
    let zeros = dir.path().join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dev: Arc<dyn BlockSource> = Arc::new(FileSource::open(&zeros).unwrap());
    let e = SanVolume::open(dev, None).await.unwrap_err().to_string();
    assert!(e.contains("no NTFS volume"), "{e}");

    // A child whose parent is not on the volume.
    let img = dir.path().join("orphan.img");
    mkntfs(&img, 96 << 20);
    ntfscp(&img, &dir.path().join("child.avhdx"), "/child.avhdx");
    let vol = open(&img).await;
    let f = vol.open_file("/child.avhdx").await.unwrap();
    let e = ferry_image::open_source(f, &SanResolver::new(vol.clone(), HOST))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("parent") && e.contains("base.vhdx"), "{e}");
    let e = vol
        .open_file("/missing.vhdx")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file"), "{e}");

    // The file's MFT record damaged in many ways: an error or a (checked) read, never a panic.
    let inode: u64 = run_ok(Command::new(tool("ntfsls")).args(["-i", s(&img)]))
        .lines()
        .find(|l| l.trim_end().ends_with("child.avhdx"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap();
    let clean = std::fs::read(&img).unwrap();
    let cluster = u64::from(u16::from_le_bytes([clean[11], clean[12]])) * u64::from(clean[13]);
    let mft = u64::from_le_bytes(clean[0x30..0x38].try_into().unwrap()) * cluster;
    let record = (mft + inode * 1024) as usize;
    let path = dir.path().join("bad.img");
    std::fs::write(&path, &clean).unwrap();
    let bad_file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut errors = 0;
    for seed in 0..64u64 {
        // Only the record is rewritten each time (from the clean copy, then damaged).
        let mut rec = clean[record..record + 1024].to_vec();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Past the record header: attributes and their data runs.
            rec[0x38 + (x % (1024 - 0x38)) as usize] = (x >> 32) as u8;
        }
        std::os::unix::fs::FileExt::write_all_at(&bad_file, &rec, record as u64).unwrap();
        let dev: Arc<dyn BlockSource> = Arc::new(FileSource::open(&path).unwrap());
        let Ok(vol) = SanVolume::open(dev, None).await else {
            errors += 1;
            continue;
        };
        match vol.open_file("/child.avhdx").await {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                errors += 1;
            }
            Ok(f) => {
                let mut buf = vec![0u8; f.size().min(1 << 20) as usize];
                if f.read_at(0, &mut buf).await.is_err() {
                    errors += 1;
                }
                let _ = ferry_image::open_source(f, &SanResolver::new(vol.clone(), HOST)).await;
            }
        }
    }
    assert!(errors > 0, "no damage was noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_translate_into_the_volume() {
    let dir = ferry_testkit::scratch_dir();
    let img = dir.path().join("v.img");
    mkntfs(&img, 16 << 20);
    let vol = open(&img).await;
    let r = SanResolver::new(vol, HOST);
    assert_eq!(
        r.volume_path("c:\\clusterstorage\\VOLUME1\\vm\\Disk.vhdx")
            .as_deref(),
        Some("/vm/Disk.vhdx")
    );
    assert_eq!(r.volume_path("C:\\ClusterStorage\\Volume2\\x.vhdx"), None);
    assert_eq!(r.volume_path("D:\\x.vhdx"), None);
}
