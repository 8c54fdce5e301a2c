//! Idempotency keys for [tower] services: a retried request runs once, and every retry gets the
//! same response back.
//!
//! ```
//! use axum::extract::Request;
//! use axum::middleware::{self, Next};
//! use axum::response::{IntoResponse, Response};
//! use axum::{Router, http::StatusCode, routing::post};
//! use tower::ServiceExt;
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, TenantFromExtension};
//!
//! /// The account your authentication verified: keys are scoped by it.
//! #[derive(Clone)]
//! struct AccountId(u64);
//!
//! impl std::fmt::Display for AccountId {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         write!(f, "{}", self.0)
//!     }
//! }
//!
//! async fn authenticate(mut request: Request, next: Next) -> Response {
//!     // A real app verifies a token or a session here.
//!     match request.headers().get("authorization").map(|v| v.as_bytes()) {
//!         Some(b"Bearer token-of-42") => {
//!             request.extensions_mut().insert(AccountId(42));
//!             next.run(request).await
//!         }
//!         _ => StatusCode::UNAUTHORIZED.into_response(),
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/payments", post(|| async { (StatusCode::CREATED, "payment 1") }))
//!     .layer(IdempotencyLayer::new(MemoryStore::new()).tenant(TenantFromExtension::<AccountId>::new()))
//!     .layer(middleware::from_fn(authenticate));
//!
//! let request = || {
//!     http::Request::post("/payments")
//!         .header("authorization", "Bearer token-of-42")
//!         .header("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
//!         .body(axum::body::Body::from(r#"{"amount":100}"#))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//!
//! let retry = app.oneshot(request()).await.unwrap();
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # }
//! ```
//!
//! [`TenantFromExtension`] scopes keys by the type's name and the value's `Display`. With static
//! API keys, `IdempotencyLayer::new(MemoryStore::new())` alone is enough: the default tenant is
//! the `Authorization` header (a keyed request without one is refused with `400`, unless
//! [`shared_scope(true)`](IdempotencyLayer::shared_scope)). Set
//! [`tenant_secret`](IdempotencyLayer::tenant_secret) in production. The key is optional by
//! default, so that adding the layer breaks no client that sends none; on a payments route,
//! [`require_key(true)`](IdempotencyLayer::require_key) makes every request retry-safe.
//!
//! # Where the layer goes in a stack
//!
//! The order of layers changes what is stored. With `tower::ServiceBuilder`, the first layer
//! listed is the outermost:
//!
//! ```
//! # use std::time::Duration;
//! # use axum::{Router, http::StatusCode, middleware, routing::post};
//! # use axum::{extract::Request, middleware::Next, response::Response};
//! # use tower_idempotency::{IdempotencyLayer, MemoryStore, TenantFromExtension};
//! use tower::ServiceBuilder;
//! use tower_http::{catch_panic::CatchPanicLayer, compression::CompressionLayer, timeout::TimeoutLayer};
//! # #[derive(Clone)] struct AccountId(u64);
//! # impl std::fmt::Display for AccountId {
//! #     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { self.0.fmt(f) }
//! # }
//! # async fn authenticate(request: Request, next: Next) -> Response { next.run(request).await }
//!
//! let app: Router = Router::new().route("/payments", post(|| async { "created" })).layer(
//!     ServiceBuilder::new()
//!         .layer(CatchPanicLayer::new()) // outside: the layer sees the panic and releases the key
//!         .layer(CompressionLayer::new()) // outside: stored responses are identity-encoded
//!         // outside: a timeout looks like a client that left; the run finishes and is stored
//!         .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(10)))
//!         .layer(middleware::from_fn(authenticate)) // outside: a 401 never reaches the layer
//!         .layer(IdempotencyLayer::new(MemoryStore::new()).tenant(TenantFromExtension::<AccountId>::new())),
//! );
//! ```
//!
//! A `TimeoutLayer` *inside* the idempotency layer would cancel the handler half-way and answer
//! `408`, which releases the key: the retry would run the handler again. Use
//! `Router::route_layer` rather than `Router::layer` to add it, so that requests to routes that do
//! not exist store nothing.
//!
//! # How it works
//!
//! A client sends `Idempotency-Key: <key>` on a POST or PATCH. The layer fingerprints the request
//! (SHA-256 over method, path, query and body) and asks the store, in one atomic step, what the
//! key's record says:
//!
//! | record for (tenant, key)                 | what happens                                                  |
//! |------------------------------------------|---------------------------------------------------------------|
//! | absent, or expired                       | an in-flight record is created; the handler runs              |
//! | in flight, same fingerprint              | `409 idempotency_key_in_progress` with `Retry-After`          |
//! | in flight, same fingerprint, [`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight) | waits for the first: its replay, or `409` at the deadline |
//! | in flight, its lease expired (holder died) | taken over with a new lock token; the handler runs          |
//! | completed, same fingerprint              | the stored response, with `Idempotent-Replayed: true`         |
//! | any live record, different fingerprint   | `422 idempotency_key_reuse`                                   |
//! | completed, response too large to store   | `409 idempotency_response_not_stored`; the handler never reruns |
//!
//! The handler's response then decides the record's fate ([`default_cache_policy`]): 2xx, 3xx
//! and the 4xx that are outcomes of the operation (`402`, `404`, `409`, `410`, ...) are stored
//! for the TTL (24 hours by default, counted from completion); 5xx, 408, 429 and the refusals
//! that say the operation did not run (`400`, `401`, `403`, `413`, `415`, `422`, ...) release
//! the key so that a (corrected) retry runs. A handler decides for one response with
//! [`CacheDecision`]. A handler whose client goes away (hyper drops the request's future) runs
//! to its end on a task of its own, and its response is stored as if the client had stayed:
//! the retry gets `409`, then the replay ([`finish_on_disconnect`](IdempotencyLayer::finish_on_disconnect),
//! [`DetachedRuns`] for shutdown). A handler that panics releases its key before the panic
//! goes on up (to a `CatchPanicLayer` outside, say): the retry that follows its `500` runs.
//! While the handler runs, the lease is renewed, so only a holder that died can be taken over;
//! and completing needs the lock token, so a holder that lost its lease cannot overwrite.
//!
//! Other answers: a missing key passes through (or `400 idempotency_key_missing` with
//! [`require_key`](IdempotencyLayer::require_key)); an empty, over-long, non-visible-ASCII or
//! repeated key is `400 idempotency_key_invalid`; a body over
//! [`max_body_bytes`](IdempotencyLayer::max_body_bytes) is `413`; a store failure is
//! `503 idempotency_store_unavailable` (or runs unprotected with
//! [`fail_open`](IdempotencyLayer::fail_open)). Every response to a request with a valid key
//! echoes its `Idempotency-Key`. Errors are `application/problem+json` ([`ProblemJson`]) unless
//! you plug your own [`ErrorRenderer`].
//!
//! Keys are scoped by tenant ([`TenantExtractor`]): scope by the principal your authentication
//! verified ([`TenantFromExtension`]), so that a retry after a token refresh still replays. The
//! default, a hash of the `Authorization` header, suits static API keys; see [`DefaultTenant`]
//! for when it does not.
//!
//! With `PostgresStore` or `SqlxStore`, a handler can complete its record inside its own
//! database transaction (`Claim::respond_in`), so that its effects and its stored response
//! commit together: a crash between the two can no longer run it twice.
//!
//! The handler finds the request's key in the request extensions ([`IdempotencyKey`]), and
//! every handled response carries an [`Outcome`] in its extensions, for metrics. Support tools
//! look a key up and forget it with [`Operator`].
//!
//! # Stores and feature flags
//!
//! | feature            | store           | for                                                           |
//! |--------------------|-----------------|---------------------------------------------------------------|
//! | `memory` (default) | [`MemoryStore`] | one server: sharded map, TTL-pruned, bounded, and shared fairly among tenants once full; an optional snapshot keeps completed records across a restart |
//! | `redis`            | `RedisStore`    | a fleet, on one Redis or a Redis Cluster: one Lua script per step, expiry kept by Redis |
//! | `postgres`         | `PostgresStore` | a fleet, durable: `INSERT … ON CONFLICT`, a documented table  |
//! | `sqlx`             | `SqlxStore`     | the same table on your own `sqlx::PgPool`; with `Claim`, the record completes in your transaction |
//! | `axum` (default)   |                 | behind axum's `Router::nest`, the fingerprint takes the path the app was sent (`OriginalUri`), so a key reused on another nested route is `422` |
//! | `tracing`          |                 | a span per keyed request, a `tracing` event per [`Outcome`]   |
//! | `metrics`          |                 | counters, a histogram and a gauge through the `metrics` facade ([`metrics`]) |
//! | `conformance`      |                 | `conformance`: the store test suite, to run on your own store |
//! | `client`           |                 | the client side: `IdempotentRetryLayer`, one key per operation and safe retries for tower HTTP clients (`reqwest`: `IdempotentRetryMiddleware` for `reqwest-middleware`) |
//!
//! [`ReplayCache`] sits in front of any store and keeps completed records in process, so that a
//! replay it holds costs no store call.
//!
//! Every server of a fleet must share one store, with the same key prefix (Redis) or table
//! (PostgreSQL): the record key is (tenant hash, key), with no per-process seed, so a retry
//! that reaches another server meets the same record.
//!
//! The layer needs a Tokio runtime with its time driver enabled (as `#[tokio::main]` gives).
//!
//! # Implementing your own store
//!
//! Implement [`IdempotencyStore`]: an atomic `begin`, and `renew`, `complete` and `release`
//! fenced by the [`LockToken`] that `begin` returned. Its documentation has a complete example.
//!
//! [tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_cfg))]

