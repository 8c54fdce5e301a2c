//! In-process cost of the layer, run with `cargo bench --bench layer`.
//!
//! One handler (reads the body, answers `201` with `Location` and a small JSON body) behind
//! three stacks, driven through `tower::ServiceExt` on a current-thread Tokio runtime:
//!
//! - `layer/*`: the handler as a `tower::service_fn`, bare (`bare`), a service that answers at
//!   once without reading the body (`noop`, the bench's own cost), and behind
//!   `IdempotencyLayer` on a `MemoryStore`: a new key per request (`fresh`), a retry of a
//!   completed request (`replay`), a duplicate while the first holds the key (`in_flight`, 409),
//!   and the key reused with another body (`mismatch`, 422). Beside them, the floor the layer
//!   cannot beat: SHA-256 of the body alone (`sha256`), and SHA-256 plus two operations on a
//!   concurrent map keyed like the store, an insert and an update (`floor`); and the store's
//!   own `begin` + `complete` of a new key (`store`).
//! - `axum/*`: the same handler as an axum route, bare, behind this layer, and behind
//!   `axum-idempotent` (header-key mode) with the session and cookie layers it needs
//!   (`sessions` is those two layers alone).
//!
//! - `json/*`: a retry of a completed request whose body is a 1 KiB pretty-printed JSON
//!   payment, fingerprinted as sent (`raw`), in canonical form (`canonical`), and in canonical
//!   form with two pointers left out (`pointers`): the differences are what canonical JSON
//!   costs per request.
//!
//! Every `layer` and `axum` workload runs with request bodies of 0 B, 1 KiB, 64 KiB and 1 MiB. Times are the CPU
//! time of the benchmarking thread, which runs everything measured, so that other processes on
//! a shared machine do not inflate them (`BENCH_CLOCK=wall` for wall-clock time). Requests are
//! made (not timed) in small batches just before they are sent, so that the layer reads headers
//! that are in the cache, as a server's freshly parsed request is. In `layer/fresh` and `layer/floor`
//! new keys are completed with a zero TTL and pruned after each sample, so the store keeps its
//! size; in `axum/*_fresh` both layers start each sample with an empty store. After the
//! measurements the bench prints the overheads as ratios to the baselines of the same run.

use std::convert::Infallible;
use std::fmt::Debug;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::post;
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use dashmap::DashMap;
use futures_util::FutureExt;
use http::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use ruts::store::Ttl;
use ruts::store::moka::MokaStore;
use ruts::{CookieOptions, Session, SessionLayer};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_cookies::CookieManagerLayer;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, RecordKey, RequestBody,
    StoredResponse, TenantId,
};

mod common;
use common::{
    Report, SIZES, Stopwatch, body_of, cell, clock_name, created, handler, request, shared_value,
    time,
};

const LEASE: Duration = Duration::from_secs(3600);
const TTL: Duration = Duration::from_secs(24 * 3600);

/// A key shaped like a UUID, unique for `i`.
fn key(i: u64) -> HeaderValue {
    shared_value(&format!("8e03978e-40d5-43e8-bc93-{i:012x}"))
}

/// Bytes per second for a body, requests per second without one.
fn throughput(len: usize) -> Throughput {
    match len {
        0 => Throughput::Elements(1),
        len => Throughput::Bytes(len as u64),
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Answers a `201` like the handler's without reading the request: the bench's own cost.
async fn answer(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    drop(req);
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"id":1,"status":"succeeded"}"#,
    )));
    *response.status_mut() = StatusCode::CREATED;
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("/payments/1"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Requests are made in batches of this many before they are sent (not timed): few enough
/// that they are still in the cache when they are sent, as a request a server just parsed is,
/// and enough that reading the clock twice a batch costs little.
const BATCH: u64 = 64;

/// Sends `iters` requests made by `make` through `svc` and reads every response body, as a
/// client would; returns the time the sending took.
async fn drive<S, Req, B>(
    svc: &mut S,
    iters: u64,
    mut make: impl FnMut(u64) -> Request<Req>,
) -> Duration
where
    S: Service<Request<Req>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    let mut elapsed = Duration::ZERO;
    let mut batch = Vec::with_capacity(BATCH as usize);
    for first in (0..iters).step_by(BATCH as usize) {
        batch.extend((first..iters.min(first + BATCH)).map(&mut make));
        let start = Stopwatch::start();
        for req in batch.drain(..) {
            let response = svc.ready().await.unwrap().call(req).await.unwrap();
            black_box(response.into_body().collect().await.unwrap());
        }
        elapsed += start.elapsed();
    }
    elapsed
}

