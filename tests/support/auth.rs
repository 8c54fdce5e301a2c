//! A stand-in authentication middleware: it reads the `Authorization` header, asks the test's
//! `verify` who the caller is, and puts that principal in the request extensions, where
//! `TenantFromExtension` finds it. A real app verifies a signature or looks a session up; what
//! matters to the tests is that the principal comes from what was verified. And the
//! credentials the tests send: access tokens shaped like JWTs, and a keyed payment carrying
//! one.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

// Access tokens shaped like JWTs: `alice` holds two (before and after a refresh), `bob` one.
// A real app verifies the signature; the tests look the whole token up, so a token whose
// claims were edited (a forged `sub`) is unknown.
pub const ALICE_T1: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MX0.c2lnLWFsaWNlLTE";
pub const ALICE_T2: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6Mn0.c2lnLWFsaWNlLTI";
pub const BOB: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IiLCJleHAiOjF9.c2lnLWJvYg";
pub const FORGED_ALICE: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MX0.Zm9yZ2Vk";

/// A keyed `POST /payments` of `{"amount":100}`, with `Authorization: Bearer <token>` when a
/// token is given.
pub fn pay(token: Option<&str>, key: &str) -> axum::http::Request<Body> {
    let mut builder = axum::http::Request::post("/payments").header("idempotency-key", key);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::from(r#"{"amount":100}"#)).unwrap()
}

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
