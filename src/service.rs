//! The [`Idempotency`] service: the whole request flow.
//!
//! `call` decides at once what needs no I/O: pass-through for uncovered methods and requests
//! without a key, `400` for a missing or invalid key, the tenant, `413` for an announced body
//! over the limit. A keyed request then runs its [`prelude`]: buffer and fingerprint the body,
//! one atomic `begin`, and a replay, `409`, `422` or `503` without the handler. A request that
//! acquired its key runs [`execute`]: the handler, once, then its response stored or its key
//! released. That part runs to its end even when the client goes away (see `detach`).

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::request::Parts;
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;

use crate::body::{BoxError, Chunks, RequestBody, ResponseBody, ResponseKind};
use crate::claim::{self, HeldClaim};
use crate::config::{Config, IDEMPOTENCY_BYPASSED, IDEMPOTENT_REPLAYED, Shared};
use crate::detach::Execution;
use crate::error::{ErrorRenderer, Problem, ProblemJson};
use crate::fingerprint::{Fingerprint, Hasher};
use crate::future::{ResponseFuture, Running, Step};
use crate::key::{self, IdempotencyKey, KeyError, ParsedKey};
use crate::lease::{Guard, timed};
use crate::metrics::StoreOp;
use crate::outcome::{self, Outcome, RequestSpan, Started};
use crate::response::StoredResponse;
use crate::store::{Begin, IdempotencyStore, LockToken, RecordKey, StoreError, StoreErrorKind};
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
        let config = &self.shared.config;
        if !config.methods.contains(req.method()) {
            return self.pass(req);
        }
        let key = match key::parse(req.headers(), &config.header) {
            Ok(key) => key,
            Err(KeyError::Missing) if !config.require_key => return self.pass(req),
            Err(KeyError::Missing) => {
                let problem = Problem::key_missing(&config.header);
                return self.refuse(problem, Outcome::MissingKey, None, None);
            }
            Err(KeyError::Invalid(why)) => {
                let problem = Problem::key_invalid(&config.header, why);
                return self.refuse(problem, Outcome::InvalidKey, None, None);
            }
        };
        let (parts, body) = req.into_parts();
        let tenant = match self.shared.tenant.extract(&parts) {
            Ok(tenant) => tenant,
            Err(rejection) => {
                let problem = Problem::tenant_rejected(&rejection);
                return self.refuse(problem, Outcome::TenantRejected, Some(&key), None);
            }
        };
        if content_length(&parts).is_some_and(|len| len > config.max_body_bytes as u64) {
            let problem = Problem::body_too_large(config.max_body_bytes);
            return self.refuse(problem, Outcome::TooLarge, Some(&key), Some(&tenant));
        }
        let span = RequestSpan::new(&parts, &key.key, &tenant);
        // The service that `poll_ready` made ready is the one that runs the request.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let shared = self.shared.clone();
        let finish_on_disconnect = config.finish_on_disconnect;
        let prelude = Box::pin(prelude(shared, inner, parts, body, key, tenant));
        ResponseFuture::keyed(prelude, finish_on_disconnect, span)
    }
}

impl<S, St, T, E> Idempotency<S, St, T, E> {
    /// Passes a request through untouched.
    fn pass<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    {
        ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::streaming)))
    }

    /// Answers at once, without a store call.
    fn refuse<F, B, Err>(
        &self,
        problem: Problem,
        outcome: Outcome,
        key: Option<&ParsedKey>,
        tenant: Option<&TenantId>,
    ) -> ResponseFuture<F, B, Err>
    where
        E: ErrorRenderer,
    {
        ResponseFuture::ready(refuse(&self.shared, problem, outcome, key, tenant))
    }
}

