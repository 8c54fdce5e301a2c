//! The allocation budget of the flow: what a new key and a replay allocate beyond the bare
//! handler, store included, counted by a global allocator (so in a test binary of its own, on
//! one thread). A change that allocates more on these paths fails here; BENCHMARKS.md says
//! where the allocations go and what the target is.

mod support;

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use support::most_frequent;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// A new key: at most this many allocations more than the bare handler, store included: the
/// record, the two boxed parts of the flow, the one buffer that holds the stored response's
/// status, headers and body (the memory store takes it as it is: no reference count until a
/// replay shares it), the `IdempotencyKey` and `Outcome` extensions (three each here: the map,
/// its table and the value, as neither message has an extension yet), and the echoed key's
/// first clone (a header value built from a `&str` is copied when first cloned; hyper's share
/// their read buffer). The target is 4: see BENCHMARKS.md.
#[cfg(not(any(feature = "postgres", feature = "sqlx")))]
const NEW_KEY_BUDGET: usize = 11;
/// With a SQL store compiled in, every request that holds its key also carries its `Claim`
/// (two allocations), whatever the store.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
const NEW_KEY_BUDGET: usize = 13;
/// A replay: at most this many allocations more than the bare handler: the boxed flow, the
/// replay's header map and its `Outcome` extension (two). (The key is kept inline: a key of up
/// to 46 characters costs no allocation. A body over 1 KiB, larger than this one, costs one
/// more: the copy of the header section that the replay's header values share, so that a value
/// held after the replay does not keep the body.)
const REPLAY_BUDGET: usize = 4;
/// The first replay of a record: the reference count through which the store and its replays
/// share the stored buffer is made then, once per record (most records are never replayed).
const FIRST_REPLAY_BUDGET: usize = REPLAY_BUDGET + 1;
/// A replay of a request that carries extensions already (axum's router puts the matched path
/// and its parameters there before the layer): the request's map, emptied, carries the
/// `Outcome`, so the map and its table are not allocated again.
const REPLAY_WITH_EXTENSIONS_BUDGET: usize = REPLAY_BUDGET - 2;

/// Allocations and reallocations so far, in the whole process: this binary's one test runs on
/// one thread, and the harness's thread only waits for it.
fn allocations() -> usize {
    let stats = GLOBAL.stats();
    stats.allocations + stats.reallocations
}

/// The handler of a payments API: reads the body, answers `201` with `Location`, a JSON
/// content type and a small JSON body in a buffer of its own, as a serializer writes one (a
/// `String`, a `Vec`: a body the layer must take as it is, as sharing it would allocate).
async fn handler<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let json = String::from(r#"{"id":"pay_1","status":"succeeded"}"#);
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = StatusCode::CREATED;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/payments/1"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    std::hint::black_box(body);
    Ok(response)
}

/// An extension a router or an auth middleware put in the request before the layer.
#[derive(Clone)]
struct PathParams;

fn request_with_extension(key: &str) -> Request<Full<Bytes>> {
    let mut request = request(key);
    request.extensions_mut().insert(PathParams);
    request
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, "Bearer sk_test_allocations")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"amount":1000,"currency":"eur"}"#,
        )))
        .unwrap()
}

/// The allocations of one request through `svc`, its response body read.
async fn one<S, B>(svc: &mut S, request: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let before = allocations();
    let response = svc.ready().await.unwrap().call(request).await.unwrap();
    assert!(response.status().is_success());
    response.into_body().collect().await.unwrap();
    allocations() - before
}

#[test]
fn a_new_key_and_a_replay_stay_within_their_allocation_budgets() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        const ROUNDS: usize = 2_000;
        let mut bare = service_fn(handler::<Full<Bytes>>);
        let mut layered = IdempotencyLayer::new(MemoryStore::new())
            .layer(service_fn(handler::<RequestBody<Full<Bytes>>>));
        let keys: Vec<_> = (0..ROUNDS).map(|i| format!("key-{i:08}")).collect();
        // Warm up: the store's first call starts its pruning task, maps take their size.
        for key in &keys[..100] {
            one(&mut layered, request(key)).await;
            one(&mut bare, request(key)).await;
        }
        let mut counts = [(); 5].map(|_| Vec::new());
        for key in &keys[100..] {
            counts[0].push(one(&mut bare, request(key)).await);
            counts[1].push(one(&mut layered, request(key)).await);
        }
        for round in [2, 3] {
            for key in &keys[100..] {
                counts[round].push(one(&mut layered, request(key)).await);
            }
        }
        for key in &keys[100..] {
            let request = request_with_extension(key);
            counts[4].push(one(&mut layered, request).await);
        }
        let [bare, new_key, first_replay, replay, replay_with_extensions] =
            counts.map(|c| most_frequent(&c));
        eprintln!(
            "allocations: bare {bare}, new key {new_key}, replay {first_replay} then {replay}, \
             {replay_with_extensions} with the request's extensions"
        );
        assert!(
            new_key <= bare + NEW_KEY_BUDGET,
            "a new key allocates {} more than the bare handler (budget {NEW_KEY_BUDGET})",
            new_key - bare
        );
        assert!(
            first_replay <= bare + FIRST_REPLAY_BUDGET,
            "a first replay allocates {} more than the bare handler (budget {FIRST_REPLAY_BUDGET})",
            first_replay.saturating_sub(bare)
        );
        assert!(
            replay <= bare + REPLAY_BUDGET,
            "a replay allocates {} more than the bare handler (budget {REPLAY_BUDGET})",
            replay.saturating_sub(bare)
        );
        assert!(
            replay_with_extensions <= bare + REPLAY_WITH_EXTENSIONS_BUDGET,
            "a replay of a request with extensions allocates {} more than the bare handler \
             (budget {REPLAY_WITH_EXTENSIONS_BUDGET})",
            replay_with_extensions.saturating_sub(bare)
        );
    });
}
