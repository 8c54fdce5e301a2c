//! What is stored: refusals that say the operation did not run are not, outcomes are, and a
//! handler decides per response. And where the layer goes in a middleware stack: the orders
//! that change what is stored (a timeout outside and inside, compression outside, a panic
//! caught outside). Through real axum `Router`s, counting handler runs.

#[macro_use]
mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Extension, Json, Router};
use http_body_util::BodyExt;
use support::{Fault, FaultyStore, Op, Runs, Transport, Via, send};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_idempotency::{CacheDecision, IdempotencyLayer, MemoryStore, Outcome, RequestBody};

fn post_json(
    uri: &str,
    key: &str,
    content_type: Option<&str>,
    body: &'static str,
) -> Request<Body> {
    let mut builder = Request::post(uri).header("idempotency-key", key);
    if let Some(content_type) = content_type {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    builder.body(Body::from(body)).unwrap()
}

/// `POST /orders` takes JSON with axum's `Json` extractor: `415` without `Content-Type`, `422`
/// for JSON that does not fit, `201` otherwise.
fn orders(runs: &Runs) -> Router {
    #[derive(serde::Deserialize)]
    struct Order {
        amount: u64,
    }
    async fn create(State(runs): State<Runs>, Json(order): Json<Order>) -> impl IntoResponse {
        let n = runs.bump();
        (
            StatusCode::CREATED,
            format!("order {n} of {}", order.amount),
        )
    }
    Router::new()
        .route("/orders", post(create))
        .with_state(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true))
}

