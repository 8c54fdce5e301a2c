//! The bound on one tenant's records: examples, a model of every path that adds or removes a
//! record, and real threads.

use std::collections::HashMap;

use futures_util::FutureExt;
use proptest::prelude::*;

use super::*;
use crate::StoreErrorKind;
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::{Begin, Forget, IdempotencyStore, LockToken};
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

#[tokio::test(start_paused = true)]
async fn a_tenant_at_its_bound_drops_its_own_record_nearest_expiry() {
    let store = MemoryStore::builder()
        .max_entries(10)
        .max_entries_per_tenant(3)
        .build();
    completed(&store, 2, "victim", TTL / 10).await; // the nearest expiry of the store
    completed(&store, 1, "far", TTL).await;
    completed(&store, 1, "near", TTL / 2).await;
    completed(&store, 1, "middle", TTL - Duration::from_secs(1)).await;
    assert_eq!(store.tenant_entry_count(&tenant(1)), 3);

    acquire(&store, 1, "new").await;
    assert_eq!(store.evicted(), 1, "counted as evicted");
    assert_eq!(store.tenant_entry_count(&tenant(1)), 3);
    assert_eq!(store.lookup(&key(1, "near")).await.unwrap(), None);
    assert!(store.lookup(&key(1, "far")).await.unwrap().is_some());
    let victim = store.begin(&key(2, "victim"), &fp(1), LEASE).await.unwrap();
    assert!(
        matches!(victim, Begin::Completed(_)),
        "another tenant's record, though nearer its expiry, is kept"
    );
    // An expired record of the tenant goes first, and is not an eviction.
    tokio::time::advance(TTL - Duration::from_millis(500)).await;
    acquire(&store, 1, "newer").await;
    assert_eq!(store.evicted(), 1, "the expired one was pruned");
    assert_eq!(store.lookup(&key(1, "middle")).await.unwrap(), None);
    assert!(store.lookup(&key(1, "far")).await.unwrap().is_some());
    check_counts(&store);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_whose_records_are_all_in_flight_is_refused_and_the_others_are_not() {
    let store = MemoryStore::builder()
        .max_entries(10)
        .max_entries_per_tenant(2)
        .build();
    let held = [acquire(&store, 1, "a").await, acquire(&store, 1, "b").await];
    let err = store.begin(&key(1, "c"), &fp(1), LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::CapacityExceeded);
    assert!(err.to_string().contains("max_entries_per_tenant"), "{err}");
    assert_eq!(store.tenant_entry_count(&tenant(1)), 2);
    // Other tenants, the shared scope among them, still begin.
    acquire(&store, 2, "c").await;
    let shared = RecordKey::new(TenantId::shared(), "c");
    assert!(matches!(
        store.begin(&shared, &fp(1), LEASE).await.unwrap(),
        Begin::Acquired(_)
    ));
    assert_eq!(store.evicted(), 0);
    // Once one of its records completes, the tenant makes room from it.
    store
        .complete(&key(1, "a"), held[0], response(), TTL)
        .await
        .unwrap();
    acquire(&store, 1, "c").await;
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.lookup(&key(1, "a")).await.unwrap(), None);
    // A holder of the tenant that died frees its place without an eviction.
    tokio::time::advance(LEASE).await;
    acquire(&store, 1, "d").await;
    assert_eq!(store.evicted(), 1);
    let _ = held[1];
    check_counts(&store);
}

#[tokio::test(start_paused = true)]
async fn the_shared_scope_is_a_tenant_like_any_other() {
    let store = MemoryStore::builder()
        .max_entries(10)
        .max_entries_per_tenant(2)
        .build();
    completed(&store, 1, "other", TTL / 2).await;
    for k in ["a", "b", "c", "d"] {
        let shared = RecordKey::new(TenantId::shared(), k);
        let Begin::Acquired(token) = store.begin(&shared, &fp(1), LEASE).await.unwrap() else {
            panic!("{k} runs");
        };
        store
            .complete(&shared, token, response(), TTL)
            .await
            .unwrap();
    }
    assert_eq!(store.tenant_entry_count(&TenantId::shared()), 2);
    assert_eq!(store.evicted(), 2);
    assert!(store.lookup(&key(1, "other")).await.unwrap().is_some());
    check_counts(&store);
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
    // Tenant 3 is under its bound; the store is full: the nearest expiry of all goes.
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
    // The default: an eighth, at least 10,000 or max_entries.
    let default = |n| {
        MemoryStore::new()
            .max_entries(n)
            .settings()
            .max_entries_per_tenant()
    };
    assert_eq!(default(3), 3);
    assert_eq!(default(50_000), 10_000);
    assert_eq!(default(800_000), 100_000);
}

