//! The scenarios every shared store runs: several layers (servers of a fleet), each with its
//! own store connection, in front of real axum Routers; and `fleet_scenarios!`, which makes
//! them tests.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use tower_idempotency::{
    Begin, Fingerprint, Forget, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore, RecordKey,
    RecordState, TenantId,
};

use super::{Runs, send, unique_key};

#[derive(Clone)]
struct Api {
    runs: Runs,
    delay: Duration,
}

/// `POST /payments`: counts the run, sleeps `delay`, then answers 201 with `Location`, two
/// `Set-Cookie`, `X-Custom`, JSON naming the run and echoing the request body.
pub fn payments_api(runs: Runs, delay: Duration) -> Router {
    Router::new()
        .route("/payments", post(create))
        .with_state(Api { runs, delay })
}

async fn create(State(api): State<Api>, body: Bytes) -> Response {
    let n = api.runs.bump();
    tokio::time::sleep(api.delay).await;
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, format!("/payments/{n}").parse().unwrap());
    headers.append(header::SET_COOKIE, "session=abc; Path=/".parse().unwrap());
    headers.append(header::SET_COOKIE, format!("run={n}").parse().unwrap());
    headers.insert("x-custom", "custom-value".parse().unwrap());
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    let body = format!(
        r#"{{"run":{n},"request":{}}}"#,
        String::from_utf8_lossy(&body)
    );
    (StatusCode::CREATED, headers, body).into_response()
}

/// One server of a fleet: the API behind a layer over `store`.
pub fn server<S: IdempotencyStore>(
    store: S,
    runs: &Runs,
    delay: Duration,
    configure: impl FnOnce(IdempotencyLayer<S>) -> IdempotencyLayer<S>,
) -> Router {
    payments_api(runs.clone(), delay)
        .layer(configure(IdempotencyLayer::new(store).shared_scope(true)))
}

/// The `Authorization` of the fleet scenarios' client: its requests are scoped to its own
/// tenant, where replays carry every header (`Set-Cookie` included).
pub const CLIENT: &str = "Bearer fleet-scenarios-client";

/// The tenant of [`CLIENT`]'s records.
pub fn client_tenant() -> TenantId {
    tower_idempotency::DefaultTenant::scope_for(CLIENT)
}

/// A keyed `POST /payments` from [`CLIENT`].
pub fn payment(key: &str, body: &str) -> Request<Body> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, CLIENT)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// After a store outage: whether `app` serves a new key (`201`) within 30 s, every answer
/// until then a `503` from the store, never another failure.
pub async fn recovers(app: &Router, key: &str) -> bool {
    super::eventually(Duration::from_secs(30), async || {
        let reply = send(app, payment(key, "{}")).await;
        match reply.status {
            StatusCode::CREATED => true,
            _ => {
                reply.assert_store_unavailable();
                false
            }
        }
    })
    .await
}

