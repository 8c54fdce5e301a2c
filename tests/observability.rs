//! Observability: with the `tracing` feature, each outcome is an event carrying hashes of the
//! key and tenant, never the raw key. Alone in its binary: `tracing` caches per-callsite
//! interest process-wide, so a scoped subscriber must see the callsites first.
#![cfg(feature = "tracing")]

#[macro_use]
mod support;

use support::{FaultyStore, Runs, api, post_with_key, send};
use tower_idempotency::IdempotencyLayer;

#[cfg(feature = "tracing")]
#[tokio::test(start_paused = true)]
async fn fail_open_logs_a_warning_with_hashes_not_the_key() {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (runs, store) = (Runs::default(), FaultyStore::default());
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .fail_open(true),
    );
    let closed = api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).shared_scope(true));
    store.fail(true);
    send(&app, post_with_key("/payments", "secret-key-123", "{}")).await;
    let refused = send(&closed, post_with_key("/payments", "secret-key-124", "{}")).await;
    assert_eq!(refused.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    store.fail(false);
    send(&app, post_with_key("/payments", "secret-key-456", "{}")).await;

    // A completion that fails once the handler ran is reported: the key stays in flight.
    store.always(support::Op::Complete, support::Fault::Fail);
    send(
        &app,
        post_with_key("/payments", "secret-key-complete", "{}"),
    )
    .await;
    store.heal();

    // An abandoned request (its handler panicked) reports its release as an event.
    let panicking = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, post_with_key("/panic", "secret-key-789", "")).await })
    };
    assert!(panicking.await.unwrap_err().is_panic());

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let bypassed = logs
        .lines()
        .find(|l| l.contains("outcome=\"bypassed\""))
        .expect("event");
    assert!(bypassed.contains("WARN"), "{bypassed}");
    assert!(bypassed.contains("key_hash="), "{bypassed}");
    assert!(bypassed.contains("tenant_hash="), "{bypassed}");
    assert!(bypassed.contains("elapsed_us="), "{bypassed}");
    // Both outages say why: the store's error is in the event.
    assert!(
        bypassed.contains("error=") && bypassed.contains("injected fault"),
        "{bypassed}"
    );
    let refused = logs
        .lines()
        .find(|l| l.contains("outcome=\"store_error\""))
        .expect("event");
    assert!(refused.contains("WARN"), "{refused}");
    assert!(
        refused.contains("error=") && refused.contains("injected fault"),
        "{refused}"
    );
    assert!(logs.contains("outcome=\"executed\""), "{logs}");
    assert!(logs.contains("outcome=\"released\""), "{logs}");
    let failed = logs
        .lines()
        .find(|l| l.contains("call=\"complete\""))
        .expect("event");
    assert!(
        failed.contains("WARN") && failed.contains("key_hash="),
        "{failed}"
    );
    assert!(
        !logs.contains("secret-key"),
        "the raw key never reaches the logs: {logs}"
    );
}
