//! The client side: [`IdempotentRetryLayer`], one key per operation and safe retries.
//!
//! A server that honours idempotency keys can only protect an operation if its client sends
//! one key for it and the same key on every retry. This layer does that for any tower HTTP
//! client (hyper-util's legacy `Client`, or your own `Service<http::Request<_>>`), and
//! [`IdempotentRetryMiddleware`](crate::IdempotentRetryMiddleware) (feature `reqwest`) does it
//! for `reqwest`.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower_layer::Layer;

use crate::config::IDEMPOTENCY_KEY;

mod body;
mod error;
mod outcome;
mod policy;
#[cfg(feature = "reqwest")]
mod reqwest;
mod service;

pub use body::RetryBody;
pub use error::{RetryError, RetryErrorKind};
pub use outcome::RetryOutcome;
#[cfg(feature = "reqwest")]
pub use reqwest::IdempotentRetryMiddleware;
pub use service::{IdempotentRetry, RetryFuture};

/// The settings every request of an [`IdempotentRetryLayer`] reads; fixed once built.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) max_retries: u32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) deadline: Duration,
    pub(crate) max_body_bytes: usize,
    /// Whether a `409` without `Retry-After` is retried.
    pub(crate) conflicts: bool,
}

impl Config {
    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            header: IDEMPOTENCY_KEY,
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
            max_body_bytes: 2 * 1024 * 1024,
            conflicts: false,
        }
    }
}

/// A [`Layer`] for HTTP clients: one idempotency key per request, the same key and the same
/// body on every attempt, and retries only where the key makes them safe.
///
/// For a covered method (POST and PATCH by default):
///
/// - a request without an `Idempotency-Key` gets one, a random UUID v4; a key the caller set is
///   kept as it is;
/// - the body is read once, up to [`max_body_bytes`](IdempotentRetryLayerBuilder::max_body_bytes)
///   (2 MiB by default; a larger body is a [`RetryError`] of kind
///   [`BodyTooLarge`](RetryErrorKind::BodyTooLarge), never sent), and every attempt sends those
///   same bytes with the same key;
/// - it retries when the inner service fails (a connection refused, reset or lost: the request
///   may or may not have run, and the key makes running it again safe; the layer cannot tell
///   one client's errors apart, so every error of the inner service is retried, one that can
///   never succeed too: an `https` URL on a plain-HTTP connector costs the retries), and on
///   `409` with
///   `Retry-After` (the first attempt is still running), `429`, and `5xx` except `501` and
///   `505` (the server failed and released the key). It never retries another `4xx`: a `422`
///   means the key was used for a different request, a bug a retry cannot fix; a `409` without
///   `Retry-After` is the operation's own conflict, or `idempotency_response_not_stored` (see
///   [`retry_conflicts_without_retry_after`](IdempotentRetryLayerBuilder::retry_conflicts_without_retry_after)
///   for servers whose in-progress `409` has no `Retry-After`). A response marked
///   `Idempotent-Replayed: true` is the operation's answer, whatever its status, and is never
///   retried (a `409` that the operation itself answered is stored by the server: its retry
///   gets the replay and stops there);
/// - between attempts it waits what the response's `Retry-After` says (delta-seconds or an
///   HTTP-date), capped at [`max_delay`](IdempotentRetryLayerBuilder::max_delay); otherwise an
///   exponential backoff with full jitter: a random wait between zero and
///   `base_delay × 2^(retry − 1)`, capped at `max_delay`;
/// - it stops after [`max_retries`](IdempotentRetryLayerBuilder::max_retries) retries, or when
///   the next attempt would start past the [`deadline`](IdempotentRetryLayerBuilder::deadline)
///   counted from the first one (it never sleeps past it), and returns the last response or
///   error; an attempt still in flight at the deadline is cut off, and the answer is a
///   [`RetryError`] of kind [`Deadline`](RetryErrorKind::Deadline), with the key;
/// - the response carries a [`RetryOutcome`] in its extensions: the key, the number of attempts,
///   and whether the server replayed a stored response. It is handed over when its head
///   arrives, and its body streams to the caller: a connection lost while the body comes is the
///   caller's body error, not retried (the operation has run). Take the key from the
///   [`RetryOutcome`] before reading the body, and send the request again with it on such an
///   error: the server replays the response.
///
/// Other methods pass through untouched: no key, no buffering, no retry, no [`RetryOutcome`].
///
/// # Types
///
/// The layer takes `http::Request<B>` for any body `B` and hands the inner service
/// `http::Request<RetryBody<B>>`: the buffered bytes of a covered request, or `B` itself when
/// the request passes through. Its error is [`RetryError`], which holds the inner service's
/// error (any `Into<BoxError>`, boxed as tower's own middleware do) on the last attempt.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::ServiceBuilder;
/// use tower_idempotency::{IdempotentRetryLayer, RetryBody};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = Client::builder(TokioExecutor::new()).build_http::<RetryBody<Full<Bytes>>>();
/// let client = ServiceBuilder::new()
///     .layer(IdempotentRetryLayer::new())
///     .service(client);
/// # let _ = client;
/// # }
/// ```
///
/// The deadline bounds the whole request once its body is read, an attempt in flight and the
/// wait for the inner service to be ready for a retry included. An attempt that has no
/// answer by then is dropped (hyper-util closes its connection). It may have run on the server,
/// and runs to its end there if it started (this crate's server layer does): send the request
/// again later with the error's key, and the server replays its answer. To retry an attempt that
/// stalls before the deadline, bound each attempt too: put a timeout between this layer and the
/// client (`tower::timeout`, for example; hyper-util's client has none of its own). An attempt
/// that times out is an error of the inner service, retried with the same key; the server then
/// answers `409` while the first attempt still runs there, then the replay.
///
/// Defaults: POST and PATCH, the `Idempotency-Key` header, 3 retries, a 100 ms base delay, a
/// 5 s cap on any one wait, a 30 s deadline, bodies up to 2 MiB. The layer needs a Tokio
/// runtime with its time driver enabled.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct IdempotentRetryLayer {
    config: Arc<Config>,
}

