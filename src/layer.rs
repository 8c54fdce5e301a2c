//! [`IdempotencyLayer`]: configuration and builder methods.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use crate::admission::Admission;
use crate::config::{Config, Shared, StatusSet};
use crate::detach::DetachedRuns;
use crate::error::{ErrorRenderer, ProblemJson};
use crate::fingerprint::Fingerprinter;
use crate::fingerprint::pointer::Pointers;
use crate::handler::Idempotency;
use crate::store::IdempotencyStore;
use crate::tenant::{DefaultTenant, MIN_SECRET_LEN, Sealer, TenantExtractor};
use crate::wait::waiters::Waiters;

/// A [`Layer`] that makes a service safe to retry with idempotency keys.
///
/// The first request with a key runs the inner service once; every retry of the same request
/// gets the same response back, marked `Idempotent-Replayed: true`. A retry that arrives while
/// the first is running gets `409` (or waits for it, with
/// [`wait_for_in_flight`](Self::wait_for_in_flight)); a key reused for a different request gets
/// `422`.
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
/// renewed while the handler runs; 2xx, 3xx and the 4xx that are outcomes of the operation are
/// stored ([`default_cache_policy`](crate::default_cache_policy)); a handler whose client went away runs to its end; a store
/// failure answers `503` (fail closed).
#[must_use]
pub struct IdempotencyLayer<St, T = DefaultTenant, E = ProblemJson> {
    store: Arc<St>,
    tenant: Arc<T>,
    renderer: Arc<E>,
    config: Config,
    detached: DetachedRuns,
    admission: Arc<Admission>,
    waiters: Arc<Waiters>,
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer over `store` with the default settings, the default tenant (a hash of the
    /// `Authorization` header; a keyed request without one is refused, unless
    /// [`shared_scope`](Self::shared_scope)) and `application/problem+json` errors.
    pub fn new(store: St) -> Self {
        Self {
            store: Arc::new(store),
            tenant: Arc::new(DefaultTenant),
            renderer: Arc::new(ProblemJson),
            config: Config::default(),
            detached: DetachedRuns::default(),
            admission: Arc::default(),
            waiters: Arc::default(),
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
    ///
    /// A zero TTL keeps nothing: a completed record expires at once (on the shared stores, whose
    /// expiries are whole milliseconds, within a millisecond), and a retry runs again. A TTL
    /// over 100 years is taken as 100 years, so that a store adding it to its clock never
    /// overflows.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl.min(crate::config::MAX_DURATION);
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
    /// handler runs, so a slow handler is never taken over; a renewal that failed (its store
    /// call timed out, say) is tried again a twelfth of the lease later. Default: 30 seconds.
    ///
    /// The renewals run in the request's own task, between the handler's `.await`s: a handler
    /// that blocks its thread (`tokio::task::block_in_place`, a synchronous call) for longer
    /// than the lease is taken over as if its server had died, and may run twice. Hand blocking
    /// work to `tokio::task::spawn_blocking` (awaited, it lets the renewals run), or keep the
    /// lease well above the longest block. For the same reason a lease of less than a second or
    /// so can lapse on a loaded runtime whose tasks wait their turn; 3 ms is the least accepted,
    /// and 100 years the most (a longer lease is taken as 100 years).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).lease(Duration::from_secs(10));
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.clamp(Duration::from_millis(3), crate::config::MAX_DURATION);
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
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "IdempotencyLayer::store_timeout must be more than zero"
        );
        self.config.store_timeout = timeout;
        self
    }

    /// Which response statuses are stored and replayed; the others release the key so that a
    /// retry runs the handler again. Default: [`default_cache_policy`](crate::default_cache_policy) (2xx, 3xx and the 4xx that
    /// are outcomes of the operation, such as `402`, `404` and `409`; not the refusals that say
    /// it did not run, such as `400`, `401`, `403`, `415` and `422`).
    ///
    /// A handler decides for one response with [`CacheDecision`](crate::CacheDecision), which
    /// wins over the policy.
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
    /// They are hashed as HTTP/1.1 sends them, whatever the protocol a request comes by, so
    /// that a retry that comes by another (through a proxy that speaks HTTP/2 to one server)
    /// is the same request: `Host`, which HTTP/2 does not send, is the URI's authority (its
    /// `:authority`), and the crumbs HTTP/2 may split a `Cookie` into are one field, joined
    /// with `"; "`.
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

    /// Fingerprint JSON bodies canonically, so that `{"a":1,"b":2}` and `{ "b": 2, "a": 1 }`
    /// are the same request. Default: `false`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).canonical_json(true);
    /// ```
    ///
    /// A body is JSON when its `Content-Type` is `application/json` or any type with the
    /// `+json` suffix (parameters such as `charset` aside), or when the request has no
    /// `Content-Type` and its body parses as JSON. Any other body, one that is not
    /// a single valid JSON value (RFC 8259, UTF-8), one nested more than 128 levels deep, and
    /// one with an object that names a key twice are fingerprinted as sent, byte for byte:
    /// parsers disagree on what a repeated key means, so such a body is never taken for
    /// another. Canonicalising reads the body twice and builds no tree of values: its memory
    /// is a few bytes per object member, whatever the body's depth or size.
    ///
    /// What counts as the same:
    ///
    /// - whitespace between tokens is dropped, and object members are sorted by key (the
    ///   bytes of the decoded key);
    /// - strings are compared by their characters: `"\u0041"` is `"A"`, `"\/"` is `"/"`,
    ///   `"\u00e9"` is `"é"`;
    /// - numbers are compared by their exact decimal value, never through `f64` or `u64`:
    ///   `1`, `1.0`, `1e0`, `10e-1` and `0.1e1` are the same number, `-0` is `0`, and
    ///   `100000000000000000001` is not `100000000000000000002`.
    ///
    /// What does not: the order of array elements; a string and a number (`"1"`, `1`); a
    /// member that is `null` and one that is absent; Unicode normalisation (`"é"` and
    /// `"e\u0301"` differ); and a number whose exponent has more than 18 digits, which is
    /// compared as sent.
    ///
    /// A JSON body that was canonicalised is never the same request as one that was not (a
    /// body sent once as `application/json`, then as `text/plain`, is `422`). So turning this
    /// on or off changes the fingerprint of every JSON request: a retry of one completed
    /// under the other setting (before the deploy, or on a server not yet deployed) gets
    /// `422`. README's "Fingerprints that ignore volatile fields" says when to change it.
    pub fn canonical_json(mut self, enabled: bool) -> Self {
        self.config.body_fingerprint.canonical_json = enabled;
        self
    }

    /// Leave the values these JSON Pointers (RFC 6901) name out of the fingerprint, so that
    /// a retry whose body differs only there (a timestamp, a trace id, a nonce the client
    /// makes anew for every attempt) replays the first request's response. Replaces the
    /// pointers set before; none by default.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .ignore_json_pointers(["/timestamp", "/metadata/trace_id", "/items/0/nonce"]);
    /// ```
    ///
    /// A pointer is a path of reference tokens, each after a `/`: a member's key, or an array
    /// element's index (`0`, `1`, ...); `~1` stands for `/` in a key and `~0` for `~`. A
    /// pointer that names nothing in a body leaves nothing out.
    ///
    /// Pointers imply [`canonical_json`](Self::canonical_json) for JSON bodies: the body is
    /// canonicalised, and each value named is replaced by a marker. The member or element
    /// itself still counts: a body without the member (or with a shorter array) is another
    /// request. A body that is not JSON, or not canonicalised (see `canonical_json`), is
    /// fingerprinted as sent, with nothing left out.
    ///
    /// Everything left out is something the first request's response is replayed for: a
    /// retry that differs there gets the first request's answer, not its own. Name only
    /// values that do not change what the request does.
    ///
    /// # Panics
    ///
    /// If a pointer is not a JSON Pointer: it does not start with `/` (the empty pointer, the
    /// whole body, included: see [`fingerprint_with`](Self::fingerprint_with)), or it has a
    /// `~` that is not `~0` or `~1`.
    pub fn ignore_json_pointers<P: AsRef<str>>(
        mut self,
        pointers: impl IntoIterator<Item = P>,
    ) -> Self {
        let pointers = Pointers::parse(pointers)
            .unwrap_or_else(|err| panic!("IdempotencyLayer::ignore_json_pointers: {err}"));
        self.config.body_fingerprint.ignore = pointers.map(Arc::new);
        self
    }

    /// Fingerprint what `fingerprinter` makes of the body, in place of the body: for rules
    /// that [`canonical_json`](Self::canonical_json) and
    /// [`ignore_json_pointers`](Self::ignore_json_pointers) do not express. Those two do
    /// not apply while a fingerprinter is set.
    ///
    /// ```
    /// use http::request::Parts;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// // The body's first line only (say, a command; the rest is a log the client appends).
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .fingerprint_with(|_parts: &Parts, body: &[u8]| {
    ///         body.split(|&b| b == b'\n').next().unwrap_or_default().to_vec()
    ///     });
    /// ```
    ///
    /// Its bytes are hashed with the method, the path, the query and the
    /// [`fingerprint_headers`](Self::fingerprint_headers), always: the path stays in so that
    /// a key reused on another route is still `422`, whatever the function returns. It gets
    /// the request head and the whole body, read once (up to
    /// [`max_body_bytes`](Self::max_body_bytes)); it runs on every keyed request, before the
    /// store is asked, so it should be quick and must not block.
    ///
    /// The risk is plain: two requests whose bytes are equal are the same request. A
    /// function that leaves out too much (an amount, an account, a body it cannot parse
    /// mapped to nothing) replays one request's response to a different request, which then
    /// never runs. Map a body you cannot read to itself (`body.to_vec()`).
    pub fn fingerprint_with(mut self, fingerprinter: impl Fingerprinter) -> Self {
        self.config.body_fingerprint.custom = Some(Arc::new(fingerprinter));
        self
    }

    /// When the store fails, run the request without idempotency protection (fail open) instead of
    /// answering `503 idempotency_store_unavailable` (fail closed, the default). A request that ran
    /// unprotected carries `Idempotency-Bypassed: store-unavailable`.
    ///
    /// A store that is full ([`StoreErrorKind::CapacityExceeded`](crate::StoreErrorKind): a
    /// [`MemoryStore`](crate::MemoryStore) whose records are all in flight) has not failed: a new
    /// key is still refused with `503`, so that a store filled by a flood does not turn protection
    /// off for everyone. Nor has a store that answered with a record it cannot decode
    /// ([`StoreErrorKind::Corrupt`](crate::StoreErrorKind): written by a newer version, or
    /// damaged): the record says its request may have run, so a retry gets `503` rather than a
    /// second run. Nor does a duplicate that waits for the first request
    /// ([`wait_for_in_flight`](Self::wait_for_in_flight)) run past a store that fails while it
    /// waits: the store said the key is held, so it gets `503` (without waiting, it had `409`).
    /// The store's error is named (`error`) in the request's `WARN` event.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).fail_open(true);
    /// ```
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.config.fail_open = fail_open;
        self
    }

    /// Whether a handler whose client goes away runs to its end. Default: `true`.
    ///
    /// hyper drops a request's future when its client closes the connection, which would cancel
    /// the handler at its next `.await`, half-way through its work. With this on, a request
    /// that holds its key hands its handler to a task of its own instead: the handler runs to
    /// its end, its response is stored (or its key released) as if the client had stayed, and
    /// the client's retry gets `409` while it runs, then the replay. Nothing is spawned while
    /// the client stays.
    ///
    /// `false` restores cancel-and-release: the handler is dropped and the key released, so
    /// that a retry runs it again. Only for handlers that are safe to cancel at any `.await`.
    /// A handler that has already answered has done its work: a client that goes away while its
    /// response body streams leaves the key completed as not replayable (retries get
    /// `409 idempotency_response_not_stored`), never released.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).finish_on_disconnect(false);
    /// ```
    pub fn finish_on_disconnect(mut self, finish: bool) -> Self {
        self.config.finish_on_disconnect = finish;
        self
    }

    /// The most keyed requests this layer works on at once, across tenants. Default: 10,000.
    ///
    /// A keyed request is counted from the moment it is admitted (once its body is read, before
    /// the store is asked) until its flow ends, including a handler that runs on after its
    /// client went away; a client still sending its body holds no place. Past the bound, a new
    /// keyed request is answered `503 idempotency_overloaded` with `Retry-After`, and nothing
    /// is started. A request already admitted is never cut off:
    /// whatever other callers do (hang up, flood), a handler that holds its key runs to its
    /// end. The layer, its clones and every service it builds share one count.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).max_in_flight(2_000);
    /// ```
    ///
    /// # Panics
    ///
    /// If `max` is 0.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        assert!(
            max > 0,
            "IdempotencyLayer::max_in_flight must be at least 1"
        );
        self.config.admission.total = max;
        self
    }

