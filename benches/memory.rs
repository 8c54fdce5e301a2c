//! Memory and allocations, counted by a counting global allocator; run with
//! `cargo bench --bench memory`.
//!
//! - Bytes per stored record: the heap the store keeps after N requests with new keys went
//!   through the layer (a `201` with `Location`, `Content-Type` and a small JSON body), divided
//!   by N, and what is left of it beyond the stored body and headers themselves.
//! - Allocations per request, by path, next to the same handler without the layer.
//!
//! Run by `cargo test --benches` (which passes `--test`), it only checks that it works, with
//! small counts.

use std::fmt::Debug;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, Stats, StatsAlloc};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, RecordKey, RequestBody,
    TenantId,
};

mod common;
use common::{body_of, handler, request, shared_value};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes still held after the region: allocated, less freed, plus grown in place.
fn net_bytes(stats: &Stats) -> isize {
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize + stats.bytes_reallocated
}

fn key(i: u64) -> HeaderValue {
    shared_value(&format!("8e03978e-40d5-43e8-bc93-{i:012x}"))
}

/// Sends `req` through `svc` and reads the response body; returns the status.
fn send<S, B>(svc: &mut S, req: Request<Full<Bytes>>) -> StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    let response = svc
        .ready()
        .now_or_never()
        .expect("ready at once")
        .unwrap()
        .call(req)
        .now_or_never()
        .expect("the handler and the memory store answer at once")
        .unwrap();
    let status = response.status();
    black_box(
        response
            .into_body()
            .collect()
            .now_or_never()
            .unwrap()
            .unwrap(),
    );
    status
}

fn layered(
    store: MemoryStore,
) -> impl Service<Request<Full<Bytes>>, Response = Response<impl Body<Error: Debug>>, Error: Debug>
{
    IdempotencyLayer::new(store)
        .shared_scope(true)
        .layer(service_fn(handler::<RequestBody<Full<Bytes>>>))
}

/// The heap the store holds per record after `n` requests with new keys.
fn bytes_per_record(rt: &Runtime, n: u64) -> (f64, usize) {
    let _runtime = rt.enter();
    let body = Bytes::from_static(br#"{"amount":1000,"currency":"eur"}"#);
    let store = MemoryStore::builder()
        .max_entries(usize::MAX)
        .max_entries_per_tenant(usize::MAX)
        .build();
    let mut svc = layered(store.clone());
    // The first request starts the store's pruning task: not a record's cost.
    assert_eq!(
        send(&mut svc, request(&key(u64::MAX), &body)),
        StatusCode::CREATED
    );
    let keys: Vec<_> = (0..n).map(key).collect();
    let region = Region::new(GLOBAL);
    for key in &keys {
        assert_eq!(send(&mut svc, request(key, &body)), StatusCode::CREATED);
    }
    let held = net_bytes(&region.change());
    drop(keys);

    // What a record stores of the response itself: body, header names and values.
    let record = RecordKey::new(TenantId::shared(), key(0).to_str().unwrap());
    let parts = request(&key(0), &body).into_parts().0;
    let fingerprint = Fingerprint::of_request(&parts, &body);
    let begun = store.begin(&record, &fingerprint, Duration::from_secs(60));
    let Some(Ok(Begin::Completed(stored))) = begun.now_or_never() else {
        panic!("the first key is completed");
    };
    let payload = stored.body().len()
        + stored
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum::<usize>();
    assert_eq!(store.entry_count() as u64, n + 1);
    (held as f64 / n as f64, payload)
}

/// Allocations and bytes allocated per request on `svc`.
fn per_request<S, B>(
    svc: &mut S,
    requests: Vec<Request<Full<Bytes>>>,
    expect: StatusCode,
) -> (f64, f64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    let n = requests.len() as f64;
    let region = Region::new(GLOBAL);
    for req in requests {
        assert_eq!(send(svc, req), expect);
    }
    let stats = region.change();
    (
        (stats.allocations + stats.reallocations) as f64 / n,
        stats.bytes_allocated as f64 / n,
    )
}

fn allocations(rt: &Runtime, n: u64, len: usize) -> Vec<(&'static str, (f64, f64))> {
    let _runtime = rt.enter();
    let body = body_of(len, 0);
    let same = |key: &HeaderValue, body: &Bytes| (0..n).map(|_| request(key, body)).collect();
    let mut rows = Vec::new();

    let mut bare = service_fn(handler::<Full<Bytes>>);
    rows.push((
        "bare",
        per_request(&mut bare, same(&key(0), &body), StatusCode::CREATED),
    ));

    let mut svc = layered(MemoryStore::new());
    assert_eq!(
        send(&mut svc, request(&key(u64::MAX), &body)),
        StatusCode::CREATED
    );
    let fresh = (0..n).map(|i| request(&key(i), &body)).collect();
    rows.push(("fresh", per_request(&mut svc, fresh, StatusCode::CREATED)));

    let replay = key(0);
    rows.push((
        "replay",
        per_request(&mut svc, same(&replay, &body), StatusCode::CREATED),
    ));

    let store = MemoryStore::new();
    let mut svc = layered(store.clone());
    let held = key(1);
    let record = RecordKey::new(TenantId::shared(), held.to_str().unwrap());
    let fingerprint = Fingerprint::of_request(&request(&held, &body).into_parts().0, &body);
    let begun = store.begin(&record, &fingerprint, Duration::from_secs(3600));
    assert!(matches!(begun.now_or_never(), Some(Ok(Begin::Acquired(_)))));
    let conflict = StatusCode::CONFLICT;
    rows.push((
        "in_flight",
        per_request(&mut svc, same(&held, &body), conflict),
    ));

    let other = body_of(len.max(1), 1);
    assert_eq!(
        send(&mut svc, request(&key(2), &other)),
        StatusCode::CREATED
    );
    let mismatch = StatusCode::UNPROCESSABLE_ENTITY;
    rows.push((
        "mismatch",
        per_request(&mut svc, same(&key(2), &body), mismatch),
    ));
    rows
}

fn main() {
    let smoke = std::env::args().any(|arg| arg == "--test");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!("Heap held by MemoryStore per record (small response, through the layer)");
    println!(
        "{:>10} {:>12} {:>22} {:>26}",
        "records", "bytes/record", "stored body+headers", "beyond body+headers"
    );
    let counts: &[u64] = if smoke {
        &[1_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    for &n in counts {
        let (per_record, payload) = bytes_per_record(&rt, n);
        println!(
            "{:>10} {:>12.0} {:>22} {:>26.0}",
            n,
            per_record,
            payload,
            per_record - payload as f64
        );
    }
    println!("Target: under 512 B beyond the stored body and headers.");

    let n = if smoke { 100 } else { 10_000 };
    for (len, name) in [(0, "0 B"), (1024, "1 KiB")] {
        println!("\nHeap allocations per request, {name} request body ({n} requests each)");
        println!(
            "{:<10} {:>12} {:>10} {:>16}",
            "path", "allocations", "vs bare", "bytes allocated"
        );
        let rows = allocations(&rt, n, len);
        let bare = rows[0].1.0;
        for (path, (allocs, bytes)) in rows {
            println!(
                "{:<10} {:>12.1} {:>+10.1} {:>16.0}",
                path,
                allocs,
                allocs - bare,
                bytes
            );
        }
    }
    println!("Allocations count reallocations too; the bare handler's are the baseline.");
}
