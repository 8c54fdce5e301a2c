//! The in-memory store alone, run with `cargo bench --bench store`.
//!
//! - `store/begin_complete/{1,2,4}`: that many threads each `begin` a key of their own and
//!   `complete` it (what a fresh key costs the store), on a store of 10,000 live records;
//! - `store/hot_key/{1,2,4}`: that many threads `begin` one completed key (what every replay
//!   of a popular key costs: a shared read);
//! - `store/live_records/*`, `store/replay_at/*`: one thread, `begin` + `complete` of a fresh
//!   key, and `begin` of a completed key picked at random, on stores holding 1, 10,000 and
//!   1,000,000 live records: the cost must stay flat.
//!
//! - `store/evicting/{100k,1M}`: one thread, `begin` + `complete` of a fresh key (24 h TTL) on
//!   a store full of completed records (its `max_entries` reached, expiries spread over the
//!   TTL), so that every new key drops the record nearest its expiry: a full store's steady
//!   state.
//!
//! Times are per operation; with several threads, the wall time of all threads' operations
//! divided by their count, so `thrpt` is the store's total throughput; on one thread, the
//! thread's CPU time (`BENCH_CLOCK=wall` for wall-clock time), with keys made in small batches
//! just before they are used. The store's futures are
//! ready at once, so they are polled once (`now_or_never`), inside a Tokio runtime context.
//!
//! The keys a measurement adds are completed with a zero TTL and pruned after each sample
//! (not timed), so a store keeps its size from sample to sample.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use futures_util::FutureExt;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::runtime::Runtime;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyStore, LockToken, MemoryStore, RecordKey, StoredResponse,
    TenantId,
};

mod common;
use common::{Report, Stopwatch, cell, clock_name, time};

const LEASE: Duration = Duration::from_secs(3600);
const TTL: Duration = Duration::from_secs(24 * 3600);
const THREADS: [usize; 3] = [1, 2, 4];
const LIVE: [(usize, &str); 3] = [(1, "1"), (10_000, "10k"), (1_000_000, "1M")];

/// A record key shaped like a UUID; `space` keeps the key sets of different uses apart.
fn key(space: u32, i: u64) -> RecordKey {
    RecordKey::new(
        TenantId::shared(),
        format!("{space:08x}-40d5-43e8-bc93-{i:012x}"),
    )
}

fn fingerprint(i: u64) -> Fingerprint {
    let mut bytes = [0x5a; 32];
    bytes[..8].copy_from_slice(&i.to_le_bytes());
    Fingerprint::from_bytes(bytes)
}

