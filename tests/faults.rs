//! Fault injection: every store call can fail, hang, be slow or lose its reply. Whatever
//! happens, the handler never runs twice while a record's lease lives, and a key is never stuck
//! for longer than its lease.
//!
//! Every case runs on each store: on `MemoryStore` with Tokio's paused clock, and on the shared
//! stores (when `scripts/test-services` provides their servers) in real time with a short lease.

#[macro_use]
mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use support::{Fault, FaultyStore, Op, Runs, api, post_with_key, send};
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, Outcome};

const STORE_TIMEOUT: Duration = Duration::from_millis(500);

/// One case's world: the store with its faults, the lease, the handler's run count.
struct World<S> {
    store: FaultyStore<S>,
    lease: Duration,
    runs: Runs,
    app: Router,
}

impl<S: IdempotencyStore + Clone> World<S> {
    fn new(store: FaultyStore<S>, lease: Duration) -> Self {
        let runs = Runs::default();
        let layer = IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .lease(lease)
            .store_timeout(STORE_TIMEOUT);
        let app = api(runs.clone()).layer(layer);
        Self {
            store,
            lease,
            runs,
            app,
        }
    }

    /// A request whose handler takes `times` leases.
    fn slow(&self, times: f64) -> Request<Body> {
        let ms = (self.lease.as_millis() as f64 * times) as u64;
        post_with_key(&format!("/slow/{ms}"), "k", "{}")
    }

    /// The test API behind a fail-open layer over this world's store.
    fn fail_open_app(&self) -> Router {
        let layer = IdempotencyLayer::new(self.store.clone())
            .shared_scope(true)
            .fail_open(true);
        api(self.runs.clone()).layer(layer)
    }

    /// `fraction` of the lease.
    fn part(&self, fraction: f64) -> Duration {
        self.lease.mul_f64(fraction)
    }
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

async fn a_failed_complete_is_tried_again_in_the_background<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.always(Op::Complete, Fault::Fail);
    let first = send(&w.app, payment()).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first client still gets its response"
    );
    // While the completion fails, a retry cannot run the handler again.
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CONFLICT);
    w.store.heal();
    // The store is back: the completion tried again in the background stores the response.
    let replayed =
        support::eventually(w.lease, async || send(&w.app, payment()).await.replayed()).await;
    assert!(replayed, "the response is stored once the store is back");
    let replay = send(&w.app, payment()).await;
    assert_eq!(replay.body, first.body);
    assert_eq!(w.runs.get(), 1);
}

async fn a_complete_that_keeps_failing_holds_the_key_until_the_lease_ends<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.always(Op::Complete, Fault::Fail);
    let first = send(&w.app, payment()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // While the lease lives, a retry cannot run the handler again.
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CONFLICT);
    settle(w.part(0.6)).await;
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CONFLICT);
    assert_eq!(w.runs.get(), 1);
    // Once the lease ends, the record is as if the holder had died: a retry takes it over.
    settle(w.part(0.6)).await;
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CREATED);
    assert_eq!(w.runs.get(), 2);
    w.store.heal();
}

async fn a_complete_that_hangs_times_out_like_a_failure<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.times(Op::Complete, Fault::Hang, 1);
    let started = tokio::time::Instant::now();
    let first = send(&w.app, payment()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= STORE_TIMEOUT,
        "bounded by the store timeout: {elapsed:?}"
    );
    assert!(
        elapsed < STORE_TIMEOUT * 4,
        "bounded by the store timeout: {elapsed:?}"
    );
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CONFLICT);
    // Tried again in the background, the completion stores the response.
    let replayed =
        support::eventually(w.lease, async || send(&w.app, payment()).await.replayed()).await;
    assert!(replayed);
    assert_eq!(w.runs.get(), 1);
}

async fn a_complete_whose_reply_is_lost_still_replays<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.times(Op::Complete, Fault::LoseReply, 1);
    let first = send(&w.app, payment()).await;
    let retry = send(&w.app, payment()).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(w.runs.get(), 1);
}

