//! The [`Idempotency`] service: the whole request flow.
//!
//! `call` decides at once what needs no I/O: pass-through for uncovered methods and requests
//! without a key, `400` for a missing or invalid key, the tenant, `413` for an announced body
//! over the limit. A keyed request then runs its [`prelude`]: buffer and fingerprint the body,
//! one atomic `begin`, and a replay, `409`, `422` or `503` without the handler. A request that
//! acquired its key runs its handler, once, under a renewed lease, then what comes [`after`]:
//! its response stored or its key released. That part runs to its end even when the client goes
//! away (see `detach`).

use std::future::Future;
use std::panic;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::admission::Permit;
use crate::body::{
    BoxError, Chunks, RequestBody, ResponseBody, ResponseKind, ResponseRead, content_length,
    read_body, read_response,
};
use crate::claim::{self, HeldClaim};
use crate::config::{Config, IDEMPOTENCY_BYPASSED, Shared};
use crate::detach::Execution;
use crate::error::{ErrorRenderer, Problem};
use crate::fingerprint::Fingerprint;
use crate::future::{Answer, ResponseFuture, Running, Step};
use crate::handler::{Call, Handler, Idempotency, RequestBodyOf};
use crate::key::{self, IdempotencyKey, KeyError, ParsedKey};
use crate::lease::{Guard, Renewals, timed};
use crate::metrics::StoreOp;
use crate::outcome::{Outcome, RequestSpan, Started};
use crate::response::{Report, answer, finish, replay, unavailable};
use crate::store::{Begin, IdempotencyStore, LockToken, RecordKey, StoreErrorKind};
use crate::stored::StoredResponse;
use crate::tenant::TenantExtractor;
use crate::wait;

/// Boxes `$future`, allocating first, so that the compiler can build it in its allocation
/// rather than on the stack and then copy it there. A macro, not a function taking a closure:
/// the closure's captures would be one more copy of everything the future is made from.
macro_rules! in_place {
    ($future:expr) => {{
        let boxed = Box::write(Box::new_uninit(), $future);
        Box::into_pin(boxed)
    }};
}

impl<S, St, T, E, ReqBody> Service<Request<ReqBody>> for Idempotency<S, St, T, E>
where
    S: Handler<ReqBody>,
    St: IdempotencyStore,
    T: TenantExtractor,
    E: ErrorRenderer,
    ReqBody: RequestBodyOf,
{
    type Response = Response<ResponseBody<S::Body>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Body, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        if !config.methods.contains(req.method()) {
            return self.pass(req);
        }
        let key = match key::parse(req.headers(), &config.header) {
            Ok(key) => key,
            Err(KeyError::Missing) if !config.require_key => return self.pass(req),
            Err(KeyError::Missing) => {
                let problem = Problem::key_missing(&config.header);
                let report = Report::refused(None, None).reusing(req.extensions_mut());
                return self.refuse(problem, Outcome::MissingKey, report);
            }
            Err(KeyError::Invalid(why)) => {
                let problem = Problem::key_invalid(&config.header, why);
                let report = Report::refused(None, None).reusing(req.extensions_mut());
                return self.refuse(problem, Outcome::InvalidKey, report);
            }
        };
        let (mut parts, body) = req.into_parts();
        let tenant = match self.shared.tenant.extract(&parts) {
            Ok(tenant) if tenant.is_shared() && !config.shared_scope => {
                let problem = Problem::tenant_missing();
                let report = Report::refused(Some(&key), None).reusing(&mut parts.extensions);
                return self.refuse(problem, Outcome::TenantMissing, report);
            }
            Ok(tenant) => config.sealer.seal(tenant),
            Err(rejection) => {
                let problem = Problem::tenant_rejected(&rejection);
                let report = Report::refused(Some(&key), None).reusing(&mut parts.extensions);
                return self.refuse(problem, Outcome::TenantRejected, report);
            }
        };
        if content_length(&parts).is_some_and(|len| len > config.max_body_bytes as u64) {
            let problem = Problem::body_too_large(config.max_body_bytes);
            let report = Report::refused(Some(&key), Some(&tenant));
            let report = report.reusing(&mut parts.extensions);
            return self.refuse(problem, Outcome::TooLarge, report);
        }
        let span = RequestSpan::new(&parts, key.key.as_bytes(), &tenant);
        // The service that `poll_ready` made ready is let go, and with it what it holds of the
        // inner service's capacity (a `Buffer`'s slot, a concurrency limit's permit): the
        // request's flow makes its own clone ready once it holds its key (see `Call`), so that
        // nothing is held while the body arrives, the store answers or a duplicate waits.
        let inner = self.inner.clone();
        drop(std::mem::replace(&mut self.inner, inner.clone()));
        let shared = self.shared.clone();
        let finish_on_disconnect = config.finish_on_disconnect;
        let ParsedKey { key, raw } = key;
        let keyed = Keyed {
            raw,
            record: RecordKey::from_text(tenant, key),
        };
        let prelude = in_place!(prelude(shared, inner, parts, body, keyed));
        ResponseFuture::keyed(prelude, finish_on_disconnect, span)
    }
}

