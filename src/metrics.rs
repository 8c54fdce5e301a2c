//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! With the feature on, the layer records four metrics with whatever recorder the application
//! installed (`metrics-exporter-prometheus`, say; see `examples/metrics.rs`):
//!
//! | name                                      | type      | labels            |
//! |-------------------------------------------|-----------|-------------------|
//! | [`idempotency_requests_total`][REQUESTS_TOTAL] | counter | `outcome`       |
//! | [`idempotency_store_call_duration_seconds`][STORE_CALL_DURATION_SECONDS] | histogram | `op`, `result` |
//! | [`idempotency_detached_runs`][DETACHED_RUNS] | gauge    |                   |
//! | [`idempotency_evicted_total`][EVICTED_TOTAL] | counter  |                   |
//!
//! The names are public API: dashboards and alerts depend on them. Without a recorder, or
//! without the feature, recording costs nothing.

use std::time::Duration;

/// Counter, label `outcome` ([`Outcome::as_str`](crate::Outcome::as_str): `executed`, `replayed`, `in_progress`,
/// `mismatch`, `released`, `missing_key`, `invalid_key`, `too_large`, `store_error`,
/// `bypassed`, ...): requests the layer answered or ran. Requests that pass through untouched
/// (a method not covered, no key when none is required) are not counted.
pub const REQUESTS_TOTAL: &str = "idempotency_requests_total";
/// Histogram (seconds), labels `op` (`begin`, `renew`, `complete`, `release`) and `result`
/// (`ok`, `error`): how long each store call took, timeouts included.
pub const STORE_CALL_DURATION_SECONDS: &str = "idempotency_store_call_duration_seconds";
/// Gauge: handlers still running after their client went away.
pub const DETACHED_RUNS: &str = "idempotency_detached_runs";
/// Counter: completed records a full store dropped before their expiry to make room.
pub const EVICTED_TOTAL: &str = "idempotency_evicted_total";

/// Describes the four metrics (help text and unit) to the recorder installed now, for
/// exporters that show descriptions (Prometheus' `# HELP`). Call it once, after installing the
/// recorder; recording works without it.
///
/// ```
/// tower_idempotency::metrics::describe();
/// ```
#[cfg(feature = "metrics")]
pub fn describe() {
    use metrics::Unit;

    metrics::describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Requests the idempotency layer answered or ran, by outcome."
    );
    metrics::describe_histogram!(
        STORE_CALL_DURATION_SECONDS,
        Unit::Seconds,
        "Idempotency store calls, by operation and result."
    );
    metrics::describe_gauge!(
        DETACHED_RUNS,
        Unit::Count,
        "Handlers still running after their client went away."
    );
    metrics::describe_counter!(
        EVICTED_TOTAL,
        Unit::Count,
        "Completed idempotency records dropped before their expiry to make room."
    );
}

/// A store call, for the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Begin,
    Renew,
    Complete,
    Release,
}

/// Counts one request by its outcome's label ([`Outcome::as_str`](crate::Outcome::as_str)).
///
/// Each label is written out, so that the metric's key is a `static`: naming a metric then
/// allocates nothing, with or without a recorder.
#[inline]
pub(crate) fn outcome(label: &'static str) {
    #[cfg(feature = "metrics")]
    {
        macro_rules! count {
            ($($known:literal),*) => {
                match label {
                    $($known => metrics::counter!(REQUESTS_TOTAL, "outcome" => $known).increment(1),)*
                    other => metrics::counter!(REQUESTS_TOTAL, "outcome" => other).increment(1),
                }
            };
        }
        count!(
            "executed",
            "replayed",
            "in_progress",
            "mismatch",
            "missing_key",
            "invalid_key",
            "too_large",
            "body_error",
            "store_error",
            "bypassed",
            "released",
            "not_stored",
            "tenant_rejected",
            "tenant_missing",
            "overloaded"
        );
    }
    #[cfg(not(feature = "metrics"))]
    let _ = label;
}

/// Records how long a store call took, and whether it succeeded.
#[inline]
pub(crate) fn store_call(op: StoreOp, ok: bool, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    {
        // Each label pair written out, so that the key is a `static` (see `outcome`).
        macro_rules! record {
            ($op:literal) => {
                if ok {
                    metrics::histogram!(STORE_CALL_DURATION_SECONDS, "op" => $op, "result" => "ok")
                        .record(elapsed.as_secs_f64())
                } else {
                    metrics::histogram!(STORE_CALL_DURATION_SECONDS, "op" => $op, "result" => "error")
                        .record(elapsed.as_secs_f64())
                }
            };
        }
        match op {
            StoreOp::Begin => record!("begin"),
            StoreOp::Renew => record!("renew"),
            StoreOp::Complete => record!("complete"),
            StoreOp::Release => record!("release"),
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (op, ok, elapsed);
}

/// Whether store calls are timed: reading the clock twice per call is skipped when nothing
/// records the result.
#[inline]
pub(crate) const fn times_store_calls() -> bool {
    cfg!(feature = "metrics")
}

/// A handler went on running after its client left (`+1`), or such a run ended (`-1`).
#[inline]
pub(crate) fn detached_runs(delta: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(DETACHED_RUNS).increment(delta);
    #[cfg(not(feature = "metrics"))]
    let _ = delta;
}

/// Counts completed records dropped early to make room.
#[inline]
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn evicted(count: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!(EVICTED_TOTAL).increment(count);
    #[cfg(not(feature = "metrics"))]
    let _ = count;
}
