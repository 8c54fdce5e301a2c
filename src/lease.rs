//! Holding a key: the guard that completes or releases an in-flight record, the lease renewal
//! that runs beside the handler, and the timeout every store call runs under.

use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::claim::HeldClaim;
use crate::detach::{DetachedRuns, Run};
use crate::metrics::{self, StoreOp};
use crate::outcome::{self, Outcome, Started};
use crate::store::{IdempotencyStore, LockToken, RecordKey, Settled, StoreError, StoreErrorKind};
use crate::stored::StoredResponse;
use crate::util::Share;
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

/// A renewal under way, boxed: one runs only while a handler is pending.
type Renewal = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

pin_project_lite::pin_project! {
    /// The handler's part of a request that holds its key, in stages: the handler's future, run
    /// under the guard's lease (see [`Guard::running`]); then the future its output goes on with
    /// (storing the response, or releasing the key), which takes the guard and its renewals over.
    /// A handler that panics (in its future, or in its service's `poll_ready` or `call`, which run
    /// in this stage: see `Call`) has its key released first, and its panic then goes on up: the
    /// retry that follows the `500` of a panic-catching layer above runs the handler again at
    /// once. The panic goes on once the release has answered (within the store's timeout).
    ///
    /// Each stage keeps only what it needs, in one allocation sized for the larger: the request is
    /// gone once the handler's future is made, and that future once it has answered. (An `async`
    /// block would keep its captured request for the whole run, beside everything that follows the
    /// handler, and an `async fn` its handler's future twice.)
    #[project = LeasedProj]
    pub(crate) enum Leased<St: IdempotencyStore, F, A, G> {
        Running {
            #[pin]
            handler: F,
            // Taken once the handler answered: what goes on with its output.
            held: Option<Holding<St, A>>,
        },
        Then {
            #[pin]
            future: G,
        },
        // The handler panicked: its key is released, then the panic goes on.
        Unwinding {
            release: Pin<Box<dyn Future<Output = ()> + Send>>,
            panic: Option<Box<dyn Any + Send>>,
        },
    }
}

/// What the handler's stage of [`Leased`] holds beside the handler: the guard, its renewals, and
/// what makes the next stage. Taken out whole once the handler answered, and moved straight into
/// that stage, which replaces the handler's in one write.
pub(crate) struct Holding<St: IdempotencyStore, A> {
    guard: Guard<St>,
    renewals: Renewals,
    then: A,
}

