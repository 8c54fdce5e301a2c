use super::builder::MAX_INTERVAL;
use super::shard::{RECORD_OVERHEAD, completed_size};
use super::*;
use crate::StoreErrorKind;
use crate::fingerprint::Fingerprint;
use crate::store::RecordState;
use crate::store::{Begin, Forget, IdempotencyStore, LockToken};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, StatusCode};

fn key(k: &str) -> RecordKey {
    RecordKey::new(TenantId::shared(), k)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn response() -> StoredResponse {
    StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"))
}

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(100);

async fn acquire(store: &MemoryStore, k: &str, n: u8) -> LockToken {
    match store.begin(&key(k), &fp(n), LEASE).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn store_completed(store: &MemoryStore, k: &str, ttl: Duration) {
    let token = acquire(store, k, 1).await;
    store
        .complete(&key(k), token, response(), ttl)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn expired_records_are_invisible_at_once() {
    let store = MemoryStore::new();
    store_completed(&store, "a", TTL).await;
    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    assert!(matches!(
        store.begin(&key("a"), &fp(2), LEASE).await.unwrap(),
        Begin::Mismatch
    ));
    tokio::time::advance(Duration::from_millis(1)).await;
    // Expired but not yet pruned: a new request takes the key, even a different one.
    assert_eq!(store.entry_count(), 1);
    assert_eq!(store.lookup(&key("a")).await.unwrap(), None);
    acquire(&store, "a", 2).await;
    assert_eq!(store.entry_count(), 1);
    // The taken-over record's old place in the expiry queue is stale: pruning leaves the new
    // record alone.
    assert_eq!(store.prune(), 0);
    assert!(matches!(
        store.begin(&key("a"), &fp(2), LEASE).await.unwrap(),
        Begin::InFlight
    ));
}

#[tokio::test(start_paused = true)]
async fn renew_release_and_fencing() {
    let store = MemoryStore::new();
    let token = acquire(&store, "a", 1).await;
    tokio::time::advance(LEASE / 2).await;
    store.renew(&key("a"), token, LEASE).await.unwrap();
    tokio::time::advance(LEASE / 2 + LEASE / 4).await;
    assert!(matches!(
        store.begin(&key("a"), &fp(1), LEASE).await.unwrap(),
        Begin::InFlight
    ));
    tokio::time::advance(LEASE).await;
    let taken = acquire(&store, "a", 1).await;
    for result in [
        store.renew(&key("a"), token, LEASE).await,
        store.complete(&key("a"), token, response(), TTL).await,
        store.release(&key("a"), token).await,
    ] {
        assert_eq!(result.unwrap_err().kind(), StoreErrorKind::LeaseLost);
    }
    store.release(&key("a"), taken).await.unwrap();
    assert!(store.is_empty());
    assert_eq!(store.weighted_size(), 0);
    assert_eq!(
        store.release(&key("a"), taken).await.unwrap_err().kind(),
        StoreErrorKind::LeaseLost
    );
    // A completed record cannot be released.
    let token = acquire(&store, "b", 1).await;
    store
        .complete(&key("b"), token, response(), TTL)
        .await
        .unwrap();
    assert!(store.release(&key("b"), token).await.is_err());
    assert!(matches!(
        store.begin(&key("b"), &fp(1), LEASE).await.unwrap(),
        Begin::Completed(r) if r.body() == "ok"
    ));
}

#[tokio::test(start_paused = true)]
async fn the_background_pruner_prunes_and_ends_with_the_store() {
    let store = MemoryStore::builder()
        .cleanup_interval(Duration::from_secs(5))
        .build();
    store_completed(&store, "a", Duration::from_secs(1)).await;
    acquire(&store, "b", 1).await; // in flight, lease 10 s
    assert_eq!(store.entry_count(), 2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        store.entry_count(),
        1,
        "the expired completed record was pruned"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(store.is_empty(), "the dead in-flight record was pruned");
    assert_eq!(store.weighted_size(), 0);

    let weak = Arc::downgrade(&store.inner);
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks, 1, "the pruner is running");
    drop(store);
    assert!(
        weak.upgrade().is_none(),
        "the pruner holds no strong reference"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks, 0, "the pruner ended with the store");
}

#[tokio::test(start_paused = true)]
async fn a_full_store_drops_the_completed_record_nearest_expiry() {
    let store = MemoryStore::new().max_entries(4);
    store_completed(&store, "far", TTL).await;
    store_completed(&store, "near", TTL / 2).await;
    store_completed(&store, "middle", TTL - Duration::from_secs(1)).await;
    acquire(&store, "running", 1).await;
    assert_eq!(store.entry_count(), 4);

    acquire(&store, "new", 1).await;
    assert_eq!(store.entry_count(), 4);
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.lookup(&key("near")).await.unwrap(), None);
    for kept in ["far", "middle"] {
        let begun = store.begin(&key(kept), &fp(1), LEASE).await.unwrap();
        assert!(matches!(begun, Begin::Completed(_)), "{kept} is kept");
    }
    let running = store.begin(&key("running"), &fp(1), LEASE).await.unwrap();
    assert!(matches!(running, Begin::InFlight));

    // The next new key drops the next nearest; the in-flight ones are never chosen.
    acquire(&store, "newer", 1).await;
    assert_eq!(store.evicted(), 2);
    assert_eq!(store.lookup(&key("middle")).await.unwrap(), None);
    assert!(store.lookup(&key("far")).await.unwrap().is_some());
    // A retry of a dropped record runs again.
    acquire(&store, "near", 1).await;
    assert_eq!(store.evicted(), 3);
    assert_eq!(store.lookup(&key("far")).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn expired_records_make_room_before_live_ones_are_dropped() {
    let store = MemoryStore::new().max_entries(2);
    store_completed(&store, "short", Duration::from_secs(1)).await;
    store_completed(&store, "long", TTL).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    acquire(&store, "new", 1).await;
    assert_eq!(
        store.evicted(),
        0,
        "an expired record is pruned, not evicted"
    );
    assert!(store.lookup(&key("long")).await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_store_full_of_in_flight_records_refuses_new_keys_and_keeps_them() {
    let store = MemoryStore::new().max_entries(3);
    let tokens = [
        acquire(&store, "a", 1).await,
        acquire(&store, "b", 1).await,
        acquire(&store, "c", 1).await,
    ];
    let err = store.begin(&key("d"), &fp(1), LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::CapacityExceeded);
    assert!(err.to_string().contains("in flight"), "{err}");
    assert_eq!(store.entry_count(), 3);
    assert_eq!(store.evicted(), 0);
    for k in ["a", "b", "c"] {
        let begun = store.begin(&key(k), &fp(1), LEASE).await.unwrap();
        assert!(matches!(begun, Begin::InFlight), "{k} is still held");
    }
    // Once one completes, it can make room.
    let ttl = TTL;
    store
        .complete(&key("b"), tokens[1], response(), ttl)
        .await
        .unwrap();
    acquire(&store, "d", 1).await;
    assert_eq!(store.evicted(), 1);
    for (k, token) in [("a", tokens[0]), ("c", tokens[2])] {
        store
            .complete(&key(k), token, response(), ttl)
            .await
            .unwrap();
    }
    // A holder that died (its lease ran out) frees its place too.
    let store = MemoryStore::new().max_entries(1);
    acquire(&store, "dead", 1).await;
    assert!(store.begin(&key("x"), &fp(1), LEASE).await.is_err());
    tokio::time::advance(LEASE).await;
    acquire(&store, "x", 1).await;
    assert_eq!(store.evicted(), 0);
    assert_eq!(store.entry_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_byte_budget_drops_completed_records_to_make_room() {
    let store = MemoryStore::new().max_bytes(10_000);
    let body = Bytes::from(vec![0; 9_600]);
    let big = StoredResponse::new(StatusCode::OK, HeaderMap::new(), body);
    let token = acquire(&store, "a", 1).await;
    assert_eq!(store.weighted_size(), RECORD_OVERHEAD + 1);
    let ttl = Duration::from_secs(50);
    store.complete(&key("a"), token, big, ttl).await.unwrap();
    assert_eq!(store.weighted_size(), RECORD_OVERHEAD + 1 + 9_600);
    store_completed(&store, "b", TTL).await;
    // Over the budget: a new key drops "a", nearest its expiry, and gets its bytes.
    acquire(&store, "c", 1).await;
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.lookup(&key("a")).await.unwrap(), None);
    let b = completed_size(&key("b"), &response());
    assert_eq!(store.weighted_size(), b + RECORD_OVERHEAD + 1);
    assert_eq!(store.entry_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn lookup_and_forget() {
    let store = MemoryStore::new();
    assert_eq!(store.lookup(&key("a")).await.unwrap(), None);
    assert_eq!(
        store.forget(&key("a"), false).await.unwrap(),
        Forget::NotFound
    );

    let before = SystemTime::now();
    let token = acquire(&store, "a", 7).await;
    let info = store.lookup(&key("a")).await.unwrap().unwrap();
    assert_eq!(info.fingerprint, fp(7));
    let RecordState::InFlight { lease_until } = info.state else {
        panic!("in flight: {info:?}");
    };
    let lease_left = lease_until.duration_since(before).unwrap();
    assert!(lease_left > LEASE - Duration::from_secs(1) && lease_left <= LEASE);
    // Read twice, the same instant.
    assert_eq!(store.lookup(&key("a")).await.unwrap(), Some(info));
    assert_eq!(
        store.forget(&key("a"), false).await.unwrap(),
        Forget::InFlight
    );
    assert!(
        store.lookup(&key("a")).await.unwrap().is_some(),
        "left alone"
    );
    assert_eq!(
        store.forget(&key("a"), true).await.unwrap(),
        Forget::Forgotten
    );
    assert!(store.is_empty());
    let lost = store.complete(&key("a"), token, response(), TTL).await;
    assert_eq!(lost.unwrap_err().kind(), StoreErrorKind::LeaseLost);

    let token = acquire(&store, "b", 1).await;
    let created = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::new());
    store
        .complete(&key("b"), token, created, TTL)
        .await
        .unwrap();
    let info = store.lookup(&key("b")).await.unwrap().unwrap();
    let RecordState::Completed {
        status,
        replayable,
        expires_at,
    } = info.state
    else {
        panic!("completed: {info:?}");
    };
    assert_eq!((status, replayable), (StatusCode::CREATED, true));
    assert!(expires_at.duration_since(before).unwrap() > TTL - Duration::from_secs(1));
    assert_eq!(
        store.forget(&key("b"), false).await.unwrap(),
        Forget::Forgotten
    );
    assert_eq!(
        store.forget(&key("b"), false).await.unwrap(),
        Forget::NotFound
    );
    acquire(&store, "b", 2).await;

    let token = acquire(&store, "c", 1).await;
    let omitted = StoredResponse::omitted(StatusCode::OK);
    store
        .complete(&key("c"), token, omitted, TTL)
        .await
        .unwrap();
    let info = store.lookup(&key("c")).await.unwrap().unwrap();
    assert!(matches!(
        info.state,
        RecordState::Completed {
            replayable: false,
            ..
        }
    ));
    // Expired: not found, and gone.
    tokio::time::advance(TTL).await;
    assert_eq!(store.lookup(&key("c")).await.unwrap(), None);
    assert_eq!(
        store.forget(&key("c"), true).await.unwrap(),
        Forget::NotFound
    );
    assert_eq!(store.entry_count(), 1);
}

#[tokio::test]
async fn forgotten_records_do_not_grow_the_expiry_queue() {
    let store = MemoryStore::new().max_entries(1_000);
    assert_eq!(store.inner.shards.len(), 1);
    for i in 0..10_000 {
        let k = i.to_string();
        store_completed(&store, &k, TTL).await;
        assert_eq!(
            store.forget(&key(&k), false).await.unwrap(),
            Forget::Forgotten
        );
    }
    assert!(store.is_empty());
    assert!(read(store.inner.shards().next().unwrap()).queued() <= 64);
}

#[tokio::test]
async fn a_key_used_again_after_it_expired_does_not_grow_the_expiry_queue() {
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .cleanup_interval(MAX_INTERVAL)
        .build();
    assert_eq!(store.inner.shards.len(), 1);
    for _ in 0..10_000 {
        // Expired at once: the next `begin` takes the record over in place.
        store_completed(&store, "again", Duration::ZERO).await;
    }
    assert_eq!(store.entry_count(), 1);
    assert!(read(store.inner.shards().next().unwrap()).queued() <= 66);
}

#[test]
fn the_pruner_starts_again_on_a_later_runtime_once_the_first_is_gone() {
    let store = MemoryStore::builder()
        .cleanup_interval(Duration::from_millis(20))
        .build();
    // First used on a runtime of its own (a start-up check), which then goes away.
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    startup.block_on(acquire(&store, "check", 1));
    drop(startup);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for i in 0..100 {
            store_completed(&store, &i.to_string(), Duration::from_millis(1)).await;
        }
        assert_eq!(store.entry_count(), 101);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The completed records expired and were pruned; the first one is in flight still.
        assert_eq!(store.entry_count(), 1, "the pruner runs on this runtime");
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 1, "one pruner");
    });
}

fn panics(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let err = std::panic::catch_unwind(f).unwrap_err();
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap()
}

#[test]
fn settings_are_checked_in_build_and_belong_to_a_new_store() {
    let build = |set: fn(MemoryStoreBuilder) -> MemoryStoreBuilder| {
        panics(move || drop(set(MemoryStore::builder()).build()))
    };
    assert!(build(|b| b.max_entries(0)).contains("max_entries must be at least 1"));
    assert!(build(|b| b.max_bytes(0)).contains("max_bytes must be at least 1"));
    let zero = build(|b| b.cleanup_interval(Duration::ZERO));
    assert!(
        zero.contains("cleanup_interval must be longer than zero"),
        "{zero}"
    );
    for huge in [
        Duration::MAX,
        Duration::from_millis(u64::MAX),
        MAX_INTERVAL + Duration::from_secs(1),
    ] {
        let message = panics(move || drop(MemoryStore::builder().cleanup_interval(huge).build()));
        assert!(message.contains("at most 365 days"), "{message}");
    }
    // The shorthands go through the same check.
    assert!(panics(|| drop(MemoryStore::new().max_entries(0))).contains("at least 1"));
    assert!(panics(|| drop(MemoryStore::new().max_bytes(0))).contains("at least 1"));
    let message = panics(|| {
        let store = MemoryStore::new();
        let _shared = store.clone();
        drop(store.max_entries(10));
    });
    assert!(message.contains("before it is cloned or used"), "{message}");
    let message = panics(|| {
        let store = MemoryStore::new();
        let _ = store.prune();
        drop(store.max_bytes(10));
    });
    assert!(message.contains("before it is cloned or used"), "{message}");

    let store = MemoryStore::new().max_entries(5_000_000).max_bytes(2 << 30);
    let settings = store.settings();
    assert_eq!(settings.max_entries(), 5_000_000);
    assert_eq!(settings.max_bytes(), 2 << 30);
    assert_eq!(settings.cleanup_interval(), Duration::from_secs(60));
    assert_eq!(store.inner.shards.len(), machine_shards().min(64));

    // A builder is a value: changing a clone leaves the original as it was.
    let builder = MemoryStore::builder().max_entries(10);
    let other = builder.clone().max_entries(20);
    assert_eq!(builder.build().settings().max_entries(), 10);
    let store = other.cleanup_interval(MAX_INTERVAL).build();
    assert_eq!(store.settings().max_entries(), 20);
    assert_eq!(store.settings().cleanup_interval(), MAX_INTERVAL);
}

#[tokio::test]
async fn initial_capacity_sizes_the_tables_up_front() {
    let message = panics(|| {
        drop(
            MemoryStore::builder()
                .max_entries(100)
                .initial_capacity(101)
                .build(),
        );
    });
    assert!(
        message.contains("initial_capacity must be at most max_entries"),
        "{message}"
    );
    assert_eq!(MemoryStore::new().settings().initial_capacity(), 0);

    // Room for 20,000 records in a store bounded at 100,000: nothing is evicted here.
    const RECORDS: usize = 20_000;
    let store = MemoryStore::builder()
        .max_entries(5 * RECORDS)
        .initial_capacity(RECORDS)
        .build();
    assert_eq!(store.settings().initial_capacity(), RECORDS);
    let capacities = || -> Vec<usize> {
        store
            .inner
            .shards()
            .map(|s| crate::store::util::read(s).capacity())
            .collect()
    };
    let before = capacities();
    let shards = before.len();
    for (i, &capacity) in before.iter().enumerate() {
        assert!(
            capacity >= share(RECORDS, shards, i),
            "shard {i}: {capacity}"
        );
    }
    // Filled to 90 % (keys spread over the shards by a random hash, so a shard may get more
    // than its share: the tables' rounding up leaves room for that), no table grew.
    for i in 0..RECORDS * 9 / 10 {
        store_completed(&store, &format!("k{i}"), Duration::from_secs(60)).await;
    }
    assert_eq!(store.entry_count(), RECORDS * 9 / 10);
    assert_eq!(capacities(), before);
}

/// The most shards a store has on this machine.
fn machine_shards() -> usize {
    max_shards(std::thread::available_parallelism().map_or(1, usize::from))
}

#[test]
fn shards_follow_the_machine_s_threads() {
    let by_threads = [1, 2, 4, 5, 8, 16, 32, 64, 1_000, usize::MAX].map(max_shards);
    assert_eq!(by_threads, [32, 32, 32, 64, 64, 128, 256, 256, 256, 256]);
    // The bounds still split a store into fewer where its shares would be too small.
    assert_eq!(
        shard_count(1_000_000, DEFAULT_MAX_BYTES, usize::MAX, max_shards(2)),
        32
    );
    assert_eq!(
        shard_count(100_000, DEFAULT_MAX_BYTES, usize::MAX, max_shards(64)),
        4
    );
}

#[test]
fn shards_split_the_bounds() {
    const ANY: usize = usize::MAX;
    assert_eq!(shard_count(3, DEFAULT_MAX_BYTES, ANY, MAX_SHARDS), 1);
    assert_eq!(shard_count(DEFAULT_MAX_ENTRIES, 10_000, ANY, MAX_SHARDS), 1);
    // A store below twice a shard's smallest share is one shard: its bounds are exact.
    assert_eq!(shard_count(32_767, DEFAULT_MAX_BYTES, ANY, MAX_SHARDS), 1);
    assert_eq!(shard_count(32_768, DEFAULT_MAX_BYTES, ANY, MAX_SHARDS), 2);
    assert_eq!(
        shard_count(DEFAULT_MAX_ENTRIES, (64 << 20) - 1, ANY, MAX_SHARDS),
        1
    );
    assert_eq!(shard_count(100_000, DEFAULT_MAX_BYTES, ANY, MAX_SHARDS), 4);
    assert_eq!(
        shard_count(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES, ANY, MAX_SHARDS),
        32
    );
    assert_eq!(shard_count(usize::MAX, usize::MAX, ANY, MAX_SHARDS), 256);
    // A small bound per tenant keeps its shares from getting too small to even out.
    assert_eq!(
        shard_count(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES, 1_000, MAX_SHARDS),
        8
    );
    assert_eq!(
        shard_count(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES, 10, MAX_SHARDS),
        1
    );
    // The default bound per tenant leaves the default store every shard its bounds allow.
    assert_eq!(
        MemoryStore::new().inner.shards.len(),
        machine_shards().min(32)
    );
    assert_eq!(
        MemoryStore::new().settings().max_entries_per_tenant(),
        125_000
    );
    let total: usize = (0..32).map(|i| share(100_003, 32, i)).sum();
    assert_eq!(total, 100_003);
}

/// Real threads insert, complete and evict at once: the bound holds, every eviction is
/// counted, and no in-flight record is ever dropped.
#[test]
fn the_bound_holds_under_concurrent_eviction() {
    const THREADS: usize = 4;
    const KEYS: usize = 20_000;
    const MAX: usize = 5_000;
    let store = MemoryStore::new().max_entries(MAX);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = runtime.enter();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = &store;
            scope.spawn(move || {
                for i in 0..KEYS {
                    let k = key(&format!("{t}-{i}"));
                    let begun = store.begin(&k, &fp(1), LEASE).now_or_never().unwrap();
                    let Ok(Begin::Acquired(token)) = begun else {
                        panic!("a new key runs: {begun:?}");
                    };
                    assert!(store.entry_count() <= MAX);
                    // The record just begun is never dropped before it completes.
                    let done = store.complete(&k, token, response(), TTL).now_or_never();
                    done.unwrap().expect("an in-flight record is never evicted");
                }
            });
        }
    });
    assert_eq!(store.entry_count(), MAX);
    assert_eq!(store.evicted(), (THREADS * KEYS - MAX) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bound_holds_under_concurrent_inserts() {
    let store = MemoryStore::new().max_entries(100);
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.begin(&key(&i.to_string()), &fp(1), LEASE).await })
        })
        .collect();
    let mut acquired = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(Begin::Acquired(_)) => acquired += 1,
            Err(e) if e.kind() == StoreErrorKind::CapacityExceeded => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acquired, 100);
    assert_eq!(refused, 900);
    assert_eq!(store.entry_count(), 100);
}

