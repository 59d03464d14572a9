//! Client against nbdkit plugins and filters.

mod common;

use common::*;
use ferry_nbd::{NbdClient, NbdConfig, NbdError};
use ferry_testkit::{Nbdkit, run_ok, scratch_dir, tool};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_plugin_round_trip_over_multi_conn() {
    let kit = Nbdkit::new("memory").arg("size=16M").start();
    let c = NbdClient::connect_uri(&kit.uri()).await.unwrap();
    assert_eq!(c.size(), 16 << 20);
    assert!(c.info().can_multi_conn());
    assert_eq!(c.connections(), 4);
    let data = pattern(5 << 20, 3);
    c.write(777, &data).await.unwrap();
    c.write_zeroes(1 << 20, 65536).await.unwrap();
    c.trim(8 << 20, 1 << 20).await.unwrap();
    c.flush().await.unwrap();
    let mut expect = vec![0u8; 16 << 20];
    expect[777..777 + data.len()].copy_from_slice(&data);
    expect[1 << 20..(1 << 20) + 65536].fill(0);
    expect[8 << 20..9 << 20].fill(0);
    let mut got = vec![1u8; 16 << 20];
    c.read(0, &mut got).await.unwrap();
    assert!(got == expect);
    // The other client, nbdcopy, sees the same bytes.
    let dir = scratch_dir();
    let out = dir.path().join("copy.raw");
    run_ok(Command::new(tool("nbdcopy")).arg(kit.uri()).arg(&out));
    assert!(std::fs::read(&out).unwrap() == expect);
    // Allocation agrees with nbdinfo.
    let ours = rows(
        c.block_status("base:allocation", 0..c.size())
            .await
            .unwrap(),
    );
    assert_eq!(ours, nbdinfo_map(&kit.uri(), None));
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_random_matches_nbdcopy_and_nbdinfo() {
    let kit = Nbdkit::new("sparse-random")
        .arg("size=32M")
        .arg("seed=4242")
        .arg("percent=20")
        .arg("runlength=65536")
        .start();
    let c = NbdClient::connect_uri(&kit.uri()).await.unwrap();
    let dir = scratch_dir();
    let out = dir.path().join("copy.raw");
    run_ok(Command::new(tool("nbdcopy")).arg(kit.uri()).arg(&out));
    let expect = std::fs::read(&out).unwrap();
    let got = ferry_core::block::read_all(&c).await.unwrap();
    assert!(got == expect, "sparse-random bytes differ from nbdcopy");
    let ours = rows(
        c.block_status("base:allocation", 0..c.size())
            .await
            .unwrap(),
    );
    assert_eq!(ours, nbdinfo_map(&kit.uri(), None));
    assert!(
        ours.len() > 10,
        "sparse-random should be fragmented: {ours:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_plugin_offsets() {
    let kit = Nbdkit::new("pattern").arg("size=8M").start();
    let c = NbdClient::connect_uri(&kit.uri()).await.unwrap();
    let mut got = vec![0u8; 8 << 20];
    c.read(0, &mut got).await.unwrap();
    for (i, w) in got.chunks_exact(8).enumerate() {
        assert_eq!(
            u64::from_be_bytes(w.try_into().unwrap()),
            i as u64 * 8,
            "word {i}"
        );
    }
    // An unaligned read in the middle.
    let mut part = vec![0u8; 13];
    c.read(1003, &mut part).await.unwrap();
    assert_eq!(part[..], got[1003..1016]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_filter_is_reported_and_retried() {
    // Every read fails: the error names server, export, offset and errno.
    let kit = Nbdkit::new("pattern")
        .filter("error")
        .arg("size=1M")
        .arg("error=EIO")
        .arg("error-pread-rate=1")
        .start();
    let mut cfg = NbdConfig::from_uri(&kit.uri()).unwrap();
    cfg.retries = 2;
    let c = NbdClient::connect(cfg).await.unwrap();
    let err = c.read(65536, &mut [0u8; 4096]).await.unwrap_err();
    let s = err.to_string();
    assert!(matches!(err, NbdError::Command { errno: 5, .. }), "{s}");
    assert!(
        s.contains("READ of 4096 bytes at offset 65536")
            && s.contains("EIO")
            && s.contains("unix:"),
        "{s}"
    );
    // Writes to the read-only... (pattern is read-only): refused locally with a clear message.
    let err = c.write(0, &[1]).await.unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");

    // One read in five fails: retries hide it.
    let kit = Nbdkit::new("pattern")
        .filter("error")
        .arg("size=1M")
        .arg("error=EIO")
        .arg("error-pread-rate=0.2")
        .start();
    let mut cfg = NbdConfig::from_uri(&kit.uri()).unwrap();
    cfg.retries = 12;
    cfg.max_request = 64 << 10;
    let c = NbdClient::connect(cfg).await.unwrap();
    let mut got = vec![0u8; 1 << 20];
    c.read(0, &mut got).await.unwrap();
    for (i, w) in got.chunks_exact(8).enumerate() {
        assert_eq!(u64::from_be_bytes(w.try_into().unwrap()), i as u64 * 8);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_server_times_out_and_pipelining_overlaps_delays() {
    let kit = Nbdkit::new("memory")
        .filter("delay")
        .arg("size=4M")
        .arg("rdelay=2")
        .start();
    let mut cfg = NbdConfig::from_uri(&kit.uri()).unwrap();
    cfg.request_timeout = Duration::from_millis(300);
    cfg.retries = 1;
    let c = NbdClient::connect(cfg).await.unwrap();
    let err = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(matches!(err, NbdError::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string()
            .contains("READ of 512 bytes at offset 0 timed out"),
        "{err}"
    );

    // 32 reads of 100 ms each on one connection: pipelined they overlap (nbdkit runs 16
    // requests per connection at once), so all finish well inside one request timeout of 2 s
    // that would be blown by serial requests (3.2 s).
    let kit = Nbdkit::new("memory")
        .filter("delay")
        .arg("size=4M")
        .arg("rdelay=100ms")
        .start();
    let mut cfg = NbdConfig::from_uri(&kit.uri()).unwrap();
    cfg.connections = 1;
    cfg.max_in_flight = 32;
    cfg.max_request = 4096;
    cfg.request_timeout = Duration::from_secs(2);
    cfg.retries = 0;
    let c = NbdClient::connect(cfg).await.unwrap();
    let mut buf = vec![0u8; 32 * 4096];
    c.read(0, &mut buf).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimum_block_size_is_honoured() {
    let kit = Nbdkit::new("pattern")
        .filter("blocksize-policy")
        .arg("size=1M")
        .arg("blocksize-minimum=4096")
        .arg("blocksize-error-policy=error")
        .start();
    let c = NbdClient::connect_uri(&kit.uri()).await.unwrap();
    assert_eq!(c.info().block_min, 4096);
    // Unaligned reads are widened to whole blocks and trimmed back.
    let mut part = vec![0u8; 13];
    c.read(5003, &mut part).await.unwrap();
    let mut whole = vec![0u8; 16384];
    c.read(0, &mut whole).await.unwrap();
    assert_eq!(part[..], whole[5003..5016]);
    assert_eq!(
        u64::from_be_bytes(whole[5000..5008].try_into().unwrap()),
        5000
    );

    let kit = Nbdkit::new("memory")
        .filter("blocksize-policy")
        .arg("size=1M")
        .arg("blocksize-minimum=4096")
        .arg("blocksize-error-policy=error")
        .start();
    let c = NbdClient::connect_uri(&kit.uri()).await.unwrap();
    let err = c.write(100, &[1; 10]).await.unwrap_err();
    assert!(err.to_string().contains("minimum block size 4096"), "{err}");
    c.write(4096, &[7; 8192]).await.unwrap();
    let mut got = vec![0u8; 3];
    c.read(4095, &mut got).await.unwrap();
    assert_eq!(got, [0, 7, 7]);
}
