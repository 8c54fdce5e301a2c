//! The settings of a layer, and what every clone of its service shares.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

use crate::admission::{Admission, Limits};
use crate::detach::DetachedRuns;
use crate::fingerprint::BodyFingerprint;
use crate::tenant::Sealer;
use crate::wait::waiters::{DEFAULT_MAX_WAITERS, Waiters};

/// The default name of the key header, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header set to `true` on a replayed response, `Idempotent-Replayed`. Only the layer sets
/// it: a keyed request's response that is not a replay never carries it, even when its handler
/// set it (an upstream API's answer passed on).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The header set on a response that ran without idempotency protection because the store failed
/// and the layer is fail-open, `Idempotency-Bypassed` (value `store-unavailable`).
pub const IDEMPOTENCY_BYPASSED: HeaderName = HeaderName::from_static("idempotency-bypassed");

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
    pub(crate) body_fingerprint: BodyFingerprint,
    pub(crate) skip_response_headers: Vec<HeaderName>,
    pub(crate) cache_policy: StatusSet,
    pub(crate) fail_open: bool,
    pub(crate) finish_on_disconnect: bool,
    pub(crate) admission: Limits,
    pub(crate) shared_scope: bool,
    pub(crate) shared_scope_cookies: bool,
    pub(crate) sealer: Sealer,
    /// How long a duplicate waits for the first request with its key; `None`: `409` at once.
    pub(crate) wait: Option<Duration>,
    pub(crate) max_waiters: usize,
}

impl Config {
    /// `Retry-After` in whole seconds, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        whole_seconds(self.retry_after)
    }

    /// `Retry-After` for a store full of in-flight records: the lease, the longest a record
    /// can stay in flight without its holder renewing it.
    pub(crate) fn store_full_retry_after_secs(&self) -> u64 {
        whole_seconds(self.lease)
    }
}

/// A duration in whole seconds, rounded up, at least 1.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs_f64().ceil().max(1.0) as u64
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
            body_fingerprint: BodyFingerprint::default(),
            skip_response_headers: Vec::new(),
            cache_policy: StatusSet::from_fn(default_cache_policy),
            fail_open: false,
            finish_on_disconnect: true,
            admission: Limits::default(),
            shared_scope: false,
            shared_scope_cookies: false,
            sealer: Sealer::default(),
            wait: None,
            max_waiters: DEFAULT_MAX_WAITERS,
        }
    }
}

/// The longest TTL and lease the layer hands a store: 100 years. A store adds them to its
/// clock (`Instant::now() + ttl`), which a `Duration::MAX` would overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The refusals that say the operation did not run, with why. They are not stored by
/// [`default_cache_policy`]: the corrected retry may reuse its key.
const REFUSALS: [u16; 21] = [
    400, // Bad Request: the request failed validation.
    401, // Unauthorized: the caller may fix its credentials.
    403, // Forbidden: the caller may be granted access.
    405, // Method Not Allowed: no operation for this method.
    406, // Not Acceptable: the request's `Accept` cannot be met.
    407, // Proxy Authentication Required: a proxy refused it; the caller may fix its credentials.
    408, // Request Timeout: the request was not received in time.
    411, // Length Required: the request's form.
    412, // Precondition Failed: the method was not performed.
    413, // Content Too Large: the request's form.
    414, // URI Too Long: the request's form.
    415, // Unsupported Media Type: the request's form.
    417, // Expectation Failed: the request's `Expect` cannot be met.
    421, // Misdirected Request: the wrong server was asked.
    422, // Unprocessable Content: the request failed validation.
    423, // Locked: the resource is locked for now.
    425, // Too Early: the request must be retried.
    426, // Upgrade Required: the request's protocol.
    428, // Precondition Required: the request's form.
    429, // Too Many Requests: rate limited, retried later.
    431, // Request Header Fields Too Large: the request's form.
];

