//! Background upkeep tasks of the stores (pruning expired records).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

/// A background task started once, on the Tokio runtime of the first call that has one.
///
/// Stores start their upkeep on first use rather than when built, so that building a store
/// needs no runtime; the task itself holds only a weak reference to its store and ends when the
/// store is dropped.
#[derive(Debug, Default)]
pub(crate) struct StartOnce(AtomicBool);

impl StartOnce {
    /// Spawns the future `task` returns, unless it was spawned before. Without a current
    /// runtime nothing is spawned, and the next call tries again.
    pub(crate) fn start<F>(&self, task: impl FnOnce() -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.0.load(Ordering::Relaxed) || self.0.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(task())),
            Err(_) => self.0.store(false, Ordering::Release),
        }
    }
}