/// Sends one request and returns its status and whether it was a replay.
async fn send_one<S, Req, B>(svc: &mut S, req: Request<Req>) -> (StatusCode, bool)
where
    S: Service<Request<Req>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    let response = svc.ready().await.unwrap().call(req).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed")
        || response.headers().contains_key("idempotency-replayed");
    black_box(response.into_body().collect().await.unwrap());
    (status, replayed)
}

fn layered(
    store: MemoryStore,
    ttl: Duration,
) -> impl Service<Request<Full<Bytes>>, Response = Response<impl Body<Error: Debug>>, Error = Infallible>
+ Clone {
    IdempotencyLayer::new(store)
        .shared_scope(true)
        .ttl(ttl)
        .layer(service_fn(handler::<RequestBody<Full<Bytes>>>))
}

fn layer_benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("layer");
    // The same number of requests in every sample: the store reaches its size in the first
    // sample and keeps it, instead of growing with every longer sample.
    group.sampling_mode(SamplingMode::Flat);
    for (len, name) in SIZES {
        let body = body_of(len, 0);
        group.throughput(throughput(len));

        let bare = service_fn(handler::<Full<Bytes>>);
        group.bench_function(BenchmarkId::new("bare", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, key, body) = (bare, key(0), body.clone());
                async move { drive(&mut svc, iters, |_| request(&key, &body)).await }
            });
        });

        // What answering costs the bench itself: a service that neither reads the body nor
        // runs a handler, and answers a response like the stored one. A replay's own cost is
        // the difference.
        let noop = service_fn(answer);
        group.bench_function(BenchmarkId::new("noop", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, key, body) = (noop, key(0), body.clone());
                async move { drive(&mut svc, iters, |_| request(&key, &body)).await }
            });
        });

        // New keys are completed with a zero TTL and pruned after each sample (not timed): the
        // store stays at its size, as a server's does once records expire as fast as they come.
        let store = MemoryStore::new();
        let svc = layered(store.clone(), Duration::ZERO);
        group.bench_function(BenchmarkId::new("fresh", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, store, body) = (svc.clone(), store.clone(), body.clone());
                async move {
                    let elapsed = drive(&mut svc, iters, |i| request(&key(i), &body)).await;
                    store.prune();
                    elapsed
                }
            });
        });

        let mut svc = layered(MemoryStore::new(), TTL);
        let replay_key = shared_value("replay-key");
        let first = rt.block_on(send_one(&mut svc, request(&replay_key, &body)));
        assert_eq!(first, (StatusCode::CREATED, false));
        let again = rt.block_on(send_one(&mut svc, request(&replay_key, &body)));
        assert_eq!(again, (StatusCode::CREATED, true));
        group.bench_function(BenchmarkId::new("replay", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, key, body) = (svc.clone(), replay_key.clone(), body.clone());
                async move { drive(&mut svc, iters, |_| request(&key, &body)).await }
            });
        });

        // The first request holds the key (begun on the store the layer shares).
        let store = MemoryStore::new();
        let mut svc = layered(store.clone(), TTL);
        let held_key = shared_value("in-flight-key");
        let parts = request(&held_key, &body).into_parts().0;
        let record = RecordKey::new(TenantId::shared(), "in-flight-key");
        let fingerprint = Fingerprint::of_request(&parts, &body);
        let begun = rt
            .block_on(store.begin(&record, &fingerprint, LEASE))
            .unwrap();
        assert!(matches!(begun, Begin::Acquired(_)));
        let first = rt.block_on(send_one(&mut svc, request(&held_key, &body)));
        assert_eq!(first, (StatusCode::CONFLICT, false));
        group.bench_function(BenchmarkId::new("in_flight", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, key, body) = (svc.clone(), held_key.clone(), body.clone());
                async move { drive(&mut svc, iters, |_| request(&key, &body)).await }
            });
        });

        // The key completed with another body (one byte long when the measured body is empty).
        let mut svc = layered(MemoryStore::new(), TTL);
        let used_key = shared_value("mismatch-key");
        let other = body_of(len.max(1), 1);
        let first = rt.block_on(send_one(&mut svc, request(&used_key, &other)));
        assert_eq!(first, (StatusCode::CREATED, false));
        let reuse = rt.block_on(send_one(&mut svc, request(&used_key, &body)));
        assert_eq!(reuse, (StatusCode::UNPROCESSABLE_ENTITY, false));
        group.bench_function(BenchmarkId::new("mismatch", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, key, body) = (svc.clone(), used_key.clone(), body.clone());
                async move { drive(&mut svc, iters, |_| request(&key, &body)).await }
            });
        });

        group.bench_function(BenchmarkId::new("sha256", name), |b| {
            b.iter(|| Sha256::digest(black_box(&body[..])));
        });

        let stored = StoredResponse::new(StatusCode::CREATED, Default::default(), created().2);
        // The floor of a fresh key: hash the body, then two operations on a concurrent map
        // keyed like the store (insert the key, then set its response).
        let map: DashMap<RecordKey, (Fingerprint, Option<StoredResponse>)> = DashMap::new();
        group.bench_function(BenchmarkId::new("floor", name), |b| {
            b.iter_custom(|iters| {
                let keys: Vec<_> = (0..iters)
                    .map(|i| RecordKey::new(TenantId::shared(), key(i).to_str().unwrap()))
                    .collect();
                let mut elapsed = Duration::ZERO;
                for batch in keys.chunks(BATCH as usize) {
                    let start = Stopwatch::start();
                    for record in batch {
                        let hash = Sha256::digest(black_box(&body[..]));
                        let fingerprint = Fingerprint::from_bytes(hash.into());
                        map.insert(record.clone(), (fingerprint, None));
                        map.get_mut(record).unwrap().1 = Some(stored.clone());
                    }
                    elapsed += start.elapsed();
                }
                map.clear();
                elapsed
            });
        });

        // The store's share of it: `begin` and `complete` of a new key on the MemoryStore.
        let store = MemoryStore::new();
        group.bench_function(BenchmarkId::new("store", name), |b| {
            b.iter_custom(|iters| {
                let _runtime = rt.enter();
                let keys: Vec<_> = (0..iters)
                    .map(|i| RecordKey::new(TenantId::shared(), key(i).to_str().unwrap()))
                    .collect();
                let fingerprint = Fingerprint::from_bytes([7; 32]);
                let mut elapsed = Duration::ZERO;
                for batch in keys.chunks(BATCH as usize) {
                    let start = Stopwatch::start();
                    for record in batch {
                        let begun = store.begin(record, &fingerprint, LEASE).now_or_never();
                        let Some(Ok(Begin::Acquired(token))) = begun else {
                            panic!("a fresh key is acquired")
                        };
                        let done = store.complete(record, token, stored.clone(), Duration::ZERO);
                        done.now_or_never().unwrap().unwrap();
                    }
                    elapsed += start.elapsed();
                }
                store.prune();
                elapsed
            });
        });
    }
    group.finish();
}