/// The first part of a keyed request's flow: reads and fingerprints the body, and asks the
/// store, in one atomic step, what the request does. Dropped (its client went away) before it
/// holds the key, it runs nothing and holds nothing.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn prelude<S, St, T, E, ReqBody, ResBody>(
    shared: Arc<Shared<St, T, E>>,
    inner: S,
    parts: Parts,
    body: ReqBody,
    key: ParsedKey,
    tenant: TenantId,
) -> impl Future<Output = Step<ResBody, S::Error>> + Send
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    T: Send + Sync + 'static,
    E: ErrorRenderer,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Buf + Send,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: Buf + Send,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let started = Started::now();
        let config = &shared.config;
        let (chunks, fingerprint) = match read_body(body, &parts, config).await {
            Ok(read) => read,
            Err(err) => {
                let (problem, outcome) = err.problem(config);
                let response = refuse(&shared, problem, outcome, Some(&key), Some(&tenant));
                return Step::Answer(Ok(response));
            }
        };
        let ParsedKey { key, raw } = key;
        let record = RecordKey::new(tenant, key);
        let begin = shared.store.begin(&record, &fingerprint, config.lease);
        let begin = timed(StoreOp::Begin, config.store_timeout, begin).await;
        let report = Report::keyed(&raw, &record, started);
        match begin {
            Ok(Begin::Acquired(token)) => {
                let held = Some((&fingerprint, token));
                let req = keyed_request(parts, chunks, &record, &shared, held);
                Step::Run(hold(shared, inner, req, raw, record, token, started))
            }
            Ok(Begin::Completed(stored)) => Step::Answer(Ok(replay(&shared, stored, report))),
            Ok(Begin::InFlight) => {
                let problem = Problem::in_progress(config.retry_after_secs());
                Step::Answer(Ok(answer(&shared, &problem, Outcome::InProgress, report)))
            }
            Ok(Begin::Mismatch) => {
                let problem = Problem::key_reuse();
                Step::Answer(Ok(answer(&shared, &problem, Outcome::Mismatch, report)))
            }
            Err(_) if config.fail_open => {
                let req = keyed_request(parts, chunks, &record, &shared, None);
                Step::Answer(bypass(config, inner, req, report).await)
            }
            Err(err) => Step::Answer(Ok(unavailable(&shared, &err, report))),
        }
    }
}

/// The request the handler gets: its buffered body, and its key in the extensions; and, when it
/// holds its key, its [`Claim`](crate::Claim) (features `postgres`, `sqlx`).
fn keyed_request<B, St, T, E>(
    mut parts: Parts,
    chunks: Chunks,
    record: &RecordKey,
    shared: &Arc<Shared<St, T, E>>,
    held: Option<(&Fingerprint, LockToken)>,
) -> Request<RequestBody<B>>
where
    St: IdempotencyStore,
    T: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    parts.extensions.insert(IdempotencyKey::from_record(record));
    if let Some((fingerprint, token)) = held {
        claim::attach(&mut parts.extensions, shared, record, fingerprint, token);
    }
    Request::from_parts(parts, RequestBody::buffered(chunks))
}

/// A completed request's stored response, replayed; or `409` when it was too large to store.
fn replay<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    stored: StoredResponse,
    report: Report<'_>,
) -> Response<ResponseBody<B>> {
    if stored.is_omitted() {
        let problem = Problem::not_stored(stored.status());
        return answer(shared, &problem, Outcome::NotStored, report);
    }
    // Room for the two headers a replay adds: this one and the echoed key.
    let mut response = stored.into_replay(2).map(ResponseBody::full);
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    finish(response, Outcome::Replayed, &shared.config, report)
}

/// `503`: the store failed, timed out, or is full of requests in flight.
fn unavailable<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    err: &StoreError,
    report: Report<'_>,
) -> Response<ResponseBody<B>> {
    let config = &shared.config;
    let problem = match err.kind() {
        StoreErrorKind::CapacityExceeded => {
            Problem::store_full(config.store_full_retry_after_secs())
        }
        _ => Problem::store_unavailable(config.retry_after_secs()),
    };
    answer(shared, &problem, Outcome::StoreError, report)
}

/// Fail-open: the store failed, so the handler runs without protection.
async fn bypass<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    req: Request<RequestBody<ReqBody>>,
    report: Report<'_>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
{
    let mut response = Box::pin(inner.call(req)).await?.map(ResponseBody::inner);
    response.headers_mut().insert(
        IDEMPOTENCY_BYPASSED,
        HeaderValue::from_static("store-unavailable"),
    );
    Ok(finish(response, Outcome::Bypassed, config, report))
}

