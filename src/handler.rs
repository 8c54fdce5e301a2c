//! The [`Idempotency`] service's type, and what its flow (in `service.rs`) needs of the inner
//! service and of a keyed request's body, written once: the bounds every step of the flow
//! names.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{BoxError, RequestBody};
use crate::config::Shared;
use crate::error::ProblemJson;
use crate::tenant::DefaultTenant;

/// The service built by [`IdempotencyLayer`](crate::IdempotencyLayer).
pub struct Idempotency<S, St, T = DefaultTenant, E = ProblemJson> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared<St, T, E>>,
}

impl<S, St, T, E> Idempotency<S, St, T, E> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St, T, E>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St, T, E> Clone for Idempotency<S, St, T, E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St, T, E> fmt::Debug for Idempotency<S, St, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// What the flow needs of the inner service, its response body and its errors, written once:
/// implemented for every `Service` that fits, and named by every step of the flow.
#[allow(unreachable_pub)] // named in the `Service` impl's bounds, never by users
pub trait Handler<ReqBody>: Clone + Send + 'static {
    /// The handler's response body.
    type Body: Body<Data: Buf + Send, Error: Into<BoxError>> + Unpin + Send + 'static;
    /// The inner service's error.
    type Error: Send + 'static;
    /// The inner service's future.
    type Future: Future<Output = Result<Response<Self::Body>, Self::Error>> + Send + 'static;

    /// `Service::poll_ready`.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>>;

    /// `Service::call`.
    fn call(&mut self, req: Request<RequestBody<ReqBody>>) -> Self::Future;
}

impl<S, ReqBody, B> Handler<ReqBody> for S
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data: Buf + Send, Error: Into<BoxError>> + Unpin + Send + 'static,
{
    type Body = B;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(self, cx)
    }

    #[inline]
    fn call(&mut self, req: Request<RequestBody<ReqBody>>) -> Self::Future {
        Service::call(self, req)
    }
}

pin_project_lite::pin_project! {
    /// A keyed request's call of the inner service: made ready, then called, once the request
    /// holds its key. Until then the request holds none of the inner service's capacity (a
    /// `Buffer`'s slot, a concurrency limit's permit) while its body arrives, the store answers
    /// or a duplicate waits: the service that `poll_ready` readied was let go when the layer
    /// was called.
    #[project = CallProj]
    pub(crate) enum Call<S, R, F> {
        Readying { service: S, request: Option<R> },
        Called { #[pin] future: F },
    }
}

impl<S, B> Call<S, Request<RequestBody<B>>, S::Future>
where
    S: Handler<B>,
{
    pub(crate) fn new(service: S, request: Request<RequestBody<B>>) -> Self {
        Self::Readying {
            service,
            request: Some(request),
        }
    }
}

impl<S, B> Future for Call<S, Request<RequestBody<B>>, S::Future>
where
    S: Handler<B>,
{
    type Output = Result<Response<S::Body>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let CallProj::Readying { service, request } = self.as_mut().project() {
            ready!(service.poll_ready(cx))?;
            let request = request.take().expect("a request is called once");
            let future = service.call(request);
            self.set(Self::Called { future });
        }
        match self.project() {
            CallProj::Called { future } => future.poll(cx),
            CallProj::Readying { .. } => unreachable!("the service was just called"),
        }
    }
}

/// What the flow needs of a keyed request's body, written once.
#[allow(unreachable_pub)] // named in the `Service` impl's bounds, never by users
pub trait RequestBodyOf: Body<Data: Buf + Send, Error: Into<BoxError>> + Send + 'static {}

impl<B: Body<Data: Buf + Send, Error: Into<BoxError>> + Send + 'static> RequestBodyOf for B {}
