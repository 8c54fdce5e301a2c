//! Looking keys up and forgetting them (`Operator`), through a real layer: on a small in-test
//! store that implements every call, and on every store of the crate (PostgreSQL and Redis
//! when `POSTGRES_URL` and `REDIS_URL` are set: run through `scripts/test-services`). The in-test store also runs the conformance suite, operator cases
//! included.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, request::Parts};
use support::{Runs, api, send, unique_key};
use tower_idempotency::{
    Begin, DefaultTenant, Fingerprint, Forget, IdempotencyLayer, IdempotencyStore, LockToken,
    MemoryStore, Operator, OperatorError, RecordInfo, RecordKey, RecordState, StoreError,
    StoreErrorKind, StoredResponse, TenantExtractor, TenantFromExtension, TenantFromHeader,
    TenantId,
};

// ---- An in-test store with every call, `lookup` and `forget` included ------------------------

enum State {
    InFlight(LockToken),
    Completed(StoredResponse),
}

struct Record {
    fingerprint: Fingerprint,
    state: State,
    until: SystemTime,
}

/// The store the trait's documentation sketches, plus the operator calls.
#[derive(Clone, Default)]
struct MapStore(Arc<Mutex<HashMap<RecordKey, Record>>>);

impl MapStore {
    fn live<R>(&self, key: &RecordKey, read: impl FnOnce(Option<&mut Record>) -> R) -> R {
        let mut map = self.0.lock().unwrap();
        let now = SystemTime::now();
        read(map.get_mut(key).filter(|r| r.until > now))
    }

    fn held<R>(
        &self,
        key: &RecordKey,
        token: LockToken,
        then: impl FnOnce(&mut HashMap<RecordKey, Record>) -> R,
    ) -> Result<R, StoreError> {
        let mut map = self.0.lock().unwrap();
        match map.get(key) {
            Some(Record {
                state: State::InFlight(held),
                ..
            }) if *held == token => Ok(then(&mut map)),
            _ => Err(StoreError::lease_lost()),
        }
    }
}

impl IdempotencyStore for MapStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let mut map = self.0.lock().unwrap();
        let now = SystemTime::now();
        if let Some(record) = map.get(key).filter(|r| r.until > now) {
            return Ok(match &record.state {
                _ if record.fingerprint != *fingerprint => Begin::Mismatch,
                State::InFlight(_) => Begin::InFlight,
                State::Completed(response) => Begin::Completed(response.clone()),
            });
        }
        let token = LockToken::random();
        let record = Record {
            fingerprint: *fingerprint,
            state: State::InFlight(token),
            until: now + lease,
        };
        map.insert(key.clone(), record);
        Ok(Begin::Acquired(token))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.held(key, token, |map| {
            map.get_mut(key).unwrap().until = SystemTime::now() + lease;
        })
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.held(key, token, |map| {
            let record = map.get_mut(key).unwrap();
            record.state = State::Completed(response);
            record.until = SystemTime::now() + ttl;
        })
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.held(key, token, |map| {
            map.remove(key);
        })
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        Ok(self.live(key, |record| {
            let record = record?;
            let state = match &record.state {
                State::InFlight(_) => RecordState::InFlight {
                    lease_until: record.until,
                },
                State::Completed(response) => RecordState::Completed {
                    status: response.status(),
                    replayable: !response.is_omitted(),
                    expires_at: record.until,
                },
            };
            Some(RecordInfo::new(record.fingerprint, state))
        }))
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        let decision = self.live(key, |record| match record {
            None => Forget::NotFound,
            Some(Record {
                state: State::InFlight(_),
                ..
            }) if !force => Forget::InFlight,
            Some(_) => Forget::Forgotten,
        });
        if decision == Forget::Forgotten {
            self.0.lock().unwrap().remove(key);
        }
        Ok(decision)
    }
}

async fn map_store() -> Option<MapStore> {
    Some(MapStore::default())
}

mod conformance {
    tower_idempotency::conformance_tests!(super::map_store);
}

/// A store written before the operator calls existed: it still compiles, and answers
/// `Unsupported`.
#[derive(Clone, Default)]
struct Legacy(MemoryStore);

