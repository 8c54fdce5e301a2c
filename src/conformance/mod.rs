//! A conformance suite for [`IdempotencyStore`] implementations: the behaviour the layer relies
//! on, checked against a real store.
//!
//! Every store of this crate passes it (`MemoryStore` with no server, `RedisStore` and
//! `PostgresStore` against real servers), and so should yours. Enable the `conformance` feature
//! in your dev-dependencies:
//!
//! ```toml
//! [dev-dependencies]
//! tower-idempotency = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! Then, in a test file, generate one `#[test]` per case with
//! [`conformance_tests!`](crate::conformance_tests), from an async function that builds your
//! store, or returns `None` to skip the suite (for example when the URL of its server is not
//! set):
//!
//! ```no_run
//! use tower_idempotency::MemoryStore;
//!
//! async fn store() -> Option<MemoryStore> {
//!     // e.g. std::env::var("MY_STORE_URL").ok()?, then connect
//!     Some(MemoryStore::new())
//! }
//!
//! mod conformance {
//!     tower_idempotency::conformance_tests!(super::store);
//! }
//! # fn main() {}
//! ```
//!
//! Or run every case in one test with [`run_all`], or pick cases: each is a public async
//! function taking the store.
//!
//! # What the cases need
//!
//! - Each case runs on its own multi-threaded Tokio runtime and spawns tasks.
//! - Cases use fresh, random keys and tenants, so they can run at once against one shared
//!   server, and leave only records that expire within a few minutes.
//! - Expiry cases use real leases and TTLs of 300 ms and sleep past them: a shared store keeps
//!   time on its server, so Tokio's paused clock cannot drive it. The whole suite takes a few
//!   seconds.
//! - The store must be atomic per record key across threads and connections: one case races
//!   200 callers on one key, through the one store value the suite was given. A store for a
//!   fleet must also be atomic across its instances (two processes, each with its own client of
//!   one server), which the suite cannot see: a lock inside the process passes it. Race two
//!   instances of your store yourself (this crate's fleet tests do so for Redis and PostgreSQL).
//!
//! - The operator calls ([`lookup`](IdempotencyStore::lookup) and
//!   [`forget`](IdempotencyStore::forget)) are optional: their cases print that they were
//!   skipped, and pass, when the store answers `StoreErrorKind::Unsupported`.
//!
//! Left to the store, and not checked: whether the holder of a lease that ran out, but that
//! nobody took over yet, can still renew or complete it (`MemoryStore` and `PostgresStore`
//! allow it; in `RedisStore` the record is already gone, so it is `LeaseLost`). Either way, once
//! another request took the record over, the old token is refused.

mod check;
mod fidelity;
mod lifecycle;
mod operator;

use std::future::Future;

use crate::store::IdempotencyStore;

pub use fidelity::{
    binary_body_round_trips, distinct_keys_are_independent, empty_response_round_trips,
    keys_with_every_visible_ascii_char, large_body_round_trips, many_headers_round_trip,
    omitted_response_round_trips, replay_is_exact, status_codes_round_trip, tenants_do_not_meet,
    trailers_round_trip,
};
pub use lifecycle::{
    begin_is_atomic, completed_record_is_final, fencing_after_takeover,
    lease_expiry_allows_takeover, mismatch_in_flight_and_completed, release_then_reacquire,
    renew_extends_the_lease, takeover_is_atomic, ttl_expiry_after_complete,
    unknown_records_are_lease_lost,
};
pub use operator::{
    forget_in_flight_needs_force, forget_removes_a_completed_record, lookup_reports_each_state,
    operator_calls_respect_tenants,
};

/// Generates one `#[test]` per conformance case, each running on its own multi-threaded Tokio
/// runtime with a store built by `$make`: a path to an `async fn() -> Option<S>` (or any
/// expression that calls like one). When it returns `None`, the case prints that it was
/// skipped and passes.
///
/// Invoke it inside a module of its own, as the generated functions are named after the cases.
/// See the [module documentation](crate::conformance) for an example.
#[macro_export]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
macro_rules! conformance_tests {
    ($make:expr $(,)?) => {
        $crate::__conformance_tests!(
            $make;
            begin_is_atomic,
            takeover_is_atomic,
            replay_is_exact,
            status_codes_round_trip,
            omitted_response_round_trips,
            empty_response_round_trips,
            trailers_round_trip,
            mismatch_in_flight_and_completed,
            release_then_reacquire,
            unknown_records_are_lease_lost,
            lease_expiry_allows_takeover,
            fencing_after_takeover,
            renew_extends_the_lease,
            completed_record_is_final,
            ttl_expiry_after_complete,
            large_body_round_trips,
            binary_body_round_trips,
            many_headers_round_trip,
            keys_with_every_visible_ascii_char,
            tenants_do_not_meet,
            distinct_keys_are_independent,
            lookup_reports_each_state,
            forget_removes_a_completed_record,
            forget_in_flight_needs_force,
            operator_calls_respect_tenants,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::run_case(
                    stringify!($case),
                    $make,
                    $crate::conformance::$case,
                );
            }
        )*
    };
}

/// Runs every case, one after the other, on clones of `store`. Panics at the first failure.
///
/// Needs a multi-threaded Tokio runtime with time enabled
/// (`#[tokio::test(flavor = "multi_thread")]`).
pub async fn run_all<S: IdempotencyStore + Clone>(store: S) {
    begin_is_atomic(store.clone()).await;
    takeover_is_atomic(store.clone()).await;
    replay_is_exact(store.clone()).await;
    status_codes_round_trip(store.clone()).await;
    omitted_response_round_trips(store.clone()).await;
    empty_response_round_trips(store.clone()).await;
    trailers_round_trip(store.clone()).await;
    mismatch_in_flight_and_completed(store.clone()).await;
    release_then_reacquire(store.clone()).await;
    unknown_records_are_lease_lost(store.clone()).await;
    lease_expiry_allows_takeover(store.clone()).await;
    fencing_after_takeover(store.clone()).await;
    renew_extends_the_lease(store.clone()).await;
    completed_record_is_final(store.clone()).await;
    ttl_expiry_after_complete(store.clone()).await;
    large_body_round_trips(store.clone()).await;
    binary_body_round_trips(store.clone()).await;
    many_headers_round_trip(store.clone()).await;
    keys_with_every_visible_ascii_char(store.clone()).await;
    tenants_do_not_meet(store.clone()).await;
    distinct_keys_are_independent(store.clone()).await;
    lookup_reports_each_state(store.clone()).await;
    forget_removes_a_completed_record(store.clone()).await;
    forget_in_flight_needs_force(store.clone()).await;
    operator_calls_respect_tenants(store).await;
}

/// Runs one case on a new multi-threaded Tokio runtime (4 workers, time and I/O enabled), with
/// the store that `make` builds; prints that the case was skipped when `make` returns `None`.
/// [`conformance_tests!`](crate::conformance_tests) calls this for each case: it is public
/// for the macro's sake only, not an API of its own.
#[doc(hidden)]
pub fn run_case<S, M, MF, C, CF>(name: &str, make: M, case: C)
where
    S: IdempotencyStore,
    M: FnOnce() -> MF,
    MF: Future<Output = Option<S>>,
    C: FnOnce(S) -> CF,
    CF: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("failed to build a Tokio runtime");
    runtime.block_on(async move {
        match make().await {
            Some(store) => case(store).await,
            None => eprintln!("conformance case `{name}` skipped: no store to test"),
        }
    });
}
