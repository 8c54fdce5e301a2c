//! [`Claim`]: completing a record inside the handler's own database transaction, so that the
//! handler's effects and its stored response commit together, or neither does.
//!
//! The layer puts a `Claim` in the extensions of every request that acquired its key; the
//! handler extracts it, does its work in a transaction, and calls [`Claim::respond_in`] before
//! COMMIT. The layer then does not store the response again: it only settles the record
//! ([`IdempotencyStore::settle`](crate::IdempotencyStore::settle)), releasing it when the
//! transaction did not commit.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum_core::body::Body;
use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{Extensions, HeaderValue, header};
use http_body_util::{BodyExt, Empty};

use crate::body::ResponseBody;
use crate::config::{CacheDecision, Config, Shared};
use crate::error::{ErrorRenderer, Problem, ProblemJson};
use crate::fingerprint::Fingerprint;
use crate::store::sql::{millis, token_bytes};
use crate::store::{ClaimTarget, IdempotencyStore, LockToken, RecordKey};
use crate::stored::StoredResponse;

/// What the layer holds for this request: its record key, the fingerprint it is bound to, the
/// lock token of its lease, the TTL of its stored response, and the store's table. An axum
/// extractor (feature `postgres` or `sqlx`).
///
/// Extract `Claim` in a handler behind [`IdempotencyLayer`](crate::IdempotencyLayer) on a
/// route whose requests carry a key (`.require_key(true)`), or `Option<Claim>` where a key is
/// optional: `None` for a request without one. It is there for every request that acquired its
/// key, whatever the store; only `SqlxStore` and `PostgresStore` can
/// [`respond_in`](Self::respond_in) a transaction.
///
/// ```no_run
/// use axum::extract::State;
/// use axum::http::StatusCode;
/// use axum::response::Response;
/// use tower_idempotency::{Claim, ClaimError};
///
/// async fn create(claim: Claim, State(pool): State<sqlx::PgPool>) -> Result<Response, ClaimError> {
///     let mut tx = pool.begin().await.map_err(ClaimError::database)?;
///     sqlx::query("INSERT INTO payments (amount) VALUES (100)")
///         .execute(&mut *tx)
///         .await
///         .map_err(ClaimError::database)?;
///     let response = claim.respond_in(&mut *tx, (StatusCode::CREATED, "paid")).await?;
///     tx.commit().await.map_err(ClaimError::database)?;
///     Ok(response)
/// }
/// ```
///
/// Cloning is cheap and shares the claim: it can be used once.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
pub struct Claim {
    inner: Arc<Held>,
}

/// The layer's side of a claim: what the handler used it for.
struct Held {
    key: RecordKey,
    fingerprint: Fingerprint,
    token: LockToken,
    target: Option<ClaimTarget>,
    context: Arc<dyn Context>,
    state: AtomicU8,
}

/// Not used yet.
const FRESH: u8 = 0;
/// `respond_in` was called.
const USED: u8 = 1;
/// `respond_in` completed the record in the caller's transaction.
const WRITTEN: u8 = 2;

/// The layer's settings, read by `respond_in` to store the response as the layer would.
trait Context: Send + Sync {
    fn config(&self) -> &Config;
}

impl<St, T, E> Context for Shared<St, T, E>
where
    St: Send + Sync,
    T: Send + Sync,
    E: Send + Sync,
{
    fn config(&self) -> &Config {
        &self.config
    }
}

/// Puts the claim of a request that acquired its key into its extensions.
pub(crate) fn attach<St, T, E>(
    extensions: &mut Extensions,
    shared: &Arc<Shared<St, T, E>>,
    key: &RecordKey,
    fingerprint: &Fingerprint,
    token: LockToken,
) where
    St: IdempotencyStore,
    T: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    let held = Held {
        key: key.clone(),
        fingerprint: *fingerprint,
        token,
        target: shared.store.claim_target(),
        context: shared.clone(),
        state: AtomicU8::new(FRESH),
    };
    extensions.insert(Claim {
        inner: Arc::new(held),
    });
}

/// The layer's handle on a request's claim, read back once the handler has returned.
#[derive(Clone)]
pub(crate) struct HeldClaim(Option<Arc<Held>>);