/// Arms the guard of a request that acquired its key, and boxes the handler's part of its flow
/// on its own: the answers without a handler (replays, 409, 422) live in a small allocation,
/// and this part can be detached when the client goes away.
fn hold<S, St, T, E, ReqBody, ResBody>(
    shared: Arc<Shared<St, T, E>>,
    inner: S,
    req: Request<RequestBody<ReqBody>>,
    raw: HeaderValue,
    record: RecordKey,
    token: LockToken,
    started: Started,
) -> Running<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    T: Send + Sync + 'static,
    E: Send + Sync + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: Buf + Send,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let (store, timeout) = (shared.store.clone(), config.store_timeout);
    let guard = Guard::new(store, record, token, timeout, started);
    let (runs, limit) = (shared.detached.clone(), config.max_detached_runs);
    let execute = execute(shared, inner, req, raw, guard, started);
    Box::pin(Execution::new(execute, &runs, limit))
}

/// Runs the handler of a request that holds its key, once, renewing the lease while it runs;
/// then stores its response, or releases the key.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn execute<S, St, T, E, ReqBody, ResBody>(
    shared: Arc<Shared<St, T, E>>,
    mut inner: S,
    req: Request<RequestBody<ReqBody>>,
    raw: HeaderValue,
    mut guard: Guard<St>,
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
        let claim = HeldClaim::of(&req);
        let response = match guard.renewing(config.lease, inner.call(req)).await {
            Ok(response) => response,
            Err(err) => {
                guard.release().await;
                return Err(err);
            }
        };
        let (response, outcome) = if claim.written() {
            settle(&mut guard, response).await
        } else if config.stores(&response) {
            keep(config, &mut guard, response).await
        } else {
            guard.release().await;
            (response.map(ResponseBody::inner), Outcome::Released)
        };
        Ok(finish(
            response,
            outcome,
            config,
            Report::keyed(&raw, guard.key(), started),
        ))
    }
}

/// A response whose handler completed its record inside its own transaction
/// (`Claim::respond_in`) is not stored again: the record is settled instead. Completed (the
/// transaction committed): executed. Still in flight under this request's token (the handler
/// rolled back, yet returned the response): released, so an effect that did not happen is
/// never replayed. A store that fails here leaves the lease as it is, never releasing on doubt.
async fn settle<St: IdempotencyStore, B>(
    guard: &mut Guard<St>,
    response: Response<B>,
) -> (Response<ResponseBody<B>>, Outcome) {
    let outcome = guard.settle().await;
    (response.map(ResponseBody::inner), outcome)
}

/// Stores a handler's response for replay, and gives it back for the client. A response over
/// the response cap completes the key as not replayable; a body that fails releases it.
async fn keep<St, B>(
    config: &Config,
    guard: &mut Guard<St>,
    response: Response<B>,
) -> (Response<ResponseBody<B>>, Outcome)
where
    St: IdempotencyStore,
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    let (head, body) = response.into_parts();
    let (body, outcome) = match read_response(body, config.max_response_bytes).await {
        ResponseRead::Whole(chunks) => {
            let bytes = chunks.to_bytes();
            // In the shared scope a replay may reach another caller: its cookies stay out.
            let skip_cookies = !config.shared_scope_cookies && guard.key().tenant().is_shared();
            let skip = &config.skip_response_headers;
            let stored = StoredResponse::from_parts(
                &head,
                bytes.clone(),
                &config.header,
                skip,
                skip_cookies,
            );
            guard.complete(stored, config.ttl).await;
            (ResponseBody::full(bytes), Outcome::Executed)
        }
        ResponseRead::TooLarge { prefix, rest } => {
            let omitted = StoredResponse::omitted(head.status);
            guard.complete(omitted, config.ttl).await;
            let prefix = Some(prefix.to_bytes());
            let body = ResponseKind::Prefixed { prefix, body: rest };
            (ResponseBody::from(body), Outcome::Executed)
        }
        ResponseRead::Failed { prefix, error } => {
            guard.release().await;
            let (prefix, error) = (Some(prefix.to_bytes()), Some(error));
            let body = ResponseKind::Failed { prefix, error };
            (ResponseBody::from(body), Outcome::Released)
        }
    };
    (Response::from_parts(head, body), outcome)
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

/// Renders `problem` as the answer to a keyed request.
fn answer<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    problem: &Problem,
    outcome: Outcome,
    report: Report<'_>,
) -> Response<ResponseBody<B>> {
    finish(render(shared, problem), outcome, &shared.config, report)
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

impl BodyError {
    fn problem(self, config: &Config) -> (Problem, Outcome) {
        match self {
            Self::TooLarge => (
                Problem::body_too_large(config.max_body_bytes),
                Outcome::TooLarge,
            ),
            Self::Read => (Problem::body_incomplete(), Outcome::BodyError),
        }
    }
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
