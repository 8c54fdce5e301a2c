//! `MemoryStore`'s bound per tenant through a real server on loopback: a tenant that floods a
//! small store with keys drops its own records, never another tenant's.

#[macro_use]
mod support;

use std::net::SocketAddr;

use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{Runs, api};
use tower_idempotency::{DefaultTenant, IdempotencyLayer, MemoryStore};

const FLOODER: &str = "Bearer flooder";
const VICTIM: &str = "Bearer victim";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(
    client: &HttpClient,
    addr: SocketAddr,
    auth: &str,
    key: &str,
) -> (StatusCode, bool, Bytes) {
    let request = Request::post(format!("http://{addr}/payments"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_drops_its_own_records_and_the_victim_still_replays() {
    const FLOOD: usize = 5_000;
    const WORKERS: usize = 8;
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .max_entries_per_tenant(200)
        .build();
    let runs = Runs::default();
    // `route_layer`: requests to routes that do not exist make no record.
    let app: Router = api(runs.clone()).route_layer(IdempotencyLayer::new(store.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let (status, replayed, original) = post(&client, addr, VICTIM, "victim-order").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(runs.get(), 1);

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in (w..FLOOD).step_by(WORKERS) {
                    let (status, replayed, _) =
                        post(&client, addr, FLOODER, &format!("flood-{i}")).await;
                    assert_eq!(
                        (status, replayed),
                        (StatusCode::CREATED, false),
                        "flood key {i}"
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(runs.get(), 1 + FLOOD, "every flood key ran once");

    let flooder = DefaultTenant::scope_for(FLOODER);
    let victim = DefaultTenant::scope_for(VICTIM);
    assert!(store.tenant_entry_count(&flooder) <= 200);
    assert_eq!(store.tenant_entry_count(&victim), 1);
    assert_eq!(
        store.evicted(),
        (FLOOD - 200) as u64,
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