impl<St, F, A, G> Future for Leased<St, F, A, G>
where
    St: IdempotencyStore,
    F: Future,
    A: FnOnce(Guard<St>, Renewals, F::Output) -> G,
    G: Future,
{
    type Output = G::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<G::Output> {
        if let LeasedProj::Running { handler, held } = self.as_mut().project() {
            let next = match panic::catch_unwind(AssertUnwindSafe(|| handler.poll(cx))) {
                Ok(Poll::Ready(output)) => Ok(output),
                Ok(Poll::Pending) => {
                    if let Some(Holding {
                        guard, renewals, ..
                    }) = held
                    {
                        renewals.poll(guard, cx);
                    }
                    return Poll::Pending;
                }
                Err(panic) => Err(panic),
            };
            let Some(Holding {
                guard,
                renewals,
                then,
            }) = held.take()
            else {
                unreachable!("the handler's stage moves on once");
            };
            // The guard, its renewals and what follows move on; the handler's future is dropped
            // in place as the next stage is written over it.
            self.set(match next {
                Ok(output) => Self::Then {
                    future: then(guard, renewals, output),
                },
                Err(panic) => Self::Unwinding {
                    release: guard.release_after_panic(),
                    panic: Some(panic),
                },
            });
        }
        match self.project() {
            LeasedProj::Then { future } => future.poll(cx),
            LeasedProj::Unwinding { release, panic } => {
                ready!(release.as_mut().poll(cx));
                match panic.take() {
                    Some(panic) => panic::resume_unwind(panic),
                    None => unreachable!("a panic goes on once"),
                }
            }
            _ => unreachable!("a handler's part is polled again only once it moved on"),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Guard::under_lease`].
    pub(crate) struct UnderLease<'a, St: IdempotencyStore, F> {
        #[pin]
        future: F,
        guard: &'a Guard<St>,
        renewals: &'a mut Renewals,
    }
}

impl<St: IdempotencyStore, F: Future> Future for UnderLease<'_, St, F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match panic::catch_unwind(AssertUnwindSafe(|| this.future.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => {
                this.renewals.poll(this.guard, cx);
                Poll::Pending
            }
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The lease renewals of a pending handler (and then of its response body being read): the
/// timer and the renewal under way, each in an allocation of its own made only once the handler
/// is pending, so that a handler that answers at once costs no timer and no clock read.
pub(crate) struct Renewals {
    lease: Duration,
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
    renewal: Option<Renewal>,
    /// The request's claim: once the handler completed the record in its own transaction, a
    /// renewal refused because that transaction committed is no failure to report. (Renewals go
    /// on until then: a transaction that ends without its COMMIT leaves the record in flight,
    /// and its lease must hold while the handler runs.)
    claim: HeldClaim,
    /// A renewal found the lease lost (taken over, or the record completed or gone): the token
    /// never holds the record again, so no renewal is tried after it.
    lost: bool,
}

impl Renewals {
    /// Renews `guard`'s lease every third of its length: starts a renewal each time the timer
    /// fires (one still running when the next is due stands for both), and polls the one under
    /// way. A renewal that failed is tried again a quarter of that period later, not a whole
    /// one: two failures in a row (a connection that stopped answering, then the next one the
    /// store had open) would otherwise let the lease of a live handler end.
    fn poll<St: IdempotencyStore>(&mut self, guard: &Guard<St>, cx: &mut Context<'_>) {
        if self.lost {
            return; // nothing left to renew, and no timer to wake this task for it
        }
        let (lease, period) = (self.lease, self.lease / 3);
        loop {
            let timer = self
                .tick
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
            while timer.as_mut().poll(cx).is_ready() {
                let next = timer.deadline() + period;
                timer.as_mut().reset(next);
                if self.renewal.is_none() {
                    self.renewal = Some(guard.renewal(lease));
                }
            }
            let Some(Poll::Ready(result)) =
                self.renewal.as_mut().map(|call| call.as_mut().poll(cx))
            else {
                return;
            };
            self.renewal = None;
            let Err(err) = result else {
                return;
            };
            if err.kind() == StoreErrorKind::LeaseLost {
                // A record its handler completed in its own transaction, which committed, has
                // no lease left: its renewal is refused as it should be.
                if !self.claim.written() {
                    guard.report("renew", &err);
                }
                self.lost = true;
                self.tick = None;
                return;
            }
            guard.report("renew", &err);
            let again = tokio::time::Instant::now() + period / 4;
            if again >= timer.deadline() {
                return;
            }
            // Polled again at once, so that the timer's new deadline wakes this task.
            timer.as_mut().reset(again);
        }
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
/// Completing or releasing disarms it; a handler that panics, or whose response body panics while
/// it is read, has its record released before the panic goes on (see [`Leased`] and
/// [`Guard::under_lease`]). Dropped while armed (the request was cancelled with
/// `finish_on_disconnect(false)`, or the flow panicked elsewhere), it releases the record in a
/// background task, so a key never stays stuck in `409`; dropped by a runtime that shuts down under
/// a detached run, it keeps its lease, which then ends by itself; dropped while completing, it
/// finishes the completion in the background, so a response the handler already produced is not
/// lost and the handler does not run again; dropped while settling a record its handler completed
/// in its own transaction, it settles in the background, and reports what the settle found.
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
    /// Counted among the layer's runs (what `DetachedRuns::wait` waits for) while the guard
    /// lives, and each task it leaves in the background while that runs: a shutdown waits for
    /// the run even while its connection, closing, has yet to hand it over, and for the
    /// completion it tries again.
    run: Run,
}

enum GuardState {
    Held,
    /// Its handler answered with this status, a response the layer stores, and the layer reads
    /// its body: the operation ran, so the key is never released from here but for a panic.
    Answered(http::StatusCode, Duration),
    /// Its handler completed the record in its own transaction; the store is finding out
    /// whether that committed (see [`Guard::settle`]).
    Settling,
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
        waiters: Option<Arc<Waiters>>,
        runs: &DetachedRuns,
    ) -> Self {
        Self {
            store,
            key,
            token,
            timeout,
            state: GuardState::Held,
            started,
            waiters,
            run: runs.start(),
        }
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

    /// When the request that holds this guard began.
    pub(crate) fn started(&self) -> Started {
        self.started
    }

    /// Reports `outcome` for this guard's request as its event and metric alone: for a request
    /// that ends without a response to carry it.
    fn report_outcome(&self, outcome: Outcome) {
        let key = Some(self.key.text().as_bytes());
        outcome::emit(outcome, key, Some(self.key.tenant()), self.started, None);
    }

    /// The handler's part of the request that holds this guard: drives `handler` to its end
    /// while renewing the lease every third of its length, then hands the guard, its renewals
    /// (for a response body still to be read, see [`under_lease`](Self::under_lease)) and the
    /// handler's output to `then`, and runs the future it makes.
    ///
    /// Renewals run beside the handler on a fixed cadence: a slow store call delays neither the
    /// handler nor the next renewal. A failed renewal is not fatal (the lease may still hold,
    /// and completing is fenced by the token either way); it is reported as a `tracing` event.
    /// They end once one finds the lease lost; one refused because the handler completed its
    /// record in its own transaction (`claim`), which committed, is not reported.
    pub(crate) fn running<F, A, G>(
        self,
        lease: Duration,
        claim: HeldClaim,
        handler: F,
        then: A,
    ) -> Leased<St, F, A, G>
    where
        F: Future,
        A: FnOnce(Self, Renewals, F::Output) -> G,
        G: Future,
    {
        Leased::Running {
            handler,
            held: Some(Holding {
                guard: self,
                renewals: Renewals {
                    lease,
                    tick: None,
                    renewal: None,
                    claim,
                    lost: false,
                },
                then,
            }),
        }
    }

    /// Runs `future`, the rest of the handler's work once it answered (reading its response's
    /// body), under this guard's lease: the lease is renewed while it is pending, as while the
    /// handler runs, so that a body that takes longer than the lease is not taken over by a
    /// retry; a panic in it is caught and handed back, so that the key can be released (see
    /// [`release_after_panic`](Self::release_after_panic)) before the panic goes on.
    pub(crate) fn under_lease<'a, F: Future>(
        &'a self,
        renewals: &'a mut Renewals,
        future: F,
    ) -> UnderLease<'a, St, F> {
        UnderLease {
            future,
            guard: self,
            renewals,
        }
    }

    /// A renewal of this guard's lease, owning what it needs: it runs beside the handler, in the
    /// future that also holds this guard.
    fn renewal(&self, lease: Duration) -> Renewal {
        let (store, key, token) = (Arc::clone(&self.store), self.key.clone(), self.token);
        let timeout = self.timeout;
        Box::pin(async move {
            let call = store.renew(&key, token, lease);
            timed(StoreOp::Renew, timeout, call).await
        })
    }

    /// Reports a store call that failed after the request acquired its key.
    fn report(&self, call: &'static str, err: &StoreError) {
        outcome::store_failure(call, err, &self.key);
    }

    /// Ends the lease with the handler's response: completes the record with `response` (which
    /// may say that it is not replayable). Answers the outcome.
    ///
    /// A completion that fails leaves the record in flight until its lease ends: it is not
    /// released, so a retry cannot run the handler again while the lease lives. A failure is
    /// reported as a `tracing` event.
    ///
    /// The response waits in the guard (which finishes the completion should this future be
    /// dropped, or tries it again should it fail) rather than in this future, and the store gets
    /// a clone of it; but a store that answers at its first poll, and fails only when the lease
    /// was lost (the memory store), gets the response itself: a clone would make the response's
    /// buffer shared (an allocation, and a reference count every later clone and drop pays) for
    /// a copy nothing can use. Its guard stays [`GuardState::Answered`] meanwhile.
    pub(crate) fn conclude(
        &mut self,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Outcome> + '_ {
        let given = if answers_at_once::<St>() {
            response
        } else {
            let given = response.clone();
            self.state = GuardState::Completing(response, ttl);
            given
        };
        async move {
            let call = self.store.complete(&self.key, self.token, given, ttl);
            let result = timed(StoreOp::Complete, self.timeout, call).await;
            let kept = match std::mem::replace(&mut self.state, GuardState::Done) {
                GuardState::Completing(response, _) => Some(response),
                _ => None,
            };
            match result {
                Ok(()) => self.wake(),
                Err(err) => {
                    self.report("complete", &err);
                    // A store given the response itself keeps no copy to try again with: it
                    // fails a completion only when the lease was lost (see `answers_at_once`).
                    debug_assert!(
                        kept.is_some() || err.kind() == StoreErrorKind::LeaseLost,
                        "a store that answers at once failed a completion: {err}"
                    );
                    // The handler ran: a record left in flight would lapse with its lease, and
                    // the retry would run it again. Fenced by the token, the completion is tried
                    // again in the background (a connection the store lost, a failover, a
                    // store that was full for a moment), and the waiters woken after.
                    match kept {
                        Some(response) if err.kind() != StoreErrorKind::LeaseLost => {
                            self.spawn_complete(response, ttl);
                        }
                        _ => self.wake(),
                    }
                }
            }
            Outcome::Executed
        }
    }

    /// Marks the handler's answer: `status`, a response the layer reads to store for `ttl`.
    /// Dropped from here on, the guard completes the key as not replayable rather than release
    /// it (see [`GuardState::Answered`]).
    pub(crate) fn answered(&mut self, status: http::StatusCode, ttl: Duration) {
        self.state = GuardState::Answered(status, ttl);
    }

    /// Settles a record its handler completed inside its own transaction (see
    /// [`IdempotencyStore::settle`]), and answers the request's outcome: executed when the
    /// transaction committed, released when it did not (the record is removed). A failure is
    /// reported and leaves the lease as it is: the record is never released on doubt.
    pub(crate) async fn settle(&mut self) -> Outcome {
        self.state = GuardState::Settling;
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

    /// Releases the key of a handler that panicked, before its panic goes on up: a retry that
    /// follows the `500` a panic-catching layer above answers runs the handler again, instead
    /// of finding the record still in flight while a background task releases it.
    pub(crate) fn release_after_panic(mut self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // A response body that panicked is released as a handler that did.
        self.state = GuardState::Held;
        Box::pin(async move {
            self.release().await;
            // No response reports this outcome, so the event does (once: dropped before the
            // release ends, the guard's `Drop` reports it instead).
            self.report_outcome(Outcome::Released);
        })
    }

    /// Tries a completion that failed again in the background: seven more times, waiting from
    /// 100 ms to 6.4 s before each (about 13 s of waits, and the calls, each bounded by the
    /// store timeout), until one succeeds or the key is found taken over. Every try is fenced
    /// by the token: one after the lease was taken over does nothing.
    ///
    /// The response is kept meanwhile, within [`BACKGROUND_BYTES`] for every such completion at
    /// once (see [`keep_in_background`]).
    fn spawn_complete(&self, response: StoredResponse, ttl: Duration) {
        let (response, kept) = keep_in_background(response, &KEPT_IN_BACKGROUND, BACKGROUND_BYTES);
        self.spawn_with(move |store, key, token, timeout| async move {
            let _kept = kept;
            let mut backoff = Duration::from_millis(100);
            for _ in 0..7 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                let call = store.complete(&key, token, response.clone(), ttl);
                match timed(StoreOp::Complete, timeout, call).await {
                    Ok(()) => return,
                    Err(err) if err.kind() == StoreErrorKind::LeaseLost => return,
                    Err(_) => {}
                }
            }
        });
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
            let run = self.run.again();
            handle.spawn(async move {
                task.await;
                if let Some(waiters) = waiters {
                    waiters.wake(&key);
                }
                drop(run);
            });
        }
    }
}

/// The most bytes of responses that completions in the background keep at once, in the whole
/// process: a store that fails every completion under heavy traffic would otherwise hold each
/// request's response for the retries' 13 seconds.
const BACKGROUND_BYTES: usize = 64 * 1024 * 1024;

/// The bytes of responses completions in the background keep now.
static KEPT_IN_BACKGROUND: AtomicUsize = AtomicUsize::new(0);

/// `response`, kept for a completion in the background and counted in `kept` while the
/// returned [`Share`] lives; or, with `most` bytes kept already, the response's status alone,
/// as for a response over the response cap: its retries get `409
/// idempotency_response_not_stored`, never a second run.
fn keep_in_background(
    response: StoredResponse,
    kept: &'static AtomicUsize,
    most: usize,
) -> (StoredResponse, Option<Share>) {
    match Share::take(kept, response.encode().len(), most) {
        Some(share) => (response, Some(share)),
        None => (StoredResponse::omitted(response.status()), None),
    }
}

/// Whether `St` answers every call at its first poll and fails a completion only when its
/// lease was lost: the memory store, whose calls take a lock and return. (Known by its type:
/// the check is a constant once the flow is compiled for a store.)
#[cfg_attr(not(feature = "memory"), allow(clippy::extra_unused_type_parameters))]
fn answers_at_once<St: IdempotencyStore>() -> bool {
    #[cfg(feature = "memory")]
    {
        std::any::TypeId::of::<St>() == std::any::TypeId::of::<crate::MemoryStore>()
    }
    #[cfg(not(feature = "memory"))]
    {
        false
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
                // The request was cancelled, or a panic after the handler (or one whose release
                // did not end) dropped it: no response reports this outcome, so the event does.
                self.report_outcome(Outcome::Released);
                self.spawn_release();
            }
            GuardState::Settling => {
                // Dropped while settling: the settle goes on in the background (both it and a
                // release are fenced by the token, but only it knows whether the handler's
                // transaction committed), and its event reports what it found.
                let started = self.started;
                self.spawn_with(move |store, key, token, timeout| async move {
                    let settled =
                        timed(StoreOp::Complete, timeout, store.settle(&key, token)).await;
                    let outcome = match settled {
                        Ok(Settled::Released | Settled::Lost) => Outcome::Released,
                        // Committed, or not known: the record is never released on doubt.
                        Ok(_) | Err(_) => Outcome::Executed,
                    };
                    let text = Some(key.text().as_bytes());
                    outcome::emit(outcome, text, Some(key.tenant()), started, None);
                });
            }
            GuardState::Answered(status, ttl) => {
                // The handler answered (its operation ran), and the request was dropped while
                // the layer read its response (its client went away, with
                // `finish_on_disconnect(false)`): the key completes as not replayable, as for a
                // body that failed, so that a retry never runs the operation again.
                self.report_outcome(Outcome::Executed);
                self.spawn_with(move |store, key, token, timeout| async move {
                    let response = StoredResponse::omitted(status);
                    let call = store.complete(&key, token, response, ttl);
                    let _ = timed(StoreOp::Complete, timeout, call).await;
                });
            }
            GuardState::Completing(response, ttl) => {
                // The handler ran and its response is being stored: no response reports this
                // outcome, so the event does.
                self.report_outcome(Outcome::Executed);
                let (response, kept) =
                    keep_in_background(response, &KEPT_IN_BACKGROUND, BACKGROUND_BYTES);
                self.spawn_with(|store, key, token, timeout| async move {
                    let _kept = kept;
                    let call = store.complete(&key, token, response, ttl);
                    let _ = timed(StoreOp::Complete, timeout, call).await;
                });
            }
        }
    }
}

#[cfg(all(test, feature = "metrics", feature = "memory"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::fingerprint::Fingerprint;
    use crate::store::{Begin, Forget, RecordInfo};
    use crate::tenant::TenantId;
    use crate::{MemoryStore, metrics::REQUESTS_TOTAL};

    /// A memory store whose `settle` waits for a permit, then answers `answer`; it counts its
    /// settles and releases.
    struct Settling {
        store: MemoryStore,
        gate: Semaphore,
        answer: Settled,
        settles: AtomicUsize,
        releases: AtomicUsize,
    }

    impl IdempotencyStore for Settling {
        async fn begin(
            &self,
            key: &RecordKey,
            fingerprint: &Fingerprint,
            lease: Duration,
        ) -> Result<Begin, StoreError> {
            self.store.begin(key, fingerprint, lease).await
        }
        async fn renew(
            &self,
            key: &RecordKey,
            token: LockToken,
            lease: Duration,
        ) -> Result<(), StoreError> {
            self.store.renew(key, token, lease).await
        }
        async fn complete(
            &self,
            key: &RecordKey,
            token: LockToken,
            response: StoredResponse,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.store.complete(key, token, response, ttl).await
        }
        async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.store.release(key, token).await
        }
        async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
            self.store.lookup(key).await
        }
        async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
            self.store.forget(key, force).await
        }
        async fn settle(&self, _: &RecordKey, _: LockToken) -> Result<Settled, StoreError> {
            self.settles.fetch_add(1, Ordering::SeqCst);
            let _permit = self.gate.acquire().await;
            Ok(self.answer)
        }
    }

    /// A request dropped while its `Claim`'s record is being settled (its client hung up with
    /// `finish_on_disconnect(false)`): the settle goes on in the background, no release is
    /// made, and the outcome counted is what the settle found.
    #[test]
    fn a_guard_dropped_while_settling_settles_in_the_background_and_counts_what_it_found() {
        for (answer, counted) in [
            (Settled::Completed, "executed"),
            (Settled::Released, "released"),
        ] {
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            let store = Arc::new(Settling {
                store: MemoryStore::new(),
                gate: Semaphore::new(0),
                answer,
                settles: AtomicUsize::new(0),
                releases: AtomicUsize::new(0),
            });
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            ::metrics::with_local_recorder(&recorder, || {
                runtime.block_on(async {
                    let key = RecordKey::new(TenantId::hashed("t"), "k");
                    let fp = Fingerprint::from_bytes([1; 32]);
                    let lease = Duration::from_secs(30);
                    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, lease).await else {
                        panic!("a new key");
                    };
                    let timeout = Duration::from_secs(2);
                    let runs = crate::DetachedRuns::default();
                    let mut guard = Guard::new(
                        store.clone(),
                        key,
                        token,
                        timeout,
                        Started::now(),
                        None,
                        &runs,
                    );
                    {
                        let settle = std::pin::pin!(guard.settle());
                        let waker = std::task::Waker::noop();
                        let mut cx = Context::from_waker(waker);
                        assert!(settle.poll(&mut cx).is_pending());
                    }
                    drop(guard);
                    store.gate.add_permits(2);
                    for _ in 0..100 {
                        tokio::task::yield_now().await;
                    }
                });
            });
            assert_eq!(store.settles.load(Ordering::SeqCst), 2, "{answer:?}");
            assert_eq!(store.releases.load(Ordering::SeqCst), 0, "{answer:?}");
            let counted_as: Vec<_> = snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter(|(key, ..)| key.key().name() == REQUESTS_TOTAL)
                .map(|(key, _, _, value)| {
                    let outcome = key.key().labels().next().unwrap().value().to_owned();
                    (outcome, value)
                })
                .collect();
            assert_eq!(
                counted_as,
                [(counted.to_owned(), DebugValue::Counter(1))],
                "{answer:?}"
            );
        }
    }
}