impl<S, St, T, E> Idempotency<S, St, T, E> {
    /// Passes a request through untouched.
    fn pass<ReqBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S::Future, S::Body, S::Error>
    where
        S: Handler<ReqBody>,
    {
        ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::streaming)))
    }

    /// Answers at once, without a store call.
    fn refuse<F, B, Err>(
        &self,
        problem: Problem,
        outcome: Outcome,
        report: Report<'_>,
    ) -> ResponseFuture<F, B, Err>
    where
        E: ErrorRenderer,
    {
        ResponseFuture::ready(answer(&self.shared, &problem, outcome, report))
    }
}

/// The first part of a keyed request's flow: reads and fingerprints the body, and asks the
/// store, in one atomic step, what the request does. Dropped (its client went away) before it
/// holds the key, it runs nothing and holds nothing: a `begin` dropped before its answer may
/// still take effect at a store across a network, and the store releases the record it leaves
/// (the crate's shared stores do; see [`IdempotencyStore::begin`]).
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn prelude<S, St, T, E, ReqBody>(
    shared: Arc<Shared<St, T, E>>,
    inner: S,
    mut parts: Parts,
    body: ReqBody,
    keyed: Keyed,
) -> impl Future<Output = Step<S::Body, S::Error>> + Send
where
    S: Handler<ReqBody>,
    St: IdempotencyStore,
    T: Send + Sync + 'static,
    E: ErrorRenderer,
    ReqBody: RequestBodyOf,
{
    async move {
        let started = Started::now();
        // The config and the report are named at each use, not held in locals across the
        // awaits: each such local would take room in this future for its whole run (see
        // `the_prelude_stays_in_a_small_allocation`).
        macro_rules! report {
            () => {
                Report::keyed(&keyed.raw, &keyed.record, started)
            };
        }
        // The report of an answer without the handler, whose map the request's extensions lend.
        macro_rules! answered {
            () => {
                report!().reusing(&mut parts.extensions)
            };
        }
        let (chunks, fingerprint) = match read_body(body, &parts, &shared.config).await {
            Ok(read) => read,
            Err(err) => {
                let (problem, outcome) = err.problem(&shared.config);
                return Step::Answer(Ok(answer(&shared, &problem, outcome, answered!())));
            }
        };
        // Keyed work is bounded here, once the body is in and before the store is asked, never
        // by cutting off a run: a client that sends its body slowly holds no place meanwhile.
        let admission = shared.config.admission;
        let Ok(permit) = shared.admission.admit(keyed.record.tenant(), admission) else {
            let problem = Problem::overloaded(shared.config.retry_after_secs());
            return Step::Answer(Ok(answer(
                &shared,
                &problem,
                Outcome::Overloaded,
                answered!(),
            )));
        };
        let begin = shared
            .store
            .begin(&keyed.record, &fingerprint, shared.config.lease);
        let (begin, waited) = match timed(StoreOp::Begin, shared.config.store_timeout, begin).await
        {
            // A duplicate may wait for the first request's answer instead of `409`.
            Ok(Begin::InFlight) if shared.config.wait.is_some() => {
                let waited = wait::for_first(&shared, &keyed.record, &fingerprint).await;
                (waited, true)
            }
            begin => (begin, false),
        };
        match begin {
            Ok(Begin::Acquired(token)) => {
                let claim = Some((&fingerprint, token));
                let req = keyed_request(parts, chunks, &keyed.record, &shared, claim);
                let held = Held {
                    keyed,
                    permit,
                    token,
                    started,
                };
                Step::Run(hold(shared, inner, req, held))
            }
            Ok(Begin::Completed(stored)) => Step::Answer(Ok(replay(&shared, stored, answered!()))),
            Ok(Begin::InFlight) => {
                let problem = Problem::in_progress(shared.config.retry_after_secs());
                Step::Answer(Ok(answer(
                    &shared,
                    &problem,
                    Outcome::InProgress,
                    answered!(),
                )))
            }
            Ok(Begin::Mismatch) => {
                let problem = Problem::key_reuse();
                Step::Answer(Ok(answer(
                    &shared,
                    &problem,
                    Outcome::Mismatch,
                    answered!(),
                )))
            }
            // A store that is full answered, and a record that cannot be decoded is a record:
            // its request may have run. Neither is a failure to run past; nor is a failure while
            // waiting, once the store said that the key is held (without waiting, a `409`).
            Err(err)
                if shared.config.fail_open
                    && !waited
                    && !matches!(
                        err.kind(),
                        StoreErrorKind::CapacityExceeded | StoreErrorKind::Corrupt
                    ) =>
            {
                let req = keyed_request(parts, chunks, &keyed.record, &shared, None);
                // Boxed: the rare fail-open path does not size every request's future.
                let report = report!().failed(&err);
                Step::Answer(Box::pin(bypass(&shared.config, inner, req, report)).await)
            }
            Err(err) => Step::Answer(Ok(unavailable(&shared, &err, answered!()))),
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

/// Fail-open: the store failed, so the handler runs without protection.
async fn bypass<S, ReqBody>(
    config: &Config,
    inner: S,
    req: Request<RequestBody<ReqBody>>,
    report: Report<'_>,
) -> Result<Response<ResponseBody<S::Body>>, S::Error>
where
    S: Handler<ReqBody>,
{
    let mut response = match Box::pin(Call::new(inner, req)).await {
        Ok(response) => response.map(ResponseBody::inner),
        Err(err) => {
            report.emit(Outcome::Bypassed);
            return Err(err);
        }
    };
    response.headers_mut().insert(
        IDEMPOTENCY_BYPASSED,
        HeaderValue::from_static("store-unavailable"),
    );
    Ok(finish(response, Outcome::Bypassed, config, report))
}

/// Arms the guard of a request that acquired its key, makes the handler's future, and boxes the
/// handler's part of its flow on its own: the answers without a handler (replays, 409, 422)
/// live in a small allocation, and this part can be detached when the client goes away.
fn hold<S, St, T, E, ReqBody>(
    shared: Arc<Shared<St, T, E>>,
    inner: S,
    req: Request<RequestBody<ReqBody>>,
    held: Held,
) -> Running<S::Body, S::Error>
where
    S: Handler<ReqBody>,
    St: IdempotencyStore,
    T: Send + Sync + 'static,
    E: Send + Sync + 'static,
    ReqBody: Send + 'static,
{
    let Held {
        keyed: Keyed { raw, record },
        permit,
        token,
        started,
    } = held;
    let config = &shared.config;
    let (store, timeout, lease) = (shared.store.clone(), config.store_timeout, config.lease);
    let waiters = config.wait.map(|_| shared.waiters.clone());
    let runs = shared.detached.clone();
    let claim = HeldClaim::of(&req);
    let renewed = claim.clone();
    let then = move |guard, renewals, output| after(shared, raw, claim, guard, renewals, output);
    // The service is made ready and called under the lease; one whose `poll_ready` or `call`
    // panics has its key released before the panic goes on, as one whose future panics. Each
    // part is made inside the allocation's expression, so that it can be built in place.
    in_place!({
        let guard = Guard::new(store, record, token, timeout, started, waiters, &runs);
        Execution::new(
            guard.running(lease, renewed, Call::new(inner, req), then),
            &runs,
            permit,
        )
    })
}

/// A keyed request: its key as the client sent it, and its record.
struct Keyed {
    raw: HeaderValue,
    record: RecordKey,
}

/// What a request that acquired its key holds: its record's lock token besides.
struct Held {
    keyed: Keyed,
    /// Its admission, held until its flow ends.
    permit: Permit,
    token: LockToken,
    started: Started,
}

/// What follows the handler of a request that holds its key: its response stored, or its key
/// released. Chosen at once from the handler's output, so that the future that runs it keeps
/// only what its own course needs.
#[inline(always)]
fn after<St, T, E, B, Err>(
    shared: Arc<Shared<St, T, E>>,
    raw: HeaderValue,
    claim: HeldClaim,
    guard: Guard<St>,
    renewals: Renewals,
    output: Result<Response<B>, Err>,
) -> After<
    impl Future<Output = Answer<B, Err>>,
    impl Future<Output = Answer<B, Err>>,
    impl Future<Output = Answer<B, Err>>,
>
where
    St: IdempotencyStore,
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    let response = match output {
        Ok(response) => response,
        Err(err) => {
            let future = released(shared, raw, guard, Err(err));
            return After::Released { future };
        }
    };
    if claim.written() {
        // The handler completed its record in its own transaction (`Claim::respond_in`): the
        // record is settled, not stored again.
        After::Settled {
            future: settled(shared, raw, guard, response),
        }
    } else if shared.config.stores(&response) {
        let (head, body) = response.into_parts();
        After::Kept {
            future: kept(shared, raw, guard, renewals, head, body),
        }
    } else {
        let future = released(shared, raw, guard, Ok(response));
        After::Released { future }
    }
}

pin_project_lite::pin_project! {
    /// The course a request takes after its handler, one of three futures in place.
    #[project = AfterProj]
    enum After<K, S, R> {
        Kept { #[pin] future: K },
        Settled { #[pin] future: S },
        Released { #[pin] future: R },
    }
}

impl<K, S, R, O> Future for After<K, S, R>
where
    K: Future<Output = O>,
    S: Future<Output = O>,
    R: Future<Output = O>,
{
    type Output = O;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        match self.project() {
            AfterProj::Kept { future } => future.poll(cx),
            AfterProj::Settled { future } => future.poll(cx),
            AfterProj::Released { future } => future.poll(cx),
        }
    }
}

/// Stores a handler's response for replay, and gives it back for the client. A response over the
/// response cap, or whose body fails, completes the key as not replayable. The body is read under
/// the key's lease, renewed as while the handler ran; a body that panics has the key released
/// before its panic goes on.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn kept<St, T, E, B, Err>(
    shared: Arc<Shared<St, T, E>>,
    raw: HeaderValue,
    mut guard: Guard<St>,
    mut renewals: Renewals,
    mut head: http::response::Parts,
    body: B,
) -> impl Future<Output = Answer<B, Err>>
where
    St: IdempotencyStore,
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    async move {
        guard.answered(head.status, shared.config.ttl);
        let read = read_response(body, shared.config.max_response_bytes);
        let read = 'read: {
            // The read's result is gone before the release's await: a `match` that awaited
            // in its arm would keep it (168 bytes and more) in this future for every stage.
            let panic = match guard.under_lease(&mut renewals, read).await {
                Ok(read) => break 'read read,
                Err(panic) => panic,
            };
            guard.release_after_panic().await;
            panic::resume_unwind(panic)
        };
        drop(renewals);
        let (stored, body) = to_store(read, &mut head, &shared.config, guard.key());
        let outcome = guard.conclude(stored, shared.config.ttl).await;
        let report = Report::keyed(&raw, guard.key(), guard.started());
        Ok(finish(
            Response::from_parts(head, body),
            outcome,
            &shared.config,
            report,
        ))
    }
}

/// What is stored of a handler's response read whole, and what its client gets: the response
/// as it came for a body within the response cap; for a larger one, a record that it is not
/// replayable, and the body passed on as it streams; for a body that failed, a record that it
/// is not replayable, and the failure passed on after what came.
fn to_store<B>(
    read: ResponseRead<B>,
    head: &mut http::response::Parts,
    config: &Config,
    key: &RecordKey,
) -> (StoredResponse, ResponseBody<B>) {
    match read {
        ResponseRead::Whole { chunks, trailers } => {
            // The body goes on whole, its length known: a `Transfer-Encoding` the handler set
            // (an upstream's response passed on) would contradict it, and the server would
            // drop the connection rather than send both.
            crate::util::remove_header(&mut head.headers, &http::header::TRANSFER_ENCODING);
            let bytes = chunks.into_bytes();
            // In the shared scope a replay may reach another caller: its cookies stay out.
            let skip_cookies = !config.shared_scope_cookies && key.tenant().is_shared();
            let skip = &config.skip_response_headers;
            let (name, t) = (&config.header, trailers.as_ref());
            let stored = StoredResponse::from_parts(head, &bytes, t, name, skip, skip_cookies);
            (stored, ResponseBody::full_with(bytes, trailers))
        }
        ResponseRead::TooLarge { prefix, rest } => {
            let omitted = StoredResponse::omitted(head.status);
            let prefix = Some(prefix.into_bytes());
            let body = ResponseKind::Prefixed { prefix, body: rest };
            (omitted, ResponseBody::from(body))
        }
        // The handler answered (its operation ran), but its body failed: the client gets what
        // came and the failure, and the key completes as not replayable, as for a response over
        // the cap: its retry is `409 idempotency_response_not_stored`, never a second run.
        ResponseRead::Failed { prefix, error } => {
            let omitted = StoredResponse::omitted(head.status);
            let (prefix, error) = (Some(prefix.into_bytes()), Some(error));
            let body = ResponseKind::Failed {
                prefix,
                paused: false,
                error,
            };
            (omitted, ResponseBody::from(body))
        }
    }
}

/// Settles a record its handler completed in its own transaction. Committed: executed. Still
/// in flight under this token (rolled back, yet answered): released, so an effect that did not
/// happen is never replayed. A store that fails here leaves the lease as it is.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn settled<St, T, E, B, Err>(
    shared: Arc<Shared<St, T, E>>,
    raw: HeaderValue,
    mut guard: Guard<St>,
    response: Response<B>,
) -> impl Future<Output = Answer<B, Err>>
where
    St: IdempotencyStore,
{
    async move {
        let outcome = guard.settle().await;
        let report = Report::keyed(&raw, guard.key(), guard.started());
        let response = response.map(ResponseBody::inner);
        Ok(finish(response, outcome, &shared.config, report))
    }
}