async fn a_failed_release_is_retried_in_the_background<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.times(Op::Release, Fault::Fail, 2);
    assert_eq!(
        send(&w.app, failing()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // The background retries (50 ms, then 100 ms) release the key well before the lease ends.
    settle(Duration::from_millis(400)).await;
    assert!(w.store.calls(Op::Release) >= 3);
    assert_eq!(
        send(&w.app, failing()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(w.runs.get(), 2, "the retry ran: the key was released");
}

async fn a_release_that_keeps_failing_expires_with_the_lease<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.always(Op::Release, Fault::Fail);
    send(&w.app, failing()).await;
    settle(w.part(0.3)).await;
    let retry = send(&w.app, failing()).await;
    assert_eq!(
        retry.status,
        StatusCode::CONFLICT,
        "still held: 409, never a second run"
    );
    assert_eq!(w.runs.get(), 1);
    settle(w.part(1.0)).await;
    assert_eq!(
        send(&w.app, failing()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(w.runs.get(), 2, "after the lease, the key is free again");
}

async fn a_transient_renewal_failure_does_not_lose_the_lease<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    // Renewals every third of the lease; the first fails, the next ones succeed.
    w.store.times(Op::Renew, Fault::Fail, 1);
    let first = {
        let (app, request) = (w.app.clone(), w.slow(3.5));
        tokio::spawn(async move { send(&app, request).await })
    };
    for _ in 0..16 {
        settle(w.part(0.2)).await;
        let retry = send(&w.app, w.slow(3.5)).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
    }
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert!(w.store.calls(Op::Renew) >= 9);
    assert_eq!(w.runs.get(), 1);
}

/// Three renewals in a row fail (a connection that stopped answering, then the next ones the
/// store had open): each failed one is tried again a quarter of the renewal period later, so the
/// fourth renews the lease before it ends, and a retry past the lease's first end gets `409`.
/// (Tried again only at the next period, the lease ended after the second failure, and the
/// retry ran the handler a second time.)
async fn renewals_that_fail_in_a_row_are_tried_again_before_the_lease_ends<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.times(Op::Renew, Fault::Fail, 3);
    let first = {
        let (app, request) = (w.app.clone(), w.slow(2.0));
        tokio::spawn(async move { send(&app, request).await })
    };
    settle(w.part(1.2)).await;
    let retry = send(&w.app, w.slow(2.0)).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{:?}", retry.body);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(w.runs.get(), 1);
    assert!(w.store.calls(Op::Renew) >= 4);
}

async fn renewals_that_keep_failing_let_the_lease_lapse_and_fencing_protects_the_record<S>(
    w: World<S>,
) where
    S: IdempotencyStore + Clone,
{
    w.store.always(Op::Renew, Fault::Fail);
    let first = {
        let (app, request) = (w.app.clone(), w.slow(2.0));
        tokio::spawn(async move { send(&app, request).await })
    };
    settle(w.part(1.2)).await;
    // The holder can no longer prove it is alive: a retry takes the key over (and, its own
    // renewals working, keeps it).
    w.store.heal();
    let second = {
        let (app, request) = (w.app.clone(), w.slow(2.0));
        tokio::spawn(async move { send(&app, request).await })
    };
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first client still gets its response"
    );
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(w.runs.get(), 2);
    // The first holder's completion was fenced off: the record holds the second's response.
    let replay = send(&w.app, w.slow(2.0)).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, second.body);
}

/// A holder whose renewal finds its lease lost (its record taken over) renews no more: its
/// token never holds the record again. (Renewing on, it called the store every third of the
/// lease, each call refused and reported, for as long as its handler ran.)
async fn a_holder_that_lost_its_lease_stops_renewing<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.always(Op::Renew, Fault::Fail);
    let first = {
        let (app, request) = (w.app.clone(), w.slow(5.0));
        tokio::spawn(async move { send(&app, request).await })
    };
    settle(w.part(1.2)).await;
    w.store.heal();
    let second = {
        let (app, request) = (w.app.clone(), w.slow(5.0));
        tokio::spawn(async move { send(&app, request).await })
    };
    // Both run; the first's next renewal finds the key taken over.
    settle(w.part(0.8)).await;
    let before = w.store.calls(Op::Renew);
    settle(w.part(2.0)).await;
    let renewed = w.store.calls(Op::Renew) - before;
    // Two leases of renewals every third of the lease: the second holder's six, and none of
    // the first's (it made six more when it renewed on).
    assert!(renewed <= 8, "{renewed} renewals in two leases");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(second.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(w.runs.get(), 2);
}

async fn a_failed_begin_answers_503_and_runs_nothing<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    for (n, fault) in [Fault::Fail, Fault::Hang].into_iter().enumerate() {
        w.store.times(Op::Begin, fault, 1);
        let request = || post_with_key("/payments", &format!("k{n}"), "{}");
        let reply = send(&w.app, request()).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
        assert_eq!(reply.code(), "idempotency_store_unavailable");
        assert!(reply.header("retry-after").is_some());
        assert_eq!(w.runs.get(), n);
        assert_eq!(send(&w.app, request()).await.status, StatusCode::CREATED);
        assert_eq!(w.runs.get(), n + 1);
    }
}

async fn a_begin_whose_reply_is_lost_holds_the_key_until_its_lease_ends<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store.times(Op::Begin, Fault::LoseReply, 1);
    assert_eq!(
        send(&w.app, payment()).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The record was written, but nobody holds it: 409 until the lease ends, then it runs once.
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CONFLICT);
    settle(w.part(1.1)).await;
    assert_eq!(send(&w.app, payment()).await.status, StatusCode::CREATED);
    assert!(send(&w.app, payment()).await.replayed());
    assert_eq!(w.runs.get(), 1);
}

