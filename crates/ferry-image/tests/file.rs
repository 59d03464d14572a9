//! FileSource / FileTarget: positional I/O, holes from SEEK_DATA/SEEK_HOLE, zeros punched, and
//! agreement with qemu-img about what a written file holds.

mod common;

use common::*;
use ferry_core::{BlockSource, BlockTarget};
use ferry_image::{FileSource, FileTarget};

async fn round_trip(direct: bool) {
    let (_d, dir) = scratch();
    let p = dir.join("t.raw");
    let size = 32u64 << 20;
    let mut t = FileTarget::create(&p, size).unwrap();
    if direct {
        // The scratch directory is on a disk file system, which takes O_DIRECT.
        t = t.with_direct_io();
        assert!(t.is_direct());
    }
    t.write_at(1 << 20, &vec![0x5A; 3 << 20]).await.unwrap();
    t.write_at(20 << 20, &vec![0x11; 4096]).await.unwrap();
    // Unaligned: through the page cache even with O_DIRECT, next to a direct-written block.
    t.write_at((20 << 20) + 4096, &[0x22; 100]).await.unwrap();
    // Zeros over data punch a hole; zeros elsewhere allocate nothing.
    t.write_zeroes(2 << 20, 1 << 20).await.unwrap();
    t.write_at(10 << 20, &vec![0u8; 1 << 20]).await.unwrap();
    t.flush().await.unwrap();
    let err = t.write_at(size - 1, &[1, 2]).await.unwrap_err();
    assert!(err.to_string().contains("t.raw"), "{err}");

    let mut src = FileSource::open(&p).unwrap();
    if direct {
        src = src.with_direct_io();
        assert!(src.is_direct());
        // An aligned read into an aligned buffer goes around the page cache and still sees
        // what the buffered unaligned write just left in it.
        let mut mem = vec![0u8; (8 << 10) + 4096];
        let at = mem.as_ptr().align_offset(4096);
        let aligned = &mut mem[at..at + (8 << 10)];
        src.read_at(20 << 20, aligned).await.unwrap();
        assert!(aligned[..4096].iter().all(|b| *b == 0x11));
        assert!(aligned[4096..4196].iter().all(|b| *b == 0x22));
        assert!(aligned[4196..].iter().all(|b| *b == 0));
        // Unaligned buffer, offset or length: buffered.
        let mut odd = vec![0u8; 4097];
        src.read_at((20 << 20) + 4095, &mut odd[1..]).await.unwrap();
        assert_eq!(&odd[1..3], &[0x11, 0x22]);
    }
    assert_eq!(src.size(), size);
    let map = src.allocated(0..size).await.unwrap();
    assert!(map.contains(1 << 20) && map.contains(20 << 20), "{map:?}");
    assert!(
        !map.contains(2 << 20) && !map.contains(10 << 20) && !map.contains(0),
        "{map:?}"
    );
    assert!(map.total_len() <= (2 << 20) + 4096 + 8192, "{map:?}");
    let mut buf = vec![0u8; 4 << 20];
    src.read_at(1 << 20, &mut buf).await.unwrap();
    assert!(buf[..1 << 20].iter().all(|b| *b == 0x5A));
    assert!(buf[1 << 20..2 << 20].iter().all(|b| *b == 0));
    assert!(buf[2 << 20..3 << 20].iter().all(|b| *b == 0x5A));
    let err = src.read_at(size - 10, &mut buf[..20]).await.unwrap_err();
    assert!(err.to_string().contains("reach past the end"), "{err}");
    // qemu agrees on the content.
    let want = std::fs::read(&p).unwrap();
    let mut expect = vec![0u8; size as usize];
    expect[1 << 20..4 << 20].fill(0x5A);
    expect[2 << 20..3 << 20].fill(0);
    expect[20 << 20..(20 << 20) + 4096].fill(0x11);
    expect[(20 << 20) + 4096..(20 << 20) + 4196].fill(0x22);
    assert!(want == expect);
    ferry_testkit::qemu_io(&[
        "-f",
        "raw",
        "-c",
        &format!("read -P 0x11 {} 4096", 20 << 20),
        "-c",
        &format!("read -P 0 {} {}", 2 << 20, 1 << 20),
        s(&p),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_round_trip_multi_thread() {
    round_trip(false).await;
}

#[tokio::test]
async fn file_round_trip_current_thread() {
    round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_round_trip_direct_io_multi_thread() {
    round_trip(true).await;
}

#[tokio::test]
async fn file_round_trip_direct_io_current_thread() {
    round_trip(true).await;
}

#[tokio::test]
async fn open_existing_keeps_contents() {
    let (_d, dir) = scratch();
    let p = dir.join("e.raw");
    std::fs::write(&p, vec![7u8; 8192]).unwrap();
    let t = FileTarget::open(&p).unwrap();
    assert_eq!(t.size(), 8192);
    t.write_at(4096, &[9u8; 512]).await.unwrap();
    let data = std::fs::read(&p).unwrap();
    assert_eq!(&data[..4096], &[7u8; 4096][..]);
    assert_eq!(&data[4096..4608], &[9u8; 512][..]);
    let err = FileSource::open(dir.join("missing.raw"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.raw") && err.contains("open"), "{err}");
}
