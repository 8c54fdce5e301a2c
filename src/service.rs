//! The [`Idempotency`] service: the whole request flow.
//!
//! `call` decides at once what needs no I/O: pass-through for uncovered methods and requests
//! without a key, `400` for a missing or invalid key, the tenant, `413` for an announced body
//! over the limit. A keyed request then runs [`run`]: buffer and fingerprint the body, one
//! atomic `begin`, and replay, `409`, `422`, or run the handler and store its response.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;

use crate::body::{BoxError, Chunks, RequestBody, ResponseBody, ResponseKind};
use crate::error::{ErrorCode, ErrorRenderer, Problem, ProblemJson};
use crate::fingerprint::{Fingerprint, Hasher};
use crate::future::{Guard, ResponseFuture, timed};
use crate::key::{self, IdempotencyKey, KeyError, ParsedKey};
use crate::layer::{Config, IDEMPOTENCY_BYPASSED, IDEMPOTENT_REPLAYED, Shared};
use crate::outcome::{self, Outcome, Started};
use crate::response::StoredResponse;
use crate::store::{Begin, IdempotencyStore, LockToken, RecordKey};
use crate::tenant::{DefaultTenant, TenantExtractor, TenantId};

/// The service built by [`IdempotencyLayer`](crate::IdempotencyLayer).
pub struct Idempotency<S, St, T = DefaultTenant, E = ProblemJson> {
    inner: S,
    shared: Arc<Shared<St, T, E>>,
}

impl<S, St, T, E> Idempotency<S, St, T, E> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St, T, E>>) -> Self {
        Self { inner, shared }
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

impl<S: Clone, St, T, E> Clone for Idempotency<S, St, T, E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St, T, E> fmt::Debug for Idempotency<S, St, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, St, T, E, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St, T, E>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    T: TenantExtractor,
    E: ErrorRenderer,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Buf + Send,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: Buf + Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        if !config.methods.contains(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::streaming)));
        }
        let key = match key::parse(req.headers(), &config.header) {
            Ok(key) => key,
            Err(KeyError::Missing) if !config.require_key => {
                return ResponseFuture::passthrough(
                    self.inner.call(req.map(RequestBody::streaming)),
                );
            }
            Err(KeyError::Missing) => {
                let detail = format!("This endpoint requires an {} header.", config.header);
                let problem = Problem::new(ErrorCode::KeyMissing, StatusCode::BAD_REQUEST, detail);
                return ResponseFuture::ready(refuse(
                    shared,
                    problem,
                    Outcome::MissingKey,
                    None,
                    None,
                ));
            }
            Err(KeyError::Invalid(why)) => {
                let detail = format!(
                    "The {} header is invalid: {why}. A key is 1 to 255 visible ASCII characters, sent once.",
                    config.header
                );
                let problem = Problem::new(ErrorCode::KeyInvalid, StatusCode::BAD_REQUEST, detail);
                return ResponseFuture::ready(refuse(
                    shared,
                    problem,
                    Outcome::InvalidKey,
                    None,
                    None,
                ));
            }
        };
        let (parts, body) = req.into_parts();
        let tenant = match shared.tenant.extract(&parts) {
            Ok(tenant) => tenant,
            Err(rejection) => {
                let problem = Problem::new(
                    ErrorCode::TenantRejected,
                    rejection.status(),
                    rejection.detail().to_owned(),
                );
                return ResponseFuture::ready(refuse(
                    shared,
                    problem,
                    Outcome::TenantRejected,
                    Some(&key),
                    None,
                ));
            }
        };
        if content_length(&parts).is_some_and(|len| len > config.max_body_bytes as u64) {
            return ResponseFuture::ready(refuse(
                shared,
                too_large(config),
                Outcome::TooLarge,
                Some(&key),
                Some(&tenant),
            ));
        }
        // The service that `poll_ready` made ready is the one that runs the request.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        ResponseFuture::idempotent(Box::pin(run(
            shared.clone(),
            inner,
            parts,
            body,
            key,
            tenant,
        )))
    }
}