impl HeldClaim {
    pub(crate) fn of<B>(req: &http::Request<B>) -> Self {
        Self(req.extensions().get::<Claim>().map(|c| c.inner.clone()))
    }

    /// Whether the handler completed the record in its own transaction.
    pub(crate) fn written(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|held| held.state.load(Ordering::Acquire) == WRITTEN)
    }
}

/// Marks a response that [`Claim::respond_in`] stored inside the handler's transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CompletedInTransaction;

impl Claim {
    /// The record: the tenant's scope and the client's key.
    pub fn key(&self) -> &RecordKey {
        &self.inner.key
    }

    /// The fingerprint of the request the key is bound to.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.inner.fingerprint
    }

    /// The lock token of this request's lease; completing is fenced by it.
    pub fn token(&self) -> LockToken {
        self.inner.token
    }

    /// How long the stored response is kept (the layer's `ttl`).
    pub fn ttl(&self) -> Duration {
        self.inner.context.config().ttl
    }

    /// The store's table (quoted as in SQL), or `None` when the store cannot complete records
    /// in the application's transactions.
    pub fn table(&self) -> Option<&str> {
        self.inner.target.as_ref().map(ClaimTarget::table)
    }

    /// Stores `response` as this request's completed record inside the caller's transaction,
    /// and returns the response to send.
    ///
    /// `conn` is the transaction the handler's effects are written in: `&mut *tx` for a sqlx
    /// transaction on the `SqlxStore`'s database, or `&tx` for a tokio-postgres or
    /// deadpool-postgres transaction on the `PostgresStore`'s (see [`ClaimConnection`]). The
    /// record is written with one `UPDATE`, fenced by this claim's lock token, and commits or
    /// rolls back with the handler's effects: a crash before COMMIT leaves nothing, and the
    /// retry runs; a crash after COMMIT leaves both, and the retry replays. The row stays
    /// locked until the transaction ends, and no other request takes the key over meanwhile
    /// (it gets `409`).
    ///
    /// The response is stored as the layer stores one (the same headers left out, cookies
    /// kept out of the shared scope, over the response cap completed but not replayable). A
    /// response the layer would not store (a 5xx, a refusal, [`CacheDecision::Skip`]) is not
    /// written: it is returned as it is, and the layer releases the key as usual. The body is
    /// read into memory.
    ///
    /// The layer then does not store the response again. It checks the record instead: if the
    /// transaction did not commit (the handler rolled back, yet returned this response), the
    /// key is released, so an effect that did not happen is never replayed. Return the
    /// response this gives back, as it is: it is what retries replay.
    ///
    /// Run the transaction at `READ COMMITTED` (PostgreSQL's default): under `REPEATABLE READ`
    /// or `SERIALIZABLE`, a lease renewal that lands while it is open (one every third of the
    /// lease) makes this `UPDATE` fail with a serialization error.
    ///
    /// # Errors
    ///
    /// Roll the transaction back on any error (dropping it does):
    /// - [`ClaimErrorKind::LeaseLost`]: the claim no longer holds the record (its lease ran
    ///   out and another request took it over, or an operator forgot it);
    /// - [`ClaimErrorKind::Database`]: the statement failed;
    /// - [`ClaimErrorKind::Unsupported`]: the store keeps its records elsewhere
    ///   (`MemoryStore`, `RedisStore`, a store of your own): nothing is written;
    /// - [`ClaimErrorKind::AlreadyUsed`]: this claim (or a clone) was used before;
    /// - [`ClaimErrorKind::Body`]: the response's body failed;
    /// - [`ClaimErrorKind::NotInTransaction`]: a sqlx connection outside a transaction.
    ///
    /// [`CacheDecision::Skip`]: crate::CacheDecision::Skip
    pub async fn respond_in<C: ClaimConnection>(
        &self,
        conn: C,
        response: impl IntoResponse,
    ) -> Result<Response, ClaimError> {
        let held = &*self.inner;
        let Some(target) = &held.target else {
            return Err(ClaimError::new(ClaimErrorKind::Unsupported, None));
        };
        if held.state.swap(USED, Ordering::AcqRel) != FRESH {
            return Err(ClaimError::new(ClaimErrorKind::AlreadyUsed, None));
        }
        let config = held.context.config();
        let response = response.into_response();
        if !config.stores(&response) {
            return Ok(response);
        }
        let (mut head, body) = response.into_parts();
        // Passed on whole, its length known (see the layer's own buffering).
        head.headers.remove(http::header::TRANSFER_ENCODING);
        let collected = body
            .collect()
            .await
            .map_err(|err| ClaimError::new(ClaimErrorKind::Body, Some(err.into())))?;
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        let stored = if body.len() > config.max_response_bytes {
            StoredResponse::omitted(head.status)
        } else {
            // In the shared scope a replay may reach another caller: its cookies stay out.
            let skip_cookies = !config.shared_scope_cookies && held.key.tenant().is_shared();
            let skip = &config.skip_response_headers;
            let (name, t) = (&config.header, trailers.as_ref());
            StoredResponse::from_parts(&head, &body, t, name, skip, skip_cookies)
        };
        let encoded = stored.encode();
        let completion = sealed::Completion {
            sql: &target.complete,
            tenant: &held.key.tenant().as_bytes()[..],
            key: held.key.key(),
            token: token_bytes(held.token),
            response: &encoded,
            ttl: millis(config.ttl),
        };
        match conn.complete(completion).await? {
            0 => Err(ClaimError::new(ClaimErrorKind::LeaseLost, None)),
            _ => {
                held.state.store(WRITTEN, Ordering::Release);
                let body = ResponseBody::<Empty<Bytes>>::full_with(body, trailers);
                let mut response = Response::from_parts(head, Body::new(body));
                response.extensions_mut().insert(CompletedInTransaction);
                Ok(response)
            }
        }
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = &*self.inner;
        f.debug_struct("Claim")
            .field("key", &held.key)
            .field("fingerprint", &held.fingerprint)
            .field("token", &held.token)
            .field("table", &self.table())
            .finish()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Claim {
    type Rejection = ClaimError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Claim>()
            .cloned()
            .ok_or_else(|| ClaimError::new(ClaimErrorKind::Missing, None))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Claim {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Claim>().cloned())
    }
}

