//! A model-based property test: random sequences of requests (keys, tenants, bodies, methods),
//! handler outcomes (2xx, 4xx outcomes, 4xx refusals, 5xx, 429, panic, slow), clients that hang
//! up while their handler runs, and clock advances past the lease and the TTL. After every step, the status, the replay header, the body and the
//! number of handler runs must match a small reference model of the contract.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use proptest::prelude::*;
use support::send;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

const LEASE: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_secs(60);

/// What the handler does on its next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Created,
    /// A 4xx that is an outcome of the operation: stored.
    NotFound,
    /// A 4xx that refuses the request before it ran (validation): not stored.
    Refused,
    ServerError,
    TooManyRequests,
    Panic,
}

impl Behaviour {
    fn status(self) -> StatusCode {
        match self {
            Self::Created => StatusCode::CREATED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Refused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::Panic => unreachable!("a panic has no status"),
        }
    }

    fn stored(self) -> bool {
        matches!(self, Self::Created | Self::NotFound)
    }
}

/// A request's identity: everything that goes into the record key and the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Req {
    key: u8,
    tenant: u8,
    body: u8,
    patch: bool,
    /// The route that serves it: a different path, so a different fingerprint.
    route: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Route {
    /// `/r`: answers at once, as the step's `Behaviour` says.
    Plain,
    /// `/slow`: blocks until `Finish`, then 201.
    Slow,
    /// `/crash`: never answers; its server "crashes" while it runs.
    Crash,
}

#[derive(Debug, Clone)]
enum Step {
    /// Send a request; the handler, if it runs, behaves so.
    Send(Req, Behaviour),
    /// Send a request whose handler blocks until `Finish`.
    Start(Req),
    /// Let every blocked handler finish (with 201).
    Finish,
    /// Send a request whose handler blocks, then drop it: the client hangs up. The handler
    /// runs on, detached, until `Finish`, and its response is stored as if the client had
    /// stayed.
    HangUp(Req),
    /// Send a request whose handler blocks, then lose its server: the future is leaked, never
    /// dropped, so nothing releases or renews the key. Its lease runs out.
    Crash(Req),
    /// Let time pass (in small steps, so that leases are renewed).
    Advance(Duration),
}

fn req() -> impl Strategy<Value = Req> {
    (0..3u8, 0..2u8, 0..2u8, any::<bool>()).prop_map(|(key, tenant, body, patch)| Req {
        key,
        tenant,
        body,
        patch,
        route: Route::Plain,
    })
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        4 => Just(Behaviour::Created),
        2 => Just(Behaviour::NotFound),
        2 => Just(Behaviour::Refused),
        2 => Just(Behaviour::ServerError),
        1 => Just(Behaviour::TooManyRequests),
        1 => Just(Behaviour::Panic),
    ]
}

fn step(with_time: bool) -> BoxedStrategy<Step> {
    let advance = if with_time { 2 } else { 0 };
    // A crashed holder is only taken over once time passes.
    let crash = if with_time { 1 } else { 0 };
    prop_oneof![
        8 => (req(), behaviour()).prop_map(|(r, b)| Step::Send(r, b)),
        2 => req().prop_map(|r| Step::Start(Req { route: Route::Slow, ..r })),
        2 => Just(Step::Finish),
        1 => req().prop_map(|r| Step::HangUp(Req { route: Route::Slow, ..r })),
        crash => req().prop_map(|r| Step::Crash(Req { route: Route::Crash, ..r })),
        advance => prop_oneof![
            Just(Duration::from_secs(1)),
            Just(LEASE + Duration::from_secs(1)),
            Just(TTL + Duration::from_secs(1)),
        ]
        .prop_map(Step::Advance),
    ]
    .boxed()
}

/// The reference model: what DESIGN.md says each record is.
#[derive(Debug, Clone)]
enum Record {
    /// In flight; a holder that crashed stops renewing, so its lease ends at `lease_until`.
    InFlight(Req, Option<Duration>),
    Completed {
        req: Req,
        status: StatusCode,
        body: String,
        expires_at: Duration,
    },
}

#[derive(Default)]
struct Model {
    records: HashMap<(u8, u8), Record>,
    runs: usize,
    now: Duration,
    /// The store's bound on records, when the test sets one: a new key then makes room.
    eviction: Option<Eviction>,
}