    /// The most keyed requests of one tenant this layer works on at once. Default: 1,000.
    ///
    /// Past it, that tenant's new keyed requests are answered `503 idempotency_overloaded`
    /// with `Retry-After`; other tenants are not affected. So one caller cannot take the whole
    /// of [`max_in_flight`](Self::max_in_flight), for example by sending slow requests and
    /// hanging up on each. The shared scope counts as one tenant. A share is only as good as
    /// the tenant: the default one is a hash of the `Authorization` header as sent, so a
    /// caller who makes credentials up gets a share for each; behind authentication, take the
    /// tenant the middleware verified ([`TenantFromExtension`](crate::TenantFromExtension)).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).max_in_flight_per_tenant(100);
    /// ```
    ///
    /// # Panics
    ///
    /// If `max` is 0.
    pub fn max_in_flight_per_tenant(mut self, max: usize) -> Self {
        assert!(
            max > 0,
            "IdempotencyLayer::max_in_flight_per_tenant must be at least 1"
        );
        self.config.admission.per_tenant = max;
        self
    }

    /// Let a duplicate that arrives while the first request with its key runs wait up to `wait`
    /// for the first to finish, instead of answering `409` at once. Default: off
    /// (`Duration::ZERO` turns it off again).
    ///
    /// When the first completes, the waiter gets its replay (`Idempotent-Replayed: true`, same
    /// status, headers and body). When the first ends without a stored response (a `5xx`, a
    /// refusal that is not stored, a panic), exactly one waiter gets the key and runs the
    /// handler; the others wait on for that one. Still running at the deadline:
    /// `409 idempotency_key_in_progress` with `Retry-After`, as without waiting. A key bound to
    /// another request meanwhile: `422`.
    ///
    /// A waiter holds its connection, its buffered body and its admission
    /// ([`max_in_flight`](Self::max_in_flight)) while it waits. At most
    /// [`max_waiters`](Self::max_waiters) requests wait at once (1,000 by default) and at most 64
    /// for one key; past either bound, a duplicate gets `409` at once. A waiter is woken as soon
    /// as the first request finishes in this layer; a first request on another server (a shared
    /// store), or under another layer, is seen by polling the store: 25 ms after the wait
    /// starts, then backing off to every 500 ms, one poll per waiting key.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_secs(5));
    /// ```
    pub fn wait_for_in_flight(mut self, wait: Duration) -> Self {
        self.config.wait = (!wait.is_zero()).then_some(wait);
        self
    }

