//! Fault injection: every store call can fail, hang, be slow or lose its reply. Whatever
//! happens, the handler never runs twice while a record's lease lives, and a key is never stuck
//! for longer than its lease.

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Fault, FaultyStore, Op, Runs, api, post_with_key, send};
use tower_idempotency::{IdempotencyLayer, Outcome};

const LEASE: Duration = Duration::from_secs(6);

fn app(runs: &Runs, store: &FaultyStore) -> Router {
    api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .lease(LEASE)
            .store_timeout(Duration::from_millis(500)),
    )
}

fn payment() -> Request<Body> {
    post_with_key("/payments", "k", r#"{"amount":1}"#)
}

fn failing() -> Request<Body> {
    post_with_key("/status/500", "k", "")
}

/// Lets background tasks (releases) run and time pass.
async fn settle(time: Duration) {
    tokio::time::sleep(time).await;
}

#[tokio::test(start_paused = true)]
async fn failed_complete_keeps_the_key_in_flight_until_the_lease_ends() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.always(Op::Complete, Fault::Fail);
    let first = send(&app, payment()).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first client still gets its response"
    );
    store.heal();
    // While the lease lives, a retry cannot run the handler again.
    let retry = send(&app, payment()).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    settle(LEASE - Duration::from_secs(1)).await;
    assert_eq!(send(&app, payment()).await.status, StatusCode::CONFLICT);
    assert_eq!(runs.get(), 1);
    // Once the lease ends, the record is as if the holder had died: a retry takes it over.
    settle(Duration::from_secs(2)).await;
    assert_eq!(send(&app, payment()).await.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_complete_that_hangs_times_out_like_a_failure() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.times(Op::Complete, Fault::Hang, 1);
    let started = tokio::time::Instant::now();
    let first = send(&app, payment()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "bounded by the store timeout"
    );
    assert_eq!(send(&app, payment()).await.status, StatusCode::CONFLICT);
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_complete_whose_reply_is_lost_still_replays() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.times(Op::Complete, Fault::LoseReply, 1);
    let first = send(&app, payment()).await;
    let retry = send(&app, payment()).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_release_is_retried_in_the_background() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.times(Op::Release, Fault::Fail, 2);
    assert_eq!(
        send(&app, failing()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // The background retries (50 ms, then 100 ms) release the key well before the lease ends.
    settle(Duration::from_millis(400)).await;
    assert!(store.calls(Op::Release) >= 3);
    assert_eq!(
        send(&app, failing()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(runs.get(), 2, "the retry ran: the key was released");
}

#[tokio::test(start_paused = true)]
async fn a_release_that_keeps_failing_expires_with_the_lease() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.always(Op::Release, Fault::Fail);
    send(&app, failing()).await;
    settle(Duration::from_secs(1)).await;
    let retry = send(&app, failing()).await;
    assert_eq!(
        retry.status,
        StatusCode::CONFLICT,
        "still held: 409, never a second run"
    );
    assert_eq!(runs.get(), 1);
    settle(LEASE).await;
    assert_eq!(
        send(&app, failing()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(runs.get(), 2, "after the lease, the key is free again");
}

#[tokio::test(start_paused = true)]
async fn a_transient_renewal_failure_does_not_lose_the_lease() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    // Renewals every 2 s; the first fails, the next ones succeed.
    store.times(Op::Renew, Fault::Fail, 1);
    let first = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, post_with_key("/slow/20000", "k", "{}")).await })
    };
    for _ in 0..19 {
        settle(Duration::from_secs(1)).await;
        let retry = send(&app, post_with_key("/slow/20000", "k", "{}")).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
    }
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert!(store.calls(Op::Renew) >= 9);
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn renewals_that_keep_failing_let_the_lease_lapse_and_fencing_protects_the_record() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.always(Op::Renew, Fault::Fail);
    let first = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, post_with_key("/slow/10000", "k", "{}")).await })
    };
    settle(LEASE + Duration::from_secs(1)).await;
    // The holder can no longer prove it is alive: a retry takes the key over.
    let second = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, post_with_key("/slow/10000", "k", "{}")).await })
    };
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first client still gets its response"
    );
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
    // The first holder's completion was fenced off: the record holds the second's response.
    let replay = send(&app, post_with_key("/slow/10000", "k", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, second.body);
}

#[tokio::test(start_paused = true)]
async fn a_failed_begin_answers_503_and_runs_nothing() {
    for fault in [Fault::Fail, Fault::Hang] {
        let (runs, store) = (Runs::default(), FaultyStore::default());
        let app = app(&runs, &store);
        store.times(Op::Begin, fault, 1);
        let reply = send(&app, payment()).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
        assert_eq!(reply.code(), "idempotency_store_unavailable");
        assert!(reply.header("retry-after").is_some());
        assert_eq!(runs.get(), 0);
        assert_eq!(send(&app, payment()).await.status, StatusCode::CREATED);
        assert_eq!(runs.get(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_begin_whose_reply_is_lost_holds_the_key_until_its_lease_ends() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.times(Op::Begin, Fault::LoseReply, 1);
    assert_eq!(
        send(&app, payment()).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The record was written, but nobody holds it: 409 until the lease ends, then it runs once.
    assert_eq!(send(&app, payment()).await.status, StatusCode::CONFLICT);
    settle(LEASE).await;
    assert_eq!(send(&app, payment()).await.status, StatusCode::CREATED);
    assert!(send(&app, payment()).await.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn slow_store_calls_within_the_timeout_change_nothing() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    for op in [Op::Begin, Op::Complete] {
        store.always(op, Fault::Delay(Duration::from_millis(400)));
    }
    let first = send(&app, payment()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, payment()).await;
    assert!(retry.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn fail_open_runs_unprotected_and_says_so() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).fail_open(true));
    store.fail(true);
    for n in 1..=2 {
        let reply = send(&app, payment()).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(
            reply.header("idempotency-bypassed"),
            Some("store-unavailable")
        );
        assert_eq!(reply.outcome, Some(Outcome::Bypassed));
        assert_eq!(runs.get(), n, "unprotected: every request runs");
    }
    assert_eq!(
        store.calls(Op::Complete),
        0,
        "nothing is stored for a bypassed request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_response_is_being_stored_is_still_stored() {
    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = app(&runs, &store);
    store.always(Op::Complete, Fault::Delay(Duration::from_millis(200)));
    let first = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, payment()).await })
    };
    while store.calls(Op::Complete) == 0 {
        tokio::task::yield_now().await;
    }
    first.abort(); // the client goes away while the response is being stored
    assert!(first.await.unwrap_err().is_cancelled());
    settle(Duration::from_millis(300)).await;
    let retry = send(&app, payment()).await;
    assert!(retry.replayed(), "the completion finished in the background");
    assert_eq!(runs.get(), 1);
    assert_eq!(store.calls(Op::Complete), 2, "completed again, detached from the request");
}
