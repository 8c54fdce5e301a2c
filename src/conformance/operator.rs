//! The operator calls: `lookup` reads a record without changing it, `forget` removes a live
//! completed record (an in-flight one only when forced).
//!
//! Both are optional for a store: a case whose store answers
//! [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported) prints that it was
//! skipped and passes.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::time::sleep;

use super::check::*;
use crate::store::{
    Forget, IdempotencyStore, RecordInfo, RecordKey, RecordState, StoreError, StoreErrorKind,
};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

/// How far a store's clock (a server's, for a shared store) may stand from this process's.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// `lookup` reads each state without changing it: none before `begin`, in flight with its
/// fingerprint and lease, completed with its status, replayability and expiry; none once
/// released, or once expired.
pub async fn lookup_reports_each_state<S: IdempotencyStore>(store: S) {
    let key = record("lookup");
    let fp = fingerprint("lookup");
    let Some(absent) = supported(store.lookup(&key).await, "lookup") else {
        return;
    };
    assert!(absent.is_none(), "lookup of a new key: expected None");

    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    let info = live(store.lookup(&key).await, "lookup in flight");
    assert_eq!(info.fingerprint, fp, "lookup in flight: fingerprint");
    match info.state {
        RecordState::InFlight { lease_until } => near(lease_until, LONG, "lease"),
        other => panic!("lookup in flight: expected InFlight, got {other:?}"),
    }
    in_flight(
        store.begin(&key, &fp, LONG).await,
        "begin after a lookup: the record is unchanged",
    );

    let ttl = Duration::from_secs(600);
    done(
        store
            .complete(&key, token, sample_response("lookup"), ttl)
            .await,
        "complete",
    );
    let info = live(store.lookup(&key).await, "lookup completed");
    assert_eq!(info.fingerprint, fp, "lookup completed: fingerprint");
    match info.state {
        RecordState::Completed {
            status,
            replayable,
            expires_at,
        } => {
            assert_eq!(status, StatusCode::CREATED, "lookup completed: status");
            assert!(
                replayable,
                "lookup completed: a stored response is replayable"
            );
            near(expires_at, ttl, "expiry");
        }
        other => panic!("lookup completed: expected Completed, got {other:?}"),
    }
    completed(
        store.begin(&key, &fp, LONG).await,
        "begin after a lookup: the response is still there",
    );

    let omitted = record("lookup-omitted");
    let token = acquired(store.begin(&omitted, &fp, LONG).await, "begin");
    let response = StoredResponse::omitted(StatusCode::OK);
    done(
        store.complete(&omitted, token, response, LONG).await,
        "complete without a body",
    );
    match live(
        store.lookup(&omitted).await,
        "lookup of an omitted response",
    )
    .state
    {
        RecordState::Completed {
            status, replayable, ..
        } => {
            assert_eq!(status, StatusCode::OK, "omitted response: status");
            assert!(!replayable, "an omitted response is not replayable");
        }
        other => panic!("omitted response: expected Completed, got {other:?}"),
    }

    let released = record("lookup-released");
    let token = acquired(store.begin(&released, &fp, LONG).await, "begin");
    done(store.release(&released, token).await, "release");
    gone(store.lookup(&released).await, "lookup after release");

    let expiring = record("lookup-expiry");
    let token = acquired(store.begin(&expiring, &fp, LONG).await, "begin");
    done(
        store
            .complete(&expiring, token, sample_response("expiry"), SHORT)
            .await,
        "complete with a short TTL",
    );
    let leased = record("lookup-lease");
    acquired(
        store.begin(&leased, &fp, SHORT).await,
        "begin with a short lease",
    );
    sleep(SHORT + MARGIN).await;
    gone(
        store.lookup(&expiring).await,
        "lookup after the TTL ran out",
    );
    gone(
        store.lookup(&leased).await,
        "lookup after the lease ran out",
    );
}

/// `forget` removes a completed record: the next `begin` acquires the key, even with another
/// fingerprint. A key with no live record (never used, already forgotten, expired) is
/// `NotFound`.
pub async fn forget_removes_a_completed_record<S: IdempotencyStore>(store: S) {
    let key = record("forget");
    let fp = fingerprint("forget");
    let Some(absent) = supported(store.forget(&key, false).await, "forget") else {
        return;
    };
    assert_eq!(absent, Forget::NotFound, "forget of a new key");

    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    done(
        store
            .complete(&key, token, sample_response("forget"), LONG)
            .await,
        "complete",
    );
    assert_eq!(
        outcome(store.forget(&key, false).await, "forget"),
        Forget::Forgotten,
        "forget of a completed record"
    );
    gone(store.lookup(&key).await, "lookup after forget");
    assert_eq!(
        outcome(store.forget(&key, false).await, "forget again"),
        Forget::NotFound,
        "forget of a forgotten record"
    );
    acquired(
        store.begin(&key, &fingerprint("forget-other"), LONG).await,
        "begin after forget, with another fingerprint",
    );

    let expiring = record("forget-expiry");
    let token = acquired(store.begin(&expiring, &fp, LONG).await, "begin");
    done(
        store
            .complete(&expiring, token, sample_response("expiry"), SHORT)
            .await,
        "complete with a short TTL",
    );
    sleep(SHORT + MARGIN).await;
    assert_eq!(
        outcome(store.forget(&expiring, false).await, "forget expired"),
        Forget::NotFound,
        "forget of an expired record"
    );
}

