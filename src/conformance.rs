//! A conformance suite for [`IdempotencyStore`] implementations: the behaviour the layer relies
//! on, checked against a real store.
//!
//! Every store of this crate passes it (`MemoryStore` with no server, `RedisStore` and
//! `PostgresStore` against real servers), and so should yours. Enable the `conformance` feature
//! in your dev-dependencies:
//!
//! ```toml
//! [dev-dependencies]
//! tower-idempotency = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! Then, in a test file, generate one `#[test]` per case with
//! [`conformance_tests!`](crate::conformance_tests), from an async function that builds your
//! store, or returns `None` to skip the suite (for example when the URL of its server is not
//! set):
//!
//! ```no_run
//! use tower_idempotency::MemoryStore;
//!
//! async fn store() -> Option<MemoryStore> {
//!     // e.g. std::env::var("MY_STORE_URL").ok()?, then connect
//!     Some(MemoryStore::new())
//! }
//!
//! mod conformance {
//!     tower_idempotency::conformance_tests!(super::store);
//! }
//! # fn main() {}
//! ```
//!
//! Or run every case in one test with [`run_all`], or pick cases: each is a public async
//! function taking the store.
//!
//! # What the cases need
//!
//! - Each case runs on its own multi-threaded Tokio runtime ([`run_case`]) and spawns tasks.
//! - Cases use fresh, random keys and tenants, so they can run at once against one shared
//!   server, and leave only records that expire within a few minutes.
//! - Expiry cases use real leases and TTLs of 300 ms and sleep past them: a shared store keeps
//!   time on its server, so Tokio's paused clock cannot drive it. The whole suite takes a few
//!   seconds.
//! - The store must be atomic per record key across threads and connections: one case races
//!   200 callers on one key.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tokio::time::{Instant, sleep, sleep_until};

use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::{Begin, IdempotencyStore, LockToken, RecordKey, StoreError, StoreErrorKind};
use crate::tenant::TenantId;

/// A lease long enough never to run out during a case.
const LONG: Duration = Duration::from_secs(120);
/// The lease or TTL of the expiry cases.
const SHORT: Duration = Duration::from_millis(300);
/// How long past an expiry the cases wait before they rely on it.
const MARGIN: Duration = Duration::from_millis(300);
/// How many callers race on one key.
const CALLERS: usize = 200;

/// Generates one `#[test]` per conformance case, each running on its own multi-threaded Tokio
/// runtime with a store built by `$make`: a path to an `async fn() -> Option<S>` (or any
/// expression that calls like one). When it returns `None`, the case prints that it was
/// skipped and passes.
///
/// Invoke it inside a module of its own, as the generated functions are named after the cases.
/// See the [module documentation](crate::conformance) for an example.
#[macro_export]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
macro_rules! conformance_tests {
    ($make:expr $(,)?) => {
        $crate::__conformance_tests!(
            $make;
            begin_is_atomic,
            takeover_is_atomic,
            replay_is_exact,
            status_codes_round_trip,
            omitted_response_round_trips,
            empty_response_round_trips,
            mismatch_in_flight_and_completed,
            release_then_reacquire,
            unknown_records_are_lease_lost,
            lease_expiry_allows_takeover,
            fencing_after_takeover,
            renew_extends_the_lease,
            completed_record_is_final,
            ttl_expiry_after_complete,
            large_body_round_trips,
            binary_body_round_trips,
            many_headers_round_trip,
            keys_with_every_visible_ascii_char,
            tenants_do_not_meet,
            distinct_keys_are_independent,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::run_case(
                    stringify!($case),
                    $make,
                    $crate::conformance::$case,
                );
            }
        )*
    };
}

/// Runs every case, one after the other, on clones of `store`. Panics at the first failure.
///
/// Needs a multi-threaded Tokio runtime with time enabled
/// (`#[tokio::test(flavor = "multi_thread")]`).
pub async fn run_all<S: IdempotencyStore + Clone>(store: S) {
    begin_is_atomic(store.clone()).await;
    takeover_is_atomic(store.clone()).await;
    replay_is_exact(store.clone()).await;
    status_codes_round_trip(store.clone()).await;
    omitted_response_round_trips(store.clone()).await;
    empty_response_round_trips(store.clone()).await;
    mismatch_in_flight_and_completed(store.clone()).await;
    release_then_reacquire(store.clone()).await;
    unknown_records_are_lease_lost(store.clone()).await;
    lease_expiry_allows_takeover(store.clone()).await;
    fencing_after_takeover(store.clone()).await;
    renew_extends_the_lease(store.clone()).await;
    completed_record_is_final(store.clone()).await;
    ttl_expiry_after_complete(store.clone()).await;
    large_body_round_trips(store.clone()).await;
    binary_body_round_trips(store.clone()).await;
    many_headers_round_trip(store.clone()).await;
    keys_with_every_visible_ascii_char(store.clone()).await;
    tenants_do_not_meet(store.clone()).await;
    distinct_keys_are_independent(store).await;
}