/// A payment as a client sends it, pretty-printed, about 1 KiB.
fn json_payment() -> Bytes {
    let item = |i: u32| {
        format!(
            r#"    {{
      "sku": "sku-{i:04}",
      "description": "Line {i} of the order, as the client describes it",
      "quantity": {i},
      "unit_price": 12.5,
      "metadata": {{ "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "attempt": 1 }}
    }}"#
        )
    };
    let items: Vec<String> = (1..=4).map(item).collect();
    let body = format!(
        r#"{{
  "timestamp": "2026-12-06T10:00:00Z",
  "customer": "cus_8e03978e40d5",
  "currency": "EUR",
  "amount": 10000,
  "items": [
{}
  ]
}}"#,
        items.join(",\n")
    );
    Bytes::from(body)
}

fn json_benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("json");
    let body = json_payment();
    group.throughput(throughput(body.len()));
    let layers = [
        ("raw", IdempotencyLayer::new(MemoryStore::new())),
        (
            "canonical",
            IdempotencyLayer::new(MemoryStore::new()).canonical_json(true),
        ),
        (
            "pointers",
            IdempotencyLayer::new(MemoryStore::new())
                .ignore_json_pointers(["/timestamp", "/items/0/metadata/trace_id"]),
        ),
    ];
    for (name, layer) in layers {
        let mut svc = layer.layer(service_fn(handler::<RequestBody<Full<Bytes>>>));
        let replay_key = shared_value("json-replay-key");
        let first = rt.block_on(send_one(&mut svc, request(&replay_key, &body)));
        assert_eq!(first, (StatusCode::CREATED, false));
        let again = rt.block_on(send_one(&mut svc, request(&replay_key, &body)));
        assert_eq!(again, (StatusCode::CREATED, true));
        group.bench_function(BenchmarkId::new(name, "1KiB"), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut svc, key, body) = (svc.clone(), replay_key.clone(), body.clone());
                async move { drive(&mut svc, iters, |_| request(&key, &body)).await }
            });
        });
    }
    group.finish();
}

