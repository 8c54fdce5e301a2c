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
use support::raw::{self, RawReply};
use support::{Server, unique_key};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// How long `POST /charge` works after charging.
const CHARGE_WORK: Duration = Duration::from_millis(400);

/// The charging API (`support::charge`), where `POST /charge` charges, then works for
/// `CHARGE_WORK`; behind `layer` on loopback.
async fn serve(layer: IdempotencyLayer<MemoryStore>, effects: &Effects) -> Server {
    serve_behind(layer, effects.charge_api()).await
}

/// A keyed `POST /charge` from `auth`.
fn request(auth: &str, key: &str) -> String {
    raw::post(
        "/charge",
        &[("Authorization", auth), ("Idempotency-Key", key)],
        "{}",
    )
}

/// Sends a request and hangs up once it has been read (before the answer).
async fn send_and_hang_up(addr: SocketAddr, auth: &str, key: &str) {
    let stream = raw::send_only(addr, request(auth, key)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
}

/// Sends a request and reads the whole answer.
async fn send(addr: SocketAddr, auth: &str, key: &str) -> RawReply {
    raw::exchange(addr, request(auth, key)).await
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
    assert_eq!(retry.status, 409, "still running, not cancelled: {retry:?}");

    // Every admitted run, the victim's included, runs to its end, once.
    assert!(
        support::eventually(Duration::from_secs(10), async || effects.finished.get()
            == 17)
        .await,
        "finished {}",
        effects.finished.get()
    );
    let replay = send(addr, "Bearer alice", &victim).await;
    assert_eq!(replay.status, 201, "{replay:?}");
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.text(), "charge 17", "{replay:?}");
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
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json"),
        "{refused:?}"
    );
    assert!(
        refused.text().contains("idempotency_overloaded"),
        "{refused:?}"
    );
    assert_eq!(
        refused.header("idempotency-key"),
        Some(refused_key.as_str())
    );
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
    assert_eq!(admitted.status, 201, "{admitted:?}");
    assert_eq!(effects.started.get(), 5);
}

/// Admission counts a request once its body is in: clients that send their headers and part of
/// a body, then stall (each with a credential of its own), hold no place, and another caller's
/// keyed request runs; once their bodies come, they run too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_bodies_hold_no_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let effects = Effects::new(Duration::from_millis(10));
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .max_in_flight(4)
        .max_in_flight_per_tenant(1);
    let server = serve(layer, &effects).await;
    let addr = server.addr;

    let mut stalled = Vec::new();
    for i in 0..4 {
        let request = request(&format!("Bearer stalled-{i}"), &unique_key("stalled"));
        // Everything but the body's last byte.
        let (head, last) = request.split_at(request.len() - 1);
        let stream = raw::send_only(addr, head).await;
        stalled.push((stream, last.to_owned()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = send(addr, "Bearer another", &unique_key("other")).await;
    assert_eq!(other.status, 201, "{other:?}");
    assert_eq!(
        effects.started.get(),
        1,
        "the stalled requests have not run"
    );

    for (mut stream, last) in stalled {
        stream.write_all(last.as_bytes()).await.unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        let reply = RawReply::parse(&bytes).expect("an answer");
        assert_eq!(reply.status, 201, "{reply:?}");
    }
    assert_eq!(effects.started.get(), 5);
}
