//! [`RetryOutcome`]: what the retries of one request came to.

use http::HeaderValue;

/// What the attempts of one covered request came to: put in the extensions of the response an
/// [`IdempotentRetryLayer`](super::IdempotentRetryLayer) (or the reqwest middleware) returns.
///
/// ```
/// use http::Response;
/// use tower_idempotency::RetryOutcome;
///
/// fn log(response: &Response<String>) {
///     if let Some(outcome) = RetryOutcome::of(response) {
///         println!(
///             "key {:?}: {} attempt(s), replayed: {}",
///             outcome.key(),
///             outcome.attempts(),
///             outcome.replayed()
///         );
///     }
/// }
/// # log(&Response::new(String::new()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOutcome {
    key: HeaderValue,
    attempts: u32,
    replayed: bool,
}

impl RetryOutcome {
    pub(crate) fn new(key: HeaderValue, attempts: u32, replayed: bool) -> Self {
        Self {
            key,
            attempts,
            replayed,
        }
    }

    /// The outcome in `response`'s extensions; `None` for a request that passed through
    /// (its method is not covered).
    pub fn of<B>(response: &http::Response<B>) -> Option<&Self> {
        response.extensions().get()
    }

    /// The key every attempt carried: the caller's, or the one the layer made.
    pub fn key(&self) -> &HeaderValue {
        &self.key
    }

    /// How many attempts were sent, the last one included (`1` when the first was answered).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the server answered with a stored response (`Idempotent-Replayed: true`): the
    /// operation ran before, on an earlier attempt or an earlier request with this key.
    pub fn replayed(&self) -> bool {
        self.replayed
    }
}
