//! Run with: cargo run --example bench_server
//!
//! (Add `--release` before measuring anything.) The server `scripts/load-test` drives: one
//! payments handler (reads the JSON body, answers `201` with `Location` and a small JSON body,
//! no simulated work) on three routes, so that a load generator measures the layers and
//! nothing else:
//!
//! - `POST /payments`: behind `IdempotencyLayer`;
//! - `POST /bare/payments`: the same handler without a layer;
//! - `POST /ai/payments`: behind `axum-idempotent` (header-key mode) and the session and cookie
//!   layers it needs; the cookie of an open session is printed at start (`ai-cookie: ...`).
//!
//! Settings, from the environment:
//!
//! - `PORT`: the port on 127.0.0.1 (default: a free one); the first line printed is
//!   `listening on 127.0.0.1:PORT`;
//! - `STORE`: `memory` (default), `redis` (with `REDIS_URL`, built with `--features redis`),
//!   `cluster` (a Redis Cluster, with `REDIS_CLUSTER_URLS`, comma-separated, built with
//!   `--features redis`), `postgres` (with `POSTGRES_URL`, built with `--features postgres`)
//!   or `sqlx` (`SqlxStore` on a sqlx pool, with `POSTGRES_URL`, built with `--features sqlx`);
//! - `MAX_ENTRIES`, `MAX_BYTES`: the memory store's bounds (default: `MemoryStore::new()`'s,
//!   1,000,000 records and 1 GiB);
//! - `PREFILL`: completed records put in the memory store before listening (default 0): with
//!   `PREFILL=1000000` the default store starts full, so every new key makes room;
//! - `INITIAL_CAPACITY`: records the memory store's tables have room for from the start
//!   (default 0: they grow);
//! - `TTL_SECS`: the layer's TTL (default: the layer's, 24 hours);
//! - `POOL_SIZE`: the connections of the PostgreSQL stores' pool (default 16: with the database
//!   on the same two cores, 16 kept up with the load test's 32 client connections, and 32 only
//!   added database CPU per request); the sqlx pool does not ping a connection before each use;
//! - `PIPELINED`: the connections of that pool that `PostgresStore`'s single statements share,
//!   pipelined (default: the store's, half of the pool; 0: a connection per call);
//! - `REPLAY_CACHE`: `1` puts the store behind a `ReplayCache` with its default bounds, so that
//!   a replay of a record this server completed costs no store call (default `0`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use ruts::store::Ttl;
use ruts::store::moka::MokaStore;
use ruts::{CookieOptions, Session, SessionLayer};
use tower::ServiceExt;
use tower_cookies::CookieManagerLayer;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, RecordKey, ReplayCache,
    StoredResponse, TenantId,
};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const DAY: Duration = Duration::from_secs(24 * 3600);

async fn create_payment(body: Bytes) -> impl IntoResponse {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let payment = format!(
        r#"{{"id":{id},"amount_bytes":{},"status":"succeeded"}}"#,
        body.len()
    );
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/payments/{id}")),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        payment,
    )
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    let parsed = value.parse().ok();
    assert!(parsed.is_some(), "{name}={value} is not valid");
    parsed
}

fn ttl() -> Duration {
    env::<u64>("TTL_SECS").map_or(DAY, Duration::from_secs)
}

fn idempotent<S: IdempotencyStore>(store: S) -> Router {
    if env::<u8>("REPLAY_CACHE").is_some_and(|on| on != 0) {
        return route(ReplayCache::new(store));
    }
    route(store)
}

fn route<S: IdempotencyStore>(store: S) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .layer(IdempotencyLayer::new(store).shared_scope(true).ttl(ttl()))
}

/// The memory store, with the bounds from the environment, filled with `PREFILL` completed
/// records shaped like the handler's. The bound per tenant is `MAX_ENTRIES_PER_TENANT`, or
/// the store's bound: the load test's keys and the prefill share one tenant.
async fn memory_store() -> MemoryStore {
    let max_entries = env("MAX_ENTRIES").unwrap_or(1_000_000);
    let per_tenant = env("MAX_ENTRIES_PER_TENANT").unwrap_or(max_entries);
    let mut builder = MemoryStore::builder()
        .max_entries(max_entries)
        .max_entries_per_tenant(per_tenant);
    if let Some(max) = env("MAX_BYTES") {
        builder = builder.max_bytes(max);
    }
    if let Some(records) = env("INITIAL_CAPACITY") {
        builder = builder.initial_capacity(records);
    }
    let store = builder.build();
    let prefill: u64 = env("PREFILL").unwrap_or(0);
    let started = Instant::now();
    for i in 0..prefill {
        let key = RecordKey::new(TenantId::shared(), format!("prefill-{i:012}"));
        let mut bytes = [0; 32];
        bytes[..8].copy_from_slice(&i.to_le_bytes());
        let fingerprint = Fingerprint::from_bytes(bytes);
        let Ok(Begin::Acquired(token)) = store.begin(&key, &fingerprint, DAY).await else {
            panic!("prefill: record {i} not acquired");
        };
        let mut headers = HeaderMap::new();
        let location = HeaderValue::try_from(format!("/payments/p{i}")).unwrap();
        headers.insert(header::LOCATION, location);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = Bytes::from(format!(
            r#"{{"id":{i},"amount_bytes":75,"status":"succeeded"}}"#
        ));
        let response = StoredResponse::new(StatusCode::CREATED, headers, body);
        // Spread over the TTL, as records completed over a day would be.
        let ttl = ttl().mul_f64((i + 1) as f64 / prefill as f64);
        store.complete(&key, token, response, ttl).await.unwrap();
    }
    if prefill > 0 {
        eprintln!(
            "prefilled {prefill} records in {:.1?}: {store:?}",
            started.elapsed()
        );
    }
    store
}