/// A connection [`Claim::respond_in`] writes the record through: a transaction of the
/// application's. Sealed; implemented for
///
/// - `&mut sqlx::PgConnection` (feature `sqlx`): `&mut *tx` for a `sqlx::Transaction`;
/// - `&tokio_postgres::Transaction<'_>` and `&deadpool_postgres::Transaction<'_>` (feature
///   `postgres`).
///
/// The connection must reach the store's database, inside the transaction that writes the
/// handler's effects. A `&mut sqlx::PgConnection` outside a transaction is refused
/// ([`ClaimErrorKind::NotInTransaction`]): its record would commit at once, and a retry would
/// replay an effect that rolled back.
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
pub trait ClaimConnection: sealed::Sealed {}

impl<C: sealed::Sealed> ClaimConnection for C {}

mod sealed {
    use super::*;

    /// The completed record, as the `complete` statement binds it.
    #[derive(Debug)]
    pub struct Completion<'a> {
        pub(super) sql: &'a str,
        pub(super) tenant: &'a [u8],
        pub(super) key: &'a str,
        pub(super) token: [u8; 16],
        pub(super) response: &'a [u8],
        pub(super) ttl: i64,
    }

    pub trait Sealed: Send {
        /// Runs the `complete` statement; the rows it changed.
        fn complete(
            self,
            completion: Completion<'_>,
        ) -> impl Future<Output = Result<u64, ClaimError>> + Send;
    }

    #[cfg(feature = "sqlx")]
    impl Sealed for &mut sqlx::PgConnection {
        async fn complete(self, c: Completion<'_>) -> Result<u64, ClaimError> {
            // A connection, unlike a transaction, has the type a transaction gives: the server
            // says which it is. A savepoint outside a transaction block fails (25P01), inside
            // one it leaves nothing behind; both statements go in one round trip. (sqlx's own
            // count of its transactions would miss one begun with SQL.)
            async fn in_transaction(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
                const CHECK: &str =
                    "SAVEPOINT tower_idempotency_claim; RELEASE SAVEPOINT tower_idempotency_claim";
                sqlx::Executor::execute(conn, CHECK).await.map(drop)
            }
            if let Err(err) = in_transaction(&mut *self).await {
                let outside = err
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "25P01");
                return Err(match outside {
                    true => ClaimError::new(super::ClaimErrorKind::NotInTransaction, None),
                    false => ClaimError::database(err),
                });
            }
            let done = sqlx::query(c.sql)
                .bind(c.tenant)
                .bind(c.key)
                .bind(&c.token[..])
                .bind(c.response)
                .bind(c.ttl)
                .execute(self)
                .await
                .map_err(ClaimError::database)?;
            Ok(done.rows_affected())
        }
    }

    #[cfg(feature = "postgres")]
    impl Sealed for &tokio_postgres::Transaction<'_> {
        async fn complete(self, c: Completion<'_>) -> Result<u64, ClaimError> {
            let token = &c.token[..];
            self.execute(c.sql, &[&c.tenant, &c.key, &token, &c.response, &c.ttl])
                .await
                .map_err(ClaimError::database)
        }
    }

    #[cfg(feature = "postgres")]
    impl Sealed for &deadpool_postgres::Transaction<'_> {
        async fn complete(self, c: Completion<'_>) -> Result<u64, ClaimError> {
            let statement = self
                .prepare_cached(c.sql)
                .await
                .map_err(ClaimError::database)?;
            let token = &c.token[..];
            self.execute(
                &statement,
                &[&c.tenant, &c.key, &token, &c.response, &c.ttl],
            )
            .await
            .map_err(ClaimError::database)
        }
    }
}

