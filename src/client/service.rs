//! [`IdempotentRetry`]: the service, and the attempts of one request.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::Config;
use super::body::{RetryBody, buffer};
use super::error::RetryError;
use super::outcome::RetryOutcome;
use super::policy::{self, Schedule};
use crate::body::BoxError;

/// The service an [`IdempotentRetryLayer`](super::IdempotentRetryLayer) builds around an HTTP
/// client; see the layer for what it does.
#[derive(Clone)]
pub struct IdempotentRetry<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotentRetry<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
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

impl<S: fmt::Debug> fmt::Debug for IdempotentRetry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentRetry")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, B, ResBody> Service<Request<B>> for IdempotentRetry<S>
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = RetryError;
    type Future = RetryFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| RetryError::passthrough(e, 0))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.config.covers(request.method()) {
            let future = self.inner.call(request.map(RetryBody::new));
            return RetryFuture {
                kind: Kind::Passthrough { future },
            };
        }
        // The service that was made ready sends the first attempt.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        RetryFuture {
            kind: Kind::Retrying {
                future: Box::pin(attempts(inner, self.config.clone(), request)),
            },
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, RetryError>> + Send>>;

pin_project! {
    /// The response future of [`IdempotentRetry`].
    pub struct RetryFuture<F, ResBody> {
        #[pin]
        kind: Kind<F, ResBody>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResBody> {
        Passthrough { #[pin] future: F },
        Retrying { future: BoxFuture<Response<ResBody>> },
    }
}

impl<F, ResBody, E> Future for RetryFuture<F, ResBody>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, RetryError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                future.poll(cx).map_err(|e| RetryError::passthrough(e, 1))
            }
            KindProj::Retrying { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, ResBody> fmt::Debug for RetryFuture<F, ResBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Retrying { .. } => "retrying",
        };
        f.debug_struct("RetryFuture").field("kind", &kind).finish()
    }
}

/// The attempts of one covered request: its key, its body read once, then attempts until an
/// answer that is not worth retrying, the retry count or the deadline.
async fn attempts<S, B, ResBody>(
    mut inner: S,
    config: Arc<Config>,
    request: Request<B>,
) -> Result<Response<ResBody>, RetryError>
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError> + Send,
    B: Body,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let key = match parts.headers.get(&config.header) {
        Some(key) => key.clone(),
        None => {
            let key = policy::new_key();
            parts.headers.insert(config.header.clone(), key.clone());
            key
        }
    };
    let body = buffer(body, config.max_body_bytes)
        .await
        .map_err(|e| RetryError::buffer(e, key.clone()))?;
    let mut schedule = Schedule::start();
    loop {
        let attempt = inner.call(Request::from_parts(parts.clone(), body.body()));
        let result = match schedule.deadline(&config) {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt).await,
            None => Ok(attempt.await),
        };
        schedule.attempted();
        let Ok(result) = result else {
            return Err(RetryError::deadline(
                config.deadline,
                schedule.attempts(),
                key,
            ));
        };
        let wait = match &result {
            Ok(response)
                if policy::should_retry(
                    response.status(),
                    response.headers(),
                    config.conflicts,
                ) =>
            {
                schedule.next_wait(&config, policy::retry_after(response.headers()))
            }
            Ok(_) => None,
            Err(_) => schedule.next_wait(&config, None),
        };
        let Some(wait) = wait else {
            return finish(result, schedule.attempts(), key);
        };
        tokio::time::sleep(wait).await;
        // The next attempt waits for the service to be ready (a concurrency limit's slot, a
        // rate limit), within the deadline too: past it, the last attempt's answer is the
        // request's.
        let ready = poll_fn(|cx| inner.poll_ready(cx));
        let ready = match schedule.deadline(&config) {
            Some(deadline) => match tokio::time::timeout_at(deadline, ready).await {
                Ok(ready) => ready,
                Err(_) => return finish(result, schedule.attempts(), key),
            },
            None => ready.await,
        };
        if let Err(error) = ready {
            return Err(RetryError::service(error, schedule.attempts(), key));
        }
    }
}

/// The last attempt's answer, with its [`RetryOutcome`].
fn finish<ResBody, E: Into<BoxError>>(
    result: Result<Response<ResBody>, E>,
    attempts: u32,
    key: HeaderValue,
) -> Result<Response<ResBody>, RetryError> {
    match result {
        Ok(mut response) => {
            let replayed = policy::replayed(response.headers());
            let outcome = RetryOutcome::new(key, attempts, replayed);
            response.extensions_mut().insert(outcome);
            Ok(response)
        }
        Err(error) => Err(RetryError::service(error, attempts, key)),
    }
}