/// Two servers, each with its own store connection, take 500 concurrent duplicates of one
/// request, half each: the handler runs once; every other response is a 409 or a replay
/// identical to the original.
pub async fn scenario_two_servers<S: IdempotencyStore>(a: S, b: S) {
    const REQUESTS: usize = 500;
    let runs = Runs::default();
    let servers = [
        server(a, &runs, Duration::from_millis(100), |l| l),
        server(b, &runs, Duration::from_millis(100), |l| l),
    ];
    let key = unique_key("two-servers");
    // Spread over 240 ms, so that duplicates arrive both while the handler runs (409) and after
    // it completed (replay).
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let app = servers[i % 2].clone();
            let request = payment(&key, r#"{"amount":100}"#);
            let delay = Duration::from_millis(10 * (i as u64 % 25));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                send(&app, request).await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(REQUESTS);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    assert_eq!(runs.get(), 1, "the handler ran once across both servers");

    let originals: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED && !r.replayed())
        .collect();
    assert_eq!(originals.len(), 1, "exactly one response is the original");
    let original = originals[0];
    assert_eq!(original.headers["idempotency-key"], key.as_str());
    let (mut conflicts, mut replays) = (0, 0);
    for reply in &replies {
        if std::ptr::eq(reply, original) {
            continue;
        }
        if reply.status == StatusCode::CONFLICT {
            reply.assert_in_progress();
            conflicts += 1;
        } else {
            reply.assert_replay_of(original);
            replays += 1;
        }
    }
    assert_eq!(conflicts + replays, REQUESTS - 1);
    assert!(conflicts > 0, "duplicates sent with the first one got 409");
    eprintln!("two servers: 1 run, {conflicts} conflicts, {replays} replays");

    for app in &servers {
        send(app, payment(&key, r#"{"amount":100}"#))
            .await
            .assert_replay_of(original);
    }
    assert_eq!(runs.get(), 1);
}

/// A response completed through one layer and store is replayed by a new layer over a new
/// store: the record outlives the process that wrote it.
pub async fn scenario_restart_replays<S, F, Fut>(make: F)
where
    S: IdempotencyStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let runs = Runs::default();
    let key = unique_key("restart");
    let original = {
        let app = server(make().await, &runs, Duration::ZERO, |l| l);
        send(&app, payment(&key, r#"{"amount":7}"#)).await
    };
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(!original.replayed());
    assert_eq!(runs.get(), 1);

    let app = server(make().await, &runs, Duration::ZERO, |l| l);
    let retry = send(&app, payment(&key, r#"{"amount":7}"#)).await;
    retry.assert_replay_of(&original);
    assert_eq!(retry.headers[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(
        runs.get(),
        1,
        "the handler did not run again after the restart"
    );
}

/// With a 300 ms lease and a handler that runs about 1 s, retries on the other server keep
/// getting 409 (the lease is renewed), and the handler runs once.
pub async fn scenario_lease_renewal<S: IdempotencyStore>(a: S, b: S) {
    let runs = Runs::default();
    let lease = |l: IdempotencyLayer<S>| l.lease(Duration::from_millis(300));
    let first_server = server(a, &runs, Duration::from_millis(1000), lease);
    let other_server = server(b, &runs, Duration::from_millis(1000), lease);
    let key = unique_key("renewal");
    let first = tokio::spawn({
        let request = payment(&key, "{}");
        async move { send(&first_server, request).await }
    });
    while runs.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut conflicts = 0;
    while !first.is_finished() {
        let retry = send(&other_server, payment(&key, "{}")).await;
        if retry.status == StatusCode::CONFLICT {
            retry.assert_in_progress();
            conflicts += 1;
        } else {
            assert!(
                retry.replayed(),
                "a retry never runs the handler: {retry:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let original = first.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    assert_eq!(
        runs.get(),
        1,
        "the slow handler ran once; its lease was never taken over"
    );
    assert!(
        conflicts >= 8,
        "retries got 409 for the whole second: {conflicts}"
    );
    send(&other_server, payment(&key, "{}"))
        .await
        .assert_replay_of(&original);
    assert_eq!(runs.get(), 1);
}

/// `lookup` and `forget` as the trait documents them: `lookup` reads without changing; `forget`
/// removes a completed record, leaves a live in-flight one unless forced, and finds nothing
/// where there is no record.
pub async fn scenario_lookup_and_forget<S: IdempotencyStore>(store: S) {
    let lease = Duration::from_secs(30);
    let fp = Fingerprint::from_bytes([9; 32]);
    let key = RecordKey::new(TenantId::hashed("operator"), unique_key("lookup"));
    assert!(store.lookup(&key).await.unwrap().is_none());
    assert_eq!(store.forget(&key, false).await.unwrap(), Forget::NotFound);
    assert_eq!(store.forget(&key, true).await.unwrap(), Forget::NotFound);

    let Begin::Acquired(token) = store.begin(&key, &fp, lease).await.unwrap() else {
        panic!("a new key is acquired");
    };
    let info = store.lookup(&key).await.unwrap().expect("in flight");
    assert_eq!(info.fingerprint, fp);
    let RecordState::InFlight { lease_until } = info.state else {
        panic!("in flight expected: {info:?}");
    };
    let now = std::time::SystemTime::now();
    assert!(lease_until > now + Duration::from_secs(20) && lease_until < now + lease * 2);
    assert_eq!(store.forget(&key, false).await.unwrap(), Forget::InFlight);
    assert!(matches!(
        store.begin(&key, &fp, lease).await.unwrap(),
        Begin::InFlight
    ));

    let response = tower_idempotency::StoredResponse::new(
        StatusCode::ACCEPTED,
        HeaderMap::new(),
        Bytes::from_static(b"done"),
    );
    let ttl = Duration::from_secs(600);
    store
        .complete(&key, token, response.clone(), ttl)
        .await
        .unwrap();
    let info = store.lookup(&key).await.unwrap().expect("completed");
    let RecordState::Completed {
        status,
        replayable,
        expires_at,
    } = info.state
    else {
        panic!("completed expected: {info:?}");
    };
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(replayable);
    assert!(expires_at > now + ttl / 2 && expires_at < now + ttl * 2);
    // `lookup` changed nothing: the record still replays.
    assert!(
        matches!(store.begin(&key, &fp, lease).await.unwrap(), Begin::Completed(r) if r == response)
    );

    assert_eq!(store.forget(&key, false).await.unwrap(), Forget::Forgotten);
    assert!(store.lookup(&key).await.unwrap().is_none());
    assert_eq!(store.forget(&key, false).await.unwrap(), Forget::NotFound);
    let Begin::Acquired(token) = store.begin(&key, &fp, lease).await.unwrap() else {
        panic!("a forgotten key runs again");
    };

    // Forced: a live in-flight record goes, and its holder can no longer complete it.
    assert_eq!(store.forget(&key, true).await.unwrap(), Forget::Forgotten);
    assert!(store.lookup(&key).await.unwrap().is_none());
    let err = store
        .complete(&key, token, response, ttl)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), tower_idempotency::StoreErrorKind::LeaseLost);
}

/// The conformance suite and the fleet scenarios above, as tests over the store that `$store()`
/// (an `async fn() -> Option<S>`, `None` when its server is not configured) opens. The test
/// file glob-imports the support module (`use support::*;`), which names the scenarios.
macro_rules! fleet_scenarios {
    ($store:ident) => {
        mod conformance {
            tower_idempotency::conformance_tests!(super::$store);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn two_servers_run_the_handler_once() {
            let (Some(a), Some(b)) = ($store().await, $store().await) else {
                return;
            };
            scenario_two_servers(a, b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn restart_replays() {
            if $store().await.is_none() {
                return;
            }
            scenario_restart_replays(|| async { $store().await.unwrap() }).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn lease_renewal_across_servers() {
            let (Some(a), Some(b)) = ($store().await, $store().await) else {
                return;
            };
            scenario_lease_renewal(a, b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn lookup_and_forget() {
            let Some(store) = $store().await else { return };
            scenario_lookup_and_forget(store).await;
        }
    };
}
