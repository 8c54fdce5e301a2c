//! Holding a key: the guard that completes or releases an in-flight record, the lease renewal
//! that runs beside the handler, and the timeout every store call runs under.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::metrics::{self, StoreOp};
use crate::outcome::{self, Outcome, Started};
use crate::store::{IdempotencyStore, LockToken, RecordKey, Settled, StoreError, StoreErrorKind};
use crate::stored::StoredResponse;
use crate::wait::waiters::Waiters;

/// Runs a store call with a timeout; a call that runs past it is a [`StoreErrorKind::Timeout`].
///
/// The timer is armed only if the call does not answer at its first poll: a store that answers
/// at once (the memory store always does) costs no timer, and no clock read unless metrics or
/// the request's span record the call's duration.
pub(crate) fn timed<T, F>(op: StoreOp, timeout: Duration, call: F) -> Timed<F>
where
    F: Future<Output = Result<T, StoreError>>,
{
    Timed {
        call,
        clock: Some(CallClock::start(op)),
        timeout,
        timer: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`timed`]: the call in place, and its timer in an allocation of its own
    /// made only when the call is pending, so that a call that answers at once (every call to
    /// the memory store) adds a few words to its caller's future, not a timer.
    pub(crate) struct Timed<F> {
        #[pin]
        call: F,
        clock: Option<CallClock>,
        timeout: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<T, F: Future<Output = Result<T, StoreError>>> Future for Timed<F> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.call.poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                let timeout = *this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Err(StoreError::timeout(timeout))
            }
        };
        if let Some(clock) = this.clock.take() {
            clock.stop(result.is_ok());
        }
        Poll::Ready(result)
    }
}

/// Times a store call for the metrics and the request's span, when either records it.
struct CallClock {
    op: StoreOp,
    started: Option<std::time::Instant>,
}

impl CallClock {
    #[inline]
    fn start(op: StoreOp) -> Self {
        let timed = metrics::times_store_calls() || outcome::span_records_store_calls();
        Self {
            op,
            started: timed.then(std::time::Instant::now),
        }
    }

    #[inline]
    fn stop(self, ok: bool) {
        if let Some(started) = self.started {
            let elapsed = started.elapsed();
            metrics::store_call(self.op, ok, elapsed);
            outcome::record_store_call(self.op, elapsed);
        }
    }
}

/// A store call under way, boxed: a renewal runs only while a handler is pending.
type Renewal<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

pin_project_lite::pin_project! {
    /// The future of [`Guard::renewing`]: the handler's future in place, beside the timer and
    /// the renewal under way, each in an allocation of its own made only once the handler is
    /// pending, so that a handler that answers at once costs no timer and no clock read. (An
    /// `async fn` would keep the handler's future twice: once as its argument, once pinned.)
    pub(crate) struct Renewing<'a, St: IdempotencyStore, F> {
        guard: &'a Guard<St>,
        #[pin]
        handler: F,
        lease: Duration,
        tick: Option<Pin<Box<tokio::time::Sleep>>>,
        renewal: Option<Renewal<'a>>,
    }
}

impl<'a, St: IdempotencyStore, F: Future> Future for Renewing<'a, St, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.handler.poll(cx) {
            return Poll::Ready(output);
        }
        let guard: &'a Guard<St> = this.guard;
        let (lease, period) = (*this.lease, *this.lease / 3);
        let timer = this
            .tick
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
        while timer.as_mut().poll(cx).is_ready() {
            let next = timer.deadline() + period;
            timer.as_mut().reset(next);
            // A renewal still running when the next is due stands for both.
            if this.renewal.is_none() {
                let call = guard.store.renew(&guard.key, guard.token, lease);
                *this.renewal = Some(Box::pin(timed(StoreOp::Renew, guard.timeout, call)));
            }
        }
        if guard.poll_renewal(this.renewal.as_mut().map(Pin::as_mut), cx) {
            *this.renewal = None;
        }
        Poll::Pending
    }
}

thread_local! {
    /// Set while a detached run is dropped without finishing: its runtime is shutting down, and
    /// its handler may have done part of its work, so its key keeps its lease instead of being
    /// released.
    static KEEP_LEASE: Cell<bool> = const { Cell::new(false) };
}

/// Drops `value` so that a [`Guard`] inside it keeps its lease instead of releasing its key.
pub(crate) fn drop_keeping_lease<T>(value: T) {
    KEEP_LEASE.with(|keep| keep.set(true));
    drop(value);
    KEEP_LEASE.with(|keep| keep.set(false));
}

/// Holds an in-flight record for the request that acquired it.
///
/// Completing or releasing disarms it. Dropped while armed (the handler panicked, or the
/// request was cancelled with `finish_on_disconnect(false)`), it releases the record in a
/// background task, so a key never stays stuck in `409`; dropped by a runtime that shuts down
/// under a detached run, it keeps its lease, which then ends by itself; dropped while completing,
/// it finishes the completion in the background, so a response the handler already produced is
/// not lost and the handler does not run again.
pub(crate) struct Guard<St: IdempotencyStore> {
    store: Arc<St>,
    key: RecordKey,
    token: LockToken,
    timeout: Duration,
    state: GuardState,
    started: Started,
    /// The requests waiting for this one, woken once the record completes or is released;
    /// `None` when the layer does not let duplicates wait.
    waiters: Option<Arc<Waiters>>,
}

enum GuardState {
    Held,
    Completing(StoredResponse, Duration),
    Done,
}

impl<St: IdempotencyStore> Guard<St> {
    pub(crate) fn new(
        store: Arc<St>,
        key: RecordKey,
        token: LockToken,
        timeout: Duration,
        started: Started,
    ) -> Self {
        Self {
            store,
            key,
            token,
            timeout,
            state: GuardState::Held,
            started,
            waiters: None,
        }
    }

