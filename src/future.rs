//! [`ResponseFuture`]: the future of a request through the layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::detach::Detachable;
use crate::outcome::RequestSpan;

pub(crate) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The first part of a keyed request's flow: up to the store's answer.
pub(crate) type Prelude<B, E> = Pin<Box<dyn Future<Output = Step<B, E>> + Send>>;

/// The handler's part of a keyed request's flow, from the moment it holds its key.
pub(crate) type Running<B, E> = Pin<Box<dyn Detachable<Output = Answer<B, E>>>>;

/// Where the first part of a keyed request's flow ends.
pub(crate) enum Step<B, E> {
    /// An answer without the handler (a replay, `409`, `422`, `413`, `503`, ...).
    Answer(Answer<B, E>),
    /// The request holds its key: run the handler.
    Run(Running<B, E>),
}

pin_project! {
    /// The response future of the [`Idempotency`](crate::Idempotency) service.
    ///
    /// A request that passes through polls the inner service's future in place; an answer
    /// known at once (an invalid key, say) is ready without an allocation; a keyed request runs
    /// the idempotent flow. Dropped while its handler runs (hyper drops it when the client goes
    /// away), a keyed request hands the handler to a task of its own, which finishes it.
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
        Keyed { flow: Flow<B, E> },
    }
}

/// A keyed request's flow, and what its `Drop` does with a handler still running.
struct Flow<B, E> {
    state: FlowState<B, E>,
    finish_on_disconnect: bool,
    span: RequestSpan,
}

enum FlowState<B, E> {
    Prelude(Prelude<B, E>),
    Running {
        run: Running<B, E>,
        /// Set while `run` is polled: still set when it is dropped, the handler panicked.
        polling: bool,
    },
    Done,
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

    pub(crate) fn keyed(
        prelude: Prelude<B, E>,
        finish_on_disconnect: bool,
        span: RequestSpan,
    ) -> Self {
        let flow = Flow {
            state: FlowState::Prelude(prelude),
            finish_on_disconnect,
            span,
        };
        Self {
            kind: Kind::Keyed { flow },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Answer<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(ResponseBody::inner))),
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Keyed { flow } => flow.poll(cx),
        }
    }
}

impl<B, E> Flow<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Answer<B, E>> {
        let Self { state, span, .. } = self;
        span.in_scope(|| state.poll(cx))
    }
}

impl<B, E> FlowState<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Answer<B, E>> {
        loop {
            match self {
                FlowState::Prelude(prelude) => match ready!(prelude.as_mut().poll(cx)) {
                    Step::Answer(answer) => {
                        *self = FlowState::Done;
                        return Poll::Ready(answer);
                    }
                    Step::Run(run) => {
                        let polling = false;
                        *self = FlowState::Running { run, polling };
                    }
                },
                FlowState::Running { run, polling } => {
                    *polling = true;
                    let poll = run.as_mut().poll(cx);
                    *polling = false;
                    let answer = ready!(poll);
                    *self = FlowState::Done;
                    return Poll::Ready(answer);
                }
                FlowState::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<B, E> Drop for Flow<B, E> {
    fn drop(&mut self) {
        let FlowState::Running { polling, .. } = self.state else {
            return; // before the key is held, or after the answer: nothing runs on
        };
        if polling || !self.finish_on_disconnect {
            // A handler that panicked, or one that may be cancelled: dropped with the flow, its
            // key is released.
            return;
        }
        if let FlowState::Running { run, .. } = std::mem::replace(&mut self.state, FlowState::Done)
        {
            run.detach();
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Keyed { flow } => match flow.state {
                FlowState::Prelude(_) => "Prelude",
                FlowState::Running { .. } => "Running",
                FlowState::Done => "Done",
            },
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