    /// The most requests this layer lets wait at once for the first request with their key
    /// (see [`wait_for_in_flight`](Self::wait_for_in_flight)), across keys. Default: 1,000.
    /// Past it, a duplicate gets `409` at once. The layer, its clones and every service it
    /// builds share one count. However large, no more than 64 wait for one key. Each waiter
    /// holds its buffered body, so this also bounds that memory: at most `max` times
    /// [`max_body_bytes`](Self::max_body_bytes).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .wait_for_in_flight(Duration::from_secs(5))
    ///     .max_waiters(200);
    /// ```
    ///
    /// # Panics
    ///
    /// If `max` is 0 (leave [`wait_for_in_flight`](Self::wait_for_in_flight) off instead).
    pub fn max_waiters(mut self, max: usize) -> Self {
        assert!(max > 0, "IdempotencyLayer::max_waiters must be at least 1");
        self.config.max_waiters = max;
        self
    }

    /// How many requests wait now for the first request with their key, in this layer and its
    /// clones.
    #[doc(hidden)]
    pub fn waiting_requests(&self) -> usize {
        self.waiters.requests()
    }

    /// How many keys have requests waiting now, in this layer and its clones.
    #[doc(hidden)]
    pub fn waiting_keys(&self) -> usize {
        self.waiters.keys()
    }

