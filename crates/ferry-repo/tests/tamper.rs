//! Any single flipped byte in any stored object is detected: opening the repository fails, or
//! verify names a bad object, and a restore never returns wrong bytes.

mod common;

use common::*;
use ferry_core::Secret;
use ferry_core::block::read_all;
use ferry_repo::{Repository, Store, VerifyOptions};
use proptest::prelude::*;
use std::sync::Arc;

struct Fixture {
    rt: tokio::runtime::Runtime,
    store: Store,
    objects: Vec<String>,
    snapshot: String,
    data: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Store::new(Arc::new(object_store::memory::InMemory::new()), "memory");
        let data = disk_data(9, 3 * CHUNK + 100);
        let (objects, snapshot) = rt.block_on(async {
            let repo = Repository::init(store.clone(), Some(&Secret::new("pw")), init_opts())
                .await
                .unwrap();
            let m = backup(&repo, "vm", &[("disk0", &data)], None).await;
            let objects: Vec<String> = store
                .list("")
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.location.to_string())
                .collect();
            (objects, m.id)
        });
        Fixture {
            rt,
            store,
            objects,
            snapshot,
            data,
        }
    })
}

/// True when the damage is noticed; panics if wrong bytes are ever returned.
async fn detected(f: &Fixture) -> bool {
    let repo = match Repository::open(f.store.clone(), Some(&Secret::new("pw"))).await {
        Ok(r) => r,
        Err(_) => return true,
    };
    let report = match repo
        .verify(&VerifyOptions {
            snapshot: None,
            sample_percent: 100.0,
        })
        .await
    {
        Ok(r) => r,
        Err(_) => return true,
    };
    if let Ok(src) = repo.open_disk(&f.snapshot, "disk0").await {
        if let Ok(bytes) = read_all(src.as_ref()).await {
            assert!(
                bytes == f.data || !report.ok(),
                "restore returned wrong bytes"
            );
        }
    }
    !report.ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn any_flipped_byte_in_any_object_is_detected(
        obj in any::<proptest::sample::Index>(), pos in any::<proptest::sample::Index>(), bit in 0u8..8,
    ) {
        let f = fixture();
        let key = obj.get(&f.objects).clone();
        f.rt.block_on(async {
            let orig = f.store.get(&key).await.unwrap();
            let mut bad = orig.to_vec();
            let i = pos.index(bad.len());
            bad[i] ^= 1 << bit;
            f.store.overwrite(&key, bad).await.unwrap();
            let ok = detected(f).await;
            f.store.overwrite(&key, orig).await.unwrap();
            assert!(ok, "flipping bit {bit} of byte {i} in `{key}` went unnoticed");
        });
    }
}

#[test]
fn fixture_covers_every_object_kind() {
    let f = fixture();
    for prefix in [
        "config",
        "keys/",
        "chunks/",
        "indexes/",
        "snapshots/",
        "catalog/",
    ] {
        assert!(
            f.objects.iter().any(|o| o.starts_with(prefix)),
            "no {prefix} object in {:?}",
            f.objects
        );
    }
}
