//! The errors the layer answers with, and how they are rendered.
//!
//! By default every error is an RFC 9457 `application/problem+json` body with `type`, `title`,
//! `status`, `detail` and a machine-readable `code` ([`ErrorCode`]). Plug your own
//! [`ErrorRenderer`] to match your API's error envelope.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::tenant::TenantRejection;

/// The machine-readable code of an error the layer answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// `400 idempotency_key_missing`: the layer requires a key and the request has none.
    MissingKey,
    /// `400 idempotency_key_invalid`: the key is empty, longer than 255 characters, not visible
    /// ASCII, or the header was sent more than once.
    InvalidKey,
    /// `409 idempotency_key_in_progress`: a request with this key is still running; retry after
    /// `Retry-After` seconds.
    InProgress,
    /// `422 idempotency_key_reuse`: the key was already used for a different request (method,
    /// path, query or body).
    Mismatch,
    /// `413 request_body_too_large`: the request body is over the layer's `max_body_bytes`; the
    /// handler did not run.
    TooLarge,
    /// `400 request_body_incomplete`: the request body ended before the length it announced, or
    /// could not be read; the handler did not run.
    BodyIncomplete,
    /// `503 idempotency_store_unavailable`: the store failed, timed out or is full; nothing ran.
    /// Retry after `Retry-After` seconds.
    StoreUnavailable,
    /// `409 idempotency_response_not_stored`: a request with this key already completed, but its
    /// response was over the layer's `max_response_bytes`, so it cannot be replayed. The handler
    /// is not run again.
    NotStored,
    /// `idempotency_tenant_rejected`, with the status the tenant extractor chose: the request's
    /// tenant could not be determined.
    TenantRejected,
    /// `400 idempotency_tenant_missing`: the request carries a key but names no tenant (with
    /// the default tenant, no `Authorization` header), and the layer does not let such
    /// requests share one scope (see `IdempotencyLayer::shared_scope`); nothing ran.
    TenantMissing,
    /// `503 idempotency_overloaded`: the layer is working on its most keyed requests at once,
    /// overall or for this tenant; nothing ran. Retry after `Retry-After` seconds.
    Overloaded,
    /// `500 idempotency_claim_failed`: a handler's `Claim` could not be used (the application
    /// misused it, or its response body failed): a `ClaimError` the handler returned (features
    /// `postgres`, `sqlx`). Its record is released.
    ClaimFailed,
}

/// The names these codes had before they took the names of their [`Outcome`](crate::Outcome).
#[allow(non_upper_case_globals)]
impl ErrorCode {
    /// Renamed [`MissingKey`](Self::MissingKey).
    #[deprecated(note = "renamed `ErrorCode::MissingKey`")]
    pub const KeyMissing: Self = Self::MissingKey;
    /// Renamed [`InvalidKey`](Self::InvalidKey).
    #[deprecated(note = "renamed `ErrorCode::InvalidKey`")]
    pub const KeyInvalid: Self = Self::InvalidKey;
    /// Renamed [`InProgress`](Self::InProgress).
    #[deprecated(note = "renamed `ErrorCode::InProgress`")]
    pub const KeyInProgress: Self = Self::InProgress;
    /// Renamed [`Mismatch`](Self::Mismatch).
    #[deprecated(note = "renamed `ErrorCode::Mismatch`")]
    pub const KeyReuse: Self = Self::Mismatch;
    /// Renamed [`TooLarge`](Self::TooLarge).
    #[deprecated(note = "renamed `ErrorCode::TooLarge`")]
    pub const BodyTooLarge: Self = Self::TooLarge;
    /// Renamed [`NotStored`](Self::NotStored).
    #[deprecated(note = "renamed `ErrorCode::NotStored`")]
    pub const ResponseNotStored: Self = Self::NotStored;
}