mod admission;
mod body;
#[cfg(any(feature = "postgres", feature = "sqlx"))]
mod claim;
#[cfg(not(any(feature = "postgres", feature = "sqlx")))]
#[path = "claim_off.rs"]
mod claim;
#[cfg(feature = "client")]
mod client;
mod config;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
mod detach;
mod error;
mod fingerprint;
mod future;
mod handler;
mod key;
mod layer;
mod lease;
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod operator;
mod outcome;
mod response;
mod service;
mod store;
mod stored;
mod tenant;
mod util;
mod wait;

pub use body::{BoxError, RequestBody, ResponseBody};
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub use claim::{Claim, ClaimConnection, ClaimError, ClaimErrorKind};
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use client::IdempotentRetryMiddleware;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use client::{
    IdempotentRetry, IdempotentRetryLayer, IdempotentRetryLayerBuilder, RetryBody, RetryError,
    RetryErrorKind, RetryFuture, RetryOutcome,
};
pub use config::{
    CacheDecision, IDEMPOTENCY_BYPASSED, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, default_cache_policy,
};
pub use detach::DetachedRuns;
pub use error::{ErrorCode, ErrorRenderer, Problem, ProblemJson};
pub use fingerprint::{Fingerprint, Fingerprinter};
pub use future::ResponseFuture;
pub use handler::Idempotency;
pub use key::{IdempotencyKey, MAX_KEY_LEN};
pub use layer::IdempotencyLayer;
pub use operator::{KeyReport, Operator, OperatorError};
pub use outcome::Outcome;
#[cfg(any(feature = "postgres", feature = "sqlx"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
pub use store::ClaimTarget;
pub use store::cache::{ReplayCache, ReplayCacheBuilder};
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use store::memory::{
    MemoryStore, MemoryStoreBuilder, MemoryStoreSettings, SnapshotLoad, SnapshotStatus,
};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::{RedisStore, RedisStoreBuilder};
#[cfg(feature = "sqlx")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx")))]
pub use store::sqlx::{SqlxStore, SqlxStoreBuilder};
pub use store::{
    Begin, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, RecordState, Settled,
    StoreError, StoreErrorKind,
};
pub use stored::{DecodeError, StoredResponse};
pub use tenant::{
    DefaultTenant, TenantExtractor, TenantFromExtension, TenantFromHeader, TenantId,
    TenantRejection,
};

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg fuzzing` only).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use http::request::Parts;

    /// Parses an `Idempotency-Key` header value; `None` when it is not a valid key.
    pub fn parse_key(value: &[u8]) -> Option<std::sync::Arc<str>> {
        crate::key::parse_value(value)
            .ok()
            .map(|key| std::sync::Arc::from(key.as_str()))
    }

    /// The fingerprint of a request whose body arrives in `chunks`, with `canonical_json`
    /// and the pointers `ignore` as the layer has them.
    pub fn fingerprint(
        parts: &Parts,
        chunks: &[&[u8]],
        canonical_json: bool,
        ignore: &[&str],
    ) -> crate::Fingerprint {
        let options = crate::fingerprint::BodyFingerprint {
            canonical_json,
            ignore: crate::fingerprint::pointer::Pointers::parse(ignore)
                .ok()
                .flatten()
                .map(std::sync::Arc::new),
            custom: None,
        };
        let mut hasher = crate::fingerprint::Hasher::new(parts, &[]);
        if options.start(&mut hasher, parts) {
            options.whole(&mut hasher, parts, &chunks.concat());
        } else {
            for chunk in chunks {
                hasher.body(chunk);
            }
        }
        hasher.finish()
    }

    /// The canonical form of a JSON body, with `?` for the values `ignore` points at; `None`
    /// when the body has none (it is then fingerprinted as sent).
    pub fn canonical_json(body: &[u8], ignore: &[&str]) -> Option<Vec<u8>> {
        let ignore = crate::fingerprint::pointer::Pointers::parse(ignore)
            .ok()
            .flatten();
        let scanned = crate::fingerprint::json::scan(body).ok()?;
        let mut out = Vec::new();
        scanned.write(ignore.as_ref(), |piece| out.extend_from_slice(piece));
        Some(out)
    }
}
