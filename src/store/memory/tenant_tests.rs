//! The bound on one tenant's records: examples, a model of every path that adds or removes a
//! record, and real threads.

use std::collections::HashMap;

use futures_util::FutureExt;
use proptest::prelude::*;

use super::*;
use crate::StoreErrorKind;
use crate::fingerprint::Fingerprint;
use crate::store::{Begin, Forget, IdempotencyStore, LockToken};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(100);

fn tenant(t: u8) -> TenantId {
    TenantId::hashed([t])
}

fn key(t: u8, k: &str) -> RecordKey {
    RecordKey::new(tenant(t), k)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn response() -> StoredResponse {
    StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"))
}

async fn acquire(store: &MemoryStore, t: u8, k: &str) -> LockToken {
    match store.begin(&key(t, k), &fp(1), LEASE).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn completed(store: &MemoryStore, t: u8, k: &str, ttl: Duration) {
    let token = acquire(store, t, k).await;
    store
        .complete(&key(t, k), token, response(), ttl)
        .await
        .unwrap();
}

fn check_counts(store: &MemoryStore) {
    for shard in store.inner.shards() {
        read(shard).check_counts();
    }
}

/// The tenant (1, 2, ...) whose id is the smallest: the one a shard drops from among tenants
/// that hold as many records.
fn smallest(tenants: &[u8]) -> u8 {
    *tenants
        .iter()
        .min_by_key(|&&t| *tenant(t).as_bytes())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_tenant_alone_fills_the_whole_store_before_any_eviction() {
    const MAX: usize = 2_000;
    let store = MemoryStore::builder().max_entries(MAX).build();
    assert_eq!(store.inner.shards.len(), 1);
    assert_eq!(store.settings().max_entries_per_tenant(), MAX / 8);
    for k in 0..MAX {
        // The nearest expiry first: key 0.
        let ttl = TTL + Duration::from_secs(k as u64);
        completed(&store, 1, &k.to_string(), ttl).await;
    }
    assert_eq!(
        store.evicted(),
        0,
        "the share bounds no one while the store has room"
    );
    assert_eq!(store.entry_count(), MAX);
    assert_eq!(store.tenant_entry_count(&tenant(1)), MAX);
    for k in 0..MAX {
        let begun = store.begin(&key(1, &k.to_string()), &fp(1), LEASE).await;
        assert!(matches!(begun.unwrap(), Begin::Completed(_)), "{k} replays");
    }
    // Full: the tenant, over its share, makes room from its own nearest expiry.
    acquire(&store, 1, "one more").await;
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.entry_count(), MAX);
    assert_eq!(store.lookup(&key(1, "0")).await.unwrap(), None);
    assert!(store.lookup(&key(1, "1")).await.unwrap().is_some());
    check_counts(&store);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_at_its_share_of_a_full_store_drops_its_own_record_nearest_expiry() {
    let store = MemoryStore::builder()
        .max_entries(4)
        .max_entries_per_tenant(2)
        .build();
    completed(&store, 2, "victim", TTL / 10).await; // the nearest expiry of the store
    completed(&store, 1, "far", TTL).await;
    completed(&store, 1, "near", TTL / 2).await;
    completed(&store, 1, "middle", TTL - Duration::from_secs(1)).await;
    assert_eq!(
        store.tenant_entry_count(&tenant(1)),
        3,
        "over its share: room"
    );
    assert_eq!(store.evicted(), 0);

    completed(&store, 1, "new", TTL).await;
    assert_eq!(store.evicted(), 1, "counted as evicted");
    assert_eq!(store.tenant_entry_count(&tenant(1)), 3);
    assert_eq!(store.tenant_entry_count(&tenant(2)), 1);
    assert_eq!(store.lookup(&key(1, "near")).await.unwrap(), None);
    assert!(store.lookup(&key(1, "far")).await.unwrap().is_some());
    assert!(store.lookup(&key(1, "middle")).await.unwrap().is_some());
    let victim = store.begin(&key(2, "victim"), &fp(1), LEASE).await.unwrap();
    assert!(
        matches!(victim, Begin::Completed(_)),
        "another tenant's record, though nearer its expiry, is kept"
    );
    // An expired record goes first, whoever's it is, and is not an eviction: the victim's
    // (the nearest), which leaves room; the tenant's own expired one stays until pruned.
    tokio::time::advance(TTL - Duration::from_millis(500)).await;
    acquire(&store, 1, "newer").await;
    assert_eq!(store.evicted(), 1, "the expired one was pruned");
    assert_eq!(store.tenant_entry_count(&tenant(2)), 0);
    assert_eq!(store.tenant_entry_count(&tenant(1)), 4);
    assert_eq!(store.entry_count(), 4);
    assert_eq!(store.lookup(&key(1, "middle")).await.unwrap(), None);
    assert!(store.lookup(&key(1, "far")).await.unwrap().is_some());
    assert_eq!(store.prune(), 1, "the tenant's expired record");
    check_counts(&store);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_within_its_share_drops_a_record_of_the_heaviest_tenant_over_its_share() {
    let store = MemoryStore::builder()
        .max_entries(8)
        .max_entries_per_tenant(2)
        .build();
    completed(&store, 3, "victim", TTL / 10).await; // the nearest expiry of the store
    for (k, secs) in [("a", 20), ("b", 80), ("c", 90)] {
        completed(&store, 1, k, Duration::from_secs(secs)).await;
    }
    for (k, secs) in [("a", 30), ("b", 60), ("c", 70), ("d", 95)] {
        completed(&store, 2, k, Duration::from_secs(secs)).await;
    }
    assert_eq!(store.entry_count(), 8);
    // Tenant 4 holds nothing; tenants 1 and 2 are over their share, 2 holds the most: its
    // nearest expiry goes, not tenant 1's nearer one, nor the victim's nearest of all.
    acquire(&store, 4, "x").await;
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.lookup(&key(2, "a")).await.unwrap(), None);
    let counts = |ts: [u8; 4]| ts.map(|t| store.tenant_entry_count(&tenant(t)));
    assert_eq!(counts([1, 2, 3, 4]), [3, 3, 1, 1]);
    // Tenants 1 and 2 hold as many: the one of the smallest id pays.
    let payer = smallest(&[1, 2]);
    let (other, nearest) = if payer == 1 { (2, "a") } else { (1, "b") };
    acquire(&store, 5, "x").await;
    assert_eq!(store.evicted(), 2);
    assert_eq!(store.lookup(&key(payer, nearest)).await.unwrap(), None);
    assert_eq!(store.tenant_entry_count(&tenant(payer)), 2);
    assert_eq!(store.tenant_entry_count(&tenant(other)), 3);
    // Tenant 3, within its share, makes room from the one tenant still over it.
    acquire(&store, 3, "y").await;
    assert_eq!(store.evicted(), 3);
    assert_eq!(store.tenant_entry_count(&tenant(other)), 2);
    assert!(
        matches!(
            store.begin(&key(3, "victim"), &fp(1), LEASE).await.unwrap(),
            Begin::Completed(_)
        ),
        "the victim's record is kept while a tenant is over its share"
    );
    // No one over their share now: a full store drops its nearest expiry, the victim's.
    assert_eq!(counts([1, 2, 3, 4]), [2, 2, 2, 1]);
    acquire(&store, 6, "x").await;
    assert_eq!(store.evicted(), 4);
    assert_eq!(store.lookup(&key(3, "victim")).await.unwrap(), None);
    check_counts(&store);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_over_its_share_with_all_its_records_in_flight_takes_the_nearest_expiry() {
    let store = MemoryStore::builder()
        .max_entries(4)
        .max_entries_per_tenant(2)
        .build();
    completed(&store, 2, "kept", TTL).await;
    let held = [
        acquire(&store, 1, "a").await,
        acquire(&store, 1, "b").await,
        acquire(&store, 1, "c").await,
    ];
    // Full, and tenant 1 over its share with nothing completed: the store is not full of
    // in-flight records, so its nearest expiry goes, tenant 2's record.
    acquire(&store, 1, "d").await;
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.tenant_entry_count(&tenant(1)), 4);
    assert_eq!(store.lookup(&key(2, "kept")).await.unwrap(), None);
    // In-flight records alone fill the store: any new key is refused, whoever's.
    for refused in [
        key(2, "z"),
        key(1, "z"),
        RecordKey::new(TenantId::shared(), "z"),
    ] {
        let err = store.begin(&refused, &fp(1), LEASE).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::CapacityExceeded);
        assert!(
            err.to_string().contains("full of requests in flight"),
            "{err}"
        );
    }
    // Once one of its records completes, the tenant over its share makes room from it.
    store
        .complete(&key(1, "a"), held[0], response(), TTL)
        .await
        .unwrap();
    acquire(&store, 1, "e").await;
    assert_eq!(store.evicted(), 2);
    assert_eq!(store.lookup(&key(1, "a")).await.unwrap(), None);
    // Holders that died free their places without an eviction.
    tokio::time::advance(LEASE).await;
    acquire(&store, 1, "f").await;
    assert_eq!(store.evicted(), 2);
    assert_eq!(store.entry_count(), 1);
    assert_eq!(store.tenant_entry_count(&tenant(1)), 1);
    let _ = held;
    check_counts(&store);
}

#[tokio::test(start_paused = true)]
async fn the_shared_scope_is_a_tenant_like_any_other() {
    let store = MemoryStore::builder()
        .max_entries(4)
        .max_entries_per_tenant(2)
        .build();
    completed(&store, 1, "other", TTL / 2).await;
    for k in ["a", "b", "c", "d", "e"] {
        let shared = RecordKey::new(TenantId::shared(), k);
        let Begin::Acquired(token) = store.begin(&shared, &fp(1), LEASE).await.unwrap() else {
            panic!("{k} runs");
        };
        store
            .complete(&shared, token, response(), TTL)
            .await
            .unwrap();
    }
    assert_eq!(store.tenant_entry_count(&TenantId::shared()), 3);
    assert_eq!(store.evicted(), 2, "a and b, its own");
    assert!(store.lookup(&key(1, "other")).await.unwrap().is_some());
    let shared = |k| RecordKey::new(TenantId::shared(), k);
    assert_eq!(store.lookup(&shared("a")).await.unwrap(), None);
    assert_eq!(store.lookup(&shared("b")).await.unwrap(), None);
    check_counts(&store);
}

/// A tenant of many (`u32`), and its record key `k`.
fn many(t: u32, k: &str) -> RecordKey {
    RecordKey::new(TenantId::hashed(t.to_le_bytes()), k)
}

/// A response of `size` bytes of body.
fn sized(size: usize) -> StoredResponse {
    StoredResponse::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from(vec![b'x'; size]),
    )
}

/// Begins and completes `k` of tenant `t` with a body of `size` bytes, if the store lets it.
async fn put(store: &MemoryStore, t: u32, k: &str, size: usize) {
    let key = many(t, k);
    if let Ok(Begin::Acquired(token)) = store.begin(&key, &fp(1), LEASE).await {
        store.complete(&key, token, sized(size), TTL).await.unwrap();
    }
}

/// Two tenants over their share of the bytes, and a shard far over its bytes again and again
/// (their large responses completed after their room was made): whoever begins next, the other
/// tenants' records stay.
#[tokio::test(start_paused = true)]
async fn other_tenants_records_stay_through_two_floods_of_large_responses() {
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .max_bytes(1 << 20)
        .build();
    for t in 10..20 {
        for k in 0..3 {
            put(&store, t, &format!("v{k}"), 10).await;
        }
    }
    for round in 0..4 {
        // Tenants 1 and 2 begin 40 keys each while there is room, then complete them large.
        let mut held = Vec::new();
        for t in 1..=2 {
            for k in 0..40 {
                let key = many(t, &format!("r{round}-{k}"));
                if let Ok(Begin::Acquired(token)) = store.begin(&key, &fp(1), LEASE).await {
                    held.push((key, token));
                }
            }
        }
        for (key, token) in held {
            store
                .complete(&key, token, sized(20_000), TTL)
                .await
                .unwrap();
        }
        put(&store, 10, &format!("new{round}"), 10).await;
        put(&store, 1, &format!("x{round}"), 10).await;
        check_counts(&store);
    }
    for t in 11..20 {
        let key = many(t, "v0");
        assert_eq!(store.tenant_entry_count(key.tenant()), 3, "tenant {t}");
    }
    assert_eq!(store.tenant_entry_count(many(10, "").tenant()), 7);
}

/// A new key in a shard far over its bytes drops many records of the tenants over their share,
/// and looks through the shard's tenants once for them, not once per record.
#[tokio::test(start_paused = true)]
async fn one_new_key_looks_through_the_tenants_once_however_many_records_it_drops() {
    const MAX_BYTES: usize = 4 << 20;
    let store = MemoryStore::builder()
        .max_entries(20_000)
        .max_bytes(MAX_BYTES)
        .build();
    // Tenants 1 and 2 fill the bytes far past their shares (512 kB each), among 2,000 others
    // of one small record each.
    for t in 1_000..3_000 {
        put(&store, t, "k", 0).await;
    }
    let mut n = 0;
    while store.weighted_size() < MAX_BYTES - 10_000 {
        put(&store, 1 + n % 2, &n.to_string(), 1_000).await;
        n += 1;
    }
    // Tenant 4 completes a large response begun while there was room: 400 kB over the bytes.
    let key = many(4, "large");
    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp(1), LEASE).await else {
        panic!("room for a new key");
    };
    store
        .complete(&key, token, sized(400_000), TTL)
        .await
        .unwrap();

    let scans = || read(store.inner.shards().next().unwrap()).tenant_scans();
    let (evicted, scanned) = (store.evicted(), scans());
    put(&store, 5, "new", 0).await;
    let dropped = store.evicted() - evicted;
    assert!(dropped > 100, "the bytes took many records: {dropped}");
    assert!(
        scans() - scanned <= 1,
        "{} scans for one key",
        scans() - scanned
    );
    assert!(store.weighted_size() < MAX_BYTES);
    check_counts(&store);
}

