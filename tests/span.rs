//! With the `tracing` feature, each keyed request runs inside an `idempotency` span that carries
//! hashes of the key and tenant (never the raw key), the method and the path, and records the
//! outcome and the store calls' durations; the handler's own events nest under it. Alone in its
//! binary: `tracing` caches per-callsite interest process-wide.
#![cfg(feature = "tracing")]

#[macro_use]
mod support;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use support::send;
use tower_idempotency::{IdempotencyLayer, MemoryStore};
use tracing::Instrument;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// The fields of every `idempotency` span and of the application's own (`app`) span, and the
/// span each handler event was in.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<HashMap<u64, HashMap<String, String>>>>,
    app_spans: Arc<Mutex<HashMap<u64, HashMap<String, String>>>>,
    handler_events_in: Arc<Mutex<Vec<Option<u64>>>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let spans = match attrs.metadata().name() {
            "idempotency" => &self.spans,
            "app" => &self.app_spans,
            _ => return,
        };
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        spans.lock().unwrap().insert(id.into_u64(), fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        for spans in [&self.spans, &self.app_spans] {
            if let Some(fields) = spans.lock().unwrap().get_mut(&id.into_u64()) {
                values.record(&mut Fields(fields));
            }
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() == "handler" {
            let span = ctx.event_span(event).map(|span| span.id().into_u64());
            self.handler_events_in.lock().unwrap().push(span);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_request_span_carries_hashes_and_records_the_outcome() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    async fn pay() -> (StatusCode, &'static str) {
        tracing::info!(target: "handler", "charging the card");
        (StatusCode::CREATED, "paid")
    }
    let app = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let request = || {
        Request::post("/payments?x=1")
            .header("idempotency-key", "secret-key-42")
            .header("authorization", "Bearer sk_test_1")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(send(&app, request()).await.status, StatusCode::CREATED);
    assert!(send(&app, request()).await.replayed());

    let spans = capture.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "one span per keyed request");
    let events = capture.handler_events_in.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "the handler ran once");
    let executed_id = events[0].expect("the handler's event is inside a span");
    let executed = &spans[&executed_id];
    assert_eq!(executed["outcome"], "executed");
    assert_eq!(executed["method"], "POST");
    assert_eq!(executed["path"], "/payments");
    assert_eq!(executed["key_hash"].len(), 16);
    assert_eq!(executed["tenant_hash"].len(), 16);
    assert!(executed.contains_key("store_begin_us"), "{executed:?}");
    assert!(executed.contains_key("store_complete_us"), "{executed:?}");
    let replayed = spans
        .values()
        .find(|f| f["outcome"] == "replayed")
        .expect("replay span");
    assert_eq!(
        replayed["key_hash"], executed["key_hash"],
        "the same key, hashed the same"
    );
    for fields in spans.values() {
        for value in fields.values() {
            assert!(
                !value.contains("secret-key"),
                "the raw key never appears: {fields:?}"
            );
            assert!(!value.contains("sk_test"), "nor the credential: {fields:?}");
        }
    }

    // The application's own request span, with fields of the same names, stays the
    // application's: neither an answer decided before the layer's span exists (an invalid key)
    // nor a request inside the layer's span records into it.
    let app_span = || {
        tracing::info_span!(
            "app",
            outcome = tracing::field::Empty,
            store_begin_us = tracing::field::Empty,
            detached = tracing::field::Empty,
        )
    };
    let keyed = |key: &'static str| {
        Request::post("/payments")
            .header("idempotency-key", key)
            .header("authorization", "Bearer sk_test_1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let invalid = send(&app, keyed("two words")).instrument(app_span()).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let executed = send(&app, keyed("another-key"))
        .instrument(app_span())
        .await;
    assert_eq!(executed.status, StatusCode::CREATED);
    let app_spans = capture.app_spans.lock().unwrap().clone();
    assert_eq!(app_spans.len(), 2);
    for fields in app_spans.values() {
        assert!(
            fields.is_empty(),
            "the layer recorded into the application's span: {fields:?}"
        );
    }
    let spans = capture.spans.lock().unwrap().clone();
    let executed = spans
        .values()
        .filter(|f| f["outcome"] == "executed")
        .count();
    assert_eq!(
        executed, 2,
        "the second request's own span has its outcome: {spans:?}"
    );
}
