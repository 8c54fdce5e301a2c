//! `MemoryStore`'s share per tenant through a real server on loopback: a tenant alone fills the
//! whole store; a tenant that floods a full store with keys, or fills its bytes with large
//! responses, drops its own records, never another tenant's.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{Runs, Server, api};
use tower_idempotency::{DefaultTenant, IdempotencyLayer, MemoryStore, Operator, TenantId};

const FLOODER: &str = "Bearer flooder";
const VICTIM: &str = "Bearer victim";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The tenant of the `Authorization` header `auth`, as the layer stores it: sealed.
fn stored_tenant(store: &MemoryStore, auth: &str) -> TenantId {
    let operator = Operator::new(store.clone());
    let key = operator.record_key(DefaultTenant::scope_for(auth), "k");
    *key.unwrap().tenant()
}

async fn post(
    client: &HttpClient,
    addr: SocketAddr,
    auth: &str,
    key: &str,
) -> (StatusCode, bool, Bytes) {
    post_to(client, addr, "/payments", auth, key).await
}

async fn post_to(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    auth: &str,
    key: &str,
) -> (StatusCode, bool, Bytes) {
    let request = Request::post(format!("http://{addr}{path}"))
        .header("authorization", auth)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"amount\":1}")))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, body)
}

/// The test API behind a layer over `store`, served on loopback: its runs, the server and a
/// client. `route_layer`: requests to routes that do not exist make no record.
async fn serve(store: &MemoryStore) -> (Runs, Server, HttpClient) {
    let runs = Runs::default();
    let app: Router = api(runs.clone()).route_layer(IdempotencyLayer::new(store.clone()));
    let server = Server::start(app, Default::default()).await;
    (
        runs,
        server,
        Client::builder(TokioExecutor::new()).build_http(),
    )
}

