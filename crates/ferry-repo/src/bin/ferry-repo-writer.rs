//! Test helper: writes one restore point of generated data (see `ferry_repo::testdata`) into a
//! repository, so tests can exercise real writer processes (crash test, CLI tests) before the
//! backup engine exists.
//!
//! ```text
//! ferry-repo-writer REPO VM_ID SIZE SEED [DELAY_MS] [DISKS]
//! ```
//!
//! The password comes from `FERRY_PASSWORD`. Prints the restore point id and the upload
//! counters as one JSON line on stdout; `progress N` lines on stderr after each stored chunk.

use ferry_core::Secret;
use ferry_core::vm::{ConsistencyLevel, HypervisorKind, VmConfig};
use ferry_repo::{Repository, SnapshotMeta, Store, VmIdentity, testdata};
use std::process::ExitCode;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: ferry-repo-writer REPO VM_ID SIZE SEED [DELAY_MS] [DISKS]".into());
    }
    let size: u64 = args[2].parse()?;
    let seed: u64 = args[3].parse()?;
    let delay = Duration::from_millis(args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0));
    let disks: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let password = std::env::var("FERRY_PASSWORD").ok().map(Secret::new);
    let repo = Repository::open(Store::open(&args[0], false)?, password.as_ref()).await?;
    let meta = SnapshotMeta {
        vm: VmIdentity {
            id: args[1].clone(),
            name: format!("generated {}", args[1]),
        },
        source: "ferry-repo-writer".into(),
        hypervisor: HypervisorKind::Generic,
        consistency: ConsistencyLevel::Crash,
        config: VmConfig::default(),
        native_config: None,
        transport: Some("generated".into()),
        labels: Default::default(),
    };
    let backup = repo.begin_backup(meta).await?;
    let mut writers = Vec::new();
    let mut done = 0u64;
    for d in 0..disks {
        let w = backup.add_disk(&format!("disk{d}"), size, Some(format!("token-{seed}")))?;
        for i in 0..w.chunk_count() {
            let r = w.chunk_range(i);
            let data = testdata::disk_chunk(
                seed.wrapping_add(d as u64 * 1_000_003),
                i,
                (r.end - r.start) as usize,
            );
            w.put_chunk(i, data.into()).await?;
            done += 1;
            eprintln!("progress {done}");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        writers.push(w);
    }
    let stats = backup.stats();
    let m = backup.commit(writers).await?;
    println!(
        "{}",
        serde_json::json!({ "snapshot": m.id, "stats": stats })
    );
    Ok(())
}