impl ErrorCode {
    /// The snake_case code, as in the `code` member of a problem body.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MissingKey => "idempotency_key_missing",
            Self::InvalidKey => "idempotency_key_invalid",
            Self::InProgress => "idempotency_key_in_progress",
            Self::Mismatch => "idempotency_key_reuse",
            Self::TooLarge => "request_body_too_large",
            Self::BodyIncomplete => "request_body_incomplete",
            Self::StoreUnavailable => "idempotency_store_unavailable",
            Self::NotStored => "idempotency_response_not_stored",
            Self::TenantRejected => "idempotency_tenant_rejected",
            Self::TenantMissing => "idempotency_tenant_missing",
            Self::Overloaded => "idempotency_overloaded",
            Self::ClaimFailed => "idempotency_claim_failed",
        }
    }

    /// A short, human-readable summary that does not change from occurrence to occurrence.
    pub const fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key missing",
            Self::InvalidKey => "Idempotency key invalid",
            Self::InProgress => "Request in progress",
            Self::Mismatch => "Idempotency key reused",
            Self::TooLarge => "Request body too large",
            Self::BodyIncomplete => "Request body incomplete",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::NotStored => "Response not stored",
            Self::TenantRejected => "Tenant rejected",
            Self::TenantMissing => "Tenant missing",
            Self::Overloaded => "Too many requests in progress",
            Self::ClaimFailed => "Idempotency claim failed",
        }
    }

    fn anchor(self) -> &'static str {
        match self {
            Self::MissingKey => "MissingKey",
            Self::InvalidKey => "InvalidKey",
            Self::InProgress => "InProgress",
            Self::Mismatch => "Mismatch",
            Self::TooLarge => "TooLarge",
            Self::BodyIncomplete => "BodyIncomplete",
            Self::StoreUnavailable => "StoreUnavailable",
            Self::NotStored => "NotStored",
            Self::TenantRejected => "TenantRejected",
            Self::TenantMissing => "TenantMissing",
            Self::Overloaded => "Overloaded",
            Self::ClaimFailed => "ClaimFailed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error the layer answers with, handed to the [`ErrorRenderer`].
#[derive(Debug, Clone)]
pub struct Problem {
    code: ErrorCode,
    status: StatusCode,
    detail: Cow<'static, str>,
    retry_after: Option<u64>,
}

impl Problem {
    pub(crate) fn new(
        code: ErrorCode,
        status: StatusCode,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            code,
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// `400 idempotency_key_missing`.
    pub(crate) fn key_missing(header: &HeaderName) -> Self {
        let detail = format!("This endpoint requires an {header} header.");
        Self::new(ErrorCode::MissingKey, StatusCode::BAD_REQUEST, detail)
    }

    /// `400 idempotency_key_invalid`, saying `why`.
    pub(crate) fn key_invalid(header: &HeaderName, why: impl fmt::Display) -> Self {
        let detail = format!(
            "The {header} header is invalid: {why}. A key is 1 to 255 visible ASCII characters, sent once."
        );
        Self::new(ErrorCode::InvalidKey, StatusCode::BAD_REQUEST, detail)
    }

    /// `idempotency_tenant_rejected`, with the status and detail the tenant extractor chose.
    pub(crate) fn tenant_rejected(rejection: &TenantRejection) -> Self {
        let detail = rejection.detail().to_owned();
        Self::new(ErrorCode::TenantRejected, rejection.status(), detail)
    }

    /// `400 idempotency_tenant_missing`.
    pub(crate) fn tenant_missing() -> Self {
        Self::new(
            ErrorCode::TenantMissing,
            StatusCode::BAD_REQUEST,
            "This request carries an idempotency key but does not identify its caller, so its response could be replayed to someone else. Authenticate the request.",
        )
    }

    /// `503 idempotency_overloaded`, with `Retry-After`.
    pub(crate) fn overloaded(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::Overloaded,
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many requests with idempotency keys are in progress; the request was not processed. Retry after the Retry-After delay.",
        )
        .with_retry_after(retry_after)
    }

    /// `413 request_body_too_large`.
    pub(crate) fn body_too_large(limit: usize) -> Self {
        let detail = format!(
            "The request body is larger than the {limit} bytes allowed for idempotent requests."
        );
        Self::new(ErrorCode::TooLarge, StatusCode::PAYLOAD_TOO_LARGE, detail)
    }

    /// `413 request_body_too_large` for a body that a limit outside the layer cut off.
    pub(crate) fn body_over_limit() -> Self {
        Self::new(
            ErrorCode::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "The request body is larger than the server allows.",
        )
    }

    /// `400 request_body_incomplete`.
    pub(crate) fn body_incomplete() -> Self {
        Self::new(
            ErrorCode::BodyIncomplete,
            StatusCode::BAD_REQUEST,
            "The request body could not be read to the end.",
        )
    }

    /// `409 idempotency_key_in_progress`, with `Retry-After`.
    pub(crate) fn in_progress(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::InProgress,
            StatusCode::CONFLICT,
            "A request with this key is still being processed. Retry after the Retry-After delay.",
        )
        .with_retry_after(retry_after)
    }

    /// `422 idempotency_key_reuse`.
    pub(crate) fn key_reuse() -> Self {
        Self::new(
            ErrorCode::Mismatch,
            StatusCode::UNPROCESSABLE_ENTITY,
            "This idempotency key was already used for a different request (method, path, query or body). Use a new key for a new request.",
        )
    }

    /// `409 idempotency_response_not_stored`: the request completed with `status`, too large to
    /// store.
    pub(crate) fn not_stored(status: StatusCode) -> Self {
        let detail = format!(
            "A request with this key already completed with status {}, but its response was too large to store, so it cannot be replayed.",
            status.as_u16()
        );
        Self::new(ErrorCode::NotStored, StatusCode::CONFLICT, detail)
    }

    /// `503 idempotency_store_unavailable`, with `Retry-After`.
    pub(crate) fn store_unavailable(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "The idempotency store is unavailable; the request was not processed. Retry after the Retry-After delay.",
        )
        .with_retry_after(retry_after)
    }

    /// `503 idempotency_store_unavailable` from a store with no room for a new key (full of
    /// requests in flight), with a `Retry-After` of about a lease.
    pub(crate) fn store_full(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "The idempotency store has no room for a new key: it is full of requests in flight; the request was not processed. Retry after the Retry-After delay.",
        )
        .with_retry_after(retry_after)
    }

    /// `500 idempotency_claim_failed`: a handler's `Claim` could not be used, for the reason
    /// `what` (the crate's own words, never a database's).
    #[cfg(any(feature = "postgres", feature = "sqlx"))]
    pub(crate) fn claim_failed(what: &str) -> Self {
        let detail = format!(
            "The server could not record the outcome of this request under its idempotency key: {what}."
        );
        Self::new(
            ErrorCode::ClaimFailed,
            StatusCode::INTERNAL_SERVER_ERROR,
            detail,
        )
    }

    /// The machine-readable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The status the response must have.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// A human-readable explanation of this occurrence.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Seconds after which a retry may succeed (`409` in progress, `503`); the layer sends it
    /// as `Retry-After` unless the renderer set that header itself.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
}