/// Runs one case on a new multi-threaded Tokio runtime (4 workers, time and I/O enabled), with
/// the store that `make` builds; prints that the case was skipped when `make` returns `None`.
/// [`conformance_tests!`](crate::conformance_tests) calls this for each case.
pub fn run_case<S, M, MF, C, CF>(name: &str, make: M, case: C)
where
    S: IdempotencyStore,
    M: FnOnce() -> MF,
    MF: Future<Output = Option<S>>,
    C: FnOnce(S) -> CF,
    CF: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("failed to build a Tokio runtime");
    runtime.block_on(async move {
        match make().await {
            Some(store) => case(store).await,
            None => eprintln!("conformance case `{name}` skipped: no store to test"),
        }
    });
}

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

/// A completed record replays its response exactly: status, every header in order (three
/// `Set-Cookie` included), body bytes. Replaying does not consume it.
pub async fn replay_is_exact<S: IdempotencyStore>(store: S) {
    let key = record("replay");
    let fp = fingerprint("replay");
    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
    let response = sample_response("replay");
    done(
        store.complete(&key, token, response.clone(), LONG).await,
        "complete",
    );
    for attempt in ["first replay", "second replay"] {
        let replayed = completed(store.begin(&key, &fp, LONG).await, attempt);
        same_response(&replayed, &response, attempt);
        let cookies: Vec<_> = replayed.headers().get_all("set-cookie").iter().collect();
        assert_eq!(
            cookies,
            ["a=1; Path=/", "b=2", "a=3"],
            "{attempt}: Set-Cookie values"
        );
    }
}

/// Statuses round-trip as they were: a `201` stays `201`, a `404` stays `404`.
pub async fn status_codes_round_trip<S: IdempotencyStore>(store: S) {
    for code in [200, 201, 204, 302, 404, 418, 999] {
        let status = StatusCode::from_u16(code).expect("a valid status");
        let body = Bytes::from(format!("status {code}"));
        let response = StoredResponse::new(status, HeaderMap::new(), body);
        round_trip(&store, &format!("status-{code}"), &response).await;
    }
}

/// A response too large to store round-trips as "omitted", with its status.
pub async fn omitted_response_round_trips<S: IdempotencyStore>(store: S) {
    let back = round_trip(
        &store,
        "omitted",
        &StoredResponse::omitted(StatusCode::CREATED),
    )
    .await;
    assert!(
        back.is_omitted(),
        "an omitted response came back as a full one"
    );
}

/// A response with no header and an empty body round-trips.
pub async fn empty_response_round_trips<S: IdempotencyStore>(store: S) {
    let response = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
    round_trip(&store, "empty", &response).await;
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

/// A completed record expires its TTL after completion; the key is then free, even for
/// another fingerprint.
pub async fn ttl_expiry_after_complete<S: IdempotencyStore>(store: S) {
    let key = record("ttl");
    let fp = fingerprint("ttl");
    let token = acquired(store.begin(&key, &fp, LONG).await, "begin");
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
        completed(result, "before the TTL ran out");
    }
    sleep_until(completed_at + SHORT + MARGIN).await;
    acquired(
        store.begin(&key, &fingerprint("ttl-other"), LONG).await,
        "after the TTL ran out",
    );
}

/// A 1 MiB body round-trips byte for byte.
pub async fn large_body_round_trips<S: IdempotencyStore>(store: S) {
    let body: Vec<u8> = (0..1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from(body));
    round_trip(&store, "large", &response).await;
}

/// A body holding every byte value, NUL and invalid UTF-8 included, round-trips exactly.
pub async fn binary_body_round_trips<S: IdempotencyStore>(store: S) {
    let mut body: Vec<u8> = (0..=255).collect();
    body.extend((0..=255u8).rev());
    body.extend_from_slice(b"\0\0\xff\xfe\r\n\x1b");
    let response = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::from(body));
    round_trip(&store, "binary", &response).await;
}