/// The idempotent flow of one keyed request.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn run<S, St, T, E, ReqBody, ResBody>(
    shared: Arc<Shared<St, T, E>>,
    mut inner: S,
    mut parts: Parts,
    body: ReqBody,
    key: ParsedKey,
    tenant: TenantId,
) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    E: ErrorRenderer,
    ReqBody: Body,
    ReqBody::Data: Buf,
    ResBody: Body + Unpin,
    ResBody::Data: Buf,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let started = Started::now();
        let config = &shared.config;
        let (chunks, fingerprint) = match read_body(body, &parts, config).await {
            Ok(read) => read,
            Err(BodyError::TooLarge) => {
                return Ok(refuse(
                    &shared,
                    too_large(config),
                    Outcome::TooLarge,
                    Some(&key),
                    Some(&tenant),
                ));
            }
            Err(BodyError::Read) => {
                let problem = Problem::new(
                    ErrorCode::BodyIncomplete,
                    StatusCode::BAD_REQUEST,
                    "The request body could not be read to the end.",
                );
                return Ok(refuse(
                    &shared,
                    problem,
                    Outcome::BodyError,
                    Some(&key),
                    Some(&tenant),
                ));
            }
        };
        let ParsedKey { key: key_str, raw } = key;
        let record = RecordKey::new(tenant, key_str);
        let done = |response, outcome| {
            let report = Report::keyed(&raw, &record, started);
            finish(response, outcome, config, report)
        };

        let begin = timed(
            config.store_timeout,
            shared.store.begin(&record, &fingerprint, config.lease),
        )
        .await;
        let token = match begin {
            Ok(Begin::Acquired(token)) => token,
            Ok(Begin::Completed(stored)) if stored.is_omitted() => {
                let detail = format!(
                    "A request with this key already completed with status {}, but its response was too large to store, so it cannot be replayed.",
                    stored.status().as_u16()
                );
                let problem =
                    Problem::new(ErrorCode::ResponseNotStored, StatusCode::CONFLICT, detail);
                return Ok(done(render(&shared, &problem), Outcome::NotStored));
            }
            Ok(Begin::Completed(stored)) => {
                // Room for the two headers a replay adds: this one and the echoed key.
                let mut response = stored.into_replay(2).map(ResponseBody::full);
                response
                    .headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                return Ok(done(response, Outcome::Replayed));
            }
            Ok(Begin::InFlight) => {
                let problem = Problem::new(
                    ErrorCode::KeyInProgress,
                    StatusCode::CONFLICT,
                    "A request with this key is still being processed. Retry after the Retry-After delay.",
                )
                .with_retry_after(config.retry_after_secs());
                return Ok(done(render(&shared, &problem), Outcome::InProgress));
            }
            Ok(Begin::Mismatch) => {
                let problem = Problem::new(
                    ErrorCode::KeyReuse,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "This idempotency key was already used for a different request (method, path, query or body). Use a new key for a new request.",
                );
                return Ok(done(render(&shared, &problem), Outcome::Mismatch));
            }
            Err(_) if config.fail_open => {
                parts
                    .extensions
                    .insert(IdempotencyKey::from_record(&record));
                let req = Request::from_parts(parts, RequestBody::buffered(chunks));
                let mut response = Box::pin(inner.call(req)).await?.map(ResponseBody::inner);
                response.headers_mut().insert(
                    IDEMPOTENCY_BYPASSED,
                    HeaderValue::from_static("store-unavailable"),
                );
                return Ok(done(response, Outcome::Bypassed));
            }
            Err(_) => {
                let problem = Problem::new(
                    ErrorCode::StoreUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The idempotency store is unavailable; the request was not processed. Retry after the Retry-After delay.",
                )
                .with_retry_after(config.retry_after_secs());
                return Ok(done(render(&shared, &problem), Outcome::StoreError));
            }
        };

        // This request holds the key. The handler's part of the flow is boxed on its own, so that
        // the answers without a handler (replays, 409, 422) live in a small allocation.
        parts
            .extensions
            .insert(IdempotencyKey::from_record(&record));
        let req = Request::from_parts(parts, RequestBody::buffered(chunks));
        Box::pin(execute(shared, inner, req, raw, record, token, started)).await
    }
}

/// Runs the handler of a request that holds its key, once, renewing the lease while it runs;
/// then stores its response, or releases the key.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn execute<S, St, T, E, ReqBody, ResBody>(
    shared: Arc<Shared<St, T, E>>,
    mut inner: S,
    req: Request<RequestBody<ReqBody>>,
    raw: HeaderValue,
    record: RecordKey,
    token: LockToken,
    started: Started,
) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body + Unpin,
    ResBody::Data: Buf,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let config = &shared.config;
        let mut guard = Guard::new(
            shared.store.clone(),
            record,
            token,
            config.store_timeout,
            started,
        );
        let response = match guard.renewing(config.lease, inner.call(req)).await {
            Ok(response) => response,
            Err(err) => {
                guard.release().await;
                return Err(err);
            }
        };

        let status = response.status();
        if !config.cache_policy.contains(status) {
            guard.release().await;
            let response = response.map(ResponseBody::inner);
            return Ok(finish(
                response,
                Outcome::Released,
                config,
                Report::keyed(&raw, guard.key(), started),
            ));
        }
        let (head, body) = response.into_parts();
        let body = match read_response(body, config.max_response_bytes).await {
            ResponseRead::Whole(chunks) => {
                let bytes = chunks.to_bytes();
                let stored = StoredResponse::from_parts(
                    &head,
                    bytes.clone(),
                    &config.header,
                    &config.skip_response_headers,
                );
                guard.complete(stored, config.ttl).await;
                ResponseBody::full(bytes)
            }
            ResponseRead::TooLarge { prefix, rest } => {
                guard
                    .complete(StoredResponse::omitted(status), config.ttl)
                    .await;
                ResponseBody::from(ResponseKind::Prefixed {
                    prefix: Some(prefix.to_bytes()),
                    body: rest,
                })
            }
            ResponseRead::Failed { prefix, error } => {
                guard.release().await;
                let response = Response::from_parts(
                    head,
                    ResponseBody::from(ResponseKind::Failed {
                        prefix: Some(prefix.to_bytes()),
                        error: Some(error),
                    }),
                );
                return Ok(finish(
                    response,
                    Outcome::Released,
                    config,
                    Report::keyed(&raw, guard.key(), started),
                ));
            }
        };
        let response = Response::from_parts(head, body);
        Ok(finish(
            response,
            Outcome::Executed,
            config,
            Report::keyed(&raw, guard.key(), started),
        ))
    }
}