/// The handler as an axum route.
async fn create_payment(body: Bytes) -> impl IntoResponse {
    black_box(&body);
    let (status, location, body) = created();
    (
        status,
        [
            (LOCATION, location),
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        ],
        body,
    )
}

fn axum_app() -> Router {
    Router::new().route("/payments", post(create_payment))
}

fn axum_request(
    key: &HeaderValue,
    body: &Bytes,
    cookie: Option<&HeaderValue>,
) -> Request<axum::body::Body> {
    let mut req = request(key, body).map(axum::body::Body::new);
    if let Some(cookie) = cookie {
        req.headers_mut().insert(COOKIE, cookie.clone());
    }
    req
}

/// The stack `axum-idempotent` needs: its layer inside a session layer inside a cookie layer,
/// and a route that opens a session. Returns the app and the session's cookie.
async fn axum_idempotent_app(idempotent: bool) -> (Router, HeaderValue) {
    let store = Arc::new(MokaStore::builder().build());
    let mut app = axum_app().route(
        "/session",
        post(|session: Session<MokaStore>| async move {
            let ttl = Ttl::new(24 * 3600).unwrap();
            session.set("user", &1_u64, ttl, None).await.unwrap();
            "session opened"
        }),
    );
    if idempotent {
        let options = IdempotentOptions::default()
            .use_idempotency_key_header(Some("idempotency-key"), false)
            .expire_after(24 * 3600);
        app = app.layer(IdempotentLayer::<MokaStore>::new(options));
    }
    let cookies = CookieOptions::build()
        .name("session")
        .max_age(24 * 3600)
        .path("/");
    let mut app = app
        .layer(SessionLayer::new(store).with_cookie_options(cookies))
        .layer(CookieManagerLayer::new());
    let open = Request::post("/session")
        .body(axum::body::Body::empty())
        .unwrap();
    let ready = ServiceExt::<Request<axum::body::Body>>::ready(&mut app).await;
    let response = ready.unwrap().call(open).await.unwrap();
    let set_cookie = response.headers()[SET_COOKIE].to_str().unwrap();
    let cookie = set_cookie.split(';').next().unwrap();
    (app, HeaderValue::from_str(cookie).unwrap())
}

fn axum_benches(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("axum");
    for (len, name) in SIZES {
        let body = body_of(len, 0);
        group.throughput(throughput(len));

        let app = axum_app();
        group.bench_function(BenchmarkId::new("bare", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut app, key, body) = (app.clone(), key(0), body.clone());
                async move { drive(&mut app, iters, |_| axum_request(&key, &body, None)).await }
            });
        });

        group.bench_function(BenchmarkId::new("ours_fresh", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let body = body.clone();
                async move {
                    let mut app = axum_app()
                        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
                    let warm_up = axum_request(&shared_value("warm-up"), &body, None);
                    assert_eq!(
                        send_one(&mut app, warm_up).await,
                        (StatusCode::CREATED, false)
                    );
                    drive(&mut app, iters, |i| axum_request(&key(i), &body, None)).await
                }
            });
        });

        let mut app =
            axum_app().layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
        let replay_key = shared_value("replay-key");
        for replayed in [false, true] {
            let req = axum_request(&replay_key, &body, None);
            let sent = rt.block_on(send_one(&mut app, req));
            assert_eq!(sent, (StatusCode::CREATED, replayed));
        }
        group.bench_function(BenchmarkId::new("ours_replay", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut app, key, body) = (app.clone(), replay_key.clone(), body.clone());
                async move { drive(&mut app, iters, |_| axum_request(&key, &body, None)).await }
            });
        });

        let (app, cookie) = rt.block_on(axum_idempotent_app(false));
        group.bench_function(BenchmarkId::new("sessions", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut app, key, body, cookie) =
                    (app.clone(), key(0), body.clone(), cookie.clone());
                async move {
                    drive(&mut app, iters, |_| {
                        axum_request(&key, &body, Some(&cookie))
                    })
                    .await
                }
            });
        });

        group.bench_function(BenchmarkId::new("ai_fresh", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let body = body.clone();
                async move {
                    let (mut app, cookie) = axum_idempotent_app(true).await;
                    drive(&mut app, iters, |i| {
                        axum_request(&key(i), &body, Some(&cookie))
                    })
                    .await
                }
            });
        });

        let (mut app, cookie) = rt.block_on(axum_idempotent_app(true));
        for replayed in [false, true] {
            let req = axum_request(&replay_key, &body, Some(&cookie));
            let sent = rt.block_on(send_one(&mut app, req));
            assert_eq!(sent, (StatusCode::CREATED, replayed));
        }
        group.bench_function(BenchmarkId::new("ai_replay", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (mut app, key, body, cookie) = (
                    app.clone(),
                    replay_key.clone(),
                    body.clone(),
                    cookie.clone(),
                );
                async move {
                    drive(&mut app, iters, |_| {
                        axum_request(&key, &body, Some(&cookie))
                    })
                    .await
                }
            });
        });
    }
    group.finish();
}

