//! What the flow needs of the inner service and of a keyed request's body, written once: the
//! bounds every step of the flow in [`service`](crate::service) names.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{BoxError, RequestBody};

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

/// What the flow needs of a keyed request's body, written once.
#[allow(unreachable_pub)] // named in the `Service` impl's bounds, never by users
pub trait RequestBodyOf: Body<Data: Buf + Send> + Send + 'static {}

impl<B: Body<Data: Buf + Send> + Send + 'static> RequestBodyOf for B {}