impl IdempotentRetryLayer {
    /// A layer with the default settings.
    ///
    /// ```
    /// use tower_idempotency::IdempotentRetryLayer;
    ///
    /// let layer = IdempotentRetryLayer::new();
    /// assert_eq!(layer.max_retries(), 3);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Settings for a layer, starting from the defaults.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::IdempotentRetryLayer;
    ///
    /// let layer = IdempotentRetryLayer::builder()
    ///     .max_retries(5)
    ///     .deadline(Duration::from_secs(10))
    ///     .build();
    /// assert_eq!(layer.max_retries(), 5);
    /// ```
    pub fn builder() -> IdempotentRetryLayerBuilder {
        IdempotentRetryLayerBuilder::default()
    }

    /// The methods that get a key and are retried.
    pub fn methods(&self) -> &[Method] {
        &self.config.methods
    }

    /// The name of the key header.
    pub fn header_name(&self) -> &HeaderName {
        &self.config.header
    }

    /// The most retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.config.max_retries
    }

    /// The ceiling of the first backoff wait; each retry doubles it.
    pub fn base_delay(&self) -> Duration {
        self.config.base_delay
    }

    /// The longest wait between two attempts, `Retry-After` included.
    pub fn max_delay(&self) -> Duration {
        self.config.max_delay
    }

    /// How long after the first attempt a retry may still start.
    pub fn deadline(&self) -> Duration {
        self.config.deadline
    }

    /// The largest request body buffered for retries.
    pub fn max_body_bytes(&self) -> usize {
        self.config.max_body_bytes
    }

    /// Whether a `409` without `Retry-After` is retried.
    pub fn retries_conflicts_without_retry_after(&self) -> bool {
        self.config.conflicts
    }

    #[cfg(feature = "reqwest")]
    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.config
    }
}

impl<S> Layer<S> for IdempotentRetryLayer {
    type Service = IdempotentRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentRetry::new(inner, self.config.clone())
    }
}

/// Settings of an [`IdempotentRetryLayer`], checked by [`build`](Self::build).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct IdempotentRetryLayerBuilder {
    config: Config,
}

