//! [`MemoryStore`](super::MemoryStore)'s upkeep: the background pruning of expired records, and
//! the rate-limited report of evictions.

use std::sync::Weak;
#[cfg(feature = "tracing")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Inner;
#[cfg(feature = "tracing")]
use super::{Nanos, nanos};

/// Evictions are reported as a `tracing` event at most this often.
#[cfg(feature = "tracing")]
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The background pruner: it holds only a weak reference, so it ends at its first tick after
/// the store is dropped, and only then: a tick that panics is reported and the next one runs.
pub(super) async fn prune_periodically(store: Weak<Inner>, period: Duration) {
    crate::store::util::every(store, period, |inner: std::sync::Arc<Inner>| async move {
        let pruned =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.prune(inner.now())));
        #[cfg(feature = "tracing")]
        if pruned.is_err() {
            tracing::error!(
                target: "tower_idempotency",
                "MemoryStore: pruning expired records panicked; the next run is in {period:?}"
            );
        }
        #[cfg(not(feature = "tracing"))]
        let _ = pruned;
    })
    .await;
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_idempotency",
        "MemoryStore dropped: its background pruning ended"
    );
}

/// The rate limit of the `tracing` event that reports evictions.
#[cfg(feature = "tracing")]
#[derive(Default)]
pub(super) struct Report {
    /// When the last event was emitted, plus one (0: never).
    last: AtomicU64,
    /// Evictions since the last event.
    pending: AtomicU64,
}

#[cfg(feature = "tracing")]
impl Report {
    pub(super) fn evicted(&self, count: u64, now: Nanos, total: u64) {
        self.pending.fetch_add(count, Ordering::Relaxed);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last - 1) >= nanos(REPORT_EVERY);
        let claimed = due
            && self
                .last
                .compare_exchange(last, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if !claimed {
            return;
        }
        let evicted = self.pending.swap(0, Ordering::Relaxed);
        tracing::warn!(
            target: "tower_idempotency",
            evicted,
            evicted_total = total,
            "MemoryStore is full: completed records were dropped before their expiry to make \
             room for new keys; a retry of a dropped record runs the handler again. Raise \
             max_entries or max_bytes, or shorten the TTL."
        );
    }
}