/// The default cache policy: store 2xx, 3xx and the 4xx that are outcomes of the operation
/// (`402`, `404`, `409`, `410`, ...); release the key on 1xx, 5xx and the 4xx that refuse a
/// request before it ran, so that a corrected retry with the same key runs.
///
/// | status | stored | why |
/// |---|---|---|
/// | 2xx, 3xx | yes | the operation's result |
/// | 402, 404, 409, 410, 416, 424, 451, and other 4xx | yes | an outcome of the operation: the retry would fail the same way |
/// | 400, 422 | no | validation refused the request before it ran |
/// | 401, 403, 407 | no | authentication or authorization refused it (407: at a proxy); the caller may fix its credentials |
/// | 405, 406, 411, 413, 414, 415, 417, 426, 428, 431 | no | the request's form was refused |
/// | 408, 425, 429, 423 | no | not now: the request may succeed later |
/// | 412 | no | a precondition failed, so the method was not performed |
/// | 421 | no | the request reached the wrong server |
/// | 1xx, 5xx | no | no final answer, or the server failed: the retry runs again |
///
/// A handler can decide per response with [`CacheDecision`](crate::CacheDecision).
pub fn default_cache_policy(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..500).contains(&code) && !REFUSALS.contains(&code)
}

/// A handler's decision about its own response, which wins over the layer's
/// [`cache_policy`](crate::IdempotencyLayer::cache_policy).
///
/// Put it in the response's extensions. In axum, `Extension` is a response part:
///
/// ```
/// use axum::{Extension, http::StatusCode, response::IntoResponse};
/// use tower_idempotency::CacheDecision;
///
/// // A 422 that is the operation's real outcome (the transfer was declined by the ledger):
/// // stored, and replayed to every retry.
/// async fn transfer() -> impl IntoResponse {
///     (StatusCode::UNPROCESSABLE_ENTITY, Extension(CacheDecision::Store), "insufficient funds")
/// }
///
/// // A 201 that must not be replayed (it carries a one-time secret): not stored, so a retry
/// // runs the handler again.
/// async fn issue_token() -> impl IntoResponse {
///     (StatusCode::CREATED, Extension(CacheDecision::Skip), "token")
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheDecision {
    /// Store this response and replay it to every retry, whatever its status.
    Store,
    /// Do not store this response: the key is released, so that a retry runs the handler
    /// again.
    Skip,
}

impl Config {
    /// Whether a handler's response is stored: the handler's own [`CacheDecision`] if it made
    /// one, else the cache policy.
    pub(crate) fn stores<B>(&self, response: &http::Response<B>) -> bool {
        match response.extensions().get::<CacheDecision>() {
            Some(decision) => *decision == CacheDecision::Store,
            None => self.cache_policy.contains(response.status()),
        }
    }
}

/// A set of status codes 100..=999 as a bit set, decided once when the layer is built.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 16]);

impl StatusSet {
    pub(crate) fn from_fn(f: impl Fn(StatusCode) -> bool) -> Self {
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

/// What every clone of the service shares.
pub(crate) struct Shared<St, T, E> {
    pub(crate) store: Arc<St>,
    pub(crate) tenant: Arc<T>,
    pub(crate) renderer: Arc<E>,
    pub(crate) config: Config,
    pub(crate) detached: DetachedRuns,
    pub(crate) admission: Arc<Admission>,
    pub(crate) waiters: Arc<Waiters>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy() {
        let set = Config::default().cache_policy;
        let stored = [200, 201, 204, 302, 304, 402, 404, 409, 410, 416, 424, 451];
        let released = [
            100, 101, 400, 401, 403, 405, 406, 407, 408, 411, 412, 413, 414, 415, 417, 421, 422,
            423, 425, 426, 428, 429, 431, 500, 502, 503, 504,
        ];
        for code in stored {
            assert!(set.contains(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in released {
            assert!(!set.contains(StatusCode::from_u16(code).unwrap()), "{code}");
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
        assert_eq!(config.store_full_retry_after_secs(), 30);
    }
}