/// What a response reports about its request: the key header to echo, and the key and tenant
/// whose hashes go into the outcome's event.
struct Report<'a> {
    raw: Option<&'a HeaderValue>,
    key: Option<&'a str>,
    tenant: Option<&'a TenantId>,
    started: Started,
}

impl<'a> Report<'a> {
    fn keyed(raw: &'a HeaderValue, record: &'a RecordKey, started: Started) -> Self {
        Self {
            raw: Some(raw),
            key: Some(record.key()),
            tenant: Some(record.tenant()),
            started,
        }
    }
}

/// Adds what every response to a keyed request carries: the echoed key (exactly as the client
/// sent it) and the outcome, in the extensions and as a `tracing` event.
fn finish<B>(
    mut response: Response<B>,
    outcome: Outcome,
    config: &Config,
    report: Report<'_>,
) -> Response<B> {
    outcome::emit(outcome, report.key, report.tenant, report.started);
    if let Some(raw) = report.raw {
        response
            .headers_mut()
            .insert(config.header.clone(), raw.clone());
    }
    response.extensions_mut().insert(outcome);
    response
}

/// Renders `problem` with the configured renderer, adding `Retry-After` when it has one.
fn render<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    problem: &Problem,
) -> Response<ResponseBody<B>> {
    let mut response = shared.renderer.render(problem).map(ResponseBody::full);
    if let Some(seconds) = problem.retry_after() {
        response
            .headers_mut()
            .entry(header::RETRY_AFTER)
            .or_insert_with(|| HeaderValue::from(seconds));
    }
    response
}

/// A response decided before any store call.
fn refuse<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    problem: Problem,
    outcome: Outcome,
    key: Option<&ParsedKey>,
    tenant: Option<&TenantId>,
) -> Response<ResponseBody<B>> {
    let response = render(shared, &problem);
    let report = Report {
        raw: key.map(|k| &k.raw),
        key: key.map(|k| &*k.key),
        tenant,
        started: Started::now(),
    };
    finish(response, outcome, &shared.config, report)
}

fn too_large(config: &Config) -> Problem {
    let detail = format!(
        "The request body is larger than the {} bytes allowed for idempotent requests.",
        config.max_body_bytes
    );
    Problem::new(
        ErrorCode::BodyTooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
        detail,
    )
}

fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

enum BodyError {
    TooLarge,
    Read,
}

/// Reads the request body up to the limit, hashing each chunk as it arrives (one pass, no
/// copy: the chunks go on to the handler as they came).
async fn read_body<B>(
    body: B,
    parts: &Parts,
    config: &Config,
) -> Result<(Chunks, Fingerprint), BodyError>
where
    B: Body,
    B::Data: Buf,
{
    let mut hasher = Hasher::new(parts, &config.fingerprint_headers);
    let mut chunks = Chunks::default();
    let mut body = pin!(body);
    while let Some(frame) = body.frame().await {
        let Ok(mut data) = frame.map_err(|_| BodyError::Read)?.into_data() else {
            continue; // trailers are not part of the fingerprint
        };
        if chunks.len() + data.remaining() > config.max_body_bytes {
            return Err(BodyError::TooLarge);
        }
        let chunk = data.copy_to_bytes(data.remaining());
        if !config.canonical_json {
            hasher.body(&chunk);
        }
        chunks.push(chunk);
    }
    if config.canonical_json {
        hasher.json_body(&chunks.to_bytes());
    }
    Ok((chunks, hasher.finish()))
}

enum ResponseRead<B> {
    Whole(Chunks),
    TooLarge { prefix: Chunks, rest: B },
    Failed { prefix: Chunks, error: BoxError },
}

/// Reads a handler's response body to store it, up to `limit` bytes.
async fn read_response<B>(mut body: B, limit: usize) -> ResponseRead<B>
where
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    let mut chunks = Chunks::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Err(error) => {
                return ResponseRead::Failed {
                    prefix: chunks,
                    error: error.into(),
                };
            }
            Ok(frame) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers are not stored
                };
                chunks.push(data.copy_to_bytes(data.remaining()));
                if chunks.len() > limit {
                    return ResponseRead::TooLarge {
                        prefix: chunks,
                        rest: body,
                    };
                }
            }
        }
    }
    ResponseRead::Whole(chunks)
}
