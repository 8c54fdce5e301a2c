//! What the layer did with a request, for logs and metrics.

use std::fmt;

/// What the layer did with a keyed request.
///
/// Put in the extensions of every response to a request the layer handled (requests that pass
/// through untouched have none), so you can count outcomes with your metrics library:
///
/// ```
/// use tower_idempotency::Outcome;
///
/// fn record(response: &http::Response<()>) {
///     if let Some(outcome) = response.extensions().get::<Outcome>() {
///         // e.g. metrics::counter!("idempotency", "outcome" => outcome.as_str()).increment(1);
///         let _ = outcome.as_str();
///     }
/// }
/// ```
///
/// With the `tracing` feature, each outcome is also a `tracing` event (target
/// `tower_idempotency`) carrying a hash of the key (never the key itself), a hash of the tenant
/// and the time the layer took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its response was stored (or, when over the response cap, recorded as
    /// not replayable). A handler that ran on after its client went away is `Executed` too: its
    /// `tracing` event and its request's span carry `detached = true`.
    Executed,
    /// A stored response was replayed; the handler did not run.
    Replayed,
    /// `409`: a request with the same key was still in flight.
    InProgress,
    /// `422`: the key was bound to a different request.
    Mismatch,
    /// `400`: the key was required and missing.
    MissingKey,
    /// `400`: the key was invalid.
    InvalidKey,
    /// `413`: the request body was over the limit.
    TooLarge,
    /// The request body could not be read (the client sent less than it announced, or the
    /// connection failed).
    BodyError,
    /// `503`: the store failed or timed out, and the layer is fail-closed; nothing ran.
    StoreError,
    /// The store failed and the layer is fail-open: the handler ran without protection.
    Bypassed,
    /// The handler ran, its response was not stored (5xx, 408, 429 and the refusals that say the
    /// operation did not run, by default, or a handler's [`CacheDecision::Skip`](crate::CacheDecision))
    /// and the key was released so that a retry runs again. Also reported, as an event, for a
    /// handler that panicked or was cancelled.
    Released,
    /// `409`: the key completed but its response was too large to store.
    NotStored,
    /// The tenant extractor rejected the request.
    TenantRejected,
    /// `400`: the request named no tenant and the layer has no shared scope.
    TenantMissing,
    /// `503`: the layer was working on its most keyed requests at once (overall or for the
    /// tenant); nothing ran.
    Overloaded,
}

