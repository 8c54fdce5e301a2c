//! [`IdempotentRetryMiddleware`]: the client side for `reqwest`, through `reqwest-middleware`.

use std::sync::Arc;

use http::Extensions;
use reqwest_middleware::{Error, Middleware, Next, Result};

use super::body::buffer;
use super::error::RetryError;
use super::outcome::RetryOutcome;
use super::policy::{self, Schedule};
use super::{Config, IdempotentRetryLayer};

/// A [`reqwest_middleware::Middleware`] that does what an [`IdempotentRetryLayer`] does, for
/// `reqwest`: one key per covered request (the caller's, or a new UUID v4), the same key and the
/// same body bytes on every attempt, the same retry rules, waits and bounds, and a [`RetryOutcome`]
/// in the response's extensions (`response.extensions().get::<RetryOutcome>()`).
///
/// ```
/// use std::time::Duration;
/// use reqwest_middleware::ClientBuilder;
/// use tower_idempotency::{IdempotentRetryLayer, IdempotentRetryMiddleware};
///
/// let settings = IdempotentRetryLayer::builder().deadline(Duration::from_secs(10)).build();
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(IdempotentRetryMiddleware::new(settings))
///     .build();
/// # let _ = client;
/// ```
///
/// Retried errors: reqwest's connect, timeout and request errors (the request may or may not have
/// run; set a timeout on the `reqwest::Client` or the request to bound an attempt). Other errors,
/// those of middleware further down the chain included, are returned at once. The last attempt's
/// error is returned as it is; the request's key is then in the extensions the caller passed
/// (`ClientWithMiddleware::execute_with_extensions`), as a [`RetryOutcome`]: send the request again
/// later with that key, and a request that ran is replayed rather than run again. (With `send()`,
/// those extensions are not handed back: to keep the key of a request that may have run, give it
/// yourself in the key header.) A body over `max_body_bytes`, or a body that fails while it is
/// read, is an [`Error::Middleware`] holding a [`RetryError`], and nothing is sent. A streaming
/// body is read whole, up to the cap, before the first attempt.
///
/// Put it before middleware that should run on every attempt (logging, auth refresh): those run
/// once per attempt; the ones before it run once per request.
#[derive(Debug, Clone, Default)]
pub struct IdempotentRetryMiddleware {
    config: Arc<Config>,
}

impl IdempotentRetryMiddleware {
    /// A middleware with the settings of `layer` (see [`IdempotentRetryLayer::builder`]).
    pub fn new(layer: IdempotentRetryLayer) -> Self {
        Self {
            config: layer.config().clone(),
        }
    }
}

impl From<IdempotentRetryLayer> for IdempotentRetryMiddleware {
    fn from(layer: IdempotentRetryLayer) -> Self {
        Self::new(layer)
    }
}

/// Whether a failed attempt may be retried: the connection failed or was lost, or it timed
/// out.
fn transient(error: &Error) -> bool {
    match error {
        Error::Reqwest(error) => error.is_connect() || error.is_timeout() || error.is_request(),
        Error::Middleware(_) => false,
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotentRetryMiddleware {
    async fn handle(
        &self,
        mut request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<reqwest::Response> {
        let config = &*self.config;
        if !config.covers(request.method()) {
            return next.run(request, extensions).await;
        }
        let key = match request.headers().get(&config.header) {
            Some(key) => key.clone(),
            None => {
                let key = policy::new_key();
                request
                    .headers_mut()
                    .insert(config.header.clone(), key.clone());
                key
            }
        };
        if let Some(body) = request.body_mut().take() {
            let buffered = buffer(body, config.max_body_bytes)
                .await
                .map_err(|e| Error::middleware(RetryError::buffer(e, key.clone())))?;
            *request.body_mut() = Some(reqwest::Body::from(buffered.data));
        }
        let mut schedule = Schedule::start();
        loop {
            // A body of bytes always clones; were it not to, the request is sent once.
            let Some(attempt) = request.try_clone() else {
                return next.run(request, extensions).await;
            };
            let attempt = next.clone().run(attempt, extensions);
            let result = match schedule.deadline(config) {
                Some(deadline) => tokio::time::timeout_at(deadline, attempt).await,
                None => Ok(attempt.await),
            };
            schedule.attempted();
            let Ok(result) = result else {
                let attempts = schedule.attempts();
                extensions.insert(RetryOutcome::new(key.clone(), attempts, false));
                let error = RetryError::deadline(config.deadline, attempts, key);
                return Err(Error::middleware(error));
            };
            let wait = match &result {
                Ok(response)
                    if policy::should_retry(
                        response.status(),
                        response.headers(),
                        config.conflicts,
                    ) =>
                {
                    schedule.next_wait(config, policy::retry_after(response.headers()))
                }
                Ok(_) => None,
                Err(error) if transient(error) => schedule.next_wait(config, None),
                Err(_) => None,
            };
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => {
                    // The caller's extensions get the outcome too: when every attempt failed,
                    // they are where the key is found, to send the request again later with it.
                    let attempts = schedule.attempts();
                    return match result {
                        Ok(mut response) => {
                            let replayed = policy::replayed(response.headers());
                            let outcome = RetryOutcome::new(key, attempts, replayed);
                            extensions.insert(outcome.clone());
                            response.extensions_mut().insert(outcome);
                            Ok(response)
                        }
                        Err(error) => {
                            extensions.insert(RetryOutcome::new(key, attempts, false));
                            Err(error)
                        }
                    };
                }
            }
        }
    }
}