    /// Whether keyed requests without a tenant of their own share one scope. Default: `false`.
    ///
    /// With the default, a keyed request for which the tenant extractor finds no tenant
    /// ([`TenantId::shared`](crate::TenantId::shared): no `Authorization` header with
    /// [`DefaultTenant`], an optional header that is absent, ...) is refused with
    /// `400 idempotency_tenant_missing`: no response is ever replayed to a caller the app did
    /// not identify. Turn this on only for an API whose callers are anonymous by design; then
    /// anyone who sends another caller's key with the same request gets that caller's
    /// response, so keys must be unguessable (UUID v4), and `Set-Cookie` is not replayed there
    /// (see [`replay_cookies_in_shared_scope`](Self::replay_cookies_in_shared_scope)).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
    /// ```
    pub fn shared_scope(mut self, shared: bool) -> Self {
        self.config.shared_scope = shared;
        self
    }

    /// The secret that keys tenant scopes: what a store holds for a tenant is
    /// HMAC-SHA256(secret, the extractor's digest), never a plain hash of a credential.
    ///
    /// Use at least 32 random bytes from your secret manager, the same on every server of a
    /// fleet (servers with different secrets do not see each other's records). Changing it
    /// starts every tenant afresh: records stored under the old secret are not found (a retry
    /// that spans the change runs again), so rotate it when no retries are expected, or
    /// between TTLs. Without it, a public default key is used: stored tenant ids are still not
    /// plain hashes, but anyone who can read the store and knows this crate can test
    /// candidate credentials (a Basic-auth password, a short API key) against them. Give the
    /// same secret to [`Operator::tenant_secret`](crate::Operator::tenant_secret).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # let secret_from_your_vault = vec![7u8; 32];
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).tenant_secret(&secret_from_your_vault);
    /// ```
    ///
    /// # Panics
    ///
    /// If `secret` is shorter than 16 bytes.
    pub fn tenant_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        assert!(
            secret.len() >= MIN_SECRET_LEN,
            "IdempotencyLayer::tenant_secret must be at least {MIN_SECRET_LEN} bytes (32 random bytes recommended)"
        );
        self.config.sealer = Sealer::new(secret);
        self
    }

    /// The handlers of this layer (and of every clone of it) that run on after their client
    /// went away, to wait for on shutdown. See [`DetachedRuns`].
    pub fn detached_runs(&self) -> DetachedRuns {
        self.detached.clone()
    }

    /// Replay `Set-Cookie` in the shared scope too. Default: `false`.
    ///
    /// A request without a tenant of its own (no `Authorization` header with the default
    /// tenant) lives in one scope shared by every caller: there, a replay may reach another
    /// caller who sent the same key, so the stored response keeps no `Set-Cookie`. Inside a
    /// tenant's scope, a replay is always the whole original response. Turn this on only if
    /// every covered route sets cookies that are safe to hand to another caller.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).replay_cookies_in_shared_scope(true);
    /// ```
    pub fn replay_cookies_in_shared_scope(mut self, replay: bool) -> Self {
        self.config.shared_scope_cookies = replay;
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
            detached: self.detached,
            admission: self.admission,
            waiters: self.waiters,
        }
    }

    /// How errors are rendered. Default: [`ProblemJson`]. See [`ErrorRenderer`] for an example.
    pub fn error_renderer<E2: ErrorRenderer>(self, renderer: E2) -> IdempotencyLayer<St, T, E2> {
        IdempotencyLayer {
            store: self.store,
            tenant: self.tenant,
            renderer: Arc::new(renderer),
            config: self.config,
            detached: self.detached,
            admission: self.admission,
            waiters: self.waiters,
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// An [`Operator`](crate::Operator) over this layer's store and with its
    /// [`tenant_secret`](Self::tenant_secret), so that it finds the records this layer writes
    /// (`Operator::new(layer.store().clone())` alone would not, once the layer has a secret).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # let secret_from_your_vault = vec![7u8; 32];
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).tenant_secret(&secret_from_your_vault);
    /// let operator = layer.operator();
    /// # let _ = operator;
    /// ```
    pub fn operator(&self) -> crate::Operator<St>
    where
        St: IdempotencyStore + Clone,
    {
        crate::Operator::sealed((*self.store).clone(), self.config.sealer.clone())
    }
}

