//! The memory canonical JSON takes, counted by a counting global allocator: a binary of its
//! own, with one test, so that nothing else allocates while it counts.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use support::{Runs, api, send};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const MIB: usize = 1024 * 1024;

/// `len` bytes of a JSON array of `item`s (the last one padded with spaces).
fn array_of(item: &str, len: usize) -> Bytes {
    let mut body = String::with_capacity(len);
    body.push('[');
    while body.len() + item.len() + 2 <= len {
        if body.len() > 1 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push(']');
    while body.len() < len {
        body.push(' ');
    }
    assert_eq!(body.len(), len);
    Bytes::from(body)
}

/// The heap bytes allocated (growth by reallocation included) while a keyed request with `body`
/// goes through the layer and the handler answers, and the response's status.
fn allocated_for(
    rt: &tokio::runtime::Runtime,
    app: &axum::Router,
    key: &str,
    body: Bytes,
) -> (usize, StatusCode) {
    let request = Request::post("/status/201")
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, "Bearer sk_test_memory")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    let region = Region::new(GLOBAL);
    let reply = rt.block_on(send(app, request));
    (region.change().bytes_allocated, reply.status)
}

#[test]
fn canonical_json_takes_a_small_multiple_of_the_body() {
    // One thread, so that nothing else allocates while the region counts.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = api(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()).ignore_json_pointers(["/0/a"]));
    // Warm up: the store's and the router's first allocations are not the body's.
    let (_, status) = allocated_for(&rt, &app, "warm-up", array_of("[0]", 1024));
    assert_eq!(status, StatusCode::CREATED);

    // 2 MiB of small arrays: no object, so nothing is kept at all; what is allocated is the
    // request's own bookkeeping.
    let arrays = array_of("[0]", 2 * MIB);
    let (bytes, status) = allocated_for(&rt, &app, "arrays", arrays.clone());
    assert_eq!(status, StatusCode::CREATED);
    assert!(
        bytes < 64 * 1024,
        "{bytes} bytes for 2 MiB of [[0],[0],...]"
    );

    // 2 MiB of the smallest objects of two members (14 bytes each): their sorted keys, 4
    // bytes a member and 12 an object, in vectors that grow by doubling: 2.5 times the body
    // at most, the worst case.
    let objects = array_of(r#"{"b":1,"a":0}"#, 2 * MIB);
    let (bytes, status) = allocated_for(&rt, &app, "objects", objects);
    assert_eq!(status, StatusCode::CREATED);
    assert!(
        bytes < 3 * 2 * MIB,
        "{bytes} bytes for 2 MiB of two-member objects"
    );

    // 2 MiB of brackets that never close: refused at depth 128, hashed as sent.
    let deep = Bytes::from(vec![b'['; 2 * MIB]);
    let (bytes, status) = allocated_for(&rt, &app, "deep", deep);
    assert_eq!(status, StatusCode::CREATED);
    assert!(bytes < 64 * 1024, "{bytes} bytes for 2 MiB of [[[[...");
    assert_eq!(runs.get(), 4);
}
