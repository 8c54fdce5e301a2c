//! [`ResponseFuture`], and the guard that releases an in-flight record when a request is
//! abandoned.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::response::StoredResponse;
use crate::store::{IdempotencyStore, LockToken, RecordKey, StoreError, StoreErrorKind};

type BoxFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of the [`Idempotency`](crate::Idempotency) service.
    ///
    /// A request that passes through polls the inner service's future in place; an answer
    /// known at once (an invalid key, say) is ready without an allocation; a keyed request runs
    /// the idempotent flow, boxed once.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Idempotent { future: BoxFuture<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn idempotent(future: BoxFuture<B, E>) -> Self {
        Self {
            kind: Kind::Idempotent { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(ResponseBody::inner))),
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Idempotent { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Idempotent { .. } => "Idempotent",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

/// Runs a store call with a timeout; a call that runs past it is a [`StoreErrorKind::Timeout`].
///
/// The timer is armed only if the call does not answer at its first poll: a store that answers
/// at once (the memory store always does) costs no clock read and no timer.
pub(crate) async fn timed<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut call = pin!(call);
    if let Poll::Ready(result) = poll_once(call.as_mut()).await {
        return result;
    }
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::timeout(timeout)),
    }
}

/// Polls `future` once and answers at once: `Ready` with its output, or `Pending` (its waker
/// registered) if it has none yet.
pub(crate) fn poll_once<F: Future + Unpin>(mut future: F) -> impl Future<Output = Poll<F::Output>> {
    std::future::poll_fn(move |cx| Poll::Ready(Pin::new(&mut future).poll(cx)))
}

/// Holds an in-flight record for the request that acquired it.
///
/// Completing or releasing disarms it. Dropped while armed (the client went away, the handler
/// panicked), it releases the record in a background task, so a key never stays stuck in `409`;
/// dropped while completing, it finishes the completion in the background, so a response the
/// handler already produced is not lost and the handler does not run again.
pub(crate) struct Guard<St: IdempotencyStore> {
    store: Arc<St>,
    key: RecordKey,
    token: LockToken,
    timeout: Duration,
    state: GuardState,
    started: crate::outcome::Started,
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
        started: crate::outcome::Started,
    ) -> Self {
        Self {
            store,
            key,
            token,
            timeout,
            state: GuardState::Held,
            started,
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
    pub(crate) async fn renewing<F: Future>(&self, lease: Duration, handler: F) -> F::Output {
        let period = lease / 3;
        let renew = || timed(self.timeout, self.store.renew(&self.key, self.token, lease));
        let mut handler = pin!(handler);
        // The timer is armed only once the handler is pending: one that answers at once costs
        // no timer and no clock read.
        let mut tick = pin!(None::<tokio::time::Sleep>);
        let mut renewal = pin!(None);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = handler.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            if tick.is_none() {
                tick.set(Some(tokio::time::sleep(period)));
            }
            let mut timer = tick.as_mut().as_pin_mut().expect("armed above");
            while timer.as_mut().poll(cx).is_ready() {
                let next = timer.deadline() + period;
                timer.as_mut().reset(next);
                // A renewal still running when the next is due stands for both.
                if renewal.is_none() {
                    renewal.set(Some(renew()));
                }
            }
            if let Some(call) = renewal.as_mut().as_pin_mut() {
                if let Poll::Ready(result) = call.poll(cx) {
                    renewal.set(None);
                    if let Err(err) = result {
                        self.report("renew", &err);
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Reports a store call that failed after the request acquired its key.
    pub(crate) fn report(&self, call: &'static str, err: &StoreError) {
        crate::outcome::store_failure(call, err, &self.key);
    }

    /// Stores `response`. If this fails, the record stays in flight until its lease ends: it is
    /// not released, so a retry cannot run the handler again while the lease lives.
    /// A failure is reported as a `tracing` event.
    pub(crate) async fn complete(&mut self, response: StoredResponse, ttl: Duration) {
        self.state = GuardState::Completing(response.clone(), ttl);
        let result = timed(
            self.timeout,
            self.store.complete(&self.key, self.token, response, ttl),
        )
        .await;
        self.state = GuardState::Done;
        if let Err(err) = result {
            self.report("complete", &err);
        }
    }

    /// Removes the record so that a retry runs the handler again. A release that fails is
    /// reported and retried in the background; should that fail too, the lease ends by itself.
    pub(crate) async fn release(&mut self) {
        let result = timed(self.timeout, self.store.release(&self.key, self.token)).await;
        self.state = GuardState::Done;
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
                match timed(timeout, store.release(&key, token)).await {
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

    /// Runs `task` on the current Tokio runtime, detached from this request. Without a runtime
    /// (it is shutting down), nothing runs and the lease ends by itself.
    fn spawn_with<F, Fut>(&self, task: F)
    where
        F: FnOnce(Arc<St>, RecordKey, LockToken, Duration) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (store, key) = (self.store.clone(), self.key.clone());
            handle.spawn(task(store, key, self.token, self.timeout));
        }
    }
}

impl<St: IdempotencyStore> Drop for Guard<St> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, GuardState::Done) {
            GuardState::Done => {}
            GuardState::Held => {
                // The request was abandoned (client gone, handler panicked): no response
                // reports this outcome, so the event does.
                crate::outcome::emit(
                    crate::Outcome::Released,
                    Some(self.key.key()),
                    Some(self.key.tenant()),
                    self.started,
                );
                self.spawn_release();
            }
            GuardState::Completing(response, ttl) => {
                self.spawn_with(|store, key, token, timeout| async move {
                    let _ = timed(timeout, store.complete(&key, token, response, ttl)).await;
                });
            }
        }
    }
}