/// Real threads, tenants flooding at once: every count stays exact, each tenant stays within
/// its bound, and a victim tenant's records are never dropped.
#[test]
fn counts_stay_exact_under_concurrent_floods() {
    const THREADS: u8 = 4;
    const KEYS: usize = 5_000;
    let store = MemoryStore::builder()
        .max_entries(2_000)
        .max_entries_per_tenant(300)
        .build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = runtime.enter();
    for k in 0..100 {
        let k = key(100, &k.to_string());
        let Ok(Begin::Acquired(token)) = store.begin(&k, &fp(1), LEASE).now_or_never().unwrap()
        else {
            panic!("the victim's key runs");
        };
        let done = store.complete(&k, token, response(), TTL).now_or_never();
        done.unwrap().unwrap();
    }
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = &store;
            scope.spawn(move || {
                // Two tenants per thread, sharing them with the next thread.
                for i in 0..KEYS {
                    let tenant = (t + (i % 2) as u8) % THREADS;
                    let k = key(tenant, &format!("{t}-{i}"));
                    let begun = store.begin(&k, &fp(1), LEASE).now_or_never().unwrap();
                    let token = match begun {
                        Ok(Begin::Acquired(token)) => token,
                        Err(e) if e.kind() == StoreErrorKind::CapacityExceeded => continue,
                        other => panic!("{other:?}"),
                    };
                    let end = if i % 7 == 0 {
                        store.release(&k, token).now_or_never()
                    } else {
                        store.complete(&k, token, response(), TTL).now_or_never()
                    };
                    end.unwrap().expect("an in-flight record is never dropped");
                    if i % 13 == 0 {
                        let forgotten = store.forget(&k, true).now_or_never().unwrap();
                        let _ = forgotten.unwrap();
                    }
                }
            });
        }
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
    for t in 0..THREADS {
        assert!(store.tenant_entry_count(&tenant(t)) <= 300);
    }
    for shard in store.inner.shards() {
        let shard = read(shard);
        assert!(
            shard.tenants_queued() <= 2 * shard.len() + 16 * 5,
            "stale entries are dropped"
        );
    }
}

// The model: every path that adds or removes a record, on a store of 6 records with 3 per
// tenant, checked after each step against a reference and against the shard's own recount.

#[derive(Debug, Clone)]
enum Op {
    Begin { t: u8, k: u8, f: u8 },
    Complete { t: u8, k: u8, long: bool },
    Release { t: u8, k: u8 },
    Forget { t: u8, k: u8, force: bool },
    Advance(u64),
    Prune,
}

fn op() -> impl Strategy<Value = Op> {
    let slot = (0..3u8, 0..4u8);
    prop_oneof![
        6 => (slot.clone(), 0..2u8).prop_map(|((t, k), f)| Op::Begin { t, k, f }),
        4 => (slot.clone(), any::<bool>()).prop_map(|((t, k), long)| Op::Complete { t, k, long }),
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
}

#[derive(Default)]
struct Model {
    records: HashMap<(u8, u8), Rec>,
    /// The token and acquisition of each slot's last `Acquired`.
    held: HashMap<(u8, u8), (LockToken, u64)>,
    seq: u64,
    now: u64,
    evicted: u64,
}

const MAX: usize = 6;
const PER_TENANT: usize = 3;

impl Model {
    fn live(&self, r: &Rec) -> bool {
        r.deadline > self.now
    }

    fn tenant_len(&self, t: u8) -> usize {
        self.records.keys().filter(|(rt, _)| *rt == t).count()
    }

    fn remove_dead_in_flight(&mut self) {
        let now = self.now;
        self.records.retain(|_, r| r.completed || r.deadline > now);
    }

    /// Drops the completed record nearest expiry among those `of` selects.
    fn drop_nearest(&mut self, of: impl Fn(u8) -> bool) -> bool {
        let nearest = self
            .records
            .iter()
            .filter(|((t, _), r)| r.completed && of(*t))
            .min_by_key(|(_, r)| (r.deadline, r.seq))
            .map(|(slot, r)| (*slot, *r));
        let Some((slot, rec)) = nearest else {
            return false;
        };
        self.records.remove(&slot);
        if self.live(&rec) {
            self.evicted += 1;
        }
        true
    }

    /// `Ok(Some(seq))`: acquired; `Ok(None)`: an answer from a live record; `Err(())`: full.
    fn begin(&mut self, t: u8, k: u8, f: u8) -> Result<Option<u64>, ()> {
        if let Some(r) = self.records.get(&(t, k)) {
            if self.live(r) {
                return Ok(None);
            }
            let seq = self.take_seq();
            self.records.insert((t, k), self.in_flight(f, seq));
            return Ok(Some(seq));
        }
        if self.tenant_len(t) >= PER_TENANT {
            self.remove_dead_in_flight();
            while self.tenant_len(t) >= PER_TENANT {
                if !self.drop_nearest(|rt| rt == t) {
                    return Err(());
                }
            }
        }
        if self.records.len() >= MAX {
            self.remove_dead_in_flight();
            while self.records.len() >= MAX {
                if !self.drop_nearest(|_| true) {
                    return Err(());
                }
            }
        }
        let seq = self.take_seq();
        self.records.insert((t, k), self.in_flight(f, seq));
        Ok(Some(seq))
    }

    fn take_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn in_flight(&self, fp: u8, seq: u64) -> Rec {
        Rec {
            fp,
            seq,
            deadline: self.now + LEASE.as_secs(),
            completed: false,
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
            Op::Complete { t, k, long } => {
                let ttl = if long { 40 } else { 20 };
                let holds = model.holds((t, k));
                let Some(&(token, _)) = model.held.get(&(t, k)) else {
                    continue;
                };
                let got = store
                    .complete(
                        &key(t, &k.to_string()),
                        token,
                        response(),
                        Duration::from_secs(ttl),
                    )
                    .await;
                assert_eq!(got.is_ok(), holds, "step {i}: complete");
                if holds {
                    let r = model.records.get_mut(&(t, k)).unwrap();
                    r.completed = true;
                    r.deadline = model.now + ttl;
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
        for t in 0..3 {
            let n = store.tenant_entry_count(&tenant(t));
            assert_eq!(n, model.tenant_len(t), "step {i}: tenant {t}'s count");
        }
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