/// 100 headers, repeated ones and non-ASCII (obs-text) values included, round-trip in order.
pub async fn many_headers_round_trip<S: IdempotencyStore>(store: S) {
    let mut headers = HeaderMap::new();
    for i in 0..90 {
        let name = HeaderName::try_from(format!("x-header-{i:03}")).expect("a valid name");
        headers.insert(name, HeaderValue::from(i));
    }
    for i in 0..8 {
        headers.append(
            "set-cookie",
            HeaderValue::from_str(&format!("c{i}={i}")).expect("valid"),
        );
    }
    headers.insert("x-empty", HeaderValue::from_static(""));
    headers.insert(
        "x-obs-text",
        HeaderValue::from_bytes(b"caf\xe9 \x80\xff").expect("valid"),
    );
    assert_eq!(headers.len(), 100);
    let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from_static(b"ok"));
    round_trip(&store, "headers", &response).await;
}

/// Keys made of every visible ASCII character (`{`, `}`, `:` included) are stored as they are,
/// and keys that differ only in them never meet.
pub async fn keys_with_every_visible_ascii_char<S: IdempotencyStore>(store: S) {
    let tenant = TenantId::from_bytes(unique("ascii"));
    let every: String = (0x21..=0x7e_u8).map(char::from).collect();
    let longest: String = every.chars().cycle().take(crate::MAX_KEY_LEN).collect();
    let keys = [
        every.as_str(),
        longest.as_str(),
        "{",
        "}",
        ":",
        "{}",
        "}{",
        "a:b",
        "a}:{b",
        "{a}",
        "a",
        "\"quoted\"",
        "\\",
        "%s%n",
        "'; --",
        "*?[]",
    ];
    let mut responses = Vec::new();
    for key in keys {
        let record = RecordKey::new(tenant, key);
        let fp = fingerprint(key);
        let token = acquired(store.begin(&record, &fp, LONG).await, key);
        let response = StoredResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(key.to_owned()),
        );
        done(
            store.complete(&record, token, response.clone(), LONG).await,
            key,
        );
        responses.push((record, fp, response));
    }
    for (record, fp, response) in &responses {
        let replayed = completed(store.begin(record, fp, LONG).await, record.key());
        same_response(&replayed, response, record.key());
    }
}

/// Two tenants with the same key have two records that never meet.
pub async fn tenants_do_not_meet<S: IdempotencyStore>(store: S) {
    let key = unique("tenants");
    let (a, b) = (
        RecordKey::new(TenantId::from_bytes(unique("tenant-a")), key.as_str()),
        RecordKey::new(TenantId::from_bytes(unique("tenant-b")), key.as_str()),
    );
    let (fp_a, fp_b) = (fingerprint("tenant-a"), fingerprint("tenant-b"));
    let token_a = acquired(store.begin(&a, &fp_a, LONG).await, "tenant a");
    let token_b = acquired(store.begin(&b, &fp_b, LONG).await, "tenant b, same key");
    lease_lost(
        store.release(&a, token_b).await,
        "tenant b's token on tenant a's record",
    );
    let (response_a, response_b) = (sample_response("tenant-a"), sample_response("tenant-b"));
    done(
        store.complete(&a, token_a, response_a.clone(), LONG).await,
        "complete a",
    );
    in_flight(
        store.begin(&b, &fp_b, LONG).await,
        "tenant b still in flight",
    );
    done(
        store.complete(&b, token_b, response_b.clone(), LONG).await,
        "complete b",
    );
    same_response(
        &completed(store.begin(&a, &fp_a, LONG).await, "a"),
        &response_a,
        "tenant a",
    );
    same_response(
        &completed(store.begin(&b, &fp_b, LONG).await, "b"),
        &response_b,
        "tenant b",
    );
}

/// 50 keys acquired at once are all acquired: records of different keys never block each other.
pub async fn distinct_keys_are_independent<S: IdempotencyStore>(store: S) {
    let store = Arc::new(store);
    let fp = fingerprint("distinct");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            let key = record(&format!("distinct-{i}"));
            tokio::spawn(async move { store.begin(&key, &fp, LONG).await })
        })
        .collect();
    for task in tasks {
        acquired(
            task.await.expect("task panicked"),
            "one of 50 distinct keys",
        );
    }
}

/// Completes a new record with `response` and checks the replay.
async fn round_trip<S: IdempotencyStore>(
    store: &S,
    label: &str,
    response: &StoredResponse,
) -> StoredResponse {
    let key = record(label);
    let fp = fingerprint(label);
    let token = acquired(store.begin(&key, &fp, LONG).await, label);
    done(
        store.complete(&key, token, response.clone(), LONG).await,
        label,
    );
    let replayed = completed(store.begin(&key, &fp, LONG).await, label);
    same_response(&replayed, response, label);
    replayed
}

async fn race<S: IdempotencyStore>(
    store: &Arc<S>,
    key: &RecordKey,
    fp: Fingerprint,
    lease: Duration,
) -> Vec<Result<Begin, StoreError>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.begin(&key, &fp, lease).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(CALLERS);
    for task in tasks {
        results.push(task.await.expect("a racing task panicked"));
    }
    results
}

