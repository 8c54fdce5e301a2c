//! With the `tracing` feature, every request the layer answers is one outcome event carrying a
//! hash of its key, a hash of its tenant and the time taken; the raw key and the credential
//! appear in no event and no span field, whatever the outcome (invalid keys, refusals, store
//! failures, panics, runs whose client hung up). Alone in its binary: it installs the global
//! subscriber.
#![cfg(feature = "tracing")]

#[macro_use]
mod support;

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use support::{Fault, FaultyStore, Op, Runs, api, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore, TenantRejection};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// In every key these tests send.
const KEY_MARK: &str = "RAWKEYzq";
/// The caller's credential (its tenant).
const CREDENTIAL: &str = "Bearer CREDzq-sk-live";
/// In the credential.
const CREDENTIAL_MARK: &str = "CREDzq";

/// A key of these tests: `KEY_MARK` and `label`.
fn key(label: &str) -> String {
    format!("{KEY_MARK}-{label}")
}

/// One event, new span or span record, with each of its fields as `name` and `value`.
#[derive(Debug, Clone)]
struct Seen {
    kind: &'static str,
    name: String,
    fields: Vec<(String, String)>,
}

impl Seen {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Its kind, name and every field, as one line.
    fn line(&self) -> String {
        let mut line = format!("{} {}", self.kind, self.name);
        for (name, value) in &self.fields {
            let _ = write!(line, " {name}={value}");
        }
        line
    }
}

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

/// Everything every subscriber callback saw, in order.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Seen>>>);

impl Capture {
    fn push(&self, kind: &'static str, name: String, fields: Fields) {
        let seen = Seen {
            kind,
            name,
            fields: fields.0,
        };
        self.0.lock().unwrap().push(seen);
    }

    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    /// The layer's outcome events, in order.
    fn outcomes(&self) -> Vec<Seen> {
        let all = self.all().into_iter();
        all.filter(|s| s.kind == "event" && s.get("outcome").is_some())
            .collect()
    }
}

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut fields = Fields(Vec::new());
        attrs.record(&mut fields);
        self.push("span", attrs.metadata().name().to_owned(), fields);
    }

    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut fields = Fields(Vec::new());
        values.record(&mut fields);
        self.push("record", String::new(), fields);
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        self.push("event", event.metadata().target().to_owned(), fields);
    }
}

/// A keyed `POST` from the caller.
fn keyed(path: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, CREDENTIAL)
        .body(Body::from(body))
        .unwrap()
}

/// Sends `request` and checks that its response carries `outcome`, which it answers.
async fn answered(app: &Router, request: Request<Body>, outcome: &'static str) -> &'static str {
    let reply = send(app, request).await;
    assert_eq!(
        reply.outcome.map(|o| o.as_str()),
        Some(outcome),
        "{reply:?}"
    );
    outcome
}

/// Waits until `done`, for at most 10 s.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..5_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("timed out waiting");
}