/// A tenant's share of the bytes is the part of `max_bytes` its share of the records is of
/// `max_entries`: 128 MiB of the default store, split over its shards.
#[test]
fn the_default_store_gives_a_tenant_an_eighth_of_its_bytes() {
    let store = MemoryStore::new();
    let share: usize = store
        .inner
        .shards()
        .map(|shard| read(shard).tenant_share_bytes())
        .sum();
    let expected = 128 << 20;
    assert!(
        share.abs_diff(expected) <= expected / 1_000,
        "{share} bytes, not about {expected}"
    );
    let one_shard = MemoryStore::builder()
        .max_entries(1_000)
        .max_entries_per_tenant(250)
        .max_bytes(1 << 20)
        .build();
    let share: usize = one_shard
        .inner
        .shards()
        .map(|shard| read(shard).tenant_share_bytes())
        .sum();
    assert_eq!(share, (1 << 20) / 4);
}

/// Bounds at their extremes: a tenant's share of the bytes neither overflows nor divides by
/// zero, and a full store still takes new keys.
#[tokio::test(start_paused = true)]
async fn extreme_bounds_take_new_keys() {
    let stores = [
        MemoryStore::builder()
            .max_entries(1)
            .max_bytes(usize::MAX)
            .build(),
        MemoryStore::builder().max_entries(1).max_bytes(1).build(),
        MemoryStore::builder()
            .max_entries(usize::MAX)
            .max_entries_per_tenant(usize::MAX)
            .max_bytes(usize::MAX)
            .build(),
        MemoryStore::builder()
            .max_entries(usize::MAX)
            .max_entries_per_tenant(1)
            .max_bytes(1)
            .build(),
        MemoryStore::builder()
            .max_entries(1_000)
            .max_entries_per_tenant(1)
            .max_bytes(1_000)
            .build(),
    ];
    for store in &stores {
        for i in 0..50u32 {
            put(store, i % 5, &i.to_string(), (i as usize % 3) * 5_000).await;
        }
        assert!(store.entry_count() >= 1);
        check_counts(store);
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_store_still_drops_the_nearest_expiry_of_any_tenant() {
    let store = MemoryStore::builder()
        .max_entries(4)
        .max_entries_per_tenant(2)
        .build();
    completed(&store, 1, "a", TTL / 2).await;
    completed(&store, 1, "b", TTL).await;
    completed(&store, 2, "c", TTL).await;
    completed(&store, 2, "d", TTL).await;
    // Tenant 3 is within its share, no tenant is over it: the nearest expiry of all goes.
    acquire(&store, 3, "e").await;
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.lookup(&key(1, "a")).await.unwrap(), None);
    assert_eq!(store.tenant_entry_count(&tenant(1)), 1);
    check_counts(&store);
}

#[test]
fn the_bound_per_tenant_is_checked_in_build() {
    fn message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = std::panic::catch_unwind(f).unwrap_err();
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    }
    let zero = message(|| drop(MemoryStore::builder().max_entries_per_tenant(0).build()));
    assert!(
        zero.contains("max_entries_per_tenant must be at least 1"),
        "{zero}"
    );
    let over = message(|| {
        let builder = MemoryStore::builder().max_entries(10);
        drop(builder.max_entries_per_tenant(11).build());
    });
    assert!(over.contains("at most max_entries (10), got 11"), "{over}");
    let store = MemoryStore::builder()
        .max_entries(10)
        .max_entries_per_tenant(10)
        .build();
    assert_eq!(store.settings().max_entries_per_tenant(), 10);
    // The default: an eighth of max_entries, at least 1.
    let default = |n| {
        MemoryStore::builder()
            .max_entries(n)
            .build()
            .settings()
            .max_entries_per_tenant()
    };
    assert_eq!(default(3), 1);
    assert_eq!(default(8), 1);
    assert_eq!(default(17), 2);
    assert_eq!(default(50_000), 6_250);
    assert_eq!(default(1_000_000), 125_000);
    assert_eq!(
        MemoryStore::new().settings().max_entries_per_tenant(),
        125_000
    );
}

