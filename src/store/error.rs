use std::error::Error;
use std::fmt;

type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// An error from an [`IdempotencyStore`](crate::IdempotencyStore).
///
/// Opaque on purpose: match on [`kind`](Self::kind); the backend's own error, when there is
/// one, is kept as the [`source`](Error::source).
pub struct StoreError {
    kind: StoreErrorKind,
    message: Option<Box<str>>,
    source: Option<BoxError>,
}

/// What went wrong in a store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached or failed to answer (connection refused, I/O error,
    /// server error).
    Unavailable,
    /// The store call ran past its timeout.
    Timeout,
    /// The store is full: it holds its maximum number of live records.
    CapacityExceeded,
    /// The record is no longer held by the caller's lock token: its lease ran out and another
    /// request took it over, or it was removed.
    LeaseLost,
    /// A record read back from the store could not be decoded.
    Corrupt,
    /// The store does not implement this call (an optional one such as
    /// [`lookup`](crate::IdempotencyStore::lookup)).
    Unsupported,
    /// Anything else a backend reports.
    Other,
}

impl StoreError {
    /// A new error of `kind` that wraps the backend's error.
    pub fn new(kind: StoreErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            message: None,
            source: Some(source.into()),
        }
    }

    /// A new error of `kind` described by `message`.
    pub fn msg(kind: StoreErrorKind, message: impl Into<Box<str>>) -> Self {
        Self {
            kind,
            message: Some(message.into()),
            source: None,
        }
    }

    /// The store could not be reached or failed; `source` is the backend's error.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Unavailable, source)
    }

    /// The caller's lock token no longer holds the record.
    pub fn lease_lost() -> Self {
        Self::msg(
            StoreErrorKind::LeaseLost,
            "the record is no longer held by this lock token",
        )
    }

    /// The store holds its maximum number of live records.
    pub fn capacity_exceeded() -> Self {
        Self::msg(
            StoreErrorKind::CapacityExceeded,
            "the store holds its maximum number of records",
        )
    }

    /// The store call did not finish within `timeout`.
    pub fn timeout(timeout: std::time::Duration) -> Self {
        Self::msg(
            StoreErrorKind::Timeout,
            format!("the store call did not finish within {timeout:?}"),
        )
    }

    /// The store does not implement `call`.
    pub fn unsupported(call: &'static str) -> Self {
        Self::msg(
            StoreErrorKind::Unsupported,
            format!("this store does not implement `{call}`"),
        )
    }

    /// This error, described by `message` (shown in place of the source's own text), its
    /// source kept.
    #[cfg(any(feature = "postgres", feature = "sqlx"))]
    pub(crate) fn with_message(mut self, message: impl Into<Box<str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            StoreErrorKind::Unavailable => "idempotency store unavailable",
            StoreErrorKind::Timeout => "idempotency store timed out",
            StoreErrorKind::CapacityExceeded => "idempotency store is full",
            StoreErrorKind::LeaseLost => "idempotency record lease lost",
            StoreErrorKind::Corrupt => "idempotency record is corrupt",
            StoreErrorKind::Unsupported => "idempotency store call unsupported",
            StoreErrorKind::Other => "idempotency store error",
        };
        f.write_str(what)?;
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        } else if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_kind_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = StoreError::unavailable(io);
        assert_eq!(err.kind(), StoreErrorKind::Unavailable);
        assert_eq!(err.to_string(), "idempotency store unavailable: refused");
        let source = err.source().expect("source kept");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }

    #[test]
    fn messages_describe_the_kind() {
        assert_eq!(StoreError::lease_lost().kind(), StoreErrorKind::LeaseLost);
        assert!(StoreError::capacity_exceeded().to_string().contains("full"));
        assert!(
            StoreError::timeout(std::time::Duration::from_secs(1))
                .source()
                .is_none()
        );
    }
}