impl IdempotentRetryLayerBuilder {
    /// The methods that get a key and are retried; the others pass through untouched. Default:
    /// POST and PATCH.
    ///
    /// ```
    /// use http::Method;
    /// use tower_idempotency::IdempotentRetryLayer;
    ///
    /// let layer = IdempotentRetryLayer::builder()
    ///     .methods([Method::POST, Method::PATCH, Method::PUT])
    ///     .build();
    /// assert_eq!(layer.methods().len(), 3);
    /// ```
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// The name of the key header. Default: `Idempotency-Key`.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::IdempotentRetryLayer;
    ///
    /// let layer = IdempotentRetryLayer::builder()
    ///     .header_name(HeaderName::from_static("x-request-key"))
    ///     .build();
    /// assert_eq!(layer.header_name(), "x-request-key");
    /// ```
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The most retries after the first attempt; `0` sends each request once, with its key.
    /// Default: 3.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotentRetryLayer::builder().max_retries(5).build();
    /// assert_eq!(layer.max_retries(), 5);
    /// ```
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.config.max_retries = max_retries;
        self
    }

    /// The ceiling of the first backoff wait; the n-th retry waits a random time between zero
    /// and `base_delay × 2^(n − 1)`, capped at [`max_delay`](Self::max_delay). Default: 100 ms.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = tower_idempotency::IdempotentRetryLayer::builder()
    ///     .base_delay(Duration::from_millis(250))
    ///     .build();
    /// assert_eq!(layer.base_delay(), Duration::from_millis(250));
    /// ```
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.config.base_delay = delay;
        self
    }

    /// The longest wait between two attempts, a server's `Retry-After` included. Default: 5 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = tower_idempotency::IdempotentRetryLayer::builder()
    ///     .max_delay(Duration::from_secs(2))
    ///     .build();
    /// assert_eq!(layer.max_delay(), Duration::from_secs(2));
    /// ```
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.config.max_delay = delay;
        self
    }

    /// How long the request may take, from its first attempt's start (its body is read before):
    /// a wait that would end past it is not taken, nor a wait for the inner service to be ready
    /// for a retry (a concurrency limit's slot) that lasts past it, and the last response or
    /// error is returned; an attempt still in flight then is cut off, and the request ends with a [`RetryError`] of kind
    /// [`Deadline`](RetryErrorKind::Deadline) (with the key, to send it again later). Default:
    /// 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = tower_idempotency::IdempotentRetryLayer::builder()
    ///     .deadline(Duration::from_secs(10))
    ///     .build();
    /// assert_eq!(layer.deadline(), Duration::from_secs(10));
    /// ```
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.deadline = deadline;
        self
    }

    /// The largest request body read and kept for retries; a larger one is an error, and
    /// nothing is sent. Default: 2 MiB.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotentRetryLayer::builder()
    ///     .max_body_bytes(64 * 1024)
    ///     .build();
    /// assert_eq!(layer.max_body_bytes(), 64 * 1024);
    /// ```
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.config.max_body_bytes = max;
        self
    }

    /// Retry every `409`, not only one with `Retry-After`. Default: `false`.
    ///
    /// This crate's server, like most, sends `Retry-After` with the `409` that says the first
    /// request with the key still runs; a `409` without it is final: the operation's own
    /// conflict (a duplicate the application found), or `409 idempotency_response_not_stored`
    /// (the operation ran and its response cannot be replayed). Turn this on for a server whose
    /// in-progress `409` has no `Retry-After`; an application's own `409` is then sent again
    /// until the retries are spent.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotentRetryLayer::builder()
    ///     .retry_conflicts_without_retry_after(true)
    ///     .build();
    /// assert!(layer.retries_conflicts_without_retry_after());
    /// ```
    pub fn retry_conflicts_without_retry_after(mut self, retry: bool) -> Self {
        self.config.conflicts = retry;
        self
    }

    /// The layer.
    ///
    /// # Panics
    ///
    /// If `base_delay` or `deadline` is zero, or `max_delay` is shorter than `base_delay`.
    pub fn build(self) -> IdempotentRetryLayer {
        let config = self.config;
        assert!(
            !config.base_delay.is_zero(),
            "IdempotentRetryLayer: base_delay must be longer than zero"
        );
        assert!(
            config.max_delay >= config.base_delay,
            "IdempotentRetryLayer: max_delay must not be shorter than base_delay"
        );
        assert!(
            !config.deadline.is_zero(),
            "IdempotentRetryLayer: deadline must be longer than zero"
        );
        IdempotentRetryLayer {
            config: Arc::new(config),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let layer = IdempotentRetryLayer::new();
        assert_eq!(layer.methods(), [Method::POST, Method::PATCH]);
        assert_eq!(layer.header_name(), "idempotency-key");
        assert_eq!(layer.max_retries(), 3);
        assert_eq!(layer.base_delay(), Duration::from_millis(100));
        assert_eq!(layer.max_delay(), Duration::from_secs(5));
        assert_eq!(layer.deadline(), Duration::from_secs(30));
        assert_eq!(layer.max_body_bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn a_builder_clone_never_changes_the_original() {
        let builder = IdempotentRetryLayer::builder().max_retries(1);
        let other = builder.clone().max_retries(9).build();
        assert_eq!(builder.build().max_retries(), 1);
        assert_eq!(other.max_retries(), 9);
    }

    #[test]
    #[should_panic(expected = "base_delay must be longer than zero")]
    fn a_zero_base_delay_is_refused() {
        let _ = IdempotentRetryLayer::builder()
            .base_delay(Duration::ZERO)
            .build();
    }

    #[test]
    #[should_panic(expected = "max_delay must not be shorter than base_delay")]
    fn a_max_delay_below_the_base_is_refused() {
        let _ = IdempotentRetryLayer::builder()
            .base_delay(Duration::from_secs(2))
            .max_delay(Duration::from_secs(1))
            .build();
    }

    #[test]
    #[should_panic(expected = "deadline must be longer than zero")]
    fn a_zero_deadline_is_refused() {
        let _ = IdempotentRetryLayer::builder()
            .deadline(Duration::ZERO)
            .build();
    }
}
