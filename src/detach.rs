//! Runs that outlive their request: a handler whose client went away runs to its end.
//!
//! hyper drops a request's future when its client closes the connection. A keyed request that
//! holds its key is then handed, as it is, to a task of its own, which drives the handler to its
//! end and stores its response (or releases the key) by the same rules as if the client had
//! stayed. Nothing is spawned while the client stays: the hand-over happens in the request
//! future's `Drop`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::Notify;

use crate::admission::Permit;
use crate::lease::drop_keeping_lease;
use crate::outcome::RequestSpan;

/// A keyed request's future from the moment it holds its key: it can be handed to a task of
/// its own when its request goes away.
pub(crate) trait Detachable: Future + Send {
    /// Runs the rest of this future on a task of its own. Without a runtime to run on (it is
    /// shutting down), drops it keeping its lease: its handler may be half-way.
    fn detach(self: Pin<Box<Self>>);
}

pin_project! {
    /// The handler's part of a keyed request, ready to be detached.
    #[project = ExecutionProj]
    pub(crate) struct Execution<F> {
        #[pin]
        future: F,
        runs: DetachedRuns,
        span: RequestSpan,
        // The request's admission, held until the handler's part ends, detached or not.
        permit: Permit,
    }
}

impl<F> Execution<F> {
    /// Wraps the handler's part of a request, in the request's span (the current one).
    pub(crate) fn new(future: F, runs: &DetachedRuns, permit: Permit) -> Self {
        Self {
            future,
            runs: runs.clone(),
            span: RequestSpan::current(),
            permit,
        }
    }
}

impl<F: Future> ExecutionProj<'_, F> {
    fn poll_in_span(self, cx: &mut Context<'_>) -> Poll<F::Output> {
        let future = self.future;
        self.span.in_scope(|| future.poll(cx))
    }
}

impl<F: Future> Future for Execution<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().future.poll(cx)
    }
}

impl<F: Future + Send + 'static> Detachable for Execution<F> {
    fn detach(self: Pin<Box<Self>>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run on: its handler may be half-way, so its key keeps its lease.
            drop_keeping_lease(self);
            return;
        };
        // Never refused: keyed work is bounded when it is admitted, not by cutting off a run
        // that holds its key (see `admission`).
        let slot = self.runs.enter();
        self.span.in_scope(crate::outcome::detached);
        drop(runtime.spawn(DetachedRun {
            run: Some(self),
            polling: false,
            _slot: slot,
        }));
    }
}

/// The task of a detached run.
struct DetachedRun<F> {
    run: Option<Pin<Box<Execution<F>>>>,
    /// Set while the run is polled: still set when it is dropped, the run panicked.
    polling: bool,
    _slot: Slot,
}

impl<F: Future> Future for DetachedRun<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(run) = this.run.as_mut() else {
            return Poll::Ready(());
        };
        this.polling = true;
        crate::outcome::set_detached_run(true);
        let poll = run.as_mut().project().poll_in_span(cx);
        crate::outcome::set_detached_run(false);
        this.polling = false;
        match poll {
            Poll::Ready(_response) => {
                this.run = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<F> Drop for DetachedRun<F> {
    fn drop(&mut self) {
        crate::outcome::set_detached_run(false);
        match self.run.take() {
            // It panicked: its key is released, as for a request whose client stayed.
            Some(run) if self.polling => drop(run),
            // Its runtime is shutting down while the handler may be half-way: the key keeps its
            // lease and is taken over once the lease ends, never released under a live handler.
            Some(run) => drop_keeping_lease(run),
            None => {}
        }
    }
}

/// The handlers of a layer that run on after their client went away.
///
/// Get it from [`IdempotencyLayer::detached_runs`](crate::IdempotencyLayer::detached_runs). On
/// shutdown, once the server stopped accepting connections, wait for them with a deadline, so
/// that a run started before the shutdown stores its response:
///
/// ```no_run
/// # use std::time::Duration;
/// # use axum::{Router, routing::post};
/// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// let detached = layer.detached_runs();
/// let app: Router = Router::new().route("/payments", post(|| async { "ok" })).layer(layer);
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap() })
///     .await?;
/// // Connections are closed; handlers whose client left may still be running.
/// if !detached.wait_timeout(Duration::from_secs(30)).await {
///     eprintln!("{} runs still going; their keys are taken over once their lease ends", detached.running());
/// }
/// # Ok(())
/// # }
/// ```
///
/// The wait covers every handler of the layer that holds its key, not only those already handed
/// to a task of their own: `serve` returns once its connections let go of the shutdown signal,
/// and a connection whose client hung up during the drain hands its run over only as it closes,
/// a moment later.
///
/// A run still going when the runtime shuts down is cancelled, and its key keeps its lease: it
/// is taken over by a retry only once the lease ends, never released while the handler may be
/// half-way through. (In a shared store: a `MemoryStore` is gone with its process, and its
/// snapshot never holds in-flight records, so a retry after a restart runs at once.)
#[derive(Clone, Default)]
pub struct DetachedRuns(Arc<Tracker>);

#[derive(Default)]
struct Tracker {
    /// Runs detached: their client went away.
    count: AtomicUsize,
    /// Runs that hold their key, detached or not.
    running: AtomicUsize,
    idle: Notify,
}

impl DetachedRuns {
    /// How many handlers are running now after their client left.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// How many handlers of the layer are running now, their client there or gone: the runs
    /// [`wait`](Self::wait) waits for.
    pub fn running(&self) -> usize {
        self.0.running.load(Ordering::Acquire)
    }

    /// Waits until no handler runs detached, nor any whose connection is still closing, nor
    /// any completion or release its run left to finish in the background (a store call that
    /// failed, tried again): every run that holds its key has ended, its record stored or
    /// released.
    pub async fn wait(&self) {
        loop {
            let idle = self.0.idle.notified();
            // A detached run's task is counted until it is dropped, after its guard ended it.
            if self.running() == 0 && self.count() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// As [`wait`](Self::wait), for at most `timeout`; `true` when no run is left.
    pub async fn wait_timeout(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait()).await.is_ok()
    }

    /// Counts a run that holds its key (its guard, and each task its guard leaves to finish
    /// its record in the background), until it ends.
    pub(crate) fn start(&self) -> Run {
        self.0.running.fetch_add(1, Ordering::AcqRel);
        Run(self.0.clone())
    }

    /// Counts a new detached run.
    fn enter(&self) -> Slot {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        crate::metrics::detached_runs(1.0);
        Slot(self.0.clone())
    }
}

impl fmt::Debug for DetachedRuns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetachedRuns")
            .field("count", &self.count())
            .field("running", &self.running())
            .finish()
    }
}

/// One run that holds its key, or a task that finishes its record in the background, counted
/// until it ends (or panics, or is dropped with its runtime).
pub(crate) struct Run(Arc<Tracker>);

impl Run {
    /// One more count, for a task that goes on after this one.
    pub(crate) fn again(&self) -> Self {
        DetachedRuns(self.0.clone()).start()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One detached run, counted until it ends (or panics).
struct Slot(Arc<Tracker>);

impl Drop for Slot {
    fn drop(&mut self) {
        crate::metrics::detached_runs(-1.0);
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