impl Outcome {
    /// A stable snake_case name, for metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InProgress => "in_progress",
            Self::Mismatch => "mismatch",
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::TooLarge => "too_large",
            Self::BodyError => "body_error",
            Self::StoreError => "store_error",
            Self::Bypassed => "bypassed",
            Self::Released => "released",
            Self::NotStored => "not_stored",
            Self::TenantRejected => "tenant_rejected",
            Self::TenantMissing => "tenant_missing",
            Self::Overloaded => "overloaded",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first 8 bytes of a hash, in hex: enough to correlate events, never the value itself.
#[cfg(feature = "tracing")]
fn short_hex(bytes: &[u8]) -> String {
    crate::util::hex(&bytes[..8])
}

/// A tag for logs: 8 bytes of HMAC-SHA256 of `kind` and `value` under a key drawn at random
/// once per process. Stable within a process, so one request's events and a key's retries can
/// be told apart and followed; never a value anyone can turn back into a key or a credential
/// by trying candidates, since the key never leaves the process.
#[cfg(feature = "tracing")]
fn log_tag(kind: &[u8], value: &[u8]) -> String {
    use std::sync::OnceLock;
    static KEY: OnceLock<crate::tenant::Sealer> = OnceLock::new();
    let sealer = KEY.get_or_init(|| crate::tenant::Sealer::new(&crate::util::random_bytes()));
    let mut message = Vec::with_capacity(kind.len() + 1 + value.len());
    message.extend_from_slice(kind);
    message.push(0);
    message.extend_from_slice(value);
    short_hex(&sealer.mac(&message))
}

/// A tag of an idempotency key, for logs (see [`log_tag`]).
#[cfg(feature = "tracing")]
fn key_hash(key: &[u8]) -> String {
    log_tag(b"key", key)
}

/// A tag of a tenant, for logs (see [`log_tag`]).
#[cfg(feature = "tracing")]
fn tenant_hash(tenant: &crate::TenantId) -> String {
    log_tag(b"tenant", tenant.as_bytes())
}

thread_local! {
    /// Set while a detached run is polled, so that its events say so.
    static DETACHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the code running now as a detached run's (or no longer).
pub(crate) fn set_detached_run(detached: bool) {
    DETACHED.with(|cell| cell.set(detached));
}

/// Whether the code running now is a detached run's.
#[cfg_attr(not(feature = "tracing"), allow(dead_code))]
pub(crate) fn in_detached_run() -> bool {
    DETACHED.with(std::cell::Cell::get)
}

/// When the layer started on a request, for the time its `tracing` event reports. Nothing
/// reads the clock without the `tracing` feature, nor when no subscriber wants the layer's
/// events (the least verbose of them is a warning).
#[cfg(feature = "tracing")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started(Option<tokio::time::Instant>);

/// When the layer started on a request, for the time its `tracing` event reports. Without the
/// `tracing` feature nothing reads the clock.
#[cfg(not(feature = "tracing"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started;

impl Started {
    /// Now.
    #[inline]
    pub(crate) fn now() -> Self {
        #[cfg(feature = "tracing")]
        return Self(
            tracing::enabled!(target: "tower_idempotency", tracing::Level::WARN)
                .then(tokio::time::Instant::now),
        );
        #[cfg(not(feature = "tracing"))]
        return Self;
    }
}

/// Emits the `tracing` event of an outcome. The key and tenant are hashed, and the time taken
/// read, only when the event is enabled.
#[cfg(feature = "tracing")]
pub(crate) fn emit(
    outcome: Outcome,
    key: Option<&[u8]>,
    tenant: Option<&crate::TenantId>,
    started: Started,
    error: Option<&crate::StoreError>,
) {
    use tracing::Level;

    crate::metrics::outcome(outcome.as_str());
    if let Some(span) = own_span() {
        span.record("outcome", outcome.as_str());
    }
    let level = match outcome {
        Outcome::StoreError | Outcome::Bypassed | Outcome::Overloaded => Level::WARN,
        _ => Level::DEBUG,
    };
    macro_rules! event {
        ($level:expr) => {
            if tracing::enabled!(target: "tower_idempotency", $level) {
                let key_hash = key.map(key_hash);
                let tenant_hash = tenant.map(tenant_hash);
                tracing::event!(
                    target: "tower_idempotency",
                    $level,
                    outcome = outcome.as_str(),
                    key_hash = key_hash.as_deref(),
                    tenant_hash = tenant_hash.as_deref(),
                    elapsed_us = started.0.map(|at| at.elapsed().as_micros() as u64),
                    detached = in_detached_run(),
                    error = error.map(tracing::field::display),
                    "idempotency {}",
                    outcome.as_str()
                );
            }
        };
    }
    if level == Level::WARN {
        event!(Level::WARN);
    } else {
        event!(Level::DEBUG);
    }
}

/// Emits a warning for a store call that failed once the request held its key (a renewal, a
/// completion, a release): the request still got its answer, but the record may now stay in
/// flight until its lease ends.
#[cfg(feature = "tracing")]
pub(crate) fn store_failure(
    call: &'static str,
    err: &crate::StoreError,
    record: &crate::RecordKey,
) {
    if tracing::enabled!(target: "tower_idempotency", tracing::Level::WARN) {
        tracing::warn!(
            target: "tower_idempotency",
            call,
            error = %err,
            key_hash = key_hash(record.text().as_bytes()),
            "idempotency store call failed while holding a key"
        );
    }
}

/// Emits a warning for a [`ClaimError`](crate::ClaimError) a handler answered with: its client
/// gets a generic problem, the error goes to the logs whole.
#[cfg(all(feature = "tracing", any(feature = "postgres", feature = "sqlx")))]
pub(crate) fn claim_failure(err: &crate::ClaimError) {
    tracing::warn!(
        target: "tower_idempotency",
        kind = ?err.kind(),
        error = %err,
        "idempotency claim failed"
    );
}

/// The span of one keyed request (level `INFO`, target `tower_idempotency`, name
/// `idempotency`): the handler's own events nest under it. It carries hashes of the key and the
/// tenant (never the key itself), the method and the path; the outcome, whether the handler ran
/// on after its client left, and the store calls' durations are recorded on it when known.
/// Without the `tracing` feature it is nothing.
#[derive(Debug, Clone)]
pub(crate) struct RequestSpan(#[cfg(feature = "tracing")] tracing::Span);

impl RequestSpan {
    /// The span of a keyed request.
    #[cfg(feature = "tracing")]
    pub(crate) fn new(parts: &http::request::Parts, key: &[u8], tenant: &crate::TenantId) -> Self {
        use tracing::field::Empty;
        // No subscriber wants it: no span, and no tag computed for it.
        if !tracing::enabled!(target: "tower_idempotency", tracing::Level::INFO) {
            return Self(tracing::Span::none());
        }
        Self(tracing::info_span!(
            target: "tower_idempotency",
            "idempotency",
            key_hash = key_hash(key),
            tenant_hash = tenant_hash(tenant),
            method = %parts.method,
            path = parts.uri.path(),
            outcome = Empty,
            detached = Empty,
            store_begin_us = Empty,
            store_complete_us = Empty,
            store_release_us = Empty,
        ))
    }

    /// The span of a keyed request.
    #[cfg(not(feature = "tracing"))]
    #[inline(always)]
    pub(crate) fn new(_: &http::request::Parts, _: &[u8], _: &crate::TenantId) -> Self {
        Self()
    }

    /// The span the code runs in now.
    #[inline]
    pub(crate) fn current() -> Self {
        #[cfg(feature = "tracing")]
        return Self(tracing::Span::current());
        #[cfg(not(feature = "tracing"))]
        return Self();
    }

    /// Runs `f` inside the span.
    #[inline]
    pub(crate) fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "tracing")]
        return self.0.in_scope(f);
        #[cfg(not(feature = "tracing"))]
        return f();
    }
}