/// Why [`Claim::respond_in`] (or the `Claim` extractor) failed.
///
/// As an axum response, an RFC 9457 `application/problem+json` body as the layer's own
/// problems ([`ProblemJson`](crate::ProblemJson); a renderer and a `retry_after` set on the
/// layer do not reach a handler's error: its `Retry-After` is 1 second), with a generic
/// `detail`: the database's message, which names tables and
/// constraints, stays out of the body. The error itself is logged (with the `tracing` feature,
/// a `WARN` event of target `tower_idempotency` carrying it whole, source included).
///
/// | kind | answer |
/// |---|---|
/// | [`Database`](ClaimErrorKind::Database) | `503 idempotency_store_unavailable`, `Retry-After: 1`: the database failed; a retry replays what committed, or runs again when nothing did |
/// | [`LeaseLost`](ClaimErrorKind::LeaseLost) | `409 idempotency_key_in_progress`, `Retry-After: 1`: another request holds the key now |
/// | the others | `500 idempotency_claim_failed`: the application misused the claim, or its body failed; the `detail` says which (never the source's text) |
///
/// The response is never stored: the layer releases the key (a claim that lost its record
/// releases nothing), so a retry runs, or meets the request that holds the key.
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
pub struct ClaimError {
    kind: ClaimErrorKind,
    source: Option<Box<dyn Error + Send + Sync>>,
}

/// The kind of a [`ClaimError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
pub enum ClaimErrorKind {
    /// The store cannot complete records in the application's transactions (its records live
    /// elsewhere): nothing was written.
    Unsupported,
    /// The claim was used before: a request completes once.
    AlreadyUsed,
    /// The claim no longer holds the record: its lease ran out and another request took it
    /// over, or an operator forgot it. Roll back.
    LeaseLost,
    /// The database failed (the statement, or the application's own call wrapped with
    /// [`ClaimError::database`]). Roll back.
    Database,
    /// The response's body failed while it was read.
    Body,
    /// No claim for this request: it has no key (use `Option<Claim>`, or `.require_key(true)`),
    /// or the route is not behind `IdempotencyLayer`.
    Missing,
    /// The connection given to [`Claim::respond_in`] is not inside a transaction: the record
    /// would commit at once, whatever became of the handler's effects. Nothing was written.
    NotInTransaction,
}

impl ClaimError {
    fn new(kind: ClaimErrorKind, source: Option<Box<dyn Error + Send + Sync>>) -> Self {
        Self { kind, source }
    }

    /// A database error of the handler's own (its `BEGIN`, its queries, its `COMMIT`), so that
    /// a handler can use one error type: kind [`Database`](ClaimErrorKind::Database).
    pub fn database(source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self::new(ClaimErrorKind::Database, Some(source.into()))
    }

