//! What the cases share: keys, fingerprints, sample responses, races, and assertions that
//! say what was expected.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

use crate::fingerprint::Fingerprint;
use crate::store::{Begin, IdempotencyStore, LockToken, RecordKey, StoreError, StoreErrorKind};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

/// A lease long enough never to run out during a case.
pub(super) const LONG: Duration = Duration::from_secs(120);
/// The lease or TTL of the expiry cases.
pub(super) const SHORT: Duration = Duration::from_millis(300);
/// How long past an expiry the cases wait before they rely on it.
pub(super) const MARGIN: Duration = Duration::from_millis(300);
/// How many callers race on one key.
pub(super) const CALLERS: usize = 200;

/// Completes a new record with `response` and checks the replay.
pub(super) async fn round_trip<S: IdempotencyStore>(
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

pub(super) async fn race<S: IdempotencyStore>(
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

pub(super) fn exactly_one_acquired(results: &[Result<Begin, StoreError>], what: &str) -> LockToken {
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
pub(super) fn unique(label: &str) -> String {
    format!("conformance-{label}-{}", LockToken::random())
}

/// A record key of a fresh tenant.
pub(super) fn record(label: &str) -> RecordKey {
    RecordKey::new(TenantId::hashed(unique(label)), unique(label))
}

pub(super) fn fingerprint(seed: &str) -> Fingerprint {
    Fingerprint::from_bytes(Sha256::digest(seed.as_bytes()).into())
}

pub(super) fn sample_response(label: &str) -> StoredResponse {
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

pub(super) fn describe(result: &Result<Begin, StoreError>) -> String {
    match result {
        Ok(Begin::Acquired(token)) => format!("Acquired({token})"),
        Ok(Begin::InFlight) => "InFlight".to_owned(),
        Ok(Begin::Completed(response)) => format!("Completed({})", response.status()),
        Ok(Begin::Mismatch) => "Mismatch".to_owned(),
        Err(err) => format!("Err({err})"),
    }
}

pub(super) fn acquired(result: Result<Begin, StoreError>, what: &str) -> LockToken {
    match result {
        Ok(Begin::Acquired(token)) => token,
        other => panic!("{what}: expected Acquired, got {}", describe(&other)),
    }
}

pub(super) fn in_flight(result: Result<Begin, StoreError>, what: &str) {
    if !matches!(result, Ok(Begin::InFlight)) {
        panic!("{what}: expected InFlight, got {}", describe(&result));
    }
}

pub(super) fn mismatch(result: Result<Begin, StoreError>, what: &str) {
    if !matches!(result, Ok(Begin::Mismatch)) {
        panic!("{what}: expected Mismatch, got {}", describe(&result));
    }
}

pub(super) fn completed(result: Result<Begin, StoreError>, what: &str) -> StoredResponse {
    match result {
        Ok(Begin::Completed(response)) => response,
        other => panic!("{what}: expected Completed, got {}", describe(&other)),
    }
}

pub(super) fn done(result: Result<(), StoreError>, what: &str) {
    if let Err(err) = result {
        panic!("{what}: expected Ok, got Err({err})");
    }
}

pub(super) fn lease_lost(result: Result<(), StoreError>, what: &str) {
    match result {
        Err(err) if err.kind() == StoreErrorKind::LeaseLost => {}
        Err(err) => panic!("{what}: expected LeaseLost, got Err({err})"),
        Ok(()) => panic!("{what}: expected LeaseLost, got Ok"),
    }
}

/// Compares two responses field by field, without printing megabytes of body on failure.
pub(super) fn same_response(got: &StoredResponse, want: &StoredResponse, what: &str) {
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
    assert_eq!(got.trailers(), want.trailers(), "{what}: trailers");
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
