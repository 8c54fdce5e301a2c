//! Waiting for the first request with a key instead of answering `409`
//! ([`IdempotencyLayer::wait_for_in_flight`](crate::IdempotencyLayer::wait_for_in_flight)).
//!
//! A duplicate that finds its key in flight registers as a waiter of that key in its layer's
//! [`Waiters`](waiters::Waiters), then asks the store again whenever something may have changed: when the holder
//! in this layer completes or releases the key (a notification), at a poll timer, and once at
//! its deadline. The answer it then gets is handled as a first `begin` would be: a replay, a
//! run of its own (the first was released: exactly one waiter gets the key, the others wait on
//! for that one), `422`, `503`, or `409` when the first is still running at the deadline.
//!
//! Why poll at all, and on every store: the registry is per layer, so a completion that does
//! not go through one of its guards notifies nobody here: another server of a fleet on a
//! shared store, another layer over the same `MemoryStore` (another route's), an operator's
//! `forget`, a dead holder's lease running out. Polling sees them all; the notification only
//! makes the common case (the holder runs in this layer) answer at once. The polls back off
//! (25 ms, doubling to 500 ms, with jitter) and are shared by the waiters of a key: the store
//! sees about one `begin` per waiting key per interval, not one per waiter. On the memory
//! store a poll is a map lookup; on Redis or PostgreSQL it is a round trip.
//!
//! Nothing here runs when the option is off: the flow never enters [`for_first`], and a guard
//! has no registry to notify.

use std::future::Future;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::pin::{Pin, pin};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) mod waiters;

use crate::config::Shared;
use crate::fingerprint::Fingerprint;
use crate::lease::timed;
use crate::metrics::StoreOp;
use crate::store::{Begin, IdempotencyStore, RecordKey, StoreError};
/// The first poll of a waiter comes this soon after it starts waiting; each later one twice as
/// late, up to [`LAST_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(25);
/// The longest interval between two polls of a waiting key.
const LAST_POLL: Duration = Duration::from_millis(500);
/// The longest wait taken as it is; longer ones (`Duration::MAX`) are cut to it.
const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The polls of one waiter: when the next is due, backing off with jitter.
struct Polls {
    interval: Duration,
    next: Instant,
    jitter: RandomState,
}

impl Polls {
    fn new() -> Self {
        let jitter = RandomState::new();
        let next = Instant::now() + jittered(FIRST_POLL, &jitter, 0);
        Self {
            interval: FIRST_POLL,
            next,
            jitter,
        }
    }

    /// The poll that was due is taken (or left to another waiter): the next one is due later.
    fn advance(&mut self) -> Duration {
        let due = self.interval;
        self.interval = (self.interval * 2).min(LAST_POLL);
        let seed = self.next.elapsed().subsec_nanos();
        self.next = Instant::now() + jittered(self.interval, &self.jitter, seed);
        due
    }
}

/// `interval`, give or take a quarter, so that waiters that started together spread out.
fn jittered(interval: Duration, random: &RandomState, seed: u32) -> Duration {
    let mut hasher = random.build_hasher();
    hasher.write_u32(seed);
    let fraction = (hasher.finish() % 1_000) as u32; // 0..1000
    interval * 3 / 4 + interval * fraction / 2_000
}

/// What ended a waiter's wait for a change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The key's holder in this layer completed or released it, or another waiter's poll found
    /// it settled.
    Notified,
    /// The poll timer.
    Poll,
    /// The deadline: one last look.
    Deadline,
}

/// Waits, as the layer is configured to, for the request that holds `record` to finish, and
/// answers what the store then says: [`Begin::Completed`] (replay), [`Begin::Acquired`] (the
/// first was released and this request got the key), [`Begin::Mismatch`] (the key is now
/// bound to another request), or [`Begin::InFlight`] when the first still runs at the
/// deadline, or when the layer already has its most waiters (then at once). A store call that
/// fails ends the wait with its error.
///
/// Boxed: its state lives in the flow's future only while a request waits.
pub(crate) fn for_first<'a, St, T, E>(
    shared: &'a Shared<St, T, E>,
    record: &'a RecordKey,
    fingerprint: &'a Fingerprint,
) -> Pin<Box<dyn Future<Output = Result<Begin, StoreError>> + Send + 'a>>
where
    St: IdempotencyStore,
    T: Send + Sync,
    E: Send + Sync,
{
    Box::pin(wait(shared, record, fingerprint))
}

