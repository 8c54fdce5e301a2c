//! Keyed work is bounded when it is admitted, never by cutting off a run that holds its key.
//!
//! Through a real server on loopback, with clients on raw `TcpStream`s that hang up: one
//! caller who floods a slow route and hangs up on every request can no longer make another
//! caller's handler be cancelled half-way (and run twice on its retry).

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode, header};
use support::charge::{Effects, serve_behind};
use support::raw::{self, RawReply};
use support::{Runs, Server, api, unique_key};
use tower_idempotency::{DefaultTenant, IdempotencyLayer, MemoryStore, TenantId};

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

/// The counter a sealed tenant had when tenants were counted in 4,096 shared counters: two
/// tenants with the same one shared a bound (they also share a shard of the exact counts now).
fn old_counter(tenant: &TenantId) -> usize {
    let b = tenant.as_bytes();
    usize::from(u16::from_le_bytes([b[0], b[1]])) % 4096
}

/// A keyed `POST` through `oneshot`, from `auth` (none: the shared scope).
fn keyed(path: &str, auth: Option<&str>, key: &str) -> Request<Body> {
    let mut request = Request::post(path).header("idempotency-key", key);
    if let Some(auth) = auth {
        request = request.header(header::AUTHORIZATION, auth);
    }
    request.body(Body::from("{}")).unwrap()
}

/// One caller at its own bound holds back no other tenant, not even one whose id lands next to
/// its own (same counter before, same shard of the counts now), and not from the shared scope.
async fn a_tenant_at_its_bound_holds_back_no_other(shared_scope: bool) {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .tenant_secret([9; 32])
        .shared_scope(shared_scope)
        .max_in_flight_per_tenant(4);
    let operator = layer.operator();
    let sealed = |auth: &str| {
        *operator
            .record_key(DefaultTenant::scope_for(auth), "k")
            .unwrap()
            .tenant()
    };
    let (heavy, target) = if shared_scope {
        (None, old_counter(&TenantId::shared()))
    } else {
        let heavy = "Bearer heavy-caller";
        (Some(heavy), old_counter(&sealed(heavy)))
    };
    let neighbour = (0..1_000_000)
        .map(|i| format!("Bearer neighbour-{i}"))
        .find(|auth| old_counter(&sealed(auth)) == target)
        .unwrap();
    let app: Router = api(runs.clone()).layer(layer);

    let held: Vec<_> = (0..4)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                support::send(&app, keyed("/slow/1500", heavy, &format!("held-{i}")))
                    .await
                    .status
            })
        })
        .collect();
    assert!(support::eventually(Duration::from_secs(5), async || runs.get() == 4).await);
    let own = support::send(&app, keyed("/payments", heavy, "one-more")).await;
    assert_eq!(
        own.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the heavy caller's own bound"
    );
    assert_eq!(own.code(), "idempotency_overloaded");

    let reply = support::send(&app, keyed("/payments", Some(&neighbour), "mine")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    for status in futures_util::future::join_all(held).await {
        assert_eq!(status.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(runs.get(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_bound_holds_back_no_other_tenant() {
    a_tenant_at_its_bound_holds_back_no_other(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_scope_at_its_bound_holds_back_no_tenant() {
    a_tenant_at_its_bound_holds_back_no_other(true).await;
}
