//! The assembly of every answer the layer gives to a keyed request: replays, problems, and what
//! every answer carries (the echoed key, the outcome).

use http::header::{self, HeaderValue};
use http::{Extensions, Response};

use crate::body::ResponseBody;
use crate::config::{Config, IDEMPOTENT_REPLAYED, Shared};
use crate::error::{ErrorRenderer, Problem};
use crate::key::ParsedKey;
use crate::outcome::{self, Outcome, Started};
use crate::store::{RecordKey, StoreError, StoreErrorKind};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

/// A completed request's stored response, replayed; or `409` when it was too large to store.
pub(crate) fn replay<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    stored: StoredResponse,
    report: Report<'_>,
) -> Response<ResponseBody<B>> {
    if stored.is_omitted() {
        let problem = Problem::not_stored(stored.status());
        return answer(shared, &problem, Outcome::NotStored, report);
    }
    // Room for the two headers a replay adds: this one and the echoed key.
    let mut response = stored.into_replay(2, ResponseBody::full_with);
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    // Finished where it is, rather than moved through `finish` and back.
    mark(&mut response, Outcome::Replayed, &shared.config, report);
    response
}

/// `503`: the store failed, timed out, or is full of requests in flight.
pub(crate) fn unavailable<St, T, E: ErrorRenderer, B>(
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
    answer(shared, &problem, Outcome::StoreError, report.failed(err))
}

/// What a response reports about its request: the key header to echo, and the key and tenant
/// whose hashes go into the outcome's event.
pub(crate) struct Report<'a> {
    raw: Option<&'a HeaderValue>,
    key: Option<&'a [u8]>,
    tenant: Option<&'a TenantId>,
    started: Started,
    /// The store's failure that decided the outcome, named in the event.
    error: Option<&'a StoreError>,
    /// The request's extensions, for an answer the handler did not give: their map, emptied,
    /// carries the outcome, so that the answer allocates none of its own.
    spare: Extensions,
}

impl<'a> Report<'a> {
    pub(crate) fn keyed(raw: &'a HeaderValue, record: &'a RecordKey, started: Started) -> Self {
        Self {
            raw: Some(raw),
            key: Some(record.text().as_bytes()),
            tenant: Some(record.tenant()),
            started,
            error: None,
            spare: Extensions::new(),
        }
    }

    /// The report of a request refused before any store call: its key once it has a valid one,
    /// its tenant once known.
    pub(crate) fn refused(key: Option<&'a ParsedKey>, tenant: Option<&'a TenantId>) -> Self {
        Self {
            raw: key.map(|k| &k.raw),
            key: key.map(|k| k.key.as_bytes()),
            tenant,
            started: Started::now(),
            error: None,
            spare: Extensions::new(),
        }
    }

    /// The same report, handing the answer the map of `extensions` (the request's, which no
    /// handler gets) to carry its outcome: emptied, its allocation is the answer's.
    pub(crate) fn reusing(self, extensions: &mut Extensions) -> Self {
        Self {
            spare: std::mem::take(extensions),
            ..self
        }
    }

    /// The same report, naming the store's failure that decided the outcome in its event.
    pub(crate) fn failed(self, error: &'a StoreError) -> Self {
        Self {
            error: Some(error),
            ..self
        }
    }

    /// Reports `outcome` as its event and metric alone: for a request that ends without a
    /// response to carry it (its service failed).
    pub(crate) fn emit(&self, outcome: Outcome) {
        outcome::emit(outcome, self.key, self.tenant, self.started, self.error);
    }
}

/// Adds what every response to a keyed request carries: the echoed key (exactly as the client
/// sent it) and the outcome, in the extensions and as a `tracing` event. A response without
/// extensions of its own takes the map the report lends (see [`Report::reusing`]), emptied.
pub(crate) fn finish<B>(
    mut response: Response<B>,
    outcome: Outcome,
    config: &Config,
    report: Report<'_>,
) -> Response<B> {
    mark(&mut response, outcome, config, report);
    response
}

/// What [`finish`] adds, added to `response` in place.
fn mark<B>(response: &mut Response<B>, outcome: Outcome, config: &Config, report: Report<'_>) {
    report.emit(outcome);
    if outcome != Outcome::Replayed {
        // Only the layer says a response is a replay: a handler's own (an upstream API's,
        // passed on) would tell a first run's client that nothing ran.
        crate::util::remove_header(response.headers_mut(), &IDEMPOTENT_REPLAYED);
    }
    if let Some(raw) = report.raw {
        response
            .headers_mut()
            .insert(config.header.clone(), raw.clone());
    }
    let extensions = response.extensions_mut();
    if extensions.is_empty() && !report.spare.is_empty() {
        let mut spare = report.spare;
        spare.clear();
        *extensions = spare;
    }
    extensions.insert(outcome);
}

/// Renders `problem` as the answer to a keyed request.
pub(crate) fn answer<St, T, E: ErrorRenderer, B>(
    shared: &Shared<St, T, E>,
    problem: &Problem,
    outcome: Outcome,
    report: Report<'_>,
) -> Response<ResponseBody<B>> {
    finish(render(shared, problem), outcome, &shared.config, report)
}

/// Renders `problem` with the configured renderer, adding `Retry-After` when it has one.
pub(crate) fn render<St, T, E: ErrorRenderer, B>(
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
