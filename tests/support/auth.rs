//! A stand-in authentication middleware: it reads the `Authorization` header, asks the test's
//! `verify` who the caller is, and puts that principal in the request extensions, where
//! `TenantFromExtension` finds it. A real app verifies a signature or looks a session up; what
//! matters to the tests is that the principal comes from what was verified.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

/// What the middleware does with a request whose credentials `verify` does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// Answers `401` itself: the request never reaches what it wraps.
    Refuse,
    /// Lets it through with no principal (the layer's tenant extractor then rejects it).
    PassThrough,
}

/// The middleware's configuration: how a header value names a principal `P`, and what happens
/// when it names none.
pub struct Auth<P> {
    verify: fn(&str) -> Option<P>,
    unknown: Unknown,
}

impl<P> Clone for Auth<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Auth<P> {}

impl<P: Clone + Send + Sync + 'static> Auth<P> {
    /// `verify` maps the whole `Authorization` value (`"Bearer …"`, `"account 7"`) to a
    /// principal; `unknown` says what happens when it is missing or `verify` returns `None`.
    pub fn new(verify: fn(&str) -> Option<P>, unknown: Unknown) -> Self {
        Self { verify, unknown }
    }

    /// `app` behind this middleware.
    pub fn around(self, app: Router) -> Router {
        app.layer(middleware::from_fn_with_state(self, authenticate::<P>))
    }
}

async fn authenticate<P: Clone + Send + Sync + 'static>(
    State(auth): State<Auth<P>>,
    mut request: Request,
    next: Next,
) -> Response {
    let principal = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(auth.verify);
    match (principal, auth.unknown) {
        (Some(principal), _) => {
            request.extensions_mut().insert(principal);
        }
        (None, Unknown::Refuse) => return StatusCode::UNAUTHORIZED.into_response(),
        (None, Unknown::PassThrough) => {}
    }
    next.run(request).await
}
