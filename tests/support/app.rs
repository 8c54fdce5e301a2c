//! The behaviour tests' API: a payments route and routes that answer any status, sleep, panic,
//! or answer large or binary bodies, each counting its runs.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;

use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

use super::{Runs, send};

/// A test API. Every route counts its runs in `runs`.
///
/// - `POST /payments`: 201 with `Location`, two `Set-Cookie`, `X-Custom`, `Date` and a JSON body
///   naming the run number and echoing the request body;
/// - `POST|PATCH|PUT /status/{code}`: answers `code`;
/// - `POST /slow/{ms}`: sleeps `ms` milliseconds (Tokio time), then 201;
/// - `POST /slow-body/{ms}`: answers 201 at once, with a body that arrives `ms` milliseconds
///   later (Tokio time);
/// - `POST /panic`: panics;
/// - `POST /body-panics`: answers 201 at once, with a body that panics on the first run and
///   arrives on the others;
/// - `POST /big/{n}`: answers `n` bytes;
/// - `POST /binary`: answers every byte value;
/// - `GET /payments`: 200.
pub fn api(runs: Runs) -> Router {
    Router::new()
        .route(
            "/payments",
            post(create).get(list).patch(create).put(create),
        )
        .route("/status/{code}", post(status).patch(status).put(status))
        .route("/slow/{ms}", post(slow))
        .route("/slow-body/{ms}", post(slow_body))
        .route("/panic", post(panics))
        .route("/body-panics", post(body_panics))
        .route("/big/{n}", post(big))
        .route("/binary", post(binary))
        .with_state(runs)
}

async fn create(State(runs): State<Runs>, body: Bytes) -> Response {
    let n = runs.bump();
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, format!("/payments/{n}").parse().unwrap());
    headers.append(header::SET_COOKIE, "session=abc; Path=/".parse().unwrap());
    headers.append(header::SET_COOKIE, format!("run={n}").parse().unwrap());
    headers.insert("x-custom", "custom-value".parse().unwrap());
    headers.insert(
        header::DATE,
        "Mon, 23 Nov 2026 10:00:00 GMT".parse().unwrap(),
    );
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    let body = format!(
        r#"{{"id":{n},"request":{}}}"#,
        serde_json::to_string(&String::from_utf8_lossy(&body)).unwrap()
    );
    (StatusCode::CREATED, headers, body).into_response()
}

async fn list(State(runs): State<Runs>) -> &'static str {
    runs.bump();
    "[]"
}

async fn status(State(runs): State<Runs>, Path(code): Path<u16>) -> Response {
    let n = runs.bump();
    (
        StatusCode::from_u16(code).unwrap(),
        format!("status {code} run {n}"),
    )
        .into_response()
}

async fn slow(State(runs): State<Runs>, Path(ms): Path<u64>) -> Response {
    let n = runs.bump();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    (StatusCode::CREATED, format!("slow run {n}")).into_response()
}

async fn slow_body(State(runs): State<Runs>, Path(ms): Path<u64>) -> Response {
    let n = runs.bump();
    let body = futures_util::stream::once(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, std::io::Error>(Bytes::from(format!("slow body of run {n}")))
    });
    (StatusCode::CREATED, Body::from_stream(body)).into_response()
}

async fn body_panics(State(runs): State<Runs>) -> Response {
    let n = runs.bump();
    let body = futures_util::stream::once(async move {
        assert!(n > 1, "the body of the first run panics on purpose");
        Ok::<_, std::io::Error>(Bytes::from(format!("body of run {n}")))
    });
    (StatusCode::CREATED, Body::from_stream(body)).into_response()
}

async fn panics(State(runs): State<Runs>) -> Response {
    runs.bump();
    panic!("handler panicked on purpose");
}

async fn big(State(runs): State<Runs>, Path(n): Path<usize>) -> Response {
    runs.bump();
    (StatusCode::OK, vec![b'x'; n]).into_response()
}

async fn binary(State(runs): State<Runs>) -> Response {
    runs.bump();
    let bytes: Vec<u8> = (0..=255u8).collect();
    (StatusCode::OK, bytes).into_response()
}

/// A POST with a key and a body.
pub fn post_with_key(uri: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(uri)
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

/// How long [`shared_api`] keeps its records.
pub const TTL: Duration = Duration::from_secs(60);

/// [`api`] behind a layer over `store` in the shared scope, its records kept for [`TTL`].
pub fn shared_api<St: IdempotencyStore + Clone>(runs: &Runs, store: &St) -> Router {
    api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .ttl(TTL),
    )
}

/// Sends a keyed `POST /payments` of `{}` and asserts `201`; `true` when it ran, `false` when
/// it was a replay.
pub async fn created(app: &Router, key: &str) -> bool {
    let reply = send(app, post_with_key("/payments", key, "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{key}");
    !reply.replayed()
}