    /// Wakes the requests of `waiters` that wait for this key, once it completes or is
    /// released.
    pub(crate) fn waking(mut self, waiters: Option<Arc<Waiters>>) -> Self {
        self.waiters = waiters;
        self
    }

    /// The record completed or was released (or a call to do so ended): its waiters look.
    fn wake(&self) {
        if let Some(waiters) = &self.waiters {
            waiters.wake(&self.key);
        }
    }

    pub(crate) fn key(&self) -> &RecordKey {
        &self.key
    }

    /// Drives `handler` to its end while renewing the lease every third of its length.
    ///
    /// Renewals run beside the handler on a fixed cadence: a slow store call delays neither the
    /// handler nor the next renewal. A failed renewal is not fatal (the lease may still hold,
    /// and completing is fenced by the token either way); it is reported as a `tracing` event.
    pub(crate) fn renewing<F: Future>(&self, lease: Duration, handler: F) -> Renewing<'_, St, F> {
        Renewing {
            guard: self,
            handler,
            lease,
            tick: None,
            renewal: None,
        }
    }

    /// Polls a renewal under way, if any; `true` once it is done.
    fn poll_renewal<F: Future<Output = Result<(), StoreError>> + ?Sized>(
        &self,
        call: Option<Pin<&mut F>>,
        cx: &mut Context<'_>,
    ) -> bool {
        let Some(Poll::Ready(result)) = call.map(|call| call.poll(cx)) else {
            return false;
        };
        if let Err(err) = result {
            self.report("renew", &err);
        }
        true
    }

    /// Reports a store call that failed after the request acquired its key.
    fn report(&self, call: &'static str, err: &StoreError) {
        outcome::store_failure(call, err, &self.key);
    }

    /// Stores `response`. If this fails, the record stays in flight until its lease ends: it is
    /// not released, so a retry cannot run the handler again while the lease lives.
    /// A failure is reported as a `tracing` event.
    pub(crate) async fn complete(&mut self, response: StoredResponse, ttl: Duration) {
        self.state = GuardState::Completing(response.clone(), ttl);
        let call = self.store.complete(&self.key, self.token, response, ttl);
        let result = timed(StoreOp::Complete, self.timeout, call).await;
        self.state = GuardState::Done;
        self.wake();
        if let Err(err) = result {
            self.report("complete", &err);
        }
    }

    /// Settles a record its handler completed inside its own transaction (see
    /// [`IdempotencyStore::settle`]), and answers the request's outcome: executed when the
    /// transaction committed, released when it did not (the record is removed). A failure is
    /// reported and leaves the lease as it is: the record is never released on doubt.
    pub(crate) async fn settle(&mut self) -> Outcome {
        let call = self.store.settle(&self.key, self.token);
        let result = timed(StoreOp::Complete, self.timeout, call).await;
        self.state = GuardState::Done;
        self.wake();
        match result {
            Ok(Settled::Completed) => Outcome::Executed,
            Ok(Settled::Released) => Outcome::Released,
            Ok(_) => {
                self.report("settle", &StoreError::lease_lost());
                Outcome::Released
            }
            Err(err) => {
                self.report("settle", &err);
                Outcome::Executed
            }
        }
    }

    /// Removes the record so that a retry runs the handler again. A release that fails is
    /// reported and retried in the background; should that fail too, the lease ends by itself.
    pub(crate) async fn release(&mut self) {
        let call = self.store.release(&self.key, self.token);
        let result = timed(StoreOp::Release, self.timeout, call).await;
        self.state = GuardState::Done;
        self.wake();
        if let Err(err) = result {
            self.report("release", &err);
            if err.kind() != StoreErrorKind::LeaseLost {
                self.spawn_release();
            }
        }
    }

    fn spawn_release(&self) {
        self.spawn_with(|store, key, token, timeout| async move {
            let mut backoff = Duration::from_millis(50);
            for _ in 0..4 {
                match timed(StoreOp::Release, timeout, store.release(&key, token)).await {
                    Ok(()) => return,
                    Err(err) if err.kind() == StoreErrorKind::LeaseLost => return,
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        });
    }

    /// Runs `task` on the current Tokio runtime, detached from this request, then wakes the
    /// requests waiting for this key. Without a runtime (it is shutting down), nothing runs and
    /// the lease ends by itself.
    fn spawn_with<F, Fut>(&self, task: F)
    where
        F: FnOnce(Arc<St>, RecordKey, LockToken, Duration) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (store, key) = (self.store.clone(), self.key.clone());
            let task = task(store, key.clone(), self.token, self.timeout);
            let waiters = self.waiters.clone();
            handle.spawn(async move {
                task.await;
                if let Some(waiters) = waiters {
                    waiters.wake(&key);
                }
            });
        }
    }
}

impl<St: IdempotencyStore> Drop for Guard<St> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, GuardState::Done) {
            GuardState::Done => {}
            GuardState::Held if KEEP_LEASE.with(Cell::get) => {
                // The runtime is going away under a detached run: the handler may have done
                // part of its work, so the key is not released; it is taken over once its
                // lease ends.
                outcome::lease_kept(&self.key);
            }
            GuardState::Held => {
                // The handler panicked, or the request was cancelled: no response reports this
                // outcome, so the event does.
                let key = Some(self.key.key());
                outcome::emit(
                    Outcome::Released,
                    key,
                    Some(self.key.tenant()),
                    self.started,
                );
                self.spawn_release();
            }
            GuardState::Completing(response, ttl) => {
                self.spawn_with(|store, key, token, timeout| async move {
                    let call = store.complete(&key, token, response, ttl);
                    let _ = timed(StoreOp::Complete, timeout, call).await;
                });
            }
        }
    }
}