/// Sends the keys `{prefix}-0` to `{prefix}-{count - 1}` of `auth` to `path`, from `workers`
/// tasks at once, and checks each answer (key number, status, replayed, body) with `check`.
async fn send_concurrently(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    auth: &'static str,
    (prefix, count): (&str, usize),
    workers: usize,
    check: impl Fn(usize, StatusCode, bool, Bytes) + Clone + Send + 'static,
) {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (client, path, prefix) = (client.clone(), path.to_owned(), prefix.to_owned());
            let check = check.clone();
            tokio::spawn(async move {
                for i in (w..count).step_by(workers) {
                    let key = format!("{prefix}-{i}");
                    let (status, replayed, body) = post_to(&client, addr, &path, auth, &key).await;
                    check(i, status, replayed, body);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_a_full_store_drops_its_own_records_and_the_victim_still_replays() {
    const FLOOD: usize = 5_000;
    const WORKERS: usize = 8;
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .max_entries_per_tenant(200)
        .build();
    let (runs, server, client) = serve(&store).await;
    let addr = server.addr;

    let (status, replayed, original) = post(&client, addr, VICTIM, "victim-order").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(runs.get(), 1);

    let check = |i, status, replayed, _| {
        assert_eq!(
            (status, replayed),
            (StatusCode::CREATED, false),
            "flood key {i}"
        );
    };
    let flood = ("flood", FLOOD);
    send_concurrently(&client, addr, "/payments", FLOODER, flood, WORKERS, check).await;
    assert_eq!(runs.get(), 1 + FLOOD, "every flood key ran once");

    let flooder = stored_tenant(&store, FLOODER);
    let victim = stored_tenant(&store, VICTIM);
    // The flooder had the room the victim left, then paid for each new key with its own record.
    assert_eq!(store.tenant_entry_count(&flooder), 999);
    assert_eq!(store.tenant_entry_count(&victim), 1);
    assert_eq!(store.entry_count(), 1_000);
    assert_eq!(
        store.evicted(),
        (FLOOD - 999) as u64,
        "the flooder's own records went"
    );

    let (status, replayed, body) = post(&client, addr, VICTIM, "victim-order").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed, "the victim's retry replays");
    assert_eq!(body, original);
    assert_eq!(runs.get(), 1 + FLOOD, "the victim's handler ran once");

    // Unmatched routes pass by `route_layer` without a record.
    let before = store.entry_count();
    let request = Request::post(format!("http://{addr}/nowhere"))
        .header("authorization", FLOODER)
        .header("idempotency-key", "nowhere")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        client.request(request).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(store.entry_count(), before);
}

/// A store full by its bytes: a tenant whose responses are large fills the room the others
/// leave, then, within its share of the records but over its share of the bytes (the same
/// eighth of them), makes room from its own records, never from another tenant's, whose
/// retries replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_filling_the_bytes_with_large_responses_drops_its_own_records() {
    const MAX_BYTES: usize = 2 << 20;
    const LARGE: usize = 20_000;
    const FLOOD: usize = 400;
    const WORKERS: usize = 8;
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .max_bytes(MAX_BYTES)
        .build();
    let (runs, server, client) = serve(&store).await;
    let addr = server.addr;

    let mut originals = Vec::new();
    for i in 0..5 {
        let (status, replayed, body) = post(&client, addr, VICTIM, &format!("order-{i}")).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        originals.push(body);
    }

    // 400 responses of 20 kB: 8 MB through a store of 2 MiB, from a tenant that holds far
    // fewer records than its share (125).
    let path = format!("/big/{LARGE}");
    let check = |i, status, replayed, body: Bytes| {
        assert_eq!((status, replayed), (StatusCode::OK, false), "large key {i}");
        assert_eq!(body.len(), LARGE);
    };
    let flood = ("large", FLOOD);
    send_concurrently(&client, addr, &path, FLOODER, flood, WORKERS, check).await;
    assert_eq!(runs.get(), 5 + FLOOD, "every key ran once");

    let flooder = stored_tenant(&store, FLOODER);
    let victim = stored_tenant(&store, VICTIM);
    // The flooder had the room the victim left, then paid for each new key with its own
    // records.
    assert_eq!(
        store.tenant_entry_count(&victim),
        5,
        "the victim's records stay"
    );
    let kept = store.tenant_entry_count(&flooder);
    assert!(
        kept > 50 && kept * LARGE <= MAX_BYTES,
        "the flooder fills the rest of the bytes: {kept} records"
    );
    assert_eq!(
        store.evicted(),
        (FLOOD - kept) as u64,
        "the flooder's own records went"
    );

    for (i, original) in originals.iter().enumerate() {
        let (status, replayed, body) = post(&client, addr, VICTIM, &format!("order-{i}")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(replayed, "the victim's retry {i} replays");
        assert_eq!(&body, original);
    }
    assert_eq!(runs.get(), 5 + FLOOD, "no handler ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_alone_fills_the_whole_store_and_every_key_replays() {
    const MAX: usize = 400;
    const WORKERS: usize = 4;
    // The default share: an eighth of the store, 50 records.
    let store = MemoryStore::builder().max_entries(MAX).build();
    assert_eq!(store.settings().max_entries_per_tenant(), MAX / 8);
    let (runs, server, client) = serve(&store).await;
    let addr = server.addr;

    let send_all = |expect_replayed: bool| {
        let check = move |i, status, replayed, body: Bytes| {
            assert_eq!(status, StatusCode::CREATED, "key {i}");
            assert_eq!(replayed, expect_replayed, "key {i}");
            assert!(!body.is_empty());
        };
        send_concurrently(
            &client,
            addr,
            "/payments",
            VICTIM,
            ("order", MAX),
            WORKERS,
            check,
        )
    };
    send_all(false).await;
    assert_eq!(runs.get(), MAX);
    let tenant = stored_tenant(&store, VICTIM);
    assert_eq!(
        store.tenant_entry_count(&tenant),
        MAX,
        "the share bounds no one"
    );
    assert_eq!(store.evicted(), 0);
    // Every retry replays: nothing of the tenant's was dropped.
    send_all(true).await;
    assert_eq!(runs.get(), MAX, "no handler ran twice");

    // The store is full: the next key makes room from the tenant's own records.
    let (status, replayed, _) = post(&client, addr, VICTIM, "one-more").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(store.evicted(), 1);
    assert_eq!(store.tenant_entry_count(&tenant), MAX);
}

/// A tenant at its share whose records are all requests in flight still begins a new key while
/// the store holds completed records (the nearest expiry goes, whoever's): only a store full of
/// in-flight records refuses one, with `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_share_with_only_requests_in_flight_takes_the_nearest_expiry() {
    let store = MemoryStore::builder()
        .max_entries(4)
        .max_entries_per_tenant(1)
        .build();
    let runs = Runs::default();
    // `/held` answers once the gate opens; `/payments` at once.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let held = axum::routing::post({
        let runs = runs.clone();
        move || {
            let (runs, mut opened) = (runs.clone(), opened.clone());
            async move {
                runs.bump();
                opened.wait_for(|open| *open).await.unwrap();
                (StatusCode::CREATED, "held")
            }
        }
    });
    let app: Router = api(runs.clone())
        .route("/held", held)
        .route_layer(IdempotencyLayer::new(store.clone()));
    let server = Server::start(app, Default::default()).await;
    let addr = server.addr;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let hold = |key: &'static str| {
        let client = client.clone();
        tokio::spawn(async move {
            let request = Request::post(format!("http://{addr}/held"))
                .header("authorization", FLOODER)
                .header("idempotency-key", key)
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.request(request).await.unwrap().status()
        })
    };
    let in_store = async |n: usize| {
        let store = store.clone();
        assert!(
            support::eventually(Duration::from_secs(10), async || store.entry_count() == n).await,
            "{n} records"
        );
    };

    for key in ["v-1", "v-2", "v-3"] {
        let (status, ..) = post(&client, addr, VICTIM, key).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut waiting = vec![hold("h-1")];
    in_store(4).await;
    // Full; the holder is at its share, all in flight: the victim's nearest expiry goes, one per
    // new key.
    for (n, key) in ["h-2", "h-3", "h-4"].into_iter().enumerate() {
        waiting.push(hold(key));
        assert!(
            support::eventually(Duration::from_secs(10), async || {
                store.evicted() == n as u64 + 1
            })
            .await
        );
    }
    assert_eq!(runs.get(), 3 + 4);
    assert_eq!(store.tenant_entry_count(&stored_tenant(&store, VICTIM)), 0);
    // In-flight records fill the store: a new key is refused, whoever's, and runs nothing.
    for auth in [FLOODER, VICTIM] {
        let (status, _, body) = post(&client, addr, auth, "refused").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "idempotency_store_unavailable");
    }
    assert_eq!(runs.get(), 7);
    // Once they answer, the holder's completed records make room again.
    gate.send(true).unwrap();
    for waiting in waiting {
        assert_eq!(waiting.await.unwrap(), StatusCode::CREATED);
    }
    let (status, replayed, _) = post(&client, addr, VICTIM, "refused").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(runs.get(), 8);
    assert_eq!(store.entry_count(), 4);
}