#[tokio::test]
async fn a_415_is_not_stored_and_the_corrected_retry_runs() {
    let runs = Runs::default();
    let app = orders(&runs);
    let refused = send(
        &app,
        post_json("/orders", "trap-1", None, r#"{"amount":5}"#),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(refused.outcome, Some(Outcome::Released));
    assert_eq!(refused.header("idempotency-key"), Some("trap-1"));
    let json = Some("application/json");
    let corrected = send(
        &app,
        post_json("/orders", "trap-1", json, r#"{"amount":5}"#),
    )
    .await;
    assert_eq!(corrected.status, StatusCode::CREATED);
    assert!(!corrected.replayed(), "the corrected retry runs");
    assert_eq!(&corrected.body[..], b"order 1 of 5");
    let retry = send(
        &app,
        post_json("/orders", "trap-1", json, r#"{"amount":5}"#),
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(runs.get(), 1, "the handler ran once in all");
}

#[tokio::test]
async fn a_422_from_the_json_extractor_is_not_stored() {
    let runs = Runs::default();
    let app = orders(&runs);
    let json = Some("application/json");
    let invalid = send(&app, post_json("/orders", "k", json, r#"{"amount":"x"}"#)).await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(invalid.outcome, Some(Outcome::Released));
    // The same request again fails again, harmlessly: nothing happened.
    let again = send(&app, post_json("/orders", "k", json, r#"{"amount":"x"}"#)).await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!again.replayed());
    assert_eq!(runs.get(), 0);
}

/// `POST /decide/{what}`: `skip` answers a 201 marked not to be stored, `store` a 422 marked to
/// be stored.
fn decisions(runs: &Runs) -> Router {
    async fn skip(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        (
            StatusCode::CREATED,
            Extension(CacheDecision::Skip),
            format!("secret {n}"),
        )
    }
    async fn store(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        let declined = format!("declined {n}");
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Extension(CacheDecision::Store),
            declined,
        )
    }
    Router::new()
        .route("/decide/skip", post(skip))
        .route("/decide/store", post(store))
        .with_state(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true))
}

#[tokio::test]
async fn a_handler_that_marks_a_201_skip_runs_again_on_retry() {
    let runs = Runs::default();
    let app = decisions(&runs);
    let first = send(&app, post_json("/decide/skip", "k", None, "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(Outcome::Released));
    let retry = send(&app, post_json("/decide/skip", "k", None, "")).await;
    assert!(!retry.replayed());
    assert_eq!(&retry.body[..], b"secret 2");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_handler_that_marks_a_422_store_is_replayed() {
    let runs = Runs::default();
    let app = decisions(&runs);
    let first = send(&app, post_json("/decide/store", "k", None, "")).await;
    assert_eq!(first.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(first.outcome, Some(Outcome::Executed));
    let retry = send(&app, post_json("/decide/store", "k", None, "")).await;
    assert_eq!(retry.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"declined 1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_handlers_decision_wins_over_the_policy() {
    let runs = Runs::default();
    async fn skip(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        (
            StatusCode::OK,
            Extension(CacheDecision::Skip),
            format!("run {n}"),
        )
    }
    // A policy that stores everything still lets the handler skip.
    let app = Router::new()
        .route("/", post(skip))
        .with_state(runs.clone())
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .shared_scope(true)
                .cache_policy(|_| true),
        );
    send(&app, post_json("/", "k", None, "")).await;
    let retry = send(&app, post_json("/", "k", None, "")).await;
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

/// `POST /work`: charges (counted), works for 300 ms, then 201.
fn work(runs: &Runs) -> Router {
    async fn work(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        tokio::time::sleep(Duration::from_millis(300)).await;
        (StatusCode::CREATED, format!("work {n}"))
    }
    Router::new()
        .route("/work", post(work))
        .with_state(runs.clone())
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_the_layer_looks_like_a_client_that_left() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
    let detached = layer.detached_runs();
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_millis(100));
    let app = work(&runs).layer(ServiceBuilder::new().layer(timeout).layer(layer));
    let first = send(&app, post_json("/work", "k", None, "")).await;
    assert_eq!(
        first.status,
        StatusCode::REQUEST_TIMEOUT,
        "the client hears of the timeout"
    );
    assert_eq!(detached.count(), 1, "and the run goes on");
    assert!(detached.wait_timeout(Duration::from_secs(1)).await);
    let retry = send(&app, post_json("/work", "k", None, "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(
        retry.replayed(),
        "the run that timed out for its client finished"
    );
    assert_eq!(&retry.body[..], b"work 1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_the_layer_cancels_the_handler_and_releases() {
    let runs = Runs::default();
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_millis(100));
    let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
    let app = work(&runs).layer(ServiceBuilder::new().layer(layer).layer(timeout));
    let first = send(&app, post_json("/work", "k", None, "")).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        first.outcome,
        Some(Outcome::Released),
        "a 408 releases the key"
    );
    let retry = send(&app, post_json("/work", "k", None, "")).await;
    assert_eq!(retry.status, StatusCode::REQUEST_TIMEOUT);
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2, "the handler was cut half-way, and ran again");
}

#[tokio::test]
async fn compression_outside_stores_identity_and_encodes_each_replay() {
    let runs = Runs::default();
    async fn report(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        let body = format!("{{\"report\":{n},\"rows\":\"{}\"}}", "abc".repeat(500));
        (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
    }
    let app = Router::new()
        .route("/reports", post(report))
        .with_state(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true))
        .layer(CompressionLayer::new());
    let request = |encoding: Option<&str>| {
        let mut builder = Request::post("/reports").header("idempotency-key", "k");
        if let Some(encoding) = encoding {
            builder = builder.header(header::ACCEPT_ENCODING, encoding);
        }
        builder.body(Body::empty()).unwrap()
    };
    let gzip = app.clone().oneshot(request(Some("gzip"))).await.unwrap();
    assert_eq!(gzip.headers()[header::CONTENT_ENCODING], "gzip");
    let gzip_body = gzip.into_body().collect().await.unwrap().to_bytes();

    let identity = send(&app, request(None)).await;
    assert!(identity.replayed());
    assert_eq!(
        identity.header("content-encoding"),
        None,
        "stored as identity"
    );
    assert!(identity.body.starts_with(b"{\"report\":1,"));

    let replayed_gzip = app.clone().oneshot(request(Some("gzip"))).await.unwrap();
    assert_eq!(replayed_gzip.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed_gzip.headers()[header::CONTENT_ENCODING], "gzip");
    let replayed_body = replayed_gzip
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(replayed_body, gzip_body, "the same bytes, encoded again");
    assert_eq!(runs.get(), 1);
}

/// A handler that panics has its key released before the panic reaches the layer above: the
/// retry that follows its `500` at once runs the handler, through `oneshot` and through a real
/// server whose worker threads run the retry while the first request's task unwinds.
async fn a_panic_caught_outside_the_layer_releases_the_key(transport: Transport) {
    let runs = Runs::default();
    async fn flaky(State(runs): State<Runs>, body: String) -> impl IntoResponse {
        let n = runs.bump();
        if body == "panic" {
            panic!("run {n} fails");
        }
        (StatusCode::CREATED, format!("run {n}"))
    }
    let app = Router::new()
        .route("/flaky", post(flaky))
        .with_state(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true))
        .layer(CatchPanicLayer::new());
    let via = Via::new(app, transport).await;
    for attempt in 1..=20 {
        let key = format!("k{attempt}");
        let first = via.send(post_json("/flaky", &key, None, "panic")).await;
        assert_eq!(
            first.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the panic became a 500"
        );
        // Released before the panic reached the layer above: the retry that follows at once
        // (with the body the handler takes) runs.
        let retry = via.send(post_json("/flaky", &key, None, "panic")).await;
        assert_eq!(
            retry.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "released: the retry ran the handler again (attempt {attempt})"
        );
    }
    assert_eq!(runs.get(), 40, "each of the 40 requests ran the handler");
    let key = "k-last";
    let first = via.send(post_json("/flaky", key, None, "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = via.send(post_json("/flaky", key, None, "")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(runs.get(), 41);
}

/// A service whose `call` panics, before it makes its future: released before the panic goes
/// on, as for a panic in the future.
#[tokio::test]
async fn a_service_whose_call_panics_releases_the_key() {
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |_: Request<RequestBody<Body>>| {
            let n = runs.bump();
            if n == 1 {
                panic!("run {n} fails in `call`");
            }
            async move {
                let response = (StatusCode::CREATED, format!("run {n}")).into_response();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
    let app = Router::new()
        .route_service("/flaky", layer.layer(handler))
        .layer(CatchPanicLayer::new());
    let first = send(&app, post_json("/flaky", "k", None, "")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&app, post_json("/flaky", "k", None, "")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "released: the retry ran");
    assert_eq!(&retry.body[..], b"run 2");
    assert_eq!(runs.get(), 2);
}

/// A panic whose release takes the store a while: the `500` comes once the key is released,
/// so the retry that follows it at once still runs.
#[tokio::test(start_paused = true)]
async fn a_panic_whose_release_is_slow_is_released_before_its_500() {
    async fn flaky(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        if n == 1 {
            panic!("run {n} fails");
        }
        (StatusCode::CREATED, format!("run {n}"))
    }
    let (runs, store) = (Runs::default(), FaultyStore::default());
    store.always(Op::Release, Fault::Delay(Duration::from_millis(100)));
    let app = Router::new()
        .route("/flaky", post(flaky))
        .with_state(runs.clone())
        .layer(IdempotencyLayer::new(store).shared_scope(true))
        .layer(CatchPanicLayer::new());
    let first = send(&app, post_json("/flaky", "k", None, "")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&app, post_json("/flaky", "k", None, "")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "released: the retry ran");
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_caught_outside_the_layer_releases_the_key_oneshot() {
    a_panic_caught_outside_the_layer_releases_the_key(Transport::Oneshot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_caught_outside_the_layer_releases_the_key_on_loopback() {
    a_panic_caught_outside_the_layer_releases_the_key(Transport::Loopback).await;
}

/// A response marked `CacheDecision::Skip` is passed on as it comes: a streamed body reaches
/// its client chunk by chunk while the handler's stream is still open (nothing buffers it), and
/// its key is released, so a retry runs again; through a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_response_streams_to_its_client_unbuffered() {
    let runs = Runs::default();
    let (gate, opened) = tokio::sync::watch::channel(false);
    let stream = post({
        let runs = runs.clone();
        move || {
            let (runs, opened) = (runs.clone(), opened.clone());
            async move {
                runs.bump();
                let first = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"data: 1\n\n"))
                });
                let rest = futures_util::stream::once(async move {
                    let mut opened = opened;
                    opened.wait_for(|open| *open).await.unwrap();
                    Ok(bytes::Bytes::from_static(b"data: 2\n\n"))
                });
                let body = Body::from_stream(futures_util::StreamExt::chain(first, rest));
                (StatusCode::OK, Extension(CacheDecision::Skip), body)
            }
        }
    });
    let app = Router::new().route("/events", stream).layer(
        tower_idempotency::IdempotencyLayer::new(tower_idempotency::MemoryStore::new())
            .shared_scope(true),
    );
    let server = support::serve(app).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let request = || {
        Request::post(format!("http://{}/events", server.addr))
            .header("idempotency-key", "events")
            .body(Body::empty())
            .unwrap()
    };
    // The head and the first chunk come while the handler's stream is still open.
    let (status, first, body) = tokio::time::timeout(Duration::from_secs(10), async {
        let response = client.request(request()).await.unwrap();
        let status = response.status();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        (status, first, body)
    })
    .await
    .expect("the first chunk arrives while the stream is still open");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first.into_data().unwrap(), "data: 1\n\n");
    gate.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: 2\n\n");
    let retry = client.request(request()).await.unwrap();
    assert!(retry.headers().get("idempotent-replayed").is_none());
    retry.into_body().collect().await.unwrap();
    assert_eq!(runs.get(), 2, "not stored: the retry runs again");
}