/// Releases the key of a handler that failed, or whose response is not stored (its status is
/// not one the layer stores), so that a retry runs the handler again.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn released<St, T, E, B, Err>(
    shared: Arc<Shared<St, T, E>>,
    raw: HeaderValue,
    mut guard: Guard<St>,
    output: Result<Response<B>, Err>,
) -> impl Future<Output = Answer<B, Err>>
where
    St: IdempotencyStore,
{
    async move {
        guard.release().await;
        let report = Report::keyed(&raw, guard.key(), guard.started());
        let response = match output {
            Ok(response) => response.map(ResponseBody::inner),
            // The service failed: no response carries the outcome, so its event does alone.
            Err(err) => {
                report.emit(Outcome::Released);
                return Err(err);
            }
        };
        Ok(finish(response, Outcome::Released, &shared.config, report))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Full;
    use tower_layer::Layer;

    use super::*;
    use crate::tenant::TenantId;
    use crate::{IdempotencyLayer, MemoryStore};

    /// glibc serves requests over 1,000 bytes from its large bins, and before each such request
    /// merges every small freed chunk it keeps for reuse: a prelude over that size costs every
    /// keyed request (replays included) a pass over the allocator's free lists.
    #[test]
    fn the_prelude_stays_in_a_small_allocation() {
        async fn handler(
            _: Request<RequestBody<Full<Bytes>>>,
        ) -> Result<Response<Full<Bytes>>, Infallible> {
            Ok(Response::new(Full::new(Bytes::new())))
        }
        let svc = IdempotencyLayer::new(MemoryStore::new()).layer(tower::service_fn(handler));
        let shared = svc.shared.clone();
        let (parts, body) = Request::new(Full::new(Bytes::new())).into_parts();
        let keyed = Keyed {
            raw: HeaderValue::from_static("k"),
            record: RecordKey::new(TenantId::shared(), "k"),
        };
        let prelude = prelude(shared, svc.inner, parts, body, keyed);
        let size = std::mem::size_of_val(&prelude);
        assert!(size <= 1_000, "the prelude takes {size} bytes");
    }

    /// The handler's part of the flow keeps, at each stage, only what that stage needs: while
    /// the handler runs, not the request it was made from; once it answered, not its future. A
    /// handler that reads its body and answers a small response fits it in an allocation
    /// glibc serves from its per-thread cache (chunks up to 1,032 bytes) without first merging
    /// its free chunks (the 1,000 bytes past which it does): kept as one `async` block, it took
    /// 1,688 bytes here.
    #[tokio::test]
    async fn the_handler_s_part_stays_in_a_small_allocation() {
        async fn handler(
            req: Request<RequestBody<Full<Bytes>>>,
        ) -> Result<Response<Full<Bytes>>, Infallible> {
            let body = http_body_util::BodyExt::collect(req.into_body()).await;
            let body = body.unwrap().to_bytes();
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = http::StatusCode::CREATED;
            let json = HeaderValue::from_static("application/json");
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, json);
            Ok(response)
        }
        let size = handler_part_size(tower::service_fn(handler)).await;
        assert!(size <= 1_000, "the handler's part takes {size} bytes");
    }

    /// The handler's part of the flow keeps the handler's future once (an `async fn` that
    /// pins its argument keeps it twice): here a future that holds 8 KiB across an `await`.
    #[tokio::test]
    async fn the_handler_s_part_keeps_the_handler_s_future_once() {
        async fn handler(
            _: Request<RequestBody<Full<Bytes>>>,
        ) -> Result<Response<Full<Bytes>>, Infallible> {
            let buffer = [1u8; 8192];
            tokio::task::yield_now().await;
            let body = Bytes::copy_from_slice(&buffer[..1]);
            Ok(Response::new(Full::new(body)))
        }
        let size = handler_part_size(tower::service_fn(handler)).await;
        assert!(size < 8192 + 2048, "the handler's part takes {size} bytes");
    }

    /// The size of the handler's part of a request to `handler` that acquired a new key, as
    /// `hold` makes it.
    async fn handler_part_size<S: Handler<Full<Bytes>>>(handler: S) -> usize {
        let svc = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
        let (shared, inner) = (svc.shared, svc.inner);
        let record = RecordKey::new(TenantId::shared(), "k");
        let fingerprint = Fingerprint::from_bytes([0; 32]);
        let begin = shared
            .store
            .begin(&record, &fingerprint, shared.config.lease);
        let Ok(Begin::Acquired(token)) = begin.await else {
            panic!("a new key is acquired");
        };
        let permit = shared
            .admission
            .admit(record.tenant(), shared.config.admission)
            .unwrap();
        let held = Held {
            keyed: Keyed {
                raw: HeaderValue::from_static("k"),
                record,
            },
            permit,
            token,
            started: Started::now(),
        };
        let req = Request::new(RequestBody::buffered(Chunks::default()));
        let running = hold(shared, inner, req, held);
        std::mem::size_of_val(&*running)
    }
}
