//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! Every function here is a no-op without the feature, so callers need no `cfg` of their own.
//! The names are public API: dashboards and alerts depend on them.

use std::time::Duration;

use crate::Outcome;

/// Counter, label `outcome`: requests the layer handled (and passed through without a key).
pub const REQUESTS_TOTAL: &str = "idempotency_requests_total";
/// Histogram (seconds), labels `op` (`begin`, `renew`, `complete`, `release`) and `result`
/// (`ok`, `error`): how long each store call took, timeouts included.
pub const STORE_CALL_DURATION_SECONDS: &str = "idempotency_store_call_duration_seconds";
/// Gauge: handlers still running after their client went away.
pub const DETACHED_RUNS: &str = "idempotency_detached_runs";
/// Counter: completed records a full store dropped before their expiry to make room.
pub const EVICTED_TOTAL: &str = "idempotency_evicted_total";

/// A store call, for the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Begin,
    Renew,
    Complete,
    Release,
}

impl StoreOp {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::Renew => "renew",
            Self::Complete => "complete",
            Self::Release => "release",
        }
    }
}

/// Counts one request by its outcome.
#[inline]
pub(crate) fn outcome(outcome: Outcome) {
    #[cfg(feature = "metrics")]
    metrics::counter!(REQUESTS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// Records how long a store call took, and whether it succeeded.
#[inline]
pub(crate) fn store_call(op: StoreOp, ok: bool, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(
        STORE_CALL_DURATION_SECONDS,
        "op" => op.as_str(),
        "result" => if ok { "ok" } else { "error" },
    )
    .record(elapsed.as_secs_f64());
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
