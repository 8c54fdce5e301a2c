//! `MemoryStore`'s snapshot and tenants: the records a restart brings back keep each tenant's
//! share, as the live store kept them, so that one tenant's records never crowd out another's
//! (whose retries would run again) on a restart or into smaller bounds.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyStore, MemoryStore, RecordKey, StoredResponse, TenantId,
};

const TTL: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(30);

fn fp() -> Fingerprint {
    Fingerprint::from_bytes([9; 32])
}

async fn complete_key(store: &MemoryStore, key: &RecordKey) {
    let Begin::Acquired(token) = store.begin(key, &fp(), LEASE).await.unwrap() else {
        panic!("{key:?} is new");
    };
    let response = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::new());
    store.complete(key, token, response, TTL).await.unwrap();
}

fn snapshot_path(label: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "tower-idempotency-snapshot-tenants-{label}-{}-{}",
        std::process::id(),
        support::unique_key("f")
    ))
}

/// A store of two shards (32,768 records, 64 MiB), the bounds of its snapshot file.
fn two_shard_store(path: &std::path::Path) -> MemoryStore {
    MemoryStore::builder()
        .max_entries(32 * 1024)
        .max_bytes(64 << 20)
        .snapshot(path)
        .snapshot_interval(Duration::from_secs(3600))
        .build()
}

/// Live, the full store keeps the victim's records while the flooder, far over its share, pays
/// for its own new keys. A restart on the same file with the same bounds keeps them too, though
/// a new store puts the records in its shards by a new hash (a shard may get more than its
/// part), and the victim's are the oldest, restored last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_keeps_a_victims_records_that_the_live_store_kept() {
    let path = snapshot_path("restore");
    let victim = TenantId::hashed("victim");
    let flooder = TenantId::hashed("flooder");
    let victim_keys: Vec<_> = (0..400)
        .map(|i| RecordKey::new(victim, format!("v-{i}")))
        .collect();
    {
        let store = two_shard_store(&path);
        for key in &victim_keys {
            complete_key(&store, key).await;
        }
        // Well past the store's bounds: the flooder pays for its own new keys.
        for i in 0..40_000 {
            complete_key(&store, &RecordKey::new(flooder, format!("f-{i}"))).await;
        }
        for key in &victim_keys {
            assert!(
                matches!(
                    store.begin(key, &fp(), LEASE).await.unwrap(),
                    Begin::Completed(_)
                ),
                "live, the victim's records survive the flood"
            );
        }
        assert!(store.save_snapshot().await.unwrap() >= 32_000);
    }
    // A restart or three: each store hashes its keys anew.
    let mut lost = 0;
    for _ in 0..3 {
        let store = two_shard_store(&path);
        for key in &victim_keys {
            if store.lookup(key).await.unwrap().is_none() {
                lost += 1;
            }
        }
        if lost > 0 {
            break;
        }
    }
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        lost, 0,
        "after a restart the victim lost {lost} of its 400 completed records to the flooder's"
    );
}

/// Into a store built smaller than the one that wrote the file: the newest records come back
/// first, and a tenant within its share (the victim, whose records are the oldest) still gets
/// its own back, in place of the newest of a tenant over its share.
#[tokio::test]
async fn restore_into_smaller_bounds_keeps_each_tenants_share() {
    let path = snapshot_path("cut");
    let victim = TenantId::hashed("victim");
    let flooder = TenantId::hashed("flooder");
    let victim_keys: Vec<_> = (0..50)
        .map(|i| RecordKey::new(victim, format!("v-{i}")))
        .collect();
    {
        let store = MemoryStore::builder()
            .max_entries(2_000)
            .snapshot(&path)
            .build();
        for key in &victim_keys {
            complete_key(&store, key).await;
        }
        for i in 0..1_500 {
            complete_key(&store, &RecordKey::new(flooder, format!("f-{i}"))).await;
        }
        store.save_snapshot().await.unwrap();
    }
    // A tenant's share of this store is 125 records: the victim's 50 are within it.
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .snapshot(&path)
        .build();
    let mut lost = 0;
    for key in &victim_keys {
        if store.lookup(key).await.unwrap().is_none() {
            lost += 1;
        }
    }
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        lost,
        0,
        "the victim lost {lost} of its 50 records; the flooder kept {} of its",
        store.entry_count()
    );
}
