//! [`IdempotencyLayer`]: configuration and builder methods.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use crate::error::{ErrorRenderer, ProblemJson};
use crate::service::Idempotency;
use crate::store::IdempotencyStore;
use crate::tenant::{DefaultTenant, TenantExtractor};

/// The default name of the key header, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header set to `true` on a replayed response, `Idempotent-Replayed`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The header set on a response that ran without idempotency protection because the store failed
/// and the layer is fail-open, `Idempotency-Bypassed` (value `store-unavailable`).
pub const IDEMPOTENCY_BYPASSED: HeaderName = HeaderName::from_static("idempotency-bypassed");

/// A [`Layer`] that makes a service safe to retry with idempotency keys.
///
/// The first request with a key runs the inner service once; every retry of the same request
/// gets the same response back, marked `Idempotent-Replayed: true`. A retry that arrives while
/// the first is running gets `409`; a key reused for a different request gets `422`.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "created" }))
///     .layer(IdempotencyLayer::new(MemoryStore::new()));
/// ```
///
/// Defaults: POST and PATCH are covered; the key is optional; records live 24 hours; request
/// bodies are capped at 2 MiB and stored responses at 1 MiB; the in-flight lease is 30 seconds,
/// renewed while the handler runs; 2xx, 3xx and 4xx responses (but 408 and 429) are stored; a
/// store failure answers `503` (fail closed).
#[must_use]
pub struct IdempotencyLayer<St, T = DefaultTenant, E = ProblemJson> {
    store: Arc<St>,
    tenant: Arc<T>,
    renderer: Arc<E>,
    config: Config,
}

/// Settings shared by every request.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) retry_after: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_response_bytes: usize,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) canonical_json: bool,
    pub(crate) skip_response_headers: Vec<HeaderName>,
    pub(crate) cache_policy: StatusSet,
    pub(crate) fail_open: bool,
}

impl Config {
    /// `Retry-After` in whole seconds, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: IDEMPOTENCY_KEY,
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            store_timeout: Duration::from_secs(2),
            max_body_bytes: 2 * 1024 * 1024,
            max_response_bytes: 1024 * 1024,
            fingerprint_headers: Vec::new(),
            canonical_json: false,
            skip_response_headers: Vec::new(),
            cache_policy: StatusSet::from_fn(default_cache_policy),
            fail_open: false,
        }
    }
}

