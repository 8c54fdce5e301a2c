//! What two or more stores share: background upkeep (a task kept running, a periodic loop,
//! the bound on its period), locks that shrug off poisoning, whole milliseconds with their
//! bound, and the seeded hash of a record key in an in-process table.
#![cfg_attr(
    not(any(feature = "memory", feature = "postgres", feature = "sqlx")),
    allow(dead_code)
)]

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use foldhash::SharedSeed;
use foldhash::fast::SeedableRandomState;

use super::RecordKey;

/// The hasher of in-process tables of records (the memory store's, the replay cache's):
/// foldhash, keyed from the operating system's randomness (through the standard library's
/// `RandomState`) per process and per table set, so that keys chosen by clients cannot be made
/// to collide. Only this process's tables use it; a record's identity across a fleet is the
/// [`RecordKey`] itself, never this hash.
pub(crate) fn map_hasher() -> SeedableRandomState {
    static SHARED: OnceLock<SharedSeed> = OnceLock::new();
    let shared = SHARED.get_or_init(|| SharedSeed::from_u64(random_u64()));
    SeedableRandomState::with_seed(random_u64(), shared)
}

/// 64 random bits, from the keys the standard library draws from the operating system.
pub(crate) fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The hash of `key` in a table of `hasher`: 8 bytes of its tenant (already a SHA-256 digest)
/// as one word, and the key's bytes, in one pass.
#[inline]
pub(crate) fn record_hash(hasher: &SeedableRandomState, key: &RecordKey) -> u64 {
    let mut hasher = hasher.build_hasher();
    let &[a, b, c, d, e, f, g, h, ..] = key.tenant().as_bytes();
    hasher.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    hasher.write(key.text().as_bytes());
    hasher.finish()
}

/// A background task kept running: started on the Tokio runtime of the first call that has
/// one, and started again by a later call once that runtime is gone (a store first used on a
/// runtime of its own, a start-up check or a warm-up, goes on to serve on another).
///
/// Stores start their upkeep on first use rather than when built, so that building a store
/// needs no runtime; the task itself holds only a weak reference to its store and ends when the
/// store is dropped.
#[derive(Debug, Default)]
pub(crate) struct KeepRunning(Arc<AtomicBool>);

impl KeepRunning {
    /// Spawns the future `task` returns, unless it runs already. Without a current runtime
    /// nothing is spawned, and the next call tries again.
    pub(crate) fn start<F>(&self, task: impl FnOnce() -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.0.load(Ordering::Relaxed) || self.0.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // Cleared when the task ends or is dropped with its runtime.
                let running = Running(self.0.clone());
                let task = task();
                drop(runtime.spawn(async move {
                    let _running = running;
                    task.await;
                }));
            }
            Err(_) => self.0.store(false, Ordering::Release),
        }
    }
}

/// Marks a [`KeepRunning`] task as running while it lives.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The longest period an upkeep task accepts: one year. Longer ones would overflow the timer's
/// arithmetic (a task that panics at its start dies without a word), and would not clean
/// anything a store needs cleaned.
pub(crate) const MAX_PERIOD: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// Checks an upkeep period as every store's builder does: not zero, at most [`MAX_PERIOD`].
///
/// # Panics
///
/// With a message naming `setting`, when `period` is out of bounds.
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn check_period(setting: &str, period: std::time::Duration) {
    assert!(!period.is_zero(), "{setting} must be longer than zero");
    assert!(
        period <= MAX_PERIOD,
        "{setting} must be at most 365 days, got {period:?}"
    );
}

/// Checks an upkeep period as [`check_period`] does, for a builder that reports errors rather
/// than panicking: [`StoreErrorKind::Other`](super::StoreErrorKind::Other) naming `store`.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) fn check_period_or_err(
    store: &str,
    period: std::time::Duration,
) -> Result<(), super::StoreError> {
    if period.is_zero() || period > MAX_PERIOD {
        return Err(super::StoreError::msg(
            super::StoreErrorKind::Other,
            format!("{store}: the cleanup interval must not be zero nor longer than a year"),
        ));
    }
    Ok(())
}

/// Runs `tick` on `store` every `period`, from one period after the start, until the store is
/// dropped: the task holds only a weak reference, so it ends at its first tick after that.
///
/// A tick that fails is the tick's business (it is retried at the next one); nothing here can
/// end the loop early, and a period past [`MAX_PERIOD`] is clamped to it rather than
/// overflowing.
pub(crate) async fn every<T, F, Fut>(
    store: std::sync::Weak<T>,
    period: std::time::Duration,
    tick: F,
) where
    F: Fn(std::sync::Arc<T>) -> Fut,
    Fut: Future<Output = ()>,
{
    let period = period.clamp(std::time::Duration::from_millis(1), MAX_PERIOD);
    let start = tokio::time::Instant::now() + period;
    let mut interval = tokio::time::interval_at(start, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        tick(store).await;
    }
}