/// Each request is one outcome event with `key_hash`, `tenant_hash` and `elapsed_us`, and no
/// event or span field holds the raw key or the credential, for every outcome. TIMING: a
/// waiter's 50 ms deadline against a first run of 1 s; runs whose client hung up end within 10 s.
#[tokio::test(flavor = "current_thread")]
async fn every_outcome_is_one_event_with_hashes_and_never_the_key_or_the_credential() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .max_body_bytes(16)
        .max_response_bytes(1024)
        .wait_for_in_flight(Duration::from_millis(50));
    let app = api(runs.clone()).layer(layer.clone());
    let mut expected: Vec<&str> = Vec::new();

    expected.push(answered(&app, keyed("/payments", &key("a"), "{}"), "executed").await);
    expected.push(answered(&app, keyed("/payments", &key("a"), "{}"), "replayed").await);
    let quoted = format!("\"{}\"", key("a"));
    expected.push(answered(&app, keyed("/payments", &quoted, "{}"), "replayed").await);
    expected.push(answered(&app, keyed("/payments", &key("a"), "[1]"), "mismatch").await);
    expected.push(answered(&app, keyed("/status/500", &key("b"), "{}"), "released").await);
    let spaced = format!("{KEY_MARK} and more");
    expected.push(answered(&app, keyed("/payments", &spaced, "{}"), "invalid_key").await);
    let long = format!("{KEY_MARK}{}", "y".repeat(300));
    expected.push(answered(&app, keyed("/payments", &long, "{}"), "invalid_key").await);
    let list = format!("{KEY_MARK}, {KEY_MARK}2");
    expected.push(answered(&app, keyed("/payments", &list, "{}"), "invalid_key").await);
    let large = "0123456789abcdefghij";
    expected.push(answered(&app, keyed("/payments", &key("c"), large), "too_large").await);
    let cut_off = Request::post("/payments")
        .header("idempotency-key", key("d"))
        .header(header::AUTHORIZATION, CREDENTIAL)
        .body(Body::from_stream(futures_util::stream::iter([
            Ok(Bytes::from_static(b"{")),
            Err(std::io::Error::other("cut off")),
        ])))
        .unwrap();
    expected.push(answered(&app, cut_off, "body_error").await);
    expected.push(answered(&app, keyed("/big/4096", &key("e"), "{}"), "executed").await);
    expected.push(answered(&app, keyed("/big/4096", &key("e"), "{}"), "not_stored").await);
    let anonymous = Request::post("/payments")
        .header("idempotency-key", key("f"))
        .body(Body::from("{}"))
        .unwrap();
    expected.push(answered(&app, anonymous, "tenant_missing").await);
    let strict =
        api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).require_key(true));
    let no_key = Request::post("/payments")
        .header(header::AUTHORIZATION, CREDENTIAL)
        .body(Body::from("{}"))
        .unwrap();
    expected.push(answered(&strict, no_key, "missing_key").await);
    let rejecting = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).tenant(
        |_: &axum::http::request::Parts| {
            Err(TenantRejection::new(
                StatusCode::UNAUTHORIZED,
                "who are you",
            ))
        },
    ));
    expected.push(
        answered(
            &rejecting,
            keyed("/payments", &key("g"), "{}"),
            "tenant_rejected",
        )
        .await,
    );

    // A waiter past its deadline while the first runs.
    let before = runs.get();
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed("/slow/1000", &key("h"), "{}")).await }
    });
    until(|| runs.get() == before + 1).await;
    expected.push(answered(&app, keyed("/slow/1000", &key("h"), "{}"), "in_progress").await);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    expected.push("executed");

    // A handler that panics: released, and the panic goes on.
    let panicked = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed("/panic", &key("i"), "{}")).await }
    });
    assert!(panicked.await.unwrap_err().is_panic());
    expected.push("released");

    // A store that fails, closed and open; a completion that fails.
    let store = FaultyStore::default();
    store.fail(true);
    let closed = api(runs.clone()).layer(IdempotencyLayer::new(store.clone()));
    expected.push(answered(&closed, keyed("/payments", &key("j"), "{}"), "store_error").await);
    let open = api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).fail_open(true));
    expected.push(answered(&open, keyed("/payments", &key("k"), "{}"), "bypassed").await);
    store.heal();
    store.always(Op::Complete, Fault::Fail);
    expected.push(answered(&closed, keyed("/payments", &key("l"), "{}"), "executed").await);

    // Past the bound of keyed requests in flight.
    let bounded =
        api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).max_in_flight(1));
    let before = runs.get();
    let holder = tokio::spawn({
        let bounded = bounded.clone();
        async move { send(&bounded, keyed("/slow/500", &key("m"), "{}")).await }
    });
    until(|| runs.get() == before + 1).await;
    expected.push(answered(&bounded, keyed("/payments", &key("n"), "{}"), "overloaded").await);
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    expected.push("executed");

    // Through a real server, clients that hang up while their handler runs: a run that goes on
    // detached, and one cancelled (`finish_on_disconnect(false)`).
    let served = support::serve(api(runs.clone()).layer(layer.clone())).await;
    let before = runs.get();
    let stream = served
        .send_then_hang_up(keyed("/slow/1000", &key("o"), "{}"))
        .await;
    until(|| runs.get() == before + 1).await;
    drop(stream);
    let detached = layer.detached_runs();
    until(|| detached.count() == 1).await;
    assert!(detached.wait_timeout(Duration::from_secs(10)).await);
    expected.push("executed");
    let cancelling = IdempotencyLayer::new(MemoryStore::new()).finish_on_disconnect(false);
    let served = support::serve(api(runs.clone()).layer(cancelling)).await;
    let before = runs.get();
    let stream = served
        .send_then_hang_up(keyed("/slow/10000", &key("p"), "{}"))
        .await;
    until(|| runs.get() == before + 1).await;
    drop(stream);
    expected.push("released");
    // The release ends in the background.
    until(|| capture.outcomes().len() == expected.len()).await;

    for seen in capture.all() {
        let line = seen.line();
        assert!(!line.contains(KEY_MARK), "the raw key: {line}");
        assert!(!line.contains(CREDENTIAL_MARK), "the credential: {line}");
    }
    let outcomes = capture.outcomes();
    let mut got: Vec<&str> = outcomes.iter().map(|s| s.get("outcome").unwrap()).collect();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "one event per request");
    for seen in &outcomes {
        let outcome = seen.get("outcome").unwrap();
        let line = seen.line();
        assert!(seen.get("elapsed_us").is_some(), "{line}");
        let unkeyed = ["invalid_key", "missing_key"].contains(&outcome);
        assert_eq!(seen.get("key_hash").is_some(), !unkeyed, "{line}");
        let tenantless = unkeyed || ["tenant_missing", "tenant_rejected"].contains(&outcome);
        assert_eq!(seen.get("tenant_hash").is_some(), !tenantless, "{line}");
    }
    // Key "a", sent bare and quoted, is hashed the same every time; key "b" otherwise.
    let hashes: Vec<&str> = outcomes[..5]
        .iter()
        .map(|s| s.get("key_hash").unwrap())
        .collect();
    assert!(hashes[..4].iter().all(|h| *h == hashes[0]), "{hashes:?}");
    assert_ne!(hashes[4], hashes[0]);
    // The run whose client hung up says it ran on detached; no other does.
    let detached: Vec<_> = outcomes
        .iter()
        .filter(|s| s.get("detached") == Some("true"))
        .collect();
    assert_eq!(detached.len(), 1, "{detached:?}");
    assert_eq!(detached[0].get("outcome"), Some("executed"));
}
