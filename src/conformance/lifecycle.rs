//! The lifecycle of a record: atomic begin, mismatch, release, lease expiry and takeover,
//! fencing, renewal, completion and TTL.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};

use super::check::*;
use crate::store::{IdempotencyStore, LockToken};

/// 200 callers race `begin` on one key: exactly one is `Acquired`, every other one `InFlight`.
/// Once completed, 200 racing callers all get the response.
pub async fn begin_is_atomic<S: IdempotencyStore>(store: S) {
    let store = Arc::new(store);
    let key = record("atomic");
    let fp = fingerprint("atomic");
    let results = race(&store, &key, fp, LONG).await;
    let token = exactly_one_acquired(&results, "200 racing callers on a new key");

    let response = sample_response("atomic");
    done(
        store.complete(&key, token, response.clone(), LONG).await,
        "complete",
    );
    for result in race(&store, &key, fp, LONG).await {
        same_response(
            &completed(result, "racing on a completed key"),
            &response,
            "replay",
        );
    }
}

/// 200 callers race to take over an in-flight record whose lease ran out: exactly one wins.
pub async fn takeover_is_atomic<S: IdempotencyStore>(store: S) {
    let store = Arc::new(store);
    let key = record("takeover-race");
    let fp = fingerprint("takeover-race");
    acquired(store.begin(&key, &fp, SHORT).await, "first holder");
    sleep(SHORT + MARGIN).await;
    let results = race(&store, &key, fp, LONG).await;
    exactly_one_acquired(&results, "200 callers racing to take over an expired lease");
}

/// A live record with another fingerprint is a `Mismatch`, in flight and completed; the
/// mismatch does not disturb the holder.
pub async fn mismatch_in_flight_and_completed<S: IdempotencyStore>(store: S) {
    let key = record("mismatch");
    let (fp, other) = (fingerprint("mismatch-a"), fingerprint("mismatch-b"));
    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    mismatch(
        store.begin(&key, &other, LONG).await,
        "other fingerprint, in flight",
    );
    in_flight(
        store.begin(&key, &fp, LONG).await,
        "same fingerprint, in flight",
    );
    let response = sample_response("mismatch");
    done(
        store.complete(&key, token, response.clone(), LONG).await,
        "complete after a mismatch",
    );
    mismatch(
        store.begin(&key, &other, LONG).await,
        "other fingerprint, completed",
    );
    same_response(
        &completed(store.begin(&key, &fp, LONG).await, "replay"),
        &response,
        "replay",
    );
}

/// A released key is free: the next `begin` acquires it with a new token, even with another
/// fingerprint, and the released token can no longer complete, renew or release.
pub async fn release_then_reacquire<S: IdempotencyStore>(store: S) {
    let key = record("release");
    let fp = fingerprint("release");
    let first = acquired(store.begin(&key, &fp, LONG).await, "begin");
    done(store.release(&key, first).await, "release");
    let second = acquired(store.begin(&key, &fp, LONG).await, "begin after release");
    assert_ne!(first, second, "a re-acquired record must get a new token");
    lease_lost(
        store.release(&key, first).await,
        "second release with the old token",
    );
    lease_lost(
        store.renew(&key, first, LONG).await,
        "renew with the released token",
    );
    let stale = sample_response("stale");
    lease_lost(
        store.complete(&key, first, stale, LONG).await,
        "complete with the released token",
    );
    in_flight(
        store.begin(&key, &fp, LONG).await,
        "the new holder is intact",
    );
    done(
        store.release(&key, second).await,
        "release by the new holder",
    );

    let other = fingerprint("release-other");
    acquired(
        store.begin(&key, &other, LONG).await,
        "another fingerprint after release",
    );
}

/// `renew`, `complete` and `release` of a record that does not exist fail with `LeaseLost`
/// and create nothing.
pub async fn unknown_records_are_lease_lost<S: IdempotencyStore>(store: S) {
    let key = record("unknown");
    let token = LockToken::random();
    lease_lost(
        store.renew(&key, token, LONG).await,
        "renew of a missing record",
    );
    let response = sample_response("unknown");
    lease_lost(
        store.complete(&key, token, response, LONG).await,
        "complete of a missing record",
    );
    lease_lost(
        store.release(&key, token).await,
        "release of a missing record",
    );
    acquired(
        store.begin(&key, &fingerprint("unknown"), LONG).await,
        "nothing was created",
    );
}

/// An in-flight record whose lease ran out (its holder died) is taken over by the next
/// `begin`, whatever its fingerprint; the new holder's fingerprint then binds the key.
pub async fn lease_expiry_allows_takeover<S: IdempotencyStore>(store: S) {
    let key = record("expiry");
    let (fp, other) = (fingerprint("expiry-a"), fingerprint("expiry-b"));
    let started = Instant::now();
    let first = acquired(
        store.begin(&key, &fp, SHORT).await,
        "begin with a short lease",
    );
    let acquired_at = Instant::now();
    let result = store.begin(&key, &fp, SHORT).await;
    if started.elapsed() < SHORT / 2 {
        in_flight(result, "before the lease ran out");
    }
    sleep_until(acquired_at + SHORT + MARGIN).await;
    let second = acquired(
        store.begin(&key, &other, LONG).await,
        "after the lease ran out",
    );
    assert_ne!(first, second, "a taken-over record must get a new token");
    mismatch(
        store.begin(&key, &fp, LONG).await,
        "the old fingerprint after the takeover",
    );
    in_flight(
        store.begin(&key, &other, LONG).await,
        "the new holder's fingerprint",
    );
}