/// The current span when it is a keyed request's own (see [`RequestSpan`]): the fields this
/// crate records go there, never into a span of the application's that happens to be current
/// (an answer decided before the request's span exists, or with that span filtered out).
#[cfg(feature = "tracing")]
fn own_span() -> Option<tracing::Span> {
    let span = tracing::Span::current();
    let ours = span
        .metadata()
        .is_some_and(|m| m.name() == "idempotency" && m.target() == "tower_idempotency");
    ours.then_some(span)
}

/// Whether the current request's span records store call durations.
#[cfg(feature = "tracing")]
#[inline]
pub(crate) fn span_records_store_calls() -> bool {
    own_span().is_some()
}

/// Records a store call's duration on the current request's span.
#[cfg(feature = "tracing")]
pub(crate) fn record_store_call(op: crate::metrics::StoreOp, elapsed: std::time::Duration) {
    use crate::metrics::StoreOp;
    let field = match op {
        StoreOp::Begin => "store_begin_us",
        StoreOp::Complete => "store_complete_us",
        StoreOp::Release => "store_release_us",
        StoreOp::Renew => return,
    };
    if let Some(span) = own_span() {
        span.record(field, elapsed.as_micros() as u64);
    }
}

/// Reports a handler that goes on running after its client left (in the request's span).
#[cfg(feature = "tracing")]
pub(crate) fn detached() {
    if let Some(span) = own_span() {
        span.record("detached", true);
    }
    tracing::debug!(
        target: "tower_idempotency",
        "client went away; the handler runs to its end"
    );
}

/// Reports a detached run that a runtime shutdown cancelled: its key keeps its lease.
#[cfg(feature = "tracing")]
pub(crate) fn lease_kept(record: &crate::RecordKey) {
    tracing::warn!(
        target: "tower_idempotency",
        key_hash = key_hash(record.text().as_bytes()),
        "detached run cancelled by shutdown; its key is taken over once its lease ends"
    );
}

#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn span_records_store_calls() -> bool {
    false
}

#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn record_store_call(_op: crate::metrics::StoreOp, _elapsed: std::time::Duration) {}

#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn detached() {}

#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn lease_kept(_record: &crate::RecordKey) {}

#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn store_failure(
    _call: &'static str,
    _err: &crate::StoreError,
    _record: &crate::RecordKey,
) {
}

#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn emit(
    outcome: Outcome,
    _key: Option<&[u8]>,
    _tenant: Option<&crate::TenantId>,
    _started: Started,
    _error: Option<&crate::StoreError>,
) {
    crate::metrics::outcome(outcome.as_str());
}

#[cfg(all(test, feature = "tracing"))]
mod tests {
    use super::Started;

    /// The clock is read for the event's time only when a subscriber wants the layer's events.
    #[test]
    fn the_clock_is_read_only_for_a_subscriber() {
        let none = tracing::subscriber::NoSubscriber::default();
        let started = tracing::subscriber::with_default(none, Started::now);
        assert!(started.0.is_none());
        let warnings = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(std::io::sink)
            .finish();
        let started = tracing::subscriber::with_default(warnings, Started::now);
        assert!(started.0.is_some());
    }
}