/// A small stored response, as a payments handler gives.
fn response(i: u64) -> StoredResponse {
    let mut headers = HeaderMap::new();
    let location = HeaderValue::try_from(format!("/payments/{i}")).unwrap();
    headers.insert(LOCATION, location);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = Bytes::from(format!(r#"{{"id":{i},"status":"succeeded"}}"#));
    StoredResponse::new(StatusCode::CREATED, headers, body)
}

fn begin(store: &MemoryStore, key: &RecordKey, fingerprint: &Fingerprint) -> Begin {
    let begun = store.begin(key, fingerprint, LEASE).now_or_never();
    begun.expect("ready at once").expect("begun")
}

/// `begin` + `complete` of a key that is not in the store.
fn begin_complete(store: &MemoryStore, key: &RecordKey, response: &StoredResponse, ttl: Duration) {
    let Begin::Acquired(token) = begin(store, key, &fingerprint(0)) else {
        panic!("a new key is acquired");
    };
    complete(store, key, token, response, ttl);
}

fn complete(
    store: &MemoryStore,
    key: &RecordKey,
    token: LockToken,
    response: &StoredResponse,
    ttl: Duration,
) {
    let done = store.complete(key, token, response.clone(), ttl);
    done.now_or_never()
        .expect("ready at once")
        .expect("completed");
}

/// Keys are made in batches of this many (not timed) just before they are used, as a server
/// uses a key it just parsed.
const BATCH: u64 = 64;

/// Runs `op` on `iters` keys made by `make`, in batches; returns the time `op` took, on the
/// clock of [`Stopwatch`].
fn batched(
    iters: u64,
    mut make: impl FnMut(u64) -> RecordKey,
    op: impl Fn(&RecordKey),
) -> Duration {
    let mut elapsed = Duration::ZERO;
    let mut batch = Vec::with_capacity(BATCH as usize);
    for first in (0..iters).step_by(BATCH as usize) {
        batch.extend((first..iters.min(first + BATCH)).map(&mut make));
        let start = Stopwatch::start();
        batch.iter().for_each(&op);
        elapsed += start.elapsed();
        batch.clear();
    }
    elapsed
}

/// A store holding `live` completed records (keys `key(0, 0..live)`), bounded well above it
/// so that the measurements are never refused.
fn filled(rt: &Runtime, live: usize) -> MemoryStore {
    let _runtime = rt.enter();
    // One tenant holds every key: its bound is the store's.
    let store = MemoryStore::builder()
        .max_entries(live + 4_000_000)
        .max_entries_per_tenant(live + 4_000_000)
        .build();
    for i in 0..live as u64 {
        begin_complete(&store, &key(0, i), &response(i), TTL);
    }
    store
}

/// Runs `op(thread, i)` for `i` in a share of `0..iters` on each of `threads` threads, started
/// together; returns the wall time.
fn on_threads(
    rt: &Runtime,
    threads: usize,
    iters: u64,
    op: impl Fn(usize, u64) + Sync,
) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let per_thread = iters.div_ceil(threads as u64);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                scope.spawn(move || {
                    let _runtime = rt.enter();
                    barrier.wait();
                    for i in 0..per_thread {
                        op(t, i);
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for worker in workers {
            worker.join().unwrap();
        }
        start.elapsed()
    })
}

fn thread_benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("store");
    // The same number of operations in every sample: a store reaches its size in the first
    // sample and keeps it, instead of growing with every longer sample.
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    let store = filled(rt, 10_000);
    let stored = response(1);
    let mut sample = 1_u32;
    for threads in THREADS {
        group.bench_function(BenchmarkId::new("begin_complete", threads), |b| {
            b.iter_custom(|iters| {
                sample += 1;
                let keys: Vec<Vec<RecordKey>> = (0..threads)
                    .map(|t| {
                        let space = sample * 8 + t as u32;
                        (0..iters.div_ceil(threads as u64))
                            .map(|i| key(space, i))
                            .collect()
                    })
                    .collect();
                let elapsed = on_threads(rt, threads, iters, |t, i| {
                    begin_complete(&store, &keys[t][i as usize], &stored, Duration::ZERO);
                });
                store.prune();
                elapsed
            });
        });
    }

    let hot = key(0, 7);
    for threads in THREADS {
        group.bench_function(BenchmarkId::new("hot_key", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(rt, threads, iters, |_, _| {
                    let begun = begin(&store, &hot, &fingerprint(0));
                    assert!(matches!(black_box(begun), Begin::Completed(_)));
                })
            });
        });
    }
    group.finish();
}

fn live_benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("store");
    // The same number of operations in every sample: a store reaches its size in the first
    // sample and keeps it, instead of growing with every longer sample.
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    let stored = response(1);
    let mut sample = 1_u32;
    for (live, name) in LIVE {
        let store = filled(rt, live);
        group.bench_function(BenchmarkId::new("live_records", name), |b| {
            b.iter_custom(|iters| {
                let _runtime = rt.enter();
                sample += 1;
                let elapsed = batched(
                    iters,
                    |i| key(sample, i),
                    |key| {
                        begin_complete(&store, key, &stored, Duration::ZERO);
                    },
                );
                store.prune();
                elapsed
            });
        });

        group.bench_function(BenchmarkId::new("replay_at", name), |b| {
            b.iter_custom(|iters| {
                let _runtime = rt.enter();
                // Completed keys in a scattered order, so that a large store is read from memory,
                // not from a warm cache.
                let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ iters;
                let scattered = |_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    key(0, x % live as u64)
                };
                batched(iters, scattered, |key| {
                    let begun = begin(&store, key, &fingerprint(0));
                    assert!(matches!(black_box(begun), Begin::Completed(_)));
                })
            });
        });
        drop(store);
    }
    group.finish();
}

