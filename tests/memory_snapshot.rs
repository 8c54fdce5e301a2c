//! `MemoryStore`'s snapshot across a real restart: a server process serves a keyed POST, is
//! stopped with SIGTERM (graceful shutdown, then `save_snapshot`), and a new process on the
//! same file replays the retry without running its handler.
//!
//! The server is this test binary itself, run again with `SNAPSHOT_SERVER` set to the file.
#![cfg(unix)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::child::{ChildServer, announce};
use support::{Runs, raw};
use tower_idempotency::{IdempotencyLayer, MemoryStore, SnapshotLoad};

const SERVER_ENV: &str = "SNAPSHOT_SERVER";

/// The server of a child process; does nothing unless `SNAPSHOT_SERVER` names a file.
#[test]
fn snapshot_server() {
    let Ok(path) = std::env::var(SERVER_ENV) else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(serve(path));
}

async fn serve(path: String) {
    let store = MemoryStore::builder().snapshot(&path).build();
    match store.snapshot_status().unwrap().load() {
        SnapshotLoad::Missing | SnapshotLoad::Loaded { .. } => {}
        other => panic!("the snapshot is usable: {other:?}"),
    }
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(store.clone());
    let detached = layer.detached_runs();
    let app = Router::new()
        .route("/payments", post(create))
        .route("/slow-payments", post(create_slowly))
        .route_layer(layer)
        .route("/runs", get(count))
        .with_state(runs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    announce(listener.local_addr().unwrap());
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await
        .unwrap();
    assert!(detached.wait_timeout(Duration::from_secs(10)).await);
    let saved = store.save_snapshot().await.unwrap();
    println!("SAVED {saved}");
}

async fn create(State(runs): State<Runs>, body: Bytes) -> impl IntoResponse {
    let n = runs.bump();
    let body = format!("payment {n} of {}", String::from_utf8_lossy(&body));
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/payments/{n}"))],
        body,
    )
}

/// A payment whose handler works on after it charged: long enough for its client to give up.
async fn create_slowly(State(runs): State<Runs>, body: Bytes) -> impl IntoResponse {
    let n = runs.bump();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (StatusCode::CREATED, format!("slow payment {n} of {body:?}"))
}

async fn count(State(runs): State<Runs>) -> String {
    runs.get().to_string()
}

/// A server process on the snapshot file.
struct Server(ChildServer);

impl Server {
    fn start(path: &std::path::Path) -> Self {
        Self(ChildServer::start("snapshot_server", SERVER_ENV, path))
    }

    fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// SIGTERM, then the number of records the server saved as it stopped.
    fn stop(self) -> usize {
        self.0.terminate();
        self.stop_after_terminate()
    }

    /// The number of records the server saved as it stopped, once sent SIGTERM.
    fn stop_after_terminate(mut self) -> usize {
        let saved = self.0.read_after("SAVED ").parse().unwrap();
        assert!(self.0.wait().success(), "a graceful exit");
        saved
    }
}

struct Reply {
    status: StatusCode,
    replayed: bool,
    location: Option<String>,
    body: Bytes,
}

async fn pay(addr: SocketAddr) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{addr}/payments"))
        .header("authorization", "Bearer restart-client")
        .header("idempotency-key", "order-1")
        .body(Full::new(Bytes::from_static(b"100 eur")))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let header = |name: &str| {
        let value = response.headers().get(name)?;
        Some(value.to_str().unwrap().to_owned())
    };
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let location = header("location");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        replayed,
        location,
        body,
    }
}

async fn runs(addr: SocketAddr) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri = format!("http://{addr}/runs").parse().unwrap();
    let response = client.get(uri).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[test]
fn a_completed_request_replays_after_a_real_restart() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return;
    }
    let dir =
        std::env::temp_dir().join(format!("tower-idempotency-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("store.snapshot");
    let _ = std::fs::remove_file(&path);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let first = Server::start(&path);
    let original = runtime.block_on(pay(first.addr()));
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(!original.replayed);
    assert_eq!(runtime.block_on(runs(first.addr())), "1");
    assert_eq!(
        first.stop(),
        1,
        "the completed record was saved at shutdown"
    );

    let second = Server::start(&path);
    let retry = runtime.block_on(pay(second.addr()));
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed, "Idempotent-Replayed: true");
    assert_eq!(retry.location, original.location);
    assert_eq!(retry.body, original.body);
    assert_eq!(
        runtime.block_on(runs(second.addr())),
        "0",
        "the new process did not run the handler"
    );
    assert_eq!(second.stop(), 1, "the record is saved again");
    let _ = std::fs::remove_dir_all(&dir);
}

/// README's shutdown on SIGTERM: the server stops accepting, drains its connections, waits for
/// the runs (`DetachedRuns::wait_timeout`), then saves its snapshot. A client that gives up
/// while the server drains leaves its run to be handed over as its connection closes, after
/// `serve` returned: the wait still covers it, so the run ends and is saved, and the retry on
/// the next process is a replay, not a second payment.
#[test]
fn a_run_whose_client_gives_up_during_the_drain_ends_before_the_process() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tower-idempotency-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("store.snapshot");
    let _ = std::fs::remove_file(&path);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let request = raw::post(
        "/slow-payments",
        &[
            ("Authorization", "Bearer drain-client"),
            ("Idempotency-Key", "order-slow"),
        ],
        "100 eur",
    );

    let first = Server::start(&path);
    let stream = runtime.block_on(raw::send_only(first.addr(), &request));
    runtime.block_on(async {
        while runs(first.addr()).await != "1" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    first.0.terminate();
    std::thread::sleep(Duration::from_millis(200));
    drop(stream); // the client gives up while the server drains
    assert_eq!(
        first.stop_after_terminate(),
        1,
        "the run ended, and was saved, before the process exited"
    );

    let second = Server::start(&path);
    let retry = runtime.block_on(raw::exchange(second.addr(), &request));
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert!(retry.replayed(), "the retry is a replay: {}", retry.text());
    assert_eq!(retry.text(), "slow payment 1 of b\"100 eur\"");
    assert_eq!(
        runtime.block_on(runs(second.addr())),
        "0",
        "nothing ran again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
