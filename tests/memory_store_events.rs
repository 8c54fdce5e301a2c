//! A full `MemoryStore` reports its evictions as a `tracing` warning, rate limited. Alone in its
//! binary: `tracing` caches per-callsite interest process-wide, so another test evicting
//! without a subscriber would hide the event from this one.
#![cfg(feature = "tracing")]

#[macro_use]
mod support;

use std::time::Duration;

use support::Runs;
use support::app::{created, shared_api};
use tower_idempotency::MemoryStore;

/// Evictions are reported as a warning, at most every 10 seconds, with their count.
#[tokio::test(start_paused = true)]
async fn evictions_are_reported_with_a_rate_limit() {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let evictions = || {
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter(|line| line.contains("dropped before their expiry"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    let runs = Runs::default();
    let store = MemoryStore::new().max_entries(1);
    let app = shared_api(&runs, &store);
    for i in 0..5 {
        assert!(created(&app, &format!("k{i}")).await);
    }
    assert_eq!(store.evicted(), 4);
    let lines = evictions();
    assert_eq!(lines.len(), 1, "one event for a burst: {lines:?}");
    assert!(lines[0].contains("evicted=1"), "{}", lines[0]);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(created(&app, "k5").await);
    let lines = evictions();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("evicted=4 evicted_total=5"),
        "{}",
        lines[1]
    );
}