    /// What went wrong.
    pub fn kind(&self) -> ClaimErrorKind {
        self.kind
    }
}

impl fmt::Debug for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl ClaimError {
    /// What went wrong, without the source.
    fn what(&self) -> &'static str {
        match self.kind {
            ClaimErrorKind::Unsupported => {
                "the idempotency store cannot complete records inside the application's \
                 transaction (only SqlxStore and PostgresStore can); nothing was written"
            }
            ClaimErrorKind::AlreadyUsed => "this claim was already used",
            ClaimErrorKind::LeaseLost => {
                "the claim no longer holds its idempotency record (taken over or forgotten)"
            }
            ClaimErrorKind::Database => "the database failed",
            ClaimErrorKind::Body => "the response body failed",
            ClaimErrorKind::Missing => {
                "no idempotency claim for this request: it has no key, or the route is not \
                 behind IdempotencyLayer"
            }
            ClaimErrorKind::NotInTransaction => {
                "the connection given to respond_in is not inside a transaction: the \
                 idempotency record would not commit with the handler's effects; nothing was \
                 written"
            }
        }
    }
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.what();
        match &self.source {
            Some(source) => write!(f, "{what}: {source}"),
            None => f.write_str(what),
        }
    }
}

impl Error for ClaimError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

impl ClaimError {
    /// The problem a client is answered with (see [`ClaimError`]).
    fn problem(&self) -> Problem {
        match self.kind {
            ClaimErrorKind::Database => Problem::store_unavailable(1),
            ClaimErrorKind::LeaseLost => Problem::in_progress(1),
            _ => Problem::claim_failed(self.what()),
        }
    }
}

impl IntoResponse for ClaimError {
    fn into_response(self) -> Response {
        #[cfg(feature = "tracing")]
        crate::outcome::claim_failure(&self);
        let problem = self.problem();
        let mut response = ProblemJson.render(&problem).map(Body::from);
        if let Some(seconds) = problem.retry_after() {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(CacheDecision::Skip);
        response
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    async fn answer(err: ClaimError) -> (StatusCode, Option<String>, serde_json::Value, bool) {
        let response = err.into_response();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let skip = response.extensions().get::<CacheDecision>() == Some(&CacheDecision::Skip);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("ledger"), "{text}");
        (
            status,
            retry_after,
            serde_json::from_str(&text).unwrap(),
            skip,
        )
    }

    #[tokio::test]
    async fn claim_errors_answer_problems_without_the_databases_text() {
        let db = std::io::Error::other("duplicate key value violates \"ledger_key\"");
        let err = ClaimError::database(db);
        assert!(err.to_string().contains("ledger_key"), "the error keeps it");
        let (status, retry_after, body, skip) = answer(err).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(body["code"], "idempotency_store_unavailable");
        assert_eq!(body["status"], 503);
        assert!(skip, "never stored");

        let lost = ClaimError::new(ClaimErrorKind::LeaseLost, None);
        let (status, retry_after, body, skip) = answer(lost).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(body["code"], "idempotency_key_in_progress");
        assert!(skip, "never stored");

        for kind in [
            ClaimErrorKind::Unsupported,
            ClaimErrorKind::AlreadyUsed,
            ClaimErrorKind::Body,
            ClaimErrorKind::Missing,
            ClaimErrorKind::NotInTransaction,
        ] {
            let (status, retry_after, body, _) = answer(ClaimError::new(kind, None)).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{kind:?}");
            assert_eq!(retry_after, None, "{kind:?}");
            assert_eq!(body["code"], "idempotency_claim_failed", "{kind:?}");
            assert_eq!(body["title"], "Idempotency claim failed", "{kind:?}");
        }
        let failed = std::io::Error::other("ledger body failed");
        let err = ClaimError::new(ClaimErrorKind::Body, Some(failed.into()));
        let (_, _, body, _) = answer(err).await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.ends_with("the response body failed."), "{detail}");
        let (_, _, body, _) = answer(ClaimError::new(ClaimErrorKind::Missing, None)).await;
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("no idempotency claim for this request"),
            "{detail}"
        );
    }
}
