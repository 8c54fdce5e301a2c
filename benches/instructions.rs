//! The requests whose instructions `scripts/instructions` counts under valgrind's callgrind: a
//! count that does not move with the machine's load, unlike time, for A/B comparisons of the
//! layer's own work.
//!
//! `MODE` picks the route: `bare` (the handler alone), `fresh` (a new key per request, through
//! `IdempotencyLayer::new(MemoryStore::new())` in the shared scope) or `replay` (retries cycling
//! over 1,000 completed keys). `N` requests are timed after a warm-up of 1,000; the script runs
//! two values of `N` and divides the difference, so that set-up and warm-up cancel out. Without
//! `MODE`, every route runs once with a small `N` (what `cargo test --benches` checks).
//! `REPLAY_CACHE=1` puts the store behind a `ReplayCache` (a replay then costs no store call).

use std::convert::Infallible;
use std::fmt::Debug;
use std::hint::black_box;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, MemoryStore, ReplayCache, RequestBody,
};

/// The bench server's handler: reads the body, answers `201` with a small JSON body.
async fn handler<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body<Error: Debug>,
{
    black_box(request.into_body().collect().await.unwrap().to_bytes());
    let body = Bytes::from_static(br#"{"id":"pay_1","status":"created"}"#);
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::CREATED;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/payments/1"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// A 64-byte JSON payment, with `key` as its `Idempotency-Key`.
fn request(key: &HeaderValue) -> Request<Full<Bytes>> {
    let body = br#"{"amount":1000,"currency":"usd","customer":"cus_123","note":"x"}"#;
    let mut request = Request::post("/payments")
        .header(header::AUTHORIZATION, "Bearer x")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    request.headers_mut().insert("idempotency-key", key.clone());
    request
}

/// Sends one request per key and reads each response's body.
async fn drive<S, B>(svc: &mut S, keys: impl Iterator<Item = HeaderValue>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error: Debug>,
    B: Body<Error: Debug>,
{
    for key in keys {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(request(&key))
            .await
            .unwrap();
        black_box(response.into_body().collect().await.unwrap());
    }
}

/// Runs `n` requests of route `mode` after a warm-up of 1,000.
fn run(mode: &str, n: usize) {
    const WARM_UP: usize = 1_000;
    // Keys as a parsed request's are: slices of one buffer. Making them (and each request) is
    // counted too, the same for every route: the difference from `bare` is the layer's.
    let all: Bytes = (0..WARM_UP + n)
        .map(|i| format!("key-{i:08}"))
        .collect::<String>()
        .into();
    let keys: Vec<HeaderValue> = (0..WARM_UP + n)
        .map(|i| HeaderValue::from_maybe_shared(all.slice(i * 12..i * 12 + 12)).unwrap())
        .collect();
    let (warm_up, timed) = keys.split_at(WARM_UP);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("REPLAY_CACHE").is_ok_and(|on| on != "0") {
        let layer = IdempotencyLayer::new(ReplayCache::new(MemoryStore::new())).shared_scope(true);
        runtime.block_on(behind(mode, layer, warm_up, timed));
        return;
    }
    runtime.block_on(async {
        let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
        match mode {
            "bare" => {
                let mut svc = service_fn(handler::<Full<Bytes>>);
                drive(&mut svc, warm_up.iter().cloned()).await;
                drive(&mut svc, timed.iter().cloned()).await;
            }
            "fresh" => {
                let mut svc = layer.layer(service_fn(handler::<RequestBody<Full<Bytes>>>));
                drive(&mut svc, warm_up.iter().cloned()).await;
                drive(&mut svc, timed.iter().cloned()).await;
            }
            "replay" => {
                let mut svc = layer.layer(service_fn(handler::<RequestBody<Full<Bytes>>>));
                drive(&mut svc, warm_up.iter().cloned()).await;
                drive(&mut svc, warm_up.iter().cloned()).await;
                drive(&mut svc, warm_up.iter().cycle().take(n).cloned()).await;
            }
            other => panic!("MODE is bare, fresh or replay, not {other:?}"),
        }
    });
}

/// The layer's routes on another store (`bare` is the same handler alone).
async fn behind<St: IdempotencyStore>(
    mode: &str,
    layer: IdempotencyLayer<St>,
    warm_up: &[HeaderValue],
    timed: &[HeaderValue],
) {
    let mut svc = layer.layer(service_fn(handler::<RequestBody<Full<Bytes>>>));
    drive(&mut svc, warm_up.iter().cloned()).await;
    match mode {
        "bare" => {
            let mut svc = service_fn(handler::<Full<Bytes>>);
            drive(&mut svc, warm_up.iter().cloned()).await;
            drive(&mut svc, timed.iter().cloned()).await;
        }
        "fresh" => drive(&mut svc, timed.iter().cloned()).await,
        "replay" => {
            drive(&mut svc, warm_up.iter().cloned()).await;
            let retries = warm_up.iter().cycle().take(timed.len());
            drive(&mut svc, retries.cloned()).await;
        }
        other => panic!("MODE is bare, fresh or replay, not {other:?}"),
    }
}

fn main() {
    match std::env::var("MODE") {
        Ok(mode) => {
            let n = std::env::var("N").map_or(10_000, |n| n.parse().expect("N is a count"));
            run(&mode, n);
        }
        Err(_) => ["bare", "fresh", "replay"]
            .into_iter()
            .for_each(|mode| run(mode, 100)),
    }
}