/// What a bounded `MemoryStore` does when it is full: it drops the live completed record
/// nearest its expiry (the one begun first among equals), never an in-flight one, and refuses
/// the new key when in-flight records alone fill it.
#[derive(Default)]
struct Eviction {
    cap: usize,
    /// One tenant's share of the store, when set. It bounds no one while the store has room;
    /// once the store is full, a tenant at its share or over it drops its own completed record
    /// nearest expiry when it has one; a tenant within its share drops a record of the tenant
    /// over its share, if any; then the store drops its nearest expiry of all (so a tenant whose
    /// records are all in flight is refused only when in-flight records fill the store).
    per_tenant: Option<usize>,
    /// The order in which each slot's record was begun.
    begun: HashMap<(u8, u8), u64>,
    next: u64,
}

/// What the model expects a request to get.
#[derive(Debug, PartialEq)]
enum Expect {
    Runs,
    Conflict,
    Mismatch,
    Replay(StatusCode, String),
    /// The store is full of in-flight records: `503`, nothing runs.
    Full,
}

impl Model {
    fn expect(&mut self, r: Req) -> Expect {
        let slot = (r.tenant, r.key);
        let live = match self.records.get(&slot) {
            Some(Record::Completed { expires_at, .. }) => *expires_at > self.now,
            Some(Record::InFlight(_, lease_until)) => lease_until.is_none_or(|t| t > self.now),
            None => false,
        };
        if !live {
            self.records.remove(&slot);
            if !self.make_room(slot) {
                return Expect::Full;
            }
            return Expect::Runs;
        }
        match &self.records[&slot] {
            Record::InFlight(held, _) if *held != r => Expect::Mismatch,
            Record::Completed { req, .. } if *req != r => Expect::Mismatch,
            Record::InFlight(..) => Expect::Conflict,
            Record::Completed { status, body, .. } => Expect::Replay(*status, body.clone()),
        }
    }

    fn is_live(&self, record: &Record) -> bool {
        match record {
            Record::Completed { expires_at, .. } => *expires_at > self.now,
            Record::InFlight(_, lease_until) => lease_until.is_none_or(|t| t > self.now),
        }
    }

    /// Drops the live completed record nearest its expiry among the slots `of` selects;
    /// `false` when there is none.
    fn drop_nearest(&mut self, of: impl Fn((u8, u8)) -> bool) -> bool {
        let eviction = self.eviction.as_ref().expect("set");
        let nearest = self
            .records
            .iter()
            .filter(|(slot, r)| of(**slot) && self.is_live(r))
            .filter_map(|(slot, r)| match r {
                Record::Completed { expires_at, .. } => {
                    Some(((*expires_at, eviction.begun[slot]), *slot))
                }
                Record::InFlight(..) => None,
            })
            .min();
        let Some((_, evicted)) = nearest else {
            return false;
        };
        self.records.remove(&evicted);
        true
    }

    /// The live records of the tenant `tenant`, or of every tenant.
    fn live(&self, tenant: Option<u8>) -> usize {
        self.records
            .iter()
            .filter(|(s, r)| tenant.is_none_or(|t| s.0 == t) && self.is_live(r))
            .count()
    }

    /// A new record for `slot` is about to begin: when the live records fill the store (the
    /// dead ones go first), room is made, fairly when there is a share per tenant; `false` when
    /// the new key is refused.
    fn make_room(&mut self, slot: (u8, u8)) -> bool {
        let Some(eviction) = &self.eviction else {
            return true;
        };
        let (cap, per_tenant) = (eviction.cap, eviction.per_tenant);
        if self.live(None) >= cap {
            if let Some(share) = per_tenant {
                if self.live(Some(slot.0)) >= share {
                    // At its share or over it: its own record first, when it has one.
                    self.drop_nearest(|s| s.0 == slot.0);
                } else if let Some(heaviest) = [0, 1]
                    .into_iter()
                    .find(|&t| t != slot.0 && self.live(Some(t)) > share)
                {
                    // Within its share: a record of the tenant over its share (with a cap of
                    // twice the share, there is one at most), if it has a completed one.
                    self.drop_nearest(|s| s.0 == heaviest);
                }
            }
            if self.live(None) >= cap && !self.drop_nearest(|_| true) {
                return false;
            }
        }
        let eviction = self.eviction.as_mut().expect("set");
        eviction.next += 1;
        eviction.begun.insert(slot, eviction.next);
        true
    }
}