async fn wait<St, T, E>(
    shared: &Shared<St, T, E>,
    record: &RecordKey,
    fingerprint: &Fingerprint,
) -> Result<Begin, StoreError>
where
    St: IdempotencyStore,
{
    let config = &shared.config;
    let Some(wait) = config.wait else {
        return Ok(Begin::InFlight);
    };
    let Some(waiting) = shared.waiters.join(record, config.max_waiters) else {
        return Ok(Begin::InFlight);
    };
    let deadline = Instant::now() + wait.min(LONGEST_WAIT);
    let key = &waiting.key;
    // Registered from here on. A completion between the store's first answer and this point
    // notified nobody: the first poll, soon, finds it.
    let mut notified = pin!(key.settled.notified());
    let mut polls = Polls::new();
    loop {
        let wake = match tokio::time::timeout_at(polls.next.min(deadline), notified.as_mut()).await
        {
            Ok(()) => Wake::Notified,
            Err(_) if Instant::now() >= deadline => Wake::Deadline,
            Err(_) => Wake::Poll,
        };
        if wake == Wake::Poll && !key.claim_poll(polls.advance()) {
            continue; // another waiter of this key polled just now; it wakes us if it changed
        }
        // Registered for the next notification before asking the store: one that comes while
        // the store answers is not lost.
        notified.set(key.settled.notified());
        let begin = shared.store.begin(record, fingerprint, config.lease);
        match timed(StoreOp::Begin, config.store_timeout, begin).await? {
            Begin::InFlight if Instant::now() < deadline => {}
            Begin::InFlight => return Ok(Begin::InFlight),
            // This request holds the key now: the other waiters wait on for it.
            acquired @ Begin::Acquired(_) => return Ok(acquired),
            settled => {
                if wake == Wake::Poll {
                    // The other waiters of this key skipped this poll: they look now.
                    key.settled.notify_waiters();
                }
                return Ok(settled);
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::waiters::{MAX_WAITERS_PER_KEY, Waiters};
    use super::*;
    use crate::tenant::TenantId;

    fn key(name: &str) -> RecordKey {
        RecordKey::new(TenantId::from_bytes([7; 32]), name)
    }

    #[tokio::test]
    async fn bounds_per_key_and_in_all_and_leaves_nothing() {
        let waiters = Arc::<Waiters>::default();
        let a: Vec<_> = (0..MAX_WAITERS_PER_KEY)
            .map(|_| waiters.join(&key("a"), 100).expect("under the bounds"))
            .collect();
        assert!(waiters.join(&key("a"), 100).is_none(), "per key");
        let b: Vec<_> = (0..100 - MAX_WAITERS_PER_KEY)
            .map(|_| waiters.join(&key("b"), 100).expect("under the bounds"))
            .collect();
        assert!(waiters.join(&key("c"), 100).is_none(), "in all");
        assert_eq!((waiters.requests(), waiters.keys()), (100, 2));
        drop(a);
        assert_eq!((waiters.requests(), waiters.keys()), (100 - 64, 1));
        let c = waiters.join(&key("c"), 100).expect("room again");
        drop((b, c));
        assert_eq!((waiters.requests(), waiters.keys()), (0, 0));
    }

    #[tokio::test]
    async fn wake_reaches_the_waiters_of_the_key_only() {
        let waiters = Arc::<Waiters>::default();
        let (a, b) = (
            waiters.join(&key("a"), 10).unwrap(),
            waiters.join(&key("b"), 10).unwrap(),
        );
        let mut on_a = pin!(a.key.settled.notified());
        let mut on_b = pin!(b.key.settled.notified());
        on_a.as_mut().enable();
        on_b.as_mut().enable();
        waiters.wake(&key("a"));
        waiters.wake(&key("nobody"));
        assert!(futures_ready(on_a.as_mut()));
        assert!(!futures_ready(on_b.as_mut()));
    }

    fn futures_ready<F: Future>(future: Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        future.poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn one_poll_per_key_per_interval() {
        let waiters = Arc::<Waiters>::default();
        let (a, b) = (
            waiters.join(&key("k"), 10).unwrap(),
            waiters.join(&key("k"), 10).unwrap(),
        );
        assert!(Arc::ptr_eq(&a.key, &b.key));
        assert!(a.key.claim_poll(Duration::from_millis(100)));
        assert!(!b.key.claim_poll(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(b.key.claim_poll(Duration::from_millis(100)));
        assert!(!a.key.claim_poll(Duration::from_millis(100)));
    }

    #[test]
    fn polls_back_off_to_the_last_interval_with_jitter() {
        let random = RandomState::new();
        for seed in 0..1_000 {
            let d = jittered(Duration::from_millis(100), &random, seed);
            assert!(d >= Duration::from_millis(75) && d < Duration::from_millis(125));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut polls = Polls::new();
            let due: Vec<_> = (0..7).map(|_| polls.advance().as_millis()).collect();
            assert_eq!(due, [25, 50, 100, 200, 400, 500, 500]);
        });
    }
}