#[cfg(test)]
mod keep_tests {
    use std::sync::atomic::Ordering;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;

    fn response(len: usize) -> StoredResponse {
        StoredResponse::new(
            StatusCode::CREATED,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; len]),
        )
    }

    #[test]
    fn completions_in_the_background_keep_responses_within_their_bytes() {
        static KEPT: AtomicUsize = AtomicUsize::new(0);
        let size = response(1_000).encode().len();
        let most = 3 * size;
        let first: Vec<_> = (0..3)
            .map(|_| keep_in_background(response(1_000), &KEPT, most))
            .collect();
        for (response, kept) in &first {
            assert!(kept.is_some());
            assert_eq!(response.body().len(), 1_000, "kept whole");
        }
        assert_eq!(KEPT.load(Ordering::Relaxed), most);
        // Past the bound: the status alone, not counted.
        let (over, kept) = keep_in_background(response(1_000), &KEPT, most);
        assert!(kept.is_none());
        assert!(over.is_omitted());
        assert_eq!(over.status(), StatusCode::CREATED);
        assert_eq!(KEPT.load(Ordering::Relaxed), most);
        // A completion that ends gives its bytes back.
        drop(first);
        assert_eq!(KEPT.load(Ordering::Relaxed), 0);
        let (again, kept) = keep_in_background(response(1_000), &KEPT, most);
        assert!(kept.is_some() && !again.is_omitted());
    }
}