struct Api {
    runs: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    gate: Arc<tokio::sync::Semaphore>,
}

fn app<S: IdempotencyStore>(store: S, api: &Api) -> Router {
    #[derive(Clone)]
    struct St(
        Arc<AtomicUsize>,
        Arc<Mutex<Behaviour>>,
        Arc<tokio::sync::Semaphore>,
    );
    async fn handler(State(St(runs, behaviour, _)): State<St>) -> axum::response::Response {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let behaviour = *behaviour.lock().unwrap();
        if behaviour == Behaviour::Panic {
            panic!("handler panics on purpose");
        }
        (behaviour.status(), format!("run {n}")).into_response()
    }
    async fn slow(State(St(runs, _, gate)): State<St>) -> axum::response::Response {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        gate.acquire().await.unwrap().forget();
        (StatusCode::CREATED, format!("run {n}")).into_response()
    }
    async fn crash(State(St(runs, _, _)): State<St>) -> axum::response::Response {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
    Router::new()
        .route("/r", post(handler).patch(handler))
        .route("/slow", post(slow).patch(slow))
        .route("/crash", post(crash).patch(crash))
        .with_state(St(
            api.runs.clone(),
            api.behaviour.clone(),
            api.gate.clone(),
        ))
        .layer(
            IdempotencyLayer::new(store)
                .shared_scope(true)
                .lease(LEASE)
                .ttl(TTL),
        )
}

fn request(r: Req, scope: &str) -> Request<Body> {
    let path = match r.route {
        Route::Plain => "/r",
        Route::Slow => "/slow",
        Route::Crash => "/crash",
    };
    let method = if r.patch { Method::PATCH } else { Method::POST };
    Request::builder()
        .method(method)
        .uri(path)
        .header("idempotency-key", format!("{scope}-k{}", r.key))
        .header("authorization", format!("Bearer t{}", r.tenant))
        .body(Body::from(format!("body {}", r.body)))
        .unwrap()
}

/// How a run lets background work (a release after a drop or a panic) finish: on the paused
/// clock of the in-memory runs, by yielding; against a real server, by waiting for it.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
enum Clock {
    Paused,
    Real,
}

impl Clock {
    async fn settle(self) {
        match self {
            Clock::Paused => {
                for _ in 0..50 {
                    tokio::task::yield_now().await;
                }
            }
            Clock::Real => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }

    /// One short wait while polling for a condition.
    async fn tick(self) {
        match self {
            Clock::Paused => tokio::task::yield_now().await,
            Clock::Real => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Runs `steps` against the layer over `store` and checks every outcome against the model.
async fn check<S: IdempotencyStore>(
    store: S,
    steps: Vec<Step>,
    scope: String,
    clock: Clock,
    eviction: Option<Eviction>,
) {
    let api = Api {
        runs: Arc::default(),
        behaviour: Arc::new(Mutex::new(Behaviour::Created)),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let app = app(store, &api);
    let mut model = Model {
        eviction,
        ..Model::default()
    };
    let mut blocked: Vec<(Req, tokio::task::JoinHandle<support::Reply>)> = Vec::new();
    // Handlers whose client hung up, with their run number: they run on until `Finish`.
    let mut detached: Vec<(Req, usize)> = Vec::new();

    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Step::Send(r, b) => {
                let expect = model.expect(r);
                *api.behaviour.lock().unwrap() = b;
                let runs_before = api.runs.load(Ordering::SeqCst);
                let app2 = app.clone();
                let request = request(r, &scope);
                let result = tokio::spawn(async move { send(&app2, request).await }).await;
                let ran = api.runs.load(Ordering::SeqCst) - runs_before;
                match expect {
                    Expect::Runs => {
                        model.runs += 1;
                        assert_eq!(ran, 1, "step {i}: the handler runs");
                        if b == Behaviour::Panic {
                            assert!(result.unwrap_err().is_panic(), "step {i}");
                            clock.settle().await; // the release runs in the background
                            continue;
                        }
                        let reply = result.unwrap();
                        assert_eq!(reply.status, b.status(), "step {i}");
                        assert!(!reply.replayed(), "step {i}");
                        let body = format!("run {}", model.runs);
                        assert_eq!(reply.body, body, "step {i}");
                        if b.stored() {
                            let record = Record::Completed {
                                req: r,
                                status: b.status(),
                                body,
                                expires_at: model.now + TTL,
                            };
                            model.records.insert((r.tenant, r.key), record);
                        }
                    }
                    other => {
                        assert_eq!(ran, 0, "step {i}: the handler does not run");
                        let reply = result.unwrap();
                        match other {
                            Expect::Conflict => assert_eq!(reply.status, StatusCode::CONFLICT),
                            Expect::Mismatch => {
                                assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY)
                            }
                            Expect::Replay(status, body) => {
                                assert_eq!(reply.status, status, "step {i}");
                                assert!(reply.replayed(), "step {i}");
                                assert_eq!(reply.body, body, "step {i}");
                            }
                            Expect::Full => {
                                assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE)
                            }
                            Expect::Runs => unreachable!(),
                        }
                    }
                }
            }
            Step::Start(r) | Step::HangUp(r) => {
                let expect = model.expect(r);
                let runs_before = api.runs.load(Ordering::SeqCst);
                let app2 = app.clone();
                let request = request(r, &scope);
                let task = tokio::spawn(async move { send(&app2, request).await });
                if expect != Expect::Runs {
                    let reply = task.await.unwrap();
                    assert_eq!(api.runs.load(Ordering::SeqCst), runs_before, "step {i}");
                    match expect {
                        Expect::Conflict => assert_eq!(reply.status, StatusCode::CONFLICT),
                        Expect::Mismatch => {
                            assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY)
                        }
                        Expect::Replay(status, body) => {
                            assert!(reply.replayed());
                            assert_eq!((reply.status, reply.body), (status, body.into()));
                        }
                        Expect::Full => assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE),
                        Expect::Runs => unreachable!(),
                    }
                    continue;
                }
                // Wait until the handler has started.
                for _ in 0..1000 {
                    if api.runs.load(Ordering::SeqCst) > runs_before {
                        break;
                    }
                    clock.tick().await;
                }
                assert_eq!(api.runs.load(Ordering::SeqCst), runs_before + 1, "step {i}");
                model.runs += 1;
                model
                    .records
                    .insert((r.tenant, r.key), Record::InFlight(r, None));
                if matches!(step, Step::HangUp(_)) {
                    task.abort();
                    let _ = task.await;
                    detached.push((r, model.runs));
                } else {
                    blocked.push((r, task));
                }
            }
            Step::Crash(r) => {
                let expect = model.expect(r);
                let runs_before = api.runs.load(Ordering::SeqCst);
                let mut future = Box::pin(app.clone().oneshot(request(r, &scope)));
                let waker = futures_util::task::noop_waker();
                let mut cx = std::task::Context::from_waker(&waker);
                let mut answer = None;
                for _ in 0..1000 {
                    if let std::task::Poll::Ready(result) = future.as_mut().poll(&mut cx) {
                        answer = Some(result.unwrap());
                        break;
                    }
                    if api.runs.load(Ordering::SeqCst) > runs_before {
                        break;
                    }
                    clock.tick().await;
                }
                if expect == Expect::Runs {
                    assert!(answer.is_none(), "step {i}: the handler never answers");
                    assert_eq!(api.runs.load(Ordering::SeqCst), runs_before + 1, "step {i}");
                    model.runs += 1;
                    let record = Record::InFlight(r, Some(model.now + LEASE));
                    model.records.insert((r.tenant, r.key), record);
                    std::mem::forget(future); // the server is gone: no drop, no renewal
                } else {
                    let status = answer.expect("answered at once").status();
                    let expected = match expect {
                        Expect::Conflict => StatusCode::CONFLICT,
                        Expect::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
                        Expect::Replay(status, _) => status,
                        Expect::Full => StatusCode::SERVICE_UNAVAILABLE,
                        Expect::Runs => unreachable!(),
                    };
                    assert_eq!(status, expected, "step {i}");
                }
            }
            Step::Finish => {
                let count = blocked.len() + detached.len();
                api.gate.add_permits(count);
                for (r, n) in detached.drain(..) {
                    let record = Record::Completed {
                        req: r,
                        status: StatusCode::CREATED,
                        body: format!("run {n}"),
                        expires_at: model.now + TTL,
                    };
                    model.records.insert((r.tenant, r.key), record);
                }
                clock.settle().await; // the detached runs store their responses
                for (r, task) in blocked.drain(..) {
                    let reply = task.await.unwrap();
                    assert_eq!(reply.status, StatusCode::CREATED, "step {i}");
                    let body = String::from_utf8(reply.body.to_vec()).unwrap();
                    let record = Record::Completed {
                        req: r,
                        status: StatusCode::CREATED,
                        body,
                        expires_at: model.now + TTL,
                    };
                    model.records.insert((r.tenant, r.key), record);
                }
            }
            Step::Advance(by) => {
                let tick = LEASE / 6;
                let mut left = by;
                while !left.is_zero() {
                    let now = tick.min(left);
                    tokio::time::advance(now).await;
                    clock.settle().await;
                    left -= now;
                }
                model.now += by;
            }
        }
        assert_eq!(
            api.runs.load(Ordering::SeqCst),
            model.runs,
            "step {i}: run count"
        );
    }
    api.gate.add_permits(blocked.len() + detached.len());
    for (_, task) in blocked {
        task.await.unwrap();
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_matches_the_model(steps in prop::collection::vec(step(true), 1..40)) {
        paused_runtime().block_on(check(MemoryStore::new(), steps, "m".into(), Clock::Paused, None));
    }

    /// A store bound to 3 records for 6 keys, with the default share per tenant (an eighth,
    /// at least 1: here 1): new keys of a full store drop completed records, or get `503` when
    /// in-flight records fill it. A retry of a dropped record runs again, and that is the only
    /// way a completed key runs twice.
    #[test]
    fn a_full_memory_store_matches_the_model(steps in prop::collection::vec(step(true), 1..40)) {
        let store = MemoryStore::new().max_entries(3);
        assert_eq!(store.settings().max_entries_per_tenant(), 1);
        let eviction = Eviction { cap: 3, per_tenant: Some(1), ..Eviction::default() };
        paused_runtime().block_on(check(store, steps, "m".into(), Clock::Paused, Some(eviction)));
    }

    /// A store of 4 records (one shard), a share of 2 per tenant, for 2 tenants of 3 keys: one
    /// tenant fills the store alone; once it is full, a tenant at its share or over it drops
    /// its own completed record nearest expiry first; a tenant within its share takes a record
    /// of the one over it; otherwise the store drops its nearest of all, and refuses only when
    /// in-flight records fill it.
    #[test]
    fn a_memory_store_bound_per_tenant_matches_the_model(
        steps in prop::collection::vec(step(true), 1..40),
    ) {
        let store = MemoryStore::builder().max_entries(4).max_entries_per_tenant(2).build();
        let eviction = Eviction { cap: 4, per_tenant: Some(2), ..Eviction::default() };
        paused_runtime().block_on(check(store, steps, "m".into(), Clock::Paused, Some(eviction)));
    }
}

/// The shared stores, against real servers and in real time: no clock jumps or crashes (their
/// leases and TTLs are the server's), every other step as above.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn real_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[cfg(any(feature = "redis", feature = "postgres"))]
proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[cfg(feature = "redis")]
    #[test]
    fn redis_store_matches_the_model(steps in prop::collection::vec(step(false), 1..24)) {
        real_runtime().block_on(async {
            let Some(store) = support::shared::redis().await else { return };
            let scope = tower_idempotency::LockToken::random().to_string();
            check(store, steps, scope, Clock::Real, None).await;
        });
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_store_matches_the_model(steps in prop::collection::vec(step(false), 1..24)) {
        real_runtime().block_on(async {
            let Some(store) = support::shared::postgres().await else { return };
            let scope = tower_idempotency::LockToken::random().to_string();
            check(store, steps, scope, Clock::Real, None).await;
        });
    }
}