/// Renders a [`Problem`] as a response. The layer then adds `Retry-After` (when the problem has
/// one and the renderer did not set it) and echoes the `Idempotency-Key`.
///
/// Implemented for closures `Fn(&Problem) -> Response<Bytes>` and by [`ProblemJson`].
///
/// ```
/// use bytes::Bytes;
/// use http::{Response, header};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Problem};
///
/// // An envelope of `{"detail", "error_code", "details"}`.
/// let layer = IdempotencyLayer::new(MemoryStore::new()).error_renderer(|problem: &Problem| {
///     let body = serde_json::json!({
///         "detail": problem.detail(),
///         "error_code": problem.code().as_str().to_uppercase(),
///         "details": {},
///     });
///     Response::builder()
///         .status(problem.status())
///         .header(header::CONTENT_TYPE, "application/json")
///         .body(Bytes::from(body.to_string()))
///         .unwrap()
/// });
/// # let _ = layer;
/// ```
pub trait ErrorRenderer: Send + Sync + 'static {
    /// The response for `problem`. Its status should be `problem.status()`.
    fn render(&self, problem: &Problem) -> Response<Bytes>;
}

impl<F> ErrorRenderer for F
where
    F: Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static,
{
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        self(problem)
    }
}

/// The default renderer: RFC 9457 `application/problem+json`.
///
/// ```json
/// {
///   "type": "https://docs.rs/tower-idempotency/latest/tower_idempotency/enum.ErrorCode.html#variant.Mismatch",
///   "title": "Idempotency key reused",
///   "status": 422,
///   "detail": "This idempotency key was already used for a different request ...",
///   "code": "idempotency_key_reuse"
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

impl ErrorRenderer for ProblemJson {
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        let code = problem.code();
        let body = serde_json::json!({
            "type": format!(
                "https://docs.rs/tower-idempotency/latest/tower_idempotency/enum.ErrorCode.html#variant.{}",
                code.anchor()
            ),
            "title": code.title(),
            "status": problem.status().as_u16(),
            "detail": problem.detail(),
            "code": code.as_str(),
        });
        let mut response = Response::new(Bytes::from(body.to_string()));
        *response.status_mut() = problem.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_has_every_member() {
        let problem = Problem::new(
            ErrorCode::Mismatch,
            StatusCode::UNPROCESSABLE_ENTITY,
            "reused",
        );
        let response = ProblemJson.render(&problem);
        assert_eq!(response.status(), 422);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["code"], "idempotency_key_reuse");
        assert_eq!(body["status"], 422);
        assert_eq!(body["title"], "Idempotency key reused");
        assert_eq!(body["detail"], "reused");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .ends_with("#variant.Mismatch")
        );
    }
}