impl<St, T, E> Clone for IdempotencyLayer<St, T, E> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            tenant: self.tenant.clone(),
            renderer: self.renderer.clone(),
            config: self.config.clone(),
            detached: self.detached.clone(),
            admission: self.admission.clone(),
            waiters: self.waiters.clone(),
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
                detached: self.detached.clone(),
                admission: self.admission.clone(),
                waiters: self.waiters.clone(),
            }),
        )
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::time::Duration;

    use super::IdempotencyLayer;
    use crate::MemoryStore;
    use crate::config::MAX_DURATION;

    #[test]
    fn a_store_never_gets_a_ttl_or_lease_it_cannot_add_to_its_clock() {
        let layer = IdempotencyLayer::new(MemoryStore::new())
            .ttl(Duration::MAX)
            .lease(Duration::MAX);
        assert_eq!(
            (layer.config.ttl, layer.config.lease),
            (MAX_DURATION, MAX_DURATION)
        );
        assert!(
            std::time::Instant::now()
                .checked_add(MAX_DURATION)
                .is_some()
        );
        let layer = layer.ttl(Duration::ZERO).lease(Duration::ZERO);
        assert_eq!(layer.config.ttl, Duration::ZERO);
        assert_eq!(layer.config.lease, Duration::from_millis(3));
    }
}