/// Locks `mutex`. A panic never happens under the stores' locks; if one did, what the lock
/// guards is still whole (every change under it is one step), so the poison is ignored.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `lock` (see [`lock`] for poisoning).
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `lock` (see [`lock`] for poisoning).
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The longest duration a shared store writes, 100 years in milliseconds: longer ones are
/// clamped to it.
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
pub(crate) const MAX_MILLIS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// A duration as whole milliseconds, as the shared stores write leases and TTLs: rounded up,
/// at least 1, at most [`MAX_MILLIS`].
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
pub(crate) fn whole_millis(duration: std::time::Duration) -> u64 {
    let ms = duration.as_nanos().div_ceil(1_000_000);
    ms.clamp(1, u128::from(MAX_MILLIS)) as u64
}

/// A `begin` sent to a shared store, until its answer is read.
///
/// Dropped before [`answered`](Self::answered) (the request's store call ran past its timeout,
/// its client went away, or the answer was lost on the way back), the statement may still take
/// effect at the store, late, and leave an in-flight record under a token no request holds: its
/// retries would get `409` until that record's lease ends, for a request that never ran. A
/// background task then releases that token's record, now and a few times more over the lease
/// (the late statement may come after the first tries). A release is fenced by the token: it
/// never touches a record another request holds.
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
pub(crate) struct SentBegin<'a, S: super::IdempotencyStore + Clone + 'static> {
    store: Option<&'a S>,
    key: &'a super::RecordKey,
    token: super::LockToken,
    lease: std::time::Duration,
}

#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
impl<'a, S: super::IdempotencyStore + Clone + 'static> SentBegin<'a, S> {
    pub(crate) fn new(
        store: &'a S,
        key: &'a super::RecordKey,
        token: super::LockToken,
        lease: std::time::Duration,
    ) -> Self {
        Self {
            store: Some(store),
            key,
            token,
            lease,
        }
    }

    /// The store answered: whatever the answer, nothing is left to clean up here.
    pub(crate) fn answered(&mut self) {
        self.store = None;
    }
}

#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
impl<S: super::IdempotencyStore + Clone + 'static> Drop for SentBegin<'_, S> {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // A store that hangs times out every request's `begin`: past this many cleanups under
        // way, the leases end the records by themselves rather than more tasks pile up.
        static UNDER_WAY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let Some(share) = crate::util::Share::take(&UNDER_WAY, 1, 1024) else {
            return;
        };
        let (store, key, token, lease) = (store.clone(), self.key.clone(), self.token, self.lease);
        runtime.spawn(async move {
            let _share = share;
            let started = tokio::time::Instant::now();
            let mut wait = std::time::Duration::from_millis(250);
            loop {
                // Released: the late record is gone. Any other answer (not there yet, or the
                // store still down): try again, until the lease would have ended it anyway.
                let release = store.release(&key, token);
                let timeout = std::time::Duration::from_secs(2);
                if let Ok(Ok(())) = tokio::time::timeout(timeout, release).await {
                    return;
                }
                if started.elapsed() + wait >= lease {
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(4));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn periods_are_checked() {
        super::check_period("p", Duration::from_secs(60));
        super::check_period("p", super::MAX_PERIOD);
        assert!(std::panic::catch_unwind(|| super::check_period("p", Duration::ZERO)).is_err());
        let too_long = super::MAX_PERIOD + Duration::from_secs(1);
        assert!(std::panic::catch_unwind(|| super::check_period("p", too_long)).is_err());
        assert!(std::panic::catch_unwind(|| super::check_period("p", Duration::MAX)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_until_the_store_is_dropped() {
        let store = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(super::every(
            Arc::downgrade(&store),
            Duration::from_secs(10),
            |store: Arc<AtomicUsize>| async move {
                store.fetch_add(1, Ordering::SeqCst);
            },
        ));
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert_eq!(store.load(Ordering::SeqCst), 3);
        drop(store);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_period_does_not_kill_the_task() {
        let store = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(super::every(
            Arc::downgrade(&store),
            Duration::MAX,
            |_: Arc<AtomicUsize>| async {},
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "still waiting for its first tick");
        task.abort();
    }
}