fn exactly_one_acquired(results: &[Result<Begin, StoreError>], what: &str) -> LockToken {
    let mut tokens = Vec::new();
    let mut in_flight = 0;
    for result in results {
        match result {
            Ok(Begin::Acquired(token)) => tokens.push(*token),
            Ok(Begin::InFlight) => in_flight += 1,
            other => panic!(
                "{what}: expected Acquired or InFlight, got {}",
                describe(other)
            ),
        }
    }
    assert_eq!(
        tokens.len(),
        1,
        "{what}: {} callers acquired the key",
        tokens.len()
    );
    assert_eq!(
        in_flight,
        results.len() - 1,
        "{what}: the others must be InFlight"
    );
    tokens[0]
}

/// A unique label: cases share servers, and a server outlives test runs.
fn unique(label: &str) -> String {
    format!("conformance-{label}-{}", LockToken::random())
}

/// A record key of a fresh tenant.
fn record(label: &str) -> RecordKey {
    RecordKey::new(TenantId::from_bytes(unique(label)), unique(label))
}

fn fingerprint(seed: &str) -> Fingerprint {
    Fingerprint::from_bytes(Sha256::digest(seed.as_bytes()).into())
}

fn sample_response(label: &str) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("location", HeaderValue::from_static("/payments/1"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1; Path=/"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    headers.append("set-cookie", HeaderValue::from_static("a=3"));
    headers.insert("x-custom", HeaderValue::from_static("custom-value"));
    let body = format!(r#"{{"label":"{label}","amount":100}}"#);
    StoredResponse::new(StatusCode::CREATED, headers, Bytes::from(body))
}

fn describe(result: &Result<Begin, StoreError>) -> String {
    match result {
        Ok(Begin::Acquired(token)) => format!("Acquired({token})"),
        Ok(Begin::InFlight) => "InFlight".to_owned(),
        Ok(Begin::Completed(response)) => format!("Completed({})", response.status()),
        Ok(Begin::Mismatch) => "Mismatch".to_owned(),
        Err(err) => format!("Err({err})"),
    }
}

fn acquired(result: Result<Begin, StoreError>, what: &str) -> LockToken {
    match result {
        Ok(Begin::Acquired(token)) => token,
        other => panic!("{what}: expected Acquired, got {}", describe(&other)),
    }
}

fn in_flight(result: Result<Begin, StoreError>, what: &str) {
    if !matches!(result, Ok(Begin::InFlight)) {
        panic!("{what}: expected InFlight, got {}", describe(&result));
    }
}

fn mismatch(result: Result<Begin, StoreError>, what: &str) {
    if !matches!(result, Ok(Begin::Mismatch)) {
        panic!("{what}: expected Mismatch, got {}", describe(&result));
    }
}

fn completed(result: Result<Begin, StoreError>, what: &str) -> StoredResponse {
    match result {
        Ok(Begin::Completed(response)) => response,
        other => panic!("{what}: expected Completed, got {}", describe(&other)),
    }
}

fn done(result: Result<(), StoreError>, what: &str) {
    if let Err(err) = result {
        panic!("{what}: expected Ok, got Err({err})");
    }
}

fn lease_lost(result: Result<(), StoreError>, what: &str) {
    match result {
        Err(err) if err.kind() == StoreErrorKind::LeaseLost => {}
        Err(err) => panic!("{what}: expected LeaseLost, got Err({err})"),
        Ok(()) => panic!("{what}: expected LeaseLost, got Ok"),
    }
}

/// Compares two responses field by field, without printing megabytes of body on failure.
fn same_response(got: &StoredResponse, want: &StoredResponse, what: &str) {
    assert_eq!(got.status(), want.status(), "{what}: status");
    assert_eq!(got.is_omitted(), want.is_omitted(), "{what}: omitted flag");
    let names = |r: &StoredResponse| r.headers().keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: header names, in order");
    for name in want.headers().keys() {
        let values = |r: &StoredResponse| {
            r.headers()
                .get_all(name)
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            values(got),
            values(want),
            "{what}: values of {name}, in order"
        );
    }
    assert_eq!(
        got.headers().len(),
        want.headers().len(),
        "{what}: header count"
    );
    assert_eq!(got.body().len(), want.body().len(), "{what}: body length");
    if let Some(at) = got
        .body()
        .iter()
        .zip(want.body().iter())
        .position(|(a, b)| a != b)
    {
        panic!("{what}: bodies differ first at byte {at}");
    }
}