/// `forget` leaves a live in-flight record alone and says so; forced, it removes it, and the
/// holder's token is then refused. An in-flight record whose lease ran out is `NotFound`.
pub async fn forget_in_flight_needs_force<S: IdempotencyStore>(store: S) {
    let key = record("forget-in-flight");
    let fp = fingerprint("forget-in-flight");
    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    let Some(result) = supported(store.forget(&key, false).await, "forget") else {
        return;
    };
    assert_eq!(result, Forget::InFlight, "forget of an in-flight record");
    in_flight(
        store.begin(&key, &fp, LONG).await,
        "the holder keeps the record",
    );
    done(
        store.renew(&key, token, LONG).await,
        "the holder still renews",
    );

    assert_eq!(
        outcome(store.forget(&key, true).await, "forced forget"),
        Forget::Forgotten,
        "forced forget of an in-flight record"
    );
    gone(store.lookup(&key).await, "lookup after a forced forget");
    lease_lost(
        store
            .complete(&key, token, sample_response("late"), LONG)
            .await,
        "complete by the holder of a forgotten record",
    );
    let next = acquired(
        store.begin(&key, &fp, LONG).await,
        "begin after a forced forget",
    );
    assert_ne!(next, token, "a forgotten record's key gets a new token");

    let dead = record("forget-dead-holder");
    acquired(
        store.begin(&dead, &fp, SHORT).await,
        "begin with a short lease",
    );
    sleep(SHORT + MARGIN).await;
    assert_eq!(
        outcome(store.forget(&dead, false).await, "forget after the lease"),
        Forget::NotFound,
        "forget of an in-flight record whose lease ran out"
    );
}

/// `lookup` and `forget` see only their own tenant's record of a key.
pub async fn operator_calls_respect_tenants<S: IdempotencyStore>(store: S) {
    let key = unique("operator-tenants");
    let ours = RecordKey::new(TenantId::hashed(unique("ours")), key.clone());
    let theirs = RecordKey::new(TenantId::hashed(unique("theirs")), key);
    let fp = fingerprint("operator-tenants");
    let token = acquired(store.begin(&ours, &fp, LONG).await, "begin");
    done(
        store
            .complete(&ours, token, sample_response("tenants"), LONG)
            .await,
        "complete",
    );
    let Some(other) = supported(store.lookup(&theirs).await, "lookup") else {
        return;
    };
    assert!(other.is_none(), "lookup in another tenant: expected None");
    assert_eq!(
        outcome(
            store.forget(&theirs, true).await,
            "forget in another tenant"
        ),
        Forget::NotFound,
        "forget in another tenant"
    );
    live(store.lookup(&ours).await, "our record is untouched");
}

/// `Some(value)`, or `None` after printing that the case is skipped when the store does not
/// implement the call.
fn supported<T>(result: Result<T, StoreError>, call: &str) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) if err.kind() == StoreErrorKind::Unsupported => {
            eprintln!("the store does not implement `{call}`: case skipped");
            None
        }
        Err(err) => panic!("{call}: expected Ok, got Err({err})"),
    }
}

fn live(result: Result<Option<RecordInfo>, StoreError>, what: &str) -> RecordInfo {
    match result {
        Ok(Some(info)) => info,
        Ok(None) => panic!("{what}: expected a record, got None"),
        Err(err) => panic!("{what}: expected a record, got Err({err})"),
    }
}

fn gone(result: Result<Option<RecordInfo>, StoreError>, what: &str) {
    match result {
        Ok(None) => {}
        Ok(Some(info)) => panic!("{what}: expected None, got {info:?}"),
        Err(err) => panic!("{what}: expected None, got Err({err})"),
    }
}

fn outcome(result: Result<Forget, StoreError>, what: &str) -> Forget {
    result.unwrap_or_else(|err| panic!("{what}: expected Ok, got Err({err})"))
}

/// Asserts that `at` is `after` from now, give or take the clock skew allowed.
fn near(at: SystemTime, after: Duration, what: &str) {
    let expected = SystemTime::now() + after;
    let off = match at.duration_since(expected) {
        Ok(late) => late,
        Err(early) => early.duration(),
    };
    assert!(
        off <= CLOCK_SKEW,
        "{what}: expected about {after:?} from now, off by {off:?}"
    );
}