async fn slow_store_calls_within_the_timeout_change_nothing<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    for op in [Op::Begin, Op::Complete] {
        w.store.always(op, Fault::Delay(STORE_TIMEOUT / 2));
    }
    let first = send(&w.app, payment()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&w.app, payment()).await;
    assert!(retry.replayed());
    assert_eq!(w.runs.get(), 1);
}

async fn fail_open_runs_unprotected_and_says_so<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    let app = w.fail_open_app();
    w.store.fail(true);
    for n in 1..=2 {
        let reply = send(&app, payment()).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(
            reply.header("idempotency-bypassed"),
            Some("store-unavailable")
        );
        assert_eq!(reply.outcome, Some(Outcome::Bypassed));
        assert_eq!(w.runs.get(), n, "unprotected: every request runs");
    }
    assert_eq!(
        w.store.calls(Op::Complete),
        0,
        "nothing is stored for a bypassed request"
    );
}

/// A record the store cannot decode may be a completed request's: failing open does not run
/// past it.
async fn a_record_the_store_cannot_decode_is_never_run_past<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    let app = w.fail_open_app();
    assert_eq!(send(&app, payment()).await.status, StatusCode::CREATED);
    w.store.always(Op::Begin, Fault::Corrupt);
    let retry = send(&app, payment()).await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.outcome, Some(Outcome::StoreError));
    assert_eq!(retry.header("idempotency-bypassed"), None);
    assert_eq!(w.runs.get(), 1, "the operation may have run: never again");
}

async fn a_request_dropped_while_its_response_is_being_stored_is_still_stored<S>(w: World<S>)
where
    S: IdempotencyStore + Clone,
{
    w.store
        .always(Op::Complete, Fault::Delay(Duration::from_millis(200)));
    let first = {
        let app = w.app.clone();
        tokio::spawn(async move { send(&app, payment()).await })
    };
    while w.store.calls(Op::Complete) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.abort(); // the client goes away while the response is being stored
    assert!(first.await.unwrap_err().is_cancelled());
    settle(Duration::from_millis(400)).await;
    let retry = send(&w.app, payment()).await;
    assert!(
        retry.replayed(),
        "the completion finished in the background"
    );
    assert_eq!(w.runs.get(), 1);
    assert_eq!(
        w.store.calls(Op::Complete),
        1,
        "the run, detached from its request, finished its own completion"
    );
}

/// Instantiates every case for every store.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        /// `MemoryStore`, on Tokio's paused clock.
        mod memory {
            use super::*;
            const LEASE: Duration = Duration::from_secs(6);
            $(
                #[tokio::test(start_paused = true)]
                async fn $case() {
                    super::$case(World::new(FaultyStore::default(), LEASE)).await;
                }
            )*
        }

        /// `RedisStore`, in real time: the lease is the server's key expiry.
        #[cfg(feature = "redis")]
        mod redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(store) = support::shared::redis().await else { return };
                    super::$case(World::new(FaultyStore::new(store), SHARED_LEASE)).await;
                }
            )*
        }

        /// `PostgresStore`, in real time: the lease is decided by the server's clock.
        #[cfg(feature = "postgres")]
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(store) = support::shared::postgres().await else { return };
                    super::$case(World::new(FaultyStore::new(store), SHARED_LEASE)).await;
                }
            )*
        }
    };
}

/// The lease on the shared stores, in real time: short, to keep the tests quick, and long
/// enough for a loaded machine to answer well within it.
#[cfg(any(feature = "redis", feature = "postgres"))]
const SHARED_LEASE: Duration = Duration::from_secs(2);

cases!(
    a_failed_complete_is_tried_again_in_the_background,
    a_complete_that_keeps_failing_holds_the_key_until_the_lease_ends,
    a_complete_that_hangs_times_out_like_a_failure,
    a_complete_whose_reply_is_lost_still_replays,
    a_failed_release_is_retried_in_the_background,
    a_release_that_keeps_failing_expires_with_the_lease,
    a_transient_renewal_failure_does_not_lose_the_lease,
    renewals_that_fail_in_a_row_are_tried_again_before_the_lease_ends,
    renewals_that_keep_failing_let_the_lease_lapse_and_fencing_protects_the_record,
    a_holder_that_lost_its_lease_stops_renewing,
    a_failed_begin_answers_503_and_runs_nothing,
    a_begin_whose_reply_is_lost_holds_the_key_until_its_lease_ends,
    slow_store_calls_within_the_timeout_change_nothing,
    fail_open_runs_unprotected_and_says_so,
    a_record_the_store_cannot_decode_is_never_run_past,
    a_request_dropped_while_its_response_is_being_stored_is_still_stored,
);