/// A store bounded to `max` records and full of completed ones, expiring over the day.
fn full(rt: &Runtime, max: usize) -> MemoryStore {
    let _runtime = rt.enter();
    // One tenant holds every key: its bound is the store's.
    let store = MemoryStore::builder()
        .max_entries(max)
        .max_entries_per_tenant(max)
        .build();
    for i in 0..max as u64 {
        let ttl = TTL.mul_f64((i + 1) as f64 / max as f64);
        begin_complete(&store, &key(0, i), &response(i), ttl);
    }
    store
}

fn evicting_benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("store");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    let stored = response(1);
    let mut sample = 1_u32;
    for (max, name) in [(100_000, "100k"), (1_000_000, "1M")] {
        let store = full(rt, max);
        group.bench_function(BenchmarkId::new("evicting", name), |b| {
            b.iter_custom(|iters| {
                let _runtime = rt.enter();
                sample += 1;
                batched(
                    iters,
                    |i| key(sample, i),
                    |key| begin_complete(&store, key, &stored, TTL),
                )
            });
        });
        assert!(store.evicted() > 0, "the store made room");
        drop(store);
    }
    group.finish();
}

fn print_report(report: &Report) {
    let median = |function: &str, param: &str| report.median_ns("store", function, param);
    println!("\nMemoryStore alone (medians of this run, per operation; threads: wall-clock time)");
    println!(
        "{:<8} {:>18} {:>10} {:>18} {:>10}",
        "threads", "begin+complete", "ops/s", "hot key begin", "ops/s"
    );
    let rate = |ns: f64| format!("{:.2} M", 1e3 / ns);
    for threads in THREADS {
        let t = threads.to_string();
        let (fresh, hot) = (median("begin_complete", &t), median("hot_key", &t));
        println!(
            "{:<8} {:>18} {:>10} {:>18} {:>10}",
            threads,
            cell(fresh.map(time)),
            cell(fresh.map(rate)),
            cell(hot.map(time)),
            cell(hot.map(rate)),
        );
    }
    println!("\nOne thread, by live records ({})", clock_name());
    println!(
        "{:<14} {:>18} {:>10} {:>18} {:>10}",
        "live records", "begin+complete", "vs 1", "replay begin", "vs 1"
    );
    let (fresh_1, replay_1) = (median("live_records", "1"), median("replay_at", "1"));
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| format!("{:.2}×", a / b));
    for (_, name) in LIVE {
        let (fresh, replay) = (median("live_records", name), median("replay_at", name));
        println!(
            "{:<14} {:>18} {:>10} {:>18} {:>10}",
            name,
            cell(fresh.map(time)),
            cell(ratio(fresh, fresh_1)),
            cell(replay.map(time)),
            cell(ratio(replay, replay_1)),
        );
    }
    println!("Target: flat from 1 to 1M live records.");
    println!(
        "\nOne thread, a full store: every new key drops a record ({})",
        clock_name()
    );
    for name in ["100k", "1M"] {
        let evicting = median("evicting", name);
        let ratio = ratio(evicting, median("live_records", "1"));
        println!(
            "{:<14} {:>18} {:>10}",
            name,
            cell(evicting.map(time)),
            cell(ratio)
        );
    }
}

fn main() {
    let report = Report::start();
    let mut c = common::criterion();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    thread_benches(&mut c, &rt);
    live_benches(&mut c, &rt);
    evicting_benches(&mut c, &rt);
    c.final_summary();
    print_report(&report);
}
