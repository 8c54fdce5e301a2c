//! Keyed work is bounded when it is admitted, never by cutting off a run that holds its key.
//!
//! Through a real server on loopback, with clients on raw `TcpStream`s that hang up: one
//! caller who floods a slow route and hangs up on every request can no longer make another
//! caller's handler be cancelled half-way (and run twice on its retry).

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::charge::{Effects, serve_behind};
use support::{Server, unique_key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// How long `POST /charge` works after charging.
const CHARGE_WORK: Duration = Duration::from_millis(400);

/// The charging API (`support::charge`), where `POST /charge` charges, then works for
/// `CHARGE_WORK`; behind `layer` on loopback.
async fn serve(layer: IdempotencyLayer<MemoryStore>, effects: &Effects) -> Server {
    serve_behind(layer, effects.charge_api()).await
}

fn request(auth: &str, key: &str) -> String {
    format!(
        "POST /charge HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\nIdempotency-Key: {key}\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
}

/// Sends a request and hangs up once it has been read (before the answer).
async fn send_and_hang_up(addr: SocketAddr, auth: &str, key: &str) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(request(auth, key).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
}

/// Sends a request and reads the whole answer.
async fn send(addr: SocketAddr, auth: &str, key: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(request(auth, key).as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

fn status(answer: &str) -> u16 {
    answer[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_hang_ups_never_cancels_another_callers_run() {
    let effects = Effects::new(CHARGE_WORK);
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .max_in_flight(64)
        .max_in_flight_per_tenant(16);
    let server = serve(layer, &effects).await;
    let addr = server.addr;

    // The attacker: 40 keyed requests to the slow route, hanging up on each after its body.
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let key = unique_key("flood");
            tokio::spawn(async move { send_and_hang_up(addr, "Bearer mallory", &key).await })
        })
        .collect();
    for task in flood {
        task.await.unwrap();
    }
    // Only its share was admitted: the rest were refused before anything ran.
    assert_eq!(effects.started.get(), 16, "mallory's share, no more");

    // The victim's client (or its load balancer) hangs up while its handler runs.
    let victim = unique_key("victim");
    send_and_hang_up(addr, "Bearer alice", &victim).await;
    assert_eq!(effects.started.get(), 17);
    let retry = send(addr, "Bearer alice", &victim).await;
    assert_eq!(status(&retry), 409, "still running, not cancelled: {retry}");

    // Every admitted run, the victim's included, runs to its end, once.
    assert!(
        support::eventually(Duration::from_secs(10), async || effects.finished.get()
            == 17)
        .await,
        "finished {}",
        effects.finished.get()
    );
    let replay = send(addr, "Bearer alice", &victim).await;
    assert_eq!(status(&replay), 201, "{replay}");
    assert!(
        replay
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true")
    );
    assert!(replay.ends_with("charge 17"), "{replay}");
    assert_eq!(effects.started.get(), 17, "the victim's charge ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_bound_a_new_key_is_refused_before_anything_runs() {
    let effects = Effects::new(CHARGE_WORK);
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .max_in_flight(4)
        .max_in_flight_per_tenant(4);
    let server = serve(layer, &effects).await;
    let addr = server.addr;

    for tenant in ["a", "b", "c", "d"] {
        send_and_hang_up(addr, &format!("Bearer {tenant}"), &unique_key("busy")).await;
    }
    assert_eq!(effects.started.get(), 4);
    let refused_key = unique_key("refused");
    let refused = send(addr, "Bearer e", &refused_key).await;
    assert_eq!(status(&refused), 503, "{refused}");
    let lower = refused.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{refused}");
    assert!(lower.contains("application/problem+json"), "{refused}");
    assert!(refused.contains("idempotency_overloaded"), "{refused}");
    assert!(lower.contains(&format!("idempotency-key: {refused_key}")));
    assert_eq!(
        effects.started.get(),
        4,
        "nothing ran for the refused request"
    );

    // Once the runs end, the same key is admitted and runs, once.
    assert!(
        support::eventually(Duration::from_secs(10), async || effects.finished.get()
            == 4)
        .await
    );
    let admitted = send(addr, "Bearer e", &refused_key).await;
    assert_eq!(status(&admitted), 201, "{admitted}");
    assert_eq!(effects.started.get(), 5);
}