impl IdempotencyStore for Legacy {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.0.begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.0.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
}

// ---- Scenarios through the layer, for any store ----------------------------------------------

const AUTHORIZATION: &str = "Bearer sk_test_operator";

fn payment(key: &str, path: &str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .header("authorization", AUTHORIZATION)
        .body(Body::from(r#"{"amount":100}"#))
        .unwrap()
}

/// A completed key is reported (status, fingerprint, expiry), forgotten, and then runs again.
async fn lookup_then_forget_a_completed_key<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(store)
        .shared_scope(true)
        .ttl(Duration::from_secs(3600));
    let operator = Operator::new(layer.store().clone());
    let app = api(runs.clone()).layer(layer);
    let key = unique_key("completed");
    // The client sends the draft's quoted form; the operator types the bare key.
    let quoted = format!("\"{key}\"");
    let tenant = DefaultTenant::scope_for(AUTHORIZATION);

    assert!(operator.lookup(tenant, &key).await.unwrap().is_none());
    let first = send(&app, payment(&quoted, "/payments")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let report = operator
        .lookup(tenant, &key)
        .await
        .unwrap()
        .expect("the completed key is found");
    assert!(!report.is_in_flight());
    assert_eq!(report.key(), key);
    assert_eq!(
        report.tenant(),
        *operator.record_key(tenant, &key).unwrap().tenant()
    );
    assert_ne!(
        report.tenant(),
        tenant,
        "never the unkeyed hash of the credential"
    );
    assert_eq!(report.status(), Some(StatusCode::CREATED));
    let expires_in = report
        .expires_at()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        expires_in > Duration::from_secs(3590) && expires_in <= Duration::from_secs(3605),
        "{expires_in:?}"
    );
    assert_eq!(report.fingerprint_prefix().len(), 16);
    assert_eq!(report.to_json()["state"], "completed");
    // The quoted form names the same key; another tenant's scope does not.
    assert_eq!(
        operator.lookup(tenant, &quoted).await.unwrap(),
        Some(report)
    );
    let stranger = DefaultTenant::scope_for("Bearer someone-else");
    assert!(operator.lookup(stranger, &key).await.unwrap().is_none());
    assert_eq!(
        operator.forget(stranger, &key).await.unwrap(),
        Forget::NotFound
    );

    assert!(send(&app, payment(&quoted, "/payments")).await.replayed());
    assert_eq!(runs.get(), 1);
    assert_eq!(
        operator.forget(tenant, &key).await.unwrap(),
        Forget::Forgotten
    );
    assert!(operator.lookup(tenant, &key).await.unwrap().is_none());
    let again = send(&app, payment(&quoted, "/payments")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed(), "a forgotten key runs the handler again");
    assert_eq!(runs.get(), 2);
}

/// A key whose handler is running is reported in flight and not forgotten; forced, it is, and
/// the running handler's response is then not stored.
async fn in_flight_keys_need_force<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(store).shared_scope(true);
    let operator = Operator::new(layer.store().clone());
    let app = api(runs.clone()).layer(layer);
    let key = unique_key("in-flight");
    let tenant = DefaultTenant::scope_for(AUTHORIZATION);

    let slow = tokio::spawn({
        let (app, request) = (app.clone(), payment(&key, "/slow/1500"));
        async move { send(&app, request).await }
    });
    while runs.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = operator.lookup(tenant, &key).await.unwrap().unwrap();
    assert!(report.is_in_flight());
    assert_eq!(report.status(), None);
    assert_eq!(report.to_json()["state"], "in_flight");
    assert_eq!(
        operator.forget(tenant, &key).await.unwrap(),
        Forget::InFlight
    );
    let retry = send(&app, payment(&key, "/slow/1500")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "still in flight");

    assert_eq!(
        operator.forget_in_flight(tenant, &key).await.unwrap(),
        Forget::Forgotten
    );
    let first = slow.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first client still gets its response"
    );
    assert!(
        operator.lookup(tenant, &key).await.unwrap().is_none(),
        "the forgotten holder could not store its response"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_on_an_in_test_store() {
    lookup_then_forget_a_completed_key(MapStore::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_keys_on_an_in_test_store() {
    in_flight_keys_need_force(MapStore::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_on_memory() {
    lookup_then_forget_a_completed_key(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_keys_on_memory() {
    in_flight_keys_need_force(MemoryStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_on_redis() {
    if let Some(store) = support::shared::redis().await {
        lookup_then_forget_a_completed_key(store).await;
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_keys_on_redis() {
    if let Some(store) = support::shared::redis().await {
        in_flight_keys_need_force(store).await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_on_postgres() {
    if let Some(store) = support::shared::postgres().await {
        lookup_then_forget_a_completed_key(store).await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_keys_on_postgres() {
    if let Some(store) = support::shared::postgres().await {
        in_flight_keys_need_force(store).await;
    }
}

#[tokio::test]
async fn invalid_keys_and_unsupported_stores_are_errors() {
    let operator = Operator::new(MapStore::default());
    for bad in ["", "two words", "a,b", "\"unterminated"] {
        let err = operator.lookup(TenantId::shared(), bad).await.unwrap_err();
        assert!(
            matches!(err, OperatorError::InvalidKey(_)),
            "{bad:?}: {err}"
        );
        let err = operator.forget(TenantId::shared(), bad).await.unwrap_err();
        assert!(
            matches!(err, OperatorError::InvalidKey(_)),
            "{bad:?}: {err}"
        );
    }

    let legacy = Operator::new(Legacy::default());
    for err in [
        legacy.lookup(TenantId::shared(), "k").await.unwrap_err(),
        legacy.forget(TenantId::shared(), "k").await.unwrap_err(),
        legacy
            .forget_in_flight(TenantId::shared(), "k")
            .await
            .unwrap_err(),
    ] {
        match err {
            OperatorError::Store(err) => assert_eq!(err.kind(), StoreErrorKind::Unsupported),
            other => panic!("expected a store error, got {other}"),
        }
    }
}

// ---- Scopes built from the raw value equal the extractors' ----------------------------------

fn parts(
    build: impl FnOnce(axum::http::request::Builder) -> axum::http::request::Builder,
) -> Parts {
    build(Request::builder()).body(()).unwrap().into_parts().0
}

#[test]
fn default_scope_for_equals_extract() {
    let value = HeaderValue::from_static("Bearer eyJhbGciOi.x.y");
    let request = parts(|b| b.header("authorization", value.clone()));
    let extracted = DefaultTenant.extract(&request).unwrap();
    assert_eq!(DefaultTenant::scope_for(&value), extracted);
    assert_eq!(DefaultTenant::scope_for("Bearer eyJhbGciOi.x.y"), extracted);
    assert_ne!(DefaultTenant::scope_for("Bearer other"), extracted);
}

#[test]
fn header_scope_for_equals_extract() {
    let tenants = TenantFromHeader::new(HeaderName::from_static("x-api-key"));
    let request = parts(|b| b.header("x-api-key", "key_live_42"));
    let extracted = tenants.extract(&request).unwrap();
    assert_eq!(tenants.scope_for("key_live_42"), extracted);
    assert_eq!(
        tenants.scope_for(HeaderValue::from_static("key_live_42")),
        extracted
    );
    // The header's name is part of the scope: the same value under another header differs.
    let other = TenantFromHeader::new(HeaderName::from_static("x-tenant-id"));
    assert_ne!(other.scope_for("key_live_42"), extracted);
    assert_ne!(DefaultTenant::scope_for("key_live_42"), extracted);
}

#[test]
fn extension_scope_for_equals_extract() {
    #[derive(Clone)]
    struct Account(u64);
    impl std::fmt::Display for Account {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "acct_{}", self.0)
        }
    }
    let tenants = TenantFromExtension::<Account>::new();
    let request = parts(|b| b.extension(Account(7)));
    let extracted = tenants.extract(&request).unwrap();
    assert_eq!(
        TenantFromExtension::<Account>::scope_for(&Account(7)),
        extracted
    );
    assert_ne!(
        TenantFromExtension::<Account>::scope_for(&Account(8)),
        extracted
    );
}