/// After a takeover, the old holder's token can neither renew, complete nor release, and the
/// new holder's record is left intact.
pub async fn fencing_after_takeover<S: IdempotencyStore>(store: S) {
    let key = record("fencing");
    let fp = fingerprint("fencing");
    let old = acquired(store.begin(&key, &fp, SHORT).await, "first holder");
    sleep(SHORT + MARGIN).await;
    let new = acquired(store.begin(&key, &fp, LONG).await, "takeover");

    lease_lost(
        store.renew(&key, old, LONG).await,
        "renew by the old holder",
    );
    let stale = sample_response("stale");
    lease_lost(
        store.complete(&key, old, stale, LONG).await,
        "complete by the old holder",
    );
    lease_lost(store.release(&key, old).await, "release by the old holder");

    in_flight(
        store.begin(&key, &fp, LONG).await,
        "the new holder's record is intact",
    );
    mismatch(
        store.begin(&key, &fingerprint("fencing-other"), LONG).await,
        "fingerprint kept",
    );
    done(
        store.renew(&key, new, LONG).await,
        "renew by the new holder",
    );
    let response = sample_response("fencing");
    done(
        store.complete(&key, new, response.clone(), LONG).await,
        "complete by the new holder",
    );
    same_response(
        &completed(store.begin(&key, &fp, LONG).await, "replay"),
        &response,
        "replay",
    );
}

/// Renewing keeps a record in flight well past its original lease; once renewing stops, the
/// lease runs out and the key can be taken over.
pub async fn renew_extends_the_lease<S: IdempotencyStore>(store: S) {
    const LEASE: Duration = Duration::from_millis(400);
    let key = record("renew");
    let fp = fingerprint("renew");
    let started = Instant::now();
    let token = acquired(store.begin(&key, &fp, LEASE).await, "begin");
    while started.elapsed() < LEASE * 3 {
        sleep(Duration::from_millis(100)).await;
        done(store.renew(&key, token, LEASE).await, "renew");
        in_flight(store.begin(&key, &fp, LEASE).await, "after a renewal");
    }
    let renewed_at = Instant::now();
    in_flight(
        store.begin(&key, &fp, LEASE).await,
        "past the original lease",
    );
    sleep_until(renewed_at + LEASE + MARGIN).await;
    acquired(store.begin(&key, &fp, LONG).await, "after renewals stopped");
}

/// A completed record outlives the lease it was acquired with, and is final: its token can no
/// longer renew, complete or release it.
pub async fn completed_record_is_final<S: IdempotencyStore>(store: S) {
    let key = record("final");
    let fp = fingerprint("final");
    let token = acquired(
        store.begin(&key, &fp, SHORT).await,
        "begin with a short lease",
    );
    let response = sample_response("final");
    done(
        store.complete(&key, token, response.clone(), LONG).await,
        "complete",
    );
    sleep(SHORT + MARGIN).await;
    same_response(
        &completed(store.begin(&key, &fp, LONG).await, "after the lease"),
        &response,
        "replay",
    );
    lease_lost(
        store.renew(&key, token, LONG).await,
        "renew of a completed record",
    );
    lease_lost(
        store.release(&key, token).await,
        "release of a completed record",
    );
    let other = sample_response("other");
    lease_lost(
        store.complete(&key, token, other, LONG).await,
        "second complete",
    );
    same_response(
        &completed(store.begin(&key, &fp, LONG).await, "replay"),
        &response,
        "replay",
    );
}

/// A completed record expires its TTL after completion, not after its `begin`: a handler
/// slower than the TTL still has its response replayed; the key is then free, even for another
/// fingerprint.
pub async fn ttl_expiry_after_complete<S: IdempotencyStore>(store: S) {
    let key = record("ttl");
    let fp = fingerprint("ttl");
    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    // The handler runs for longer than the TTL.
    sleep(SHORT + MARGIN).await;
    let completing = Instant::now();
    done(
        store
            .complete(&key, token, sample_response("ttl"), SHORT)
            .await,
        "complete",
    );
    let completed_at = Instant::now();
    let result = store.begin(&key, &fp, LONG).await;
    if completing.elapsed() < SHORT / 2 {
        completed(result, "before the TTL ran out, counted from completion");
    }
    sleep_until(completed_at + SHORT + MARGIN).await;
    acquired(
        store.begin(&key, &fingerprint("ttl-other"), LONG).await,
        "after the TTL ran out",
    );
}