/// The connections of the PostgreSQL stores' pool: `POOL_SIZE`, default 16. Against the load
/// test's 32 client connections, with PostgreSQL on the same two cores, 4 and 8 connections
/// left requests waiting for one, and 32 cost the database more CPU per request than 16.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
fn pool_size() -> usize {
    env("POOL_SIZE").unwrap_or(16)
}

async fn layered() -> Router {
    match std::env::var("STORE").as_deref().unwrap_or("memory") {
        "memory" => idempotent(memory_store().await),
        #[cfg(feature = "redis")]
        "redis" => {
            let url = std::env::var("REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
            let store = tower_idempotency::RedisStore::connect(&url).await;
            idempotent(store.expect("REDIS_URL: cannot connect"))
        }
        #[cfg(feature = "redis")]
        "cluster" => {
            let urls = std::env::var("REDIS_CLUSTER_URLS").expect("REDIS_CLUSTER_URLS is needed");
            let store = tower_idempotency::RedisStore::connect_cluster(urls.split(',')).await;
            idempotent(store.expect("REDIS_CLUSTER_URLS: cannot connect"))
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = std::env::var("POSTGRES_URL").expect("POSTGRES_URL is needed");
            let mut store =
                tower_idempotency::PostgresStore::builder().max_connections(pool_size());
            if let Some(count) = env("PIPELINED") {
                store = store.pipelined_connections(count);
            }
            let store = store.connect(&url).await;
            let store = store.expect("POSTGRES_URL: cannot connect");
            store.migrate().await.expect("migration");
            idempotent(store)
        }
        #[cfg(feature = "sqlx")]
        "sqlx" => {
            let url = std::env::var("POSTGRES_URL").expect("POSTGRES_URL is needed");
            // The same size as the `PostgresStore`'s pool, and no ping of a connection before
            // each use (sqlx's default): a ping is one more round trip per store call.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(pool_size() as u32)
                .test_before_acquire(false)
                .connect(&url)
                .await
                .expect("POSTGRES_URL: cannot connect");
            let store = tower_idempotency::SqlxStore::new(pool);
            store.migrate().await.expect("migration");
            idempotent(store)
        }
        other => panic!(
            "STORE={other}: memory, redis or cluster (--features redis), postgres (--features \
             postgres), sqlx (--features sqlx)"
        ),
    }
}

/// The `axum-idempotent` route with the session and cookie layers it requires, and the cookie
/// of a session opened on it.
async fn axum_idempotent() -> (Router, String) {
    let sessions = Arc::new(MokaStore::builder().build());
    let options = IdempotentOptions::default()
        .use_idempotency_key_header(Some("idempotency-key"), false)
        .expire_after(24 * 3600);
    let cookies = CookieOptions::build()
        .name("session")
        .max_age(24 * 3600)
        .path("/");
    let app = Router::new()
        .route("/ai/payments", post(create_payment))
        .layer(IdempotentLayer::<MokaStore>::new(options))
        .route(
            "/ai/session",
            post(|session: Session<MokaStore>| async move {
                let ttl = Ttl::new(24 * 3600).unwrap();
                session.set("user", &1_u64, ttl, None).await.unwrap();
                "session opened"
            }),
        )
        .layer(SessionLayer::new(sessions).with_cookie_options(cookies))
        .layer(CookieManagerLayer::new());
    let open = Request::post("/ai/session").body(Body::empty()).unwrap();
    let response = app.clone().oneshot(open).await.unwrap();
    let set_cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    (app, cookie)
}

#[tokio::main]
async fn main() {
    let port: u16 = env("PORT").unwrap_or(0);
    let (ai, cookie) = axum_idempotent().await;
    let bare = Router::new().route("/bare/payments", post(create_payment));
    let app = layered().await.merge(bare).merge(ai);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let addr = listener.local_addr().expect("local address");
    println!("listening on {addr}");
    println!("ai-cookie: {cookie}");
    axum::serve(listener, app).await.expect("server error");
}