fn print_report(report: &Report) {
    let median = |group: &str, function: &str, size: &str| report.median_ns(group, function, size);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| format!("{:.2}×", a / b));
    let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);

    println!(
        "\nIdempotencyLayer over a tower::service_fn handler (medians of this run, {})",
        clock_name()
    );
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "body",
        "bare",
        "fresh",
        "Δ fresh",
        "floor",
        "Δ/floor",
        "replay",
        "Δ replay",
        "409",
        "422",
        "sha256",
        "store"
    );
    for (_, size) in SIZES {
        let m = |f: &str| median("layer", f, size);
        let bare = m("bare");
        let fresh_delta = delta(m("fresh"), bare);
        println!(
            "{:<6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            size,
            cell(bare.map(time)),
            cell(m("fresh").map(time)),
            cell(fresh_delta.map(time)),
            cell(m("floor").map(time)),
            cell(ratio(fresh_delta, m("floor"))),
            cell(m("replay").map(time)),
            cell(delta(m("replay"), m("noop")).map(time)),
            cell(m("in_flight").map(time)),
            cell(m("mismatch").map(time)),
            cell(m("sha256").map(time)),
            cell(m("store").map(time)),
        );
    }
    println!("Δ fresh = fresh − bare: the layer's own cost when the handler runs.");
    println!("floor = SHA-256 of the body + a DashMap insert and get_mut. Target: Δ/floor ≤ 2.");
    println!("store = MemoryStore begin + complete of a new key (its share of Δ fresh).");
    println!("replay, 409 and 422 never run the handler. Δ replay = replay − noop, a service that");
    println!("answers at once without reading the body: the replay's own cost. Target: ≤ 1 µs.");

    let m = |f: &str| median("json", f, "1KiB");
    println!(
        "\nA replay of a 1 KiB JSON body, by fingerprint (medians of this run, {}): raw {}, \
         canonical {} (Δ {}), pointers {} (Δ {})",
        clock_name(),
        cell(m("raw").map(time)),
        cell(m("canonical").map(time)),
        cell(delta(m("canonical"), m("raw")).map(time)),
        cell(m("pointers").map(time)),
        cell(delta(m("pointers"), m("raw")).map(time)),
    );
    println!("Δ = what canonicalising the body costs. Target: a few µs.");

    println!(
        "\nThe same route in axum: this layer vs axum-idempotent (medians of this run, {})",
        clock_name()
    );
    println!(
        "{:<6} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "body", "bare", "ours fresh", "ai fresh", "ours replay", "ai replay", "sessions", "ai/ours"
    );
    for (_, size) in SIZES {
        let m = |f: &str| median("axum", f, size);
        let bare = m("bare");
        println!(
            "{:<6} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            size,
            cell(bare.map(time)),
            cell(ratio(m("ours_fresh"), bare)),
            cell(ratio(m("ai_fresh"), bare)),
            cell(ratio(m("ours_replay"), bare)),
            cell(ratio(m("ai_replay"), bare)),
            cell(ratio(m("sessions"), bare)),
            cell(ratio(m("ai_fresh"), m("ours_fresh"))),
        );
    }
    println!("Ratios to the bare route's time. ai = axum-idempotent (header-key mode), which");
    println!("needs the session and cookie layers (`sessions` is their cost alone); ai/ours");
    println!("compares fresh keys. axum-idempotent has no 409 (concurrent duplicates both run)");
    println!("and no 422 (a reused key replays whatever the body), so those are not compared.");
}

fn main() {
    let report = Report::start();
    let mut c = common::criterion();
    let rt = runtime();
    layer_benches(&mut c, &rt);
    json_benches(&mut c, &rt);
    axum_benches(&mut c, &rt);
    c.final_summary();
    print_report(&report);
}