/// The default cache policy: store 2xx, 3xx and 4xx but 408 and 429; 1xx and 5xx release the
/// key so that a retry runs again.
pub fn default_cache_policy(status: StatusCode) -> bool {
    (200..500).contains(&status.as_u16())
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

/// A set of status codes 100..=999 as a bit set, decided once when the layer is built.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 16]);

impl StatusSet {
    fn from_fn(f: impl Fn(StatusCode) -> bool) -> Self {
        let mut bits = [0u64; 16];
        for code in 100..1000u16 {
            if StatusCode::from_u16(code).is_ok_and(&f) {
                bits[usize::from(code / 64)] |= 1 << (code % 64);
            }
        }
        Self(bits)
    }

    pub(crate) fn contains(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.0[usize::from(code / 64)] & (1 << (code % 64)) != 0
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes = (100..1000u16).filter(|&c| self.contains(StatusCode::from_u16(c).unwrap()));
        f.debug_set().entries(codes).finish()
    }
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer over `store` with the default settings, the default tenant (a hash of the
    /// `Authorization` header, or one shared scope) and `application/problem+json` errors.
    pub fn new(store: St) -> Self {
        Self {
            store: Arc::new(store),
            tenant: Arc::new(DefaultTenant),
            renderer: Arc::new(ProblemJson),
            config: Config::default(),
        }
    }
}

impl<St, T, E> IdempotencyLayer<St, T, E> {
    /// How long a completed response is replayed, counted from completion. Default: 24 hours.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).ttl(Duration::from_secs(3600));
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// Answer `400 idempotency_key_missing` to covered requests without a key, instead of
    /// passing them through. Default: `false`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).require_key(true);
    /// ```
    pub fn require_key(mut self, require: bool) -> Self {
        self.config.require_key = require;
        self
    }

    /// The methods the layer covers; others pass through untouched. Default: POST and PATCH.
    ///
    /// ```
    /// # use http::Method;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .methods([Method::POST, Method::PUT, Method::PATCH, Method::DELETE]);
    /// ```
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// The largest request body a keyed request may have; a larger one is answered with `413`
    /// without running the handler or storing anything. Default: 2 MiB.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).max_body_bytes(64 * 1024);
    /// ```
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.config.max_body_bytes = limit;
        self
    }

    /// The largest response body stored for replay. A larger response still reaches the first
    /// client; the key then stays completed without a stored response, and a retry gets
    /// `409 idempotency_response_not_stored` (the handler never runs twice). Default: 1 MiB.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).max_response_bytes(256 * 1024);
    /// ```
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.config.max_response_bytes = limit;
        self
    }

    /// The name of the key header. Default: `Idempotency-Key`.
    ///
    /// ```
    /// # use http::HeaderName;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .header_name(HeaderName::from_static("x-idempotency-key"));
    /// ```
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The in-flight lease: how long a request holds its key before another request may take it
    /// over, should its server die. The lease is renewed every third of its length while the
    /// handler runs, so a slow handler is never taken over. Default: 30 seconds.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).lease(Duration::from_secs(10));
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// The `Retry-After` sent with `409` (in progress) and `503` (store unavailable), rounded up
    /// to whole seconds. Default: 1 second.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).retry_after(Duration::from_secs(2));
    /// ```
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.config.retry_after = retry_after;
        self
    }

    /// How long any one store call may take before it counts as a failure. Default: 2 seconds.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).store_timeout(Duration::from_millis(500));
    /// ```
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// Which response statuses are stored and replayed; the others release the key so that a
    /// retry runs the handler again. Default: [`default_cache_policy`] (2xx, 3xx and 4xx but 408
    /// and 429).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// // Store only successes: a 4xx can be retried with the same key.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).cache_policy(|s| s.is_success());
    /// ```
    pub fn cache_policy(mut self, policy: impl Fn(StatusCode) -> bool) -> Self {
        self.config.cache_policy = StatusSet::from_fn(policy);
        self
    }

    /// Response headers that are never stored, so a replay does not repeat them (for example
    /// `Set-Cookie`). Hop-by-hop headers and `Date` are never stored anyway.
    ///
    /// ```
    /// # use http::header;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .skip_response_headers([header::SET_COOKIE]);
    /// ```
    pub fn skip_response_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.skip_response_headers = names.into_iter().collect();
        self
    }

    /// Request headers that are part of the fingerprint besides method, path, query and body
    /// (for example `Content-Type`). Default: none.
    ///
    /// ```
    /// # use http::header;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .fingerprint_headers([header::CONTENT_TYPE]);
    /// ```
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.fingerprint_headers = names.into_iter().collect();
        self
    }

    /// Fingerprint JSON bodies canonically (object keys sorted, insignificant whitespace
    /// dropped), so that `{"a":1,"b":2}` and `{ "b": 2, "a": 1 }` are the same request. A body
    /// that is not JSON is fingerprinted as sent. Default: `false`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).canonical_json(true);
    /// ```
    pub fn canonical_json(mut self, enabled: bool) -> Self {
        self.config.canonical_json = enabled;
        self
    }

    /// When the store fails, run the request without idempotency protection (fail open) instead
    /// of answering `503 idempotency_store_unavailable` (fail closed, the default). A request
    /// that ran unprotected carries `Idempotency-Bypassed: store-unavailable`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).fail_open(true);
    /// ```
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.config.fail_open = fail_open;
        self
    }

    /// How a request's tenant is decided: the record key is (tenant, key). Default:
    /// [`DefaultTenant`].
    ///
    /// ```
    /// # use http::HeaderName;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, TenantFromHeader};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .tenant(TenantFromHeader::new(HeaderName::from_static("x-api-key")));
    /// ```
    pub fn tenant<T2: TenantExtractor>(self, tenant: T2) -> IdempotencyLayer<St, T2, E> {
        IdempotencyLayer {
            store: self.store,
            tenant: Arc::new(tenant),
            renderer: self.renderer,
            config: self.config,
        }
    }

    /// How errors are rendered. Default: [`ProblemJson`]. See [`ErrorRenderer`] for an example.
    pub fn error_renderer<E2: ErrorRenderer>(self, renderer: E2) -> IdempotencyLayer<St, T, E2> {
        IdempotencyLayer {
            store: self.store,
            tenant: self.tenant,
            renderer: Arc::new(renderer),
            config: self.config,
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }
}

impl<St, T, E> Clone for IdempotencyLayer<St, T, E> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            tenant: self.tenant.clone(),
            renderer: self.renderer.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St: fmt::Debug, T, E> fmt::Debug for IdempotencyLayer<St, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("tenant", &std::any::type_name::<T>())
            .field("error_renderer", &std::any::type_name::<E>())
            .field("config", &self.config)
            .finish()
    }
}

impl<S, St, T, E> Layer<S> for IdempotencyLayer<St, T, E> {
    type Service = Idempotency<S, St, T, E>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(
            inner,
            Arc::new(Shared {
                store: self.store.clone(),
                tenant: self.tenant.clone(),
                renderer: self.renderer.clone(),
                config: self.config.clone(),
            }),
        )
    }
}

/// What every clone of the service shares.
pub(crate) struct Shared<St, T, E> {
    pub(crate) store: Arc<St>,
    pub(crate) tenant: Arc<T>,
    pub(crate) renderer: Arc<E>,
    pub(crate) config: Config,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy() {
        let set = Config::default().cache_policy;
        for (code, stored) in [
            (200, true),
            (201, true),
            (302, true),
            (400, true),
            (404, true),
            (408, false),
            (429, false),
            (500, false),
            (503, false),
            (101, false),
        ] {
            assert_eq!(
                set.contains(StatusCode::from_u16(code).unwrap()),
                stored,
                "{code}"
            );
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        let mut config = Config::default();
        assert_eq!(config.retry_after_secs(), 1);
        config.retry_after = Duration::from_millis(1500);
        assert_eq!(config.retry_after_secs(), 2);
        config.retry_after = Duration::ZERO;
        assert_eq!(config.retry_after_secs(), 1);
    }
}
