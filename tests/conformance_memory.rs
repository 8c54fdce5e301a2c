//! The store conformance suite against `MemoryStore`: no server needed.

use tower_idempotency::MemoryStore;

async fn store() -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

mod conformance {
    tower_idempotency::conformance_tests!(super::store);
}

/// `run_all` runs every case in one test, on one store shared by the cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_passes() {
    tower_idempotency::conformance::run_all(MemoryStore::new()).await;
}
