//! [`RetryError`]: why a request through an [`IdempotentRetryLayer`](super::IdempotentRetryLayer)
//! has no response.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use http::HeaderValue;

use super::body::BufferError;
use crate::body::BoxError;

/// Why a request through an [`IdempotentRetryLayer`](super::IdempotentRetryLayer) has no
/// response: the inner service failed on the last attempt, or the request's body could not be
/// kept for retries.
///
/// [`source`](Error::source) is the underlying error: the inner service's (boxed, as tower's
/// own middleware box theirs: [`inner`](Self::inner) and `downcast_ref` reach its type), or the
/// body's.
#[derive(Debug)]
pub struct RetryError {
    kind: Kind,
    attempts: u32,
    key: Option<HeaderValue>,
}

#[derive(Debug)]
enum Kind {
    Service(BoxError),
    BodyTooLarge { limit: usize },
    Body(BoxError),
    Deadline(Duration),
}

/// What a [`RetryError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryErrorKind {
    /// The inner service failed (a connection refused, reset or lost, a timeout...) on the last
    /// attempt, or was not ready for the next one. The request may have run on the server:
    /// retry it later with the same [`key`](RetryError::key).
    Service,
    /// The request body is over the layer's `max_body_bytes`: nothing was sent.
    BodyTooLarge,
    /// The request body failed while it was read: nothing was sent.
    Body,
    /// The deadline ended while an attempt was in flight, which was cut off: the request may
    /// have run on the server (a server behind this crate's layer runs it to its end). Send it
    /// again later with the same [`key`](RetryError::key): the server replays its answer.
    Deadline,
}

impl RetryError {
    pub(crate) fn service(error: impl Into<BoxError>, attempts: u32, key: HeaderValue) -> Self {
        Self {
            kind: Kind::Service(error.into()),
            attempts,
            key: Some(key),
        }
    }

    /// An error of the inner service before any attempt of the layer's own (a pass-through
    /// request, or a service that was not ready).
    pub(crate) fn passthrough(error: impl Into<BoxError>, attempts: u32) -> Self {
        Self {
            kind: Kind::Service(error.into()),
            attempts,
            key: None,
        }
    }

    /// The deadline (`deadline` long) ended during the last of `attempts` attempts.
    pub(crate) fn deadline(deadline: Duration, attempts: u32, key: HeaderValue) -> Self {
        Self {
            kind: Kind::Deadline(deadline),
            attempts,
            key: Some(key),
        }
    }

    pub(crate) fn buffer(error: BufferError, key: HeaderValue) -> Self {
        let kind = match error {
            BufferError::TooLarge { limit } => Kind::BodyTooLarge { limit },
            BufferError::Read(error) => Kind::Body(error),
        };
        Self {
            kind,
            attempts: 0,
            key: Some(key),
        }
    }

    /// What the error is about.
    pub fn kind(&self) -> RetryErrorKind {
        match self.kind {
            Kind::Service(_) => RetryErrorKind::Service,
            Kind::BodyTooLarge { .. } => RetryErrorKind::BodyTooLarge,
            Kind::Body(_) => RetryErrorKind::Body,
            Kind::Deadline(_) => RetryErrorKind::Deadline,
        }
    }

    /// How many attempts were sent (`0` when nothing was).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The request's key (the caller's, or the one the layer made), to retry the operation
    /// later; `None` for a request that passed through.
    pub fn key(&self) -> Option<&HeaderValue> {
        self.key.as_ref()
    }

    /// The inner service's error, when it is one; `downcast_ref` finds its type (hyper-util's
    /// `client::legacy::Error`, tower's `timeout::error::Elapsed`, ...).
    pub fn inner(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        match &self.kind {
            Kind::Service(error) => Some(&**error),
            _ => None,
        }
    }

    /// The inner service's error, when it is one.
    pub fn into_inner(self) -> Option<BoxError> {
        match self.kind {
            Kind::Service(error) => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Service(_) => match self.attempts {
                0 => f.write_str("the service failed"),
                1 => f.write_str("the request failed after 1 attempt"),
                n => write!(f, "the request failed after {n} attempts"),
            },
            Kind::BodyTooLarge { limit } => write!(
                f,
                "the request body is over the {limit}-byte limit kept for retries"
            ),
            Kind::Body(_) => f.write_str("the request body could not be read"),
            Kind::Deadline(deadline) => write!(
                f,
                "no answer within the deadline ({deadline:?}) after {} attempt{}",
                self.attempts,
                if self.attempts == 1 { "" } else { "s" }
            ),
        }
    }
}

impl Error for RetryError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            Kind::BodyTooLarge { .. } | Kind::Deadline(_) => None,
            Kind::Service(error) | Kind::Body(error) => Some(&**error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_texts_and_sources() {
        let key = HeaderValue::from_static("k-1");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let error = RetryError::service(io, 3, key.clone());
        assert_eq!(error.kind(), RetryErrorKind::Service);
        assert_eq!(error.attempts(), 3);
        assert_eq!(error.key(), Some(&key));
        assert_eq!(error.to_string(), "the request failed after 3 attempts");
        assert_eq!(error.source().unwrap().to_string(), "reset");
        let inner = error.into_inner().unwrap();
        let io = inner.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);

        let error = RetryError::buffer(BufferError::TooLarge { limit: 10 }, key.clone());
        assert_eq!(error.kind(), RetryErrorKind::BodyTooLarge);
        assert_eq!(error.attempts(), 0);
        assert!(error.inner().is_none());
        assert!(error.source().is_none());
        assert!(error.to_string().contains("10-byte limit"), "{error}");

        let error = RetryError::buffer(BufferError::Read("truncated".into()), key.clone());
        assert_eq!(error.kind(), RetryErrorKind::Body);
        assert_eq!(error.source().unwrap().to_string(), "truncated");

        let error = RetryError::deadline(Duration::from_secs(2), 1, key.clone());
        assert_eq!(error.kind(), RetryErrorKind::Deadline);
        assert_eq!((error.attempts(), error.key()), (1, Some(&key)));
        assert!(error.inner().is_none() && error.source().is_none());
        assert_eq!(
            error.to_string(),
            "no answer within the deadline (2s) after 1 attempt"
        );
    }
}