/// Real threads, tenants flooding a full store at once: every count stays exact, evictions
/// included, and the victim tenant, within its share, never loses a record.
#[test]
fn counts_stay_exact_under_concurrent_floods() {
    const THREADS: u8 = 4;
    const KEYS: usize = 5_000;
    const MAX: usize = 2_000;
    // No lease or record runs out while the test runs, however slow the machine.
    const LONG_LEASE: Duration = Duration::from_secs(3600);
    const LONG_TTL: Duration = Duration::from_secs(3600);
    let store = MemoryStore::builder()
        .max_entries(MAX)
        .max_entries_per_tenant(300)
        .build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = runtime.enter();
    for k in 0..100 {
        let k = key(100, &k.to_string());
        let begun = store.begin(&k, &fp(1), LONG_LEASE).now_or_never().unwrap();
        let Ok(Begin::Acquired(token)) = begun else {
            panic!("the victim's key runs");
        };
        let done = store
            .complete(&k, token, response(), LONG_TTL)
            .now_or_never();
        done.unwrap().unwrap();
    }
    // Per thread: records begun, released, forgotten.
    let tallies: Vec<(usize, usize, usize)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                scope.spawn(move || {
                    let (mut begun, mut released, mut forgotten) = (0, 0, 0);
                    // Two tenants per thread, sharing them with the next thread.
                    for i in 0..KEYS {
                        let tenant = (t + (i % 2) as u8) % THREADS;
                        let k = key(tenant, &format!("{t}-{i}"));
                        let got = store.begin(&k, &fp(1), LONG_LEASE).now_or_never().unwrap();
                        // Every tenant that floods holds hundreds of completed records: none
                        // is ever refused.
                        let Ok(Begin::Acquired(token)) = got else {
                            panic!("{k:?}: {got:?}");
                        };
                        begun += 1;
                        let end = if i % 7 == 0 {
                            released += 1;
                            store.release(&k, token).now_or_never()
                        } else {
                            store
                                .complete(&k, token, response(), LONG_TTL)
                                .now_or_never()
                        };
                        end.unwrap().expect("an in-flight record is never dropped");
                        if i % 13 == 0 && i % 7 != 0 {
                            let forgot = store.forget(&k, true).now_or_never().unwrap();
                            // Another thread's new key may have evicted it first.
                            if forgot.unwrap() == Forget::Forgotten {
                                forgotten += 1;
                            }
                        }
                    }
                    (begun, released, forgotten)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    check_counts(&store);
    assert_eq!(
        store.tenant_entry_count(&tenant(100)),
        100,
        "the victim lost nothing"
    );
    let total: usize = (0..THREADS)
        .chain([100])
        .map(|t| store.tenant_entry_count(&tenant(t)))
        .sum();
    assert_eq!(total, store.entry_count());
    assert_eq!(store.entry_count(), MAX, "the floods fill the store");
    let begun: usize = tallies.iter().map(|t| t.0).sum();
    let gone: usize = tallies.iter().map(|t| t.1 + t.2).sum();
    assert_eq!(begun, THREADS as usize * KEYS);
    assert_eq!(
        store.evicted() as usize,
        100 + begun - gone - store.entry_count(),
        "every record that left, and was neither released nor forgotten, was evicted"
    );
    for shard in store.inner.shards() {
        let shard = read(shard);
        assert!(
            shard.tenants_queued() <= 2 * shard.len() + 16 * 5,
            "stale entries are dropped"
        );
    }
}

// The model: every path that adds or removes a record, on a store of one shard of 6 records
// and 3,000 bytes with a share of 2 records and 1,000 bytes per tenant, for 3 tenants of 4 keys:
// two tenants can be over their share at once, and hold as many; a large response (1,200
// bytes) takes a tenant over its share of bytes alone, and two fill most of the store's.
// Checked after each step against a reference and against the shard's own recount.

#[derive(Debug, Clone)]
enum Op {
    Begin {
        t: u8,
        k: u8,
        f: u8,
    },
    Complete {
        t: u8,
        k: u8,
        long: bool,
        large: bool,
    },
    Release {
        t: u8,
        k: u8,
    },
    Forget {
        t: u8,
        k: u8,
        force: bool,
    },
    Advance(u64),
    Prune,
}

fn op() -> impl Strategy<Value = Op> {
    let slot = (0..TENANTS, 0..4u8);
    prop_oneof![
        6 => (slot.clone(), 0..2u8).prop_map(|((t, k), f)| Op::Begin { t, k, f }),
        4 => (slot.clone(), any::<bool>(), any::<bool>())
            .prop_map(|((t, k), long, large)| Op::Complete { t, k, long, large }),
        1 => slot.clone().prop_map(|(t, k)| Op::Release { t, k }),
        1 => (slot, any::<bool>()).prop_map(|((t, k), force)| Op::Forget { t, k, force }),
        2 => prop_oneof![Just(1u64), Just(11), Just(25), Just(45)].prop_map(Op::Advance),
        1 => Just(Op::Prune),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    fp: u8,
    seq: u64,
    /// In flight: the lease's end; completed: the expiry.
    deadline: u64,
    completed: bool,
    /// The bytes it counts for, as the store counts them.
    size: usize,
}

#[derive(Default)]
struct Model {
    records: HashMap<(u8, u8), Rec>,
    /// The token and acquisition of each slot's last `Acquired`.
    held: HashMap<(u8, u8), (LockToken, u64)>,
    seq: u64,
    now: u64,
    evicted: u64,
    /// The heaviest tenant when the tenants were last looked through.
    heaviest: Option<u8>,
}

const MAX: usize = 6;
const MAX_BYTES: usize = 3_000;
const PER_TENANT: usize = 2;
/// A tenant's share of the bytes: the part of them its share of the records is.
const PER_TENANT_BYTES: usize = MAX_BYTES * PER_TENANT / MAX;
const TENANTS: u8 = 3;

/// The response a completion stores: 2 bytes of body, or 1,200.
fn sized_response(large: bool) -> StoredResponse {
    sized(if large { 1_200 } else { 2 })
}

impl Model {
    fn live(&self, r: &Rec) -> bool {
        r.deadline > self.now
    }

    fn tenant_len(&self, t: u8) -> usize {
        self.records.keys().filter(|(rt, _)| *rt == t).count()
    }

    fn tenant_bytes(&self, t: u8) -> usize {
        let of = self.records.iter().filter(|((rt, _), _)| *rt == t);
        of.map(|(_, r)| r.size).sum()
    }

    fn full(&self) -> bool {
        self.records.len() >= MAX
            || self.records.values().map(|r| r.size).sum::<usize>() >= MAX_BYTES
    }

    fn at_share(&self, t: u8) -> bool {
        self.tenant_len(t) >= PER_TENANT || self.tenant_bytes(t) >= PER_TENANT_BYTES
    }

    fn remove_dead_in_flight(&mut self) {
        let now = self.now;
        self.records.retain(|_, r| r.completed || r.deadline > now);
    }

    /// The completed record nearest expiry among those `of` selects (the one begun first among
    /// equals).
    fn nearest(&self, of: impl Fn(u8) -> bool) -> Option<((u8, u8), Rec)> {
        self.records
            .iter()
            .filter(|((t, _), r)| r.completed && of(*t))
            .min_by_key(|(_, r)| (r.deadline, r.seq))
            .map(|(slot, r)| (*slot, *r))
    }

    /// Drops the completed record nearest expiry among those `of` selects.
    fn drop_nearest(&mut self, of: impl Fn(u8) -> bool) -> bool {
        let Some((slot, rec)) = self.nearest(of) else {
            return false;
        };
        self.records.remove(&slot);
        if self.live(&rec) {
            self.evicted += 1;
        }
        true
    }

    fn over_share(&self, t: u8) -> bool {
        self.tenant_len(t) > PER_TENANT || self.tenant_bytes(t) > PER_TENANT_BYTES
    }

    /// A tenant over its share: the one that held the most of its share (the larger of its
    /// part of the records and its part of the bytes; among equals, the one of the smallest
    /// id) when the tenants were last looked through, while it stays over its share; they are
    /// looked through again when it is within it.
    fn heaviest_over_share(&mut self) -> Option<u8> {
        if !(0..TENANTS).any(|t| self.over_share(t)) {
            return None;
        }
        if let Some(t) = self.heaviest.filter(|&t| self.over_share(t)) {
            return Some(t);
        }
        let weight = |t: u8| {
            let records = self.tenant_len(t) * PER_TENANT_BYTES;
            records.max(self.tenant_bytes(t) * PER_TENANT)
        };
        let (.., heaviest) = (0..TENANTS)
            .map(|t| (weight(t), std::cmp::Reverse(*tenant(t).as_bytes()), t))
            .max()?;
        self.heaviest = Some(heaviest);
        self.over_share(heaviest).then_some(heaviest)
    }

    /// `Ok(Some(seq))`: acquired; `Ok(None)`: an answer from a live record; `Err(())`: full.
    fn begin(&mut self, t: u8, k: u8, f: u8) -> Result<Option<u64>, ()> {
        if let Some(r) = self.records.get(&(t, k)) {
            if self.live(r) {
                return Ok(None);
            }
            // A dead record of the key is taken over: no room is made, no share checked.
            let seq = self.take_seq();
            self.records.insert((t, k), self.in_flight(k, f, seq));
            return Ok(Some(seq));
        }
        if self.full() {
            // Full: dead records go first, whoever's they are, expired ones nearest first while
            // the store is still full.
            self.remove_dead_in_flight();
            while self.full() {
                match self.nearest(|_| true) {
                    Some((slot, r)) if !self.live(&r) => {
                        self.records.remove(&slot);
                    }
                    _ => break,
                }
            }
            if self.full() {
                // Still full: every record is live. While it is, a tenant at its share or over
                // it pays with its own completed records when it has some; a tenant within it
                // takes those of the heaviest tenant, while that one is over its share.
                while self.full() {
                    let from = if self.at_share(t) {
                        t
                    } else if let Some(heaviest) = self.heaviest_over_share() {
                        heaviest
                    } else {
                        break;
                    };
                    if !self.drop_nearest(|rt| rt == from) {
                        break;
                    }
                }
                // Then the nearest expiry of all, while the store is full.
                while self.full() {
                    if !self.drop_nearest(|_| true) {
                        return Err(());
                    }
                }
            }
        }
        let seq = self.take_seq();
        self.records.insert((t, k), self.in_flight(k, f, seq));
        Ok(Some(seq))
    }

    fn take_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn in_flight(&self, k: u8, fp: u8, seq: u64) -> Rec {
        Rec {
            fp,
            seq,
            deadline: self.now + LEASE.as_secs(),
            completed: false,
            size: super::shard::RECORD_OVERHEAD + k.to_string().len(),
        }
    }

    /// Whether the slot's last token still holds its record.
    fn holds(&self, slot: (u8, u8)) -> bool {
        let Some(&(_, seq)) = self.held.get(&slot) else {
            return false;
        };
        matches!(self.records.get(&slot), Some(r) if !r.completed && r.seq == seq)
    }
}

async fn run_model(ops: Vec<Op>) {
    let store = MemoryStore::builder()
        .max_entries(MAX)
        .max_bytes(MAX_BYTES)
        .max_entries_per_tenant(PER_TENANT)
        // No background pruning: `Prune` steps prune.
        .cleanup_interval(super::builder::MAX_INTERVAL)
        .build();
    let mut model = Model::default();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Begin { t, k, f } => {
                let expect = model.begin(t, k, f);
                let live = model.records.get(&(t, k)).copied();
                let got = store.begin(&key(t, &k.to_string()), &fp(f), LEASE).await;
                match (expect, got) {
                    (Ok(Some(seq)), Ok(Begin::Acquired(token))) => {
                        model.held.insert((t, k), (token, seq));
                    }
                    (Ok(None), Ok(answer)) => {
                        let r = live.expect("live");
                        let ok = match answer {
                            Begin::Mismatch => r.fp != f,
                            Begin::InFlight => r.fp == f && !r.completed,
                            Begin::Completed(_) => r.fp == f && r.completed,
                            _ => false,
                        };
                        assert!(ok, "step {i}: {answer:?} for {r:?}");
                    }
                    (Err(()), Err(e)) => assert_eq!(e.kind(), StoreErrorKind::CapacityExceeded),
                    (expect, got) => panic!("step {i}: expected {expect:?}, got {got:?}"),
                }
            }
            Op::Complete { t, k, long, large } => {
                let ttl = if long { 40 } else { 20 };
                let holds = model.holds((t, k));
                let Some(&(token, _)) = model.held.get(&(t, k)) else {
                    continue;
                };
                let got = store
                    .complete(
                        &key(t, &k.to_string()),
                        token,
                        sized_response(large),
                        Duration::from_secs(ttl),
                    )
                    .await;
                assert_eq!(got.is_ok(), holds, "step {i}: complete");
                if holds {
                    let size = super::shard::completed_size(
                        &key(t, &k.to_string()),
                        &sized_response(large),
                    );
                    let r = model.records.get_mut(&(t, k)).unwrap();
                    r.completed = true;
                    r.deadline = model.now + ttl;
                    r.size = size;
                }
            }
            Op::Release { t, k } => {
                let holds = model.holds((t, k));
                let Some(&(token, _)) = model.held.get(&(t, k)) else {
                    continue;
                };
                let got = store.release(&key(t, &k.to_string()), token).await;
                assert_eq!(got.is_ok(), holds, "step {i}: release");
                if holds {
                    model.records.remove(&(t, k));
                }
            }
            Op::Forget { t, k, force } => {
                let expect = match model.records.get(&(t, k)).copied() {
                    None => Forget::NotFound,
                    Some(r) if !model.live(&r) => {
                        model.records.remove(&(t, k));
                        Forget::NotFound
                    }
                    Some(r) if !r.completed && !force => Forget::InFlight,
                    Some(_) => {
                        model.records.remove(&(t, k));
                        Forget::Forgotten
                    }
                };
                let got = store.forget(&key(t, &k.to_string()), force).await.unwrap();
                assert_eq!(got, expect, "step {i}: forget");
            }
            Op::Advance(secs) => {
                tokio::time::advance(Duration::from_secs(secs)).await;
                model.now += secs;
            }
            Op::Prune => {
                let now = model.now;
                let before = model.records.len();
                model.records.retain(|_, r| r.deadline > now);
                assert_eq!(
                    store.prune(),
                    before - model.records.len(),
                    "step {i}: prune"
                );
            }
        }
        assert_eq!(
            store.entry_count(),
            model.records.len(),
            "step {i}: records"
        );
        for t in 0..TENANTS {
            let n = store.tenant_entry_count(&tenant(t));
            assert_eq!(n, model.tenant_len(t), "step {i}: tenant {t}'s count");
        }
        let bytes: usize = model.records.values().map(|r| r.size).sum();
        assert_eq!(store.weighted_size(), bytes, "step {i}: bytes");
        assert_eq!(store.evicted(), model.evicted, "step {i}: evictions");
        check_counts(&store);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn per_tenant_counts_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(run_model(ops));
    }
}

/// A full store that keeps taking new keys drops its oldest records, and with each the entry
/// in its tenant's queue: no queue holds an entry for a record that left, whichever path made
/// the room (the shard's nearest expiry, or the tenant's own nearest).
#[tokio::test]
async fn a_full_store_under_new_keys_keeps_no_stale_entry_in_its_tenants_queues() {
    const MAX: usize = 64;
    let shared = MemoryStore::builder().max_entries(MAX).build();
    let bounded = MemoryStore::builder()
        .max_entries(MAX)
        .max_entries_per_tenant(MAX / 2)
        .build();
    for store in [&shared, &bounded] {
        for i in 0..20 * MAX {
            completed(store, (i % 3) as u8, &format!("k{i}"), TTL).await;
        }
        assert_eq!(store.entry_count(), MAX);
        check_counts(store);
        for shard in store.inner.shards() {
            let shard = read(shard);
            assert_eq!(
                shard.tenants_queued(),
                shard.len(),
                "no stale entry is queued"
            );
        }
    }
    assert!(shared.evicted() > 0 && bounded.evicted() > 0);
}