#[tokio::test(start_paused = true)]
async fn dead_holders_make_room_before_live_records_are_dropped() {
    let store = MemoryStore::new().max_entries(2);
    acquire(&store, "dead", 1).await;
    store_completed(&store, "live", TTL).await;
    tokio::time::advance(LEASE).await;
    acquire(&store, "new", 1).await;
    assert_eq!(store.evicted(), 0, "the dead holder's record went first");
    assert!(store.lookup(&key("live")).await.unwrap().is_some());
    assert_eq!(store.entry_count(), 2);
}

/// A token says where its record is, and its key is still checked there: the token of one key
/// renews, completes and releases no other, and a token of the same value from another store
/// none either.
#[tokio::test(start_paused = true)]
async fn a_token_holds_its_own_key_only() {
    let store = MemoryStore::new();
    let other = MemoryStore::new();
    let a = acquire(&store, "a", 1).await;
    let b = acquire(&store, "b", 1).await;
    let theirs = acquire(&other, "a", 1).await;
    let lost = |result: Result<(), crate::StoreError>| {
        assert_eq!(result.unwrap_err().kind(), StoreErrorKind::LeaseLost);
    };
    lost(store.renew(&key("b"), a, LEASE).await);
    lost(store.complete(&key("b"), a, response(), TTL).await);
    lost(store.release(&key("b"), a).await);
    lost(store.complete(&key("a"), theirs, response(), TTL).await);
    lost(other.release(&key("a"), a).await);
    assert_eq!(store.entry_count(), 2);
    store.renew(&key("a"), a, LEASE).await.unwrap();
    store.complete(&key("a"), a, response(), TTL).await.unwrap();
    store.release(&key("b"), b).await.unwrap();
    other.release(&key("a"), theirs).await.unwrap();
    assert_eq!(store.entry_count(), 1);
}
